"""The fleet model: every address, port, served name, endpoint and target, computed once."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fleet_model
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import (
    PORT_VARIABLES,
    PORTS,
    FleetModelError,
    fleet_model,
    host_address,
    lora_names,
    subject_alt_name,
    url_host,
)

ROOT = Path(__file__).resolve().parents[4]

HOSTVARS = {
    "lb1": {"ansible_host": "10.0.0.11"},
    "lb2": {"ansible_host": "10.0.0.12"},
    "mon1": {"ansible_host": "10.0.0.21"},
    "gpu1": {"ansible_host": "10.0.1.1"},
    "gpu2": {"ansible_host": "10.0.1.2", "aphrodite_bind_address": "192.168.1.2"},
}
GROUPS = {
    "all": list(HOSTVARS),
    "loadbalancers": ["lb2", "lb1"],
    "monitoring": ["mon1"],
    "nfs_servers": ["mon1"],
    "gpu_nodes": ["gpu1", "gpu2"],
    "ungrouped": [],
}


def replica(name, placement, port=2242, *argv, **extra):
    return {"name": name, "head": next(iter(placement)), "placement": placement, "port": port,
            "argv": ["--model", "m", *argv], **extra}


def plan(*deployments):
    return {"deployments": [{"model": model, "replicas": list(replicas)} for model, replicas in deployments],
            "idle_gpus": {}}


PLAN = plan(
    ("meta-llama/Llama-3.1-70B-Instruct", [replica("llama-0", {"gpu1": [0, 1], "gpu2": [0, 1]}, 2242,
                                                   "--nnodes", "2", "--master-port", "29600")]),
    ("BAAI/bge-m3", [replica("bge-0", {"gpu1": [2]}, 2243, "--task", "embed")]),
)


def model(the_plan=PLAN, hostvars=None, groups=None, **settings):
    return fleet_model(the_plan, hostvars or HOSTVARS, groups or GROUPS, settings)


# --------------------------------------------------------------------------- addresses

@pytest.mark.parametrize(("variables", "expected"), [
    ({"aphrodite_bind_address": "192.168.0.5", "ansible_host": "10.0.0.5"}, "192.168.0.5"),
    ({"aphrodite_bind_address": "", "ansible_host": "10.0.0.5"}, "10.0.0.5"),
    ({"aphrodite_bind_address": "  ", "ansible_host": "10.0.0.5"}, "10.0.0.5"),
    ({"aphrodite_bind_address": None, "ansible_host": "10.0.0.5"}, "10.0.0.5"),
    ({"aphrodite_bind_address": "", "ansible_host": ""}, "node1"),
    ({"ansible_host": " 10.0.0.5 "}, "10.0.0.5"),
    ({}, "node1"),
    (None, "node1"),
    ({"aphrodite_bind_address": "fd00::5"}, "fd00::5"),
])
def test_one_address_rule_where_empty_counts_as_unset(variables, expected):
    assert host_address("node1", variables) == expected


@pytest.mark.parametrize(("address", "expected"), [
    ("10.0.0.5", "10.0.0.5"), ("fd00::5", "[fd00::5]"), ("[fd00::5]", "[fd00::5]"), ("gpu1.lan", "gpu1.lan")])
def test_url_host_brackets_ipv6(address, expected):
    assert url_host(address) == expected


def test_every_host_is_in_the_model_with_its_address_groups_and_ports():
    hosts = model()["hosts"]
    assert sorted(hosts) == ["gpu1", "gpu2", "lb1", "lb2", "mon1"]
    assert hosts["gpu2"]["address"] == "192.168.1.2"
    assert hosts["lb1"]["groups"] == ["loadbalancers"]
    assert hosts["mon1"]["groups"] == ["monitoring", "nfs_servers"]
    assert hosts["lb1"]["ports"] == {"node_exporter": 9100, "haproxy_frontend": 443, "haproxy_peers": 10000,
                                     "haproxy_metrics": 8405}
    assert hosts["gpu1"]["ports"] == {"node_exporter": 9100, "dcgm_exporter": 9400}
    assert hosts["mon1"]["ports"]["nfs"] == 2049 and hosts["mon1"]["ports"]["prometheus"] == 9090


def test_a_hosts_port_variable_overrides_the_default():
    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["lb1"].update(haproxy_frontend_port="8443", monitoring_node_exporter_port=9101, haproxy_metrics_port="")
    ports = model(hostvars=hostvars)["hosts"]["lb1"]["ports"]
    assert (ports["haproxy_frontend"], ports["node_exporter"], ports["haproxy_metrics"]) == (8443, 9101, 8405)


@pytest.mark.parametrize("value", ["https", 0, 70000, True])
def test_a_bad_port_variable_is_named(value):
    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["lb2"]["haproxy_peers_port"] = value
    with pytest.raises(FleetModelError, match="haproxy_peers_port of lb2 is .*; a port is an integer 1-65535"):
        model(hostvars=hostvars)


# --------------------------------------------------------------------------- replicas

def test_multi_node_replica_has_ranks_addresses_and_its_master_port():
    [llama, bge] = model()["replicas"]
    assert llama["nodes"] == [{"host": "gpu1", "address": "10.0.1.1", "rank": 0, "gpus": [0, 1]},
                              {"host": "gpu2", "address": "192.168.1.2", "rank": 1, "gpus": [0, 1]}]
    assert (llama["head"], llama["address"], llama["nnodes"], llama["master_port"]) == ("gpu1", "10.0.1.1", 2, 29600)
    assert (bge["nnodes"], bge["master_port"]) == (1, None)


def test_each_host_names_the_replicas_it_has_a_part_of():
    # A reboot of gpu2 takes llama-0 out of the pool, though its head is gpu1.
    hosts = model()["hosts"]
    assert {name: hosts[name]["replicas"] for name in hosts} == {
        "gpu1": ["llama-0", "bge-0"], "gpu2": ["llama-0"], "lb1": [], "lb2": [], "mon1": []}
    assert all(host["replicas"] == [] for host in model(plan())["hosts"].values())


def test_each_host_names_the_models_its_maintenance_would_take_down():
    # Both models have their only replica on gpu1; the 70B's on gpu2 as well.
    hosts = model()["hosts"]
    assert {name: hosts[name]["sole_models"] for name in hosts} == {
        "gpu1": ["meta-llama/Llama-3.1-70B-Instruct", "BAAI/bge-m3"], "gpu2": ["meta-llama/Llama-3.1-70B-Instruct"],
        "lb1": [], "lb2": [], "mon1": []}
    # A second replica on the other node: neither host takes m/x down.  Two replicas that
    # both span both nodes: either node's reboot takes m/y down all the same.
    spread = plan(("m/x", [replica("x-0", {"gpu1": [0]}), replica("x-1", {"gpu2": [0]})]),
                  ("m/y", [replica("y-0", {"gpu1": [1], "gpu2": [1]}), replica("y-1", {"gpu1": [2], "gpu2": [2]})]))
    hosts = model(spread)["hosts"]
    assert hosts["gpu1"]["sole_models"] == hosts["gpu2"]["sole_models"] == ["m/y"]


def test_multi_node_master_port_defaults_to_the_planners():
    the_plan = plan(("m/x", [replica("x-0", {"gpu1": [0], "gpu2": [0]}, 2242, "--nnodes", "2")]))
    assert model(the_plan)["replicas"][0]["master_port"] == PORTS["engine_master"] == 29501


@pytest.mark.parametrize(("argv", "served"), [
    ([], ["m/x"]),
    (["--served-model-name", "x"], ["x"]),
    (["--served-model-name", "x", "x-latest"], ["x", "x-latest"]),
    (["--served-model-name=x"], ["x"]),
    (["--lora-modules", "sql=/models/sql", "chat=/models/chat"], ["m/x", "sql", "chat"]),
    (["--served-model-name", "x", "--lora-modules", '{"name": "sql", "path": "/models/sql", "base_model_name": "x"}'],
     ["x", "sql"]),
    (["--lora-modules", "x=/a", "--served-model-name", "x"], ["x"]),
])
def test_served_names_are_the_engines_names_and_its_adapters(argv, served):
    [one] = model(plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, *argv)])))["replicas"]
    assert one["served_names"] == served


@pytest.mark.parametrize(("value", "message"), [
    ("/models/sql", "names no adapter"),
    ('{"path": "/models/sql"}', "names no adapter"),
    ('{"name": "sql"', "not valid JSON"),
])
def test_bad_lora_modules_are_named(value, message):
    with pytest.raises(FleetModelError, match=message):
        lora_names(["--lora-modules", value])


def test_served_names_route_at_the_edge_and_list_in_v1_models():
    the_plan = plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, "--served-model-name", "x",
                                     "--lora-modules", "sql=/models/sql")]))
    edge = model(the_plan)["loadbalancers"]
    routes = dict(map(tuple, edge["routes"]))
    assert routes["chat:x"] == routes["chat:sql"] == routes["completions:sql"] == "be_x"
    assert "chat:m/x" not in routes
    assert [m["id"] for m in edge["models"]["data"]] == ["x", "sql"]


def test_embedding_model_serves_embeddings_only():
    bge = model()["replicas"][1]
    assert bge["endpoints"] == ["embeddings"]
    assert dict(map(tuple, model()["loadbalancers"]["routes"]))["embeddings"] == "be_bge-m3"


def test_endpoint_override_comes_from_the_settings():
    bge = model(model_endpoints={"BAAI/bge-m3": ["embeddings", "chat"]})["replicas"][1]
    assert bge["endpoints"] == ["embeddings", "chat"]


@pytest.mark.parametrize(("extra", "argv", "settings", "maxconn"), [
    ({}, [], {}, 256),
    ({}, [], {"server_maxconn": 32}, 32),
    ({}, ["--max-num-seqs", "64"], {"server_maxconn": 32}, 64),
    ({"max_num_seqs": 128}, ["--max-num-seqs", "64"], {}, 128),
    ({"max_num_seqs": 48}, [], {}, 48),
])
def test_maxconn_is_the_plans_concurrency_else_the_argv_else_the_default(extra, argv, settings, maxconn):
    the_plan = plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, *argv, **extra)]))
    fleet = model(the_plan, **settings)
    assert fleet["replicas"][0]["maxconn"] == maxconn
    assert fleet["loadbalancers"]["backends"][0]["servers"][0]["maxconn"] == maxconn


@pytest.mark.parametrize(("the_plan", "settings", "message"), [
    (plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, max_num_seqs=0)])), {}, "max_num_seqs in the plan 0"),
    (plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, "--max-num-seqs", "lots")])), {}, "--max-num-seqs 'lots'"),
    (plan(("m/x", [replica("x-0", {"gpu9": [0]})])), {}, "puts replica x-0 on gpu9, which is not in the inventory"),
    (plan(("m/x", [replica("x-0", {"gpu1": [0]}, 2242, "--nnodes", "1", "--master-port", "p")])), {},
     "--master-port 'p'"),
    ({"deployments": "x"}, {}, "list of deployments"),
    (PLAN, {"server_maxconn": 0}, "haproxy_server_maxconn must be a positive integer"),
])
def test_bad_inputs_are_named(the_plan, settings, message):
    with pytest.raises(FleetModelError, match=re.escape(message)):
        model(the_plan, **settings)


def test_no_plan_is_a_fleet_without_replicas():
    fleet = model(None)
    assert fleet["replicas"] == [] and fleet["loadbalancers"]["backends"] == []
    assert fleet["monitoring"]["targets"]["aphrodite-engine"] == []
    assert fleet["plan"] == {"deployments": [], "idle_gpus": {}}


# --------------------------------------------------------------------------- load balancers, targets

def test_load_balancers_keep_inventory_order_and_the_vip():
    edge = model(vip="10.0.0.100")["loadbalancers"]
    assert edge["members"] == [{"host": "lb2", "address": "10.0.0.12"}, {"host": "lb1", "address": "10.0.0.11"}]
    assert edge["vip"] == "10.0.0.100"
    assert [s["address"] for s in edge["backends"][0]["servers"]] == ["10.0.1.1"]


def test_the_model_is_the_same_whichever_hosts_a_run_is_limited_to():
    # --limit never reaches the model: the filter reads the inventory's groups and the
    # listed variables of every host, never the run's (ansible_limit, play hosts), so one
    # load balancer's run sees both load balancers, in the same order.
    from ansible_collections.aphrodite.baremetal.plugins.filter import fleet as fleet_filter

    limited = {host: {**variables, "ansible_limit": "lb1", "ansible_play_hosts": ["lb1"]}
               for host, variables in HOSTVARS.items()}
    reordered = {**GROUPS, "all": list(reversed(GROUPS["all"]))}
    whole = fleet_filter.fleet_model(PLAN, HOSTVARS, GROUPS)
    assert fleet_filter.fleet_model(PLAN, limited, reordered) == whole
    assert [m["host"] for m in whole["loadbalancers"]["members"]] == GROUPS["loadbalancers"]
    assert set(whole["hosts"]) == set(GROUPS["all"])


def test_the_filter_takes_the_load_balancers_settings_from_the_first_one():
    from ansible_collections.aphrodite.baremetal.plugins.filter import fleet as fleet_filter

    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["lb2"].update(haproxy_server_maxconn="12", aphrodite_vip="10.0.0.100",
                           haproxy_model_endpoints={"BAAI/bge-m3": ["embeddings", "chat"]})
    fleet = fleet_filter.fleet_model(PLAN, hostvars, GROUPS)
    assert fleet["loadbalancers"]["vip"] == "10.0.0.100"
    assert fleet["replicas"][1]["maxconn"] == 12
    assert fleet["replicas"][1]["endpoints"] == ["embeddings", "chat"]


def test_the_vip_set_only_for_keepalived_is_the_fleets_vip():
    """keepalived's own variable (documented beside aphrodite_vip) is a VIP too: verify and the
    edge's wait for the VIP read it from the fleet model."""
    from ansible_collections.aphrodite.baremetal.plugins.filter import fleet as fleet_filter

    hostvars = copy.deepcopy(HOSTVARS)
    for lb in GROUPS["loadbalancers"]:
        hostvars[lb].update(keepalived_virtual_ipaddress="10.0.0.101")
    assert fleet_filter.fleet_model(PLAN, hostvars, GROUPS)["loadbalancers"]["vip"] == "10.0.0.101"


