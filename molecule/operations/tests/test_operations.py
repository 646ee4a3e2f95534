"""Every change of a serving replica, under load through the edge, loses nothing.

A real OpenAI client sends concurrent short chat completions and 5-second streams to the
load balancer while the scenario runs (a) deploy after a model-setting change, (b) a
rolling restart, (c) an upgrade to another image tag and (d) an upgrade to an image that
never becomes healthy, which must stop at the canary.  Every request must succeed and
every stream must end with ``data: [DONE]``.  Each operation's duration is reported
against replicas x (drain + restart + warm-up).

One replica runs across both GPU nodes (a head and a headless rank 1, pipeline parallel):
it serves through the edge and under the same load goes through every operation; at the
end its worker dies, and status and the head's /health must say so.
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
BIG = "llama-70b"            # the multi-node replica's served name
CLIENT_KEY = "test-client-key-9a3e5c7b1d0f2846"
STREAM_TOKENS = 100          # 5 s at the scenario's 0.05 s a token
SHORT_WORKERS, STREAM_WORKERS = 3, 3
REPLICAS = 3                 # two of the 8B model, one of the 70B across two nodes
CONTAINERS = REPLICAS + 1    # and the multi-node replica's rank 1
# A changed model setting of the 8B model: its argv changes, so deploy must replace both of
# its replicas (and leave the 70B one alone).
CHANGED = {"aphrodite_models": [{
    "id": "meta-llama/Llama-3.1-8B-Instruct",
    "config": str(PROJECT / "inventories/lab/models/llama-3.1-8b-instruct/config.json"),
    "served_model_name": MODEL, "max_model_len": 8192, "replicas": 2, "tensor_parallel_size": 1,
    "engine_args": {"max-num-seqs": 48}}, {
    "id": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
    "config": str(PROJECT / "tests/data/models/llama-3.1-70b-instruct-awq-int4/config.json"),
    "served_model_name": BIG, "max_model_len": 32768, "replicas": 1, "engine_args": {"max-num-seqs": 64}}]}
REPORT: dict = {}


class Load:
    """Bounded client traffic: SHORT_WORKERS short requests and STREAM_WORKERS streams in a loop."""

    def __init__(self, base_url: str, ca_file: str, model: str = MODEL, short: int = SHORT_WORKERS,
                 streams: int = STREAM_WORKERS) -> None:
        self.model = model
        self.client = openai.OpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=60,
                                    http_client=openai.DefaultHttpxClient(verify=ca_file))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"short_ok": 0, "stream_ok": 0}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._short, daemon=True) for _ in range(short)]
        self.threads += [threading.Thread(target=self._stream, daemon=True) for _ in range(streams)]

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {self.model} {what}")

    def _short(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                assert answer.choices[0].message.content
                with self.lock:
                    self.counts["short_ok"] += 1
            except Exception as err:  # noqa: BLE001 - every failure counts
                self._fail(f"short: {type(err).__name__}: {err}")
            self.stop.wait(0.2)

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
                self._fail(f"stream: {type(err).__name__}: {err}")

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
    """(replica name, node rank) -> (container id, image) on the GPU nodes."""
    result = {}
    for name in ("ops-gpu1", "ops-gpu2"):
        out = gpu_host(host, name).check_output(
            "sudo sh -c 'docker inspect $(docker ps -q --filter label=io.aphrodite.replica)'")
        for container in json.loads(out):
            labels = container["Config"]["Labels"]
            key = (labels["io.aphrodite.replica"], int(labels["io.aphrodite.node-rank"]))
            result[key] = (container["Id"], container["Config"]["Image"])
    return result


SHOW_STAT = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
             "s.sendall(b'show stat\\n'); print(b''.join(iter(lambda: s.recv(65536), b'')).decode())")


def haproxy_states(host, replicas) -> dict:
    """Replica -> HAProxy's status of its server (UP, DRAIN, MAINT, DOWN)."""
    out = host.check_output(f'sudo python3 -c "{SHOW_STAT}"')
    rows = [line.split(",") for line in out.splitlines() if line and not line.startswith("#")]
    return {row[1]: row[17] for row in rows if len(row) > 17 and row[1] in replicas}


@pytest.fixture(scope="module")
def load(host):
    ca = EPHEMERAL / "edge-ca.crt"
    with host.sudo():
        ca.write_text(host.file("/etc/haproxy/pki/ca.crt").content_string)
    (EPHEMERAL / "changed.json").write_text(json.dumps(CHANGED))
    # The virtual IP of the fleet model, which keepalived holds on the load balancer.
    rc, _, out = playbook(SCENARIO / "fleet_vip.yml")
    assert rc == 0, out
    found = re.search(r"fleet-vip=([0-9.]+)", out)
    address = found.group(1) if found else ""
    assert address and f"inet {address}/" in host.check_output("ip -o -4 addr show"), f"the load balancer does not hold the VIP {address!r}"
    with Load(f"https://{address}/v1", str(ca)) as running, \
            Load(f"https://{address}/v1", str(ca), model=BIG, short=1, streams=1) as big:
        running.big = big
        time.sleep(3)
        yield running
    REPORT["requests"] = {MODEL: running.counts, BIG: big.counts}
    REPORT["failures"] = running.failures + big.failures
    (EPHEMERAL / "operations-report.json").write_text(json.dumps(REPORT, indent=2))
    print("\noperations report:", json.dumps(REPORT, indent=2))


