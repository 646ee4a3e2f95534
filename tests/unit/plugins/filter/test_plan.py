"""The plan_fleet and host_replicas filters, directly and inside a real playbook run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter import plan as plan_filter

ROOT = Path(__file__).resolve().parents[4]
MODELS = ROOT / "tests" / "data" / "models"
H100X8 = {"count": 8, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "interconnect": "nvlink"}
GROUPS = {"all": ["gpu1", "gpu2", "lb1"], "gpu_nodes": ["gpu1", "gpu2"], "loadbalancers": ["lb1"]}


def hostvars(**per_host):
    base = {"gpu1": {"aphrodite_gpus_declared": H100X8, "ansible_host": "10.0.0.1"},
            "gpu2": {"aphrodite_gpus_declared": H100X8, "ansible_host": "10.0.0.2"},
            "lb1": {"ansible_host": "10.0.0.9"}}
    base.update(per_host)
    return base


def models(*names, **options):
    return [{"id": f"meta-llama/{name}", "config": f"{name.lower()}/config.json", **options} for name in names]


def test_filters_are_registered():
    assert set(plan_filter.FilterModule().filters()) == {"plan_fleet", "host_replicas", "gpu_facts_of",
                                                         "gpu_facts_changed"}


def test_gpu_facts_changed_names_the_nodes_whose_driver_changed_what_they_report():
    lspci = {"source": "lspci", "count": 8, "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3"}]}
    smi = {"source": "nvidia-smi", "count": 8, "driver_version": "550.90.07",
           "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}]}
    before = hostvars(gpu1={"ansible_facts": {"aphrodite_gpus": lspci}},
                      gpu2={"ansible_facts": {"aphrodite_gpus": smi}})
    planned = plan_filter.gpu_facts_of(before, ["gpu1", "gpu2", "lb1", "gone"])
    assert planned == {"gpu1": lspci, "gpu2": smi, "lb1": None, "gone": None}
    # A snapshot: the facts of the host may change in place afterwards.
    before["gpu2"]["ansible_facts"]["aphrodite_gpus"]["driver_version"] = "570.172.08"
    assert planned["gpu2"]["driver_version"] == "550.90.07"
    assert plan_filter.gpu_facts_changed(before, planned) == ["gpu2"]
    # The driver installed on gpu1: nvidia-smi answers where lspci did.
    after = hostvars(gpu1={"ansible_facts": {"aphrodite_gpus": smi}}, gpu2={"ansible_facts": {"aphrodite_gpus": smi}})
    assert plan_filter.gpu_facts_changed(after, planned) == ["gpu1", "gpu2"]
    assert plan_filter.gpu_facts_changed(after, plan_filter.gpu_facts_of(after, ["gpu1", "gpu2"])) == []
    with pytest.raises(AnsibleFilterError, match="as gpu_facts_of returned them"):
        plan_filter.gpu_facts_changed(after, None)
    with pytest.raises(AnsibleFilterError, match="list of hosts"):
        plan_filter.gpu_facts_of(after, "gpu1")


def test_plan_fleet_returns_the_json_contract():
    result = plan_filter.plan_fleet(models("Llama-3.1-70B-Instruct"), hostvars(), GROUPS, str(MODELS))
    assert sorted(result) == ["deployments", "idle_gpus"]
    assert [d["model"] for d in result["deployments"]] == ["meta-llama/Llama-3.1-70B-Instruct"]
    replicas = result["deployments"][0]["replicas"]
    assert [r["name"] for r in replicas] == [f"llama-3-1-70b-{i}" for i in range(4)]  # TP 4, two per host
    assert sorted(replicas[0]) == sorted(["name", "tensor_parallel_size", "pipeline_parallel_size", "head", "placement",
                                          "port", "weights_gib_per_gpu", "kv_cache_tokens", "argv", "max_num_seqs",
                                          "est_concurrency", "est_decode_tokens_per_s"])
    assert result["deployments"][0]["objective"] == "throughput"
    assert [layout["chosen"] for layout in result["deployments"][0]["layouts"]].count(True) == 1
    assert result["idle_gpus"] == {"gpu1": [], "gpu2": []}
    json.dumps(result)  # plain data, ready for set_fact and templates


def test_declared_and_gathered_aliases_per_host():
    facts = {"gpu1": {"declared": H100X8}, "gpu2": {"declared": {**H100X8, "count": 4}}}
    result = plan_filter.plan_fleet(models("Llama-3.1-8B-Instruct"), facts, GROUPS, str(MODELS))
    assert len(result["deployments"][0]["replicas"]) == 12


def test_mismatches_become_warnings(monkeypatch):
    shown = []
    monkeypatch.setattr(plan_filter.Display, "warning", lambda self, msg, *a, **k: shown.append(msg))
    gathered = {"source": "nvidia-smi", "count": 4, "mig_enabled": False, "nvlink_groups": [[0, 1, 2, 3]],
                "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "numa_node": 0,
                          "compute_capability": "9.0"} for i in range(4)]}
    vars_ = hostvars(gpu1={"aphrodite_gpus_declared": H100X8, "ansible_facts": {"aphrodite_gpus": gathered}})
    result = plan_filter.plan_fleet(models("Llama-3.1-8B-Instruct"), vars_, GROUPS, str(MODELS))
    assert len(result["deployments"][0]["replicas"]) == 12
    assert shown == ["gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs"]


def test_infeasible_plans_raise_the_planners_paragraph():
    with pytest.raises(AnsibleFilterError) as caught:
        plan_filter.plan_fleet(models("Llama-3.1-405B-Instruct"), hostvars(), {"gpu_nodes": ["gpu1"]}, str(MODELS))
    message = caught.value.message
    assert message.startswith("Llama-3.1-405B-Instruct in bf16 needs 756 GiB of weights; gpu_nodes offers 1 host")
    assert "use FP8 quantization (382 GiB of weights), or add 1 more node like gpu1" in message


def test_bad_arguments_are_named():
    with pytest.raises(AnsibleFilterError, match="needs the inventory's groups"):
        plan_filter.plan_fleet(models("Llama-3.1-8B-Instruct"), hostvars(), ["gpu1"], str(MODELS))
    with pytest.raises(AnsibleFilterError, match="aphrodite_models must be a non-empty list"):
        plan_filter.plan_fleet([], hostvars(), GROUPS, str(MODELS))


def test_host_replicas_gives_each_node_its_part():
    plan = plan_filter.plan_fleet(models("Llama-3.1-405B-Instruct"), hostvars(), GROUPS, str(MODELS))
    head, = plan_filter.host_replicas(plan, "gpu1")
    worker, = plan_filter.host_replicas(plan, "gpu2")
    assert (head["node_rank"], worker["node_rank"], head["nnodes"], head["head"]) == (0, 1, 2, "gpu1")
    assert head["gpus"] == worker["gpus"] == list(range(8))
    assert "--headless" not in head["argv"] and worker["argv"][-1] == "--headless"
    assert worker["argv"][worker["argv"].index("--node-rank") + 1] == "1"
    assert plan_filter.host_replicas(plan, "lb1") == []
    with pytest.raises(AnsibleFilterError, match="expects the result of aphrodite.baremetal.plan_fleet"):
        plan_filter.host_replicas({"x": 1}, "gpu1")


# --------------------------------------------------------------------------- inside ansible-playbook


PLAYBOOK = """\
- name: Plan
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Plan the fleet
      ansible.builtin.set_fact:
        plan: "{{ aphrodite_models | aphrodite.baremetal.plan_fleet(hostvars, groups, hostvars[groups['gpu_nodes'][0]].inventory_dir) }}"
    - name: Keep it for the test
      ansible.builtin.copy:
        content: "{{ {'plan': plan, 'gpu2': plan | aphrodite.baremetal.host_replicas('gpu2')} | to_nice_json }}"
        dest: "{{ playbook_dir }}/plan.json"
        mode: "0644"
