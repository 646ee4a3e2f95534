"""``aphrodite-deploy backup``: runs playbooks/backup.yml, a recap per host, exit statuses."""

from __future__ import annotations

import io
import json

import pytest
from _eventlib import FakeRun, Stream, parse

from aphrodite_deploy import cli


def run(events: list[dict], monkeypatch: pytest.MonkeyPatch, *extra: str, status: str = "successful",
        rc: int = 0) -> tuple[int, str, FakeRun]:
    fake = FakeRun(events, status=status, rc=rc)
    monkeypatch.setattr(cli, "run_playbook", fake)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_backup(parse("backup", "-i", "inv", *extra), out, err)
    return code, out.getvalue(), fake


def test_a_backup_runs_the_backup_playbook_and_reports_each_host(monkeypatch):
    events = (Stream().play_start("Backup | archive on each source host")
              .ok("lb1", "Encrypt the edge PKI into the backup's stage", changed=True)
              .play_start("Backup | store on the backup host and prune")
              .ok("nfs1", "Store the archives", changed=True)
              .stats(lb1={"ok": 6, "changed": 2}, nfs1={"ok": 9, "changed": 4}).events)
    code, out, fake = run(events, monkeypatch)
    assert code == cli.EXIT_OK
    assert fake.calls[0]["playbook"] == "playbooks/backup.yml"
    assert out.splitlines()[0].split()[:3] == ["HOST", "OK", "CHANGED"]
    assert "backup done" in out


def test_a_failed_host_fails_the_backup(monkeypatch):
    events = (Stream().play_start("Backup | archive on each source host")
              .failed("mon1", "Assert Prometheus made the snapshot", msg="Prometheus on mon1 answered 404")
              .stats(mon1={"ok": 3, "failures": 1}).events)
    code, out, _ = run(events, monkeypatch, "--json", status="failed", rc=2)
    assert code == cli.EXIT_FAILED
    payload = json.loads(out)
    assert payload["result"] == "failed" and payload["failures"][0]["host"] == "mon1"
