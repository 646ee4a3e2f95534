"""Every change of a serving replica, under load through the edge, loses nothing.

A real OpenAI client sends concurrent short chat completions and 5-second streams to the
load balancer while the scenario runs (a) deploy after a model-setting change, (b) a
rolling restart, (c) an upgrade to another image tag, (d) a reboot of a GPU node
(playbooks/reboot.yml) and (e) an upgrade to an image that never becomes healthy, which
must stop at the canary.  Every request must succeed and
every stream must end with ``data: [DONE]``.  Each operation's duration is reported
against replicas x (drain + restart + warm-up).

The 70B model runs as two replicas, each across two GPU nodes (a head and a headless rank
1, pipeline parallel): they serve through the edge and under the same load go through every
operation without a refused request, since one is always in the pool; each restart and
upgrade starts rank 1 before its head.  At the end one's worker dies: status, HAProxy and the
alert's input say so, the other replica serves on, and a restart of that replica heals it.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

testinfra_hosts = ["ops-lb1"]

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SCENARIO = Path(__file__).resolve().parents[1]
MODEL = "llama-8b"
BIG = "llama-70b"            # the multi-node replicas' served name
CLIENT_KEY = "test-client-key-9a3e5c7b1d0f2846"
NO_ENGINE = "No engine is available for this model"   # HAProxy's 503 (roles/haproxy/vars/main.yml)
STREAM_TOKENS = 100          # 5 s at the scenario's 0.05 s a token
SHORT_WORKERS, STREAM_WORKERS = 3, 3
GPU_NODES = ("ops-gpu1", "ops-gpu2", "ops-gpu3", "ops-gpu4")
REPLICAS = 4                 # two of the 8B model, two of the 70B each across two nodes
CONTAINERS = REPLICAS + 2    # and each multi-node replica's rank 1
# A changed model setting of the 8B model: its argv changes, so deploy must replace both of
# its replicas (and leave the 70B ones alone).
CHANGED = {"aphrodite_models": [{
    "id": "meta-llama/Llama-3.1-8B-Instruct",
    "config": str(PROJECT / "inventories/lab/models/llama-3.1-8b-instruct/config.json"),
    "served_model_name": MODEL, "max_model_len": 8192, "replicas": 2, "tensor_parallel_size": 1,
    "engine_args": {"max-num-seqs": 48}}, {
    "id": "meta-llama/Llama-3.1-70B-Instruct",
    "config": str(PROJECT / "tests/data/models/llama-3.1-70b-instruct/config.json"),
    "served_model_name": BIG, "max_model_len": 131072, "replicas": 2, "engine_args": {"max-num-seqs": 64}}]}
REPORT: dict = {}


class Load:
    """Bounded client traffic: SHORT_WORKERS short requests and STREAM_WORKERS streams in a loop.

    Both loads together stay under the edge's 1200 requests a minute from one address.
    """

    def __init__(self, base_url: str, ca_file: str, model: str = MODEL, short: int = SHORT_WORKERS,
                 streams: int = STREAM_WORKERS, pause: float = 0.2) -> None:
        self.model, self.pause = model, pause
        self.client = openai.OpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=60,
                                    http_client=openai.DefaultHttpxClient(verify=ca_file))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"short_ok": 0, "stream_ok": 0}
        self.failures: list[str] = []
        # HAProxy's own 503 while no replica of the model is in the pool: a clean refusal,
        # before any engine saw the request; with two replicas of each model it must not happen.
        self.unavailable: list[str] = []
        self.threads = [threading.Thread(target=self._short, daemon=True) for _ in range(short)]
        self.threads += [threading.Thread(target=self._stream, daemon=True) for _ in range(streams)]

    def _fail(self, what: str, err: Exception | None = None) -> None:
        refused = (isinstance(err, openai.APIStatusError) and err.status_code == 503
                   and NO_ENGINE in str(err))
        with self.lock:
            (self.unavailable if refused else self.failures).append(f"{time.strftime('%H:%M:%S')} {self.model} {what}")

    def _short(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                assert answer.choices[0].message.content
                with self.lock:
                    self.counts["short_ok"] += 1
            except Exception as err:  # noqa: BLE001 - every failure counts
                self._fail(f"short: {type(err).__name__}: {err}", err)
            self.stop.wait(self.pause)

    def _stream(self) -> None:
        while not self.stop.is_set():
            try:
                with self.client.chat.completions.with_streaming_response.create(
                        model=self.model, messages=[{"role": "user", "content": "tell"}],
                        max_tokens=STREAM_TOKENS, stream=True) as response:
                    events = [line for line in response.iter_lines() if line.startswith("data: ")]
                chunks = [json.loads(e[6:]) for e in events[:-1]]
                if not events or events[-1] != "data: [DONE]" or len(chunks) != STREAM_TOKENS:
                    self._fail(f"stream truncated after {len(chunks)} chunk(s), last {events[-1:]}")
                else:
                    with self.lock:
                        self.counts["stream_ok"] += 1
            except Exception as err:  # noqa: BLE001
                self._fail(f"stream: {type(err).__name__}: {err}", err)
                self.stop.wait(self.pause)  # a refused stream is no reason to flood the edge

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(STREAM_TOKENS * 0.05 + 30)


def playbook(path: Path, *extra: str) -> tuple[int, float, str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(EPHEMERAL / "ansible.cfg"),
           "ANSIBLE_COLLECTIONS_PATH": str(PROJECT / "collections"), "ANSIBLE_ROLES_PATH": str(PROJECT / "roles"),
           "ANSIBLE_FORCE_COLOR": "false"}
    started = time.monotonic()
    proc = subprocess.run(["ansible-playbook", "-i", INVENTORY, str(path), "-e", f"@{EPHEMERAL / 'changed.json'}", *extra],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    return proc.returncode, time.monotonic() - started, proc.stdout[-4000:] + proc.stderr[-2000:]


def gpu_host(host, name: str):
    return host.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def containers(host) -> dict:
    """(replica name, node rank) -> (container id, image, GPU node) on the GPU nodes."""
    result = {}
    for name in GPU_NODES:
        ids = gpu_host(host, name).check_output("sudo docker ps -q --filter label=io.aphrodite.replica").split()
        if not ids:
            continue
        out = gpu_host(host, name).check_output(f"sudo docker inspect {' '.join(ids)}")
        for container in json.loads(out):
            labels = container["Config"]["Labels"]
            key = (labels["io.aphrodite.replica"], int(labels["io.aphrodite.node-rank"]))
            assert key not in result, f"two containers of {key}: on {result[key][2]} and {name}"
            result[key] = (container["Id"], container["Config"]["Image"], name)
    return result


def ranks_started(host, parts: dict, replica: str) -> tuple[float, float]:
    """When rank 1 and the head (rank 0) of a multi-node replica last started (epoch seconds)."""
    return (started_at(host, parts[(replica, 1)][2], replica), started_at(host, parts[(replica, 0)][2], replica))


SHOW_STAT = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
             "s.sendall(b'show stat\\n'); print(b''.join(iter(lambda: s.recv(65536), b'')).decode())")


def haproxy_rows(host, replicas) -> dict:
    """Replica -> HAProxy's row of its server (show stat, by column name)."""
    out = host.check_output(f'sudo python3 -c "{SHOW_STAT}"')
    lines = out.lstrip("# ").splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows if row.get("svname") in replicas}