def _record(name: str, seconds: float) -> None:
    # Lower bound: each replica waits for its longest stream (drain), restarts (the
    # stand-in's 1 s load plus Docker) and answers /health and a warm-up request.
    bound = REPLICAS * (STREAM_TOKENS * 0.05 + 1 + 1)
    REPORT[name] = {"seconds": round(seconds, 1), "replicas_x_drain_restart_warmup": bound}


def test_operations_lose_no_request(host, load) -> None:
    before = containers(host)
    assert len(before) == CONTAINERS, before
    multi = [replica for replica, rank in before if rank == 1]
    assert len(multi) == 1, f"no multi-node replica runs: {sorted(before)}"

    # (a) deploy after a model-setting change of the 8B model: its replicas replaced, drained first.
    rc, seconds, out = playbook(SCENARIO / "deploy.yml")
    assert rc == 0, out
    _record("deploy", seconds)
    after_deploy = containers(host)
    replaced = {key for key in before if after_deploy[key][0] != before[key][0]}
    assert replaced == {key for key in before if key[0] not in multi}, replaced

    # (b) the rolling restart below restarts every container of the multi-node replica too.

    # (b) rolling restart.
    started = time.time()
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=restart")
    assert rc == 0, out
    _record("rolling_restart", seconds)
    for node in ("ops-gpu1", "ops-gpu2"):  # the head and its worker both restarted
        up = gpu_host(host, node).check_output(
            f"sudo docker inspect -f '{{{{.State.StartedAt}}}}' $(sudo docker ps -q --filter label=io.aphrodite.replica={multi[0]})")
        assert calendar.timegm(time.strptime(up[:19], "%Y-%m-%dT%H:%M:%S")) >= int(started) - 1, (node, up)

    # (c) upgrade to another tag of the image.
    images = EPHEMERAL / "images"
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:0.24.2-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-0.24.2-lab.tar'}")
    assert rc == 0, out
    _record("upgrade", seconds)
    upgraded = containers(host)
    assert {image for _, image in upgraded.values()} == {"aphrodite-standin:0.24.2-lab"}, upgraded

    # (d) an image that never becomes healthy: the canary fails and stays out; the other serves.
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:never-healthy-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-never-healthy-lab.tar'}",
                                "-e", "engine_health_retries=10", "-e", "engine_health_delay=1")
    assert rc != 0, out
    _record("failed_upgrade", seconds)
    images_now = sorted(image for _, image in containers(host).values())
    assert images_now == ["aphrodite-standin:0.24.2-lab"] * (CONTAINERS - 1) + ["aphrodite-standin:never-healthy-lab"], images_now
    states = haproxy_states(host, {replica for replica, _ in upgraded})
    assert sorted(states.values()) == ["MAINT", "UP", "UP"], states
    time.sleep(STREAM_TOKENS * 0.05 + 2)  # streams started before (d) finished end on the healthy replica

    for each in (load, load.big):
        assert each.counts["stream_ok"] > 0 and each.counts["short_ok"] > 0, each.counts
    assert load.failures + load.big.failures == [], load.failures + load.big.failures
    load.big.__exit__()

    # The multi-node replica's worker dies: the head's /health fails and status reports the rank.
    gpu_host(host, "ops-gpu2").check_output(
        f"sudo sh -c 'docker stop -t 1 $(docker ps -q --filter label=io.aphrodite.replica={multi[0]})'")
    port = json.loads(gpu_host(host, "ops-gpu1").check_output(
        f"sudo docker inspect -f '{{{{json .Config.Labels}}}}' $(sudo docker ps -q --filter label=io.aphrodite.replica={multi[0]})"))["io.aphrodite.port"]
    gpu1 = gpu_host(host, "ops-gpu1").ansible.get_variables()["ansible_host"]
    deadline = time.monotonic() + 20
    code = ""
    while time.monotonic() < deadline:
        code = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' http://{gpu1}:{port}/health").stdout.strip()
        if code == "503":
            break
        time.sleep(1)
    assert code == "503", f"the head's /health answered {code!r} after its worker died"
    env = {**os.environ, "ANSIBLE_CONFIG": str(EPHEMERAL / "ansible.cfg"), "PYTHONPATH": str(PROJECT),
           "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_COLLECTIONS_PATH": str(PROJECT / "collections"), "ANSIBLE_ROLES_PATH": str(PROJECT / "roles")}
    proc = subprocess.run([sys.executable, "-m", "aphrodite_deploy", "status", "-i", INVENTORY, "--json", "--quiet",
                           "--project-dir", str(PROJECT)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {r["name"]: r for r in json.loads(proc.stdout)["replicas"]}
    broken = status[multi[0]]
    REPORT["status_after_worker_death"] = {"state": broken["state"], "problems": broken["problems"]}
    assert broken["state"] == "unhealthy", broken
    assert [(k["rank"], k["host"], (k["container"] or {}).get("state")) for k in broken["ranks"]] == [
        (0, "ops-gpu1", "running"), (1, "ops-gpu2", "exited")], broken["ranks"]
    assert any("rank 1 on ops-gpu2" in p for p in broken["problems"]), broken["problems"]
