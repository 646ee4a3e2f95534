# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The fleet model filter (documented in fleet_model.yml); the logic lives in module_utils/_fleet_model.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fleet_model


def fleet_model(plan: Any, hostvars: Any, groups: Any, settings: Any = None) -> dict:
    """The fleet model of the plan on the inventory; see fleet_model.yml."""
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("fleet_model needs the inventory's groups as its second argument: "
                                 "aphrodite_plan | fleet_model(hostvars, groups)")
    if hostvars is None or not hasattr(hostvars, "__getitem__"):
        raise AnsibleFilterError("fleet_model needs hostvars as its first argument: aphrodite_plan | fleet_model(hostvars, groups)")
    try:
        return _fleet_model.from_hostvars(plan, hostvars, groups, settings)
    except _fleet_model.FleetModelError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """aphrodite.baremetal fleet model filter."""

    def filters(self) -> dict:
        return {"fleet_model": fleet_model}
