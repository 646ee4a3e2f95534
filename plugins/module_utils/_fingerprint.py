# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSES/Apache-2.0.txt)
"""The fingerprint of a run's inputs, for the fast path of site.yml.

A host whose recorded fingerprint equals this run's, and whose managed state is as recorded
(plugins/modules/converged.py), is skipped.  So the fingerprint must change whenever anything
that can change what a role does changes: every variable of every host (templated, so a
secret read by a lookup counts), the facts the roles read, the inventory's groups, the plan
and the collection's own code.  Anything volatile (uptime, free memory, addresses that
move with the virtual IP, names of container veths) is left out, or no run would ever be
fast.  Pure Python; the filter plugin feeds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The facts the roles read (tests/unit/test_fast_path.py holds every role to this list).
# Facts gathered by tasks (packages, services) are probes of the host's state, not inputs.
FACT_KEYS = (
    "aphrodite_gpus",
    "architecture",
    "default_ipv4",
    "distribution",
    "distribution_major_version",
    "distribution_release",
    "distribution_version",
    "hostname",
    "interfaces",
    "kernel",
    "os_family",
    "python",
    "service_mgr",
)
# Only these parts of the facts above are stable enough to compare.
_DEFAULT_IPV4_KEYS = ("address", "gateway", "interface", "netmask", "network", "prefix")
_PYTHON_KEYS = ("executable", "version")
# Interfaces that come and go with containers and bridges, not with the host's configuration.
_VOLATILE_INTERFACE_PREFIXES = ("veth", "docker", "br-", "cali", "flannel", "cni", "vxlan")

# Variables that describe the run, not the fleet: leaving them out keeps a no-op re-run
# fast whatever flags it was started with.
RUN_VARIABLES = frozenset({
    "aphrodite_fast_path", "aphrodite_debug_secrets",
    "ansible_check_mode", "ansible_diff_mode", "ansible_verbosity", "ansible_forks", "ansible_version",
    "ansible_run_tags", "ansible_skip_tags", "ansible_limit", "ansible_config_file", "ansible_playbook_python",
    "ansible_inventory_sources", "ansible_search_path", "ansible_collection_name", "ansible_local",
    "ansible_facts", "ansible_failed_task", "ansible_failed_result", "ansible_loop_var", "ansible_index_var",
    "ansible_parent_role_names", "ansible_parent_role_paths", "ansible_role_names", "ansible_dependent_role_names",
    "ansible_play_batch", "ansible_play_hosts", "ansible_play_hosts_all", "ansible_play_name",
    "ansible_play_role_names", "ansible_play_roles", "ansible_role_name",
    "groups", "group_names", "hostvars", "inventory_hostname_short", "omit", "play_hosts", "playbook_dir",
    "role_name", "role_names", "role_path", "vars", "environment",
    # Where the preflight gathered a host's GPU facts (a cacheable set_fact): the first run sees
    # it as a variable, later runs as a cached fact, so counting it would make the second run
    # differ from the first; the inventory file and the address it records are inputs already.
    "aphrodite_gpus_origin",
    # The plan, which the preflight sets on every GPU node: computed from the inputs, and an
    # input of its own already ("engine plan"), so templating it once per node adds nothing.
    "aphrodite_plan",
})
# The collection's code: what it does with the inputs.
CODE_DIRS = ("roles", "plugins", "playbooks")
CODE_FILES = ("galaxy.yml", "MANIFEST.json")


def stable_facts(facts: Any) -> dict:
    """The parts of a host's facts that the fingerprint covers."""
    if not isinstance(facts, Mapping):
        return {}
    picked: dict[str, Any] = {}
    for key in FACT_KEYS:
        if key not in facts:
            continue
        value = facts[key]
        if key == "default_ipv4" and isinstance(value, Mapping):
            value = {k: value.get(k) for k in _DEFAULT_IPV4_KEYS}
        elif key == "python" and isinstance(value, Mapping):
            value = {k: value.get(k) for k in _PYTHON_KEYS}
        elif key == "interfaces" and isinstance(value, Iterable) and not isinstance(value, str):
            value = sorted(str(i) for i in value if not str(i).startswith(_VOLATILE_INTERFACE_PREFIXES))
        picked[key] = value
    return picked


