"""The operations scenario's inventory plans a replica across both GPU nodes, and the firewall
opens its rendezvous only between them.

molecule/operations runs that replica (head and headless rank) but no firewall, so the
openings its nodes would get are checked here, from the scenario's own variables, through
the planner and the fleet model as preflight computes them.
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
SCENARIO = yaml.safe_load((ROOT / "molecule" / "operations" / "molecule.yml").read_text())
FALLBACKS = yaml.safe_load((ROOT / "roles" / "firewall" / "vars" / "main.yml").read_text())["__firewall_fallback_openings"]
ADDRESSES = {"ops-lb1": "172.28.80.11", "ops-gpu1": "172.28.80.12", "ops-gpu2": "172.28.80.13"}
SETTINGS = {"admin_networks": ["172.28.80.1/32"], "client_networks": ["0.0.0.0/0"], "ssh_port": 22,
            "engine_peer_ports": "32768-60999"}


def _inventory() -> tuple[dict, dict, list]:
    group_vars = SCENARIO["provisioner"]["inventory"]["group_vars"]
    groups: dict = {"all": list(ADDRESSES), "ungrouped": []}
    for platform in SCENARIO["platforms"]:
        for group in platform["groups"]:
            groups.setdefault(group, []).append(platform["name"])
    hostvars = {}
    for host, address in ADDRESSES.items():
        variables = {k: v for k, v in group_vars["all"].items() if k != "aphrodite_models"}
        for group in (g for g in groups if host in groups[g] and g in group_vars and g != "all"):
            variables.update(group_vars[group])
        hostvars[host] = {**variables, "ansible_host": address}
    models = [{**m, "config": m["config"].replace("{{ lookup('ansible.builtin.env', 'MOLECULE_PROJECT_DIRECTORY') }}",
                                                  str(ROOT))} for m in group_vars["all"]["aphrodite_models"]]
    return hostvars, groups, models


def _fleet() -> dict:
    hostvars, groups, models = _inventory()
    plan = plan_inventory(models, hostvars, groups).to_dict()
    return fleet_model(plan, hostvars, groups, {"vip": hostvars["ops-lb1"]["aphrodite_vip"]})


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