def test_monitoring_targets_use_the_models_addresses_and_ports():
    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["gpu2"].update(monitoring_dcgm_enabled=False)
    hostvars["lb1"].update(ansible_host="fd00::11", haproxy_metrics_port=9405)
    targets = model(hostvars=hostvars)["monitoring"]["targets"]
    assert targets["node"][0] == {"targets": ["10.0.1.1:9100"], "labels": {"instance": "gpu1"}}
    assert [t["targets"] for t in targets["dcgm"]] == [["10.0.1.1:9400"]]
    assert targets["haproxy"] == [{"targets": ["[fd00::11]:9405"], "labels": {"instance": "lb1"}},
                                  {"targets": ["10.0.0.12:8405"], "labels": {"instance": "lb2"}}]
    assert [t["targets"] for t in targets["tls"]] == [["[fd00::11]:443"], ["10.0.0.12:443"]]
    assert targets["aphrodite-engine"][1] == {
        "targets": ["10.0.1.1:2243"],
        "labels": {"instance": "gpu1:2243", "replica": "bge-0", "model": "BAAI/bge-m3", "host": "gpu1"}}
    assert targets["alertmanager"] == [{"targets": ["10.0.0.21:9093"], "labels": {"instance": "mon1"}}]


def test_logs_go_to_every_monitoring_host_signed_by_the_first_load_balancers_ca():
    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["mon2"] = {"ansible_host": "fd00::22", "logs_remote_port": "19600"}
    groups = {**GROUPS, "all": [*GROUPS["all"], "mon2"], "monitoring": ["mon1", "mon2"]}
    logs = model(hostvars=hostvars, groups=groups)["logs"]
    assert {k: v for k, v in logs.items() if k != "subject_alt_name"} == {"ca_host": "lb2", "receivers": [
        {"host": "mon1", "address": "10.0.0.21", "port": 19532, "url": "https://10.0.0.21:19532"},
        {"host": "mon2", "address": "fd00::22", "port": 19600, "url": "https://[fd00::22]:19600"}]}
    # Every host's log certificate names it and its address, an IP address as one.
    assert set(logs["subject_alt_name"]) == set(groups["all"])
    assert logs["subject_alt_name"]["mon2"] == ["DNS:mon2", "IP:fd00::22"]
    assert logs["subject_alt_name"]["mon1"] == ["DNS:mon1", "IP:10.0.0.21"]


