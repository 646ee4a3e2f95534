"""The host firewall, checked by connecting: from every host, from the controller, through Docker.

Every host runs a listener on every port of the matrix (sshd and docker-proxy hold some),
then every host and the controller (this machine, the lab network's gateway) try each
(host, port).  A connection that opens was allowed; one that times out was dropped; one
that is refused means a listener is missing, which fails the test rather than pass it.
The expected matrix is issue 7's topology plus what the collection's roles declare in
their meta/firewall.yml (read here independently of the firewall's code).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra
import yaml

SCENARIO = Path(__file__).resolve().parents[1]
PROJECT = SCENARIO.parents[1]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
HELPER = "/usr/local/sbin/aphrodite-firewall"

HOSTS = ["fw-lb1", "fw-lb2", "fw-gpu1", "fw-gpu2", "fw-nfs1", "fw-probe"]
CONTROLLER = "controller"
LBS = {"fw-lb1", "fw-lb2"}
GPUS = {"fw-gpu1", "fw-gpu2"}
MONITORING = {"fw-nfs1"}
EVERYONE = set(HOSTS) | {CONTROLLER}
GROUPS = {"all": HOSTS, "loadbalancers": sorted(LBS), "gpu_nodes": sorted(GPUS), "nfs_servers": ["fw-nfs1"],
          "monitoring": sorted(MONITORING), "probes": ["fw-probe"]}
# The plan of this scenario: a two-node replica on 2242 over fw-gpu1 (head, master port
# 29501) and fw-gpu2; a single-node replica on fw-gpu1, 2243, published from a container.
ENGINE_PORTS = {"fw-gpu1": {2242, 2243}, "fw-gpu2": {2242}}

# Issue 7's topology: who may open a connection to each host and port; nobody else may.
# 40000 lies in the NCCL/Gloo range; 8080 is published by Docker on fw-gpu1 and opened by nothing.
TOPOLOGY = {
    "fw-lb1": {22: {CONTROLLER}, 443: EVERYONE, 10000: {"fw-lb2"}, 8405: MONITORING, 9100: MONITORING},
    "fw-lb2": {22: {CONTROLLER}, 443: EVERYONE, 10000: {"fw-lb1"}, 8405: MONITORING, 9100: MONITORING},
    "fw-gpu1": {22: {CONTROLLER}, 2242: LBS, 2243: LBS, 29501: {"fw-gpu2"}, 40000: {"fw-gpu2"}, 9100: MONITORING},
    "fw-gpu2": {22: {CONTROLLER}, 2242: LBS, 40000: {"fw-gpu1"}, 9100: MONITORING},
    "fw-nfs1": {22: {CONTROLLER}, 2049: GPUS},
    "fw-probe": {22: {CONTROLLER}, 9100: MONITORING},
}
BASE_PORTS = {22, 443, 10000, 8405, 9100, 2049, 2242, 2243, 29501, 40000, 8080}


def _declared() -> list:
    """(target, port, sources) that the collection's roles declare in meta/firewall.yml (TCP).

    Read here with a deliberately simple interpretation of the format, independent of the
    firewall's own code, so that a role adding a service extends the matrix by itself.
    """
    found = []
    for path in sorted((PROJECT / "roles").glob("*/meta/firewall.yml")):
        for opening in (yaml.safe_load(path.read_text()) or {}).get("openings", []):
            if opening.get("proto", "tcp") != "tcp":
                continue
            hosts = [opening["hosts"]] if isinstance(opening["hosts"], str) else opening["hosts"]
            targets = {h for g in hosts for h in GROUPS.get(g, [])}
            source = opening["from"]
            networks = source.get("networks", [])
            for target in targets:
                sources = {h for g in source.get("groups", []) for h in GROUPS.get(g, [])}
                if source.get("peers"):
                    sources |= targets
                sources |= {CONTROLLER} if "admin" in networks else set()
                sources |= EVERYONE if "clients" in networks else set()
                port = opening["port"]
                if port == {"plan": "engine"}:
                    ports = ENGINE_PORTS.get(target, set())
                elif isinstance(port, dict):
                    ports = {int(port["default"])}
                else:
                    ports = {int(p) for p in (port if isinstance(port, list) else [port]) if str(p).isdigit()}
                found += [(target, p, sources - {target}) for p in ports]
    return found


def _expected() -> dict:
    expected = {target: {port: set(sources) for port, sources in ports.items()} for target, ports in TOPOLOGY.items()}
    for target, port, sources in _declared():
        expected[target].setdefault(port, set()).update(sources)
    return {target: {port: sources - {target} for port, sources in ports.items() if sources - {target}}
            for target, ports in expected.items()}


EXPECTED = _expected()
PORTS = sorted(BASE_PORTS | {port for ports in EXPECTED.values() for port in ports})

LISTENER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:  # held by sshd, or by docker-proxy for a published port
        continue
    sock.listen(128)
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        try:
            key.fileobj.accept()[0].close()
        except OSError:
            pass
"""

