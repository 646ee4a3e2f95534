"""Central logs (roles/logs), checked on the monitoring host's received journals: a line
logged on the load balancer, HAProxy's access log line of a real request and the engine
containers' output arrive within seconds and are found by host, unit and time; a client
without a certificate of the fleet CA is refused; the retention settings are in force.
The uploads cross site.yml's firewall, which opens the receiver to the fleet's hosts only."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import uuid

import pytest

REMOTE = "/var/log/journal/remote"
CERT = "/etc/aphrodite/logs/host.crt"
API_KEY = "test-monitoring-key-3c9d1e7a5b2f4680"  # molecule.yml, the key named probe; a test value
ARRIVAL = 30  # seconds within which a line must be searchable on the monitoring host


def _groups(host) -> list[str]:
    return host.ansible.get_variables().get("group_names", [])


def _host_of(host, group: str):
    names = host.ansible.get_variables()["groups"][group]
    return host.get_host(f"ansible://{names[0]}", ansible_inventory=host.backend.ansible_inventory)


def _address(host) -> str:
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def monitoring(host):
    if "monitoring" not in _groups(host):
        pytest.skip("checked once, on the monitoring host")
    return host


def _search(mon, *args: str) -> str:
    """journalctl on the received journals; each of ``args`` one word (testinfra quotes each)."""
    with mon.sudo():
        return mon.check_output("journalctl --no-pager -o cat --directory=%s" + " %s" * len(args), REMOTE, *args)


def _arrives(mon, needle: str, *args: str) -> float:
    """Seconds until ``needle`` is in the received journals searched with ``args``."""
    start = time.monotonic()
    while True:
        if needle in _search(mon, *args):
            return time.monotonic() - start
        assert time.monotonic() - start < ARRIVAL, f"{needle!r} not on the monitoring host within {ARRIVAL} s ({args})"
        time.sleep(1)


def _all_hosts(mon) -> list:
    return [mon.get_host(f"ansible://{name}", ansible_inventory=mon.backend.ansible_inventory)
            for name in mon.ansible.get_variables()["groups"]["all"]]


def test_a_line_logged_on_every_host_arrives_within_seconds_by_host(monitoring):
    hosts = {h.check_output("hostname"): h for h in _all_hosts(monitoring)}
    since = int(time.time()) - 1
    markers = {}
    for name, fleet_host in hosts.items():
        markers[name] = f"aphrodite-logtest {name} {uuid.uuid4()}"
        fleet_host.check_output("logger -t aphrodite-logtest %s", markers[name])
    for name, marker in markers.items():
        took = _arrives(monitoring, marker, f"_HOSTNAME={name}", "--identifier=aphrodite-logtest", f"--since=@{since}")
        print(f"{name}: marker arrived in {took:.1f} s")
        # Found by host: no other host's entries hold it.
        others = [f"_HOSTNAME={other}" for other in hosts if other != name]
        assert marker not in _search(monitoring, *others, f"--since=@{since}")


def test_haproxys_access_log_line_of_a_request_arrives_by_unit(monitoring):
    """The access log line of a chat completion: key name, model and status, never the key
    nor the query string (a client may put a key there)."""
    lb = _host_of(monitoring, "loadbalancers")
    name = lb.check_output("hostname")
    # Clients ask for the name the model is served as; the log line carries that name.
    spec = monitoring.ansible.get_variables()["aphrodite_models"][0]
    model = spec.get("served_model_name") or spec["id"]
    since = int(time.time()) - 1
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the edge's TLS is the edge scenario's test
    secret = f"query-secret-{uuid.uuid4()}"
    connection = http.client.HTTPSConnection(_address(lb), 443, timeout=30, context=context)
    connection.connect()
    # HAProxy logs the client's address and port: this request's line, and no other.
    client = "%s:%d " % connection.sock.getsockname()[:2]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
    connection.request("POST", f"/v1/chat/completions?api_key={secret}", body=body,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    took = _arrives(monitoring, client, f"_HOSTNAME={name}", "--unit=haproxy.service", f"--since=@{since}")
    print(f"HAProxy's line arrived in {took:.1f} s")
    line = next(li for li in _search(monitoring, f"_HOSTNAME={name}", "--unit=haproxy.service",
                                     f"--since=@{since}").splitlines() if client in li)
    assert 'key="probe"' in line and f'model="{model}"' in line, line
    assert " 200 " in line and '"POST /v1/chat/completions HTTP/' in line, line
    assert API_KEY not in line and secret not in line and "?" not in line, line


def test_the_engine_containers_output_is_there_by_container_name(monitoring):
    gpu = _host_of(monitoring, "gpu_nodes")
    name = gpu.check_output("hostname")
    with gpu.sudo():
        containers = gpu.check_output("docker ps --filter label=io.aphrodite.replica --format '{{.Names}}'").split()
        drivers = {c: gpu.check_output("docker inspect --format '{{.HostConfig.LogConfig.Type}}' %s", c) for c in containers}
    assert containers and set(drivers.values()) == {"journald"}, drivers
    for container in containers:
        _arrives(monitoring, "aphrodite-standin", f"_HOSTNAME={name}", f"CONTAINER_NAME={container}")


def _upload_status(lb, mon, cert: str, key: str) -> str:
    """The receiver's answer to an empty upload sent from the load balancer with this client
    certificate: an HTTP status, or 000 when the TLS handshake itself was refused.  From a
    fleet host, since the firewall lets no one else reach the receiver."""
    url = f"https://{_address(mon)}:19532/upload"
    with lb.sudo():
        result = lb.run("curl --silent --output /dev/null --write-out '%%{http_code}' --max-time 10 "
                        "--cacert /etc/aphrodite/logs/ca.crt --cert %s --key %s "
                        "--header 'Content-Type: application/vnd.fdo.journal' --data-binary '' %s", cert, key, url)
    return result.stdout.strip()


def test_a_client_without_a_fleet_ca_certificate_is_refused(monitoring):
    lb = _host_of(monitoring, "loadbalancers")
    # The load balancer's own certificate is let in (the control: an empty upload is no 401)...
    allowed = _upload_status(lb, monitoring, "/etc/aphrodite/logs/host.crt", "/etc/aphrodite/logs/host.key")
    assert allowed not in ("000", "401"), allowed
    # ...one with the same name, self-signed, is not.
    name = lb.check_output("hostname")
    fake = "/tmp/aphrodite-logtest-fake"
    with lb.sudo():
        lb.check_output(f"rm -rf {fake} && install -d -m 0700 {fake} && openssl req -x509 -newkey ec "
                        f"-pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN={name} "
                        f"-keyout {fake}/c.key -out {fake}/c.crt 2>/dev/null")
    try:
        refused = _upload_status(lb, monitoring, f"{fake}/c.crt", f"{fake}/c.key")
    finally:
        with lb.sudo():
            lb.check_output(f"rm -rf {fake}")
    assert refused in ("000", "401"), refused


def test_retention_is_configured_and_enforced(monitoring):
    variables = monitoring.ansible.get_variables()
    with monitoring.sudo():
        config = monitoring.check_output("systemd-analyze cat-config systemd/journal-remote.conf")
        assert f"MaxUse={variables['logs_max_use']}" in config
        assert monitoring.service("aphrodite-logs-vacuum.timer").is_enabled
        assert monitoring.service("aphrodite-logs-vacuum.timer").is_running
        vacuum = monitoring.check_output("systemctl cat aphrodite-logs-vacuum.service")
        assert f"--vacuum-size={variables['logs_max_use']}" in vacuum
        assert f"--vacuum-time={variables['logs_max_age']}" in vacuum
        monitoring.check_output("systemctl start aphrodite-logs-vacuum.service")
        # journal-remote read every key (an older systemd would name the ones it does not know).
        remote_log = monitoring.check_output("journalctl --no-pager -o cat -u systemd-journal-remote.service")
        assert "Unknown key" not in remote_log, remote_log


def test_a_certificate_due_for_renewal_sends_its_host_through_the_role(monitoring):
    """The fast path's record holds the probe's answer for each host's log certificate at the
    renewal margin (logs_renew_days, 30, less a day): now "valid", and once the certificate
    comes within it the answer is "renew" (tests/unit/plugins/module_utils/test_cert_expiry.py),
    so the host runs the role, which signs it again.  openssl agrees on the live certificate,
    at the margin and past its end (397 days), since the clock cannot be moved."""
    margin = (30 - 1) * 86400
    for node in _all_hosts(monitoring):
        with node.sudo():
            record = json.loads(node.file("/var/lib/aphrodite/converged.json").content_string)
            recorded = record["snapshot"]["logs"]
            assert recorded["certificates"] == {f"{CERT} within 29 days": "valid"}, (node.backend.host, recorded)
            assert not recorded["commands"], "no process for it any more"
            assert node.run(f"openssl x509 -noout -in {CERT} -checkend {margin}").rc == 0
            due = node.run(f"openssl x509 -noout -in {CERT} -checkend {398 * 86400}")
            assert due.rc == 1 and "will expire" in due.stdout, node.backend.host
