# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The edge's data: HAProxy backends from the engine plan, API-key map entries, VRRP wiring.

Everything HAProxy and keepalived are told comes from here, so the roles' templates only
print what these functions decided:

- :func:`backends` groups the fleet model's replicas (``_fleet_model``) into one backend
  per model of the plan, every replica head a server, with the endpoints ("pools") each
  model serves;
- :func:`routes` lists the ``<endpoint>:<model>`` keys HAProxy looks the request's JSON
  ``model`` field up in, plus a fallback per endpoint that exactly one backend serves;
- :func:`api_key_entries` validates the client keys and returns only their SHA-256 hashes;
- :func:`vrrp_interface` finds the interface and prefix that carry an address.

Pure Python: no Ansible imports. Messages never contain a key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, Mapping, Sequence

# Endpoints whose requests carry an OpenAI ``model`` field and go to an engine.
MODEL_ENDPOINTS = ("chat", "completions", "embeddings")
GENERATIVE_ENDPOINTS = ("chat", "completions")
POOLING_ENDPOINTS = ("embeddings",)
# Engine arguments that make a replica a pooling (embedding) model.
_POOLING_ARGS = {
    "--task": {"embed", "embedding", "score", "classify", "reward"},
    "--runner": {"pooling"},
    "--convert": {"embed", "classify", "reward"},
}
DEFAULT_MAXCONN = 256
# Limits per key, each over a fixed window (calendar month in UTC for the months):
# requests, and tokens the engines reported (usage); requests_per_minute is also spelled
# rate_limit.  In this order after role, requests per minute and name in the key map.
LIMIT_NAMES = ("requests_per_minute", "requests_per_hour", "requests_per_day", "requests_per_month",
               "tokens_per_hour", "tokens_per_month")
MIN_KEY_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
_ROLE = re.compile(r"^[a-z][a-z0-9_-]*$")


class EdgeError(ValueError):
    """The plan, the key list or the host facts cannot be turned into edge configuration."""


def flag_values(argv: list, flag: str) -> list:
    """Values of ``flag`` in an engine argv (``--flag a b`` and ``--flag=a``), last occurrence wins."""
    values: list = []
    for index, arg in enumerate(argv):
        arg = str(arg)
        if arg == flag:
            values = []
            for value in argv[index + 1:]:
                value = str(value)
                if value.startswith("--"):
                    break
                values.append(value)
        elif arg.startswith(flag + "="):
            values = [arg.split("=", 1)[1]]
    return values


def slug(text: str) -> str:
    """A HAProxy-safe lower-case name: ``meta-llama/Llama-3.1-8B`` -> ``llama-3-1-8b``."""
    tail = text.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-") or "model"


def served_names(model: str, argv: list) -> list:
    """Names the engine answers to: ``--served-model-name`` values, else the model id (LoRA
    adapters come on top: ``_fleet_model.lora_names``)."""
    names = flag_values(argv, "--served-model-name")
    return names or [model]


def model_endpoints(model: str, argv: list, overrides: Mapping[str, Any] | None = None) -> list:
    """Endpoints a deployment serves: an override, else by the engine's task (pooling or generation)."""
    if overrides and model in overrides:
        chosen = overrides[model]
        if isinstance(chosen, str) or not isinstance(chosen, (list, tuple)) or not chosen:
            raise EdgeError(f"haproxy_model_endpoints[{model!r}] must be a non-empty list drawn from "
                            f"{', '.join(MODEL_ENDPOINTS)}; got {chosen!r}")
        unknown = [e for e in chosen if e not in MODEL_ENDPOINTS]
        if unknown:
            raise EdgeError(f"haproxy_model_endpoints[{model!r}] names {', '.join(map(str, unknown))}; "
                            f"the endpoints routed by model are {', '.join(MODEL_ENDPOINTS)}")
        return list(dict.fromkeys(chosen))
    for flag, pooling_values in _POOLING_ARGS.items():
        if set(flag_values(argv, flag)) & pooling_values:
            return list(POOLING_ENDPOINTS)
    return list(GENERATIVE_ENDPOINTS)


