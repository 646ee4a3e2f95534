"""The monitoring role's openings (roles/monitoring/meta/firewall.yml) through the firewall
role's own logic: exporter and engine metrics ports open to the monitoring hosts only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import (
    host_openings,
    merge_declarations,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import fleet_model

ROOT = Path(__file__).resolve().parents[3]
DECLARATIONS = yaml.safe_load((ROOT / "roles" / "monitoring" / "meta" / "firewall.yml").read_text())
FALLBACKS = yaml.safe_load((ROOT / "roles" / "firewall" / "vars" / "main.yml").read_text())["__firewall_fallback_openings"]
SETTINGS = {"admin_networks": ["10.9.0.0/24"], "client_networks": ["0.0.0.0/0"], "ssh_port": 22,
            "engine_peer_ports": "32768-60999"}
HOSTVARS = {
    "lb1": {"ansible_host": "10.0.0.11"},
    "mon1": {"ansible_host": "10.0.0.25"},
    "mon2": {"ansible_host": "10.0.0.26"},
    "gpu1": {"ansible_host": "10.0.1.1"},
    "gpu2": {"ansible_host": "10.0.1.2", "monitoring_dcgm_exporter_port": 9500},
}
GROUPS = {"all": list(HOSTVARS), "loadbalancers": ["lb1"], "monitoring": ["mon1", "mon2"],
          "gpu_nodes": ["gpu1", "gpu2"], "nfs_servers": []}
PLAN = {"deployments": [{"model": "m", "replicas": [
    {"name": "m-0", "head": "gpu1", "placement": {"gpu1": [0]}, "port": 2242, "argv": []},
    {"name": "m-1", "head": "gpu1", "placement": {"gpu1": [1]}, "port": 2243, "argv": []}]}]}
MON = (["10.0.0.25", "10.0.0.26"], [])


def openings(host: str) -> dict:
    declarations = merge_declarations(FALLBACKS, {"monitoring": DECLARATIONS}, [])
    found = host_openings(host, fleet_model(PLAN, HOSTVARS, GROUPS), SETTINGS, declarations, HOSTVARS[host])
    return {o["name"]: (o["proto"], o["ports"], (o["sources"]["ipv4"], o["sources"]["ipv6"])) for o in found}


@pytest.mark.parametrize(("host", "name", "expected"), [
    ("gpu1", "node-exporter", ("tcp", ["9100"], MON)),
    ("gpu1", "dcgm-exporter", ("tcp", ["9400"], MON)),
    # A host's own port variable wins over the role's default.
    ("gpu2", "dcgm-exporter", ("tcp", ["9500"], MON)),
    # Engines' ports from the plan: the load balancers' built-in opening, and this one.
    ("gpu1", "engine-metrics", ("tcp", ["2242", "2243"], MON)),
    ("gpu1", "engine", ("tcp", ["2242", "2243"], (["10.0.0.11"], []))),
    ("lb1", "node-exporter", ("tcp", ["9100"], MON)),
    ("lb1", "haproxy-metrics", ("tcp", ["8405"], MON)),
    ("lb1", "tls-probe", ("tcp", ["443"], MON)),
    # A monitoring host reaches its own exporter over lo: only the other one is listed.
    ("mon1", "node-exporter", ("tcp", ["9100"], (["10.0.0.26"], []))),
    ("mon1", "prometheus", ("tcp", ["9090"], (["10.9.0.0/24"], []))),
    ("mon1", "grafana", ("tcp", ["3000"], (["10.9.0.0/24"], []))),
    ("mon1", "alertmanager", ("tcp", ["9093"], (["10.0.0.26", "10.9.0.0/24"], []))),
    ("mon1", "alertmanager-cluster", ("tcp", ["9094"], (["10.0.0.26"], []))),
    ("mon1", "alertmanager-cluster-udp", ("udp", ["9094"], (["10.0.0.26"], []))),
])
def test_monitoring_openings(host, name, expected):
    assert openings(host)[name] == expected


@pytest.mark.parametrize(("host", "absent"), [
    ("gpu2", "engine-metrics"),          # no replica there
    ("lb1", "dcgm-exporter"),            # GPU nodes only
    ("gpu1", "prometheus"),              # monitoring hosts only
])
def test_openings_only_where_they_serve(host, absent):
    assert absent not in openings(host)

