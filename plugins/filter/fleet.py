# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The fleet model filter (documented in fleet_model.yml); the logic lives in module_utils/_fleet_model.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fleet_model

# Settings of the load balancers' group that the model reads from its first host, and the
# variables that carry them (the virtual IP: the first that is set).
_LB_SETTINGS = {"server_maxconn": ("haproxy_server_maxconn",), "model_endpoints": ("haproxy_model_endpoints",),
                "vip": ("aphrodite_vip", "haproxy_virtual_ipaddress")}


def _get(variables: Any, key: str) -> Any:
    try:
        return variables[key]
    except (KeyError, TypeError):
        return None


def _picked(variables: Any, keys: tuple) -> dict:
    """Only the named variables, so unrelated ones (secrets, facts) are never templated."""
    return {key: value for key in keys if (value := _get(variables, key)) is not None}


def fleet_model(plan: Any, hostvars: Any, groups: Any, settings: Any = None) -> dict:
    """The fleet model of the plan on the inventory; see fleet_model.yml."""
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("fleet_model needs the inventory's groups as its second argument: "
                                 "aphrodite_plan | fleet_model(hostvars, groups)")
    if hostvars is None or not hasattr(hostvars, "__getitem__"):
        raise AnsibleFilterError("fleet_model needs hostvars as its first argument: aphrodite_plan | fleet_model(hostvars, groups)")
    hosts = sorted({str(h) for members in groups.values() for h in (members or [])})
    variables = {}
    for host in hosts:
        try:
            variables[host] = _picked(hostvars[host], _fleet_model.HOST_VARIABLES)
        except KeyError:
            variables[host] = {}
    chosen: dict = {}
    first_lb = next(iter(groups.get(_fleet_model.LB_GROUP) or []), None)
    if first_lb is not None:
        lb_vars = hostvars[first_lb]
        for name, keys in _LB_SETTINGS.items():
            for key in keys:
                value = _get(lb_vars, key)
                if value not in (None, ""):
                    chosen[name] = value
                    break
    chosen.update(dict(settings or {}))
    if "server_maxconn" in chosen:
        try:
            chosen["server_maxconn"] = int(chosen["server_maxconn"])
        except (TypeError, ValueError):
            raise AnsibleFilterError(f"haproxy_server_maxconn must be a positive integer, got {chosen['server_maxconn']!r}") from None
    try:
        return _fleet_model.fleet_model(plan or None, variables, dict(groups), chosen)
    except _fleet_model.FleetModelError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """aphrodite.baremetal fleet model filter."""

    def filters(self) -> dict:
        return {"fleet_model": fleet_model}
