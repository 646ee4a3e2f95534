# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The fleet model: everything about the fleet that follows from the inventory and the plan, once.

The plan (``aphrodite_plan``) says which GPUs serve which model.  Everything else the roles
need about *other* hosts follows from it and from the inventory, and is computed here, in
one place, instead of in every role's Jinja:

- ``hosts``: every inventory host's private address (:func:`host_address`; the one place
  that decides it), the same address as written in ``host:port`` (``url_host``: IPv6 in
  brackets), its groups, and the ports its services listen on (:data:`PORTS`, each
  overridable per host by the variable in :data:`PORT_VARIABLES`); its replicas (those
  with a part on it) and ``sole_models``, the models every replica of which has a part on
  it (its maintenance would take them down);
- ``replicas``: per engine replica its served names (``--served-model-name`` else the model
  id, plus LoRA adapter names of ``--lora-modules``), endpoints (from the model's task),
  head address and port, HAProxy ``maxconn``, node ranks and master port;
- ``loadbalancers``: the load balancers (inventory order), the virtual IP, HAProxy's
  backends and route map and the fleet's ``GET /v1/models`` answer (from ``_edge``);
- ``monitoring``: Prometheus' scrape targets per job;
- ``logs``: where every host's journal goes (``receivers``: each monitoring host's
  systemd-journal-remote URL), which host holds the fleet CA that signs the log
  certificates (``ca_host``: the first load balancer, whose edge CA the haproxy role makes)
  and the names in each host's log certificate (``subject_alt_name``);
- ``link_tls``: the engine link's TLS (load balancers and Prometheus to each engine,
  :func:`link_tls`): on or off, where every host keeps its files, and the subject of each
  host's certificate from the engine link CA (kept beside the edge CA);
- ``plan``: the plan itself, unchanged.

``playbooks/fleet_model.yml`` (run by ``playbooks/preflight.yml``) publishes the result as
``hostvars['localhost'].aphrodite_fleet``; roles read their part of it from role defaults
and never compute an address, a port or a served name of another host themselves.

The firewall's openings are computed by the firewall role from this document (addresses,
groups, replicas) and its own host's settings (admin networks, SSH port), which are often
templated from that host's facts and so cannot be known here.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import _edge
from ._planner import DEFAULT_MASTER_PORT, DEFAULT_PORT

VERSION = 1

# Every port default of the collection's services, by service.  The roles' defaults name the
# same numbers (tests/unit/plugins/module_utils/test_fleet_model.py keeps them equal); the
# model reads a host's override from the variable in PORT_VARIABLES.
PORTS: Dict[str, int] = {
    "engine": DEFAULT_PORT,
    "engine_master": DEFAULT_MASTER_PORT,
    "haproxy_frontend": 443,
    "haproxy_peers": 10000,
    "haproxy_metrics": 8405,
    "node_exporter": 9100,
    "dcgm_exporter": 9400,
    "prometheus": 9090,
    "alertmanager": 9093,
    "alertmanager_cluster": 9094,
    "grafana": 3000,
    "nfs": 2049,
    "journal_remote": 19532,
}
# The inventory variable that overrides each port on a host (the owning role's public variable).
PORT_VARIABLES: Dict[str, str] = {
    "haproxy_frontend": "haproxy_frontend_port",
    "haproxy_peers": "haproxy_peers_port",
    "haproxy_metrics": "haproxy_metrics_port",
    "node_exporter": "monitoring_node_exporter_port",
    "dcgm_exporter": "monitoring_dcgm_exporter_port",
    "prometheus": "monitoring_prometheus_port",
    "alertmanager": "monitoring_alertmanager_port",
    "alertmanager_cluster": "monitoring_alertmanager_cluster_port",
    "grafana": "monitoring_grafana_port",
    "journal_remote": "logs_remote_port",
}
# Which services (and so which ports) a host has, by group; "all" is every host.
GROUP_SERVICES: Dict[str, Sequence[str]] = {
    "all": ("node_exporter",),
    "gpu_nodes": ("dcgm_exporter",),
    "loadbalancers": ("haproxy_frontend", "haproxy_peers", "haproxy_metrics"),
    "monitoring": ("prometheus", "alertmanager", "alertmanager_cluster", "grafana", "journal_remote"),
    "nfs_servers": ("nfs",),
}
ADDRESS_VARIABLES = ("aphrodite_bind_address", "ansible_host")
# Every per-host variable the model reads (filters copy only these out of hostvars).
HOST_VARIABLES = ADDRESS_VARIABLES + tuple(PORT_VARIABLES.values()) + ("monitoring_dcgm_enabled",)
LB_GROUP = "loadbalancers"
GPU_GROUP = "gpu_nodes"
MONITORING_GROUP = "monitoring"
# Where every host of the engine link keeps the engine link CA's certificate and its own
# certificate and key (HAProxy's naming: the key beside the PEM, ``<pem>.key``).
LINK_TLS_DIR = "/etc/aphrodite/link-tls"


