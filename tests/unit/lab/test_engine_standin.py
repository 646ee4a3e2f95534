"""The lab's engine stand-in is as unkind as aphrodite-engine 0.24.1 where operations touch it.

Shutdown (aphrodite/entrypoints/launchers/launcher.py): --shutdown-timeout 0 aborts what
is in flight, N > 0 drains for up to N seconds and refuses new requests; an unknown model
gets the engine's 404 ErrorResponse; chunked request bodies are read; a stream is
max_tokens chunks at the configured rate, then [DONE].
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKEN_DELAY = 0.02


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As the image holds them: the stand-in beside the flag list it imports.
    folder = tmp_path_factory.mktemp("standin")
    shutil.copy(ROOT / "lab" / "fixtures" / "engine" / "standin.py", folder)
    shutil.copy(ROOT / "plugins" / "module_utils" / "_engine_flags.py", folder)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(folder / "standin.py"), "--model", "llama", "--host", "127.0.0.1", "--port", str(port), *args],
        env={"PATH": os.environ.get("PATH", ""), "STANDIN_STARTUP_DELAY": "0", "STANDIN_TOKEN_DELAY": str(TOKEN_DELAY)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def _post(port: int, body: dict, *, chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    data = json.dumps(body).encode()
    if chunked:
        conn.request("POST", "/v1/completions", body=iter([data[:7], data[7:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
    else:
        conn.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    try:
        return response.status, response.read()
    except (http.client.IncompleteRead, ConnectionError) as err:
        partial = err.partial if isinstance(err, http.client.IncompleteRead) else b""
        return -response.status, partial
    finally:
        conn.close()


def _stream_in_background(port: int, tokens: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        result["status"], result["body"] = _post(port, {"model": "llama", "prompt": "hi", "max_tokens": tokens, "stream": True})

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_a_stream_is_max_tokens_chunks_at_the_configured_rate_then_done(standin_dir: Path) -> None:
    proc, port = _start(standin_dir)
    try:
        started = time.monotonic()
        status, body = _post(port, {"model": "llama", "prompt": "hi", "max_tokens": 25, "stream": True})
        elapsed = time.monotonic() - started
    finally:
        _stop(proc)
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200
    assert len(events) == 26 and events[-1] == "data: [DONE]"
    assert elapsed >= 25 * TOKEN_DELAY


def test_an_unknown_model_gets_the_engines_404_and_a_chunked_body_is_read(standin_dir: Path) -> None:
    proc, port = _start(standin_dir)
    try:
        missing = _post(port, {"model": "gpt-4", "prompt": "hi"}, chunked=True)
        served = _post(port, {"model": "llama", "prompt": "hi", "max_tokens": 2}, chunked=True)
    finally:
        _stop(proc)
    assert missing[0] == 404
    assert json.loads(missing[1]) == {"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
                                                "param": "model", "code": 404}}
    assert served[0] == 200 and json.loads(served[1])["choices"][0]["text"] == "the quick"


def test_sigterm_with_the_default_shutdown_timeout_aborts_streams_in_flight(standin_dir: Path) -> None:
    proc, port = _start(standin_dir)
    thread, result = _stream_in_background(port, 200)  # 4 s
    time.sleep(0.5)
    started = time.monotonic()
    out = _stop(proc)
    thread.join(10)
    assert "mode=abort" in out
    assert time.monotonic() - started < 3
    assert b"data: " in result["body"] and b"[DONE]" not in result["body"]


def test_sigterm_with_a_shutdown_timeout_drains_and_refuses_new_requests(standin_dir: Path) -> None:
    proc, port = _start(standin_dir, "--shutdown-timeout", "10")
    thread, result = _stream_in_background(port, 60)  # 1.2 s
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = _post(port, {"model": "llama", "prompt": "hi", "max_tokens": 1})
    out, _ = proc.communicate(timeout=20)
    thread.join(10)
    assert "mode=drain timeout=10s" in out
    assert refused[0] == 503 and json.loads(refused[1])["error"]["type"] == "ServiceUnavailableError"
    assert result["status"] == 200 and result["body"].rstrip().endswith(b"data: [DONE]")


def test_a_drain_ends_at_the_shutdown_timeout(standin_dir: Path) -> None:
    proc, port = _start(standin_dir, "--shutdown-timeout", "1")
    thread, result = _stream_in_background(port, 500)  # 10 s
    time.sleep(0.3)
    started = time.monotonic()
    _stop(proc)
    thread.join(10)
    assert 1 <= time.monotonic() - started < 5
    assert b"[DONE]" not in result["body"]


# --------------------------------------------------------------------------- multi-node


def _health(port: int) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return -1


def _wait_for(predicate, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _rank(folder: Path, port: int, master: int, rank: int, nnodes: int = 2) -> subprocess.Popen:
    args = ["--model", "llama", "--host", "127.0.0.1", "--port", str(port), "--nnodes", str(nnodes),
            "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(master)]
    return subprocess.Popen([sys.executable, str(folder / "standin.py"), *args, *(["--headless"] if rank else [])],
                            env={"PATH": os.environ.get("PATH", ""), "STANDIN_STARTUP_DELAY": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_multi_node_head_serves_only_with_every_rank_and_dies_with_a_worker(standin_dir: Path) -> None:
    port, master = _free_port(), _free_port()
    head = _rank(standin_dir, port, master, 0)
    worker = None
    try:
        # No API before the group is formed: the model loads across every rank.
        time.sleep(1.5)
        assert _health(port) == -1
        worker = _rank(standin_dir, port, master, 1)
        assert _wait_for(lambda: _health(port) == 200), "the head never served after its worker joined"
        assert _post(port, {"model": "llama", "prompt": "hi", "max_tokens": 2})[0] == 200
        # The worker dies: the head stays up but is dead for good, even when a new worker comes.
        worker.kill()
        worker.wait(5)
        assert _wait_for(lambda: _health(port) == 503), "the head stayed healthy after its worker died"
        assert _post(port, {"model": "llama", "prompt": "hi", "max_tokens": 2})[0] == 503
        worker = _rank(standin_dir, port, master, 1)
        time.sleep(1.5)
        assert _health(port) == 503 and worker.poll() is None
        # The head restarts: the waiting worker joins the new head, which serves again.
        _stop(head)
        head = _rank(standin_dir, port, master, 0)
        assert _wait_for(lambda: _health(port) == 200), "the new head never formed a group with the waiting worker"
    finally:
        for proc in (head, worker):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_a_worker_ends_when_its_head_goes_away(standin_dir: Path) -> None:
    port, master = _free_port(), _free_port()
    head, worker = _rank(standin_dir, port, master, 0), _rank(standin_dir, port, master, 1)
    try:
        assert _wait_for(lambda: _health(port) == 200)
        head.kill()
        head.wait(5)
        assert worker.wait(10) == 1
        assert "went away" in worker.stdout.read()
    finally:
        for proc in (head, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@pytest.mark.parametrize("args", [["--nnodes", "2", "--node-rank", "1"],
                                  ["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"],
                                  ["--headless"]])
def test_bad_multi_node_arguments_exit_2(standin_dir: Path, args: list) -> None:
    proc = subprocess.run([sys.executable, str(standin_dir / "standin.py"), "--model", "llama", *args],
                          capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 2, proc.stderr


@pytest.fixture(scope="module")
def link_pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CA, a server certificate for 127.0.0.1, a client certificate of that CA and one of another CA."""
    folder = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    for ca in ("ca", "other"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                          ("client", "ca", "extendedKeyUsage=clientAuth\n"),
                          ("stranger", "other", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {name: str(folder / name) for name in ("ca", "server", "client", "stranger")}


def _tls_get(port: int, pki: dict, client: str | None, path: str = "/health") -> int:
    context = ssl.create_default_context(cafile=pki["ca"] + ".crt")
    if client:
        context.load_cert_chain(pki[client] + ".crt", pki[client] + ".key")
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_with_cert_reqs_2_only_a_client_of_the_ca_is_served_health_and_metrics_too(standin_dir: Path, link_pki: dict) -> None:
    proc, port = _start(standin_dir, "--ssl-certfile", link_pki["server"] + ".crt", "--ssl-keyfile", link_pki["server"] + ".key",
                        "--ssl-ca-certs", link_pki["ca"] + ".crt", "--ssl-cert-reqs", "2")
    try:
        assert _tls_get(port, link_pki, "client") == 200
        assert _tls_get(port, link_pki, "client", "/metrics") == 200
        for client in (None, "stranger"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _tls_get(port, link_pki, client)
        # Plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            conn.getresponse()
        # A handshake that never comes holds only its own connection.
        with socket.create_connection(("127.0.0.1", port)):
            assert _tls_get(port, link_pki, "client") == 200
    finally:
        _stop(proc)


def test_without_cert_reqs_any_tls_client_is_served(standin_dir: Path, link_pki: dict) -> None:
    proc, port = _start(standin_dir, "--ssl-certfile", link_pki["server"] + ".crt", "--ssl-keyfile", link_pki["server"] + ".key")
    try:
        assert _tls_get(port, link_pki, None) == 200
    finally:
        _stop(proc)


def test_a_bad_cert_reqs_exits_2(standin_dir: Path, link_pki: dict) -> None:
    proc = subprocess.run([sys.executable, str(standin_dir / "standin.py"), "--model", "llama", "--ssl-certfile",
                           link_pki["server"] + ".crt", "--ssl-keyfile", link_pki["server"] + ".key", "--ssl-cert-reqs", "required"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--ssl-cert-reqs" in proc.stderr
