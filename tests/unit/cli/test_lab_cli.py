"""``aphrodite-deploy lab``: only the lab named "lab" is ever removed; status rendering and exit statuses."""

from __future__ import annotations

import io
import json
import subprocess

import pytest
from _eventlib import parse

from aphrodite_deploy import cli, lab

UP = {"lab": "lab", "subnet": "172.28.10.0/24", "hosts": [
    {"name": "lb1", "groups": ["loadbalancers"], "address": "172.28.10.11", "container": "running", "systemd": "running"},
    {"name": "gpu1", "groups": ["gpu_nodes"], "address": "172.28.10.31", "container": "running", "systemd": "degraded"}]}


def test_down_removes_the_lab_named_lab_and_nothing_else(monkeypatch):
    calls = []
    monkeypatch.setattr(lab, "run_labctl", lambda project, *args, **kw: calls.append(args) or
                        subprocess.CompletedProcess(args, 0))
    out = io.StringIO()
    assert cli.run_lab(parse("lab", "down"), out, io.StringIO()) == cli.EXIT_OK
    assert calls == [("down", "--lab", "lab")]
    assert out.getvalue() == "Lab lab removed.\n"


def test_up_without_deploy_starts_the_hosts_only(monkeypatch):
    calls = []
    monkeypatch.setattr(lab, "run_labctl", lambda project, *args, **kw: calls.append(args) or
                        subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(lab, "lab_hosts", lambda project: UP)
    monkeypatch.setattr(cli, "run_playbook", lambda *a, **kw: pytest.fail("deploy must not run"))
    out = io.StringIO()
    assert cli.run_lab(parse("lab", "up", "--no-deploy", "--json"), out, io.StringIO()) == cli.EXIT_OK
    assert calls == [("up", "--lab", "lab")]
    assert json.loads(out.getvalue()) == {"lab": UP}


def test_a_failed_labctl_exits_1(monkeypatch):
    monkeypatch.setattr(lab, "run_labctl", lambda project, *args, **kw: subprocess.CompletedProcess(args, 1))
    err = io.StringIO()
    assert cli.run_lab(parse("lab", "up"), io.StringIO(), err) == cli.EXIT_ERROR
    assert "labctl could not start the lab" in err.getvalue()


@pytest.mark.parametrize(("hosts", "code"), [(UP["hosts"], 0), (UP["hosts"][:1] + [dict(UP["hosts"][1], container="absent",
                                                                                            systemd=None)], 5)])
def test_status_exits_5_unless_every_host_runs(monkeypatch, hosts, code):
    monkeypatch.setattr(lab, "lab_hosts", lambda project: dict(UP, hosts=hosts))
    out = io.StringIO()
    assert cli.run_lab(parse("lab", "status"), out, io.StringIO()) == code
    lines = out.getvalue().splitlines()
    assert lines[2].split() == ["HOST", "ADDRESS", "GROUPS", "CONTAINER", "SYSTEMD"]
    assert lines[3].split() == ["lb1", "172.28.10.11", "loadbalancers", "running", "running"]
    assert lines[-1] == ("The lab is up." if code == 0 else "The lab is not (completely) up: aphrodite-deploy lab up")
    out = io.StringIO()
    cli.run_lab(parse("lab", "status", "--json"), out, io.StringIO())
    assert json.loads(out.getvalue())["up"] is (code == 0)


def test_lab_needs_an_action():
    with pytest.raises(SystemExit) as exc:
        parse("lab")
    assert exc.value.code == 2
