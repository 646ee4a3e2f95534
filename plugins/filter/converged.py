# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The fast path's fingerprint of a run's inputs (documented in fleet_fingerprint.yml, fleet_inputs.yml)."""

from __future__ import annotations

from collections.abc import Mapping
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


def _host_inputs(variables: Any, raw: Any = None) -> dict:
    try:
        facts = variables["ansible_facts"] if "ansible_facts" in variables else {}
    except Exception:  # noqa: BLE001 - an unreadable fact cache entry is no input
        facts = {}
    facts = facts if isinstance(facts, Mapping) else {}
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
    collected = {}
    for host in hosts:
        try:
            variables = hostvars[host]
        except KeyError:
            continue
        raw = hostvars.raw_get(host) if hasattr(hostvars, "raw_get") else None
        collected[str(host)] = _host_inputs(variables, raw)
    return fingerprint_parts(collected, groups, plan, code_digest(_COLLECTION_ROOT))


def fleet_fingerprint(hostvars: Any, hosts: Any, groups: Any, plan: Any = None) -> str:
    """SHA-256 of every input of the run; see fleet_fingerprint.yml."""
    return digest_of_parts(fleet_inputs(hostvars, hosts, groups, plan))


def fast_path_verdict(probe: Any, inputs: Any, fast_path: Any = True) -> dict:
    """Whether the host the probe came from is converged; see fast_path_verdict.yml."""
    if inputs is not None and not isinstance(inputs, Mapping):
        raise AnsibleFilterError("fast_path_verdict needs this run's inputs (the fleet_inputs filter's dict)")
    return verdict(probe, inputs, bool(fast_path))


class FilterModule:
    """aphrodite.baremetal fast-path filters."""

    def filters(self) -> dict:
        return {"fleet_fingerprint": fleet_fingerprint, "fleet_inputs": fleet_inputs, "fast_path_verdict": fast_path_verdict}