def haproxy_states(host, replicas) -> dict:
    """Replica -> HAProxy's status of its server (UP, DRAIN, MAINT, DOWN)."""
    return {name: row["status"] for name, row in haproxy_rows(host, replicas).items()}


class StateWatch:
    """HAProxy's status of some servers, polled while an operation runs; each one's changes in order."""

    def __init__(self, host, servers) -> None:
        self.host, self.servers = host, set(servers)
        self.seen: dict[str, list[str]] = {server: [] for server in self.servers}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _note(self) -> None:
        try:
            states = haproxy_states(self.host, self.servers)
        except Exception:  # noqa: BLE001 - a missed poll is no state
            return
        for server in self.servers:
            state = states.get(server, "?").split()[0]
            if not self.seen[server] or self.seen[server][-1] != state:
                self.seen[server].append(state)

    def _poll(self) -> None:
        while not self.stop.wait(0.3):
            self._note()

    def __enter__(self) -> StateWatch:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)
        # Each poll is a round trip to the load balancer (a second or more on a busy machine),
        # so the operation can end between two: the state it left is read once more.
        self._note()


@pytest.fixture(scope="module")
def vip(host) -> str:
    # The virtual IP of the fleet model, which keepalived holds on the load balancer.
    (EPHEMERAL / "changed.json").write_text(json.dumps(CHANGED))
    rc, _, out = playbook(SCENARIO / "fleet_vip.yml")
    assert rc == 0, out
    found = re.search(r"fleet-vip=([0-9.]+)", out)
    address = found.group(1) if found else ""
    assert address and f"inet {address}/" in host.check_output("ip -o -4 addr show"), f"the load balancer does not hold the VIP {address!r}"
    return address


