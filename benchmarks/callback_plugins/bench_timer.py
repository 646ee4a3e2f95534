# Copyright: contributors to aphrodite.baremetal
# Apache-2.0 (see LICENSES/Apache-2.0.txt)
"""Record one ansible-playbook run for benchmarks/fleet_bench.py.

Enabled by the benchmark only (ANSIBLE_CALLBACKS_ENABLED=bench_timer with this directory
on ANSIBLE_CALLBACK_PLUGINS); it writes a JSON file to $BENCH_TIMER_OUT when the run ends:
the wall time, each task's wall time (from its start to the next task's start, as
ansible.posix.profile_tasks counts it, so waiting on the slowest host is included), the
recap of every host and which tasks reported a change where.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bench_timer
type: aggregate
short_description: machine-readable task timings for benchmarks/fleet_bench.py
description: Writes the run's wall time, per-task wall times, the recap and the changed tasks to $BENCH_TIMER_OUT.
requirements: [enabled in callbacks_enabled]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._started = time.monotonic()
        self._tasks: list[dict] = []
        self._current: dict | None = None
        self._changed: list[dict] = []
        self._play = ""

    def _close(self) -> None:
        if self._current is not None:
            self._current["seconds"] = round(time.monotonic() - self._current.pop("_t0"), 3)
            self._tasks.append(self._current)
            self._current = None

    def _open(self, task) -> None:
        self._close()
        self._current = {
            "play": self._play,
            "task": task.get_name().strip(),
            "path": task.get_path() or "",
            "_t0": time.monotonic(),
        }

    def v2_playbook_on_play_start(self, play) -> None:
        self._close()
        self._play = play.get_name().strip()

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._open(task)

    def v2_playbook_on_handler_task_start(self, task) -> None:
        self._open(task)

    def _record_change(self, result) -> None:
        if result._result.get("changed"):
            self._changed.append({"host": result._host.get_name(), "task": result._task.get_name().strip(),
                                  "path": result._task.get_path() or ""})

    def v2_runner_on_ok(self, result) -> None:
        self._record_change(result)

    def v2_playbook_on_stats(self, stats) -> None:
        self._close()
        out = os.environ.get("BENCH_TIMER_OUT")
        if not out:
            return
        hosts = sorted(stats.processed.keys())
        report = {
            "seconds": round(time.monotonic() - self._started, 3),
            "recap": {h: stats.summarize(h) for h in hosts},
            "tasks": self._tasks,
            "changed": self._changed,
        }
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
