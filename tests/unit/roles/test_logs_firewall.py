"""The logs role's opening (roles/logs/meta/firewall.yml) through the firewall role's own
logic: systemd-journal-remote's port on the monitoring hosts, for every fleet host, and
nothing else anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import (
    allows,
    host_openings,
    merge_declarations,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import PORTS, fleet_model

ROOT = Path(__file__).resolve().parents[3]
DECLARATIONS = yaml.safe_load((ROOT / "roles" / "logs" / "meta" / "firewall.yml").read_text())
SETTINGS = {"admin_networks": ["10.9.0.0/24"], "client_networks": ["0.0.0.0/0"], "ssh_port": 22,
            "engine_peer_ports": "32768-60999"}
HOSTVARS = {
    "lb1": {"ansible_host": "10.0.0.11"},
    "mon1": {"ansible_host": "10.0.0.25"},
    "mon2": {"ansible_host": "10.0.0.26", "logs_remote_port": 19600},
    "gpu1": {"ansible_host": "10.0.1.1"},
    "nfs1": {"ansible_host": "10.0.2.1"},
}
GROUPS = {"all": list(HOSTVARS), "loadbalancers": ["lb1"], "monitoring": ["mon1", "mon2"],
          "gpu_nodes": ["gpu1"], "nfs_servers": ["nfs1"]}


def openings(host: str) -> dict:
    declarations = merge_declarations([], {"logs": DECLARATIONS}, [])
    found = host_openings(host, fleet_model(None, HOSTVARS, GROUPS), SETTINGS, declarations, HOSTVARS[host])
    return {o["name"]: o for o in found}


def test_the_declared_default_is_the_fleet_models_port():
    assert DECLARATIONS["openings"][0]["port"] == {"var": "logs_remote_port", "default": PORTS["journal_remote"]}


@pytest.mark.parametrize(("host", "port", "others"), [
    ("mon1", "19532", ["10.0.0.11", "10.0.0.26", "10.0.1.1", "10.0.2.1"]),
    # A monitoring host's own port variable, as the fleet model's URL uses it.
    ("mon2", "19600", ["10.0.0.11", "10.0.0.25", "10.0.1.1", "10.0.2.1"]),
])
def test_every_fleet_host_reaches_the_receiver_and_only_there(host, port, others):
    opening = openings(host)["journal-remote"]
    assert (opening["proto"], opening["ports"], opening["sources"]) == ("tcp", [port], {"ipv4": others, "ipv6": []})
    found = list(openings(host).values())
    assert all(allows(found, source, int(port)) for source in others)
    assert not allows(found, "10.9.0.5", int(port))      # not even the admins: uploads only
    assert not allows(found, "192.0.2.1", int(port))


@pytest.mark.parametrize("host", ["lb1", "gpu1", "nfs1"])
def test_no_other_host_opens_it(host):
    assert "journal-remote" not in openings(host)