class FleetModelError(ValueError):
    """The inventory or the plan cannot be turned into a fleet model; the message says what to change."""


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def host_address(host: str, variables: Optional[Mapping[str, Any]]) -> str:
    """The private address of ``host``: ``aphrodite_bind_address``, else ``ansible_host``, else
    the inventory name.  An empty (or blank) value counts as unset, everywhere."""
    for key in ADDRESS_VARIABLES:
        value = (variables or {}).get(key)
        if not _unset(value):
            return str(value).strip()
    return host


def url_host(address: str) -> str:
    """``address`` as the host part of ``host:port`` and URLs: an IPv6 address in brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _port(host: str, variables: Mapping[str, Any], service: str) -> int:
    variable = PORT_VARIABLES.get(service)
    value = variables.get(variable) if variable else None
    if _unset(value):
        return PORTS[service]
    try:
        port = int(str(value).strip())
    except ValueError:
        port = 0
    if isinstance(value, bool) or not 0 < port < 65536:
        raise FleetModelError(f"{variable} of {host} is {value!r}; a port is an integer 1-65535 "
                              f"(leave it unset for the default {PORTS[service]})")
    return port


def _truthy(value: Any, default: bool) -> bool:
    if _unset(value):
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def lora_names(argv: Sequence[Any]) -> List[str]:
    """Adapter names of ``--lora-modules`` values: ``name=path`` or JSON ``{"name": .., "path": ..}``."""
    names: List[str] = []
    for value in _edge.flag_values([str(a) for a in argv], "--lora-modules"):
        value = value.strip()
        if value.startswith("{"):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise FleetModelError(f"--lora-modules value {value!r} is not valid JSON; write "
                                      f"'{{\"name\": \"NAME\", \"path\": \"PATH\"}}' or NAME=PATH") from None
            name = parsed.get("name") if isinstance(parsed, Mapping) else None
        else:
            name = value.split("=", 1)[0] if "=" in value else None
        if _unset(name):
            raise FleetModelError(f"--lora-modules value {value!r} names no adapter; write NAME=PATH or "
                                  f"'{{\"name\": \"NAME\", \"path\": \"PATH\"}}'")
        if str(name) not in names:
            names.append(str(name))
    return names


def _maxconn(replica: Mapping[str, Any], argv: Sequence[str], model: str, default: int) -> int:
    """The replica's concurrency: the plan's ``max_num_seqs``, else ``--max-num-seqs``, else the default."""
    value: Any = replica.get("max_num_seqs")
    source = "max_num_seqs in the plan"
    if value is None:
        seqs = _edge.flag_values(argv, "--max-num-seqs")
        value, source = (seqs[0], "--max-num-seqs") if seqs else (default, "haproxy_server_maxconn")
    try:
        maxconn = int(str(value))
    except ValueError:
        maxconn = 0
    if isinstance(value, bool) or maxconn < 1:
        raise FleetModelError(f"replica {replica.get('name')} of {model} has {source} {value!r}; "
                              f"it must be a positive integer")
    return maxconn


def _replica(model: str, raw: Mapping[str, Any], hosts: Mapping[str, Mapping[str, Any]],
             default_maxconn: int, endpoint_overrides: Mapping[str, Any]) -> Dict[str, Any]:
    for key in ("name", "head", "port"):
        if key not in raw:
            raise FleetModelError(f"a replica of {model} in the plan has no {key}; re-run preflight (site.yml)")
    name, head = str(raw["name"]), str(raw["head"])
    argv = [str(a) for a in raw.get("argv") or []]
    port = raw["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise FleetModelError(f"replica {name} of {model} has port {port!r}; a port is an integer 1-65535")
    placement = raw.get("placement") or {head: []}
    nodes = []
    for rank, node in enumerate(placement):
        if node not in hosts:
            raise FleetModelError(f"the plan puts replica {name} on {node}, which is not in the inventory; "
                                  f"re-run preflight (site.yml) so the plan matches the inventory")
        nodes.append({"host": str(node), "address": hosts[node]["address"], "rank": rank,
                      "gpus": list(placement[node] or [])})
    if head not in hosts:
        raise FleetModelError(f"the plan puts a replica head on {head}, which is not in the inventory; "
                              f"re-run preflight (site.yml) so the plan matches the inventory")
    master = _edge.flag_values(argv, "--master-port")
    try:
        master_port = int(master[0]) if master else DEFAULT_MASTER_PORT
    except ValueError:
        raise FleetModelError(f"replica {name} of {model} has --master-port {master[0]!r}, not an integer") from None
    executor = _edge.flag_values(argv, "--distributed-executor-backend")
    served = _edge.served_names(model, argv)
    served += [n for n in lora_names(argv) if n not in served]
    try:
        endpoints = _edge.model_endpoints(model, argv, endpoint_overrides)
    except _edge.EdgeError as exc:
        raise FleetModelError(str(exc)) from None
    return {
        "name": name,
        "model": model,
        "served_names": served,
        "endpoints": endpoints,
        "head": head,
        "address": hosts[head]["address"],
        "url_host": hosts[head]["url_host"],
        "port": port,
        "maxconn": _maxconn(raw, argv, model, default_maxconn),
        "nnodes": len(nodes),
        "master_port": master_port if len(nodes) > 1 else None,
        "executor": executor[0] if executor else None,
        "nodes": nodes,
    }


def _group_members(groups: Mapping[str, Any], hosts: Sequence[str]) -> Dict[str, List[str]]:
    members = {str(name): [str(h) for h in (listed or [])] for name, listed in groups.items()}
    members.setdefault("all", list(hosts))
    return members


def _targets(hosts: Mapping[str, Mapping[str, Any]], names: Sequence[str], service: str) -> List[Dict[str, Any]]:
    return [{"targets": [f"{hosts[h]['url_host']}:{hosts[h]['ports'][service]}"], "labels": {"instance": h}}
            for h in sorted(names) if service in hosts[h]["ports"]]


def monitoring_targets(hosts: Mapping[str, Mapping[str, Any]], members: Mapping[str, Sequence[str]],
                       replicas: Sequence[Mapping[str, Any]], dcgm_hosts: Sequence[str]) -> Dict[str, list]:
    """Prometheus file_sd target groups per job (every job the monitoring role scrapes)."""
    return {
        "node": _targets(hosts, list(hosts), "node_exporter"),
        "dcgm": _targets(hosts, dcgm_hosts, "dcgm_exporter"),
        "aphrodite-engine": [
            {"targets": [f"{r['url_host']}:{r['port']}"],
             "labels": {"instance": f"{r['head']}:{r['port']}", "replica": r["name"], "model": r["model"],
                        "host": r["head"]}}
            for r in replicas],
        "haproxy": _targets(hosts, members.get(LB_GROUP, []), "haproxy_metrics"),
        "tls": _targets(hosts, members.get(LB_GROUP, []), "haproxy_frontend"),
        "alertmanager": _targets(hosts, members.get(MONITORING_GROUP, []), "alertmanager"),
    }


def subject_alt_name(host: str, address: str) -> List[str]:
    """A host's certificate names: its inventory name, and its private address as an IP
    address, or as a DNS name where the inventory gives a name instead of an address."""
    try:
        ipaddress.ip_address(address)
        address_san = f"IP:{address}"
    except ValueError:
        address_san = f"DNS:{address}"
    return list(dict.fromkeys([f"DNS:{host}", address_san]))


def log_receivers(hosts: Mapping[str, Mapping[str, Any]], members: Mapping[str, Sequence[str]]) -> Dict[str, Any]:
    """Where journals go: every monitoring host's systemd-journal-remote (HTTPS), the host
    of the fleet CA (the first load balancer; ``None`` without one) that signs both ends,
    and the names in each host's log certificate (``subject_alt_name``; none without receivers)."""
    receivers = [{"host": h, "address": hosts[h]["address"], "port": hosts[h]["ports"]["journal_remote"],
                  "url": f"https://{hosts[h]['url_host']}:{hosts[h]['ports']['journal_remote']}"}
                 for h in members.get(MONITORING_GROUP, []) if h in hosts and "journal_remote" in hosts[h]["ports"]]
    ca_hosts = [h for h in members.get(LB_GROUP, []) if h in hosts]
    names = {h: subject_alt_name(h, hosts[h]["address"]) for h in sorted(hosts)} if receivers else {}
    return {"receivers": receivers, "ca_host": ca_hosts[0] if ca_hosts else None, "subject_alt_name": names}


