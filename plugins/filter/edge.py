# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters that turn the API keys and host facts into edge configuration.

Documented in edge_api_roles.yml, edge_api_key_entries.yml and edge_vrrp_interface.yml
beside this file; the logic lives in module_utils/_edge.py.  Backends, routes and the model
list are part of the fleet model (filter fleet_model, hostvars['localhost'].aphrodite_fleet).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _edge


def edge_api_roles(roles: Any, endpoints: Any) -> dict:
    """Validated roles with ``*`` expanded; see edge_api_roles.yml."""
    try:
        return _edge.validate_roles(roles, list(endpoints or []))
    except _edge.EdgeError as exc:
        raise AnsibleFilterError(str(exc)) from None


def edge_api_key_entries(keys: Any, roles: Any) -> list:
    """Hash, role, limit and name per client key; see edge_api_key_entries.yml."""
    try:
        return _edge.api_key_entries(keys, roles)
    except _edge.EdgeError as exc:
        raise AnsibleFilterError(str(exc)) from None


def edge_vrrp_interface(facts: Any, address: str) -> dict:
    """Interface and prefix carrying an address; see edge_vrrp_interface.yml."""
    if not isinstance(facts, Mapping):
        raise AnsibleFilterError("edge_vrrp_interface expects ansible_facts as its input")
    try:
        return _edge.vrrp_interface(facts, str(address))
    except _edge.EdgeError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """aphrodite.baremetal edge filters."""

    def filters(self) -> dict:
        return {
            "edge_api_roles": edge_api_roles,
            "edge_api_key_entries": edge_api_key_entries,
            "edge_vrrp_interface": edge_vrrp_interface,
        }
