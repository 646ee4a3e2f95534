"""Monitoring, checked through the running services: Prometheus' HTTP API, the exporters'
sockets, Docker on the GPU node, promtool on the monitoring host and the edge itself."""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "monitoring"
DASHBOARDS = sorted((ROLE / "files" / "dashboards").glob("*.json"))
# Matches molecule.yml (the key named probe; a test value) and the name the model is served as.
API_KEY = "test-monitoring-key-3c9d1e7a5b2f4680"
MODEL = "llama-8b"
TIMEOUT = 90
# Prometheus' basic auth (molecule.yml, group_vars monitoring; a test value).
PROMETHEUS_AUTH = ("aphrodite", "test-prometheus-password-8e2d5b7c1f")


def _groups(host) -> list[str]:
    return host.ansible.get_variables().get("group_names", [])


def _address(host) -> str:
    return host.ansible.get_variables()["ansible_host"]


def _monitoring_only(host) -> None:
    """Scenario-wide checks run once, from the monitoring host's point of view."""
    if "monitoring" not in _groups(host):
        pytest.skip("checked once, on the monitoring host")


def _host_of(host, group: str):
    names = host.ansible.get_variables()["groups"][group]
    return host.get_host(f"ansible://{names[0]}", ansible_inventory=host.backend.ansible_inventory)


def _request(url: str, auth: tuple[str, str] | None = None, method: str = "GET") -> urllib.request.Request:
    """A request, with HTTP basic auth when ``auth`` (user, password) is given."""
    request = urllib.request.Request(url, method=method)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    return request


def _get(url: str, timeout: float = 10, auth: tuple[str, str] | None = None) -> dict:
    with urllib.request.urlopen(_request(url, auth), timeout=timeout) as response:  # noqa: S310 (lab addresses)
        return json.loads(response.read())


@pytest.fixture(scope="module")
def prometheus(host) -> str:
    return f"http://{_address(_host_of(host, 'monitoring'))}:9090"


def _query(prometheus: str, expr: str) -> list:
    data = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), auth=PROMETHEUS_AUTH)
    assert data["status"] == "success", data
    return data["data"]["result"]


def _targets(prometheus: str) -> list:
    return _get(f"{prometheus}/api/v1/targets?state=active", auth=PROMETHEUS_AUTH)["data"]["activeTargets"]


@pytest.fixture(scope="module")
def engine_replicas(host) -> dict:
    """Replica -> (model, port) of the engine containers Docker runs on the GPU node."""
    _monitoring_only(host)
    gpu = _host_of(host, "gpu_nodes")
    with gpu.sudo():
        out = gpu.check_output("docker ps --filter label=io.aphrodite.replica "
                               "--format '{{json .Labels}}'")
    replicas = {}
    for line in out.splitlines():
        labels = dict(item.split("=", 1) for item in json.loads(line).split(","))
        replicas[labels["io.aphrodite.replica"]] = (labels["io.aphrodite.model"], labels["io.aphrodite.port"])
    assert replicas, "prepare.yml should have started stand-in engines"
    return replicas


