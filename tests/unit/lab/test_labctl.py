"""The lab tool's pure parts: inventory reading, host specs, mirror discovery."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("labctl", ROOT / "lab" / "labctl.py")
labctl = importlib.util.module_from_spec(_spec)
sys.modules["labctl"] = labctl  # dataclasses look their module up while the class is made
_spec.loader.exec_module(labctl)


def test_lab_inventory_has_its_hosts_in_their_groups() -> None:
    hosts, subnet = labctl.inventory_hosts()
    by_name = {h.name: h for h in hosts}
    assert set(by_name) >= {"lb1", "lb2", "nfs1", "monitoring1", "gpu1", "gpu2"}
    assert by_name["nfs1"].groups == ["nfs_servers"] and by_name["monitoring1"].groups == ["monitoring"]
    assert by_name["gpu1"].is_gpu and not by_name["lb1"].is_gpu
    net = ipaddress.ip_network(subnet)
    lower = list(net.subnets(prefixlen_diff=1))[0]
    for host in hosts:
        # Pinned addresses must stay out of the half Docker allocates from.
        assert ipaddress.ip_address(host.address) in lower, host
    assert len({h.address for h in hosts}) == len(hosts)


def test_host_specs_get_consecutive_addresses_and_groups() -> None:
    hosts = labctl.parse_host_args(["a:gpu_nodes", "b:loadbalancers,monitoring", "c"], "10.9.0.0/24")
    assert [(h.name, h.address, h.groups) for h in hosts] == [
        ("a", "10.9.0.11", ["gpu_nodes"]),
        ("b", "10.9.0.12", ["loadbalancers", "monitoring"]),
        ("c", "10.9.0.13", []),
    ]


@pytest.mark.parametrize("text, expected", [
    ("Types: deb\nURIs: http://deb.example.org/debian\nSuites: bookworm\n", "http://deb.example.org/debian"),
    ("deb http://mirror.example.net/debian bookworm main\n", "http://mirror.example.net/debian"),
    ("deb [arch=amd64] http://m.example.com/debian/ bookworm main\n", "http://m.example.com/debian"),
])
def test_mirror_is_read_from_apt_sources(tmp_path: Path, monkeypatch, text: str, expected: str) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(text)
    monkeypatch.setattr(labctl, "Path", lambda p: sources if p == "/etc/apt/sources.list" else tmp_path / "none")
    assert labctl.apt_mirror() == expected


def test_recipe_digest_changes_with_any_part() -> None:
    base = labctl.recipe_digest([b"a", b"b"])
    assert base == labctl.recipe_digest([b"a", b"b"])
    assert base != labctl.recipe_digest([b"a", b"c"])
    assert base != labctl.recipe_digest([b"ab"])


def test_gpu_hardware_fixtures_name_recorded_files_and_unknown_ones_are_refused() -> None:
    import json

    for path in sorted((ROOT / "lab" / "fixtures" / "gpu" / "hardware").glob("*.json")):
        recorded = json.loads(path.read_text())
        assert set(recorded) == {"query", "topo", "lspci"}, path
        for name in recorded.values():
            assert (labctl.RECORDED_GPU / name).is_file(), (path, name)
    assert labctl.hardware_file("h100x8-nvswitch").name == "h100x8-nvswitch.json"
    with pytest.raises(labctl.LabError, match="use one of h100x8-nvswitch, l40s-pcie"):
        labctl.hardware_file("h100x9")


def test_the_kernel_archive_is_an_apt_source_on_the_lab_gateway_signed_by_the_repository_key(tmp_path: Path) -> None:
    repo = tmp_path / "www"
    (repo / "kernel").mkdir(parents=True)
    (repo / "kernel" / "key.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\nlab\n")
    etc_apt = labctl.kernel_archive(tmp_path / "state", "172.28.10.1", repo)
    copied = sorted(str(p.relative_to(etc_apt)) for p in etc_apt.rglob("*") if p.is_file())
    # Laid out like /etc/apt, and nothing else: `docker cp` merges it into the host's.
    assert copied == ["keyrings/lab-kernel.asc", "sources.list.d/lab-kernel.sources"]
    sources = (etc_apt / "sources.list.d" / "lab-kernel.sources").read_text()
    fields = dict(line.split(": ", 1) for line in sources.splitlines() if not line.startswith("#"))
    assert fields == {"Types": "deb", "URIs": f"http://172.28.10.1:{labctl.pkgrepo.PORT}/kernel/", "Suites": "/",
                      "Signed-By": "/etc/apt/keyrings/lab-kernel.asc"}
    assert (etc_apt / "keyrings" / "lab-kernel.asc").read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    for path in (etc_apt / "keyrings" / "lab-kernel.asc", etc_apt / "sources.list.d" / "lab-kernel.sources"):
        assert path.stat().st_mode & 0o777 == 0o644
    # Made again for the next host or lab on another gateway: the source follows.
    again = labctl.kernel_archive(tmp_path / "state", "172.28.30.1", repo)
    assert "URIs: http://172.28.30.1:" in (again / "sources.list.d" / "lab-kernel.sources").read_text()


def test_the_reboot_watcher_starts_only_hosts_that_ended_by_a_reboot(monkeypatch) -> None:
    """Exit 129 (SIGHUP: reboot(2) in a PID namespace) starts the host again; a power-off
    (130), `docker stop` (0 or 137) or an unreadable event does not."""
    events = [{"name": "gpu1", "exitCode": "129"}, {"name": "fw-gpu1", "exitCode": "130"},
              {"name": "lb1", "exitCode": "137"}, {"name": "nfs1", "exitCode": "0"}]

    class Events:
        def __init__(self, argv, **_):
            assert argv[:2] == ["docker", "events"] and f"label={labctl.LABEL}" in argv and "event=die" in argv
            self.stdout = iter(["not json\n"] + [f"{labctl.json.dumps(e)}\n" for e in events])

        def wait(self):
            return 0

        def terminate(self):
            pass

    started = []

    class Done:
        returncode = 0
        stderr = b""

    monkeypatch.setattr(labctl.subprocess, "Popen", Events)
    monkeypatch.setattr(labctl, "run", lambda argv, check=True: started.append(argv) or Done())
    monkeypatch.setattr(labctl.signal, "signal", lambda *_: None)
    assert labctl.reboot_watcher() == 0
    assert started == [["docker", "start", "gpu1"]]