PROBE = r"""
import concurrent.futures, json, socket, sys
def probe(target):
    sock = socket.socket()
    sock.settimeout(2.5)
    try:
        sock.connect((target[0], target[1]))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"
    finally:
        sock.close()
with concurrent.futures.ThreadPoolExecutor(80) as pool:
    print(json.dumps(list(pool.map(probe, json.loads(sys.argv[1])))))
"""

VRRP_RECEIVE = r"""
import json, socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
sock.settimeout(0.5)
seen, end = set(), time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        seen.add(sock.recvfrom(65535)[1][0])
    except socket.timeout:
        pass
print(json.dumps(sorted(seen)))
"""

VRRP_SEND = r"""
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
for _ in range(5):
    sock.sendto(bytes([0x31, 1, 100, 1, 0, 1, 0, 0, 10, 0, 0, 1]), (sys.argv[1], 0))
    time.sleep(0.2)
"""


def python(script: str, *args: str) -> str:
    """A shell command that runs ``script`` with python3 on a host, quoting-proof."""
    encoded = base64.b64encode(script.encode()).decode()
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    return f"python3 -c \"import base64; exec(base64.b64decode('{encoded}'))\" {quoted}"


def connects(address: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1.5) as sock:
            sock.settimeout(1.5)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def playbook(*args: str, wait: bool = True):
    binary = Path(sys.executable).with_name("ansible-playbook")
    env = dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    command = [str(binary), "-i", INVENTORY, *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
                          timeout=600, env=env)


def probe_state(source, address: str, port: int) -> str:
    """open, refused (allowed, nobody listens) or timeout (dropped), seen from ``source``."""
    return json.loads(source.check_output(python(PROBE, json.dumps([[address, port]]))))[0]


def status(host) -> dict:
    with host.sudo():
        return json.loads(host.check_output(f"{HELPER} status"))


@pytest.fixture(scope="session")
def fleet() -> dict:
    return {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY) for name in HOSTS}


@pytest.fixture(scope="session")
def addresses(fleet) -> dict:
    return {name: host.ansible.get_variables()["ansible_host"] for name, host in fleet.items()}


@pytest.fixture(scope="session")
def matrix(fleet, addresses) -> dict:
    """(source, target, port) -> open / timeout / refused, for every source and target."""
    for host in fleet.values():
        with host.sudo():
            host.run("systemctl stop fw-test-listeners")
            host.check_output("systemd-run --unit=fw-test-listeners --collect " + python(LISTENER, *map(str, PORTS)))
    time.sleep(2)
    pairs = [(target, port) for target in HOSTS for port in PORTS]
    targets = [(addresses[target], port) for target, port in pairs]
    results = {}
    try:
        for source, host in fleet.items():
            states = json.loads(host.check_output(python(PROBE, json.dumps(targets))))
            results.update({(source, target, port): state for (target, port), state in zip(pairs, states)})
        with concurrent.futures.ThreadPoolExecutor(80) as pool:
            states = pool.map(lambda t: "open" if connects(*t, timeout=2.5) else "timeout", targets)
            results.update({(CONTROLLER, target, port): state for (target, port), state in zip(pairs, states)})
    finally:
        for host in fleet.values():
            with host.sudo():
                host.run("systemctl stop fw-test-listeners")
    return results


