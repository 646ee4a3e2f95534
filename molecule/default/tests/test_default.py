"""Base layer, checked on the running hosts rather than in the files the role wrote."""

from __future__ import annotations

import re


def test_service_account_cannot_log_in(host):
    user = host.user("aphrodite")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert user.group == "aphrodite"


def test_fleet_directories_closed_to_others(host):
    for path in ("/etc/aphrodite", "/var/lib/aphrodite"):
        directory = host.file(path)
        assert directory.is_directory
        assert directory.mode == 0o750
        assert directory.group == "aphrodite"


def test_journald_runs_with_the_bounded_persistent_journal(host):
    assert host.service("systemd-journald").is_running
    # journald itself reports where it writes and the limit it applies.
    with host.sudo():
        machine_id = host.file("/etc/machine-id").content_string.strip()
        assert host.file(f"/var/log/journal/{machine_id}").is_directory
        report = host.check_output("journalctl --no-pager -b -u systemd-journald")
    assert re.search(r"System Journal \(/var/log/journal/\w+\) is .*, max 2(\.0)?G", report)
