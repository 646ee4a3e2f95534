# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The fast path's fingerprint of a run's inputs (documented in fleet_fingerprint.yml, fleet_inputs.yml,
fleet_inputs_refreshed.yml)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils._fingerprint import (
    code_digest,
    digest_of_parts,
    fingerprint_parts,
    is_injected_fact,
    is_input_variable,
    stable_facts,
    verdict,
)

# plugins/filter/converged.py -> the collection's root (a checkout or an installed collection).
_COLLECTION_ROOT = Path(__file__).resolve().parents[2]


def _plain(value: Any) -> Any:
    """A copy of ``value`` with every nested template resolved now, inside the caller's try:
    Ansible templates a variable's lists and dicts lazily, item by item, so a nested template
    that cannot be resolved would otherwise fail later, in the digest, and end the run."""
    if isinstance(value, Mapping):
        return {str(key): _plain(value[key]) for key in value}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _raw(value: Any) -> Any:
    """The inventory's own text of a value, templates unresolved (strings, lists and dicts only)."""
    if isinstance(value, Mapping):
        return {str(key): _raw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_raw(item) for item in value]
    return value if isinstance(value, (bool, int, float, type(None))) else str(value)


def _facts_of(variables: Any, raw: Any = None) -> Mapping:
    try:
        # The facts as gathered, not templated: they are data, and templating the whole of
        # them (every mount and interface of a full fact cache) cost most of this filter's time.
        source = raw if isinstance(raw, Mapping) and "ansible_facts" in raw else variables
        facts = source["ansible_facts"] if "ansible_facts" in source else {}
    except Exception:  # noqa: BLE001 - an unreadable fact cache entry is no input
        facts = {}
    return facts if isinstance(facts, Mapping) else {}


def _host_inputs(variables: Any, raw: Any = None) -> dict:
    facts = _facts_of(variables, raw)
    picked = {}
    for name in sorted(variables):
        if not is_input_variable(name, facts):
            continue
        try:
            value = _plain(variables[name])
        except Exception as exc:  # noqa: BLE001 - templated out of any role or play
            # A template that needs the play's context (hostvars, groups of another play):
            # its text is the input, so an edit to it still counts, stably.
            value = {"unresolved": type(exc).__name__,
                     "template": _raw(raw[name]) if isinstance(raw, Mapping) and name in raw else None}
        if is_injected_fact(name, value, facts):
            continue
        picked[name] = value
    return {"vars": picked, "facts": stable_facts(facts)}


def fleet_inputs(hostvars: Any, hosts: Any, groups: Any, plan: Any = None) -> dict:
    """SHA-256 of each input of the run, by name; see fleet_inputs.yml."""
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("fleet_inputs needs the inventory's groups: hostvars | fleet_inputs(groups['all'], groups)")
    if isinstance(hosts, str) or not hasattr(hosts, "__iter__"):
        raise AnsibleFilterError("fleet_inputs needs a list of hosts, for example groups['all']")
    return fingerprint_parts(_collect(hostvars, hosts)[0], groups, plan, code_digest(_COLLECTION_ROOT))


def fleet_inputs_refreshed(inputs: Any, hostvars: Any, hosts: Any, plan: Any = None) -> dict:
    """This run's inputs with the facts of ``hosts`` and the plan read again; see fleet_inputs_refreshed.yml."""
    if not isinstance(inputs, Mapping):
        raise AnsibleFilterError("fleet_inputs_refreshed needs this run's inputs (the fast path's decision's 'inputs')")
    if isinstance(hosts, str) or not hasattr(hosts, "__iter__"):
        raise AnsibleFilterError("fleet_inputs_refreshed needs a list of hosts whose facts changed")
    facts = {host: {"facts": stable_facts(_facts_of(variables, raw))}
             for host, variables, raw in _lookups(hostvars, hosts)}
    # Only these parts: the others were fingerprinted before the run set anything (groups
    # made by group_by, facts set by tasks), as the next run will fingerprint them.
    fresh = fingerprint_parts(facts, {}, plan, "")
    refreshed = dict(inputs)
    refreshed["engine plan"] = fresh["engine plan"]
    refreshed.update({f"facts of {host}": fresh[f"facts of {host}"] for host in facts})
    return refreshed


