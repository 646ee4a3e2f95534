"""The vault password, handed to Ansible without ever being written down.

Two ways in, one at a time:

- ``--vault-password-file PATH``: Ansible reads the file (or runs it, when executable);
  only the path travels, on the command line.
- ``APHRODITE_VAULT_PASSWORD`` in the environment: :func:`take_env_password` removes it
  from this process's environment as the CLI starts, so that no child process inherits it
  and ansible-runner, which records the environment of every run in its artefacts
  (``artifacts/<ident>/command``), never sees it. For the length of a run the password is
  served from memory over a Unix socket in a private (0700) directory, and Ansible gets
  the path of a small script that asks that socket: a vault password script.

``ANSIBLE_VAULT_PASSWORD_FILE`` (a path) keeps working as Ansible documents it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
from pathlib import Path

ENV_PASSWORD = "APHRODITE_VAULT_PASSWORD"

_CLIENT = '''#!{python}
"""Vault password script of one aphrodite-deploy run: prints the password the CLI holds in memory."""
import socket
import sys

client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.settimeout(30)
client.connect({socket_path!r})
chunks = []
while True:
    data = client.recv(4096)
    if not data:
        break
    chunks.append(data)
sys.stdout.write(b"".join(chunks).decode())
'''


class VaultError(RuntimeError):
    """The vault password cannot be handed over as asked."""


def take_env_password(environ: dict[str, str] | None = None) -> str | None:
    """Remove ``APHRODITE_VAULT_PASSWORD`` from the environment and return it (None when unset)."""
    env = os.environ if environ is None else environ
    value = env.pop(ENV_PASSWORD, None)
    return value if value else None


class VaultSecrets:
    """Context manager: the ``--vault-password-file`` arguments for Ansible during a run.

    ``args`` is empty when no password was given (Ansible may still use
    ``ANSIBLE_VAULT_PASSWORD_FILE``); ``path`` is the file or script Ansible reads.
    """

    def __init__(self, password_file: str | os.PathLike[str] | None = None, password: str | None = None) -> None:
        if password_file and password:
            raise VaultError(f"the vault password comes from --vault-password-file or from {ENV_PASSWORD}, "
                             f"not both; unset {ENV_PASSWORD} or leave out --vault-password-file")
        self._file = Path(password_file).expanduser() if password_file else None
        self._password = password
        self._dir: Path | None = None
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.path: str | None = None

    @property
    def args(self) -> list[str]:
        return ["--vault-password-file", self.path] if self.path else []

    def __enter__(self) -> "VaultSecrets":
        if self._file is not None:
            if not self._file.is_file():
                raise VaultError(f"vault password file {self._file} does not exist")
            if not os.access(self._file, os.R_OK):
                raise VaultError(f"vault password file {self._file} is not readable")
            self.path = str(self._file.resolve())
        elif self._password is not None:
            self._serve()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ socket
    def _serve(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="aphrodite-vault-"))
        os.chmod(self._dir, stat.S_IRWXU)
        socket_path = self._dir / "password.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(socket_path))
        os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR)
        server.listen(8)
        server.settimeout(0.2)
        self._server = server
        script = self._dir / "vault-password"
        script.write_text(_CLIENT.format(python=sys.executable, socket_path=str(socket_path)))
        os.chmod(script, stat.S_IRWXU)
        self.path = str(script)
        self._thread = threading.Thread(target=self._answer, name="aphrodite-vault", daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        assert self._server is not None and self._password is not None
        payload = self._password.encode() + b"\n"
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                if not _same_user(conn):
                    continue
                try:
                    conn.sendall(payload)
                except OSError:
                    continue

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._file is None:
            self.path = None


def _same_user(conn: socket.socket) -> bool:
    """Only processes of this user get the password (the directory is 0700 too)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)
