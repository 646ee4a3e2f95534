"""What the haproxy role renders: backends and routes from the fleet model, hashed API keys, roles."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2
import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter import edge as edge_filter
from ansible_collections.aphrodite.baremetal.plugins.filter import fleet as fleet_filter
from ansible_collections.aphrodite.baremetal.plugins.module_utils import _edge, _fleet_model

ENDPOINTS = ["chat", "completions", "embeddings", "models", "stats"]
ROLES = {"customer": {"endpoints": ["chat", "completions", "models"], "rate_limit": 60},
         "admin": {"endpoints": "*", "rate_limit": 0}}
HOSTVARS = {"gpu1": {"ansible_host": "10.0.0.1"},
            "gpu2": {"ansible_host": "10.0.0.2", "aphrodite_bind_address": "192.168.0.2"},
            "gpu3": {}}


GROUPS = {"all": list(HOSTVARS), "gpu_nodes": list(HOSTVARS), "loadbalancers": []}


def backends(the_plan, hostvars=HOSTVARS, **settings):
    """HAProxy's backends as the fleet model holds them."""
    return _fleet_model.fleet_model(the_plan, hostvars, GROUPS, settings)["loadbalancers"]["backends"]


def replica(name, head, port=2242, *argv):
    return {"name": name, "head": head, "placement": {head: [0]}, "port": port, "argv": list(argv)}


def plan(*deployments):
    return {"deployments": [{"model": model, "replicas": list(replicas)} for model, replicas in deployments]}


SINGLE = plan(("meta-llama/Llama-3.1-8B-Instruct",
               [replica("llama-0", "gpu1"), replica("llama-1", "gpu2")]))
MULTI = plan(
    ("meta-llama/Llama-3.1-8B-Instruct", [replica("llama-0", "gpu1", 2242, "--max-num-seqs", "64")]),
    ("Qwen/Qwen2.5-7B-Instruct", [replica("qwen-0", "gpu2", 2243, "--served-model-name", "qwen", "qwen-latest")]),
    ("BAAI/bge-m3", [replica("bge-0", "gpu3", 2244, "--task", "embed")]),
)


def test_filters_are_registered():
    assert set(edge_filter.FilterModule().filters()) == {"edge_api_roles", "edge_api_key_entries", "edge_vrrp_interface"}
    assert set(fleet_filter.FilterModule().filters()) == {"fleet_model"}


def test_single_model_backend_has_every_replica_at_its_address():
    [backend] = backends(SINGLE)
    assert backend["name"] == "be_llama-3-1-8b-instruct"
    assert backend["endpoints"] == ["chat", "completions"]
    assert [(s["name"], s["address"], s["port"], s["maxconn"]) for s in backend["servers"]] == [
        ("llama-0", "10.0.0.1", 2242, 256), ("llama-1", "192.168.0.2", 2242, 256)]


def test_a_head_without_address_variables_is_addressed_by_name():
    [backend] = backends(plan(("m/x", [replica("x-0", "gpu3")])))
    assert backend["servers"][0]["address"] == "gpu3"


@pytest.mark.parametrize(("argv", "maxconn"), [
    ([], 256),
    (["--max-num-seqs", "64"], 64),
    (["--max-num-seqs=32"], 32),
    (["--max-num-seqs", "8", "--max-num-seqs", "16"], 16),
])
def test_server_maxconn_is_the_engine_concurrency(argv, maxconn):
    [backend] = backends(plan(("m/x", [replica("x-0", "gpu1", 2242, *argv)])))
    assert backend["servers"][0]["maxconn"] == maxconn


@pytest.mark.parametrize(("argv", "endpoints"), [
    ([], ["chat", "completions"]),
    (["--task", "embed"], ["embeddings"]),
    (["--runner", "pooling"], ["embeddings"]),
    (["--task", "generate"], ["chat", "completions"]),
])
def test_endpoints_follow_the_engine_task(argv, endpoints):
    assert _edge.model_endpoints("m/x", argv) == endpoints


def test_endpoint_override_wins_and_is_checked():
    assert _edge.model_endpoints("m/x", ["--task", "embed"], {"m/x": ["chat"]}) == ["chat"]
    with pytest.raises(_edge.EdgeError, match="haproxy_model_endpoints.*names tokenize"):
        _edge.model_endpoints("m/x", [], {"m/x": ["tokenize"]})


