"""The backup plan: destination, items, retention and the run a restore reads."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils._backup import (
    BackupError,
    backup_plan,
    latest,
    prune,
    stamp,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet_model import fleet_model

ROOT = Path(__file__).resolve().parents[4]
RUN = "20261206T031500Z"
GROUPS = {"loadbalancers": ["lb2", "lb1"], "nfs_servers": ["nfs2", "nfs1"], "monitoring": ["mon1"], "gpu_nodes": ["gpu1"]}


def _fleet(groups=None) -> dict:
    groups = GROUPS if groups is None else groups
    hosts = {h for members in groups.values() for h in members}
    return fleet_model(None, {h: {"ansible_host": f"10.0.0.{i}"} for i, h in enumerate(sorted(hosts), 1)}, groups)


def test_default_plan_backs_up_every_source_to_the_first_nfs_server() -> None:
    plan = backup_plan(_fleet(), {}, RUN)
    assert plan["destination"] == {"host": "nfs1", "address": "10.0.0.5", "dir": "/var/backups/aphrodite",
                                   "run": RUN, "path": f"/var/backups/aphrodite/{RUN}",
                                   "partial": f"/var/backups/aphrodite/{RUN}.partial", "keep": 7}
    assert [(i["kind"], i["host"], i["file"], i["secret"]) for i in plan["items"]] == [
        ("edge", "lb2", "edge-lb2.tar.gpg", True),          # load balancers in inventory order
        ("edge", "lb1", "edge-lb1.tar.gpg", True),
        ("prometheus", "mon1", "prometheus-mon1.tar.gz", False),
        ("models", "nfs1", "models-nfs1.tar.gz", False),
        ("models", "nfs2", "models-nfs2.tar.gz", False),
    ]
    assert plan["sources"] == ["lb1", "lb2", "mon1", "nfs1", "nfs2"]


def test_only_the_edge_pki_is_secret_and_every_secret_is_gpg() -> None:
    for item in backup_plan(_fleet(), {}, RUN)["items"]:
        assert item["secret"] == (item["kind"] == "edge")
        assert item["file"].endswith(".tar.gpg") == item["secret"]


def test_settings_choose_host_dir_keep_and_leave_prometheus_out() -> None:
    plan = backup_plan(_fleet(), {"host": "mon1", "dir": "/srv/backup/", "keep": "3", "prometheus": False}, RUN)
    assert plan["destination"]["host"] == "mon1"
    assert plan["destination"]["path"] == f"/srv/backup/{RUN}"
    assert plan["destination"]["keep"] == 3
    assert "prometheus" not in {i["kind"] for i in plan["items"]}


def test_without_nfs_server_the_monitoring_host_keeps_them() -> None:
    plan = backup_plan(_fleet({"loadbalancers": ["lb1"], "monitoring": ["mon1"]}), {}, RUN)
    assert plan["destination"]["host"] == "mon1"


@pytest.mark.parametrize(("settings", "groups", "message"), [
    ({"host": "backup9"}, None, "aphrodite_backup_host is 'backup9', which is not in the inventory"),
    ({}, {"loadbalancers": ["lb1"], "gpu_nodes": ["gpu1"]}, "set aphrodite_backup_host"),
    ({"dir": "var/backups"}, None, "aphrodite_backup_dir is 'var/backups'"),
    ({"dir": "/"}, None, "aphrodite_backup_dir is '/'"),
    ({"dir": "/srv/../etc"}, None, "without '..'"),
    ({"keep": 0}, None, "aphrodite_backup_keep is 0"),
    ({"keep": "many"}, None, "aphrodite_backup_keep is 'many'"),
    ({"keep": True}, None, "aphrodite_backup_keep is True"),
])
def test_bad_settings_are_named(settings, groups, message) -> None:
    with pytest.raises(BackupError, match=message.replace("(", r"\(").replace(")", r"\)").replace("..", r"\.\.")):
        backup_plan(_fleet(groups), settings, RUN)


def test_a_run_is_a_sortable_utc_stamp() -> None:
    first = datetime(2026, 12, 6, 3, 15, tzinfo=timezone(timedelta(hours=1)))
    assert stamp(first) == "20261206T021500Z"
    assert stamp(first) < stamp(first + timedelta(seconds=1))
    with pytest.raises(BackupError, match="not a stamp"):
        backup_plan(_fleet(), {}, "latest")


@pytest.mark.parametrize(("names", "keep", "removed"), [
    ([], 2, []),
    (["20261201T000000Z"], 1, []),
    (["20261203T000000Z", "20261201T000000Z", "20261202T000000Z"], 2, ["20261201T000000Z"]),
    (["20261203T000000Z", "20261201T000000Z", "20261202T000000Z"], 1, ["20261201T000000Z", "20261202T000000Z"]),
    # Nothing but run stamps is ever removed, however many.
    (["notes", "lost+found", "2026", "20261201T000000Z", "20261202T000000Z"], 1, ["20261201T000000Z"]),
])
def test_retention_removes_the_oldest_runs_only(names, keep, removed) -> None:
    assert prune(names, keep) == removed


def test_failed_runs_count_for_nothing_and_their_leftovers_go() -> None:
    """Six failed runs and one good one with keep 7: every complete run stays, the failed
    runs' partial directories go, the run being written stays, and a restore never picks
    a partial run."""
    complete = [f"2026120{d}T000000Z" for d in range(1, 4)]
    partial = [f"2026120{d}T000000Z.partial" for d in range(4, 10)]
    assert prune(complete + partial, 7, "20261209T000000Z") == partial[:-1]
    assert prune(complete + partial, 2) == complete[:1] + partial
    assert latest(complete + partial) == "20261203T000000Z"


def test_restore_reads_the_newest_run_or_the_one_named() -> None:
    names = ["20261202T000000Z", "notes", "20261203T000000Z", "20261201T000000Z"]
    assert latest(names) == "20261203T000000Z"
    assert latest(names, "20261201T000000Z") == "20261201T000000Z"
    with pytest.raises(BackupError, match="aphrodite_restore_run is '20261204T000000Z'"):
        latest(names, "20261204T000000Z")
    with pytest.raises(BackupError, match="no backup run yet"):
        latest(["notes"])


def test_the_roles_own_the_paths_the_backup_reads() -> None:
    """The entry points read their roles' own paths: the edge PKI and the CA files a restore needs."""
    haproxy = yaml.safe_load((ROOT / "roles/haproxy/vars/main.yml").read_text())
    assert haproxy["__haproxy_ca_dir"] == haproxy["__haproxy_pki_dir"] + "/ca"
    # Both CAs, the edge's and the engine link's: what a rebuilt CA host needs to sign again.
    assert set(haproxy["__haproxy_ca_kept"]) == {"ca.key", "ca.csr", "ca.crt", "link-ca.key", "link-ca.csr", "link-ca.crt"}
    for entry in ("roles/haproxy/tasks/backup.yml", "roles/haproxy/tasks/restore_ca.yml",
                  "roles/monitoring/tasks/snapshot.yml", "roles/model_store/tasks/manifests.yml"):
        text = (ROOT / entry).read_text()
        assert "aphrodite_backup_file" in text and "/etc/" not in text, entry