def link_tls(hosts: Mapping[str, Mapping[str, Any]], members: Mapping[str, Sequence[str]], enabled: bool) -> Dict[str, Any]:
    """The engine link's TLS: every engine serves TLS with a certificate of the engine link CA and
    requires a client certificate of that CA, which the load balancers and the monitoring
    hosts hold.  That CA lives beside the edge CA on the first load balancer and is kept
    like it, so a fleet without load balancers runs the link off.  Engines trust it alone:
    a certificate of the edge CA (the central logs' are) opens no engine port.

    Per host of the link: the subject of its certificate (common name: the inventory name;
    alternative names: that name and the private address) and its uses (engines are servers
    and, for their own container health check, clients).  ``ca_host`` signs them: the first
    load balancer, which keeps both CAs' keys (the haproxy role).
    """
    lbs = set(members.get(LB_GROUP, []))
    ca_host = next((h for h in members.get(LB_GROUP, []) if h in hosts), None)
    engines = set(members.get(GPU_GROUP, []))
    on = enabled and bool(lbs & set(hosts))
    linked: Dict[str, Dict[str, Any]] = {}
    for host in sorted(set(hosts) & (lbs | engines | set(members.get(MONITORING_GROUP, [])))):
        linked[host] = {"common_name": host, "subject_alt_name": subject_alt_name(host, hosts[host]["address"]),
                        "extended_key_usage": (["serverAuth", "clientAuth"] if host in engines else ["clientAuth"])}
    return {
        "enabled": on,
        "ca_host": ca_host if on else None,
        "scheme": "https" if on else "http",
        "dir": LINK_TLS_DIR,
        "ca_file": f"{LINK_TLS_DIR}/ca.crt",
        "cert_file": f"{LINK_TLS_DIR}/link.pem",
        "key_file": f"{LINK_TLS_DIR}/link.pem.key",
        "hosts": linked if on else {},
    }


