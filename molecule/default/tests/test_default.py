"""site.yml end to end, checked on the running services rather than in the files the roles wrote."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import testinfra

CLIENT_KEY = "test-client-key-51c8e0f2a9d37b64"
SERVED = "llama-8b"  # served_model_name: what clients ask for and the engine answers to
MAX_NUM_SEQS = 64  # engine_args max-num-seqs
PROMETHEUS_PASSWORD = "test-prometheus-password-8e2d5b7c1f"  # molecule.yml, group_vars monitoring
LINK = "/etc/aphrodite/link-tls"  # the engine link's CA, certificate and key on every host of the link


def _host(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}")


@pytest.fixture(scope="module")
def lb():
    return _host("mol-lb1")


@pytest.fixture(scope="module")
def gpu():
    return _host("mol-gpu1")


@pytest.fixture(scope="module")
def nfs():
    return _host("mol-nfs1")


def _address(h) -> str:
    return h.ansible.get_variables()["ansible_host"]


def test_service_account_cannot_log_in(host):
    user = host.user("aphrodite")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert user.group == "aphrodite"


def test_fleet_directories_closed_to_others(host):
    for path in ("/etc/aphrodite", "/var/lib/aphrodite"):
        directory = host.file(path)
        assert directory.is_directory
        assert directory.mode == 0o750


def test_journald_runs_with_the_bounded_persistent_journal(host):
    assert host.service("systemd-journald").is_running
    with host.sudo():
        machine_id = host.file("/etc/machine-id").content_string.strip()
        assert host.file(f"/var/log/journal/{machine_id}").is_directory
        report = host.check_output("journalctl --no-pager -b -u systemd-journald")
    assert re.search(r"System Journal \(/var/log/journal/\w+\) is .*, max 2(\.0)?G", report)


def test_no_unit_failed_on_a_converged_host(host):
    """A converged host is `running`, not `degraded`: a unit of the collection that fails on
    its first start (the log vacuum's timer fired before any journal had arrived) shows here,
    not first on a user's server."""
    failed = host.check_output("systemctl --failed --no-legend --plain")
    assert failed == "", f"failed units: {failed}"


def _replicas(gpu) -> list[dict]:
    with gpu.sudo():
        names = gpu.check_output("docker ps --filter label=io.aphrodite.replica --format '{{.Names}}'").split()
        return [json.loads(gpu.check_output(f"docker inspect {n}"))[0] for n in sorted(names)]


def test_replicas_run_with_exactly_their_planned_gpus(gpu):
    replicas = _replicas(gpu)
    assert [r["Config"]["Labels"]["io.aphrodite.replica"] for r in replicas] == ["llama-3-1-8b-0", "llama-3-1-8b-1"]
    devices = [r["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] for r in replicas]
    assert devices == [["nvidia.com/gpu=0"], ["nvidia.com/gpu=1"]]
    for replica in replicas:
        # The key reaches the engine by environment file, never on its command line.
        assert not any("test-engine-key" in arg for arg in replica["Args"])
        assert replica["HostConfig"]["NetworkMode"] == "host"


def test_each_replica_serves_the_staged_model_with_its_devices(lb, gpu, nfs):
    with nfs.sudo():
        exported = nfs.check_output(
            "sha256sum /srv/exports/models/meta-llama/Llama-3.1-8B-Instruct/config.json").split()[0]
    for port, device in ((2242, 0), (2243, 1)):
        # Over the engine link's TLS, with the load balancer's certificate of the edge CA.
        with lb.sudo():
            report = json.loads(lb.check_output(
                f"curl -sf --cacert {LINK}/ca.crt --cert {LINK}/link.pem --key {LINK}/link.pem.key "
                f"https://{_address(gpu)}:{port}/lab/report"))
        assert report["cdi_devices"] == [device]
        assert report["model_config_sha256"] == exported
        assert report["served_model_names"] == [SERVED]
        argv = report["argv"]
        assert argv[argv.index("--max-num-seqs") + 1] == str(MAX_NUM_SEQS) and "--enable-prefix-caching" in argv
        assert report["host"] == _address(gpu)


def test_engine_ports_are_closed_to_everyone_but_the_edge_and_monitoring(gpu):
    # This machine is outside the fleet: the firewall drops it.
    with pytest.raises(OSError):
        socket.create_connection((_address(gpu), 2242), timeout=3).close()


def test_a_chat_completion_through_the_edge(lb):
    with lb.sudo():
        ca = lb.file("/etc/haproxy/pki/ca.crt").content_string
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = False  # the certificate names the LB's private address and name
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
    request = urllib.request.Request(f"https://{_address(lb)}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        answer = json.loads(response.read())
    assert response.status == 200
    assert answer["model"] == SERVED and answer["choices"][0]["message"]["content"]


def test_haproxy_admits_each_replica_its_max_num_seqs(lb):
    # HAProxy's own view (its Prometheus exporter, also bound to loopback), not its configuration file.
    metrics = lb.check_output("curl -sf http://127.0.0.1:8405/metrics")
    limits = re.findall(r'^haproxy_server_limit_sessions\{[^}]*server="llama-3-1-8b-\d+"[^}]*\} (\d+)', metrics, re.M)
    assert sorted(limits) == [str(MAX_NUM_SEQS)] * 2, limits


def test_the_edge_refuses_a_request_without_a_key(lb):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(f"https://{_address(lb)}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code == 401


def test_prometheus_scrapes_the_replicas(nfs):
    # From this machine (the admin network), with Prometheus' basic auth.
    request = urllib.request.Request(f"http://{_address(nfs)}:9090/api/v1/targets")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"aphrodite:{PROMETHEUS_PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (lab address)
        targets = json.loads(response.read())["data"]["activeTargets"]
    engines = [t for t in targets if t["labels"].get("replica", "").startswith("llama-3-1-8b-")]
    assert sorted(t["labels"]["replica"] for t in engines) == ["llama-3-1-8b-0", "llama-3-1-8b-1"]
    assert all(t["health"] == "up" for t in engines), [(t["labels"]["replica"], t["lastError"]) for t in engines]
    # Over the engine link's TLS: each engine requires Prometheus' client certificate.
    assert all(t["scrapeUrl"].startswith("https://") for t in engines), [t["scrapeUrl"] for t in engines]


def test_status_reaches_every_replica_over_the_engine_link():
    # aphrodite-deploy status probes /health and /metrics from the load balancer, which the
    # engines answer only over TLS with its certificate of the edge CA.
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    proc = subprocess.run([sys.executable, "-m", "aphrodite_deploy", "status", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
                           "--json", "--quiet"], capture_output=True, text=True, cwd=project, timeout=300,
                          env=dict(os.environ, PYTHONPATH=project), check=False)
    payload = json.loads(proc.stdout)
    states = {r["name"]: r["state"] for r in payload["replicas"]}
    assert proc.returncode == 0 and set(states.values()) == {"serving"}, (states, proc.stderr[-2000:])
    for replica in payload["replicas"]:
        assert {v["status"] for v in replica["health"].values()} == {200}
        assert replica["metrics"]["requests_running"] is not None


def test_switching_the_link_of_serving_replicas_is_refused_before_any_change(gpu):
    """The replicas serve over the engine link's TLS; a run that turns it off would replace
    them one by one while HAProxy still speaks TLS to them, taking each out of the pool.  It
    stops in the engine role's preflight instead, names both ways out, and changes nothing."""
    listing = "docker ps --all --no-trunc --filter label=io.aphrodite.replica --format '{{.ID}} {{.State}}'"
    with gpu.sudo():
        before = sorted(gpu.check_output(listing).splitlines())
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    proc = subprocess.run([str(os.path.join(os.path.dirname(sys.executable), "ansible-playbook")), "site.yml",
                           "-i", os.environ["MOLECULE_INVENTORY_FILE"], "--tags", "engines",
                           "-e", "aphrodite_engine_tls=false"],
                          capture_output=True, text=True, cwd=project, timeout=900, check=False)
    # Ansible prints a failed task's message on stderr.
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, said[-3000:]
    assert "serve over TLS" in said and "Nothing was changed" in said, said[-3000:]
    assert "aphrodite_engine_tls: true" in said and "docker rm -f" in said, said[-3000:]
    recap = re.findall(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)", proc.stdout, re.M)
    assert recap and all(changed == "0" for _, changed in recap), recap
    with gpu.sudo():
        assert sorted(gpu.check_output(listing).splitlines()) == before
    assert before and all(line.endswith(" running") for line in before), before
