"""What happened in a run, read from ansible-runner's event stream.

:class:`RunLog` is an ansible-runner ``event_handler``: it keeps, per host, the play
recap (``playbook_on_stats``), every failure and unreachable host with its message, every
task that changed (in check mode: the drift), and the reports that this collection's
read-only playbooks print with ``debug: var=...`` (``REPORT_KEYS``). It never keeps task
arguments, and results that Ansible hid (``no_log``) stay hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

# Columns of the recap, in order: ansible's name -> ours.
RECAP = (("ok", "ok"), ("changed", "changed"), ("failures", "failed"), ("dark", "unreachable"),
         ("skipped", "skipped"), ("rescued", "rescued"), ("ignored", "ignored"))
RESULT_EVENTS = ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable")
# Variables that playbooks/status.yml and roles/engine/tasks/replace_one.yml print for the CLI.
REPORT_KEYS = ("aphrodite_status_containers", "aphrodite_status_lb", "aphrodite_status_metrics", "aphrodite_rolling_order",
               "__engine_rolling_progress")
HIDDEN = "the output has been hidden due to the fact that 'no_log: true' was specified for this result"


@dataclass
class Failure:
    host: str
    stage: str
    task: str
    message: str
    unreachable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "stage": self.stage, "task": self.task, "message": self.message,
                "unreachable": self.unreachable}


@dataclass
class Change:
    host: str
    stage: str
    task: str
    items: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "task": self.task, "items": list(self.items)}


@dataclass
class Report:
    host: str
    key: str
    value: Any
    created: float


class StageMap:
    """Which stage (the playbook file a play lives in) each play belongs to."""

    def __init__(self, plays: Iterable[tuple[str, str]] = ()) -> None:
        self.plays = list(plays)
        self._by_name = {}
        for stage, name in self.plays:
            self._by_name.setdefault(name, stage)

    @classmethod
    def from_playbook(cls, path: Path) -> "StageMap":
        return cls(playbook_plays(path))

    @property
    def total(self) -> int:
        return len(self.plays)

    def stage_of(self, play: str | None) -> str:
        if not play:
            return ""
        return self._by_name.get(play, play)


def playbook_plays(path: Path, _depth: int = 0) -> list[tuple[str, str]]:
    """``(stage, play name)`` of every play a playbook runs, following ``import_playbook``.

    The stage is the file name of the playbook that holds the play (``engines`` for
    ``playbooks/engines.yml``). Read statically, so plays added by a templated import are
    not counted; progress then shows them by name.
    """
    if _depth > 10 or not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return []
    plays: list[tuple[str, str]] = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict):
            continue
        target = entry.get("ansible.builtin.import_playbook") or entry.get("import_playbook")
        if isinstance(target, str):
            if "{{" not in target:
                plays += playbook_plays(path.parent / target, _depth + 1)
            continue
        if "hosts" in entry:
            plays.append((path.stem, str(entry.get("name") or entry["hosts"])))
    return plays


def result_message(res: Any) -> str:
    """The reason a result failed, in one paragraph."""
    if not isinstance(res, dict):
        return str(res or "")
    if res.get("censored"):
        return f"{res['censored']} (no_log)"
    for item in res.get("results") or []:
        if isinstance(item, dict) and item.get("failed"):
            label = item.get("_ansible_item_label", item.get("item"))
            text = result_message(item)
            return f"{_label(label)}: {text}" if label is not None else text
    parts = []
    for key in ("msg", "reason", "stderr", "module_stderr", "exception"):
        value = res.get(key)
        if value and isinstance(value, str):
            parts.append(value.strip())
            if key in ("msg", "reason"):
                break
    if not parts and res.get("rc") not in (None, 0):
        parts.append(f"exit status {res['rc']}")
    text = " ".join(parts) or "failed"
    return " ".join(text.split())


def _label(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("name", "key", "path"):
            if key in value:
                return str(value[key])
    return str(value)


def changed_items(res: dict[str, Any]) -> list[str]:
    """Labels of the loop items that changed, for a looped task."""
    items = []
    for item in res.get("results") or []:
        if isinstance(item, dict) and item.get("changed"):
            label = item.get("_ansible_item_label", item.get("item"))
            if label is not None:
                items.append(_label(label))
    return items


class RunLog:
    """An ansible-runner event handler that keeps what the summaries need."""

    def __init__(self, stages: StageMap | None = None) -> None:
        self.stages = stages or StageMap()
        self.recap: dict[str, dict[str, int]] = {}
        self.failures: list[Failure] = []
        self.changes: list[Change] = []
        self.reports: list[Report] = []
        self.plays: list[dict[str, Any]] = []
        self.seen_hosts: list[str] = []
        self.stats_seen = False
        self.events = 0
        self._counts: dict[str, dict[str, int]] = {}

    def __call__(self, event: dict[str, Any]) -> bool:
        self.handle(event)
        return True  # ansible-runner keeps the event in the artefacts

    def handle(self, event: dict[str, Any]) -> None:
        self.events += 1
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        stage = self.stages.stage_of(data.get("play"))
        if kind == "playbook_on_play_start":
            self.plays.append({"stage": stage, "play": data.get("play", ""), "started": _created(event)})
            return
        if kind == "playbook_on_stats":
            self.stats_seen = True
            for ours_key in (k for k, _ in RECAP):
                for host, count in (data.get(ours_key) or {}).items():
                    self._host(self.recap, host)[ours_key] = int(count)
            return
        if kind not in RESULT_EVENTS:
            return
        host = str(data.get("host") or "")
        if not host:
            return
        if host not in self.seen_hosts:
            self.seen_hosts.append(host)
        res = data.get("res") if isinstance(data.get("res"), dict) else {}
        task = str(data.get("task") or "")
        counts = self._host(self._counts, host)
        if kind == "runner_on_ok":
            counts["ok"] += 1
            if res.get("changed"):
                counts["changed"] += 1
                self.changes.append(Change(host, stage, task, changed_items(res)))
            for key in REPORT_KEYS:
                if key in res:
                    self.reports.append(Report(host, key, res[key], _created(event)))
        elif kind == "runner_on_skipped":
            counts["skipped"] += 1
        elif kind == "runner_on_unreachable":
            counts["dark"] += 1
            self.failures.append(Failure(host, stage, task, result_message(res), unreachable=True))
        elif kind == "runner_on_failed":
            if data.get("ignore_errors"):
                counts["ignored"] += 1
            else:
                counts["failures"] += 1
                self.failures.append(Failure(host, stage, task, result_message(res)))

    @staticmethod
    def _host(table: dict[str, dict[str, int]], host: str) -> dict[str, int]:
        if host not in table:
            table[host] = {key: 0 for key, _ in RECAP}
        return table[host]

    # ------------------------------------------------------------------ views
    def host_recap(self) -> dict[str, dict[str, int]]:
        """Per host: ok, changed, failed, unreachable, skipped, rescued, ignored.

        From the play recap; counted from the results when the run ended without one.
        """
        source = self.recap if self.stats_seen else self._counts
        return {host: {ours: values.get(theirs, 0) for theirs, ours in RECAP} for host, values in source.items()}

    def failed_hosts(self) -> list[str]:
        return [h for h, v in self.host_recap().items() if v["failed"] > 0]

    def unreachable_hosts(self) -> list[str]:
        return [h for h, v in self.host_recap().items() if v["unreachable"] > 0]

    def drift(self) -> dict[str, list[Change]]:
        """Per host, the tasks that changed (would change, in check mode), in run order."""
        result: dict[str, list[Change]] = {}
        for change in self.changes:
            result.setdefault(change.host, []).append(change)
        return result

    def reports_of(self, key: str) -> list[Report]:
        return [r for r in self.reports if r.key == key]


def _created(event: dict[str, Any]) -> float:
    """The event's time as a Unix timestamp (ansible-runner writes ISO 8601, UTC)."""
    created = event.get("created")
    if isinstance(created, str):
        from datetime import datetime, timezone

        try:
            stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            return time.time()
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    return time.time()