def test_routes_key_every_served_name_and_default_only_unambiguous_endpoints():
    routes = dict(map(tuple, _edge.routes(backends(MULTI))))
    assert routes["chat:meta-llama/Llama-3.1-8B-Instruct"] == "be_llama-3-1-8b-instruct"
    assert routes["chat:qwen"] == routes["completions:qwen-latest"] == "be_qwen2-5-7b-instruct"
    assert "chat:Qwen/Qwen2.5-7B-Instruct" not in routes  # the engine answers only to its served names
    assert routes["embeddings:BAAI/bge-m3"] == "be_bge-m3"
    # Two models serve chat: no default.  One serves embeddings: it is the default.
    assert "chat" not in routes
    assert routes["embeddings"] == "be_bge-m3"


def test_single_model_fleet_routes_without_a_model_field():
    routes = dict(map(tuple, _edge.routes(backends(SINGLE))))
    assert routes["chat"] == routes["completions"] == "be_llama-3-1-8b-instruct"


def test_model_list_names_every_served_name():
    listing = _edge.model_list(backends(MULTI))
    assert [m["id"] for m in listing["data"]] == ["meta-llama/Llama-3.1-8B-Instruct", "qwen", "qwen-latest",
                                                  "BAAI/bge-m3"]
    assert listing["object"] == "list"


def test_backend_names_stay_unique_when_slugs_collide():
    names = [b["name"] for b in backends(plan(("a/Model", [replica("a-0", "gpu1")]),
                                              ("b/model", [replica("b-0", "gpu2")])))]
    assert names == ["be_model", "be_model-2"]


@pytest.mark.parametrize(("bad_plan", "message"), [
    ({"replicas": []}, "deployments"),
    ({"deployments": [{"replicas": []}]}, "no model id"),
    (plan(("m/x", [{"name": "x-0", "port": 1}])), "no head"),
    (plan(("m/x", [replica("x-0", "gpu1", 0)])), "port 0"),
    (plan(("m/x", [replica("x-0", "gpu1")]), ("m/y", [replica("x-0", "gpu2")])), "x-0 appears twice"),
    (plan(("m/x", [replica("x-0", "gpu1", 1, "--served-model-name", "same")]),
          ("m/y", [replica("y-0", "gpu2", 1, "--served-model-name", "same")])), "same is served by both"),
    (plan(("m/x", [replica("x-0", "nohost")])), "nohost, which is not in the inventory"),
    (plan(("m/x", [replica("x-0", "gpu1", 1, "--max-num-seqs", "many")])), "--max-num-seqs 'many'"),
])
def test_bad_plans_are_named(bad_plan, message):
    with pytest.raises(ValueError, match=message):
        backends(bad_plan)


def test_filter_reports_plan_errors_as_filter_errors():
    with pytest.raises(AnsibleFilterError, match="not in the inventory"):
        fleet_filter.fleet_model(plan(("m/x", [replica("x-0", "nohost")])), HOSTVARS, GROUPS)


def test_filter_reads_only_the_variables_the_model_needs():
    class Strict(dict):
        def __getitem__(self, key):
            if key not in _fleet_model.HOST_VARIABLES:
                raise AssertionError(f"read {key}")
            return dict.__getitem__(self, key)

    hostvars = {"gpu1": Strict(ansible_host="10.0.0.1", aphrodite_api_key="secret"), "gpu2": Strict(), "gpu3": Strict()}
    [backend] = fleet_filter.fleet_model(SINGLE, hostvars, GROUPS)["loadbalancers"]["backends"]
    assert backend["servers"][0]["address"] == "10.0.0.1"


# --------------------------------------------------------------------------- keys and roles
def test_roles_expand_the_wildcard():
    roles = _edge.validate_roles(ROLES, ENDPOINTS)
    assert roles["admin"]["endpoints"] == ENDPOINTS
    assert roles["customer"] == {"endpoints": ["chat", "completions", "models"], "rate_limit": 60,
                                 "limits": {"requests_per_minute": 60, "requests_per_hour": 0,
                                            "requests_per_day": 0, "requests_per_month": 0,
                                            "tokens_per_hour": 0, "tokens_per_month": 0}}


