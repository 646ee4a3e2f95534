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
