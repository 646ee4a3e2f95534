# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters exposing the fleet planner to playbooks (documented in plan_fleet.yml, host_replicas.yml,
gpu_facts_of.yml, gpu_facts_changed.yml)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible.utils.display import Display

from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_hosts import plan_from_hostvars
from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import PlanError, node_argv


def plan_fleet(models: Any, hostvars: Any, groups: Any, inventory_dir: str | None = None,
               objective: str | None = None, engine_args: Any = None) -> dict:
    """Plan ``aphrodite_models`` on the inventory's GPU hosts; see plan_fleet.yml."""
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("plan_fleet needs the inventory's groups as its second argument: plan_fleet(hostvars, groups)")
    if not isinstance(hostvars, Mapping) and not hasattr(hostvars, "__getitem__"):
        raise AnsibleFilterError("plan_fleet needs hostvars (or a mapping of host to its variables) as its first argument")
    # The CLI (aphrodite-deploy plan) calls the same function on the same hostvars.
    try:
        plan, _gathered = plan_from_hostvars(list(models or []), hostvars, groups, inventory_dir, objective,
                                             engine_args=engine_args)
    except PlanError as exc:
        raise AnsibleFilterError(str(exc))
    display = Display()
    for note in plan.notes:
        display.warning(note)
    return plan.to_dict()


def host_replicas(plan: Any, host: str) -> list:
    """The replicas (of every model) with GPUs on ``host``, each with this node's part."""
    if not isinstance(plan, Mapping) or "deployments" not in plan:
        raise AnsibleFilterError("host_replicas expects the result of aphrodite.baremetal.plan_fleet")
    result = []
    for deployment in plan["deployments"]:
        for replica in deployment.get("replicas", []):
            placement = replica.get("placement", {})
            if host not in placement:
                continue
            rank = list(placement).index(host)
            try:
                argv = node_argv(replica["argv"], rank)
            except PlanError as exc:
                raise AnsibleFilterError(str(exc))
            result.append({
                "model": deployment["model"],
                "name": replica["name"],
                "port": replica["port"],
                "gpus": list(placement[host]),
                "node_rank": rank,
                "nnodes": len(placement),
                "head": replica["head"],
                "argv": argv,
                "files": list(replica.get("files", [])),
            })
    return result


def _gpu_facts(hostvars: Any, host: str) -> Any:
    try:
        variables = hostvars[host]
    except KeyError:
        return None
    facts = variables["ansible_facts"] if "ansible_facts" in variables else {}
    gpus = facts.get("aphrodite_gpus") if isinstance(facts, Mapping) else None
    if gpus is None:
        return None
    # Plain data: a snapshot that later fact updates of the host do not reach.
    return json.loads(json.dumps(gpus, default=str))


def gpu_facts_of(hostvars: Any, hosts: Any) -> dict:
    """The ``aphrodite_gpus`` fact of each of ``hosts`` as it is now (None where there is none)."""
    if isinstance(hosts, str) or not hasattr(hosts, "__iter__"):
        raise AnsibleFilterError("gpu_facts_of needs a list of hosts, for example groups['gpu_nodes']")
    return {str(host): _gpu_facts(hostvars, str(host)) for host in hosts}


def gpu_facts_changed(hostvars: Any, baseline: Any) -> list:
    """The hosts of ``baseline`` (a result of gpu_facts_of) whose GPU facts differ from it now."""
    if not isinstance(baseline, Mapping):
        raise AnsibleFilterError("gpu_facts_changed needs the GPU facts to compare with, as gpu_facts_of returned them")
    return sorted(host for host, before in baseline.items() if _gpu_facts(hostvars, str(host)) != before)


class FilterModule:
    """aphrodite.baremetal planner filters."""

    def filters(self) -> dict:
        return {"plan_fleet": plan_fleet, "host_replicas": host_replicas, "gpu_facts_of": gpu_facts_of,
                "gpu_facts_changed": gpu_facts_changed}