def backends(plan: Any, replicas: Sequence[Mapping[str, Any]],
             endpoint_overrides: Mapping[str, Any] | None = None) -> list:
    """One backend per model of the plan, each replica head a server.

    ``replicas`` are the fleet model's replicas (``_fleet_model``), in plan order: each has
    ``name, model, served_names, endpoints, head, address, port, maxconn``; nothing here
    works out an address, a name or a limit again.  Returns a list of
    ``{name, model, served_names, endpoints, servers}`` where each server is
    ``{name, host, address, url_host, port, maxconn}``.
    """
    if not isinstance(plan, Mapping) or not isinstance(plan.get("deployments"), list):
        raise EdgeError("the plan must be a mapping with a list of deployments "
                        "(hostvars['localhost'].aphrodite_plan, published by playbooks/preflight.yml)")
    result: list = []
    taken_names: set = set()
    server_names: dict = {}
    model_of_name: dict = {}
    remaining = list(replicas)
    for index, deployment in enumerate(plan["deployments"]):
        if not isinstance(deployment, Mapping) or not deployment.get("model"):
            raise EdgeError(f"deployment {index} of the plan has no model id")
        model = str(deployment["model"])
        base = "be_" + slug(model)
        name, suffix = base, 2
        while name in taken_names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        taken_names.add(name)
        count = len(deployment.get("replicas") or [])
        mine, remaining = remaining[:count], remaining[count:]
        servers: list = []
        names: list = []
        endpoints: list = []
        for replica in mine:
            server = str(replica["name"])
            if server in server_names:
                raise EdgeError(f"replica name {server} appears twice in the plan "
                                f"({server_names[server]} and {model}); replica names must be unique")
            server_names[server] = model
            servers.append({"name": server, "host": str(replica["head"]), "address": str(replica["address"]),
                            "url_host": str(replica.get("url_host") or replica["address"]),
                            "port": replica["port"], "maxconn": replica["maxconn"]})
            names += [n for n in replica["served_names"] if n not in names]
            endpoints += [e for e in replica["endpoints"] if e not in endpoints]
        if not names:
            names = [model]
        if not endpoints:
            endpoints = model_endpoints(model, [], endpoint_overrides)
        for served in names:
            if served in model_of_name and model_of_name[served] != model:
                raise EdgeError(f"model name {served} is served by both {model_of_name[served]} and {model}; "
                                f"give one of them another --served-model-name")
            model_of_name[served] = model
        result.append({"name": name, "model": model, "served_names": names,
                       "endpoints": endpoints, "servers": servers})
    return result


def routes(backend_list: list) -> list:
    """``[key, backend]`` pairs for HAProxy's route map.

    ``<endpoint>:<served name>`` for every name a backend answers to on every endpoint it
    serves, then ``<endpoint>`` alone when exactly one backend serves that endpoint: a request
    whose ``model`` field the edge cannot read (absent, or beyond the buffered part of a very
    large body) still reaches the only model that can answer it.
    """
    pairs: list = []
    per_endpoint: dict = {}
    for backend in backend_list:
        for endpoint in backend["endpoints"]:
            per_endpoint.setdefault(endpoint, []).append(backend["name"])
            for served in backend["served_names"]:
                if any(ch.isspace() for ch in served):
                    raise EdgeError(f"model name {served!r} contains white space, which HAProxy maps cannot hold")
                pairs.append([f"{endpoint}:{served}", backend["name"]])
    for endpoint in MODEL_ENDPOINTS:
        owners = per_endpoint.get(endpoint, [])
        if len(owners) == 1:
            pairs.append([endpoint, owners[0]])
    return pairs


def model_list(backend_list: list) -> dict:
    """The OpenAI ``GET /v1/models`` answer for the whole fleet (the edge serves it itself)."""
    data = []
    for backend in backend_list:
        for served in backend["served_names"]:
            data.append({"id": served, "object": "model", "created": 0, "owned_by": "aphrodite",
                         "root": backend["model"]})
    return {"object": "list", "data": data}


