# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""What the planner reads from each host's variables, for the plan_fleet filter and the CLI alike.

Both hand over Ansible's own ``hostvars`` (a mapping of host to a mapping that templates
a variable when it is read), so the same variables are templated the same way, and only
those the planner reads: a host variable that cannot be templated elsewhere (a lookup
of a file that is not there yet) does not stop the plan.

Gathered GPU facts count only for the host they were gathered from. The preflight
records, beside ``aphrodite_gpus``, ``aphrodite_gpus_origin``: the inventory source of
the host (``inventory_file``) and its address (``ansible_host``, else its name). Facts
whose origin differs from the host's own, or that carry none, come from a fact cache
written for another inventory (a host of the same name) or before the host moved; they
are left out, with a note, and the host is planned from ``aphrodite_gpus_declared``.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ._plan_input import plan_inventory
from ._planner import Plan

# Short names a caller may use instead of the inventory's variable names (the filter's
# documented aliases).
ALIASES = {"declared": "aphrodite_gpus_declared", "gathered": "aphrodite_gpus", "address": "ansible_host"}
ORIGIN = "aphrodite_gpus_origin"
# Every host variable the planner reads; nothing else is ever templated.
HOST_VARIABLES = ("aphrodite_gpus_declared", "aphrodite_gpus", ORIGIN, "aphrodite_bind_address", "ansible_host",
                  "inventory_file", "ansible_facts")


def host_variables(hostvars: Any, hosts: list) -> dict:
    """The planner's variables of each host, read (so templated) one at a time."""
    result = {}
    for host in hosts:
        try:
            variables = hostvars[host]
        except KeyError:
            continue
        picked: dict = {}
        for key in HOST_VARIABLES + tuple(ALIASES):
            try:
                value = variables[key]
            except (KeyError, TypeError):
                continue
            if key == "ansible_facts":
                # Facts set by a module live here too; take only the two the planner reads.
                if isinstance(value, Mapping):
                    for fact in ("aphrodite_gpus", ORIGIN):
                        if fact in value and fact not in picked:
                            picked[fact] = value[fact]
                continue
            picked[ALIASES.get(key, key)] = value
        result[host] = picked
    return result


def facts_origin(host: str, variables: Mapping) -> dict:
    """Where ``host``'s facts must have been gathered: its inventory source and its address.

    The preflight writes the same record beside the facts it gathers.
    """
    inventory = variables.get("inventory_file")
    return {"inventory": str(inventory) if inventory else None, "address": str(variables.get("ansible_host") or host)}


def _same_inventory(recorded: Any, expected: str) -> bool:
    if not isinstance(recorded, str) or not recorded:
        return False
    return recorded == expected or os.path.realpath(recorded) == os.path.realpath(expected)


def origin_mismatch(host: str, variables: Mapping, origin: Any) -> str | None:
    """Why gathered facts with ``origin`` are not ``host``'s, or None when they are.

    Without an ``inventory_file`` (a caller that passes plain data rather than an
    inventory's hostvars) there is nothing to compare with, and the facts are taken.
    """
    expected = facts_origin(host, variables)
    if expected["inventory"] is None:
        return None
    if not isinstance(origin, Mapping):
        return "they carry no record of the inventory and address they were gathered from"
    recorded_inventory = origin.get("inventory")
    recorded_address = str(origin.get("address") or "")
    if not recorded_inventory:
        return "they carry no record of the inventory they were gathered from"
    if not _same_inventory(recorded_inventory, expected["inventory"]):
        return (f"they were gathered for {host} of inventory {recorded_inventory}, "
                f"not of this inventory ({expected['inventory']})")
    if recorded_address != expected["address"]:
        return f"they were gathered at address {recorded_address}, and {host} is now at {expected['address']}"
    return None


def trusted_facts(hosts: list, variables: dict, gathered: Mapping[str, Any] | None = None) -> tuple:
    """``(facts, notes)``: the gathered ``aphrodite_gpus`` of each host whose origin matches.

    ``gathered`` maps hosts to fact-cache entries (``aphrodite_gpus``, ``aphrodite_gpus_origin``
    and, for messages, ``source``); an entry wins over the host's variables. Each host's
    ``aphrodite_gpus`` is removed from ``variables``: the facts returned are the only ones
    the planner may use.
    """
    facts: dict = {}
    notes: list = []
    for host in hosts:
        own = variables.setdefault(host, {})
        entry = (gathered or {}).get(host)
        if entry is not None:
            gpus, origin, source = entry.get("aphrodite_gpus"), entry.get(ORIGIN), entry.get("source")
        else:
            gpus, origin, source = own.get("aphrodite_gpus"), own.get(ORIGIN), None
        own.pop("aphrodite_gpus", None)
        if gpus is None:
            continue
        why = origin_mismatch(host, own, origin)
        if why is None:
            facts[host] = gpus
            continue
        where = f"the GPU facts cached in {source}" if source else "its gathered GPU facts"
        notes.append(f"{host}: {where} are not used: {why}; it is planned from aphrodite_gpus_declared "
                     f"until the preflight gathers its facts again")
    return facts, notes


def plan_from_hostvars(models: Any, hostvars: Any, groups: Mapping[str, Any], inventory_dir: str | None = None,
                       objective: str | None = None, gathered: Mapping[str, Any] | None = None,
                       **options: Any) -> tuple:
    """``(plan, hosts planned from gathered facts)``: the one entry of the filter and the CLI.

    ``hostvars`` is Ansible's (or any mapping of host to variables); ``options`` go to
    :func:`plan_inventory` as they are.
    """
    hosts = sorted({h for members in groups.values() for h in (members or [])})
    variables = host_variables(hostvars, hosts)
    facts, notes = trusted_facts(hosts, variables, gathered)
    plan: Plan = plan_inventory(models, variables, dict(groups), inventory_dir, objective, facts, **options)
    plan.notes[:0] = notes
    return plan, sorted(facts)
