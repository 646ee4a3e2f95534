"""The fleet's package proxy: the URL check of the common role's preflight and the apt drop-in.

Both run through ansible-playbook on this machine, the real expressions taken from the role's
files, so a change to either is what is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "common"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))


def run_play(tmp_path: Path, tasks: list, extra: dict) -> subprocess.CompletedProcess:
    play = [{"name": "Proxy", "hosts": "localhost", "connection": "local", "gather_facts": False,
             "vars": {"ansible_python_interpreter": sys.executable}, "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra))
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(tmp_path / "ansible.cfg"), ANSIBLE_NOCOLOR="true",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    return subprocess.run([ANSIBLE_PLAYBOOK, str(tmp_path / "play.yml"), "-e", f"@{tmp_path / 'extra.yml'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def proxy_assert() -> dict:
    tasks = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text())
    task, = [t for t in tasks if "package proxy" in t["name"]]
    return task


@pytest.mark.parametrize("proxy, direct", [
    ("http://10.0.0.5:3142", []),
    ("https://cache.example.internal:8443/", ["mirror.example.internal"]),
    ("http://[fd00::5]:3142", []),
])
def test_good_proxies_pass(tmp_path: Path, proxy: str, direct: list) -> None:
    proc = run_play(tmp_path, [proxy_assert()], {"common_package_proxy": proxy, "common_package_proxy_direct": direct})
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("proxy, direct", [
    ("10.0.0.5:3142", []),
    ("http://10.0.0.5:3142/apt; rm -rf /", []),
    ("http://10.0.0.5:3142", ["http://mirror.example.internal"]),
])
def test_bad_proxies_stop_with_the_form_to_use(tmp_path: Path, proxy: str, direct: list) -> None:
    proc = run_play(tmp_path, [proxy_assert()], {"common_package_proxy": proxy, "common_package_proxy_direct": direct})
    assert proc.returncode != 0
    assert "common_package_proxy must be http://HOST:PORT" in proc.stdout


def test_the_apt_drop_in(tmp_path: Path) -> None:
    dest = tmp_path / "01aphrodite-proxy"
    task = {"name": "Render", "ansible.builtin.template": {
        "src": str(ROLE / "templates" / "etc" / "apt" / "apt.conf.d" / "01aphrodite-proxy.j2"), "dest": str(dest)}}
    proc = run_play(tmp_path, [task], {"common_package_proxy": "http://10.0.0.5:3142",
                                       "common_package_proxy_direct": ["mirror.example.internal"]})
    assert proc.returncode == 0, proc.stdout
    lines = [line for line in dest.read_text().splitlines() if line and not line.startswith(("#", "//"))]
    assert lines == [
        'Acquire::http::Proxy "http://10.0.0.5:3142";',
        'Acquire::https::Proxy "http://10.0.0.5:3142";',
        'Acquire::http::Proxy::mirror.example.internal "DIRECT";',
        'Acquire::https::Proxy::mirror.example.internal "DIRECT";',
    ]
    # apt itself accepts the file.
    if Path("/usr/bin/apt-config").exists():
        out = subprocess.run(["apt-config", "-c", str(dest), "dump", "Acquire::http::Proxy"],
                             capture_output=True, text=True, check=True).stdout
        assert 'Acquire::http::Proxy "http://10.0.0.5:3142";' in out
