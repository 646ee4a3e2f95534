"""Small ansible-runner event streams for the CLI's unit tests, and a stand-in for a run.

Events carry the fields ansible-runner's ``awx_display`` callback writes (``event``,
``created``, ``event_data`` with ``play``, ``task``, ``host``, ``res``...); recorded lab
runs, trimmed to those fields, are in ``fixtures/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aphrodite_deploy import cli  # noqa: E402
from aphrodite_deploy.runner import RunResult  # noqa: E402

_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Stream:
    """Builds an event list; every event is one second after the previous one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.play = ""

    def _add(self, kind: str, **data: Any) -> "Stream":
        created = (_START + timedelta(seconds=len(self.events))).isoformat()
        self.events.append({"event": kind, "counter": len(self.events) + 1, "created": created, "event_data": data})
        return self

    def play_start(self, name: str) -> "Stream":
        self.play = name
        return self._add("playbook_on_play_start", play=name, name=name)

    def task(self, name: str) -> "Stream":
        return self._add("playbook_on_task_start", play=self.play, task=name)

    def ok(self, host: str, task: str, changed: bool = False, **res: Any) -> "Stream":
        return self._add("runner_on_ok", play=self.play, task=task, host=host, res=dict(res, changed=changed))

    def skipped(self, host: str, task: str) -> "Stream":
        return self._add("runner_on_skipped", play=self.play, task=task, host=host, res={"skipped": True})

    def failed(self, host: str, task: str, ignore_errors: bool = False, **res: Any) -> "Stream":
        return self._add("runner_on_failed", play=self.play, task=task, host=host, ignore_errors=ignore_errors,
                         res=dict(res, failed=True))

    def unreachable(self, host: str, task: str, msg: str) -> "Stream":
        return self._add("runner_on_unreachable", play=self.play, task=task, host=host,
                         res={"unreachable": True, "msg": msg})

    def stats(self, **hosts: dict[str, int]) -> "Stream":
        data: dict[str, dict[str, int]] = {key: {} for key in ("ok", "changed", "failures", "dark", "skipped",
                                                              "rescued", "ignored", "processed")}
        for host, counts in hosts.items():
            for key, value in counts.items():
                data[key][host] = value
            data["processed"][host] = 1
        return self._add("playbook_on_stats", **data)


def recorded(name: str) -> list[dict[str, Any]]:
    return json.loads((FIXTURES / name).read_text())


class FakeRun:
    """Replaces cli.run_playbook: feeds the events to the handlers and returns the given result."""

    def __init__(self, events: list[dict[str, Any]], status: str = "successful", rc: int = 0,
                 artifact_dir: Path = Path("/tmp/artifacts/ident")) -> None:
        self.events = events
        self.status = status
        self.rc = rc
        self.artifact_dir = artifact_dir
        self.calls: list[dict[str, Any]] = []

    def __call__(self, playbook: str, **kwargs: Any) -> RunResult:
        self.calls.append(dict(kwargs, playbook=playbook))
        for event in self.events:
            for handler in kwargs["handlers"]:
                handler(event)
        return RunResult(self.status, self.rc, "ident", self.artifact_dir, 83.0, "PLAY RECAP\nlast line")


def parse(*argv: str) -> argparse.Namespace:
    args = cli.build_parser().parse_args(list(argv))
    args.env_vault_password = None
    return args