@pytest.mark.parametrize(("roles", "message"), [
    ({}, "must map each role"),
    ({"Customer": {"endpoints": ["chat"]}}, "lower-case"),
    ({"customer": {"endpoints": ["tokenize"]}}, "names tokenize; the edge knows chat"),
    ({"customer": {"endpoints": []}}, "non-empty list"),
    ({"customer": {"endpoints": ["chat"], "rate_limit": -1}}, "integer >= 0"),
    ({"customer": {"endpoints": ["chat"], "rate_limit": "60/min"}}, "requests per minute"),
    ({"customer": {"endpoints": ["chat"], "limits": {"requests_per_week": 5}}},
     "names requests_per_week; the limits are requests_per_minute, requests_per_hour"),
    ({"customer": {"endpoints": ["chat"], "limits": {"requests_per_month": "1M"}}},
     r"customer.limits.requests_per_month must be an integer >= 0 \(requests per month"),
    ({"customer": {"endpoints": ["chat"], "limits": [1]}}, "limits must be a mapping"),
    ({"customer": {"endpoints": ["chat"], "limits": {"tokens_per_day": 5}}},
     "names tokens_per_day; the limits are .*tokens_per_hour, tokens_per_month"),
    ({"customer": {"endpoints": ["chat"], "limits": {"tokens_per_month": 1.5}}},
     r"customer.limits.tokens_per_month must be an integer >= 0 \(tokens per month per key"),
    ({"customer": {"endpoints": ["chat"], "rate_limit": 5, "limits": {"requests_per_minute": 6}}},
     "both rate_limit and limits.requests_per_minute"),
])
def test_bad_roles_are_named(roles, message):
    with pytest.raises(_edge.EdgeError, match=message):
        _edge.validate_roles(roles, ENDPOINTS)


def test_key_entries_hold_the_upper_case_sha256_and_never_the_key():
    roles = _edge.validate_roles(ROLES, ENDPOINTS)
    key = "sk-test-0123456789abcdef"
    entries = _edge.api_key_entries([{"name": "alice", "key": key, "role": "customer"},
                                     {"name": "ops", "key": "sk-admin-0123456789abcd", "role": "admin",
                                      "rate_limit": 5}], roles)
    assert entries[0] == {"hash": hashlib.sha256(key.encode()).hexdigest().upper(), "role": "customer",
                          "rate_limit": 60, "name": "alice",
                          "limits": {"requests_per_minute": 60, "requests_per_hour": 0,
                                     "requests_per_day": 0, "requests_per_month": 0,
                                     "tokens_per_hour": 0, "tokens_per_month": 0}}
    assert entries[1]["rate_limit"] == 5
    assert key not in repr(entries)


def test_a_key_overrides_its_roles_limits_one_by_one():
    roles = _edge.validate_roles({"customer": {"endpoints": ["chat"], "rate_limit": 60,
                                               "limits": {"requests_per_day": 1000, "requests_per_month": 20000}}},
                                 ENDPOINTS)
    [entry] = _edge.api_key_entries([{"name": "trial", "key": "sk-test-0123456789abcdef", "role": "customer",
                                      "limits": {"requests_per_month": 100, "requests_per_hour": 50}}], roles)
    assert entry["limits"] == {"requests_per_minute": 60, "requests_per_hour": 50,
                               "requests_per_day": 1000, "requests_per_month": 100,
                               "tokens_per_hour": 0, "tokens_per_month": 0}
    assert entry["rate_limit"] == 60


def test_a_key_gets_token_budgets_from_its_role_or_its_own():
    roles = _edge.validate_roles({"customer": {"endpoints": ["chat"], "rate_limit": 60,
                                               "limits": {"tokens_per_hour": 100000, "tokens_per_month": 1000000}}},
                                 ENDPOINTS)
    default, own = _edge.api_key_entries([
        {"name": "acme", "key": "sk-test-0123456789abcdef", "role": "customer"},
        {"name": "trial", "key": "sk-test-0123456789abcdeg", "role": "customer", "limits": {"tokens_per_month": 5000}}],
        roles)
    assert (default["limits"]["tokens_per_hour"], default["limits"]["tokens_per_month"]) == (100000, 1000000)
    assert (own["limits"]["tokens_per_hour"], own["limits"]["tokens_per_month"]) == (100000, 5000)


def _key_map(entries: list) -> list:
    role = Path(__file__).resolve().parents[3] / "roles" / "haproxy"
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    environment.filters["comment"] = lambda text: f"# {text}"
    template = environment.from_string((role / "templates" / "etc" / "haproxy" / "apikeys.map.j2").read_text())
    text = template.render(ansible_managed="managed", __haproxy_key_entries=entries)
    return [line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]