def _lookups(hostvars: Any, hosts: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(host, variables, raw)`` of each of ``hosts`` in hostvars: its variables, and its
    untemplated ones where hostvars offers them (the facts are read from those)."""
    for host in hosts:
        try:
            variables = hostvars[host]
        except KeyError:
            continue
        yield str(host), variables, hostvars.raw_get(host) if hasattr(hostvars, "raw_get") else None


def _collect(hostvars: Any, hosts: Any) -> tuple[dict, dict]:
    """Each host's inputs, and its variables as looked up for them (each lookup of
    hostvars[host] computes all of the host's variables, so callers reuse these)."""
    collected, looked_up = {}, {}
    for host, variables, raw in _lookups(hostvars, hosts):
        collected[host] = _host_inputs(variables, raw)
        looked_up[host] = variables
    return collected, looked_up


def fleet_fingerprint(hostvars: Any, hosts: Any, groups: Any, plan: Any = None) -> str:
    """SHA-256 of every input of the run; see fleet_fingerprint.yml."""
    return digest_of_parts(fleet_inputs(hostvars, hosts, groups, plan))


def fast_path_verdict(probe: Any, inputs: Any, fast_path: Any = True) -> dict:
    """Whether the host the probe came from is converged; see fast_path_verdict.yml."""
    if inputs is not None and not isinstance(inputs, Mapping):
        raise AnsibleFilterError("fast_path_verdict needs this run's inputs (the fleet_inputs filter's dict)")
    return verdict(probe, inputs, bool(fast_path))


def _probe_of(variables: Any) -> Any:
    return variables["__aphrodite_probe"] if variables is not None and "__aphrodite_probe" in variables else None


def _summary(hosts: list, verdicts: Mapping) -> list:
    """What the run says: how many hosts it skips, then each other host with why it runs."""
    fresh = [h for h in hosts if verdicts[h]["converged"]]
    lines = [f"{len(fresh)} of {len(hosts)} host(s) unchanged since their last complete run, skipped"
             + (": " + ", ".join(fresh) if fresh else "")]
    for host in hosts:
        if host in fresh:
            continue
        reasons = verdicts[host]["reasons"] or ["the host was not probed in this run"]
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        lines.append(f"{host} runs every task: " + "; ".join(reasons[:3]) + more)
    return lines


def fast_path_decision(hostvars: Any, hosts: Any, groups: Any, plan: Any = None, fast_path: Any = True) -> dict:
    """The fast path's whole decision, once on the controller; see fast_path_decision.yml."""
    if isinstance(hosts, str) or not hasattr(hosts, "__iter__"):
        raise AnsibleFilterError("fast_path_decision needs the play's hosts, for example ansible_play_hosts")
    if not isinstance(groups, Mapping) or "all" not in groups:
        raise AnsibleFilterError("fast_path_decision needs the inventory's groups (groups)")
    hosts = [str(h) for h in hosts]
    collected, looked_up = _collect(hostvars, groups["all"])
    inputs = fingerprint_parts(collected, groups, plan, code_digest(_COLLECTION_ROOT))
    # The probes from the same lookups as the inputs (a play's hosts are the inventory's).
    verdicts = {host: verdict(_probe_of(looked_up.get(host)), inputs, bool(fast_path)) for host in hosts}
    return {
        "inputs": inputs,
        "verdicts": verdicts,
        "skipped": [h for h in hosts if verdicts[h]["converged"]],
        "running": [h for h in hosts if not verdicts[h]["converged"]],
        "summary": _summary(hosts, verdicts),
    }


def fast_path_hosts(names: Any, groups: Any, hostvars: Any) -> list:
    """The hosts of the groups (or hosts) ``names`` that a stage play runs on; see fast_path_hosts.yml."""
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("fast_path_hosts needs the inventory's groups: ['gpu_nodes'] | fast_path_hosts(groups, hostvars)")
    names = [names] if isinstance(names, str) else list(names or [])
    hosts: list = []
    for name in names:
        for host in groups.get(name, [name] if name in groups.get("all", []) else []):
            if host not in hosts:
                hosts.append(host)
    try:
        local = hostvars["localhost"]
        decision = local["__aphrodite_fast_path"] if "__aphrodite_fast_path" in local else None
    except KeyError:
        decision = None
    skipped = set(decision.get("skipped") or []) if isinstance(decision, Mapping) else set()
    return [h for h in hosts if h not in skipped]


class FilterModule:
    """aphrodite.baremetal fast-path filters."""

    def filters(self) -> dict:
        return {"fleet_fingerprint": fleet_fingerprint, "fleet_inputs": fleet_inputs, "fast_path_verdict": fast_path_verdict,
                "fast_path_decision": fast_path_decision, "fast_path_hosts": fast_path_hosts,
                "fleet_inputs_refreshed": fleet_inputs_refreshed}
