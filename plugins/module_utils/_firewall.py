# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The host firewall's openings, computed from the inventory's topology.

Every host opens exactly what its place in the topology needs:

- built in: SSH from the admin networks; the engine ports of a GPU node (from the fleet
  plan) from the load balancers; the master port and the NCCL/Gloo (or Ray) ports of a
  multi-node replica among the nodes of that replica only;
- declared: openings other roles need (HAProxy frontend and peers, VRRP, NFS, metrics),
  written as data in the format ``parse_declarations`` checks, so that a role adding a
  service never edits the firewall.

``host_openings`` returns plain data (one dict per opening); ``nft_rules`` renders it as
nftables statements for the ``input`` chain and for the ``published`` chain that filters
ports Docker publishes (DNAT-ed traffic, which never passes the input hook).

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


PORT_PROTOCOLS = ("tcp", "udp", "sctp")
# IP protocols without ports that a declaration may open (nft knows these names).
PORTLESS_PROTOCOLS = ("vrrp", "gre", "esp", "ah", "ospf", "pim", "igmp")
NETWORK_KEYWORDS = ("admin", "clients")
DECLARATION_KEYS = frozenset(("name", "description", "hosts", "proto", "port", "from"))
FROM_KEYS = frozenset(("groups", "peers", "networks"))
# Ray's defaults (ray start): GCS on the head, worker processes in a fixed range.
RAY_GCS_PORT = 6379
RAY_WORKER_PORTS = (10002, 19999)
ENGINE_CLIENT_GROUP = "loadbalancers"
ENGINE_GROUP = "gpu_nodes"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")


class FirewallError(ValueError):
    """The inventory or a declaration cannot be turned into rules; the message says what to change."""


# --------------------------------------------------------------------------- ports


def parse_ports(value: Any, what: str) -> List[Tuple[int, int]]:
    """``443``, ``"32768-60999"`` or a list of them -> merged ``(low, high)`` intervals."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise FirewallError(f"{what}: no port given; write a port (443), a range (\"32768-60999\") or a list of them")
    intervals = []
    for item in items:
        if isinstance(item, bool):
            raise FirewallError(f"{what}: {item!r} is not a port")
        if isinstance(item, int):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*", item):
            low = high = int(item)
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            low, high = (int(part) for part in item.split("-"))
        else:
            raise FirewallError(f"{what}: {item!r} is not a port; write a port (443), a range (\"32768-60999\") "
                                "or a list of them")
        if not 1 <= low <= high <= 65535:
            raise FirewallError(f"{what}: {item!r} is outside 1-65535 or its range runs backwards")
        intervals.append((low, high))
    return _merge(intervals)


def _merge(intervals: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
    merged: List[Tuple[int, int]] = []
    for low, high in sorted(intervals):
        # Overlaps only: neighbouring ports stay separate (2242, 2243 reads better than 2242-2243).
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def format_ports(intervals: Iterable[Tuple[int, int]]) -> List[str]:
    return [str(low) if low == high else f"{low}-{high}" for low, high in intervals]


# --------------------------------------------------------------------------- addresses


def parse_networks(values: Any, what: str) -> List[Any]:
    """CIDRs or bare addresses (IPv4 or IPv6) -> ip_network objects; host bits must be zero."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise FirewallError(f"{what} must be a list of networks, for example [\"10.20.0.0/24\"], got {values!r}")
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(str(value).strip(), strict=False)
            except ValueError:
                raise FirewallError(f"{what}: {value!r} is not an IPv4 or IPv6 network; "
                                    "write a CIDR such as 10.20.0.0/24 or an address such as 10.20.0.5") from None
            address = str(value).strip().split("/", maxsplit=1)[0]
            raise FirewallError(f"{what}: {value!r} has host bits set; write {loose} for the whole network "
                                f"or {address} for the one address") from None
    return networks