@pytest.fixture(scope="module")
def traffic(host, prometheus) -> float:
    """Chat completions through the edge, so that request, latency and token series move;
    when they were sent (a rate must look back that far: tests of other hosts run between)."""
    _monitoring_only(host)
    lb = _address(_host_of(host, "loadbalancers"))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the lab's private edge CA; TLS itself is the edge scenario's test
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 4}).encode()
    for _ in range(12):
        request = urllib.request.Request(f"https://{lb}/v1/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {API_KEY}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30, context=context) as response:  # noqa: S310
            assert response.status == 200
    sent = time.time()
    # Two scrapes (5 s apart in this scenario) of every target after the traffic.
    time.sleep(12)
    return sent


def _wait(check, timeout: float = TIMEOUT, delay: float = 2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)


# --------------------------------------------------------------------------- targets
def test_every_target_is_up_and_every_host_engine_and_lb_is_scraped(host, prometheus, engine_replicas):
    _monitoring_only(host)
    groups = host.ansible.get_variables()["groups"]

    def check():
        targets = _targets(prometheus)
        down = [(t["labels"]["job"], t["labels"]["instance"], t["lastError"]) for t in targets if t["health"] != "up"]
        assert not down, f"targets not up: {down}"
        return targets

    targets = _wait(check)
    by_job: dict = {}
    # The alert recorder's TLS endpoint, a fixture of this scenario probed as job tls.
    for target in (t for t in targets if t["labels"]["instance"] != "tls-fixture"):
        by_job.setdefault(target["labels"]["job"], []).append(target["labels"])
    for job, group in (("node", "all"), ("dcgm", "gpu_nodes"), ("haproxy", "loadbalancers"),
                       ("tls", "loadbalancers"), ("alertmanager", "monitoring")):
        # A host of two groups (the NFS server that is also the monitoring host) is listed twice in "all".
        assert sorted(t["instance"] for t in by_job[job]) == sorted(set(groups[group])), job
    engines = {t["replica"]: (t["model"], t["instance"].rsplit(":", 1)[1]) for t in by_job["aphrodite-engine"]}
    assert engines == engine_replicas


def test_exporters_listen_only_on_the_private_address(host):
    address = _address(host)
    assert host.socket(f"tcp://{address}:9100").is_listening
    assert not host.socket("tcp://0.0.0.0:9100").is_listening
    if "gpu_nodes" in _groups(host):
        assert host.socket(f"tcp://{address}:9400").is_listening
        assert not host.socket("tcp://0.0.0.0:9400").is_listening


def test_dcgm_exporter_sees_every_gpu_of_the_node(host, prometheus):
    _monitoring_only(host)
    gpu = _host_of(host, "gpu_nodes")
    name = gpu.ansible.get_variables()["inventory_hostname"]
    with gpu.sudo():
        inspect = json.loads(gpu.check_output("docker inspect dcgm-exporter"))[0]
    requests = inspect["HostConfig"]["DeviceRequests"]
    assert [(r["Driver"], r["DeviceIDs"]) for r in requests] == [("cdi", ["nvidia.com/gpu=all"])]
    assert inspect["HostConfig"]["NetworkMode"] == "host"
    # The lab's CDI spec has eight devices; all of them reach the exporter.
    result = _wait(lambda: _nonempty(_query(prometheus, f'DCGM_FI_DEV_GPU_UTIL{{instance="{name}"}}')))
    assert sorted(int(r["metric"]["gpu"]) for r in result) == list(range(8))


def _nonempty(result: list) -> list:
    assert result
    return result


# --------------------------------------------------------------------------- dashboards
def _panel_queries() -> list:
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append(pytest.param(target["expr"], id=f"{path.stem}:{panel['title']}:{target['refId']}"))
    return queries


# Rates of what the traffic fixture does not cause: it sends no failing request.
_NO_TRAFFIC = ('code=~"4..|5.."',)


@pytest.mark.parametrize("expr", _panel_queries())
def test_dashboard_query_returns_data(host, prometheus, traffic, expr):
    """Every panel has data; a rate (or a quantile of rates) the traffic moved is above zero.
    A series Prometheus first sees after the traffic shows no increase: its rate is 0 and a
    quantile of it NaN, which is what a panel would show for the first requests in production."""
    _monitoring_only(host)
    # Grafana's own variable: a window that holds several scrapes and reaches back to the
    # traffic (a histogram_quantile of rates without requests in the window is NaN).
    window = max(60, int(time.time() - traffic) + 30)
    promql = expr.replace("$__rate_interval", f"{window}s")
    moved = "rate(" in expr and not any(marker in expr for marker in _NO_TRAFFIC)

    def check():
        result = _query(prometheus, promql)
        values = [float(r["value"][1]) for r in result]
        assert any(not math.isnan(v) for v in values), f"{promql} returned {result}"
        if moved:
            assert any(v > 0 for v in values), f"{promql} saw no traffic: {result}"

    _wait(check, timeout=60)


# --------------------------------------------------------------------------- rules and alerts
def test_prometheus_loaded_every_rule(host, prometheus):
    _monitoring_only(host)
    groups = _get(f"{prometheus}/api/v1/rules", auth=PROMETHEUS_AUTH)["data"]["groups"]
    rules = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    expected = set(re.findall(r"^\s+- alert: (\w+)$",
                              (ROLE / "templates/etc/prometheus/rules/aphrodite.rules.yml.j2").read_text(), re.M))
    assert set(rules) == expected
    assert set(rules.values()) == {"ok"}


def test_prometheus_loaded_the_scenarios_alert_durations(host, prometheus):
    """monitoring_alert_for reaches the rules Prometheus runs: the ones this scenario shortens
    wait 15 s, the others keep the role's defaults (which promtool's unit tests pin,
    tests/unit/roles/test_monitoring_rules.py)."""
    _monitoring_only(host)
    groups = _get(f"{prometheus}/api/v1/rules", auth=PROMETHEUS_AUTH)["data"]["groups"]
    durations = {rule["name"]: rule.get("duration", 0) for group in groups for rule in group["rules"]}
    shortened = host.ansible.get_variables()["monitoring_alert_for"]
    for name in shortened:
        assert durations[name] == 15, name
    assert durations["AphroditeKVCacheNearlyFull"] == 300


def test_the_watchdog_alert_reaches_alertmanager(host):
    _monitoring_only(host)
    url = f"http://{_address(host)}:9093/api/v2/alerts"

    def check():
        names = {alert["labels"]["alertname"] for alert in _get(url, auth=PROMETHEUS_AUTH)}
        assert "AphroditeMonitoringWatchdog" in names, names
        return names

    names = _wait(check)
    # Nothing is wrong in the lab: the watchdog is the only alert.
    assert names == {"AphroditeMonitoringWatchdog"}


def test_alertmanager_configuration_is_closed_to_others(host):
    _monitoring_only(host)
    config = host.file("/etc/prometheus/alertmanager.yml")
    assert config.mode == 0o640
    assert (config.user, config.group) == ("root", "prometheus")


def test_prometheus_and_alertmanager_answer_only_with_the_password(host, prometheus):
    """From the admin network (this machine): no password, a wrong one or another user get
    401 from Prometheus' UI, query API and admin API, and from Alertmanager's alerts and
    silences (a silence mutes every alert); the right one is served."""
    _monitoring_only(host)
    alertmanager = f"http://{_address(host)}:9093"
    for url, method in ((prometheus + "/graph", "GET"), (prometheus + "/api/v1/query?query=up", "GET"),
                        (prometheus + "/api/v1/admin/tsdb/snapshot", "POST"), (prometheus + "/-/ready", "GET"),
                        (alertmanager + "/api/v2/alerts", "GET"), (alertmanager + "/api/v2/silences", "POST"),
                        (alertmanager + "/-/ready", "GET")):
        for auth in (None, ("aphrodite", "wrong-password-but-16-chars"), ("admin", PROMETHEUS_AUTH[1])):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(_request(url, auth, method), timeout=10)  # noqa: S310 (lab address)
            assert refused.value.code == 401, (url, auth and auth[0])
    assert _get(f"{prometheus}/api/v1/query?query=up", auth=PROMETHEUS_AUTH)["status"] == "success"
    assert isinstance(_get(f"{alertmanager}/api/v2/silences", auth=PROMETHEUS_AUTH), list)
    # Prometheus sends the password from a file: its scrapes of itself and of Alertmanager are up.
    assert _nonempty(_query(prometheus, 'up{job="prometheus"} == 1'))
    assert _nonempty(_query(prometheus, 'up{job="alertmanager"} == 1'))


def test_prometheus_keeps_only_a_hash_of_its_password(host):
    _monitoring_only(host)
    password = PROMETHEUS_AUTH[1]
    with host.sudo():
        web = host.file("/etc/prometheus/web.yml")
        assert (web.user, web.group, web.mode) == ("root", "prometheus", 0o640)
        assert password not in web.content_string
        assert re.search(r"aphrodite: \$2b\$12\$[./A-Za-z0-9]{53}", web.content_string), web.content_string
        clear = host.file("/etc/prometheus/web.password")
        assert (clear.user, clear.group, clear.mode) == ("root", "prometheus", 0o640)
        assert password not in host.file("/etc/prometheus/prometheus.yml").content_string
        assert password not in host.check_output("ps -eo args")
        assert password not in host.check_output("journalctl -q --no-pager -n 5000")


def test_tls_probe_reports_the_certificate_the_edge_serves(host, prometheus):
    _monitoring_only(host)
    lb_host = _host_of(host, "loadbalancers")
    name = lb_host.ansible.get_variables()["inventory_hostname"]
    pem = ssl.get_server_certificate((_address(lb_host), 443))
    not_after = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()
    result = _wait(lambda: _nonempty(_query(prometheus, f'probe_ssl_earliest_cert_expiry{{instance="{name}"}}')))
    assert float(result[0]["value"][1]) == not_after


# --------------------------------------------------------------------------- an outage, last
def test_a_hung_replica_raises_its_alerts_and_comes_back(host, prometheus, engine_replicas):
    """The rules match the labels the real targets carry: a replica that stops answering
    (its container frozen) sets off AphroditeReplicaDown (Prometheus' scrapes time out) and
    AphroditeLBServerDown (HAProxy's health checks do)."""
    _monitoring_only(host)
    gpu = _host_of(host, "gpu_nodes")
    replica = sorted(engine_replicas)[0]

    def alerts() -> dict:
        found = _get(f"{prometheus}/api/v1/alerts", auth=PROMETHEUS_AUTH)["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("replica") or a["labels"].get("server")): a["state"]
                for a in found}

    with gpu.sudo():
        gpu.check_output(f"docker pause aphrodite-{replica}")
        try:
            def raised():
                active = alerts()
                assert ("AphroditeReplicaDown", replica) in active, active
                assert ("AphroditeLBServerDown", replica) in active, active

            _wait(raised, timeout=60)
        finally:
            gpu.check_output(f"docker unpause aphrodite-{replica}")

    def recovered():
        target = [t for t in _targets(prometheus) if t["labels"].get("replica") == replica]
        assert [t["health"] for t in target] == ["up"]
        assert ("AphroditeReplicaDown", replica) not in alerts()

    _wait(recovered, timeout=120)


# --------------------------------------------------------------------------- delivery
# Four faults at once, so that their alerts travel the real path together (rules in
# Prometheus, Alertmanager, the webhook) in about a minute: a stopped engine replica, a
# stopped node exporter, a full file system and a certificate about to expire.  The
# recorder (files/alert_recorder.py, on the load balancer) keeps what arrives.  Delivery
# must take less than 3 minutes; with the role's defaults (for: 2m, group_wait 30s) a
# stopped replica still does, tests/unit/roles/test_monitoring_rules.py checks the sum.
DELIVERY_LIMIT = 180
RECORDER_DIR = "/var/lib/alert-recorder"
# Not under /mnt, /run or /media: the node exporter leaves those out.
FULL_MOUNT = "/var/lib/aphrodite-full-test"


def _received(lb) -> list:
    port = lb.ansible.get_variables()["alert_recorder_port"]
    return _get(f"http://{_address(lb)}:{port}/received")


def _notified(lb, since: float, status: str, fired: dict | None = None) -> dict:
    """(alertname, key label) -> first arrival time of a notification with that status.
    ``fired``, when given, gets the same keys -> when Prometheus says the alert fired
    (``startsAt``: its ``for`` held) or resolved (``endsAt``)."""
    seen: dict = {}
    for record in _received(lb):
        if record["received_at"] < since:
            continue
        for alert in record["payload"]["alerts"]:
            if alert["status"] != status:
                continue
            labels = alert["labels"]
            key = (labels["alertname"],
                   labels.get("replica") or labels.get("server") or labels.get("mountpoint") or labels.get("instance"))
            if key not in seen and fired is not None:
                fired[key] = _epoch(alert["startsAt" if status == "firing" else "endsAt"])
            seen.setdefault(key, record["received_at"])
    return seen


def _epoch(stamp: str) -> float:
    """Alertmanager's RFC 3339 time (nanoseconds, Z or an offset) in seconds since the epoch."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, stamp
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    whole = datetime.datetime.fromisoformat(match.group(1) + zone).timestamp()
    return whole + float(match.group(2) or 0)


# Measured delays go to tests/output/molecule/ (Molecule prunes its own state directory
# after the run), or to the file APHRODITE_TEST_TIMINGS names.
TIMINGS = Path(os.environ.get("APHRODITE_TEST_TIMINGS")
               or Path(__file__).resolve().parents[3] / "tests" / "output" / "molecule" / "monitoring-alerts.txt")


def _record(what: str, seconds: float) -> None:
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    with open(TIMINGS, "a", encoding="utf-8") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {what}: {seconds:.1f} s\n")


def _certificate(lb, days: int) -> None:
    lb.check_output(f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days {days} "
                    f"-subj /CN=tls-fixture -keyout {RECORDER_DIR}/tls/key.pem.new -out {RECORDER_DIR}/tls/cert.pem.new "
                    f"2>/dev/null && mv {RECORDER_DIR}/tls/key.pem.new {RECORDER_DIR}/tls/key.pem "
                    f"&& mv {RECORDER_DIR}/tls/cert.pem.new {RECORDER_DIR}/tls/cert.pem")


def _repair(mon, gpu, lb, replica: str) -> None:
    """Undo every fault; safe to run twice."""
    with gpu.sudo():
        gpu.check_output(f"docker start aphrodite-{replica}")
    with lb.sudo():
        lb.check_output("systemctl start prometheus-node-exporter")
        _certificate(lb, 30)
    with mon.sudo():
        mon.check_output(f"if mountpoint -q {FULL_MOUNT}; then umount {FULL_MOUNT}; fi; rm -rf {FULL_MOUNT}")


@pytest.fixture(scope="module")
def outage(host, engine_replicas):
    """The faults, set off once for the delivery tests; repaired by the last test (and here
    again, whatever happened)."""
    _monitoring_only(host)
    mon, gpu, lb = host, _host_of(host, "gpu_nodes"), _host_of(host, "loadbalancers")
    replica = sorted(engine_replicas)[0]
    started = time.time()
    with gpu.sudo():
        gpu.check_output(f"docker stop aphrodite-{replica}")
    with lb.sudo():
        lb.check_output("systemctl stop prometheus-node-exporter")
        _certificate(lb, 2)
    with mon.sudo():
        mon.check_output(f"install -d -m 0755 {FULL_MOUNT} && mount -t tmpfs -o size=1m tmpfs {FULL_MOUNT} "
                         f"&& (dd if=/dev/zero of={FULL_MOUNT}/fill bs=64k 2>/dev/null || true)")
    expected = {
        ("AphroditeReplicaDown", replica),
        ("AphroditeExporterDown", lb.ansible.get_variables()["inventory_hostname"]),
        ("AphroditeDiskNearlyFull", FULL_MOUNT),
        ("AphroditeTLSCertificateExpiring", "tls-fixture"),
    }
    yield {"started": started, "expected": expected, "hosts": (mon, gpu, lb), "replica": replica}
    _repair(mon, gpu, lb, replica)


@pytest.mark.parametrize("alert", ["AphroditeReplicaDown", "AphroditeExporterDown", "AphroditeDiskNearlyFull",
                                   "AphroditeTLSCertificateExpiring"])
def test_a_fault_is_delivered_to_the_receiver_within_3_minutes(outage, alert):
    _, _, lb = outage["hosts"]
    (key,) = [k for k in outage["expected"] if k[0] == alert]

    fired: dict = {}

    def delivered():
        firing = _notified(lb, outage["started"], "firing", fired)
        assert key in firing, f"{key} not delivered yet; delivered: {sorted(firing)}"
        return firing[key]

    arrived = _wait(delivered, timeout=DELIVERY_LIMIT + 10, delay=3)
    # Where the time went: the fault until Prometheus fired (scrape, evaluation, `for`),
    # then until the receiver had it (Alertmanager's group_wait and the webhook).
    _record(f"{alert} delivered", arrived - outage["started"])
    _record(f"{alert} fired by Prometheus", fired[key] - outage["started"])
    assert arrived - outage["started"] <= DELIVERY_LIMIT


def test_the_receiver_gets_no_unrelated_alert(outage):
    """Nothing but the four faults (and what a stopped replica also sets off at the edge):
    the rules match the labels the real targets carry, no more."""
    _, _, lb = outage["hosts"]
    replica = outage["replica"]
    allowed = outage["expected"] | {("AphroditeLBServerDown", replica), ("AphroditeMonitoringWatchdog", None)}
    firing = _notified(lb, outage["started"], "firing")
    names = {(name, None if name == "AphroditeMonitoringWatchdog" else value) for name, value in firing}
    assert names <= allowed, names - allowed


def test_the_alerts_resolve_once_repaired(outage):
    mon, gpu, lb = outage["hosts"]
    repaired = time.time()
    _repair(mon, gpu, lb, outage["replica"])

    ended: dict = {}

    def resolved():
        done = _notified(lb, repaired, "resolved", ended)
        missing = outage["expected"] - set(done)
        assert not missing, f"not resolved yet: {sorted(missing)}"
        return done

    done = _wait(resolved, timeout=DELIVERY_LIMIT, delay=3)
    for key in outage["expected"]:
        _record(f"{key[0]} resolved", done[key] - repaired)
        _record(f"{key[0]} resolved by Prometheus", ended[key] - repaired)
    assert max(done[k] for k in outage["expected"]) - repaired <= DELIVERY_LIMIT