def test_reachable_ports_are_exactly_what_the_topology_opens(host, matrix):
    target = host.backend.get_hostname()
    refused = sorted((s, p) for (s, t, p), state in matrix.items() if t == target and state == "refused")
    assert not refused, f"{target}: no listener answered (source, port) {refused}; the test cannot judge those"
    reachable = {}
    for (source, tgt, port), state in matrix.items():
        if tgt == target and source != target and state == "open":
            reachable.setdefault(port, set()).add(source)
    assert reachable == EXPECTED[target]


def test_the_controller_keeps_ssh_and_is_the_only_admin(host):
    # testinfra itself reached the host over SSH; nobody else may (the matrix checks that).
    assert host.check_output("echo $SSH_CONNECTION").split()[2] == host.ansible.get_variables()["ansible_host"]
    with host.sudo():
        rules = host.check_output("nft list chain inet aphrodite_firewall input")
    ssh = [line.strip() for line in rules.splitlines() if 'comment "ssh"' in line]
    assert len(ssh) == 1 and re.match(r"ip saddr 172\.28\.40\.\d+ tcp dport 22 accept", ssh[0]), ssh


def test_docker_published_port_answers_the_load_balancers_only(fleet, addresses):
    gpu1 = addresses["fw-gpu1"]
    fetch = "python3 -c \"import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\" "
    # Through Docker's DNAT into the nested busybox httpd: open to the load balancers.
    assert fleet["fw-lb1"].check_output(fetch + f"http://{gpu1}:2243/") == "published by docker"
    assert fleet["fw-lb2"].check_output(fetch + f"http://{gpu1}:2243/") == "published by docker"
    # Docker would let anybody in; the forward-hook chain ahead of Docker's does not.
    assert fleet["fw-probe"].run(fetch + f"http://{gpu1}:2243/").rc != 0
    assert not connects(gpu1, 2243)
    # 8080 is published by Docker and opened by nothing: nobody gets in.
    assert fleet["fw-lb1"].run(fetch + f"http://{gpu1}:8080/").rc != 0
    with fleet["fw-gpu1"].sudo():
        chain = fleet["fw-gpu1"].check_output("nft list chain inet aphrodite_firewall published")
        # Docker's own rules for both ports are there: the firewall is what stops them.
        nat = fleet["fw-gpu1"].check_output("iptables -t nat -S DOCKER")
    assert int(re.search(r"counter packets (\d+) .* drop", chain).group(1)) > 0
    assert re.search(r"--dport 2243 -j DNAT", nat) and re.search(r"--dport 8080 -j DNAT", nat)


def test_vrrp_passes_between_the_load_balancers_only(fleet, addresses):
    lb1 = fleet["fw-lb1"]
    with lb1.sudo():
        lb1.run("systemctl stop fw-test-vrrp; rm -f /run/fw-test-vrrp.json")
        lb1.check_output("systemd-run --unit=fw-test-vrrp --collect sh -c \""
                         + python(VRRP_RECEIVE, "8").replace('"', '\\"') + " > /run/fw-test-vrrp.json\"")
    time.sleep(1)
    for sender in ("fw-lb2", "fw-gpu1", "fw-probe"):
        with fleet[sender].sudo():
            fleet[sender].check_output(python(VRRP_SEND, addresses["fw-lb1"]))
    with lb1.sudo():
        for _ in range(20):
            if lb1.run("systemctl is-active -q fw-test-vrrp").rc != 0:
                break
            time.sleep(1)
        seen = json.loads(lb1.check_output("cat /run/fw-test-vrrp.json"))
    assert seen == [addresses["fw-lb2"]]