def host_ip(host: str, address: str) -> Any:
    """The fleet model's address of ``host`` as an IP address; the firewall cannot use a name."""
    try:
        return ipaddress.ip_address(str(address).strip())
    except ValueError:
        raise FirewallError(
            f"the firewall needs the private IP address of {host}, but its address (aphrodite_bind_address, "
            f"else ansible_host, else its inventory name) is {address!r}; set aphrodite_bind_address of "
            f"{host} to the address the other hosts reach it at"
        ) from None


def _sources(networks: Iterable[Any]) -> Dict[str, List[str]]:
    """Networks per family without those inside another (nft refuses overlapping set elements),
    sorted, written as nft prints them (a /32 or /128 as a bare address). Neighbours are not
    merged, so hosts stay recognisable (10.0.1.2 and 10.0.1.3, not 10.0.1.2/31)."""
    result: Dict[str, List[str]] = {"ipv4": [], "ipv6": []}
    for family, version in (("ipv4", 4), ("ipv6", 6)):
        kept: List[Any] = []
        for net in sorted({n for n in networks if n.version == version}, key=lambda n: (n.prefixlen, n)):
            if not any(net.subnet_of(wider) for wider in kept):
                kept.append(net)
        for net in sorted(kept):
            result[family].append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
    return result


def _is_everywhere(family_sources: Sequence[str]) -> bool:
    return list(family_sources) in (["0.0.0.0/0"], ["::/0"])


# --------------------------------------------------------------------------- declarations


def parse_declarations(entries: Any, origin: str) -> List[Dict[str, Any]]:
    """Check declared openings (the data format of ``roles/<role>/meta/firewall.yml``).

    Each entry::

        name: haproxy-peers          # unique; shown as the rule's comment
        description: ...             # optional
        hosts: loadbalancers         # group(s) whose hosts open the port ("all" for every host)
        proto: tcp                   # tcp, udp, sctp, or a port-less protocol such as vrrp
        port: 443                    # or "a-b", a list, {var: NAME, default: 443}, or {plan: engine}
        from:                        # who may connect; the union of:
          groups: [monitoring]       #   hosts of these groups, by their private address
          peers: true                #   the other hosts of `hosts`
          networks: [clients]        #   CIDRs, or admin / clients (firewall_admin_networks / _client_networks)
    """
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise FirewallError(f"{origin}: openings must be a list of declarations, got {type(entries).__name__}")
    result = []
    for index, entry in enumerate(entries):
        where = f"{origin}, opening {index + 1}"
        if not isinstance(entry, Mapping):
            raise FirewallError(f"{where}: must be a mapping with name, hosts, proto, port and from")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise FirewallError(f"{where}: name {name!r} must be a short lower-case word such as haproxy-peers")
        where = f"{origin}, opening {name}"
        unknown = sorted(set(entry) - DECLARATION_KEYS)
        if unknown:
            raise FirewallError(f"{where}: unknown keys {unknown}; allowed are {sorted(DECLARATION_KEYS)}")
        hosts = entry.get("hosts")
        hosts = [hosts] if isinstance(hosts, str) else hosts
        if not hosts or not isinstance(hosts, (list, tuple)) or not all(isinstance(h, str) for h in hosts):
            raise FirewallError(f"{where}: hosts must name the group(s) whose hosts open the port, e.g. loadbalancers")
        proto = str(entry.get("proto", "tcp")).lower()
        if proto not in PORT_PROTOCOLS + PORTLESS_PROTOCOLS:
            raise FirewallError(f"{where}: proto {proto!r} is not one of {', '.join(PORT_PROTOCOLS + PORTLESS_PROTOCOLS)}")
        port = entry.get("port")
        if proto in PORT_PROTOCOLS:
            port = _check_port_spec(port, where)
        elif port is not None:
            raise FirewallError(f"{where}: {proto} has no ports; leave port out")
        sources = entry.get("from")
        if not isinstance(sources, Mapping) or not sources:
            raise FirewallError(f"{where}: from must say who may connect (groups, peers and/or networks)")
        unknown = sorted(set(sources) - FROM_KEYS)
        if unknown:
            raise FirewallError(f"{where}: unknown keys in from: {unknown}; allowed are {sorted(FROM_KEYS)}")
        groups = sources.get("groups") or []
        groups = [groups] if isinstance(groups, str) else list(groups)
        networks = sources.get("networks") or []
        networks = [networks] if isinstance(networks, str) else list(networks)
        for network in networks:
            if str(network) not in NETWORK_KEYWORDS:
                parse_networks([network], f"{where}, from.networks")
        peers = sources.get("peers", False)
        if not isinstance(peers, bool):
            raise FirewallError(f"{where}: from.peers must be true or false")
        result.append({
            "name": name,
            "description": str(entry.get("description", "")).strip(),
            "hosts": list(hosts),
            "proto": proto,
            "port": port,
            "from": {"groups": [str(g) for g in groups], "peers": peers, "networks": [str(n) for n in networks]},
            "origin": origin,
        })
    return result


