# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters that turn the plan, the API keys and host facts into edge configuration.

Documented in edge_backends.yml, edge_routes.yml, edge_model_list.yml, edge_api_roles.yml,
edge_api_key_entries.yml and edge_vrrp_interface.yml beside this file; the logic lives in
module_utils/_edge.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _edge

_HOST_KEYS = ("aphrodite_bind_address", "ansible_host")


def _heads(plan: Any) -> list:
    if not isinstance(plan, Mapping):
        return []
    heads = []
    for deployment in plan.get("deployments") or []:
        for replica in (deployment or {}).get("replicas") or []:
            if isinstance(replica, Mapping) and replica.get("head") is not None:
                heads.append(str(replica["head"]))
    return heads


def _host_addresses(hostvars: Any, hosts: list) -> dict:
    """Copy only the address variables of the replica heads, so nothing else is templated."""
    result = {}
    for host in hosts:
        try:
            variables = hostvars[host]
        except (KeyError, TypeError):
            continue
        picked = {}
        for key in _HOST_KEYS:
            try:
                picked[key] = variables[key]
            except (KeyError, TypeError):
                continue
        result[host] = picked
    return result


def edge_backends(plan: Any, hostvars: Any, default_maxconn: int = _edge.DEFAULT_MAXCONN,
                  endpoint_overrides: Any = None) -> list:
    """One HAProxy backend per model of the plan; see edge_backends.yml."""
    if hostvars is None or not hasattr(hostvars, "__getitem__"):
        raise AnsibleFilterError("edge_backends needs hostvars as its first argument: plan | edge_backends(hostvars)")
    try:
        return _edge.backends(plan, _host_addresses(hostvars, _heads(plan)), default_maxconn,
                              dict(endpoint_overrides or {}))
    except _edge.EdgeError as exc:
        raise AnsibleFilterError(str(exc)) from None


def edge_routes(backends: Any) -> list:
    """``[key, backend]`` pairs of the route map; see edge_routes.yml."""
    try:
        return _edge.routes(list(backends or []))
    except _edge.EdgeError as exc:
        raise AnsibleFilterError(str(exc)) from None


def edge_model_list(backends: Any) -> dict:
    """The fleet's ``GET /v1/models`` answer; see edge_model_list.yml."""
    return _edge.model_list(list(backends or []))


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
            "edge_backends": edge_backends,
            "edge_routes": edge_routes,
            "edge_model_list": edge_model_list,
            "edge_api_roles": edge_api_roles,
            "edge_api_key_entries": edge_api_key_entries,
            "edge_vrrp_interface": edge_vrrp_interface,
        }
