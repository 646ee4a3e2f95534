"""The monitoring role reads only metrics that exist: every PromQL query of its dashboards
and alert rules names metrics the exporters really serve, and the lab's DCGM stand-in
serves the real exporter's names.

The name lists are test data, each from its source: the engine's from
``shared/reference/engine.md`` (Aphrodite 0.24.1), DCGM's from the exporter's shipped
``default-counters.csv`` (and ``dcp-metrics-included.csv``), HAProxy's as HAProxy 3.0's
built-in exporter serves them (read from the lab's load balancer), the blackbox
exporter's and Prometheus' own from their documentation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "monitoring"
DASHBOARDS = sorted((ROLE / "files" / "dashboards").glob("*.json"))
RULES_TEMPLATE = ROLE / "templates" / "etc" / "prometheus" / "rules" / "aphrodite.rules.yml.j2"
DCGM_STANDIN = ROOT / "lab" / "fixtures" / "dcgm" / "dcgm_standin.py"
DATASOURCE_UID = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__monitoring_grafana_datasource_uid"]

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _histogram(name: str) -> set:
    return {name + suffix for suffix in _HISTOGRAM_SUFFIXES}


ENGINE_METRICS = {
    f"aphrodite:{name}" for name in (
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
        "generation_tokens_total", "num_preemptions_total", "request_success_total")
} | set().union(*(_histogram(f"aphrodite:{name}") for name in (
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds")))

DCGM_METRICS = {
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    # Profiling (DCP) fields, with -f /etc/dcgm-exporter/dcp-metrics-included.csv and SYS_ADMIN.
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES",
}

HAPROXY_METRICS = {
    f"haproxy_frontend_{name}" for name in (
        "status", "current_sessions", "sessions_total", "bytes_in_total", "bytes_out_total",
        "requests_denied_total", "request_errors_total", "http_requests_total", "http_responses_total",
        "http_requests_rate_max", "connections_total", "denied_connections_total", "internal_errors_total")
} | {
    f"haproxy_backend_{name}" for name in (
        "status", "active_servers", "backup_servers", "current_queue", "current_sessions", "sessions_total",
        "http_requests_total", "http_responses_total", "connection_errors_total", "response_errors_total",
        "retry_warnings_total", "redispatch_warnings_total", "queue_time_average_seconds",
        "response_time_average_seconds", "total_time_average_seconds", "max_queue_time_seconds",
        "max_response_time_seconds", "bytes_in_total", "bytes_out_total", "internal_errors_total")
} | {
    f"haproxy_server_{name}" for name in (
        "status", "current_sessions", "sessions_total", "current_queue", "http_responses_total",
        "connection_errors_total", "response_errors_total", "check_status", "check_failures_total",
        "check_up_down_total", "downtime_seconds_total", "queue_time_average_seconds",
        "response_time_average_seconds", "total_time_average_seconds", "max_response_time_seconds",
        "weight", "bytes_in_total", "bytes_out_total", "internal_errors_total")
}

BLACKBOX_METRICS = {"probe_success", "probe_duration_seconds", "probe_ssl_earliest_cert_expiry",
                    "probe_ssl_last_chain_expiry_timestamp_seconds", "probe_tls_version_info"}
PROMETHEUS_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# The node exporter's filesystem collector (node_exporter collector/filesystem_common.go).
NODE_METRICS = {"node_filesystem_avail_bytes", "node_filesystem_size_bytes", "node_filesystem_free_bytes",
                "node_filesystem_readonly", "node_filesystem_files", "node_filesystem_files_free",
                "node_filesystem_device_error"}

# What the edge's Lua prints on /metrics/usage (its "# TYPE" lines; histograms in series).
EDGE_LUA = ROOT / "roles" / "haproxy" / "files" / "etc" / "haproxy" / "edge.lua"
EDGE_METRICS = set().union(*(
    _histogram(name) if kind == "histogram" else {name}
    for name, kind in re.findall(r"# TYPE (aphrodite_edge_\w+) (\w+)", EDGE_LUA.read_text())))

KNOWN = ENGINE_METRICS | DCGM_METRICS | HAPROXY_METRICS | BLACKBOX_METRICS | PROMETHEUS_METRICS | NODE_METRICS | EDGE_METRICS

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                          # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                         # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        word = match.group(0)
        if word.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (proxy) (rate(haproxy_frontend_http_requests_total{proxy="fe_api"}[5m]))',
     {"haproxy_frontend_http_requests_total"}),
    ("histogram_quantile(0.95, sum by (le) (rate(aphrodite:time_to_first_token_seconds_bucket[$__rate_interval])))",
     {"aphrodite:time_to_first_token_seconds_bucket"}),
    ('haproxy_backend_status{state="DOWN"} == 1 and on (job, instance, proxy) group by (job, instance, proxy) '
     "(haproxy_server_status)", {"haproxy_backend_status", "haproxy_server_status"}),
    ('probe_ssl_earliest_cert_expiry{job="tls"} - time() < 14 * 86400', {"probe_ssl_earliest_cert_expiry"}),
    ("max_over_time(DCGM_FI_DEV_XID_ERRORS[10m]) > 0 offset 5m", {"DCGM_FI_DEV_XID_ERRORS"}),
    ("vector(1)", set()),
    ('aphrodite_requests_total{endpoint="/v1/chat"}', {"aphrodite_requests_total"}),
])
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


# --------------------------------------------------------------------------- dashboards
def _dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def _targets(path: Path) -> list:
    return [(panel, target) for panel in _dashboard(path)["panels"] for target in panel.get("targets", [])]


def test_the_role_ships_dashboards():
    assert DASHBOARDS, "roles/monitoring/files/dashboards/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_queries_the_provisioned_prometheus(path):
    dashboard = _dashboard(path)
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert panel["title"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_names_real_metrics(path):
    for panel, target in _targets(path):
        names = metric_names(target["expr"])
        assert names, f"{panel['title']}: {target['expr']} selects no metric"
        unknown = names - KNOWN
        assert not unknown, f"{panel['title']}: {target['expr']} names {sorted(unknown)}, which no exporter serves"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_do_not_overlap(path):
    cells: dict = {}
    for panel in _dashboard(path)["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def _all_queries() -> list:
    return [target["expr"] for path in DASHBOARDS for _panel, target in _targets(path)]


@pytest.mark.parametrize(("title", "metric"), [
    ("Requests per second", "haproxy_"),
    ("p95", "aphrodite:time_to_first_token_seconds_bucket"),
    ("GPU utilisation", "DCGM_FI_DEV_GPU_UTIL"),
    ("KV-cache usage", "aphrodite:kv_cache_usage_perc"),
])
def test_the_deployment_guides_panels_exist_with_real_metrics(title, metric):
    """The guide's four panels, on the metrics that exist (its own names do not)."""
    panels = [(panel, target) for path in DASHBOARDS for panel, target in _targets(path) if title in panel["title"]]
    assert panels, f"no panel titled {title!r}"
    assert any(metric in target["expr"] for _panel, target in panels)
    if title == "p95":
        assert any(target["expr"].startswith("histogram_quantile(0.95,") for _panel, target in panels)


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every query (as a recording rule; Grafana's $__rate_interval as 1m)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/bootstrap.sh (Debian package prometheus)"
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{index}", "expr": expr.replace("$__rate_interval", "1m")}
        for index, expr in enumerate(_all_queries())]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- alert rules
