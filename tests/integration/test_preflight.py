"""site.yml stops in preflight, before any host changes, when the plan is infeasible.

The fleet here is this machine seen through `ansible_connection: local` under several
names: the GPU facts module reads it (no NVIDIA device), so the planner works from the
declared facts.  Nothing after preflight may run, so nothing on this machine changes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODELS = ROOT / "tests" / "data" / "models"


def _inventory(tmp_path: Path, model: dict) -> Path:
    inv = tmp_path / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    hosts = {"all": {"children": {
        "gpu_nodes": {"hosts": {"node-a": None, "node-b": None}},
        "loadbalancers": {"hosts": {"lb-a": None}},
    }}}
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (inv / "group_vars" / "all.yml").write_text(yaml.safe_dump({
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "aphrodite_models": [model],
    }))
    (inv / "group_vars" / "gpu_nodes.yml").write_text(yaml.safe_dump({"aphrodite_gpus_declared": {
        "count": 2, "name": "NVIDIA GeForce RTX 4090", "memory_mib": 24564, "interconnect": "pcie"}}))
    return inv


def _site(inv: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "false", "ANSIBLE_NOCOLOR": "true",
           "ANSIBLE_CACHE_PLUGIN": "memory", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([BIN / "ansible-playbook", "site.yml", "-i", inv, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=300)


def test_infeasible_plan_stops_before_any_play_that_changes_hosts(tmp_path: Path) -> None:
    model = {"id": "meta-llama/Llama-3.1-70B-Instruct", "config": str(MODELS / "llama-3.1-70b-instruct" / "config.json")}
    proc = _site(_inventory(tmp_path, model))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Llama-3.1-70B" in out and "GiB" in out, out  # the planner's paragraph reaches the user
    assert "PLAY [Base layer of every host]" not in out, out
    changed = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", out.split("PLAY RECAP")[-1], re.M)
    # The probe (playbooks/probe.yml) read every host first; it changes nothing.
    assert {host for host, _ in changed} == {"node-a", "node-b", "lb-a"}, out
    assert all(count == "0" for _, count in changed), changed


def test_feasible_plan_lets_the_run_go_on(tmp_path: Path) -> None:
    model = {"id": "meta-llama/Llama-3.1-8B-Instruct", "config": str(MODELS / "llama-3.1-8b-instruct" / "config.json"),
             "max_model_len": 8192}
    # Check mode and only the plan tag (preflight runs always): this machine must not change.
    # Later stages may still stop on this GPU-less machine (the driver role refuses a GPU
    # node without GPUs); what matters here is that preflight let the run go on.
    proc = _site(_inventory(tmp_path, model), "--check", "--tags", "plan")
    out = proc.stdout + proc.stderr
    assert "PLAY [Base layer of every host]" in out, out
    assert "llama-3-1-8b-0" in out, out
