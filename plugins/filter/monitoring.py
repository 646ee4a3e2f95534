# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters of the monitoring role.

Documented in alertmanager_config.yml beside this file; the logic lives in
module_utils/_alertmanager.py.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _alertmanager


def alertmanager_config(route: Any, receivers: Any) -> dict:
    """Route and receivers, checked; see alertmanager_config.yml."""
    try:
        return _alertmanager.alertmanager_config(route, receivers)
    except _alertmanager.AlertmanagerError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """aphrodite.baremetal monitoring filters."""

    def filters(self) -> dict:
        return {"alertmanager_config": alertmanager_config}
