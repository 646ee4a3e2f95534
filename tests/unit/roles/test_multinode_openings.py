"""The operations scenario's two nodes of five L40S: two single-GPU replicas of an 8B model and one
replica of the 70B model at its full context, which fits neither node alone, so the planner runs
it across both (TP 4 x PP 2);
the firewall opens its rendezvous only between those two nodes.  Through the planner and the
fleet model as preflight computes them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import (
    allows,
    host_openings,
    merge_declarations,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import fleet_model
from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import plan_inventory

ROOT = Path(__file__).resolve().parents[3]
FALLBACKS = yaml.safe_load((ROOT / "roles" / "firewall" / "vars" / "main.yml").read_text())["__firewall_fallback_openings"]
ADDRESSES = {"ops-lb1": "172.28.80.11", "ops-gpu1": "172.28.80.12", "ops-gpu2": "172.28.80.13"}
SETTINGS = {"admin_networks": ["172.28.80.1/32"], "client_networks": ["0.0.0.0/0"], "ssh_port": 22,
            "engine_peer_ports": "32768-60999"}
GPUS = {"count": 5, "name": "NVIDIA L40S", "memory_mib": 46068, "interconnect": "pcie"}
MODELS = [
    {"id": "meta-llama/Llama-3.1-8B-Instruct", "config": str(ROOT / "inventories/lab/models/llama-3.1-8b-instruct/config.json"),
     "served_model_name": "llama-8b", "max_model_len": 8192, "replicas": 2, "tensor_parallel_size": 1},
    # 141 GB of weights and 40 GiB of KV cache: more than one node's four free GPUs hold.
    {"id": "meta-llama/Llama-3.1-70B-Instruct",
     "config": str(ROOT / "tests/data/models/llama-3.1-70b-instruct/config.json"),
     "served_model_name": "llama-70b", "max_model_len": 131072, "replicas": 1},
]


def _inventory() -> tuple[dict, dict, list]:
    groups = {"all": list(ADDRESSES), "ungrouped": [], "loadbalancers": ["ops-lb1"], "gpu_nodes": ["ops-gpu1", "ops-gpu2"]}
    hostvars = {host: {"ansible_host": address, **({"aphrodite_gpus_declared": GPUS} if "gpu" in host else {})}
                for host, address in ADDRESSES.items()}
    return hostvars, groups, MODELS


def _fleet() -> dict:
    hostvars, groups, models = _inventory()
    plan = plan_inventory(models, hostvars, groups).to_dict()
    return fleet_model(plan, hostvars, groups, {"vip": "172.28.80.100"})


def test_the_scenario_plans_one_replica_across_both_gpu_nodes() -> None:
    fleet = _fleet()
    multi = [r for r in fleet["replicas"] if r["nnodes"] > 1]
    assert len(multi) == 1 and len(fleet["replicas"]) == 3, fleet["replicas"]
    replica = multi[0]
    assert [(n["host"], n["rank"]) for n in replica["nodes"]] == [("ops-gpu1", 0), ("ops-gpu2", 1)]
    assert replica["head"] == "ops-gpu1" and replica["served_names"] == ["llama-70b"]
    assert replica["master_port"] == 29501
    assert fleet["loadbalancers"]["vip"] == "172.28.80.100"


def test_the_rendezvous_is_open_between_the_replicas_nodes_only() -> None:
    fleet = _fleet()
    replica = next(r for r in fleet["replicas"] if r["nnodes"] > 1)
    declarations = merge_declarations(FALLBACKS, {}, [])
    head = host_openings("ops-gpu1", fleet, SETTINGS, declarations, {})
    worker = host_openings("ops-gpu2", fleet, SETTINGS, declarations, {})
    master = replica["master_port"]
    assert allows(head, ADDRESSES["ops-gpu2"], master)
    assert not allows(head, ADDRESSES["ops-lb1"], master)
    assert not allows(head, "172.28.80.200", master)
    # NCCL/Gloo ports: each node from the other only; the worker has no master port.
    assert allows(worker, ADDRESSES["ops-gpu1"], 40000) and allows(head, ADDRESSES["ops-gpu2"], 40000)
    assert not allows(worker, ADDRESSES["ops-lb1"], 40000)
    assert not allows(worker, ADDRESSES["ops-gpu1"], master)
    # The engine API: from the load balancer only.
    assert allows(head, ADDRESSES["ops-lb1"], replica["port"]) and not allows(head, ADDRESSES["ops-gpu2"], replica["port"])
