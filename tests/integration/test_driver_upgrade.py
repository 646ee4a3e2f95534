"""A driver branch change on the serving lab, in one run of site.yml, under load through the edge.

The lab (`make lab`) installs its GPU nodes through the roles' production path, from the
lab package repository, which also has the next driver branch (570).  This test changes
the branch on the running fleet as an operator would (`nvidia_driver_branch` and
`nvidia_driver_reboot_ok` for one run) while a thread pool sends completions, half of them
streaming, through the public endpoint; it checks that:

* the run succeeds and no request fails;
* each node was rebooted (PID 1 started again), drained first: every replica went
  through MAINT on the load balancer and came back UP;
* nvidia-smi reports the new branch with persistence on, Fabric Manager runs where the
  recording has NVSwitches, and each engine container got the new driver's CDI spec;
* a second run with the same settings changes nothing.

It changes the lab for good (a later `make lab` wants the inventory's branch 550 back,
which apt does not downgrade to), so it runs only when asked:

    APHRODITE_TEST_DRIVER_BRANCH=570 pytest -s tests/integration/test_driver_upgrade.py
    make lab-down && make lab      # afterwards, for a lab on the inventory's branch again

About 6 minutes on 2 cores.  The figures are printed: run with -s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import pytest
import test_operations as lab  # the sibling module: the lab's endpoint, TLS and load
import yaml

BRANCH = os.environ.get("APHRODITE_TEST_DRIVER_BRANCH")
GPU_NODES = ("gpu1", "gpu2")
pytestmark = [
    pytest.mark.skipif(BRANCH is None, reason="changes the lab's driver for good: set APHRODITE_TEST_DRIVER_BRANCH=570"),
    pytest.mark.skipif(lab._PROBLEM is not None, reason=f"lab: {lab._PROBLEM}"),
]


def _exec(host: str, *argv: str) -> str:
    result = subprocess.run(["docker", "exec", host, *argv], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{host}: {' '.join(argv)}: {result.stderr}"
    return result.stdout.strip()


def _boot(host: str) -> str:
    return _exec(host, "cut", "-d", " ", "-f", "22", "/proc/1/stat")


def _site(*extra: str, timeout: int = 1200) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run([str(lab.ROOT / ".venv" / "bin" / "ansible-playbook"), "site.yml", "-i", str(lab.INVENTORY),
                             *extra], cwd=lab.ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, "ANSIBLE_FORCE_COLOR": "false"})
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def _recap(output: str) -> dict[str, dict[str, int]]:
    recap = output[output.rindex("PLAY RECAP"):]
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
            for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", recap, re.M)}


SHOW_STAT = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
             "s.sendall(b'show stat\\n'); print(b''.join(iter(lambda: s.recv(65536), b'')).decode())")


class ServerStates:
    """HAProxy's status of each replica's server on lb1 (UP, DRAIN, MAINT, DOWN), polled while
    the run goes on; each one's changes in order."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _note(self) -> None:
        out = subprocess.run(["docker", "exec", "lb1", "python3", "-c", SHOW_STAT], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        lines = out.lstrip("# ").splitlines()
        if not lines:
            return
        header = lines[0].split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("svname", "").startswith("llama"):
                state = row["status"].split()[0]
                history = self.seen.setdefault(row["svname"], [])
                if not history or history[-1] != state:
                    history.append(state)

    def _poll(self) -> None:
        while not self.stopping.wait(0.5):
            self._note()

    def __enter__(self) -> "ServerStates":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)
        self._note()


def test_a_driver_branch_change_reboots_each_serving_node_drained_and_fails_no_request() -> None:
    inventory_branch = str(yaml.safe_load((lab.INVENTORY / "group_vars" / "gpu_nodes.yml").read_text())
                           .get("nvidia_driver_branch", "550"))
    assert BRANCH != inventory_branch, f"APHRODITE_TEST_DRIVER_BRANCH must differ from the lab's {inventory_branch}"
    boots = {host: _boot(host) for host in GPU_NODES}
    settings = ["-e", f"nvidia_driver_branch={BRANCH}", "-e", "nvidia_driver_reboot_ok=true"]
    with lab.Load(lab._tls(), lab._endpoint()) as load, ServerStates() as states:
        time.sleep(2)
        code, output, seconds = _site(*settings)
        time.sleep(2)
    figures = load.figures()
    print(f"\ndriver branch {inventory_branch} -> {BRANCH}: site.yml {seconds:.0f} s, {figures['sent']} requests "
          f"({figures['streaming']} streaming), {figures['failed']} failed; lb1 saw {json.dumps(states.seen)}")
    assert code == 0, output[-5000:]
    assert figures["sent"] > 0
    assert figures["failed"] == 0, figures["failures"]

    for host in GPU_NODES:
        assert _boot(host) != boots[host], f"{host} was not rebooted"
        rows = _exec(host, "nvidia-smi", "--query-gpu=driver_version,persistence_mode", "--format=csv,noheader")
        for version, persistence in (tuple(c.strip() for c in row.split(",")) for row in rows.splitlines()):
            assert version.startswith(f"{BRANCH}.") and persistence == "Enabled", (host, rows)
        for name in _exec(host, "docker", "ps", "--filter", "label=io.aphrodite.replica", "--format", "{{.Names}}").split():
            # The engine process's own environment, where the CDI spec's edits are (docker exec
            # starts with the container's configured one); only the lab's variables are kept, so
            # that no assertion message carries the engine's key.
            lab_env = [line for line in _exec(host, "docker", "exec", name, "sh", "-c",
                                              "tr '\\0' '\\n' < /proc/1/environ").splitlines()
                       if line.startswith("LAB_")]
            assert any(line.startswith(f"LAB_DRIVER={BRANCH}.") for line in lab_env), (host, name, lab_env)
    hardware = yaml.safe_load((lab.INVENTORY / "hosts.yml").read_text())["all"]["children"]["gpu_nodes"]["hosts"]
    for host in GPU_NODES:
        fabric = subprocess.run(["docker", "exec", host, "systemctl", "is-active", "nvidia-fabricmanager"],
                                capture_output=True, text=True, check=False).stdout.strip()
        assert fabric == ("active" if "nvswitch" in hardware[host]["lab_gpu_hardware"] else "inactive"), (host, fabric)
    # Drained first: each replica went out of the pool (MAINT) and came back UP.
    assert states.seen, "no replica seen on lb1"
    for replica in states.seen:
        assert "MAINT" in states.seen[replica] and states.seen[replica][-1] == "UP", (replica, states.seen[replica])

    code, output, seconds = _site(*settings, timeout=600)
    assert code == 0, output[-3000:]
    changed = {host: counts["changed"] for host, counts in _recap(output).items()}
    print(f"re-run: {seconds:.0f} s, changed {changed}")
    assert set(changed.values()) == {0}, changed