def test_the_key_map_holds_each_limit_in_the_field_haproxy_reads():
    """haproxy.cfg reads field N (1-based, ':'-separated) of a key's map value for each window."""
    role = Path(__file__).resolve().parents[3] / "roles" / "haproxy"
    variables = yaml.safe_load((role / "vars" / "main.yml").read_text())
    roles = _edge.validate_roles({"customer": {"endpoints": ["chat"], "rate_limit": 1}}, ENDPOINTS)
    limits = {"requests_per_hour": 2, "requests_per_day": 3, "requests_per_month": 4,
              "tokens_per_hour": 5, "tokens_per_month": 6}
    [[digest, value]] = _key_map(_edge.api_key_entries(
        [{"name": "acme", "key": "sk-test-0123456789abcdef", "role": "customer", "limits": limits}], roles))
    fields = value.split(":")
    assert digest == _edge.key_hash("sk-test-0123456789abcdef")
    assert (fields[0], fields[2]) == ("customer", "acme")
    read = {f"{kind}_per_{window['name']}": int(fields[window["field"] - 1])
            for kind, windows in (("requests", variables["__haproxy_key_windows"]),
                                  ("tokens", variables["__haproxy_token_windows"]))
            for window in windows}
    assert read == {"requests_per_minute": 1, **limits}


def test_a_key_map_of_the_earlier_format_still_reads_as_no_token_budget():
    """Six fields (before token budgets): fields 7 and 8 are empty, which the rules read as no budget."""
    role = Path(__file__).resolve().parents[3] / "roles" / "haproxy"
    config = (role / "templates" / "etc" / "haproxy" / "haproxy.cfg.j2").read_text()
    for window in yaml.safe_load((role / "vars" / "main.yml").read_text())["__haproxy_token_windows"]:
        uses = [line for line in config.splitlines()
                if f"txn.{window['limit']}" in line and f"set-var(txn.{window['limit']})" not in line]
        assert uses
        for line in uses:
            # Every rule that reads a budget is guarded by "-m int gt 0": false for an absent field.
            assert f"{{ var(txn.{window['limit']}) -m int gt 0 }}" in line, line


@pytest.mark.parametrize(("keys", "message"), [
    ({"name": "x"}, "must be a list"),
    ([{"key": "sk-test-0123456789abcdef", "role": "customer"}], r"haproxy_api_keys\[0\] needs a name"),
    ([{"name": "a b", "key": "sk-test-0123456789abcdef", "role": "customer"}], "needs a name"),
    ([{"name": "a", "key": "short", "role": "customer"}], "at least 16 characters"),
    ([{"name": "a", "key": "sk-test 0123456789abcdef", "role": "customer"}], "without white space"),
    ([{"name": "a", "key": "sk-test-0123456789abcdef", "role": "root"}], "role 'root'; the roles are admin, customer"),
    ([{"name": "a", "key": "sk-test-0123456789abcdef", "role": "customer", "rate_limit": "5"}],
     "API key 'a'.rate_limit must be an integer >= 0 .*got '5'"),
    ([{"name": "a", "key": "sk-test-0123456789abcdef", "role": "customer", "limits": {"requests_per_day": -1}}],
     "API key 'a'.limits.requests_per_day must be an integer >= 0"),
    ([{"name": "a", "key": "sk-test-0123456789abcdef", "role": "customer"},
      {"name": "a", "key": "sk-test-0123456789abcdeg", "role": "customer"}], "two API keys are named 'a'"),
    ([{"name": "a", "key": "sk-test-0123456789abcdef", "role": "customer"},
      {"name": "b", "key": "sk-test-0123456789abcdef", "role": "admin"}], "'a' and 'b' are the same key"),
])
def test_bad_keys_are_named_without_their_value(keys, message):
    roles = _edge.validate_roles(ROLES, ENDPOINTS)
    with pytest.raises(_edge.EdgeError, match=message) as error:
        _edge.api_key_entries(keys, roles)
    assert "0123456789abcde" not in str(error.value)


def test_the_verify_key_has_its_own_role_inference_only_and_no_rate_limit() -> None:
    """playbooks/verify.yml sends with haproxy_verify_api_key: never a client's key, never throttled."""
    role = Path(__file__).resolve().parents[3] / "roles" / "haproxy"
    verify_roles = yaml.safe_load((role / "vars" / "main.yml").read_text())["__haproxy_verify_roles"]
    roles = _edge.validate_roles({**ROLES, **verify_roles}, ENDPOINTS)
    entries = _edge.api_key_entries([{"name": "lab-client", "key": "c" * 32, "role": "customer"},
                                     {"name": "aphrodite-verify", "key": "v" * 32, "role": "aphrodite-verify"}], roles)
    verify = next(e for e in entries if e["name"] == "aphrodite-verify")
    assert verify["rate_limit"] == 0
    assert set(roles["aphrodite-verify"]["endpoints"]) == {"chat", "completions", "embeddings"}
    playbook = (role.parents[1] / "playbooks" / "verify.yml").read_text()
    assert "haproxy_verify_api_key" in playbook and "haproxy_api_keys" not in playbook
