"""Backups and the edge CA's restore on the converged scenario (playbooks/backup.yml, restore.yml).

Runs after test_fast_path.py (file order), on the converged fleet: one backup run with
older runs already on the NFS host, then the first load balancer loses its whole PKI, the
CA comes back from the backup and site.yml (fast path on, as deploy runs it) signs a new
certificate with it.  Every playbook run is the real one against the scenario's hosts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import testinfra

BACKUP_DIR = "/var/backups/aphrodite"
PASSPHRASE = "test-backup-passphrase-3f9a61c2d8"  # molecule.yml, group_vars all
OLD_RUNS = ("20200101T000000Z", "20200102T000000Z")
FAILED_RUN = "20200103T000000Z.partial"
PKI = "/etc/haproxy/pki"


def _host(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}")


def _playbook(path: str, *extra: str) -> subprocess.CompletedProcess:
    project = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
    env = dict(os.environ, ANSIBLE_FORCE_COLOR="false")
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), str(project / path),
                           "-i", os.environ["MOLECULE_INVENTORY_FILE"], *extra],
                          capture_output=True, text=True, env=env, cwd=project)


def _decrypt(data: bytes, passphrase: str) -> subprocess.CompletedProcess:
    """gpg on this machine, the passphrase on a file descriptor as the playbooks pass it."""
    with tempfile.TemporaryDirectory() as home:
        os.chmod(home, 0o700)
        encrypted = Path(home) / "edge.tar.gpg"
        encrypted.write_bytes(data)
        read, write = os.pipe()
        os.write(write, passphrase.encode() + b"\n")
        os.close(write)
        try:
            return subprocess.run(["gpg", "--homedir", home, "--batch", "--quiet", "--no-symkey-cache",
                                   "--pinentry-mode", "loopback", "--passphrase-fd", str(read),
                                   "--decrypt", str(encrypted)], capture_output=True, pass_fds=(read,))
        finally:
            os.close(read)


@pytest.fixture(scope="module")
def nfs():
    return _host("mol-nfs1")


@pytest.fixture(scope="module")
def lb():
    return _host("mol-lb1")


@pytest.fixture(scope="module")
def run(nfs) -> str:
    """One backup run, keeping 2, with two older runs, what a failed run left and an unrelated
    directory already there."""
    with nfs.sudo():
        nfs.check_output(f"rm -rf {BACKUP_DIR}")  # a rerun on live instances starts from the same state
        nfs.check_output(f"install -d -m 0700 {BACKUP_DIR} "
                         + " ".join(f"{BACKUP_DIR}/{n}" for n in OLD_RUNS + (FAILED_RUN, "notes")))
    proc = _playbook("playbooks/backup.yml", "-e", "aphrodite_backup_keep=2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert PASSPHRASE not in proc.stdout + proc.stderr
    runs = re.findall(r"archive\(s\) in " + BACKUP_DIR + r"/(\d{8}T\d{6}Z) on mol-nfs1", proc.stdout)
    assert len(runs) == 1, proc.stdout[-2000:]
    return runs[0]


def test_backup_without_passphrase_stops_naming_the_variable(nfs) -> None:
    listing = f"ls -A {BACKUP_DIR} 2>/dev/null || true"
    with nfs.sudo():
        before = nfs.check_output(listing)
    proc = _playbook("playbooks/backup.yml", "-e", "aphrodite_backup_passphrase=")
    assert proc.returncode != 0
    assert "aphrodite_backup_passphrase is not set" in " ".join((proc.stdout + proc.stderr).split())
    with nfs.sudo():
        assert nfs.check_output(listing) == before


def test_a_run_is_root_only_and_retention_keeps_the_newest(nfs, run) -> None:
    with nfs.sudo():
        # The failed run's leftover went; it never counted among the runs kept.
        assert sorted(nfs.check_output(f"ls {BACKUP_DIR}").split()) == [OLD_RUNS[1], run, "notes"]
        for path in (BACKUP_DIR, f"{BACKUP_DIR}/{run}"):
            directory = nfs.file(path)
            assert (directory.user, directory.group, directory.mode) == ("root", "root", 0o700), path
        files = nfs.check_output(f"ls {BACKUP_DIR}/{run}").split()
        assert sorted(files) == ["edge-mol-lb1.tar.gpg", "manifest.json", "models-mol-nfs1.tar.gz",
                                 "prometheus-mol-nfs1.tar.gz"]
        assert all(nfs.file(f"{BACKUP_DIR}/{run}/{f}").mode == 0o600 for f in files)
        manifest = json.loads(nfs.file(f"{BACKUP_DIR}/{run}/manifest.json").content_string)
    assert manifest["run"] == run and {i["file"] for i in manifest["items"]} == set(files) - {"manifest.json"}


def test_no_private_key_in_clear_and_the_edge_pki_decrypts_with_the_passphrase(nfs, lb, run) -> None:
    with nfs.sudo():
        # Every file of every run, and inside every compressed archive.
        assert nfs.run(f"grep -r -a -l 'PRIVATE KEY' {BACKUP_DIR}").rc == 1
        for archive in nfs.check_output(f"find {BACKUP_DIR} -name '*.tar.gz'").split():
            assert nfs.check_output(f"tar -xzOf {archive} | grep -a -c 'PRIVATE KEY' || true") == "0", archive
        encrypted = base64.b64decode(nfs.check_output(f"base64 -w0 {BACKUP_DIR}/{run}/edge-mol-lb1.tar.gpg"))
    assert _decrypt(encrypted, "not-the-passphrase-0000").returncode != 0
    clear = _decrypt(encrypted, PASSPHRASE)
    assert clear.returncode == 0, clear.stderr
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["tar", "-C", out, "-x"], input=clear.stdout, check=True)
        with lb.sudo():
            for name in ("ca/ca.key", "ca/ca.crt", "edge.pem.key", "edge.pem"):
                assert (Path(out) / "pki" / name).read_text() == lb.file(f"{PKI}/{name}").content_string, name


def test_the_prometheus_snapshot_is_a_tsdb_with_samples(nfs, run) -> None:
    with nfs.sudo():
        out = nfs.check_output(f"d=$(mktemp -d) && tar -C $d -xzf {BACKUP_DIR}/{run}/prometheus-mol-nfs1.tar.gz"
                               " && promtool tsdb list $d/* ; rm -rf $d")
        # Prometheus keeps no snapshot behind in its data directory.
        assert nfs.check_output("ls /var/lib/prometheus/metrics2/snapshots") == ""
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert rows, out
    assert sum(int(row[4]) for row in rows) > 0, out  # BLOCK ULID, MIN TIME, MAX TIME, DURATION, NUM SAMPLES, ...


def test_the_model_manifests_are_the_staged_markers(nfs, run) -> None:
    with nfs.sudo():
        listed = nfs.check_output(f"tar -tzf {BACKUP_DIR}/{run}/models-mol-nfs1.tar.gz").split()
        marker = json.loads(nfs.check_output(f"tar -xzOf {BACKUP_DIR}/{run}/models-mol-nfs1.tar.gz {listed[0]}"))
    assert listed == ["meta-llama/Llama-3.1-8B-Instruct/.aphrodite-model.json"]
    assert marker["id"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_restore_and_deploy_bring_back_the_same_ca_and_chain(lb, run) -> None:
    with lb.sudo():
        old_ca = lb.file(f"{PKI}/ca.crt").content_string
        old_key = lb.file(f"{PKI}/ca/ca.key").sha256sum
        old_leaf = lb.file(f"{PKI}/edge.pem").content_string
        lb.check_output(f"rm -rf {PKI}")  # the first load balancer's PKI lost whole

    # Another passphrase: refused with the fix named, nothing put in place.
    wrong = _playbook("playbooks/restore.yml", "-e", "aphrodite_backup_passphrase=not-the-passphrase-0000")
    assert wrong.returncode != 0
    # Ansible prints a failed task's message on stderr.
    said = " ".join((wrong.stdout + wrong.stderr).split())
    assert "could not be decrypted" in said and "aphrodite_backup_passphrase" in said, said[-3000:]
    assert "not-the-passphrase-0000" not in wrong.stdout + wrong.stderr
    with lb.sudo():
        assert not lb.file(f"{PKI}/ca/ca.key").exists

    restore = _playbook("playbooks/restore.yml")
    assert restore.returncode == 0, restore.stdout[-4000:] + restore.stderr[-2000:]
    assert PASSPHRASE not in restore.stdout + restore.stderr
    with lb.sudo():
        assert lb.file(f"{PKI}/ca/ca.key").sha256sum == old_key
        assert lb.file(f"{PKI}/ca/ca.key").mode == 0o600
        assert not lb.file(f"{PKI}/edge.pem").exists

    deploy = _playbook("site.yml", "-e", "aphrodite_fast_path=true")
    assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-2000:]
    with lb.sudo():
        assert lb.file(f"{PKI}/ca.crt").content_string == old_ca
        new_leaf = lb.file(f"{PKI}/edge.pem").content_string
    assert new_leaf != old_leaf
    # What a client that trusted the old CA sees: the new certificate, chaining to it.
    context = ssl.create_default_context(cadata=old_ca)
    context.check_hostname = False
    address = lb.ansible.get_variables()["ansible_host"]
    with context.wrap_socket(socket.create_connection((address, 443), timeout=10)) as tls:
        served = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))
    leaf = new_leaf[:new_leaf.index("-----END CERTIFICATE-----")] + "-----END CERTIFICATE-----\n"
    assert served == ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(leaf))
