"""Live progress of a run, from ansible-runner events: a bar per stage and per host.

On a terminal the current stage is redrawn in place::

    [#######.............] stage 5/13 engines · Engines | image, environment and new replicas
      gpu1  [##########----------]  task 6/12  ok 5  changed 1  · Wait for the new replicas
      gpu2  [########------------]  task 5/12  ok 5  changed 0

A host's bar is the share of the stage's tasks so far that it has finished. Finished
stages, and every failure as it happens, are printed as plain lines; off a terminal (CI,
pipes) only those plain lines are written.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from .events import StageMap, result_message

BAR = 20
# Hosts drawn live, and named one by one in a finished stage's line.
LIVE_HOSTS = 12
SUMMARY_HOSTS = 8


def bar(done: int, total: int, width: int = BAR) -> str:
    if total <= 0:
        return "[" + "-" * width + "]"
    filled = min(width, max(0, round(width * done / total)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class Progress:
    """An ansible-runner event handler that draws progress on ``out``."""

    def __init__(self, out: TextIO, stages: StageMap, *, live: bool, title: str = "", enabled: bool = True,
                 clock: Any = time.monotonic) -> None:
        self.out = out
        self.stages = stages
        self.live = live
        self.enabled = enabled
        self.title = title
        self.clock = clock
        self.play_index = 0
        self.stage = ""
        self.play = ""
        self.tasks = 0
        self.task = ""
        self.hosts: dict[str, dict[str, Any]] = {}
        self.started = 0.0
        self.drawn = 0
        self.last_draw = 0.0
        self.open = False

    # ------------------------------------------------------------------ events
    def __call__(self, event: dict[str, Any]) -> bool:
        if self.enabled:
            self.handle(event)
        return True

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self._finish_play()
            play = str(data.get("play") or data.get("name") or "")
            # A serial play starts again for each batch: one stage still.
            if play != self.play or self.play_index == 0:
                self.play_index += 1
            self.play = play
            self.stage = self.stages.stage_of(self.play)
            self.tasks = 0
            self.task = ""
            self.hosts = {}
            self.started = self.clock()
            self.open = True
            if not self.live:
                self._line(f"{self._stage_label()} ...")
            self._draw(force=True)
        elif kind == "playbook_on_task_start":
            self.tasks += 1
            self.task = str(data.get("task") or "")
            self._draw()
        elif kind == "playbook_on_no_hosts_matched" and self.open:
            self.hosts = {}
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable"):
            host = str(data.get("host") or "")
            if not host:
                return
            entry = self.hosts.setdefault(host, {"done": 0, "ok": 0, "changed": 0, "failed": 0, "unreachable": 0})
            entry["done"] += 1
            res = data.get("res") if isinstance(data.get("res"), dict) else {}
            if kind == "runner_on_ok":
                entry["ok"] += 1
                entry["changed"] += 1 if res.get("changed") else 0
            elif kind == "runner_on_unreachable":
                entry["unreachable"] += 1
                self._line(f"  ✗ {host} unreachable in {self.stage or self.play}: {data.get('task', '')}: "
                           f"{_short(result_message(res))}")
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                entry["failed"] += 1
                self._line(f"  ✗ {host} failed in {self.stage or self.play}: {data.get('task', '')}: "
                           f"{_short(result_message(res))}")
            self._draw()
        elif kind == "playbook_on_stats":
            self._finish_play()

    def close(self) -> None:
        if self.enabled:
            self._finish_play()

    # ------------------------------------------------------------------ drawing
    def _stage_label(self) -> str:
        total = self.stages.total
        count = f"stage {self.play_index}/{total}" if total >= self.play_index else f"stage {self.play_index}"
        name = self.stage if self.stage and self.stage != self.play else ""
        label = f"{count} {name} · {self.play}" if name else f"{count} {self.play}"
        return f"{self.title}: {label}" if self.title else label

    def _finish_play(self) -> None:
        if not self.open:
            return
        self.open = False
        self._clear()
        if len(self.hosts) <= SUMMARY_HOSTS:
            hosts = " · ".join(
                f"{host} ok={v['ok']} changed={v['changed']}"
                + (f" failed={v['failed']}" if v["failed"] else "")
                + (f" unreachable={v['unreachable']}" if v["unreachable"] else "")
                for host, v in self.hosts.items()) or "no hosts"
        else:
            totals = {k: sum(v[k] for v in self.hosts.values()) for k in ("ok", "changed", "failed", "unreachable")}
            bad = [h for h, v in self.hosts.items() if v["failed"] or v["unreachable"]]
            hosts = (f"{len(self.hosts)} hosts ok={totals['ok']} changed={totals['changed']}"
                     + (f" failed={totals['failed']}" if totals["failed"] else "")
                     + (f" unreachable={totals['unreachable']}" if totals["unreachable"] else "")
                     + (f" (failed or unreachable: {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''})" if bad else ""))
        failed = any(v["failed"] or v["unreachable"] for v in self.hosts.values())
        mark = "✗" if failed else "✓"
        self._line(f"{mark} {self.stage or self.play}: {hosts} ({duration(self.clock() - self.started)})")

    def _block(self) -> list[str]:
        total = self.stages.total
        overall = bar(self.play_index - 1, total) + " " if total else ""
        lines = [f"{overall}{self._stage_label()}"]
        shown = list(self.hosts.items())
        if len(shown) > LIVE_HOSTS:
            # The hosts furthest behind: a thousand bars would not fit a terminal.
            shown = sorted(shown, key=lambda item: item[1]["done"])[:LIVE_HOSTS]
        width = max((len(h) for h, _ in shown), default=0)
        for host, v in shown:
            counts = f"ok {v['ok']}  changed {v['changed']}"
            if v["failed"]:
                counts += f"  failed {v['failed']}"
            if v["unreachable"]:
                counts += "  unreachable"
            lines.append(f"  {host:<{width}}  {bar(v['done'], self.tasks)}  task {v['done']}/{self.tasks}  {counts}")
        if len(self.hosts) > len(shown):
            lines.append(f"  … and {len(self.hosts) - len(shown)} more host(s), further along")
        if self.task:
            lines.append(f"  · {self.task}")
        return lines

    def _draw(self, force: bool = False) -> None:
        if not self.live or not self.open:
            return
        now = self.clock()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self._clear()
        lines = self._block()
        self.out.write("\n".join(_fit(line) for line in lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)

    def _clear(self) -> None:
        if self.live and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _line(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()
        if self.live and self.open:
            self._draw(force=True)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fit(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"
