"""The lab tool brings a host up like a server and tears everything down again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, str(ROOT / "lab" / "labctl.py")]
LAB = "pytest-lifecycle"

pytestmark = pytest.mark.skipif(subprocess.run(["docker", "info"], capture_output=True).returncode != 0,
                                reason="needs a Docker daemon (make test starts one)")


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def test_up_reaches_the_host_over_ssh_and_down_leaves_nothing() -> None:
    up = subprocess.run([*LABCTL, "up", "--json", "--lab", LAB, "--subnet", "172.28.97.0/24",
                         "--host", "lc-host1:nfs_servers"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    labels = _docker("network", "inspect", "-f", "{{json .Labels}}", f"aphrodite-{LAB}")
    assert json.loads(labels) == {"io.aphrodite.lab": LAB}
    try:
        host = info["hosts"][0]
        assert host["address"] == "172.28.97.11"
        # Like a server: key-only SSH as the admin user, host key checked strictly.
        ssh = subprocess.run(
            ["ssh", "-i", info["ssh_key"], "-o", f"UserKnownHostsFile={info['known_hosts']}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ControlMaster=auto",
             "-o", "ControlPath=/tmp/lc-%C", "-o", "ControlPersist=60",
             f"{info['ssh_user']}@{host['address']}", "sudo -n systemctl is-system-running; hostname"],
            capture_output=True, text=True, timeout=60)
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.split() == ["running", "lc-host1"]
        password = subprocess.run(
            ["ssh", "-o", "PubkeyAuthentication=no", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", f"root@{host['address']}", "true"],
            capture_output=True, text=True, timeout=60)
        assert password.returncode != 0  # no password or root logins
        assert _docker("volume", "ls", "-q", "--filter", f"label=io.aphrodite.lab={LAB}")  # nfs_servers get /srv/exports
    finally:
        down = subprocess.run([*LABCTL, "down", "--lab", LAB], capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    for kind in ("ps -a", "volume ls", "network ls"):
        assert _docker(*kind.split(), "-q", "--filter", f"label=io.aphrodite.lab={LAB}") == "", kind
    assert _docker("network", "ls", "-q", "--filter", f"name=^aphrodite-{LAB}$") == ""
    masters = subprocess.run(["pgrep", "-f", "ControlPath=/tmp/lc-"], capture_output=True, text=True)
    assert masters.stdout.strip() == "", "an SSH control master to the removed host is still running"
    assert not (ROOT / ".lab" / LAB).exists()
    assert os.path.exists(info["ssh_key"])  # the lab key stays for the next lab