@pytest.mark.parametrize(("address", "names"), [
    ("10.0.0.5", ["DNS:db", "IP:10.0.0.5"]),
    ("fd00::5", ["DNS:db", "IP:fd00::5"]),
    # Names that look like hex digits or a short dotted number are names, not addresses.
    ("cafe", ["DNS:db", "DNS:cafe"]),
    ("1.2", ["DNS:db", "DNS:1.2"]),
    ("db", ["DNS:db"]),
])
def test_certificate_names_tell_addresses_from_names(address, names):
    assert subject_alt_name("db", address) == names
    assert PORTS["journal_remote"] == 19532
    assert "journal_remote" not in model()["hosts"]["gpu1"]["ports"]


def test_logs_without_monitoring_or_load_balancers():
    groups = {**GROUPS, "monitoring": [], "loadbalancers": []}
    assert model(groups=groups)["logs"] == {"receivers": [], "ca_host": None, "subject_alt_name": {}}


def test_the_plan_is_kept_unchanged():
    assert model()["plan"] == PLAN and model()["version"] == 1


# --------------------------------------------------------------------------- one source per port

def _role_defaults(role: str) -> dict:
    return yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}


@pytest.mark.parametrize(("service", "variable"), sorted(PORT_VARIABLES.items()))
def test_each_roles_port_default_is_the_models(service, variable):
    role = variable.split("_", 1)[0] if variable.startswith(("haproxy_", "logs_")) else "monitoring"
    assert _role_defaults(role)[variable] == PORTS[service], (
        f"roles/{role}/defaults/main.yml sets {variable} to {_role_defaults(role)[variable]}, the fleet model "
        f"defaults {service} to {PORTS[service]} (_fleet_model.PORTS); make them equal")