def _rule_exprs() -> dict:
    """alert -> expr of the rules template (thresholds are Jinja; the metric names are not)."""
    text = re.sub(r"{{[^}]*}}", "1", RULES_TEMPLATE.read_text().split("\n", 1)[1])
    text = re.sub(r"{%.*?%}", "", text)
    return {rule["alert"]: rule["expr"] for group in yaml.safe_load(text)["groups"] for rule in group["rules"]}


@pytest.mark.parametrize(("alert", "expr"), sorted(_rule_exprs().items()))
def test_every_alert_rule_names_real_metrics(alert, expr):
    unknown = metric_names(expr) - KNOWN
    assert not unknown, f"{alert}: {expr} names {sorted(unknown)}, which no exporter serves"


# --------------------------------------------------------------------------- the lab's DCGM stand-in
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_standin(env: dict, *args: str) -> tuple:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(DCGM_STANDIN), "-a", f"127.0.0.1:{port}", *args],
                            env={"PATH": os.environ.get("PATH", ""), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


def _scrape(port: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:  # noqa: S310
                return response.read().decode()
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _standin_samples(env: dict) -> list[str]:
    """The sample lines the DCGM stand-in serves in a container with ``env``."""
    proc, port = _serve_standin(env)
    try:
        text = _scrape(port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_dcgm_standin_serves_the_real_names_for_each_cdi_gpu():
    samples = _standin_samples({"LAB_GPU_0": "present", "LAB_GPU_2": "present", "LAB_CDI": "aphrodite-lab"})
    served = {line.split("{", 1)[0] for line in samples}
    assert served <= DCGM_METRICS, sorted(served - DCGM_METRICS)
    # Everything the dashboards and rules read from DCGM is there for the lab to show.
    wanted = {name for expr in _all_queries() + list(_rule_exprs().values())
              for name in metric_names(expr) if name.startswith("DCGM_")}
    assert wanted <= served, sorted(wanted - served)
    gpus = {re.search(r'gpu="(\d+)"', line).group(1) for line in samples}
    assert gpus == {"0", "2"}
    assert all('UUID="GPU-' in line and 'modelName="' in line for line in samples)
    xid = [line for line in samples if line.startswith("DCGM_FI_DEV_XID_ERRORS")]
    assert [line.rsplit(" ", 1)[1] for line in xid] == ["0", "0"]


def test_dcgm_standin_reports_the_gpus_and_driver_its_cdi_spec_names():
    samples = _standin_samples({"LAB_GPU_0": "present", "LAB_DRIVER": "570.172.08",
                                "LAB_GPU_MODEL": "NVIDIA L40S", "LAB_GPU_MEMORY_MIB": "46068"})
    assert all('modelName="NVIDIA L40S"' in line and 'DCGM_FI_DRIVER_VERSION="570.172.08"' in line
               for line in samples)
    memory = {line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in samples
              if line.startswith(("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED"))}
    # Used and free add up to the L40S's memory less the driver's reserved part.
    assert 0 < 46068 - memory["DCGM_FI_DEV_FB_USED"] - memory["DCGM_FI_DEV_FB_FREE"] <= 1024


@pytest.mark.parametrize(("env", "args", "rc", "message"), [
    ({}, (), 1, "no GPUs found"),
    ({"LAB_GPU_0": "present"}, ("--no-such-flag",), 2, "flag provided but not defined: --no-such-flag"),
])
def test_dcgm_standin_fails_like_the_exporter(env, args, rc, message):
    proc, _port = _serve_standin(env, *args)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == rc
    assert message in err
