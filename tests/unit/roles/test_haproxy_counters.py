"""The tool that carries HAProxy's request counters across a restart
(roles/haproxy/files/usr/local/libexec/aphrodite-haproxy-tables), against stand-ins for
HAProxy's runtime API and counter socket that answer as HAProxy 3.0 does."""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
TOOL = ROOT / "roles/haproxy/files/usr/local/libexec/aphrodite-haproxy-tables"
DROPIN = ROOT / "roles/haproxy/templates/etc/systemd/system/haproxy.service.d/aphrodite-counters.conf.j2"

# "show table" of HAProxy 3.0.11: a gpc(1) array prints its element as gpc0.
LISTINGS = {
    "st_key_month": "# table: st_key_month, type: string, size:102400, used:3\n"
                    "0x7f2043f79808: key=AB12:202612 use=0 exp=0 shard=0 gpc0=3\n"
                    "0x7f2043f79908: key=CD34:202612 use=0 exp=0 shard=0 gpc0=0\n"
                    "0x7f2043f79a08: key=EF56:202611 use=1 exp=0 shard=0 gpc0=17\n\n",
    "st_api_keys": "# table: st_api_keys, type: string, size:102400, used:0\n\n",
}


class RuntimeAPI(socketserver.StreamRequestHandler):
    def handle(self):
        command = self.rfile.readline().decode().split()
        self.server.commands.append(command)
        answer = LISTINGS.get(command[-1], "No such table\n\n") if command[:2] == ["show", "table"] else "\n"
        self.wfile.write(answer.encode())


class Counters(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.headers["X-Table"], self.headers["X-Key"], self.headers["X-Value"]))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(path: Path, handler, **attributes):
    server = socketserver.ThreadingUnixStreamServer(str(path), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def sockets(tmp_path):
    api = serve(tmp_path / "admin.sock", RuntimeAPI, commands=[])
    counters = serve(tmp_path / "counters.sock", Counters, requests=[], status=204)
    yield api, counters
    api.shutdown()
    counters.shutdown()


# 2026-12-06 12:00:00 UTC: December's month window; the listing also holds November's.
NOW = 1796558400


def tool(tmp_path, action, *tables, now=NOW):
    argv = [sys.executable, str(TOOL), action, "--runtime-api", str(tmp_path / "admin.sock"),
            "--restore-socket", str(tmp_path / "counters.sock"), "--state-file", str(tmp_path / "state/counters.json"),
            "--now", str(now)]
    for table in tables or ("st_api_keys:60", "st_key_month"):
        argv += ["--table", table]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_save_keeps_every_counted_entry_in_a_root_only_file(tmp_path, sockets):
    result = tool(tmp_path, "save")
    assert result.returncode == 0, result.stderr
    state = tmp_path / "state/counters.json"
    assert json.loads(state.read_text()) == {"st_api_keys": {}, "st_key_month": {"AB12:202612": 3, "EF56:202611": 17}}
    assert state.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_a_failed_save_keeps_the_last_good_state(tmp_path, sockets):
    assert tool(tmp_path, "save").returncode == 0
    before = (tmp_path / "state/counters.json").read_text()
    result = tool(tmp_path, "save", "st_key_month", "st_gone")
    assert result.returncode != 0
    assert "st_gone" in result.stderr
    assert (tmp_path / "state/counters.json").read_text() == before
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["counters.json"]


def test_restore_hands_each_saved_counter_to_haproxy(tmp_path, sockets):
    assert tool(tmp_path, "save").returncode == 0
    result = tool(tmp_path, "restore")
    assert result.returncode == 0, result.stderr
    assert sorted(sockets[1].requests) == [("st_key_month", "AB12:202612", "3"), ("st_key_month", "EF56:202611", "17")]


def test_only_the_current_window_is_saved_and_restored(tmp_path, sockets):
    """Keys end with their window's id, as haproxy.cfg makes it: last month's count can
    refuse nothing and would never leave a table without expiry."""
    assert tool(tmp_path, "save", "st_api_keys:60", "st_key_month:month").returncode == 0
    assert json.loads((tmp_path / "state/counters.json").read_text())["st_key_month"] == {"AB12:202612": 3}
    (tmp_path / "state/counters.json").write_text(json.dumps({
        "st_key_month": {"AB12:202612": 3, "EF56:202611": 17},
        "st_api_keys": {"AB12:29942640": 5, "AB12:29942639": 9}}))  # NOW // 60 and the minute before
    assert tool(tmp_path, "restore", "st_api_keys:60", "st_key_month:month").returncode == 0
    assert sorted(sockets[1].requests) == [("st_api_keys", "AB12:29942640", "5"), ("st_key_month", "AB12:202612", "3")]
    # A restart that crosses into January restores no month count.
    sockets[1].requests.clear()
    assert tool(tmp_path, "restore", "st_key_month:month", now=NOW + 26 * 86400).returncode == 0
    assert sockets[1].requests == []


def test_a_window_is_seconds_or_month(tmp_path, sockets):
    result = tool(tmp_path, "save", "st_key_hour:hourly")
    assert result.returncode != 0 and "st_key_hour:hourly" in result.stderr


def test_an_unreadable_state_restores_nothing_and_says_so(tmp_path, sockets):
    (tmp_path / "state").mkdir()
    (tmp_path / "state/counters.json").write_text('{"st_key_month": {"AB1')
    result = tool(tmp_path, "restore")
    assert result.returncode != 0 and "unreadable" in result.stderr
    assert sockets[1].requests == []


def test_restore_skips_tables_no_longer_configured(tmp_path, sockets):
    assert tool(tmp_path, "save").returncode == 0
    assert tool(tmp_path, "restore", "st_api_keys").returncode == 0
    assert sockets[1].requests == []


def test_the_drop_in_names_every_table_with_its_window():
    """The haproxy role's windows reach the tool as TABLE:WINDOW (seconds or month)."""
    variables = yaml.safe_load((ROOT / "roles/haproxy/vars/main.yml").read_text())
    windows = variables["__haproxy_key_windows"] + variables["__haproxy_token_windows"]
    for window in windows:
        seconds = {"minute": 60, "hour": 3600, "day": 86400, "month": "month"}[window["name"]]
        assert window["window"] == seconds, window
        # The id haproxy.cfg gives the window is the same division (or the UTC month).
        assert window["id"] == ("date,utime(%Y%m)" if seconds == "month" else f"date,div({seconds})"), window
    assert "__haproxy_persisted_windows" in DROPIN.read_text()


def test_restore_without_a_saved_state_does_nothing(tmp_path, sockets):
    result = tool(tmp_path, "restore")
    assert result.returncode == 0
    assert sockets[1].requests == []


def test_restore_fails_loudly_when_haproxy_refuses(tmp_path, sockets):
    assert tool(tmp_path, "save").returncode == 0
    sockets[1].status = 404
    result = tool(tmp_path, "restore")
    assert result.returncode != 0
    assert "404" in result.stderr


def test_neither_failure_can_keep_haproxy_from_stopping_or_serving():
    lines = [line for line in DROPIN.read_text().splitlines() if line.startswith("Exec")]
    assert lines and all(line.split("=", 1)[1].startswith("-") for line in lines)
