"""The container_runtime role's daemon.json decisions, templated by Ansible from the role's
own task file: the merge keeps other tools' keys, and only keys a SIGHUP cannot apply
restart dockerd."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

from role_platforms import ROLES

CONFIGURE = yaml.safe_load((ROLES / "container_runtime" / "tasks" / "configure.yml").read_text())
RELOADABLE = yaml.safe_load((ROLES / "container_runtime" / "vars" / "main.yml").read_text())[
    "__container_runtime_reloadable_keys"]
OWNED = {"log-driver": "json-file", "log-opts": {"max-size": "100m", "max-file": "5"}, "live-restore": True}


def _task(prefix: str) -> dict:
    return next(task for task in CONFIGURE if task.get("name", "").startswith(prefix))


def _template(expression: str, variables: dict, task_vars: dict | None = None):
    variables = dict(variables)
    for name, value in (task_vars or {}).items():
        variables[name] = trust_as_template(value)
    return Templar(loader=DataLoader(), variables=variables).template(trust_as_template(expression))


def merge(current: dict | None, ctk_stdout: str | None = None, options: dict | None = None) -> dict:
    task = _task("Merge the role's keys")
    raw = json.dumps(current) if current is not None else ""
    variables = {
        "__container_runtime_daemon_json": {"stat": {"exists": current is not None}},
        "__container_runtime_daemon_current": {"content": base64.b64encode(raw.encode()).decode()},
        "__container_runtime_ctk_configure": (
            {"skipped": True, "changed": False} if ctk_stdout is None
            else {"stdout": ctk_stdout, "changed": False, "rc": 0}),
        "__container_runtime_daemon_owned": OWNED,
        "container_runtime_daemon_options": options or {},
    }
    variables["__container_runtime_daemon_read"] = _template(
        task["vars"]["__container_runtime_daemon_read"], variables)
    return _template(task["ansible.builtin.set_fact"]["__container_runtime_daemon_after"], variables)


def restart_needed(before: dict, after: dict) -> bool:
    task = _task("Decide between a reload and a restart")
    variables = {"__container_runtime_daemon_before": before, "__container_runtime_daemon_after": after,
                 "__container_runtime_reloadable_keys": RELOADABLE}
    return _template(task["ansible.builtin.set_fact"]["__container_runtime_dockerd_restart"], variables,
                     task_vars=task["vars"])


def test_foreign_keys_survive_and_nested_ones_merge():
    seeded = {"labels": ["aphrodite.lab=seeded"], "log-opts": {"compress": "true"}, "data-root": "/srv/docker"}
    assert merge(seeded) == {
        "labels": ["aphrodite.lab=seeded"], "data-root": "/srv/docker", "log-driver": "json-file",
        "log-opts": {"compress": "true", "max-size": "100m", "max-file": "5"}, "live-restore": True,
    }


def test_nvidia_ctk_runtime_is_kept_and_options_win():
    ctk = json.dumps({"runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
                      "live-restore": False})
    merged = merge({"live-restore": False}, ctk_stdout=ctk, options={"bip": "10.231.0.1/24"})
    assert merged["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime", "args": []}}
    assert merged["live-restore"] is True
    assert merged["bip"] == "10.231.0.1/24"


def test_no_daemon_json_yet():
    assert merge(None) == OWNED


@pytest.mark.parametrize(("before", "after", "restart"), [
    ({"live-restore": True}, {"live-restore": True}, False),
    ({}, {"live-restore": True}, False),                               # a reload turns it on
    ({"labels": ["a"]}, {"labels": ["b"]}, False),
    ({}, {"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}, False),
    ({"bip": "10.1.0.1/24"}, {"bip": "10.2.0.1/24"}, True),
    ({"log-opts": {"compress": "true"}}, {"log-opts": {"compress": "true", "max-size": "100m"}}, True),
    ({}, {"features": {"cdi": True}}, True),                          # CDI is set up at start only
    ({"data-root": "/srv/docker"}, {}, True),                          # a removed key counts too
])
def test_only_keys_a_reload_cannot_apply_restart_dockerd(before, after, restart):
    assert restart_needed(before, after) is restart