@pytest.fixture(scope="module")
def ca(host) -> str:
    path = EPHEMERAL / "edge-ca.crt"
    with host.sudo():
        path.write_text(host.file("/etc/haproxy/pki/ca.crt").content_string)
    return str(path)


@pytest.fixture(scope="module")
def load(host, vip, ca):
    with Load(f"https://{vip}/v1", ca) as running, \
            Load(f"https://{vip}/v1", ca, model=BIG, short=1, streams=1, pause=1.0) as big:
        running.big = big
        time.sleep(3)
        yield running
    REPORT["requests"] = {MODEL: running.counts, BIG: big.counts}
    REPORT["failures"] = running.failures + big.failures
    REPORT["refused_by_haproxy_no_replica_in_pool"] = {MODEL: len(running.unavailable), BIG: len(big.unavailable)}
    (EPHEMERAL / "operations-report.json").write_text(json.dumps(REPORT, indent=2))
    print("\noperations report:", json.dumps(REPORT, indent=2))


def _record(name: str, seconds: float, replicas: int = REPLICAS) -> None:
    # Lower bound: each replica waits for its longest stream (drain), restarts (the
    # stand-in's 1 s load plus Docker) and answers /health and a warm-up request.
    bound = replicas * (STREAM_TOKENS * 0.05 + 1 + 1)
    # When it ended (the clock of the failures' times), so that a failed request can be placed.
    REPORT[name] = {"seconds": round(seconds, 1), "replicas_x_drain_restart_warmup": bound,
                    "ended": time.strftime("%H:%M:%S")}


def started_at(host, node: str, replica: str) -> float:
    """When the container of the replica's part on the node last started (epoch seconds)."""
    up = gpu_host(host, node).check_output(
        f"sudo docker inspect -f '{{{{.State.StartedAt}}}}' $(sudo docker ps -q --filter label=io.aphrodite.replica={replica})")
    whole, _, fraction = up.strip().rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{fraction or 0}")


def _reboot_candidate(parts: dict, multi: list[str]) -> str:
    """A GPU node with rank 1 of a multi-node replica whose reboot leaves every model a replica."""
    models = {replica: (BIG if replica in multi else MODEL) for replica, _ in parts}
    for (replica, rank), (_, _, node) in sorted(parts.items()):
        if rank != 1:
            continue
        down = {r for (r, _), (_, _, where) in parts.items() if where == node}
        if all(set(r for r, m in models.items() if m == model) - down for model in (MODEL, BIG)):
            return node
    raise AssertionError(f"no node to reboot leaves every model a replica: {parts}")


