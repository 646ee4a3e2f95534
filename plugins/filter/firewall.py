# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters of the host firewall (documented beside it: firewall_openings.yml, firewall_nft.yml, firewall_allows.yml)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import (
    FirewallError,
    allows,
    host_openings,
    merge_declarations,
    nft_rules,
)


def _get(variables: Any, key: str) -> Any:
    try:
        return variables[key]
    except (KeyError, TypeError):
        return None


def role_declarations(roles_dir: Any) -> dict:
    """Role name to the content of its ``meta/firewall.yml``, for every role under ``roles_dir``."""
    found = {}
    for path in sorted(Path(str(roles_dir)).glob("*/meta/firewall.yml")):
        try:
            found[path.parent.parent.name] = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise AnsibleFilterError(f"cannot read the firewall declarations in {path}: {exc}") from None
    return found


def firewall_openings(host: Any, fleet: Any, settings: Any, variables: Any = None, fallbacks: Any = None,
                      roles: Any = None, extra: Any = None, roles_dir: Any = None) -> list:
    """What ``host`` opens and to whom, from the fleet model; see firewall_openings.yml."""
    if not isinstance(host, str) or not host:
        raise AnsibleFilterError("firewall_openings is applied to a host name: inventory_hostname | firewall_openings(...)")
    if not isinstance(fleet, Mapping) or not isinstance(fleet.get("hosts"), Mapping):
        raise AnsibleFilterError("firewall_openings needs the fleet model as its first argument: "
                                 "hostvars['localhost'].aphrodite_fleet, which playbooks/preflight.yml publishes")
    if not isinstance(settings, Mapping):
        raise AnsibleFilterError("firewall_openings needs the firewall settings (admin_networks, client_networks, ssh_port, "
                                 "engine_peer_ports) as a mapping")
    try:
        by_role = {**(role_declarations(roles_dir) if roles_dir else {}), **dict(roles or {})}
        declarations = merge_declarations(list(fallbacks or []), by_role, extra)
        names = sorted({d["port"]["var"] for d in declarations if isinstance(d["port"], Mapping) and "var" in d["port"]})
        own = {name: value for name in names if (value := _get(variables, name)) is not None}
        return host_openings(host, fleet, dict(settings), declarations, own)
    except FirewallError as exc:
        raise AnsibleFilterError(f"firewall of {host}: {exc}") from None


def firewall_nft(openings: Any, chain: str = "input") -> list:
    """nftables statements for the openings; see firewall_nft.yml."""
    if not isinstance(openings, list):
        raise AnsibleFilterError("firewall_nft is applied to the list that firewall_openings returns")
    try:
        return nft_rules(openings, chain)
    except (FirewallError, KeyError, TypeError) as exc:
        raise AnsibleFilterError(f"firewall_nft: {exc}") from None


def firewall_allows(openings: Any, address: Any, port: Any = None, proto: str = "tcp") -> bool:
    """Whether the openings accept a new connection from an address; see firewall_allows.yml."""
    if not isinstance(openings, list):
        raise AnsibleFilterError("firewall_allows is applied to the list that firewall_openings returns")
    try:
        return allows(openings, address, None if port in (None, "") else int(port), str(proto))
    except (FirewallError, ValueError) as exc:
        raise AnsibleFilterError(f"firewall_allows: {exc}") from None


class FilterModule:
    """aphrodite.baremetal host firewall filters."""

    def filters(self) -> dict:
        return {"firewall_openings": firewall_openings, "firewall_nft": firewall_nft, "firewall_allows": firewall_allows}
