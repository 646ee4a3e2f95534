"""The planner's entry shared by the plan_fleet filter and the CLI: what it reads, and whose facts it trusts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_hosts import (
    host_variables,
    origin_mismatch,
    plan_from_hostvars,
    trusted_facts,
)

MODELS = Path(__file__).resolve().parents[3] / "data" / "models"
H100X8 = {"count": 8, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "interconnect": "nvlink"}
INVENTORY = "/srv/fleet/inventories/prod/hosts.yml"
GPU1 = {"inventory_file": INVENTORY, "ansible_host": "10.0.0.1"}


def gathered(count: int) -> dict:
    return {"source": "nvidia-smi", "count": count, "mig_enabled": False, "nvlink_groups": [list(range(count))],
            "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "numa_node": 0,
                      "compute_capability": "9.0"} for i in range(count)]}


class Templating(Mapping):
    """Stands for Ansible's HostVarsVars: a variable is templated, and may fail, only when read."""

    def __init__(self, values: dict, broken: tuple = ()) -> None:
        self._values, self._broken, self.read = values, broken, []

    def __getitem__(self, key):
        self.read.append(key)
        if key in self._broken:
            raise RuntimeError(f"{key} cannot be templated")
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


@pytest.mark.parametrize(
    ("variables", "origin", "why"),
    [
        (GPU1, {"inventory": INVENTORY, "address": "10.0.0.1"}, None),
        ({**GPU1, "ansible_host": None}, {"inventory": INVENTORY, "address": "gpu1"}, None),  # no address: the name
        (GPU1, {"inventory": "/srv/fleet/inventories/lab/hosts.yml", "address": "10.0.0.1"},
         f"they were gathered for gpu1 of inventory /srv/fleet/inventories/lab/hosts.yml, not of this inventory "
         f"({INVENTORY})"),
        (GPU1, {"inventory": INVENTORY, "address": "172.28.10.31"},
         "they were gathered at address 172.28.10.31, and gpu1 is now at 10.0.0.1"),
        (GPU1, None, "they carry no record of the inventory and address they were gathered from"),
        (GPU1, {"address": "10.0.0.1"}, "they carry no record of the inventory they were gathered from"),
        ({"ansible_host": "10.0.0.1"}, None, None),  # plain data, no inventory: nothing to compare with
    ],
    ids=["same", "address is the name", "other inventory", "host moved", "no origin", "origin without inventory",
         "no inventory_file"],
)
def test_origin_mismatch(variables, origin, why):
    assert origin_mismatch("gpu1", variables, origin) == why


def test_only_the_planners_variables_are_read():
    gpu1 = Templating({**GPU1, "aphrodite_gpus_declared": H100X8, "engine_api_key": "x", "other": 1},
                      broken=("engine_api_key",))
    picked = host_variables({"gpu1": gpu1}, ["gpu1", "not-in-hostvars"])
    assert picked == {"gpu1": {**GPU1, "aphrodite_gpus_declared": H100X8}}
    assert "engine_api_key" not in gpu1.read and "other" not in gpu1.read


def test_facts_set_by_a_module_are_found_under_ansible_facts():
    facts = {"aphrodite_gpus": gathered(4), "aphrodite_gpus_origin": {"inventory": INVENTORY, "address": "10.0.0.1"}}
    picked = host_variables({"gpu1": {**GPU1, "ansible_facts": {**facts, "ansible_hostname": "gpu1"}}}, ["gpu1"])
    assert picked["gpu1"] == {**GPU1, **facts}


def test_a_cache_entry_wins_over_hostvars_and_is_checked_the_same_way():
    origin = {"inventory": INVENTORY, "address": "10.0.0.1"}
    variables = {"gpu1": {**GPU1, "aphrodite_gpus": gathered(8), "aphrodite_gpus_origin": origin},
                 "gpu2": {"inventory_file": INVENTORY, "ansible_host": "10.0.0.2", "aphrodite_gpus": gathered(8),
                          "aphrodite_gpus_origin": origin}}
    cache = {"gpu1": {"aphrodite_gpus": gathered(4), "aphrodite_gpus_origin": origin, "source": "/c/s1_gpu1"}}
    facts, notes = trusted_facts(["gpu1", "gpu2"], variables, cache)
    assert facts == {"gpu1": gathered(4)}
    assert notes == ["gpu2: its gathered GPU facts are not used: they were gathered at address 10.0.0.1, and gpu2 is "
                     "now at 10.0.0.2; it is planned from aphrodite_gpus_declared until the preflight gathers its "
                     "facts again"]
    assert all("aphrodite_gpus" not in v for v in variables.values())  # only the trusted facts reach the planner


def test_plan_from_hostvars_plans_from_declared_facts_when_the_gathered_ones_are_another_inventorys():
    stale = {"inventory": "/elsewhere/hosts.yml", "address": "10.0.0.1"}
    hostvars = {"gpu1": {**GPU1, "aphrodite_gpus_declared": H100X8, "aphrodite_gpus": gathered(2),
                         "aphrodite_gpus_origin": stale}}
    models = [{"id": "meta-llama/Llama-3.1-8B-Instruct", "config": "llama-3.1-8b-instruct/config.json"}]
    plan, from_facts = plan_from_hostvars(models, hostvars, {"gpu_nodes": ["gpu1"]}, str(MODELS))
    assert from_facts == []
    assert len(plan.deployments[0][1]) == 8  # the declared 8 GPUs, not the stale 2
    assert plan.notes[0].startswith("gpu1: its gathered GPU facts are not used: they were gathered for gpu1 of "
                                    "inventory /elsewhere/hosts.yml")
