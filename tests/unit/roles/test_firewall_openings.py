"""Host firewall openings from an inventory: given the topology, exactly these openings per host.

The openings are computed from the fleet model (addresses, groups, replicas), which the
helper below builds from the inventory as preflight does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter import firewall as firewall_filter
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import fleet_model
from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import (
    FirewallError,
    allows,
    host_openings,
    merge_declarations,
    nft_rules,
    parse_ports,
)

ROOT = Path(__file__).resolve().parents[3]
FALLBACKS = yaml.safe_load((ROOT / "roles" / "firewall" / "vars" / "main.yml").read_text())["__firewall_fallback_openings"]
SETTINGS = {"admin_networks": ["10.9.0.0/24"], "client_networks": ["0.0.0.0/0", "::/0"], "ssh_port": 22,
            "engine_peer_ports": "32768-60999"}

HOSTVARS = {
    "lb1": {"ansible_host": "10.0.0.11"},
    "lb2": {"ansible_host": "10.0.0.12"},
    "nfs1": {"ansible_host": "10.0.0.21"},
    "gpu1": {"ansible_host": "10.0.1.1"},
    "gpu2": {"ansible_host": "10.0.1.2"},
    "gpu3": {"ansible_host": "10.0.1.3"},
}
GROUPS = {
    "all": list(HOSTVARS),
    "loadbalancers": ["lb1", "lb2"],
    "nfs_servers": ["nfs1"],
    "monitoring": ["nfs1"],
    "gpu_nodes": ["gpu1", "gpu2", "gpu3"],
    "ungrouped": [],
}


def replica(name, port, placement, *extra_argv):
    argv = ["--model", "m", "--port", str(port)]
    if len(placement) > 1:
        argv += ["--nnodes", str(len(placement)), "--node-rank", "0", "--master-addr", "x", "--master-port", "29501"]
    return {"name": name, "head": next(iter(placement)), "placement": placement, "port": port,
            "tensor_parallel_size": 4, "pipeline_parallel_size": len(placement), "argv": argv + list(extra_argv)}


# A 2-node replica on gpu1+gpu2 (port 2242), a single-node one on gpu1 (2243), one on gpu3 (2242).
PLAN = {"deployments": [
    {"model": "big", "replicas": [replica("big-0", 2242, {"gpu1": [0, 1, 2, 3], "gpu2": [0, 1, 2, 3]})]},
    {"model": "small", "replicas": [replica("small-0", 2243, {"gpu1": [4]}), replica("small-1", 2242, {"gpu3": [0]})]},
], "idle_gpus": {}}

ANY = (["0.0.0.0/0"], ["::/0"])
ADMIN = (["10.9.0.0/24"], [])
LBS = (["10.0.0.11", "10.0.0.12"], [])
MON = (["10.0.0.21"], [])


def summary(openings):
    return {o["name"]: (o["proto"], o["ports"], (o["sources"]["ipv4"], o["sources"]["ipv6"])) for o in openings}


def fleet(hostvars=None, groups=None, plan=PLAN):
    return fleet_model(plan, hostvars or HOSTVARS, groups or GROUPS)


def openings(host, hostvars=None, groups=None, settings=None, plan=PLAN, roles=None, extra=None):
    declarations = merge_declarations(FALLBACKS, roles or {}, extra or [])
    return host_openings(host, fleet(hostvars, groups, plan), settings or SETTINGS, declarations,
                         (hostvars or HOSTVARS).get(host))


LAB = {
    "lb1": {
        "ssh": ("tcp", ["22"], ADMIN),
        "haproxy-frontend": ("tcp", ["443"], ANY),
        "haproxy-peers": ("tcp", ["10000"], (["10.0.0.12"], [])),
        "haproxy-metrics": ("tcp", ["8405"], MON),
        "vrrp": ("vrrp", [], (["10.0.0.12"], [])),
        "node-exporter": ("tcp", ["9100"], MON),
    },
    "lb2": {
        "ssh": ("tcp", ["22"], ADMIN),
        "haproxy-frontend": ("tcp", ["443"], ANY),
        "haproxy-peers": ("tcp", ["10000"], (["10.0.0.11"], [])),
        "haproxy-metrics": ("tcp", ["8405"], MON),
        "vrrp": ("vrrp", [], (["10.0.0.11"], [])),
        "node-exporter": ("tcp", ["9100"], MON),
    },
    # The monitoring host is its only monitoring host: its own node exporter is reached over lo.
    "nfs1": {
        "ssh": ("tcp", ["22"], ADMIN),
        "nfs": ("tcp", ["2049"], (["10.0.1.1", "10.0.1.2", "10.0.1.3"], [])),
    },
    "gpu1": {
        "ssh": ("tcp", ["22"], ADMIN),
        "engine": ("tcp", ["2242", "2243"], LBS),
        "engine-peers-big-0": ("tcp", ["29501", "32768-60999"], (["10.0.1.2"], [])),
        "node-exporter": ("tcp", ["9100"], MON),
    },
    "gpu2": {
        "ssh": ("tcp", ["22"], ADMIN),
        "engine": ("tcp", ["2242"], LBS),
        "engine-peers-big-0": ("tcp", ["32768-60999"], (["10.0.1.1"], [])),
        "node-exporter": ("tcp", ["9100"], MON),
    },
    "gpu3": {
        "ssh": ("tcp", ["22"], ADMIN),
        "engine": ("tcp", ["2242"], LBS),
        "node-exporter": ("tcp", ["9100"], MON),
    },
}


@pytest.mark.parametrize("host", sorted(LAB))
def test_each_host_opens_exactly_what_its_place_needs(host):
    assert summary(openings(host)) == LAB[host]


def test_ssh_comes_first_so_no_rule_set_lacks_it():
    for host in LAB:
        assert openings(host)[0]["name"] == "ssh"


def _vars(**changes):
    result = copy.deepcopy(HOSTVARS)
    for host, values in changes.items():
        result[host].update(values)
    return result


CASES = [
    pytest.param(  # No plan (no models): no engine ports, nothing among GPU nodes.
        "gpu1", {"plan": None},
        {"ssh": ("tcp", ["22"], ADMIN), "node-exporter": ("tcp", ["9100"], MON)}, id="no-plan"),
    pytest.param(  # No monitoring hosts: the metrics openings are left out, not opened to all.
        "lb1", {"groups": {**GROUPS, "monitoring": []}},
        {"ssh": ("tcp", ["22"], ADMIN), "haproxy-frontend": ("tcp", ["443"], ANY),
         "haproxy-peers": ("tcp", ["10000"], (["10.0.0.12"], [])), "vrrp": ("vrrp", [], (["10.0.0.12"], []))},
        id="empty-monitoring"),
    pytest.param(  # A single load balancer has no peer: no peers port, no VRRP.
        "lb1", {"groups": {**GROUPS, "loadbalancers": ["lb1"]}},
        {"ssh": ("tcp", ["22"], ADMIN), "haproxy-frontend": ("tcp", ["443"], ANY),
         "haproxy-metrics": ("tcp", ["8405"], MON), "node-exporter": ("tcp", ["9100"], MON)},
        id="single-lb"),
    pytest.param(  # Ports owned by other roles follow the host's variables.
        "lb1", {"hostvars": _vars(lb1={"haproxy_frontend_port": 8443, "haproxy_peers_port": "10001",
                                       "monitoring_node_exporter_port": 9101})},
        {**LAB["lb1"], "haproxy-frontend": ("tcp", ["8443"], ANY), "haproxy-peers": ("tcp", ["10001"], (["10.0.0.12"], [])),
         "node-exporter": ("tcp", ["9101"], MON)},
        id="role-port-variables"),
    pytest.param(  # The private address wins over the management address.
        "gpu1", {"hostvars": _vars(lb1={"aphrodite_bind_address": "192.168.5.11"}, gpu2={"aphrodite_bind_address": "192.168.6.2"})},
        {**LAB["gpu1"], "engine": ("tcp", ["2242", "2243"], (["10.0.0.12", "192.168.5.11"], [])),
         "engine-peers-big-0": ("tcp", ["29501", "32768-60999"], (["192.168.6.2"], []))},
        id="bind-address"),
    pytest.param(  # IPv6 hosts and networks land in the ip6 family.
        "gpu3", {"hostvars": _vars(lb2={"ansible_host": "fd00::12"}, nfs1={"ansible_host": "fd00::21"}),
                 "settings": {**SETTINGS, "admin_networks": ["10.9.0.0/24", "fd00:9::/64"]}},
        {"ssh": ("tcp", ["22"], (["10.9.0.0/24"], ["fd00:9::/64"])),
         "engine": ("tcp", ["2242"], (["10.0.0.11"], ["fd00::12"])),
         "node-exporter": ("tcp", ["9100"], ([], ["fd00::21"]))},
        id="ipv6"),
    pytest.param(  # Client networks restrict the frontend, per family.
        "lb2", {"settings": {**SETTINGS, "client_networks": ["203.0.113.0/24", "198.51.100.7"]}},
        {**LAB["lb2"], "haproxy-frontend": ("tcp", ["443"], (["198.51.100.7", "203.0.113.0/24"], []))},
        id="client-networks"),
    pytest.param(  # Overlapping admin networks collapse (nft refuses overlapping set elements).
        "gpu3", {"settings": {**SETTINGS, "admin_networks": ["10.9.0.0/24", "10.9.0.7", "10.8.0.0/16"], "ssh_port": 2222}},
        {**LAB["gpu3"], "ssh": ("tcp", ["2222"], (["10.8.0.0/16", "10.9.0.0/24"], []))},
        id="ssh-port-and-overlaps"),
    pytest.param(  # Ray: GCS on the head, the worker range on every node of the replica.
        "gpu1", {"plan": {"deployments": [{"model": "r", "replicas": [
            replica("ray-0", 2242, {"gpu1": [0], "gpu2": [0]}, "--distributed-executor-backend", "ray")]}]}},
        {"ssh": ("tcp", ["22"], ADMIN), "engine": ("tcp", ["2242"], LBS),
         "engine-peers-ray-0": ("tcp", ["6379", "10002-19999", "29501", "32768-60999"], (["10.0.1.2"], [])),
         "node-exporter": ("tcp", ["9100"], MON)},
        id="ray"),
    pytest.param(  # Three nodes: each one's peers are the two others, and only the head has the master port.
        "gpu2", {"plan": {"deployments": [{"model": "b", "replicas": [
            replica("b-0", 2244, {"gpu1": [0], "gpu2": [0], "gpu3": [0]})]}]}, "settings": {**SETTINGS, "engine_peer_ports": [40000, "41000-41999"]}},
        {"ssh": ("tcp", ["22"], ADMIN), "engine": ("tcp", ["2244"], LBS),
         "engine-peers-b-0": ("tcp", ["40000", "41000-41999"], (["10.0.1.1", "10.0.1.3"], [])),
         "node-exporter": ("tcp", ["9100"], MON)},
        id="three-nodes"),
    pytest.param(  # A role's own declaration replaces the fallback of the same name; {plan: engine} follows the plan.
        "gpu1", {"roles": {"monitoring": {"openings": [
            {"name": "node-exporter", "hosts": "all", "proto": "tcp", "port": {"var": "monitoring_node_exporter_port", "default": 9110},
             "from": {"groups": ["monitoring"]}},
            {"name": "engine-metrics", "hosts": ["gpu_nodes"], "proto": "tcp", "port": {"plan": "engine"},
             "from": {"groups": ["monitoring"]}}]}}},
        {**LAB["gpu1"], "node-exporter": ("tcp", ["9110"], MON), "engine-metrics": ("tcp", ["2242", "2243"], MON)},
        id="role-declarations"),
    pytest.param(  # The inventory's own openings, from networks and groups.
        "nfs1", {"extra": [{"name": "backup", "hosts": "nfs_servers", "proto": "tcp", "port": ["873", "9000-9010"],
                            "from": {"networks": ["admin", "192.0.2.0/28"], "groups": ["loadbalancers"]}},
                           {"name": "syslog", "hosts": "all", "proto": "udp", "port": 514, "from": {"networks": ["clients"]}}]},
        {**LAB["nfs1"], "backup": ("tcp", ["873", "9000-9010"], (["10.0.0.11", "10.0.0.12", "10.9.0.0/24", "192.0.2.0/28"], [])),
         "syslog": ("udp", ["514"], ANY)},
        id="extra-openings"),
    pytest.param(  # A host in no group (a probe) gets SSH and nothing else.
        "probe", {"hostvars": {**HOSTVARS, "probe": {"ansible_host": "10.0.9.9"}},
                  "groups": {**GROUPS, "all": GROUPS["all"] + ["probe"], "probes": ["probe"]}},
        {"ssh": ("tcp", ["22"], ADMIN), "node-exporter": ("tcp", ["9100"], MON)},
        id="host-in-no-fleet-group"),
]


@pytest.mark.parametrize(("host", "changes", "expected"), CASES)
def test_openings_follow_the_inventory(host, changes, expected):
    assert summary(openings(host, **changes)) == expected


ERRORS = [
    pytest.param("gpu1", {"hostvars": _vars(lb1={"ansible_host": "lb1.example.com"})},
                 "the firewall needs the private IP address of lb1, but its address (aphrodite_bind_address, else "
                 "ansible_host, else its inventory name) is 'lb1.example.com'; set aphrodite_bind_address of lb1",
                 id="hostname-address"),
    pytest.param("lb1", {"settings": {**SETTINGS, "admin_networks": ["10.9.0.5/24"]}},
                 "firewall_admin_networks: '10.9.0.5/24' has host bits set; write 10.9.0.0/24 for the whole network "
                 "or 10.9.0.5 for the one address", id="host-bits"),
    pytest.param("lb1", {"settings": {**SETTINGS, "admin_networks": "10.9.0.0/24"}},
                 "firewall_admin_networks must be a list of networks", id="networks-not-a-list"),
    pytest.param("lb1", {"settings": {**SETTINGS, "engine_peer_ports": "60999-32768"}},
                 "firewall_engine_peer_ports: '60999-32768' is outside 1-65535 or its range runs backwards", id="backwards-range"),
    pytest.param("lb1", {"hostvars": _vars(lb1={"haproxy_frontend_port": "https"})},
                 "haproxy_frontend_port of lb1 is 'https'; a port is an integer 1-65535", id="bad-port-variable"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "proto": "icmp", "from": {"networks": ["admin"]}}]},
                 "firewall_extra_openings, opening x: proto 'icmp' is not one of", id="unknown-proto"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "port": {"var": "x_port"}, "from": {"peers": True}}]},
                 "port.var x_port needs the owning role's default as port.default", id="var-without-default"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "port": 1, "from": {"peers": True}, "to": "y"}]},
                 "unknown keys ['to']", id="unknown-key"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "port": 1, "from": {"everyone": True}}]},
                 "unknown keys in from: ['everyone']", id="unknown-source"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "proto": "vrrp", "port": 1, "from": {"peers": True}}]},
                 "vrrp has no ports; leave port out", id="portless-with-port"),
    pytest.param("lb1", {"extra": [{"name": "x", "hosts": "all", "port": 1, "from": {"networks": ["everyone"]}}]},
                 "'everyone' is not an IPv4 or IPv6 network", id="bad-network-keyword"),
    pytest.param("lb1", {"roles": {"haproxy": {"openings": [{"name": "y", "hosts": "all", "port": 1, "from": {"peers": True}}]}},
                         "extra": [{"name": "y", "hosts": "all", "port": 2, "from": {"peers": True}}]},
                 "opening y is declared twice, by roles/haproxy/meta/firewall.yml and by firewall_extra_openings",
                 id="duplicate-name"),
    pytest.param("lb1", {"roles": {"haproxy": {"ports": []}}},
                 "roles/haproxy/meta/firewall.yml must hold one key, openings", id="bad-role-file"),
]


@pytest.mark.parametrize(("host", "changes", "message"), ERRORS)
def test_errors_name_the_input_and_the_fix(host, changes, message):
    # FirewallError, or the fleet model's error for what the model reads (a port variable).
    with pytest.raises(ValueError) as err:
        openings(host, **changes)
    assert message in str(err.value)


@pytest.mark.parametrize(("value", "expected"), [
    (443, [(443, 443)]),
    ("2049", [(2049, 2049)]),
    ("32768-60999", [(32768, 60999)]),
    ([2243, 2242, "2240-2242"], [(2240, 2242), (2243, 2243)]),
    (["1000-2000", "1500-2500", 3000], [(1000, 2500), (3000, 3000)]),
])
def test_ports_merge_overlaps_only(value, expected):
    assert parse_ports(value, "x") == expected


@pytest.mark.parametrize("value", [0, 65536, True, "1-", "a-b", [], None, 1.5])
def test_ports_refuse_what_is_not_a_port(value):
    with pytest.raises(FirewallError):
        parse_ports(value, "x")


# --------------------------------------------------------------------------- rendering

def test_input_rules_render_per_family_with_the_name_as_comment():
    rules = nft_rules(openings("gpu1"), "input")
    assert rules == [
        'ip saddr 10.9.0.0/24 tcp dport 22 accept comment "ssh"',
        'ip saddr { 10.0.0.11, 10.0.0.12 } tcp dport { 2242, 2243 } accept comment "engine"',
        'ip saddr 10.0.1.2 tcp dport { 29501, 32768-60999 } accept comment "engine-peers-big-0"',
        'ip saddr 10.0.0.21 tcp dport 9100 accept comment "node-exporter"',
    ]


def test_published_rules_match_the_port_before_dnat_and_return():
    rules = nft_rules(openings("lb1"), "published")
    assert 'meta l4proto tcp ct original proto-dst 443 return comment "haproxy-frontend"' in rules
    assert 'ip saddr 10.0.0.12 meta l4proto tcp ct original proto-dst 10000 return comment "haproxy-peers"' in rules
    # VRRP is never DNAT-ed to a container.
    assert not [r for r in rules if "vrrp" in r]


def test_portless_protocols_and_one_family_everywhere():
    rules = nft_rules([
        {"name": "vrrp", "proto": "vrrp", "ports": [], "sources": {"ipv4": ["10.0.0.12"], "ipv6": ["fd00::12"]}},
        {"name": "web", "proto": "tcp", "ports": ["80"], "sources": {"ipv4": ["0.0.0.0/0"], "ipv6": []}},
    ], "input")
    assert rules == [
        'ip saddr 10.0.0.12 meta l4proto vrrp accept comment "vrrp"',
        'ip6 saddr fd00::12 meta l4proto vrrp accept comment "vrrp"',
        'meta nfproto ipv4 tcp dport 80 accept comment "web"',
    ]


def test_unknown_chain_is_refused():
    with pytest.raises(FirewallError, match="chain must be input or published"):
        nft_rules([], "output")


@pytest.mark.parametrize(("address", "port", "proto", "expected"), [
    ("10.9.0.77", 22, "tcp", True),     # admin network
    ("10.0.0.11", 22, "tcp", False),    # a load balancer is no admin
    ("10.0.0.11", 2243, "tcp", True),   # engine port from a load balancer
    ("10.0.1.2", 2243, "tcp", False),   # ... but not from a GPU peer
    ("10.0.1.2", 40000, "tcp", True),   # NCCL range from the replica's other node
    ("10.0.1.3", 40000, "tcp", False),  # ... not from a node of another replica
    ("10.0.1.2", 40000, "udp", False),
    ("fd00::1", 22, "tcp", False),
])
def test_allows_answers_like_the_rules(address, port, proto, expected):
    assert allows(openings("gpu1"), address, port, proto) is expected


# --------------------------------------------------------------------------- the filters

class _HostVars(dict):
    """Like Ansible's hostvars: a host's variables are read one by one."""

    def __init__(self, data):
        super().__init__(data)
        self.read = []

    def __getitem__(self, host):
        outer = self

        class _Vars(dict):
            def __getitem__(self, key):
                outer.read.append((host, key))
                return dict.__getitem__(self, key)

        return _Vars(dict.__getitem__(self, host))


def test_filters_are_registered():
    assert set(firewall_filter.FilterModule().filters()) == {"firewall_openings", "firewall_nft", "firewall_allows"}


def test_filter_reads_only_the_declared_port_variables_of_its_own_host():
    own = _HostVars({"lb1": {"ansible_host": "10.0.0.11", "haproxy_frontend_port": 8443, "secret_token": "x"}})
    result = firewall_filter.firewall_openings("lb1", fleet(), SETTINGS, variables=own["lb1"], fallbacks=FALLBACKS)
    assert summary(result)["haproxy-frontend"] == ("tcp", ["8443"], ANY)
    declared = {"haproxy_frontend_port", "haproxy_peers_port", "haproxy_metrics_port", "monitoring_node_exporter_port"}
    assert {key for _host, key in own.read} <= declared


def test_other_hosts_addresses_come_from_the_fleet_model_alone():
    model = fleet()
    model["hosts"]["lb2"]["address"] = "10.7.7.7"
    result = summary(firewall_filter.firewall_openings("gpu3", model, SETTINGS, fallbacks=FALLBACKS))
    assert result["engine"] == ("tcp", ["2242"], (["10.0.0.11", "10.7.7.7"], []))


def test_filter_errors_name_the_host():
    with pytest.raises(AnsibleFilterError, match="firewall of gpu1: the firewall needs the private IP address of gpu2"):
        firewall_filter.firewall_openings("gpu1", fleet(_vars(gpu2={"ansible_host": "gpu2.lan"})), SETTINGS)


@pytest.mark.parametrize("model", [{"replicas": []}, None, {"hosts": {"lb1": {"address": "10.0.0.11", "groups": []}}}])
def test_filter_refuses_what_is_not_the_fleet_model_of_the_host(model):
    with pytest.raises(AnsibleFilterError, match="fleet model"):
        firewall_filter.firewall_openings("gpu1", model, SETTINGS)


def test_nft_and_allows_filters():
    result = firewall_filter.firewall_openings("gpu2", fleet(), SETTINGS, fallbacks=FALLBACKS)
    assert firewall_filter.firewall_nft(result, "input")[0] == 'ip saddr 10.9.0.0/24 tcp dport 22 accept comment "ssh"'
    assert firewall_filter.firewall_allows(result, "10.9.0.1", "22") is True
    assert firewall_filter.firewall_allows(result, "10.0.0.11", 22) is False
    with pytest.raises(AnsibleFilterError, match="not an IP address"):
        firewall_filter.firewall_allows(result, "controller", 22)


def test_filter_reads_every_roles_meta_firewall_yml(tmp_path):
    declared = tmp_path / "haproxy" / "meta" / "firewall.yml"
    declared.parent.mkdir(parents=True)
    declared.write_text(yaml.safe_dump({"openings": [
        {"name": "haproxy-frontend", "hosts": "loadbalancers", "port": {"var": "haproxy_frontend_port", "default": 443},
         "from": {"networks": ["admin"]}},
        {"name": "haproxy-stats", "hosts": "loadbalancers", "port": 8404, "from": {"peers": True}}]}))
    (tmp_path / "firewall" / "meta").mkdir(parents=True)  # a role without a declaration file
    result = summary(firewall_filter.firewall_openings("lb1", fleet(), SETTINGS, fallbacks=FALLBACKS,
                                                       roles_dir=str(tmp_path)))
    # The role's own haproxy-frontend replaces the fallback; its new opening joins.
    assert result["haproxy-frontend"] == ("tcp", ["443"], ADMIN)
    assert result["haproxy-stats"] == ("tcp", ["8404"], (["10.0.0.12"], []))
    assert result["haproxy-peers"] == LAB["lb1"]["haproxy-peers"]


def test_filter_names_a_role_file_it_cannot_read(tmp_path):
    broken = tmp_path / "monitoring" / "meta" / "firewall.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("openings: [\n")
    with pytest.raises(AnsibleFilterError, match="cannot read the firewall declarations in .*monitoring/meta/firewall.yml"):
        firewall_filter.firewall_openings("lb1", fleet(), SETTINGS, roles_dir=str(tmp_path))