def test_operations_lose_no_request(host, load) -> None:
    before = containers(host)
    assert len(before) == CONTAINERS, sorted(before)
    multi = sorted(replica for replica, rank in before if rank == 1)
    assert len(multi) == 2, f"not two multi-node replicas: {sorted(before)}"
    for replica in multi:
        assert before[(replica, 0)][2] != before[(replica, 1)][2], f"{replica}'s ranks share a node"
    REPORT["multi_node_replicas"] = {r: [before[(r, 0)][2], before[(r, 1)][2]] for r in multi}

    # (a) deploy after a model-setting change of the 8B model: its replicas replaced, drained
    # first; the multi-node replicas are left alone and serve throughout.
    rc, seconds, out = playbook(SCENARIO / "deploy.yml")
    assert rc == 0, out
    _record("deploy", seconds, replicas=REPLICAS - len(multi))
    after_deploy = containers(host)
    replaced = {key for key in before if after_deploy[key][0] != before[key][0]}
    assert replaced == {key for key in before if key[0] not in multi}, replaced

    # (b) rolling restart: every replica, one at a time; each multi-node one is drained on the
    # load balancer (its streams end whole), its worker restarts before its head, and it serves
    # again while the other 70B replica carries the model.
    started = time.time()
    with StateWatch(host, multi) as watch:
        rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=restart")
    assert rc == 0, out
    _record("rolling_restart", seconds)
    REPORT["rolling_restart"]["multi_node_haproxy_states"] = watch.seen
    for replica, seen in watch.seen.items():
        assert "DRAIN" in seen and "MAINT" in seen and seen.index("DRAIN") < seen.index("MAINT") and seen[-1] == "UP", (replica, seen)
        worker, head = ranks_started(host, after_deploy, replica)
        assert started - 1 <= worker <= head, f"{replica}: rank 1 started at {worker}, the head at {head}, the roll at {started}"

    # (c) upgrade to another tag of the image: the same order of ranks.
    images = EPHEMERAL / "images"
    started = time.time()
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:0.24.2-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-0.24.2-lab.tar'}")
    assert rc == 0, out
    _record("upgrade", seconds)
    upgraded = containers(host)
    assert {image for _, image, _ in upgraded.values()} == {"aphrodite-standin:0.24.2-lab"}, upgraded
    for replica in multi:
        worker, head = ranks_started(host, upgraded, replica)
        assert started - 1 <= worker <= head, f"{replica}: rank 1 started at {worker}, the head at {head}, the upgrade at {started}"

    # (d) a GPU node reboots (playbooks/reboot.yml): the node that holds rank 1 of a multi-node
    # replica and, of each model, not every replica.  Its replicas (the multi-node one, whose
    # head runs elsewhere, included) are drained first and come back on the rebooted node.
    node = _reboot_candidate(upgraded, multi)
    on_node = sorted({replica for (replica, _), (_, _, where) in upgraded.items() if where == node})
    boot = gpu_host(host, node).check_output("cut -d ' ' -f 22 /proc/1/stat")
    (EPHEMERAL / "reboot.json").write_text(json.dumps({"aphrodite_reboot_nodes": [node]}))
    started = time.time()
    with StateWatch(host, on_node) as watch:
        rc, seconds, out = playbook(PROJECT / "playbooks" / "reboot.yml", "-e", f"@{EPHEMERAL / 'reboot.json'}")
    assert rc == 0, out
    _record("reboot", seconds, replicas=len(on_node))
    REPORT["reboot"].update(node=node, replicas=on_node, haproxy_states=watch.seen)
    assert gpu_host(host, node).check_output("cut -d ' ' -f 22 /proc/1/stat") != boot, f"{node} did not reboot"
    for replica, seen in watch.seen.items():
        assert "MAINT" in seen and seen[-1] == "UP", (replica, seen)
    rebooted = containers(host)
    assert set(rebooted) == set(upgraded), rebooted
    for (replica, rank), (_, _, where) in rebooted.items():
        if replica in on_node:
            assert started_at(host, where, replica) >= started - 1, f"{replica} rank {rank} on {where} did not restart"

    # (d2) a reboot that would leave a model with no replica serving is refused before
    # anything changes: the same fleet with one replica of the 8B, whose node is asked for.
    models = gpu_host(host, node).ansible.get_variables()["aphrodite_models"]
    single = [dict(m, replicas=1) if m.get("served_model_name") == MODEL else m for m in models]
    sole = next(where for (replica, _), (_, _, where) in rebooted.items() if replica.endswith("8b-0"))
    (EPHEMERAL / "sole.json").write_text(json.dumps({"aphrodite_models": single, "aphrodite_reboot_nodes": [sole]}))
    boot = gpu_host(host, sole).check_output("cut -d ' ' -f 22 /proc/1/stat")
    rc, seconds, out = playbook(PROJECT / "playbooks" / "reboot.yml", "-e", f"@{EPHEMERAL / 'sole.json'}")
    assert rc != 0 and f"{sole} was not touched: every replica of meta-llama/Llama-3.1-8B-Instruct" in out, out
    _record("refused_reboot", seconds, replicas=0)
    assert gpu_host(host, sole).check_output("cut -d ' ' -f 22 /proc/1/stat") == boot, f"{sole} rebooted"
    assert set(haproxy_states(host, {replica for replica, _ in rebooted}).values()) == {"UP"}

    # (e) an image that never becomes healthy: the canary fails and stays out; the rest serve.
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:never-healthy-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-never-healthy-lab.tar'}",
                                "-e", "engine_health_retries=10", "-e", "engine_health_delay=1")
    assert rc != 0, out
    _record("failed_upgrade", seconds, replicas=1)
    now = containers(host)
    canaries = {replica for (replica, _), (_, image, _) in now.items() if image == "aphrodite-standin:never-healthy-lab"}
    assert len(canaries) == 1, now
    assert all(image == "aphrodite-standin:0.24.2-lab" for (replica, _), (_, image, _) in now.items()
               if replica not in canaries), now
    states = haproxy_states(host, {replica for replica, _ in upgraded})
    assert sorted(states.values()) == ["MAINT"] + ["UP"] * (REPLICAS - 1), states
    assert states[next(iter(canaries))] == "MAINT", states
    REPORT["failed_upgrade"]["canary"] = next(iter(canaries))
    time.sleep(STREAM_TOKENS * 0.05 + 2)  # streams started before (e) finished end on the healthy replicas

    for each in (load, load.big):
        assert each.counts["stream_ok"] > 0 and each.counts["short_ok"] > 0, each.counts
    # No request failed, no stream was cut, and HAProxy never found a model without a
    # replica in its pool: each has two, drained and replaced one at a time.
    assert load.failures + load.big.failures == [], load.failures + load.big.failures
    assert load.unavailable + load.big.unavailable == [], load.unavailable + load.big.unavailable


