#!/usr/bin/env python3
"""Test fixture of molecule/default (never part of a role): a webhook receiver that
records every notification Alertmanager delivers, and a TLS endpoint whose certificate the
tests swap for one about to expire.

- POST /alerts: Alertmanager's webhook payload (version 4).  Anything else, a body that is
  not that JSON or a request without the token in its query, is answered 400 or 403 and
  not recorded, as a real receiver would refuse it.  Each accepted notification is appended
  to ``alerts.jsonl`` with the time it arrived.
- GET /received: every recorded notification, oldest first, as a JSON list.
- TLS on the second port: a bare handshake with the certificate in ``tls/cert.pem``, read
  again for every connection, so a swapped file is what the next probe sees.

Usage: alert_recorder.py STATE_DIR ADDRESS HTTP_PORT TLS_PORT TOKEN_FILE
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REQUIRED = ("version", "status", "receiver", "groupLabels", "alerts")


def _valid(payload: object) -> bool:
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED) or payload["version"] != "4":
        return False
    alerts = payload["alerts"]
    return isinstance(alerts, list) and bool(alerts) and all(
        isinstance(a, dict) and a.get("status") in ("firing", "resolved") and isinstance(a.get("labels"), dict)
        and "startsAt" in a for a in alerts)


def serve_http(state: Path, address: str, port: int, token: str) -> None:
    log = state / "alerts.jsonl"
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path != "/alerts":
                return self._reply(404)
            if urllib.parse.parse_qs(url.query).get("token") != [token]:
                return self._reply(403)
            try:
                payload = json.loads(body)
            except ValueError:
                return self._reply(400)
            if self.headers.get_content_type() != "application/json" or not _valid(payload):
                return self._reply(400)
            with lock, log.open("a") as out:
                out.write(json.dumps({"received_at": time.time(), "payload": payload}) + "\n")
            return self._reply(200, b"{}")

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/received":
                return self._reply(404)
            with lock:
                lines = log.read_text().splitlines() if log.exists() else []
            return self._reply(200, json.dumps([json.loads(line) for line in lines]).encode())

        def log_message(self, *args) -> None:  # the journal needs no line per request
            pass

    ThreadingHTTPServer((address, port), Handler).serve_forever()


def serve_tls(state: Path, address: str, port: int) -> None:
    listener = socket.create_server((address, port))
    while True:
        conn, _ = listener.accept()
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(state / "tls" / "cert.pem", state / "tls" / "key.pem")
            conn.settimeout(5)
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            conn.close()


def main() -> None:
    state, address, http_port, tls_port, token_file = sys.argv[1:6]
    token = Path(token_file).read_text().strip()
    threading.Thread(target=serve_tls, args=(Path(state), address, int(tls_port)), daemon=True).start()
    serve_http(Path(state), address, int(http_port), token)


if __name__ == "__main__":
    main()
