"""Every change of a serving replica, under load through the edge, loses nothing.

A real OpenAI client sends concurrent short chat completions and 5-second streams to the
load balancer while the scenario runs (a) deploy after a model-setting change, (b) a
rolling restart, (c) an upgrade to another image tag and (d) an upgrade to an image that
never becomes healthy, which must stop at the canary.  Every request must succeed and
every stream must end with ``data: [DONE]``.  Each operation's duration is reported
against replicas x (drain + restart + warm-up).
"""

from __future__ import annotations

import json
import os
import subprocess
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
CLIENT_KEY = "test-client-key-9a3e5c7b1d0f2846"
STREAM_TOKENS = 100          # 5 s at the scenario's 0.05 s a token
SHORT_WORKERS, STREAM_WORKERS = 3, 3
REPLICAS = 2
# A changed model setting: the plan's argv changes, so deploy must replace both replicas.
CHANGED = {"aphrodite_models": [{
    "id": "meta-llama/Llama-3.1-8B-Instruct",
    "config": str(PROJECT / "inventories/lab/models/llama-3.1-8b-instruct/config.json"),
    "served_model_name": MODEL, "max_model_len": 8192, "replicas": REPLICAS,
    "engine_args": {"max-num-seqs": 48}}]}
REPORT: dict = {}


class Load:
    """Bounded client traffic: SHORT_WORKERS short requests and STREAM_WORKERS streams in a loop."""

    def __init__(self, base_url: str, ca_file: str) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=60,
                                    http_client=openai.DefaultHttpxClient(verify=ca_file))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"short_ok": 0, "stream_ok": 0}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._short, daemon=True) for _ in range(SHORT_WORKERS)]
        self.threads += [threading.Thread(target=self._stream, daemon=True) for _ in range(STREAM_WORKERS)]

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    def _short(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
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
                        model=MODEL, messages=[{"role": "user", "content": "tell"}],
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


def containers(host) -> dict:
    """Replica name -> (container id, image) on the GPU nodes."""
    result = {}
    for name in ("ops-gpu1", "ops-gpu2"):
        gpu = host.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")
        out = gpu.check_output("sudo sh -c 'docker inspect $(docker ps -q --filter label=io.aphrodite.replica)'")
        for container in json.loads(out):
            result[container["Config"]["Labels"]["io.aphrodite.replica"]] = (container["Id"], container["Config"]["Image"])
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
    address = host.ansible.get_variables()["ansible_host"]
    with Load(f"https://{address}/v1", str(ca)) as running:
        time.sleep(3)
        yield running
    REPORT["requests"] = running.counts
    REPORT["failures"] = running.failures
    (EPHEMERAL / "operations-report.json").write_text(json.dumps(REPORT, indent=2))
    print("\noperations report:", json.dumps(REPORT, indent=2))


def _record(name: str, seconds: float) -> None:
    # Lower bound: each replica waits for its longest stream (drain), restarts (the
    # stand-in's 1 s load plus Docker) and answers /health and a warm-up request.
    bound = REPLICAS * (STREAM_TOKENS * 0.05 + 1 + 1)
    REPORT[name] = {"seconds": round(seconds, 1), "replicas_x_drain_restart_warmup": bound}


def test_operations_lose_no_request(host, load) -> None:
    before = containers(host)
    assert len(before) == REPLICAS

    # (a) deploy after a model-setting change: both replicas replaced, drained first.
    rc, seconds, out = playbook(SCENARIO / "deploy.yml")
    assert rc == 0, out
    _record("deploy", seconds)
    after_deploy = containers(host)
    assert all(after_deploy[r][0] != before[r][0] for r in before), "deploy replaced no replica"

    # (b) rolling restart.
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=restart")
    assert rc == 0, out
    _record("rolling_restart", seconds)

    # (c) upgrade to another tag of the image.
    images = EPHEMERAL / "images"
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:0.24.2-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-0.24.2-lab.tar'}")
    assert rc == 0, out
    _record("upgrade", seconds)
    upgraded = containers(host)
    assert {image for _, image in upgraded.values()} == {"aphrodite-standin:0.24.2-lab"}

    # (d) an image that never becomes healthy: the canary fails and stays out; the other serves.
    rc, seconds, out = playbook(PROJECT / "playbooks" / "rolling.yml", "-e", "aphrodite_rolling_action=upgrade",
                                "-e", "engine_image=aphrodite-standin:never-healthy-lab",
                                "-e", f"engine_image_archive={images / 'aphrodite-standin-never-healthy-lab.tar'}",
                                "-e", "engine_health_retries=10", "-e", "engine_health_delay=1")
    assert rc != 0, out
    _record("failed_upgrade", seconds)
    images_now = sorted(image for _, image in containers(host).values())
    assert images_now == ["aphrodite-standin:0.24.2-lab", "aphrodite-standin:never-healthy-lab"], images_now
    states = haproxy_states(host, set(upgraded))
    assert sorted(states.values()) == ["MAINT", "UP"], states
    time.sleep(STREAM_TOKENS * 0.05 + 2)  # streams started before (d) finished end on the healthy replica

    assert load.counts["stream_ok"] > 0 and load.counts["short_ok"] > 0
    assert load.failures == [], load.failures