def test_docker_rules_survive_firewall_reloads(fleet, addresses):
    gpu1 = fleet["fw-gpu1"]
    with gpu1.sudo():
        before = gpu1.check_output("iptables -t nat -S")
        gpu1.check_output("systemctl reload aphrodite-firewall")
        # The guarded path as well: load the same rule set again and confirm it.
        gpu1.check_output(f"{HELPER} apply /etc/aphrodite-firewall/ruleset.nft 30 && {HELPER} confirm")
        after = gpu1.check_output("iptables -t nat -S")
        tables = gpu1.check_output("nft list tables").splitlines()
    assert after == before
    assert "--dport 2243 -j DNAT" in after
    # The outer Docker's embedded DNS rules too (a `flush ruleset` would take the host's DNS).
    assert "DOCKER_OUTPUT" in after
    assert {"table ip nat", "table ip filter", "table inet aphrodite_firewall"} <= set(tables)
    fetch = "python3 -c \"import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\" "
    assert fleet["fw-lb1"].check_output(fetch + f"http://{addresses['fw-gpu1']}:2243/") == "published by docker"


def test_limit_and_tags_give_the_same_rule_sets(fleet):
    """The firewall reads the topology from the inventory, not from what else ran."""
    before = {name: status(fleet[name]) for name in ("fw-lb1", "fw-gpu2")}
    run = playbook(str(PROJECT / "playbooks" / "preflight.yml"), str(PROJECT / "playbooks" / "firewall.yml"),
                   "--limit", "fw-lb1,fw-gpu2", "--tags", "firewall")
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"fw-gpu2\s*: ok=\d+\s+changed=0", run.stdout), run.stdout[-2000:]
    assert re.search(r"fw-lb1\s*: ok=\d+\s+changed=0", run.stdout), run.stdout[-2000:]
    assert {name: status(fleet[name]) for name in before} == before


def test_admin_networks_without_the_controller_stop_before_any_change(fleet):
    before = status(fleet["fw-lb1"])
    run = playbook(str(PROJECT / "playbooks" / "firewall.yml"), "--limit", "fw-lb1",
                   "-e", json.dumps({"firewall_admin_networks": ["192.0.2.0/24"]}))
    assert run.returncode != 0
    assert "which firewall_admin_networks (192.0.2.0/24) does not contain" in run.stdout, run.stdout[-3000:]
    assert re.search(r"fw-lb1\s*: ok=\d+\s+changed=0", run.stdout)
    assert status(fleet["fw-lb1"]) == before


def test_a_rule_set_that_shuts_out_ssh_rolls_back_by_itself(fleet, addresses):
    lb2, address = fleet["fw-lb2"], addresses["fw-lb2"]
    before = status(lb2)
    with lb2.sudo():
        confirmed = lb2.check_output("sha256sum /var/lib/aphrodite-firewall/confirmed.nft")
        # This host's rule set without its SSH rule: new SSH connections are dropped.
        lb2.check_output("sed -e '/comment \"ssh\"/d' -e 's/^\\([[:space:]]*comment \"\\).*\"$/\\1no-ssh\"/' "
                         "/etc/aphrodite-firewall/ruleset.nft > /root/no-ssh.nft && nft -c -f /root/no-ssh.nft")
        assert 'comment "ssh"' not in lb2.file("/root/no-ssh.nft").content_string
    assert ssh_banner(address)
    started = time.monotonic()
    run = playbook(str(SCENARIO / "guard.yml"), "--limit", "fw-lb2", "-e", "ruleset=/root/no-ssh.nft", wait=False)
    reachable = []
    while run.poll() is None:
        reachable.append((round(time.monotonic() - started), ssh_banner(address)))
        time.sleep(1)
    output = run.stdout.read()
    assert run.returncode != 0
    assert ("let no new SSH connection from the controller through within 15 s, so the guard restored "
            "the previous rule set") in output, output[-3000:]
    # Shut out while the bad rule set was loaded, reachable again after the guard fired.
    assert [t for t, ok in reachable if not ok], reachable
    assert ssh_banner(address)
    assert time.monotonic() - started >= 15
    assert status(lb2) == before
    with lb2.sudo():
        assert lb2.check_output("sha256sum /var/lib/aphrodite-firewall/confirmed.nft") == confirmed
        journal = lb2.check_output("journalctl --no-pager -u aphrodite-firewall-rollback")
    assert "the new rule set was not confirmed in time: restored the previous one" in journal


