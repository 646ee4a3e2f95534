"""The fast path of site.yml on the converged scenario: skipped when nothing changed, and drift found.

Runs after test_default.py (the converge, idempotence and check steps ran with
aphrodite_fast_path=false, so every task proved itself idempotent first).  Each
ansible-playbook run here is the real site.yml against the scenario's hosts, with the
fast path on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra

HOSTS = ("mol-lb1", "mol-nfs1", "mol-gpu1")
JOURNALD_DROP_IN = "/etc/systemd/journald.conf.d/50-aphrodite.conf"
GONE_UPLOADER = "aphrodite-journal-upload@mol-gone.service"
GONE_UPLOADER_ENV = "/etc/aphrodite/logs/upload-mol-gone.env"


def _host(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}")


def site() -> dict:
    """One run of site.yml with the fast path on: each host's recap and the fast path's report."""
    project = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_FORCE_COLOR="false")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), str(project / "site.yml"),
         "-i", os.environ["MOLECULE_INVENTORY_FILE"], "-e", "aphrodite_fast_path=true"],
        capture_output=True, text=True, env=env, cwd=project)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    report = []
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == "Say which hosts run and why":
                report = next(iter(task["hosts"].values()))["msg"]
    return {"stats": out["stats"], "report": report}


@pytest.fixture(scope="module")
def first() -> dict:
    return site()


def test_a_converged_fleet_is_skipped_whole(first: dict) -> None:
    assert first["report"][0].startswith(f"{len(HOSTS)} of {len(HOSTS)} host(s) unchanged"), first["report"]
    for name in HOSTS:
        assert first["stats"][name]["changed"] == 0, name
        # Preflight, the fast path, a skip per stage and verify: a full run is 90-160 tasks a host.
        assert first["stats"][name]["ok"] <= 25, (name, first["stats"][name])


def test_drift_sends_only_its_hosts_through_every_task(first: dict) -> None:
    """Two kinds of drift on one host, a stopped service and an edited file: that host runs
    every task and is repaired, the others are skipped.  One host (the load balancer, the
    quickest full run) is enough to show both, and the restore test runs it again."""
    lb = _host("mol-lb1")
    with lb.sudo():
        lb.check_output("systemctl stop haproxy")
        lb.check_output(f"sh -c 'echo MaxFileSec=1day >> {JOURNALD_DROP_IN}'")
        # An uploader left from a monitoring host that has left the inventory: a run
        # through the logs role retires it.
        lb.check_output(f"sh -c 'echo URL=https://127.0.0.1:9 > {GONE_UPLOADER_ENV}'")
        lb.check_output(f"systemctl start {GONE_UPLOADER}")

    second = site()
    report = " ".join(second["report"])
    assert second["report"][0].startswith("2 of 3 host(s) unchanged"), second["report"]
    assert "mol-lb1 runs every task: " in report, report
    assert "haproxy: unit haproxy.service is inactive" in report, report
    assert f"common: {JOURNALD_DROP_IN} changed" in report, report
    assert second["stats"]["mol-nfs1"]["changed"] == 0 and second["stats"]["mol-gpu1"]["changed"] == 0
    assert second["stats"]["mol-lb1"]["changed"] > 0
    assert lb.service("haproxy").is_running
    with lb.sudo():
        assert "MaxFileSec" not in lb.file(JOURNALD_DROP_IN).content_string
        assert not lb.file(GONE_UPLOADER_ENV).exists
    assert not lb.service(GONE_UPLOADER).is_running and not lb.service(GONE_UPLOADER).is_enabled

    third = site()
    assert third["report"][0].startswith("3 of 3 host(s) unchanged"), third["report"]
    assert all(third["stats"][name]["changed"] == 0 for name in HOSTS)