def test_the_firewalls_fallback_ports_are_the_models():
    fallbacks = yaml.safe_load((ROOT / "roles" / "firewall" / "vars" / "main.yml").read_text())["__firewall_fallback_openings"]
    by_variable = {v: s for s, v in PORT_VARIABLES.items()}
    for declaration in fallbacks:
        port = declaration.get("port")
        if isinstance(port, dict) and "var" in port:
            assert port["default"] == PORTS[by_variable[port["var"]]], declaration["name"]
    assert {d["name"]: d.get("port") for d in fallbacks}["nfs"] == PORTS["nfs"]


# Jinja that works out an address again: reading another host's address variables, or
# falling back from one to the other.
_REDERIVED = re.compile(r"(hostvars\[[^\]]+\]\s*(\[\s*['\"]|\.)(aphrodite_bind_address|ansible_host))"
                        r"|(aphrodite_bind_address\s*\|\s*default)|(default\(\s*ansible_host)")


def test_no_role_or_playbook_derives_an_address_again():
    offenders = []
    for path in sorted((ROOT / "roles").rglob("*")) + sorted((ROOT / "playbooks").rglob("*")):
        if path.suffix in (".yml", ".j2") and path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _REDERIVED.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "read the address from the fleet model instead:\n" + "\n".join(offenders)


