# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSES/Apache-2.0.txt)
"""What Docker runs, read from the Engine API on its socket, for the fast path's probe.

The probe (plugins/modules/converged.py) compares containers and images with the record.
Through the ``docker`` CLI that was a Go process per question (about 15 ms of CPU each, five
on a GPU node); here every question is one HTTP request on one connection to the daemon's
socket, from the module's own process.  The fields are those the CLI's formats printed:
a container by its ID, image ID, status, restart policy and labels (never its uptime), an
image by its ID, and the containers carrying a label by name, ID, image and state.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from urllib.parse import quote


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerState:
    """Answers about containers and images; ``problem`` names why Docker could not be asked."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self._path = socket_path
        self._timeout = timeout
        self._conn: _UnixConnection | None = None
        self.problem: str | None = None

    def _get(self, path: str) -> tuple[int, object]:
        """Status and JSON body of a GET (the body only with 200); (0, None) once ``problem`` is set."""
        for attempt in (1, 2):  # once more on a new connection, should the daemon close a kept one
            if self.problem is not None:
                return 0, None
            try:
                if self._conn is None:
                    self._conn = _UnixConnection(self._path, self._timeout)
                self._conn.request("GET", path)
                response = self._conn.getresponse()
                body = response.read()
            except FileNotFoundError:
                self.problem = "no docker socket"
                continue
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2:
                    self.problem = "docker did not answer (%s)" % type(exc).__name__
                continue
            if response.status != 200:
                return response.status, None
            try:
                return 200, json.loads(body)
            except ValueError:
                self.problem = "docker answered what is not JSON"
        return 0, None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _inspect(self, path: str) -> tuple[dict | None, str | None]:
        """The object at ``path``, or what to say instead: absent, an error, why Docker was not asked."""
        status, body = self._get(path)
        if self.problem is not None:
            return None, self.problem
        if status == 404:
            return None, "absent"
        if status != 200 or not isinstance(body, dict):
            return None, "docker error %d" % status
        return body, None

    def container(self, name: str) -> str:
        body, instead = self._inspect("/containers/%s/json" % quote(name, safe=""))
        if body is None:
            return instead
        state = body.get("State") or {}
        policy = (body.get("HostConfig") or {}).get("RestartPolicy") or {}
        labels = (body.get("Config") or {}).get("Labels") or {}
        return "%s %s %s %s %s" % (body.get("Id"), body.get("Image"), state.get("Status"), policy.get("Name") or "-",
                                   json.dumps(labels, sort_keys=True, separators=(",", ":")))

    def image(self, reference: str) -> str:
        body, instead = self._inspect("/images/%s/json" % quote(reference, safe="/:@"))
        return instead if body is None else str(body.get("Id"))

    def labelled(self, label: str) -> str:
        """The containers (all, running or not) carrying ``label``, by a digest of their names,
        IDs, images and states: one changes, is added or goes, and the answer differs."""
        filters = quote(json.dumps({"label": [label]}), safe="")
        status, body = self._get("/containers/json?all=1&filters=%s" % filters)
        if self.problem is not None:
            return self.problem
        if status != 200 or not isinstance(body, list):
            return "docker error %d" % status
        lines = sorted("%s %s %s %s" % (",".join(sorted(c.get("Names") or [])), c.get("Id"), c.get("Image"), c.get("State"))
                       for c in body if isinstance(c, dict))
        return "%d container(s) sha256=%s" % (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest())
