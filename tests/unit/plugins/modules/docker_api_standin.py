"""A stand-in of the Docker Engine API on a Unix socket, for the probe's tests: it answers
the paths the probe asks (a container, an image, the containers carrying a label) as
dockerd does: 404 with a message for what is not there, chunked bodies, kept connections
that the daemon may close."""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

REPLICA = {
    "Id": "c0ffee" * 10 + "abcd", "Image": "sha256:" + "1" * 64, "Name": "/aphrodite-llama-0",
    "State": {"Status": "running", "StartedAt": "2026-12-06T10:00:00Z", "Health": {"Status": "healthy"}},
    "HostConfig": {"RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0}},
    "Config": {"Labels": {"io.aphrodite.replica": "llama-0", "io.aphrodite.digest": "abc"}},
}


class Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.containers = {"aphrodite-llama-0": json.loads(json.dumps(REPLICA))}
        self.images = {"aphrodite:0.24.1": {"Id": "sha256:" + "1" * 64}}
        self.requests: list[str] = []
        self.close_after_each = False
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as dockerd

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: object, chunked: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 7):
                part = data[i:i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        if self.server.close_after_each:
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        daemon = self.server
        daemon.requests.append(self.path)
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")]
        if parts[1] == "containers" and parts[2] == "json":
            wanted = json.loads(parse_qs(url.query)["filters"][0])["label"][0]
            listed = [{"Id": c["Id"], "Names": [c["Name"]], "Image": "aphrodite:0.24.1", "ImageID": c["Image"],
                       "State": c["State"]["Status"], "Status": "Up 3 hours", "Labels": c["Config"]["Labels"]}
                      for c in daemon.containers.values() if wanted in c["Config"]["Labels"]]
            return self._send(200, listed, chunked=True)
        if parts[1] == "containers" and parts[-1] == "json":
            name = "/".join(parts[2:-1])
            if name in daemon.containers:
                return self._send(200, daemon.containers[name], chunked=True)
            return self._send(404, {"message": f"No such container: {name}"})
        if parts[1] == "images" and parts[-1] == "json":
            name = "/".join(parts[2:-1])
            if name in daemon.images:
                return self._send(200, daemon.images[name])
            return self._send(404, {"message": f"No such image: {name}"})
        return self._send(404, {"message": "page not found"})


@pytest.fixture
def daemon(tmp_path: Path):
    path = str(tmp_path / "docker.sock")
    server = Daemon(path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


