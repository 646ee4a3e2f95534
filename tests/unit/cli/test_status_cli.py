"""``aphrodite-deploy status``: a row per replica from playbooks/status.yml's reports; JSON; exit statuses."""

from __future__ import annotations

import io
import json

import pytest
from _eventlib import FakeRun, Stream, parse, recorded

from aphrodite_deploy import cli
from aphrodite_deploy.events import RunLog
from aphrodite_deploy.status import build_status, parse_metrics

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BACKEND = "be_llama-3-1-8b-instruct"
SERVERS = [{"name": "llama-3-1-8b-0", "host": "gpu1", "address": "10.0.0.1", "port": 2242, "maxconn": 8},
           {"name": "llama-3-1-8b-1", "host": "gpu2", "address": "10.0.0.2", "port": 2242, "maxconn": 8}]
METRICS = """# TYPE aphrodite:num_requests_running gauge
aphrodite:num_requests_running{model_name="m",engine="0"} 3
aphrodite:num_requests_waiting{model_name="m",engine="0"} 1
aphrodite:kv_cache_usage_perc{model_name="m",engine="0"} 0.25
aphrodite:generation_tokens_total{model_name="m",engine="0"} 1234
"""


def row(server: str, status: str = "UP", check: str = "L7OK", scur: int = 0) -> dict:
    return {"pxname": BACKEND, "svname": server, "status": status, "scur": str(scur), "qcur": "0",
            "check_status": check, "check_code": "200" if check == "L7OK" else "", "check_desc": "", "weight": "1",
            "lastchg": "10"}


def lb_report(health: list[int], rows: list[dict] | None, error: str = "") -> dict:
    return {"aphrodite_status_lb": {
        "replicas": SERVERS, "models": [MODEL, MODEL], "backends": [BACKEND, BACKEND], "health": health,
        "health_errors": ["OK" if h == 200 else "Request failed: <urlopen error [Errno 111] Connection refused>"
                          for h in health],
        "runtime_api": json.dumps(rows) if rows is not None else "", "runtime_api_error": error}}


def containers(*replicas: str, state: str = "running", status: str = "Up 5 minutes (healthy)") -> dict:
    return {"aphrodite_status_containers": {
        "error": "", "names": [[f"/aphrodite-{r}"] for r in replicas], "images": ["img:1"] * len(replicas),
        "states": [state] * len(replicas), "statuses": [status] * len(replicas),
        "labels": [{"io.aphrodite.replica": r, "io.aphrodite.node-rank": "0"} for r in replicas]}}


def stream(lb1: dict, lb2: dict, gpu1: dict, gpu2: dict, metrics: list[str] | None = None) -> Stream:
    s = Stream().play_start("Status | engine containers on the GPU nodes")
    s.ok("gpu1", "Report the engine containers", **gpu1).ok("gpu2", "Report the engine containers", **gpu2)
    s.play_start("Status | every replica as the load balancers see it")
    s.ok("lb2", "Report what this load balancer sees", **lb2).ok("lb1", "Report what this load balancer sees", **lb1)
    content = metrics if metrics is not None else [METRICS, METRICS]
    s.ok("lb1", "Report the replicas' metrics", aphrodite_status_metrics={
        "replicas": [r["name"] for r in SERVERS], "status": [200] * len(content), "content": content})
    return s.stats(lb1={"ok": 5}, lb2={"ok": 3}, gpu1={"ok": 2}, gpu2={"ok": 2})


def run(events: list[dict], monkeypatch: pytest.MonkeyPatch, *extra: str, status: str = "successful",
        rc: int = 0) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "run_playbook", FakeRun(events, status=status, rc=rc))
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_status(parse("status", "-i", "inv", *extra), out, err)
    return code, out.getvalue(), err.getvalue()


def test_recorded_lab_run_every_replica_serves(monkeypatch):
    code, out, _ = run(recorded("status_lab_events.json"), monkeypatch)
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["REPLICA", "MODEL", "HEAD", "PORT", "STATE", "CONTAINER", "HEALTH"]
    assert lines[1].split() == ["llama-3-1-8b-0", MODEL, "gpu1", "2242", "serving", "running/healthy", "200",
                                "lb1", "UP/L7OK", "lb2", "UP/L7OK", "0", "0", "0.0%"]
    assert lines[2].split()[:5] == ["llama-3-1-8b-1", MODEL, "gpu2", "2242", "serving"]
    assert lines[-1] == "2 of 2 replicas serve."


