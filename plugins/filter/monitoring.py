# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Filters of the monitoring role.

Documented in alertmanager_config.yml and web_password_hash.yml beside this file; the
Alertmanager logic lives in module_utils/_alertmanager.py.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _alertmanager


def alertmanager_config(route: Any, receivers: Any) -> dict:
    """Route and receivers, checked; see alertmanager_config.yml."""
    try:
        return _alertmanager.alertmanager_config(route, receivers)
    except _alertmanager.AlertmanagerError as exc:
        raise AnsibleFilterError(str(exc)) from None


# bcrypt's own base64 alphabet, in the order of the standard one.
_STANDARD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_COST = 12


def web_password_hash(password: Any, seed: Any) -> str:
    """The bcrypt hash of ``password`` for a Prometheus web configuration; see web_password_hash.yml.

    The salt comes from ``seed`` (never from the password), so a run that changes nothing
    writes the same hash again and the file stays unchanged.
    """
    if not isinstance(password, str) or len(password) < 16:
        raise AnsibleFilterError("web_password_hash: the password must be a string of 16 characters or more")
    if len(password.encode()) > 72:
        raise AnsibleFilterError("web_password_hash: bcrypt reads 72 bytes at most; use a shorter password")
    try:
        import bcrypt  # noqa: PLC0415 - only the monitoring hosts' web configuration needs it
    except ImportError:
        raise AnsibleFilterError("web_password_hash needs the Python package bcrypt on the controller: "
                                 "pip install bcrypt (into the Python that runs ansible-playbook)") from None
    digest = hashlib.sha256(f"aphrodite.baremetal web password salt:{seed}".encode()).digest()[:16]
    salt = base64.b64encode(digest).decode().rstrip("=").translate(str.maketrans(_STANDARD, _BCRYPT))
    return bcrypt.hashpw(password.encode(), f"$2b${_COST:02d}${salt}".encode()).decode()


class FilterModule:
    """aphrodite.baremetal monitoring filters."""

    def filters(self) -> dict:
        return {"alertmanager_config": alertmanager_config, "web_password_hash": web_password_hash}
