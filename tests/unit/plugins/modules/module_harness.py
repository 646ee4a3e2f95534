"""Run a module's main() in-process: exit_json and fail_json raise instead of exiting."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args


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


def run_module(main: Callable[[], None], args: dict, expect: type = ExitJson, check_mode: bool = False) -> dict:
    """Call a module's main() with ``args``; what it passed to exit_json (or fail_json)."""
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    with patch_module_args(args):
        with pytest.raises(expect) as result:
            main()
    return result.value.args[0]