def test_recorded_lab_run_as_json(monkeypatch):
    code, out, _ = run(recorded("status_lab_events.json"), monkeypatch, "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["summary"] == {"total": 2, "serving": 2, "states": {"serving": 2}}
    first = payload["replicas"][0]
    assert first["name"] == "llama-3-1-8b-0" and first["backend"] == BACKEND and first["address"] == "172.28.10.31"
    assert first["health"] == {"lb1": {"status": 200, "error": None}, "lb2": {"status": 200, "error": None}}
    assert first["load_balancers"]["lb1"] == {"status": "UP", "check": "L7OK", "check_code": 200, "sessions": 0,
                                              "queued": 0, "weight": 1}
    assert first["metrics"] == {"requests_running": 0.0, "requests_waiting": 0.0, "kv_cache_usage": 0.0}
    assert first["container"]["name"] == "aphrodite-llama-3-1-8b-0" and first["container"]["health"] == "healthy"
    assert payload["load_balancers"] == {"lb1": {"runtime_api": True, "error": None},
                                         "lb2": {"runtime_api": True, "error": None}}
    assert payload["exit_status"] == 0 and payload["command"] == "status"


def test_the_table_names_the_model_as_clients_ask_for_it(monkeypatch):
    """served_model_name in the table (what a client sends), the id beside it in --json."""
    lb1, lb2 = (lb_report([200, 200], [row("llama-3-1-8b-0"), row("llama-3-1-8b-1")]) for _ in range(2))
    for report in (lb1, lb2):
        report["aphrodite_status_lb"]["served"] = ["llama-8b", "llama-8b"]
    s = stream(lb1, lb2, containers("llama-3-1-8b-0"), containers("llama-3-1-8b-1"))
    code, out, _ = run(s.events, monkeypatch)
    assert code == cli.EXIT_OK
    assert [line.split()[1] for line in out.splitlines()[1:3]] == ["llama-8b", "llama-8b"]
    code, out, _ = run(s.events, monkeypatch, "--json")
    first = json.loads(out)["replicas"][0]
    assert (first["model"], first["served_name"]) == (MODEL, "llama-8b")


def test_drained_and_unhealthy_replicas_exit_5_and_say_why(monkeypatch):
    lb1 = lb_report([200, -1], [row("llama-3-1-8b-0", "MAINT"), row("llama-3-1-8b-1", "DOWN", "L4CON")])
    lb2 = lb_report([200, -1], [row("llama-3-1-8b-0", "UP"), row("llama-3-1-8b-1", "DOWN", "L4CON")])
    s = stream(lb1, lb2, containers("llama-3-1-8b-0"), containers("llama-3-1-8b-1", status="Up 2 minutes (unhealthy)"),
               metrics=[METRICS])
    code, out, _ = run(s.events, monkeypatch)
    assert code == cli.EXIT_UNHEALTHY
    assert "llama-3-1-8b-0: lb1: MAINT (out of the pool)" in out
    assert "llama-3-1-8b-1: /health from lb1: Request failed: <urlopen error [Errno 111] Connection refused>" in out
    assert "lb2: HAProxy sees it DOWN" in out
    assert out.splitlines()[-1] == "0 of 2 replicas serve (1 drained, 1 unhealthy)."
    first = out.splitlines()[1].split()
    assert first[4] == "drained" and first[-3:] == ["3", "1", "25.0%"]
    assert out.splitlines()[2].split()[5] == "running/unhealthy"


def test_a_replica_without_a_container_is_missing(monkeypatch):
    lb = lb_report([200, -1], [row("llama-3-1-8b-0"), row("llama-3-1-8b-1", "DOWN", "L4CON")])
    s = stream(lb, lb, containers("llama-3-1-8b-0"), containers())
    code, out, _ = run(s.events, monkeypatch, "--json")
    assert code == cli.EXIT_UNHEALTHY
    payload = json.loads(out)
    assert [r["state"] for r in payload["replicas"]] == ["serving", "missing"]
    assert payload["replicas"][1]["problems"] == ["no engine container for llama-3-1-8b-1 on gpu2"]
    assert payload["summary"]["states"] == {"serving": 1, "missing": 1}


def test_without_haproxy_the_replicas_are_judged_by_health_alone(monkeypatch):
    error = "no HAProxy runtime API at /run/haproxy/admin.sock: [Errno 2] No such file or directory"
    lb = lb_report([200, 200], None, error)
    code, out, _ = run(stream(lb, lb, containers("llama-3-1-8b-0"), containers("llama-3-1-8b-1")).events, monkeypatch)
    assert code == cli.EXIT_OK
    assert f"note: lb1: HAProxy's runtime API did not answer ({error}); its view of the replicas is unknown" in out
    assert "lb1 ? lb2 ?" in out


def test_an_unreachable_load_balancer_fails_the_run_even_when_the_replicas_serve(monkeypatch):
    lb = lb_report([200, 200], [row("llama-3-1-8b-0"), row("llama-3-1-8b-1")])
    s = Stream().play_start("Status | engine containers on the GPU nodes")
    s.ok("gpu1", "Report", **containers("llama-3-1-8b-0")).ok("gpu2", "Report", **containers("llama-3-1-8b-1"))
    s.play_start("Status | every replica as the load balancers see it")
    s.ok("lb1", "Report what this load balancer sees", **lb)
    s.unreachable("lb2", "Read the servers' state from HAProxy's runtime API", "ssh: connect to host lb2 port 22: No route")
    s.stats(lb1={"ok": 4}, lb2={"dark": 1}, gpu1={"ok": 2}, gpu2={"ok": 2})
    code, out, _ = run(s.events, monkeypatch, status="failed", rc=4)
    assert code == cli.EXIT_FAILED
    assert "2 of 2 replicas serve." in out
    assert "Hosts that did not answer:\n  lb2 unreachable:" in out


def test_metrics_of_aphrodite_and_vllm_engines():
    assert parse_metrics(METRICS) == {"requests_running": 3.0, "requests_waiting": 1.0, "kv_cache_usage": 0.25}
    vllm = ('vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 5\n'
            'vllm:gpu_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_cache_usage_perc{engine="1"} 0.1\n')
    assert parse_metrics(vllm) == {"requests_running": 7.0, "requests_waiting": None, "kv_cache_usage": 0.3}
    assert parse_metrics("") == {"requests_running": None, "requests_waiting": None, "kv_cache_usage": None}


def test_status_runs_the_read_only_playbook_with_no_extra_variables(monkeypatch):
    fake = FakeRun(recorded("status_lab_events.json"))
    monkeypatch.setattr(cli, "run_playbook", fake)
    cli.run_status(parse("status", "-i", "inventories/lab"), io.StringIO(), io.StringIO())
    call, = fake.calls
    assert call["playbook"] == "playbooks/status.yml" and call["command"] == "status"
    assert "extravars" not in call and "check" not in call


def test_reports_are_read_from_the_events_only():
    log = RunLog()
    for event in recorded("status_lab_events.json"):
        log.handle(event)
    status = build_status(log)
    assert [r.name for r in status.replicas] == ["llama-3-1-8b-0", "llama-3-1-8b-1"]
    assert status.all_serving


def test_a_multi_node_replica_shows_every_rank_and_a_dead_worker(monkeypatch):
    # One replica across gpu1 (head, rank 0) and gpu2 (headless rank 1); the worker exited.
    servers = [SERVERS[0]]
    lb = {"aphrodite_status_lb": {
        "replicas": servers, "models": [MODEL], "backends": [BACKEND], "nodes": [["gpu1", "gpu2"]], "health": [503],
        "health_errors": ["Status code was 503"], "runtime_api": json.dumps([row("llama-3-1-8b-0", "DOWN", "L7STS")]),
        "runtime_api_error": ""}}
    worker = {"aphrodite_status_containers": {
        "error": "", "names": [["/aphrodite-llama-3-1-8b-0"]], "images": ["img:1"], "states": ["exited"],
        "statuses": ["Exited (1) 3 seconds ago"],
        "labels": [{"io.aphrodite.replica": "llama-3-1-8b-0", "io.aphrodite.node-rank": "1"}]}}
    s = stream(lb, lb, containers("llama-3-1-8b-0"), worker, metrics=[METRICS])
    code, out, _ = run(s.events, monkeypatch)
    assert code == cli.EXIT_UNHEALTHY
    assert "llama-3-1-8b-0: ranks 0 gpu1 running/healthy, 1 gpu2 exited" in out
    assert "container aphrodite-llama-3-1-8b-0 (rank 1 on gpu2) is exited" in out
    code, out, _ = run(s.events, monkeypatch, "--json")
    ranks = json.loads(out)["replicas"][0]["ranks"]
    assert [(r["rank"], r["host"], r["container"]["state"]) for r in ranks] == [(0, "gpu1", "running"), (1, "gpu2", "exited")]
    assert json.loads(out)["replicas"][0]["state"] == "unhealthy"
