"""Run a module's main() in-process: exit_json and fail_json raise instead of exiting."""

from __future__ import annotations

import pytest
from ansible.module_utils import basic


class ExitJson(Exception):
    """AnsibleModule.exit_json was called."""


class FailJson(Exception):
    """AnsibleModule.fail_json was called."""


@pytest.fixture(autouse=True)
def module_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    def exit_json(self, **kwargs):
        raise ExitJson(kwargs)

    def fail_json(self, msg, **kwargs):
        kwargs["msg"] = msg
        raise FailJson(kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