"""

# Model configurations sit in the inventory directory; Ansible must not read them as inventory.
ANSIBLE_CFG = """\
[inventory]
ignore_patterns = ^models$
"""


@pytest.fixture()
def playbook_dir(tmp_path):
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "host_vars").mkdir()
    shutil.copytree(MODELS / "llama-3.1-8b-instruct", inventory / "models" / "llama-3.1-8b-instruct")
    (inventory / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            gpu_nodes:
              hosts:
                gpu1: {ansible_host: 10.0.0.1}
                gpu2: {ansible_host: 10.0.0.2}
        """))
    (inventory / "group_vars" / "gpu_nodes.yml").write_text(
        "aphrodite_gpus_declared: {count: 8, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}\n")
    (inventory / "host_vars" / "gpu2.yml").write_text(
        "aphrodite_gpus_declared: {count: 2, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}\n")
    (tmp_path / "site.yml").write_text(PLAYBOOK)
    (tmp_path / "ansible.cfg").write_text(ANSIBLE_CFG)
    return tmp_path


def run_playbook(directory: Path, models_yaml: str) -> subprocess.CompletedProcess:
    (directory / "inventory" / "group_vars" / "all.yml").write_text(models_yaml)
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
           "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_CONFIG": str(directory / "ansible.cfg")}
    playbook = Path(sys.executable).parent / "ansible-playbook"
    return subprocess.run([str(playbook), "-i", "inventory", "site.yml"], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_filters_in_a_playbook_honour_group_and_host_vars(playbook_dir):
    result = run_playbook(playbook_dir, textwrap.dedent("""\
        aphrodite_models:
          - id: meta-llama/Llama-3.1-8B-Instruct
            config: models/llama-3.1-8b-instruct/config.json
            max_model_len: 8192
        """))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    saved = json.loads((playbook_dir / "plan.json").read_text())
    assert len(saved["plan"]["deployments"][0]["replicas"]) == 10  # 8 on gpu1, 2 on gpu2 (its host_vars)
    # Replicas go to the host with the most free GPUs, ties to the first in the inventory,
    # but the second never to the host of the first: gpu1, gpu2, then gpu1 down to one free.
    assert [r["name"] for r in saved["gpu2"]] == ["llama-3-1-8b-1", "llama-3-1-8b-9"]
    assert saved["gpu2"][0]["argv"][-2:] == ["--port", "2242"]


def test_an_infeasible_plan_fails_the_task_with_the_paragraph(playbook_dir):
    result = run_playbook(playbook_dir, textwrap.dedent("""\
        aphrodite_models:
          - id: meta-llama/Llama-3.1-8B-Instruct
            config: models/llama-3.1-8b-instruct/config.json
            tensor_parallel_size: 6
        """))
    assert result.returncode == 2
    assert "tensor parallel size 6 does not divide the 32 attention heads of Llama-3.1-8B-Instruct; use 1, 2, 4 or 8" in result.stdout + result.stderr