def is_input_variable(name: str, facts: Mapping | None = None) -> bool:
    """Whether a host variable is an input of the fleet (not a run setting, fact or private)."""
    if name.startswith("_") or name in RUN_VARIABLES:
        return False
    if facts and name.startswith("ansible_") and name[len("ansible_"):] in facts:
        return False  # a fact injected as a variable: stable_facts covers the ones that matter
    return True


def is_injected_fact(name: str, value: Any, facts: Mapping | None) -> bool:
    """Whether a variable is a fact that a module returned under its own name (package_facts'
    ``packages``, service_facts' ``services``, gpu_facts' ``aphrodite_gpus``, setup's
    ``gather_subset``), which Ansible also injects as a variable of that name.  The fact
    cache brings last run's back, so counting them would make every run's inputs differ
    from the one before.  A variable of the inventory that only shares the name keeps
    counting: its value is not the fact's."""
    return bool(facts) and name in facts and value == facts[name]


def code_digest(root: Path) -> str:
    """SHA-256 over the collection's roles, plugins and playbooks (paths and contents)."""
    digest = hashlib.sha256()
    files = [root / name for name in CODE_FILES if (root / name).is_file()]
    for top in CODE_DIRS:
        base = root / top
        if base.is_dir():
            files += [p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _json_default(value: Any) -> str:
    # Undefined markers and other objects: their type, never their repr (it holds addresses).
    return f"<{type(value).__name__}>"


def fingerprint_parts(hosts: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Iterable[str]],
                      plan: Any, code: str) -> dict[str, str]:
    """SHA-256 of each input of the fleet, named: the collection's code, the groups, the plan,
    and per host its input variables and its stable facts.  Kept apart so that a host that
    runs again can be told which input changed."""
    def digest(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=_json_default, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    parts = {
        "collection code": code,
        "inventory groups": digest({g: sorted(members) for g, members in groups.items()}),
        "engine plan": digest(plan),
    }
    for name in sorted(hosts):
        parts[f"variables of {name}"] = digest(hosts[name].get("vars", {}))
        parts[f"facts of {name}"] = digest(hosts[name].get("facts", {}))
    return parts


def digest_of_parts(parts: Mapping[str, str]) -> str:
    """The one fingerprint of a run, from its parts (the converged module uses this too)."""
    text = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(hosts: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Iterable[str]],
                plan: Any, code: str) -> str:
    """SHA-256 of the fleet's inputs: per host its input variables and stable facts."""
    return digest_of_parts(fingerprint_parts(hosts, groups, plan, code))


# How many changed inputs a reason names before it counts the rest.
_NAMED_INPUTS = 8


def verdict(probe: Any, inputs: Mapping[str, str] | None, fast_path: bool = True) -> dict:
    """Whether a host is as its last complete run left it, from its probe (the converged
    module, state=probe) and this run's inputs (fingerprint_parts): the recorded fingerprint
    must equal this run's and the managed state must not have drifted.  Decided on the
    controller, so the probe is the host's one round trip.  Returns ``converged`` and the
    ``reasons`` why not."""
    if not fast_path:
        return {"converged": False, "reasons": ["the fast path is off (aphrodite_fast_path=false)"]}
    if not isinstance(probe, Mapping) or probe.get("skipped") or probe.get("failed") or "recorded_fingerprint" not in probe:
        return {"converged": False, "reasons": ["the host was not probed in this run"]}
    if not probe.get("recorded_fingerprint"):
        return {"converged": False, "reasons": list(probe.get("reasons") or ["nothing recorded yet"])}
    current = {str(k): str(v) for k, v in (inputs or {}).items()}
    if probe["recorded_fingerprint"] != digest_of_parts(current):
        before = probe.get("recorded_inputs") or {}
        changed = sorted(k for k in set(before) | set(current)
                         if before.get(k) != (current[k][:len(before[k])] if k in current and k in before else None))
        if not changed:  # the digests agree on the digits returned: the rest differs
            changed = ["inventory, variables, facts, plan or collection"]
        what = ", ".join(changed[:_NAMED_INPUTS]) + (
            f" and {len(changed) - _NAMED_INPUTS} more" if len(changed) > _NAMED_INPUTS else "")
        return {"converged": False, "reasons": [f"the inputs changed since {probe.get('recorded_at')}: {what}"]}
    drift = probe.get("drift")
    if drift is None:
        return {"converged": False, "reasons": ["the managed state was not compared"]}
    return {"converged": not drift, "reasons": list(drift)}
