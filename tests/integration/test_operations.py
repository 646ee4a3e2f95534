"""The operator's tool against the lab: deploy, status, a rolling restart under load, a failing upgrade.

Runs only when the main lab (`make lab`) is up and serves: every lab host running, HAProxy
active on lb1 and the public endpoint (the virtual IP, else lb1) answering the lab client
key. Otherwise every test here is skipped. In order:

1. ``deploy`` of the stages the operations touch converges (``--tags engines,edge``; the
   other stages belong to ``make lab``, and the whole site.yml would not fit this file's
   six-minute budget on two cores);
2. ``status`` reports every replica serving;
3. ``rolling-restart`` while a thread pool on this machine sends non-streaming and
   streaming requests through the public endpoint (HTTPS, lab client key, 0.75 requests
   a second: under the key's rate limit) until the roll ends: no request fails;
4. ``upgrade`` to an image whose engine never answers /health stops at the canary: the
   canary stays out of the pool, the other replicas serve (``status`` and requests through
   the endpoint say so); the canary is then upgraded back to the image it ran.

The figures (requests sent and failed, the rollout's duration) are printed: run with -s.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPSConnection
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventories" / "lab"
SECRETS = ROOT / ".lab" / "secrets"
MODEL = "llama-8b"  # the lab model's served_model_name (inventories/lab/group_vars/all/models.yml)
BROKEN = "aphrodite-standin:lab-broken-health"
# Requests per second through the endpoint: under the lab client key's 60 per minute (customer role).
# For a heavier load, use the admin key, which has no rate limit:
#   APHRODITE_TEST_LOAD_KEY=admin_api_key APHRODITE_TEST_LOAD_RATE=4 pytest -s tests/integration/test_operations.py
RATE = float(os.environ.get("APHRODITE_TEST_LOAD_RATE", "0.75"))
KEY_FILE = os.environ.get("APHRODITE_TEST_LOAD_KEY", "client_api_key")
MAX_REQUESTS = 400
FIGURES: dict[str, object] = {}


def _run(*command: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _endpoint() -> str:
    data = yaml.safe_load((INVENTORY / "group_vars" / "all" / "edge.yml").read_text()) \
        if (INVENTORY / "group_vars" / "all" / "edge.yml").is_file() else {}
    if data and data.get("aphrodite_vip"):
        return str(data["aphrodite_vip"])
    hosts = yaml.safe_load((INVENTORY / "hosts.yml").read_text())
    return str(hosts["all"]["children"]["loadbalancers"]["hosts"]["lb1"]["ansible_host"])


def _tls() -> ssl.SSLContext:
    pem = _run("docker", "exec", "lb1", "cat", "/etc/haproxy/pki/ca.crt").stdout
    if "BEGIN CERTIFICATE" in pem:
        handle = tempfile.NamedTemporaryFile("w", suffix=".crt", delete=False)
        handle.write(pem)
        handle.close()
        context = ssl.create_default_context(cafile=handle.name)
        os.unlink(handle.name)
    else:  # a certificate from vault, whose CA this machine may not have
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _lab_problem() -> str | None:
    """Why the lab cannot take these tests, or None."""
    if shutil.which("docker") is None or _run("docker", "info").returncode != 0:
        return "needs a Docker daemon and the lab (make lab)"
    status = _run(sys.executable, "-m", "aphrodite_deploy", "lab", "status", "--json")
    if status.returncode != 0:
        return "the lab is not up (make lab)"
    if _run("docker", "exec", "lb1", "systemctl", "is-active", "-q", "haproxy").returncode != 0:
        return "HAProxy does not run on lb1: the lab is not converged (make lab)"
    if not (SECRETS / KEY_FILE).is_file():
        return f"no lab key {KEY_FILE} in .lab/secrets"
    try:
        reply = request(_tls(), _endpoint(), stream=False, max_tokens=1)
    except OSError as exc:
        return f"the lab's public endpoint does not answer: {exc}"
    if reply != "ok":
        return f"the lab's public endpoint does not serve {MODEL}: {reply}"
    return None


def request(tls: ssl.SSLContext, address: str, *, stream: bool, max_tokens: int) -> str:
    """One completion through the edge; "ok" or what went wrong."""
    key = (SECRETS / KEY_FILE).read_text().strip()
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
    if stream:
        path, body["prompt"] = "/v1/completions", "Count slowly."
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Hello"}]
    connection = HTTPSConnection(address, 443, context=tls, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body),
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return f"HTTP {response.status}: {response.read()[:200]!r}"
        if not stream:
            data = json.loads(response.read())
            return "ok" if data.get("choices") else f"no choices: {data}"
        chunks, done = 0, False
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
        return "ok" if done and chunks == max_tokens else f"stream cut after {chunks} of {max_tokens} chunks"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


class Load:
    """Completions through the edge at a fixed rate, alternately non-streaming and streaming, from a
    thread pool, until stopped (at most MAX_REQUESTS)."""

    def __init__(self, tls: ssl.SSLContext, address: str, rate: float = RATE) -> None:
        self.tls, self.address, self.rate = tls, address, rate
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.results: list[tuple[bool, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _one(self, stream: bool) -> None:
        # Streams of 120 tokens take ~2.4 s at the stand-in's pace: some are always in flight.
        outcome = request(self.tls, self.address, stream=stream, max_tokens=120 if stream else 8)
        with self.lock:
            self.results.append((stream, outcome))

    def _send(self) -> None:
        sent = 0
        start = time.monotonic()
        while not self.stopping.is_set() and sent < MAX_REQUESTS:
            self.pool.submit(self._one, sent % 2 == 1)
            sent += 1
            self.stopping.wait(max(0.0, start + sent / self.rate - time.monotonic()))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.pool.shutdown(wait=True)

    def figures(self) -> dict[str, object]:
        failed = [outcome for _, outcome in self.results if outcome != "ok"]
        return {"sent": len(self.results), "streaming": sum(1 for s, _ in self.results if s),
                "non_streaming": sum(1 for s, _ in self.results if not s), "failed": len(failed),
                "failures": failed[:5]}


def deploy_tool(*args: str, timeout: int = 300) -> tuple[int, dict, float]:
    started = time.monotonic()
    result = _run(sys.executable, "-m", "aphrodite_deploy", *args, "-i", str(INVENTORY), "--json", "--quiet",
                  timeout=timeout)
    elapsed = time.monotonic() - started
    try:
        payload = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"aphrodite-deploy {' '.join(args)} printed no JSON (exit {result.returncode}):\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.returncode, payload, elapsed


def running_image(host: str, replica: str) -> str:
    return _run("docker", "exec", host, "docker", "inspect", "-f", "{{.Config.Image}}", f"aphrodite-{replica}").stdout.strip()


_PROBLEM = _lab_problem() if os.environ.get("APHRODITE_SKIP_LAB_TESTS") != "1" else "APHRODITE_SKIP_LAB_TESTS=1"
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"lab operations: {_PROBLEM}")


@pytest.fixture(scope="module")
def tls() -> ssl.SSLContext:
    return _tls()


@pytest.fixture(scope="module", autouse=True)
def report():
    started = time.monotonic()
    yield
    FIGURES["total_s"] = round(time.monotonic() - started, 1)
    print("\nlab operations figures: " + json.dumps(FIGURES, sort_keys=True))


def test_deploy_converges():
    code, payload, elapsed = deploy_tool("deploy", "--tags", "engines,edge", timeout=600)
    FIGURES["deploy_s"] = round(elapsed, 1)
    FIGURES["deploy_changed"] = {h: v["changed"] for h, v in payload["hosts"].items()}
    assert code == 0, json.dumps(payload["failures"], indent=1)
    assert payload["result"] == "converged"
    assert {"gpu1", "gpu2", "lb1", "lb2"} <= set(payload["hosts"])


def test_status_reports_every_replica_serving():
    code, payload, elapsed = deploy_tool("status")
    FIGURES["status_s"] = round(elapsed, 1)
    states = {r["name"]: r["state"] for r in payload["replicas"]}
    assert code == 0, states
    assert states and set(states.values()) == {"serving"}
    for replica in payload["replicas"]:
        assert {v["status"] for v in replica["load_balancers"].values()} == {"UP"}
        assert {v["status"] for v in replica["health"].values()} == {200}
        assert replica["metrics"]["requests_running"] is not None


def test_rolling_restart_under_load_fails_no_request(tls):
    with Load(tls, _endpoint()) as load:
        time.sleep(2)
        code, payload, elapsed = deploy_tool("rolling-restart", timeout=600)
        time.sleep(2)
    figures = load.figures()
    FIGURES["rolling_restart"] = dict(figures, rollout_s=round(elapsed, 1), replicas=len(payload["roll"]["replicas"]))
    print(f"\nrolling-restart: {figures['sent']} requests sent ({figures['streaming']} streaming, "
          f"{figures['non_streaming']} not), {figures['failed']} failed, rollout {elapsed:.1f} s")
    assert code == 0, json.dumps(payload["roll"], indent=1)
    assert payload["result"] == "done"
    assert [r["state"] for r in payload["roll"]["replicas"]] == ["done"] * len(payload["roll"]["planned"])
    assert figures["sent"] > 0
    assert figures["failed"] == 0, figures["failures"]


@pytest.fixture
def broken_image():
    """An engine image that never answers /health (it never listens) and stops at once on SIGTERM."""
    dockerfile = (f"FROM {lab_engine_image()}\n"
                  f"LABEL io.aphrodite.lab-test=never-healthy\n"
                  f'ENTRYPOINT ["python3", "-c", "import signal, sys, time; '
                  f'signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(86400)"]\n')
    for host in ("gpu1", "gpu2"):
        built = subprocess.run(["docker", "exec", "-i", "-e", "DOCKER_BUILDKIT=0", host, "docker", "build", "-q",
                                "-t", BROKEN, "-"], input=dockerfile, capture_output=True, text=True, check=False)
        assert built.returncode == 0, built.stderr
    yield BROKEN
    for host in ("gpu1", "gpu2"):
        _run("docker", "exec", host, "docker", "rmi", BROKEN)


def lab_engine_image() -> str:
    return yaml.safe_load((INVENTORY / "group_vars" / "gpu_nodes.yml").read_text())["engine_image"]


def test_upgrade_to_an_unhealthy_image_stops_at_the_canary(tls, broken_image):
    code, payload, elapsed = deploy_tool("upgrade", "--image", broken_image, "--health-timeout", "16", timeout=600)
    roll = payload["roll"]
    canary = roll["canary"]
    FIGURES["failed_upgrade"] = {"rollout_s": round(elapsed, 1), "canary": canary, "untouched": roll["untouched"]}
    try:
        assert code == 4, json.dumps(payload, indent=1)[:3000]
        assert roll["failed"]["replica"] == canary == roll["planned"][0]
        assert "health" in roll["failed"]["failed_task"].lower()
        assert roll["untouched"] == roll["planned"][1:] and roll["untouched"]
        assert running_image(roll["failed"]["host"], canary) == broken_image

        code, status, _ = deploy_tool("status")
        states = {r["name"]: r["state"] for r in status["replicas"]}
        assert code == 5 and states[canary] == "drained", states
        assert all(states[name] == "serving" for name in roll["untouched"]), states
        answers = [request(tls, _endpoint(), stream=bool(i % 2), max_tokens=4) for i in range(6)]
        FIGURES["failed_upgrade"]["requests_while_canary_out"] = {"sent": len(answers),
                                                                  "failed": sum(a != "ok" for a in answers)}
        assert answers == ["ok"] * len(answers)
    finally:
        # Back to the inventory's image, which deploy would run: the lab is left as it was.
        touched = [r["replica"] for r in roll["replicas"]]
        if touched:
            restored, after, restore_s = deploy_tool("upgrade", "--image", lab_engine_image(), "--replicas",
                                                     ",".join(touched), timeout=600)
            FIGURES["restore_s"] = round(restore_s, 1)
            assert restored == 0, json.dumps(after["roll"], indent=1)