def fleet_model(plan: Optional[Mapping[str, Any]], hostvars: Mapping[str, Mapping[str, Any]],
                groups: Mapping[str, Any], settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The fleet model (module docstring) of ``plan`` on the inventory.

    ``hostvars`` maps every inventory host to (at least) the variables of :data:`HOST_VARIABLES`
    it sets; ``groups`` is the inventory's groups.  ``settings``: ``vip`` (the virtual IP,
    ``""`` for none), ``server_maxconn`` (HAProxy's per-server limit where the plan gives no
    ``max_num_seqs``), ``model_endpoints`` (model id -> endpoints, where the engine's arguments
    do not tell).  The result depends on the whole inventory, never on a run's ``--limit``.
    """
    settings = settings or {}
    plan = plan if plan else {"deployments": [], "idle_gpus": {}}
    if not isinstance(plan, Mapping) or not isinstance(plan.get("deployments"), list):
        raise FleetModelError("the plan must be a mapping with a list of deployments "
                              "(hostvars['localhost'].aphrodite_plan, published by playbooks/preflight.yml)")
    default_maxconn = settings.get("server_maxconn", _edge.DEFAULT_MAXCONN)
    if not isinstance(default_maxconn, int) or isinstance(default_maxconn, bool) or default_maxconn < 1:
        raise FleetModelError(f"haproxy_server_maxconn must be a positive integer, got {default_maxconn!r}")
    names = sorted({str(h) for listed in groups.values() for h in (listed or [])} | {str(h) for h in hostvars})
    members = _group_members(groups, names)

    hosts: Dict[str, Dict[str, Any]] = {}
    for host in names:
        variables = hostvars.get(host) or {}
        address = host_address(host, variables)
        in_groups = sorted(g for g, listed in members.items() if host in listed and g not in ("all", "ungrouped"))
        services = [s for g in ["all"] + in_groups for s in GROUP_SERVICES.get(g, ())]
        hosts[host] = {"address": address, "url_host": url_host(address), "groups": in_groups,
                       "ports": {s: _port(host, variables, s) for s in dict.fromkeys(services)}}

    overrides = dict(settings.get("model_endpoints") or {})
    replicas = []
    for index, deployment in enumerate(plan["deployments"]):
        if not isinstance(deployment, Mapping) or not deployment.get("model"):
            raise FleetModelError(f"deployment {index} of the plan has no model id")
        for raw in deployment.get("replicas") or []:
            replicas.append(_replica(str(deployment["model"]), raw, hosts, default_maxconn, overrides))
    # Each host's replicas (by name, in plan order): those a change of the host takes out of the pool;
    # and the models it takes down with them: those every replica of which has a part on it.
    for host in hosts.values():
        host["replicas"] = []
        host["sole_models"] = []
    for replica in replicas:
        for node in replica["nodes"]:
            hosts[node["host"]]["replicas"].append(replica["name"])
    shared: Dict[str, set] = {}
    for replica in replicas:
        on = {node["host"] for node in replica["nodes"]}
        shared[replica["model"]] = shared.get(replica["model"], on) & on
    for model, names in shared.items():
        for name in sorted(names):
            hosts[name]["sole_models"].append(model)
    try:
        backends = _edge.backends(plan, replicas, overrides)
        routes = _edge.routes(backends)
    except _edge.EdgeError as exc:
        raise FleetModelError(str(exc)) from None

    dcgm_hosts = [h for h in members.get(GPU_GROUP, []) if h in hosts
                  and _truthy((hostvars.get(h) or {}).get("monitoring_dcgm_enabled"), True)]
    vip = settings.get("vip") or ""
    return {
        "version": VERSION,
        "hosts": hosts,
        "replicas": replicas,
        "loadbalancers": {
            "group": LB_GROUP,
            "vip": str(vip),
            "members": [{"host": h, "address": hosts[h]["address"]} for h in members.get(LB_GROUP, []) if h in hosts],
            "backends": backends,
            "routes": routes,
            "models": _edge.model_list(backends),
        },
        "monitoring": {"targets": monitoring_targets(hosts, members, replicas, dcgm_hosts)},
        "logs": log_receivers(hosts, members),
        "link_tls": link_tls(hosts, members, _truthy(settings.get("engine_tls"), True)),
        "plan": dict(plan),
    }


# Settings of the load balancers' group that the model reads from its first host, and the
# variables that carry them (the virtual IP: the first that is set).
LB_SETTINGS = {"server_maxconn": ("haproxy_server_maxconn",), "model_endpoints": ("haproxy_model_endpoints",),
               "vip": ("aphrodite_vip", "haproxy_virtual_ipaddress", "keepalived_virtual_ipaddress"),
               "engine_tls": ("aphrodite_engine_tls",)}


def _lookup(variables: Any, key: str) -> Any:
    try:
        return variables[key]
    except (KeyError, TypeError):
        return None


def from_hostvars(plan: Optional[Mapping[str, Any]], hostvars: Any, groups: Mapping[str, Any],
                  settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """:func:`fleet_model` on an inventory's hostvars (Ansible's, or any mapping of host -> variables).

    Reads only :data:`HOST_VARIABLES` of each host and :data:`LB_SETTINGS` of the first load
    balancer, so unrelated variables (secrets, facts) are never templated.  The fleet_model
    filter and ``aphrodite-deploy plan`` both call this.
    """
    hosts = sorted({str(h) for members in groups.values() for h in (members or [])})
    variables: Dict[str, Dict[str, Any]] = {}
    for host in hosts:
        try:
            host_vars = hostvars[host]
        except KeyError:
            host_vars = {}
        variables[host] = {k: v for k in HOST_VARIABLES if (v := _lookup(host_vars, k)) is not None}
    chosen: Dict[str, Any] = {}
    first_lb = next(iter(groups.get(LB_GROUP) or []), None)
    if first_lb is not None:
        lb_vars = hostvars[first_lb]
        for name, keys in LB_SETTINGS.items():
            for key in keys:
                value = _lookup(lb_vars, key)
                if value not in (None, ""):
                    chosen[name] = value
                    break
    chosen.update(dict(settings or {}))
    if "server_maxconn" in chosen:
        try:
            chosen["server_maxconn"] = int(chosen["server_maxconn"])
        except (TypeError, ValueError):
            raise FleetModelError(f"haproxy_server_maxconn must be a positive integer, got {chosen['server_maxconn']!r}") from None
    return fleet_model(plan or None, variables, dict(groups), chosen)