def test_disabled_removes_only_its_table_and_tags_bring_it_back(fleet, addresses):
    probe = fleet["fw-probe"]
    before = status(probe)
    run = playbook(str(PROJECT / "playbooks" / "firewall.yml"), "--limit", "fw-probe", "-e", "firewall_enabled=false")
    assert run.returncode == 0, run.stdout[-3000:]
    with probe.sudo():
        tables = probe.check_output("nft list tables").splitlines()
        assert probe.run("systemctl is-enabled aphrodite-firewall").rc != 0
    assert "table inet aphrodite_firewall" not in tables
    # The outer Docker's table of the lab host is still there: only our table went.
    assert "table ip nat" in tables
    assert not probe.file(HELPER).exists
    # Open again without a firewall (9100 would be dropped otherwise; refused means allowed).
    assert probe_state(fleet["fw-lb1"], addresses["fw-probe"], 9100) == "refused"
    # A fresh install under --tags firewall alone takes the guarded path again.
    run = playbook(str(PROJECT / "playbooks" / "firewall.yml"), "--limit", "fw-probe", "--tags", "firewall")
    assert run.returncode == 0, run.stdout[-3000:]
    assert status(probe) == before
    assert probe_state(fleet["fw-lb1"], addresses["fw-probe"], 9100) == "timeout"


def test_the_confirmed_rule_set_and_dockers_return_after_a_reboot(fleet, addresses):
    gpu1, address = fleet["fw-gpu1"], addresses["fw-gpu1"]
    before = status(gpu1)
    # A lab host powers off like a server (systemd stops dockerd and its containers);
    # starting the container again is the power button.
    subprocess.run(["docker", "exec", "fw-gpu1", "systemctl", "poweroff"], capture_output=True, check=False)
    for _ in range(60):
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", "fw-gpu1"],
                               capture_output=True, text=True, check=False).stdout.strip()
        if state == "false":
            break
        time.sleep(1)
    assert state == "false"
    subprocess.run(["docker", "start", "fw-gpu1"], capture_output=True, check=True)
    for _ in range(60):
        if ssh_banner(address):
            break
        time.sleep(1)
    assert ssh_banner(address)
    assert status(gpu1) == before
    with gpu1.sudo():
        for _ in range(60):
            if "--dport 2243 -j DNAT" in gpu1.run("iptables -t nat -S DOCKER").stdout:
                break
            time.sleep(1)
        assert gpu1.check_output("systemctl is-active aphrodite-firewall") == "active"
    fetch = "python3 -c \"import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\" "
    # Docker writes the DNAT rule when it starts the container, a moment before the
    # process inside listens: refused means "not up yet" (the firewall drops, it never
    # refuses), so only that is waited on, for at most 30 s.
    for _ in range(30):
        answer = fleet["fw-lb1"].run(fetch + f"http://{address}:2243/")
        if answer.rc == 0 or "Connection refused" not in answer.stderr:
            break
        time.sleep(1)
    assert answer.rc == 0 and answer.stdout.strip() == "published by docker", answer.stderr[-500:]
    assert fleet["fw-probe"].run(fetch + f"http://{address}:2243/").rc != 0
    assert not connects(address, 2242)