def test_host_variables_cover_what_the_model_reads():
    assert set(_fleet_model.ADDRESS_VARIABLES) <= set(_fleet_model.HOST_VARIABLES)
    assert set(PORT_VARIABLES.values()) <= set(_fleet_model.HOST_VARIABLES)


def test_the_engine_link_is_tls_by_default_with_a_certificate_subject_per_host():
    link = model()["link_tls"]
    assert link["enabled"] and link["scheme"] == "https"
    assert link["ca_host"] == "lb2"  # the first load balancer keeps the edge CA
    assert set(link["hosts"]) == {"lb1", "lb2", "mon1", "gpu1", "gpu2"}
    # The private address the load balancers and Prometheus connect to is in the engine's certificate.
    assert link["hosts"]["gpu2"] == {"common_name": "gpu2", "subject_alt_name": ["DNS:gpu2", "IP:192.168.1.2"],
                                     "extended_key_usage": ["serverAuth", "clientAuth"]}
    assert link["hosts"]["lb1"]["extended_key_usage"] == ["clientAuth"]
    assert link["cert_file"] + ".key" == link["key_file"]


def test_a_link_address_that_is_a_name_is_a_dns_name():
    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["gpu1"]["ansible_host"] = "gpu1.lab.internal"
    assert model(hostvars=hostvars)["link_tls"]["hosts"]["gpu1"]["subject_alt_name"] == ["DNS:gpu1", "DNS:gpu1.lab.internal"]


@pytest.mark.parametrize("groups, settings", [
    ({**GROUPS, "loadbalancers": []}, {}),  # no edge CA without load balancers
    (GROUPS, {"engine_tls": False}),
    (GROUPS, {"engine_tls": "no"}),
])
def test_the_engine_link_is_plain_http_when_switched_off_or_without_load_balancers(groups, settings):
    link = model(groups=groups, **settings)["link_tls"]
    assert not link["enabled"] and link["scheme"] == "http" and link["hosts"] == {}


def test_the_filter_reads_the_engine_link_switch_from_the_first_load_balancer():
    from ansible_collections.aphrodite.baremetal.plugins.filter import fleet as fleet_filter

    hostvars = copy.deepcopy(HOSTVARS)
    hostvars["lb2"]["aphrodite_engine_tls"] = False
    assert fleet_filter.fleet_model(PLAN, hostvars, GROUPS)["link_tls"]["enabled"] is False
