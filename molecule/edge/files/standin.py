#!/usr/bin/env python3
"""A stand-in for one engine replica: the HTTP surface of Aphrodite Engine, no model.

Serves what the edge routes to and what it must keep closed:

- ``GET /health`` 200 (503 while ``/run/edge-standin/<port>.down`` exists);
- ``GET /metrics``, ``/docs``, ``/invocations``: open, like the engine's;
- ``/v1/*``: 401 ``{"error":"Unauthorized"}`` unless ``Authorization: Bearer <key>`` carries
  the engine key (read from a file, as the engine reads APHRODITE_API_KEY);
- ``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
  with ``"stream": true`` answered as server-sent events, one chunk per ``max_tokens``;
  ``usage`` (prompt, completion and total tokens) in every answer, and in a stream only with
  ``stream_options.include_usage``, as a last chunk with no choices (the engine's OpenAI server).

With ``--ssl-certfile``/``--ssl-keyfile`` it serves TLS on every path, as the engine's uvicorn
does; ``--ssl-cert-reqs 2`` (ssl.CERT_REQUIRED) then refuses a handshake without a client
certificate of ``--ssl-ca-certs``.

Every request is appended to ``/var/log/edge-standin/<port>.jsonl`` (path, method, whether
the key matched; never a key) so tests can tell what reached an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPEN_PATHS = {"/metrics", "/docs", "/openapi.json", "/invocations", "/version"}


def make_handler(config: dict, key: str, log_path: str, down_flag: str):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "standin"

        def log_message(self, fmt, *args):  # quiet: the JSON log below is the record
            return

        def _record(self, authorized: bool | None, body: dict | None) -> None:
            entry = {"time": time.time(), "method": self.command, "path": self.path, "authorized": authorized,
                     "model": (body or {}).get("model"), "replica": config["name"],
                     "x_forwarded_for": self.headers.get("X-Forwarded-For")}
            with lock, open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")

        def _send(self, status: int, payload, content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else {}
            except ValueError:
                return {}

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {key}"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._record(None, None)
                return self._send(503 if os.path.exists(down_flag) else 200, b"", "text/plain")
            if path in OPEN_PATHS:
                self._record(None, None)
                return self._send(200, b"# open engine route\n", "text/plain")
            if path.startswith("/v1/"):
                ok = self._authorized()
                self._record(ok, None)
                if not ok:
                    return self._send(401, {"error": "Unauthorized"})
                if path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [
                        {"id": name, "object": "model", "owned_by": "aphrodite"} for name in config["served_names"]]})
            self._record(None, None)
            return self._send(404, {"detail": "Not Found"})

        def do_POST(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            body = self._body()
            if not path.startswith("/v1/"):
                self._record(None, body)
                return self._send(200 if path in OPEN_PATHS else 404, {"detail": "open engine route"})
            ok = self._authorized()
            self._record(ok, body)
            if not ok:
                return self._send(401, {"error": "Unauthorized"})
            model = body.get("model") or config["served_names"][0]
            if model not in config["served_names"]:
                return self._send(404, {"error": {"message": f"The model `{model}` does not exist.", "code": 404}})
            if path == "/v1/embeddings":
                return self._send(200, {"object": "list", "model": model, "replica": config["name"],
                                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
            if path not in ("/v1/chat/completions", "/v1/completions"):
                return self._send(404, {"detail": "Not Found"})
            tokens = max(1, min(int(body.get("max_tokens") or 3), 200))
            delay = float(body.get("stream_delay", 0.05))
            prompt = len(json.dumps(body.get("messages", body.get("prompt", ""))).split())
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for index in range(tokens):
                    chunk = {"object": "chat.completion.chunk", "model": model, "replica": config["name"],
                             "choices": [{"index": 0, "delta": {"content": f"t{index} "}}]}
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                    time.sleep(delay)
                # As the engine's OpenAI server: usage in a stream only when asked, as a last
                # chunk with no choices.
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunk = {"object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
                return None
            text = " ".join(f"t{i}" for i in range(tokens))
            return self._send(200, {"object": "chat.completion", "model": model, "replica": config["name"],
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "finish_reason": "length"}], "usage": usage})

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


class TLSServer(ThreadingHTTPServer):
    """HTTPS, the handshake in each request's own thread: a failed one ends only its connection."""

    context: ssl.SSLContext

    def get_request(self):
        conn, peer = self.socket.accept()
        conn.settimeout(10)
        return self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), peer

    def finish_request(self, request, client_address):
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            print(f"TLS handshake with {client_address[0]} failed: {exc}", flush=True)
            return
        request.settimeout(None)
        super().finish_request(request, client_address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON: name, port, address, served_names")
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--ssl-ca-certs")
    parser.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE))
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(args.key_file, encoding="utf-8") as handle:
        key = handle.read().strip()
    os.makedirs("/var/log/edge-standin", exist_ok=True)
    os.makedirs("/run/edge-standin", exist_ok=True)
    handler = make_handler(config, key, f"/var/log/edge-standin/{config['port']}.jsonl",
                           f"/run/edge-standin/{config['port']}.down")
    if args.ssl_certfile:
        server = TLSServer((config["address"], int(config["port"])), handler)
        server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        server.context.verify_mode = ssl.VerifyMode(args.ssl_cert_reqs)
        if args.ssl_ca_certs:
            server.context.load_verify_locations(args.ssl_ca_certs)
    else:
        server = ThreadingHTTPServer((config["address"], int(config["port"])), handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
