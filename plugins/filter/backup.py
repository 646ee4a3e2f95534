# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Backup filters (documented in backup_plan.yml, backup_prune.yml, backup_latest.yml); the logic lives in module_utils/_backup.py."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _backup


def backup_plan(fleet: Any, settings: Any = None, run: Any = None) -> dict:
    """Destination and items of a backup run; see backup_plan.yml."""
    try:
        return _backup.backup_plan(fleet, settings, run)
    except _backup.BackupError as exc:
        raise AnsibleFilterError(str(exc)) from None


def backup_prune(names: Any, keep: Any, current: Any = None) -> list:
    """The runs retention removes; see backup_prune.yml."""
    try:
        return _backup.prune(list(names or []), keep, current)
    except _backup.BackupError as exc:
        raise AnsibleFilterError(str(exc)) from None


def backup_latest(names: Any, wanted: Any = None) -> str:
    """The run to restore from; see backup_latest.yml."""
    try:
        return _backup.latest(list(names or []), wanted)
    except _backup.BackupError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """aphrodite.baremetal backup filters."""

    def filters(self) -> dict:
        return {"backup_plan": backup_plan, "backup_prune": backup_prune, "backup_latest": backup_latest}
