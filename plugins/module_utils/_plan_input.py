# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Turn inventory data into planner input, for the filter plugin and the CLI alike.

The inventory contract (issue 3):

- hosts of ``gpu_nodes`` carry ``aphrodite_gpus_declared`` (count, name, memory_mib,
  interconnect) and, once facts are gathered, ``aphrodite_gpus`` (gpu_facts module);
- ``aphrodite_models`` lists the models: ``id``, ``config`` (path relative to the
  inventory directory, or the parsed config itself), and optionally ``quantization``,
  ``max_model_len``, ``gpu_memory_utilization``, ``tensor_parallel_size``, ``hosts``
  (a group or a list of hosts; default ``gpu_nodes``), ``replicas``, ``objective``,
  ``kv_cache_dtype``, ``served_model_name``, ``name``, ``enforce_eager``.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ._fleet import FactsError, host_gpus
from ._fleet_model import host_address
from ._model_spec import ModelSpecError, apply_quantization_override, load_model_spec, parse_config
from ._planner import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    OBJECTIVES,
    ModelRequest,
    Plan,
    PlanError,
    plan_fleet,
)

DEFAULT_HOSTS_GROUP = "gpu_nodes"
MODEL_KEYS = frozenset((
    "id", "config", "quantization", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size",
    "hosts", "replicas", "objective", "kv_cache_dtype", "served_model_name", "name", "enforce_eager",
    "source", "revision",
))


def resolve_hosts(selector: Any, groups: Mapping[str, Any], model_id: str) -> tuple:
    """Hosts a model may run on, and a label for messages.

    ``selector`` is a group name, a host name, or a list of either; ``None`` means
    ``gpu_nodes``.
    """
    if selector is None or selector == "":
        if DEFAULT_HOSTS_GROUP not in groups:
            raise PlanError(
                f"{model_id} runs on group {DEFAULT_HOSTS_GROUP} unless hosts: says otherwise, and the inventory has no "
                f"{DEFAULT_HOSTS_GROUP} group; put the GPU hosts in {DEFAULT_HOSTS_GROUP} or set hosts: for {model_id}"
            )
        selector = DEFAULT_HOSTS_GROUP
    names = [selector] if isinstance(selector, str) else list(selector) if isinstance(selector, (list, tuple)) else None
    if names is None:
        raise PlanError(f"hosts of {model_id} must be a group name or a list of hosts, got {selector!r}")
    hosts: list = []
    known_hosts = {h for members in groups.values() for h in (members or [])}
    for name in names:
        name = str(name)
        if name in groups:
            members = list(groups.get(name) or [])
        elif name in known_hosts:
            members = [name]
        else:
            raise PlanError(
                f"hosts of {model_id} names {name!r}, which is neither a group nor a host of the inventory; "
                f"use a group such as {DEFAULT_HOSTS_GROUP} or hostnames listed in the inventory"
            )
        hosts.extend(h for h in members if h not in hosts)
    label = names[0] if len(names) == 1 else ", ".join(names)
    return tuple(hosts), label