def key_hash(key: str) -> str:
    """What HAProxy computes with ``http_auth_bearer,sha2(256),hex``: upper-case hex SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest().upper()


def validate_roles(roles: Any, endpoints: Any) -> dict:
    """Check ``haproxy_api_roles`` against the endpoint catalogue; returns it normalised."""
    if not isinstance(roles, Mapping) or not roles:
        raise EdgeError("haproxy_api_roles must map each role name to {endpoints: [...], rate_limit: N}")
    known = list(endpoints)
    result: dict = {}
    for role, spec in roles.items():
        role = str(role)
        if not _ROLE.match(role):
            raise EdgeError(f"role name {role!r} must be lower-case letters, digits, '-' or '_'")
        if not isinstance(spec, Mapping):
            raise EdgeError(f"haproxy_api_roles.{role} must be a mapping with endpoints and rate_limit")
        allowed = spec.get("endpoints")
        if allowed == "*" or allowed == ["*"]:
            allowed = list(known)
        if not isinstance(allowed, (list, tuple)) or not allowed:
            raise EdgeError(f"haproxy_api_roles.{role}.endpoints must be a non-empty list (or '*') of "
                            f"{', '.join(known)}")
        unknown = [str(e) for e in allowed if e not in known]
        if unknown:
            raise EdgeError(f"haproxy_api_roles.{role}.endpoints names {', '.join(unknown)}; "
                            f"the edge knows {', '.join(known)}")
        limits = _limits(f"haproxy_api_roles.{role}", spec, dict.fromkeys(LIMIT_NAMES, 0))
        result[role] = {"endpoints": list(dict.fromkeys(allowed)), "rate_limit": limits["requests_per_minute"],
                        "limits": limits}
    return result


def _limits(label: str, spec: Mapping[str, Any], defaults: Mapping[str, int]) -> dict:
    """``defaults`` overridden by ``spec.limits`` and ``spec.rate_limit`` (requests per minute), checked."""
    chosen = dict(defaults)
    given = spec.get("limits", {})
    if not isinstance(given, Mapping):
        raise EdgeError(f"{label}.limits must be a mapping of {', '.join(LIMIT_NAMES)} to integers >= 0")
    unknown = sorted(str(name) for name in given if name not in LIMIT_NAMES)
    if unknown:
        raise EdgeError(f"{label}.limits names {', '.join(unknown)}; the limits are {', '.join(LIMIT_NAMES)}")
    if "rate_limit" in spec and "requests_per_minute" in given:
        raise EdgeError(f"{label} sets both rate_limit and limits.requests_per_minute; keep one")
    chosen.update(given)
    if "rate_limit" in spec:
        chosen["requests_per_minute"] = spec["rate_limit"]
    for name in LIMIT_NAMES:
        value = chosen[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            shown = "rate_limit" if name == "requests_per_minute" and "rate_limit" in spec else f"limits.{name}"
            raise EdgeError(f"{label}.{shown} must be an integer >= 0 ({name.replace('_', ' ')} per key, "
                            f"0: unlimited); got {value!r}")
    return chosen


def api_key_entries(keys: Any, roles: Mapping[str, Any]) -> list:
    """``{hash, role, rate_limit, limits, name}`` per client key; the key itself is never returned.

    A key's ``limits`` (and ``rate_limit``, requests per minute) override its role's, one by one.
    """
    if not isinstance(keys, (list, tuple)):
        raise EdgeError("haproxy_api_keys must be a list of {name, key, role[, rate_limit]}")
    entries: list = []
    names: set = set()
    hashes: dict = {}
    for index, item in enumerate(keys):
        if not isinstance(item, Mapping):
            raise EdgeError(f"haproxy_api_keys[{index}] must be a mapping with name, key and role")
        name = item.get("name")
        label = f"haproxy_api_keys[{index}]" if not name else f"API key {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise EdgeError(f"{label} needs a name of letters, digits, '.', '_', '@' or '-' (it is logged "
                            f"instead of the key)")
        if name in names:
            raise EdgeError(f"two API keys are named {name!r}; names identify keys in logs and must be unique")
        names.add(name)
        key = item.get("key")
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or any(ch.isspace() for ch in key):
            raise EdgeError(f"{label} must have a key of at least {MIN_KEY_LENGTH} characters without white "
                            f"space; generate one with `openssl rand -hex 32` and keep it in ansible-vault")
        role = item.get("role")
        if role not in roles:
            raise EdgeError(f"{label} has role {role!r}; the roles are {', '.join(sorted(roles))} "
                            f"(haproxy_api_roles)")
        # Roles validated before limits existed carry rate_limit only.
        role_limits = roles[role].get("limits") or {
            **dict.fromkeys(LIMIT_NAMES, 0), "requests_per_minute": roles[role]["rate_limit"]}
        limits = _limits(label, item, role_limits)
        digest = key_hash(key)
        if digest in hashes:
            raise EdgeError(f"API keys {hashes[digest]!r} and {name!r} are the same key; give each client its own")
        hashes[digest] = name
        entries.append({"hash": digest, "role": role, "rate_limit": limits["requests_per_minute"],
                        "limits": limits, "name": name})
    return entries


def vrrp_interface(facts: Mapping[str, Any], address: str) -> dict:
    """``{interface, prefix}`` of the interface that carries ``address``, from gathered facts."""
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        raise EdgeError(f"VRRP needs IP addresses; {address!r} is not one (set aphrodite_bind_address or "
                        f"ansible_host to the load balancer's private IP)") from None
    for name in facts.get("interfaces") or []:
        info = facts.get(str(name)) or facts.get(re.sub(r"[^A-Za-z0-9_]", "_", str(name))) or {}
        candidates = []
        if isinstance(info.get("ipv4"), Mapping):
            candidates.append(info["ipv4"])
        candidates += [c for c in info.get("ipv4_secondaries") or [] if isinstance(c, Mapping)]
        for candidate in candidates:
            if candidate.get("address") == str(wanted):
                prefix = candidate.get("prefix")
                if prefix is None and candidate.get("netmask"):
                    prefix = ipaddress.ip_network(f"0.0.0.0/{candidate['netmask']}").prefixlen
                return {"interface": str(info.get("device") or name), "prefix": int(prefix or 32)}
    raise EdgeError(f"no interface of this host carries {address}; set keepalived_interface and "
                    f"keepalived_virtual_prefix, or fix the load balancer's address")