def _check_port_spec(port: Any, where: str) -> Any:
    if isinstance(port, Mapping):
        if set(port) == {"plan"} and port["plan"] == "engine":
            return {"plan": "engine"}
        if "var" in port and set(port) <= {"var", "default"}:
            if not isinstance(port["var"], str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", port["var"]):
                raise FirewallError(f"{where}: port.var must be a variable name, got {port['var']!r}")
            if "default" not in port:
                raise FirewallError(f"{where}: port.var {port['var']} needs the owning role's default as port.default, "
                                    "so the firewall is right when that role is not in the play")
            parse_ports(port["default"], f"{where}, port.default")
            return {"var": port["var"], "default": port["default"]}
        raise FirewallError(f"{where}: port must be a port, a range, a list, {{var: NAME, default: PORT}} "
                            f"or {{plan: engine}}, got {dict(port)!r}")
    parse_ports(port, f"{where}, port")
    return port


def merge_declarations(fallbacks: Sequence[Mapping[str, Any]], by_role: Mapping[str, Any],
                       extra: Any) -> List[Dict[str, Any]]:
    """The declarations in force: each role's ``meta/firewall.yml``, the firewall's fallbacks
    that no role declares under the same name (yet), then the inventory's
    ``firewall_extra_openings``. Names are unique among roles and the inventory.

    ``by_role`` maps a role name to the content of its ``meta/firewall.yml``
    (``{"openings": [...]}``).
    """
    declarations = []
    for role in sorted(by_role):
        content = by_role[role] or {}
        if not isinstance(content, Mapping) or set(content) - {"openings"}:
            raise FirewallError(f"roles/{role}/meta/firewall.yml must hold one key, openings: a list of declarations")
        declarations += parse_declarations(content.get("openings"), f"roles/{role}/meta/firewall.yml")
    declarations += parse_declarations(extra, "firewall_extra_openings")
    seen: Dict[str, str] = {}
    for declaration in declarations:
        if declaration["name"] in seen:
            raise FirewallError(f"opening {declaration['name']} is declared twice, by {seen[declaration['name']]} and by "
                                f"{declaration['origin']}; rename one of them")
        seen[declaration["name"]] = declaration["origin"]
    replaced = [f for f in parse_declarations(list(fallbacks), "the firewall role's fallbacks") if f["name"] not in seen]
    return replaced + declarations


# --------------------------------------------------------------------------- the plan


def replicas_on(replicas: Optional[Sequence[Mapping[str, Any]]], host: str) -> List[Mapping[str, Any]]:
    """The fleet model's replicas with GPUs on ``host``."""
    return [replica for replica in replicas or [] if any(node["host"] == host for node in replica.get("nodes") or [])]


# --------------------------------------------------------------------------- openings


def host_openings(host: str, fleet: Mapping[str, Any], settings: Mapping[str, Any],
                  declarations: Sequence[Mapping[str, Any]] = (),
                  variables: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """What ``host`` opens, and to whom.

    ``fleet`` is the fleet model (``_fleet_model.fleet_model``): every host's address and
    groups, and the replicas with their nodes, ports and master ports; nothing here works
    out another host's address again.  ``variables``: ``host``'s own variables that
    declarations name in ``port.var``.  ``settings``: ``admin_networks``,
    ``client_networks``, ``ssh_port``, ``engine_peer_ports`` (the firewall role's
    variables of ``host``).

    Each opening: ``name``, ``description``, ``proto``, ``ports`` (strings, merged),
    ``sources`` (``ipv4``/``ipv6`` lists; ``0.0.0.0/0`` means anywhere). Openings whose
    sources are empty (an empty or missing group) are left out: nobody, not everybody.
    """
    known = fleet.get("hosts") if isinstance(fleet, Mapping) else None
    if not isinstance(known, Mapping) or host not in known:
        raise FirewallError(f"{host} is not in the fleet model (hostvars['localhost'].aphrodite_fleet, published by "
                            f"playbooks/preflight.yml); run the firewall after preflight")
    variables = variables or {}
    members: Dict[str, List[str]] = {"all": sorted(known)}
    for name in sorted(known):
        for group in known[name].get("groups") or []:
            members.setdefault(group, []).append(name)
    my_groups = {name for name, hosts in members.items() if host in hosts}
    addresses: Dict[str, Any] = {}

    def address(name: str) -> Any:
        if name not in addresses:
            addresses[name] = host_ip(name, known[name]["address"])
        return addresses[name]

    named_networks = {
        "admin": parse_networks(settings.get("admin_networks", []), "firewall_admin_networks"),
        "clients": parse_networks(settings.get("client_networks", []), "firewall_client_networks"),
    }
    openings: List[Dict[str, Any]] = []

    def add(name: str, description: str, proto: str, ports: List[Tuple[int, int]], networks: List[Any]) -> None:
        sources = _sources(networks)
        if sources["ipv4"] or sources["ipv6"]:
            openings.append({"name": name, "description": description, "proto": proto,
                             "ports": format_ports(ports), "sources": sources})

    def hosts_of(names: Iterable[str]) -> List[Any]:
        found = sorted({h for g in names for h in members.get(g, []) if h != host})
        return [ipaddress.ip_network(address(h)) for h in found]

    # SSH, always first: a rule set never goes out without it.
    add("ssh", "SSH from the admin networks", "tcp",
        parse_ports(settings.get("ssh_port", 22), "firewall_ssh_port"), named_networks["admin"])

    # Engine ports of every replica with GPUs here, for the load balancers only.
    replicas = replicas_on(fleet.get("replicas"), host)
    engine_ports = _merge((int(r["port"]), int(r["port"])) for r in replicas)
    if engine_ports:
        add("engine", "engine API of the replicas on this host, for the load balancers", "tcp",
            engine_ports, hosts_of([ENGINE_CLIENT_GROUP]))

    # Multi-node replicas: the head's master port, and the ports NCCL/Gloo (and Ray) pick,
    # among the nodes of that replica only.
    peer_range = parse_ports(settings.get("engine_peer_ports", "32768-60999"), "firewall_engine_peer_ports")
    for replica in replicas:
        nodes = replica.get("nodes") or []
        if len(nodes) < 2:
            continue
        ray = replica.get("executor") == "ray"
        ports = list(peer_range)
        if host == replica["head"]:
            ports.append((int(replica["master_port"]),) * 2)
            if ray:
                ports.append((RAY_GCS_PORT, RAY_GCS_PORT))
        if ray:
            ports.append(RAY_WORKER_PORTS)
        peers = [ipaddress.ip_network(address(node["host"])) for node in nodes if node["host"] != host]
        add(f"engine-peers-{replica['name']}", f"multi-node traffic of replica {replica['name']} among its nodes",
            "tcp", _merge(ports), peers)

    # Declared openings of the other roles (and of the inventory).
    for declaration in declarations:
        if not my_groups & set(declaration["hosts"]):
            continue
        where = f"{declaration['origin']}, opening {declaration['name']}"
        proto = declaration["proto"]
        declared: List[Tuple[int, int]] = []
        if proto in PORT_PROTOCOLS:
            spec = declaration["port"]
            if isinstance(spec, Mapping) and "plan" in spec:
                declared = engine_ports
                if not declared:
                    continue
            elif isinstance(spec, Mapping):
                value = variables.get(spec["var"])
                value = spec["default"] if value in (None, "") else value
                declared = parse_ports(value, f"{where}: {spec['var']} of {host}")
            else:
                declared = parse_ports(spec, where)
        sources_from = declaration["from"]
        networks: List[Any] = []
        for network in sources_from["networks"]:
            networks += named_networks[network] if network in NETWORK_KEYWORDS else parse_networks([network], where)
        networks += hosts_of(sources_from["groups"])
        if sources_from["peers"]:
            networks += hosts_of(g for g in declaration["hosts"] if g in my_groups)
        add(declaration["name"], declaration["description"], proto, declared, networks)
    return openings


# --------------------------------------------------------------------------- nft


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def nft_rules(openings: Sequence[Mapping[str, Any]], chain: str) -> List[str]:
    """nftables statements for the ``input`` chain (accept) or the ``published`` chain (return:
    allowed, so Docker's own chains decide next; the chain's last rule drops the rest).

    In ``published`` the port is the one the client asked for (``ct original proto-dst``),
    since Docker's DNAT has already rewritten the destination; port-less protocols never
    reach containers through DNAT and are left out there.
    """
    if chain not in ("input", "published"):
        raise FirewallError(f"chain must be input or published, got {chain!r}")
    verdict = "accept" if chain == "input" else "return"
    lines = []
    for opening in openings:
        proto, ports = opening["proto"], list(opening.get("ports") or [])
        if proto in PORT_PROTOCOLS:
            if chain == "input":
                match = f"{proto} dport {_set(ports)}"
            else:
                match = f"meta l4proto {proto} ct original proto-dst {_set(ports)}"
        elif chain == "published":
            continue
        else:
            match = f"meta l4proto {proto}"
        sources = opening["sources"]
        v4, v6 = sources.get("ipv4", []), sources.get("ipv6", [])
        comment = f'comment "{opening["name"]}"'
        if _is_everywhere(v4) and _is_everywhere(v6):
            lines.append(f"{match} {verdict} {comment}")
            continue
        for family, nfproto, items in (("ip", "ipv4", v4), ("ip6", "ipv6", v6)):
            if not items:
                continue
            where = f"meta nfproto {nfproto}" if _is_everywhere(items) else f"{family} saddr {_set(items)}"
            lines.append(f"{where} {match} {verdict} {comment}")
    return lines


def allows(openings: Sequence[Mapping[str, Any]], address: Any, port: Optional[int] = None, proto: str = "tcp") -> bool:
    """Whether the openings accept a new connection from ``address`` to ``port`` (``proto``)."""
    try:
        source = ipaddress.ip_address(str(address).strip())
    except ValueError:
        raise FirewallError(f"{address!r} is not an IP address") from None
    family = "ipv4" if source.version == 4 else "ipv6"
    for opening in openings:
        if opening["proto"] != proto:
            continue
        if proto in PORT_PROTOCOLS:
            if port is None:
                raise FirewallError(f"{proto} needs a port to check")
            if not any(low <= int(port) <= high for low, high in parse_ports(list(opening["ports"]), opening["name"])):
                continue
        if any(source in ipaddress.ip_network(net) for net in opening["sources"].get(family, [])):
            return True
    return False
