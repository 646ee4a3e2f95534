"""``rolling-restart`` and ``upgrade``: what the roll did, per replica, from playbooks/rolling.yml's events.

roles/engine/tasks/replace_one.yml prints ``__engine_rolling_progress`` at each step of a
replica (started, drained, restarted, healthy, done, or failed with the task and the
reason) and playbooks/rolling.yml prints ``aphrodite_rolling_order``, every replica the
roll covers. From those this module tells which replicas were rolled, which one failed
and where, and which were never touched (and so still serve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from .events import RunLog, result_message
from .progress import duration

PHASES = ("started", "drained", "restarted", "healthy", "done")
PHASE_LABELS = {"drained": "drained", "restarted": "restarted", "healthy": "healthy and warm", "done": "back in the pool"}


@dataclass
class ReplicaRoll:
    replica: str
    host: str
    times: dict[str, float] = field(default_factory=dict)
    failed_task: str = ""
    message: str = ""

    @property
    def state(self) -> str:
        if "failed" in self.times:
            return "failed"
        if "done" in self.times:
            return "done"
        return "in progress" if self.times else "not started"

    def steps(self) -> dict[str, float]:
        """Seconds each step took: drained (incl. waiting for the last request), restarted, healthy, done."""
        result = {}
        previous = self.times.get("started")
        for phase in PHASES[1:]:
            if phase in self.times and previous is not None:
                result[phase] = max(0.0, self.times[phase] - previous)
                previous = self.times[phase]
        return result

    def to_dict(self) -> dict[str, Any]:
        total = None
        end = self.times.get("done", self.times.get("failed"))
        if end is not None and "started" in self.times:
            total = round(end - self.times["started"], 3)
        return {"replica": self.replica, "host": self.host, "state": self.state,
                "steps": {k: round(v, 3) for k, v in self.steps().items()}, "seconds": total,
                "failed_task": self.failed_task or None, "message": self.message or None}


@dataclass
class RollSummary:
    action: str
    order: list[dict[str, Any]]
    rolls: list[ReplicaRoll]
    load_balancers: list[str] = field(default_factory=list)

    @property
    def failed(self) -> ReplicaRoll | None:
        return next((r for r in self.rolls if r.state == "failed"), None)

    @property
    def done(self) -> list[ReplicaRoll]:
        return [r for r in self.rolls if r.state == "done"]

    @property
    def canary(self) -> ReplicaRoll | None:
        return self.rolls[0] if self.rolls else None

    def untouched(self) -> list[dict[str, Any]]:
        rolled = {r.replica for r in self.rolls}
        return [entry for entry in self.order if entry.get("replica") not in rolled]

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed
        return {"action": self.action, "replicas": [r.to_dict() for r in self.rolls],
                "canary": self.canary.replica if self.canary else None,
                "failed": failed.to_dict() if failed else None,
                "untouched": [e.get("replica") for e in self.untouched()],
                "planned": [e.get("replica") for e in self.order]}


def summarize(log: RunLog, action: str, load_balancers: list[str] | None = None) -> RollSummary:
    order: list[dict[str, Any]] = []
    for report in log.reports_of("aphrodite_rolling_order"):
        if isinstance(report.value, list):
            order = [e for e in report.value if isinstance(e, dict)]
    rolls: dict[str, ReplicaRoll] = {}
    for report in log.reports_of("__engine_rolling_progress"):
        value = report.value if isinstance(report.value, dict) else {}
        name = str(value.get("replica") or "")
        if not name:
            continue
        roll = rolls.setdefault(name, ReplicaRoll(name, str(value.get("host") or report.host)))
        phase = str(value.get("phase") or "")
        roll.times.setdefault(phase, report.created)
        if phase == "failed":
            roll.failed_task = str(value.get("task") or "")
            roll.message = " ".join(str(value.get("message") or "").split())
    return RollSummary(action, order, list(rolls.values()), list(load_balancers or []))


def _verb(action: str) -> str:
    return "upgraded" if action == "upgrade" else "restarted"


def _title(action: str) -> str:
    return "upgrade" if action == "upgrade" else "rolling restart"


def render_roll(summary: RollSummary, log: RunLog, elapsed: float, ok: bool, image: str | None = None) -> str:
    lines = []
    planned = len(summary.order) or len(summary.rolls)
    target = f" to {image}" if image else ""
    lines.append(f"{_title(summary.action).capitalize()}{target}: {planned} replica(s)")
    width = max((len(r.replica) for r in summary.rolls), default=0)
    for roll in summary.rolls:
        canary = "canary" if roll is summary.canary else "      "
        steps = " · ".join(f"{PHASE_LABELS[p]} {duration(s)}" for p, s in roll.steps().items())
        if roll.state == "failed":
            lines.append(f"  ✗ {roll.replica:<{width}}  {roll.host}  {canary}  failed at \"{roll.failed_task}\": "
                         f"{roll.message}" + (f" (after {steps})" if steps else ""))
        else:
            mark = "✓" if roll.state == "done" else "…"
            total = roll.to_dict()["seconds"]
            lines.append(f"  {mark} {roll.replica:<{width}}  {roll.host}  {canary}  {steps}"
                         + (f"  ({duration(total)})" if total is not None else ""))
    failed = summary.failed
    untouched = summary.untouched()
    done = summary.done
    if ok and not failed:
        lines.append(f"Done in {duration(elapsed)}: {len(done)} of {planned} replica(s) {_verb(summary.action)}; "
                     f"every replica is back in the pool.")
        if summary.action == "upgrade" and image:
            lines.append(f"Set engine_image: {image} in the inventory, or the next deploy rolls the fleet back to "
                         f"the image the inventory names.")
        return "\n".join(lines) + "\n"
    if failed:
        pool = ", ".join(summary.load_balancers) or "every load balancer"
        lines.append(f"Stopped at the first failure: {failed.replica} on {failed.host} failed at \"{failed.failed_task}\": "
                     f"{failed.message}")
        lines.append(f"{failed.replica} stays out of the pool (maintenance on {pool}).")
    else:
        reasons = "; ".join(f"{f.host}: {f.task}: {f.message}" for f in log.failures) or "see the artefacts"
        lines.append(f"Stopped before a replica failed: {reasons}")
    others = [r.replica for r in done]
    if others:
        lines.append(f"{_verb(summary.action).capitalize()} before the failure and serving again: {', '.join(others)}.")
    if untouched:
        names = ", ".join(e.get("replica", "?") for e in untouched)
        lines.append(f"Not touched, still serving: {names}.")
    elif not failed and not done:
        lines.append("No replica was touched.")
    lines.append("See `aphrodite-deploy status` for the fleet; fix the cause and run the command again"
                 + (" (or roll back: upgrade --image <the previous image>)." if summary.action == "upgrade" else "."))
    return "\n".join(lines) + "\n"


class RollingProgress:
    """Event handler: a line per play and per step of each replica, as they happen."""

    def __init__(self, out: TextIO, enabled: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.started: dict[str, float] = {}
        self.first: str | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        if not self.enabled:
            return True
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self._write(f"· {data.get('play', '')}")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res") if isinstance(data.get("res"), dict) else {}
            self._write(f"  ✗ {data.get('host', '')}: {data.get('task', '')}: {result_message(res)[:300]}")
        elif kind == "runner_on_ok":
            res = data.get("res") if isinstance(data.get("res"), dict) else {}
            value = res.get("__engine_rolling_progress")
            if isinstance(value, dict):
                name = str(value.get("replica", ""))
                phase = str(value.get("phase", ""))
                if self.first is None:
                    self.first = name
                canary = " (canary)" if name == self.first else ""
                if phase == "started":
                    self._write(f"  {name} on {value.get('host', '')}{canary}: draining")
                elif phase == "failed":
                    self._write(f"  {name}: FAILED at \"{value.get('task', '')}\": {value.get('message', '')}")
                else:
                    self._write(f"  {name}: {PHASE_LABELS.get(phase, phase)}")
        return True

    def _write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
