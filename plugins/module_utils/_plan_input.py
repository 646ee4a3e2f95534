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
  ``kv_cache_dtype``, ``served_model_name``, ``name``, ``enforce_eager``, ``engine_args``
  (engine flags of the user's choosing, :mod:`._engine_args`, overlaid per flag on the
  fleet-wide ``aphrodite_engine_args``), and for the capacity model ``typical_sequence_tokens`` (prompt plus output of a typical request,
  default 2048) and ``min_concurrency`` (sequences a replica of the ``latency`` objective
  still runs at once, default 16).

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ._engine_args import EngineArgsError, resolve as resolve_engine_args
from ._capacity import DEFAULT_MIN_CONCURRENCY, DEFAULT_TYPICAL_SEQUENCE_TOKENS
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
    replica_slug,
)

DEFAULT_HOSTS_GROUP = "gpu_nodes"
MODEL_KEYS = frozenset((
    "id", "config", "quantization", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size",
    "hosts", "replicas", "objective", "kv_cache_dtype", "served_model_name", "name", "enforce_eager",
    "source", "revision", "engine_args", "typical_sequence_tokens", "min_concurrency",
))
# Integer keys that must be 1 or more.
POSITIVE_KEYS = ("max_model_len", "tensor_parallel_size", "replicas")


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
        if isinstance(value, bool):
            raise ValueError
        if kind is int:
            if float(value) != int(float(value)):
                raise ValueError
            number: Any = int(float(value))
        else:
            number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise PlanError(f"{key} of {model_id} in aphrodite_models must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if key in POSITIVE_KEYS and number < 1:
        raise PlanError(
            f"{key} of {model_id} in aphrodite_models is {value!r}; it must be a positive integer "
            f"(1 or more), or left out for the planner's choice"
        )
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def model_request(entry: Mapping[str, Any], groups: Mapping[str, Any], inventory_dir: str | None,
                  objective: str | None = None, fleet_engine_args: Any = None) -> ModelRequest:
    """Build a :class:`ModelRequest` from one ``aphrodite_models`` entry.

    ``fleet_engine_args`` is ``aphrodite_engine_args``; the entry's ``engine_args`` win per flag.
    """
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
    served = entry.get("served_model_name")
    if served is not None and served != "" and (isinstance(served, (bool, Mapping, list, tuple)) or not str(served).strip()):
        raise PlanError(
            f"served_model_name of {model_id} in aphrodite_models must be one name (a string), got {served!r}"
        )
    name = entry.get("name") or None
    try:
        resolved = resolve_engine_args(
            fleet_engine_args, entry.get("engine_args"), model_id, str(name) if name else replica_slug(model_id),
            inventory_dir, {"kv_cache_dtype": entry.get("kv_cache_dtype"), "served_model_name": served,
                            "enforce_eager": _bool(entry["enforce_eager"]) if entry.get("enforce_eager") not in (None, "") else None},
        )
    except EngineArgsError as exc:
        raise PlanError(str(exc))
    from_args = dict(resolved.request)
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
        kv_cache_dtype=str(entry.get("kv_cache_dtype") or from_args.get("kv_cache_dtype") or "auto"),
        served_model_name=str(served) if served not in (None, "") else None,
        name=name,
        enforce_eager=_bool(entry.get("enforce_eager", from_args.get("enforce_eager", False))),
        max_num_seqs=from_args.get("max_num_seqs"),
        engine_args=resolved.argv,
        engine_files=resolved.files,
        typical_sequence_tokens=_number(entry, "typical_sequence_tokens", model_id, int, DEFAULT_TYPICAL_SEQUENCE_TOKENS),
        min_concurrency=_number(entry, "min_concurrency", model_id, int, DEFAULT_MIN_CONCURRENCY),
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
                   objective: str | None = None, gathered: Mapping[str, Any] | None = None,
                   engine_args: Any = None) -> Plan:
    """Plan ``aphrodite_models`` against the inventory; the result's notes hold mismatches.

    ``gathered`` maps hostnames to ``aphrodite_gpus`` facts from a fact cache; they win
    over facts found in ``hostvars``. ``engine_args`` is the fleet-wide
    ``aphrodite_engine_args`` (each model's own ``engine_args`` win per flag).
    """
    if not isinstance(models, (list, tuple)) or not models:
        raise PlanError(
            "aphrodite_models must be a non-empty list of models, each with id and config "
            "(see the inventory contract in docs)"
        )
    requests = [model_request(entry, groups, inventory_dir, objective, engine_args) for entry in models]
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