def _number(entry: Mapping, key: str, model_id: str, kind: type, default: Any = None) -> Any:
    value = entry.get(key)
    if value is None or value == "":
        return default
    try:
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        return kind(value)
    except (TypeError, ValueError):
        raise PlanError(f"{key} of {model_id} in aphrodite_models must be {'an integer' if kind is int else 'a number'}, got {value!r}")


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def model_request(entry: Mapping[str, Any], groups: Mapping[str, Any], inventory_dir: str | None,
                  objective: str | None = None) -> ModelRequest:
    """Build a :class:`ModelRequest` from one ``aphrodite_models`` entry."""
    if not isinstance(entry, Mapping) or not entry.get("id"):
        raise PlanError(f"every aphrodite_models entry needs an id (the model's Hugging Face id or path), got {entry!r}")
    model_id = str(entry["id"])
    unknown = sorted(set(entry) - MODEL_KEYS)
    if unknown:
        raise PlanError(f"aphrodite_models entry {model_id} has unknown keys {', '.join(unknown)}; known: {', '.join(sorted(MODEL_KEYS))}")
    config = entry.get("config")
    quantization = entry.get("quantization") or None
    try:
        if isinstance(config, Mapping):
            spec = apply_quantization_override(parse_config(config, model_id), quantization)
        elif isinstance(config, str) and config:
            path = config
            if not os.path.isabs(path):
                if not inventory_dir:
                    raise PlanError(
                        f"config {config} of {model_id} is relative to the inventory directory, which was not given; "
                        f"pass inventory_dir to the planner or make config an absolute path"
                    )
                path = os.path.join(inventory_dir, path)
            spec = load_model_spec(path, model_id, quantization)
        else:
            raise PlanError(
                f"{model_id} needs config: the path of its config.json relative to the inventory directory "
                f"(for example models/{model_id.rsplit('/', maxsplit=1)[-1].lower()}/config.json)"
            )
    except ModelSpecError as exc:
        raise PlanError(str(exc))
    hosts, label = resolve_hosts(entry.get("hosts"), groups, model_id)
    chosen_objective = str(entry.get("objective") or objective or "throughput")
    if chosen_objective not in OBJECTIVES:
        raise PlanError(f"objective {chosen_objective!r} of {model_id} must be one of {', '.join(OBJECTIVES)}")
    checkpoint_method = spec.quantization.method if spec.quantization and spec.quantization.from_checkpoint else None
    # The engine detects a checkpoint's format itself (and picks Marlin kernels for AWQ/GPTQ);
    # passing the same name would force the slower non-Marlin kernels, so only differing
    # names (fp8 at load time, an explicit *_marlin) reach --quantization.
    flag = str(quantization) if quantization and str(quantization) != checkpoint_method else None
    return ModelRequest(
        model_id=model_id,
        spec=spec,
        hosts=hosts,
        hosts_label=label,
        max_model_len=_number(entry, "max_model_len", model_id, int),
        gpu_memory_utilization=_number(entry, "gpu_memory_utilization", model_id, float, DEFAULT_GPU_MEMORY_UTILIZATION),
        tensor_parallel_size=_number(entry, "tensor_parallel_size", model_id, int),
        replicas=_number(entry, "replicas", model_id, int),
        objective=chosen_objective,
        quantization_flag=flag,
        kv_cache_dtype=str(entry.get("kv_cache_dtype") or "auto"),
        served_model_name=entry.get("served_model_name") or None,
        name=entry.get("name") or None,
        enforce_eager=_bool(entry.get("enforce_eager", False)),
    )


def host_facts(host: str, hostvars: Mapping[str, Any], gathered: Any = None) -> tuple:
    """``(HostGpus, notes)`` for one host from its variables (and cached facts)."""
    variables = hostvars.get(host) or {}
    declared = variables.get("aphrodite_gpus_declared")
    if gathered is None:
        gathered = variables.get("aphrodite_gpus")
        facts = variables.get("ansible_facts")
        if gathered is None and isinstance(facts, Mapping):
            gathered = facts.get("aphrodite_gpus")
    bind = variables.get("aphrodite_bind_address") or None
    address = host_address(host, variables)
    try:
        return host_gpus(host, declared, gathered, str(address), str(bind) if bind else None)
    except FactsError as exc:
        raise PlanError(str(exc))


def plan_inventory(models: Any, hostvars: Mapping[str, Any], groups: Mapping[str, Any], inventory_dir: str | None = None,
                   objective: str | None = None, gathered: Mapping[str, Any] | None = None) -> Plan:
    """Plan ``aphrodite_models`` against the inventory; the result's notes hold mismatches.

    ``gathered`` maps hostnames to ``aphrodite_gpus`` facts from a fact cache; they win
    over facts found in ``hostvars``.
    """
    if not isinstance(models, (list, tuple)) or not models:
        raise PlanError(
            "aphrodite_models must be a non-empty list of models, each with id and config "
            "(see the inventory contract in docs)"
        )
    requests = [model_request(entry, groups, inventory_dir, objective) for entry in models]
    wanted = []
    for req in requests:
        wanted.extend(h for h in req.hosts if h not in wanted)
    extra = [h for h in (groups.get(DEFAULT_HOSTS_GROUP) or []) if h not in wanted]
    hosts = {}
    notes: list = []
    cache = gathered or {}
    for name in wanted:
        hosts[name], host_notes = host_facts(name, hostvars, cache.get(name))
        notes.extend(host_notes)
    reported = []
    for name in extra:  # idle hosts are reported when their facts are usable
        try:
            hosts[name], host_notes = host_facts(name, hostvars, cache.get(name))
        except PlanError as exc:
            notes.append(f"{exc} (no model targets it, so it is left out of idle_gpus)")
            continue
        notes.extend(host_notes)
        reported.append(name)
    plan = plan_fleet(requests, hosts, tuple(reported))
    plan.notes[:0] = notes
    return plan