def _exporter(host) -> list[tuple[str, dict, float]]:
    """HAProxy's Prometheus exporter on the load balancer: (name, labels, value) of each sample."""
    samples = []
    for line in host.check_output("curl -sf http://127.0.0.1:8405/metrics").splitlines():
        found = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def _engine_dead_alert_selects(samples: list) -> list[dict]:
    """The samples that the alert rule AphroditeEngineDead's expression selects (its selector and == 1)."""
    rules = (PROJECT / "roles/monitoring/templates/etc/prometheus/rules/aphrodite.rules.yml.j2").read_text()
    rule = re.search(r"- alert: AphroditeEngineDead\n\s+expr: (.+)\n", rules)
    assert rule, "no rule AphroditeEngineDead"
    parsed = re.fullmatch(r'(\w+)\{(\w+)="([^"]+)"\} == 1', rule.group(1).strip())
    assert parsed, f"the test reads only a selector and == 1; the rule is {rule.group(1)!r}"
    name, label, value = parsed.groups()
    return [labels for metric, labels, number in samples if metric == name and labels.get(label) == value and number == 1]


def test_multinode_worker_death_shows_and_restart_heals(host, vip, ca, load) -> None:
    """The worker of one multi-node replica dies: its head, HAProxy, the alert's input and
    status say so, the other replica of the model serves on, and the replace path (a rolling
    restart of that replica) brings it back."""
    multi, (head_node, worker_node) = sorted(REPORT["multi_node_replicas"].items())[0]
    load.big.__exit__()
    killed = time.monotonic()
    gpu_host(host, worker_node).check_output(
        f"sudo sh -c 'docker stop -t 1 $(docker ps -q --filter label=io.aphrodite.replica={multi})'")

    # The head's /health fails, so HAProxy takes it out with an HTTP error check (L7STS).
    deadline, row = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        row = haproxy_rows(host, {multi}).get(multi, {})
        if row.get("status") == "DOWN" and row.get("check_status") == "L7STS":
            break
        time.sleep(1)
    assert (row.get("status"), row.get("check_status")) == ("DOWN", "L7STS"), row
    REPORT["worker_death"] = {"haproxy_down_after_s": round(time.monotonic() - killed, 1),
                              "check_status": row["check_status"], "check_code": row.get("check_code")}
    # The alert's input: the exporter's series that AphroditeEngineDead selects names this server
    # (the scenario has no Prometheus; promtool tests the rule's timing).
    dead = _engine_dead_alert_selects(_exporter(host))
    assert [labels.get("server") for labels in dead] == [multi], dead
    # The model is still served, by its other replica.
    client = openai.OpenAI(base_url=f"https://{vip}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(verify=ca))
    for _ in range(4):
        answer = client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].message.content

    env = {**os.environ, "ANSIBLE_CONFIG": str(EPHEMERAL / "ansible.cfg"), "PYTHONPATH": str(PROJECT),
           "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_COLLECTIONS_PATH": str(PROJECT / "collections"), "ANSIBLE_ROLES_PATH": str(PROJECT / "roles")}
    proc = subprocess.run([sys.executable, "-m", "aphrodite_deploy", "status", "-i", INVENTORY, "--json", "--quiet",
                           "--project-dir", str(PROJECT)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {r["name"]: r for r in json.loads(proc.stdout)["replicas"]}
    broken = status[multi]
    REPORT["worker_death"].update(state=broken["state"], problems=broken["problems"])
    assert broken["state"] == "unhealthy", broken
    assert [(k["rank"], k["host"], (k["container"] or {}).get("state")) for k in broken["ranks"]] == [
        (0, head_node, "running"), (1, worker_node, "exited")], broken["ranks"]
    assert any(f"rank 1 on {worker_node}" in p for p in broken["problems"]), broken["problems"]

    # What the alert says to do: restart the replica, through the one replace path.
    (EPHEMERAL / "only.json").write_text(json.dumps({"aphrodite_rolling_replicas": [multi]}))
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=restart",
                                "-e", f"@{EPHEMERAL / 'only.json'}")
    assert rc == 0, out
    _record("restart_after_worker_death", seconds, replicas=1)
    # Back in the pool and staying there: UP in 3 polls running, within 20 s.  A check that
    # fails shows as "UP 1/3"; one run saw that once right after the restart, cause not
    # known (a timeout under load, or the engine?), so every state seen is kept in the report.
    seen, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline and [status for status, _, _ in seen[-3:]] != ["UP"] * 3:
        row = haproxy_rows(host, {multi})[multi]
        seen.append((row["status"], row.get("check_status"), row.get("check_code")))
        time.sleep(1)
    REPORT["restart_after_worker_death"]["haproxy"] = sorted(set(seen))
    assert [status for status, _, _ in seen[-3:]] == ["UP"] * 3, seen
    answer = client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content
