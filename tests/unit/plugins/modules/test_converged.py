"""The converged module, run for real on files, commands and packages of this machine.

Units need systemd (this machine runs without it), so they are covered in the lab
(tests/integration/test_fast_path.py) and here only through the parser.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from ansible_collections.aphrodite.baremetal.plugins.modules import converged
from docker_api_standin import daemon  # noqa: F401  (fixture)
from module_harness import ExitJson, module_exits, run_module  # noqa: F401  (autouse fixture)

FP = "a" * 64


def run(args: dict, check_mode: bool = False) -> dict:
    return run_module(converged.main, args, check_mode=check_mode)


@pytest.fixture
def host(tmp_path: Path) -> dict:
    """A managed config directory, a big 'weights' file and where the record goes."""
    etc = tmp_path / "etc" / "haproxy"
    etc.mkdir(parents=True)
    (etc / "haproxy.cfg").write_text("global\n  maxconn 4096\n")
    (etc / "maps").mkdir()
    (etc / "maps" / "apikeys.map").write_text("k1 customer\n")
    weights = tmp_path / "models" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\0" * 4096)
    record = tmp_path / "state" / "converged.json"
    watch = {
        "haproxy": {"files": [str(etc), str(tmp_path / "etc" / "absent.conf")],
                    "commands": [[sys.executable, "-c", "print('steady')"]]},
        "model_store": {"files": [str(weights.parent)]},
    }
    return {"etc": etc, "weights": weights, "record": record, "watch": watch}


def record(host: dict, fingerprint: str = FP, **extra) -> dict:
    return run(dict({"state": "record", "fingerprint": fingerprint, "watch": host["watch"],
                     "path": str(host["record"]), "max_hash_bytes": 1024}, **extra))


def check(host: dict, fingerprint: str = FP, **extra) -> dict:
    result = run(dict({"fingerprint": fingerprint, "path": str(host["record"])}, **extra))
    assert result["changed"] is False
    return result


def test_nothing_recorded_is_not_converged(host: dict) -> None:
    result = check(host)
    assert result["converged"] is False
    assert "nothing recorded yet" in result["reasons"][0]
    assert not host["record"].exists()


def test_record_then_check_is_converged_and_the_record_is_root_only(host: dict) -> None:
    first = record(host)
    assert first["changed"] is True and first["roles"] == ["haproxy", "model_store"]
    assert stat.S_IMODE(host["record"].stat().st_mode) == 0o600
    result = check(host)
    assert result["converged"] is True, result["reasons"]
    assert result["reasons"] == [] and result["recorded_at"] == first["recorded_at"]


def test_recording_the_same_state_again_changes_nothing(host: dict) -> None:
    record(host)
    before = host["record"].read_bytes()
    again = record(host)
    assert again["changed"] is False
    assert host["record"].read_bytes() == before


def test_a_new_fingerprint_means_the_inputs_changed(host: dict) -> None:
    record(host)
    result = check(host, fingerprint="b" * 64)
    assert result["converged"] is False
    assert "inputs" in result["reasons"][0]
    assert record(host, fingerprint="b" * 64)["changed"] is True


@pytest.mark.parametrize("drift, expected", [
    (lambda h: (h["etc"] / "haproxy.cfg").write_text("global\n  maxconn 1\n"), "haproxy.cfg changed"),
    (lambda h: (h["etc"] / "haproxy.cfg").chmod(0o666), "haproxy.cfg changed"),
    (lambda h: (h["etc"] / "maps" / "apikeys.map").unlink(), "apikeys.map is gone"),
    (lambda h: shutil.rmtree(h["etc"] / "maps"), "maps is gone"),
    (lambda h: (h["etc"] / "stray.cfg").write_text("x"), "stray.cfg appeared"),
    (lambda h: (h["etc"].parent / "absent.conf").write_text("x"), "absent.conf appeared"),
    (lambda h: h["weights"].write_bytes(b"\1" * 5000), "model.safetensors changed"),
], ids=["content", "mode", "file-removed", "dir-removed", "file-added", "declared-file-appeared", "big-file"])
def test_drift_is_reported_with_what_changed(host: dict, drift, expected: str) -> None:
    record(host)
    drift(host)
    result = check(host)
    assert result["converged"] is False
    assert any(expected in reason for reason in result["reasons"]), result["reasons"]


def test_a_big_file_is_compared_by_stat_not_content(host: dict) -> None:
    record(host)
    # Same size, same mtime, same inode: the quick check cannot see this (as rsync's cannot).
    st = host["weights"].stat()
    with open(host["weights"], "r+b") as fh:
        fh.write(b"\7")
    os.utime(host["weights"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check(host)["converged"] is True
    data = json.loads(host["record"].read_text())
    assert "sha256" not in data["snapshot"]["model_store"]["files"][str(host["weights"])]


def test_command_output_drift(host: dict, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    flag.write_text("on")
    host["watch"]["haproxy"]["commands"] = [[sys.executable, "-c", f"print(open({str(flag)!r}).read())"]]
    record(host)
    assert check(host)["converged"] is True
    flag.write_text("off")
    reasons = check(host)["reasons"]
    assert len(reasons) == 1 and "the output of" in reasons[0]


def test_a_missing_command_is_recorded_not_fatal(host: dict) -> None:
    host["watch"]["haproxy"]["commands"] = [["/nonexistent/tool", "--version"]]
    record(host)
    assert check(host)["converged"] is True


def test_the_record_itself_is_never_part_of_the_snapshot(host: dict) -> None:
    host["watch"]["common"] = {"files": [str(host["record"].parent)]}
    host["record"].parent.mkdir()
    record(host)
    # Writing the record changed its directory's content; that is not drift.
    assert check(host)["converged"] is True
    assert record(host)["changed"] is False


def test_check_mode_record_writes_nothing(host: dict) -> None:
    result = record(host, _ansible_check_mode=True)
    assert result["changed"] is True
    assert not host["record"].exists()


def test_an_unreadable_record_is_not_converged(host: dict) -> None:
    host["record"].parent.mkdir()
    host["record"].write_text("{not json")
    result = check(host)
    assert result["converged"] is False and "unreadable" in result["reasons"][0]


def test_packages_of_this_machine(host: dict) -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("dpkg-query missing")
    host["watch"]["common"] = {"packages": ["dpkg", "coreutils=9*", "no-such-package-aphrodite"]}
    record(host)
    data = json.loads(host["record"].read_text())
    packages = data["snapshot"]["common"]["packages"]
    assert packages["no-such-package-aphrodite"] == "absent"
    assert packages["dpkg"] not in ("absent", "") and packages["coreutils"] not in ("absent", "")
    assert check(host)["converged"] is True


def test_units_are_parsed_from_one_systemctl_call() -> None:
    class Module:
        def get_bin_path(self, name):
            return "/bin/systemctl"

        def run_command(self, argv, environ_update=None):
            assert argv[:3] == ["/bin/systemctl", "show", "--property=Id,ActiveState,UnitFileState"]
            return 0, ("Id=haproxy.service\nActiveState=active\nUnitFileState=enabled\n\n"
                       "Id=nope.service\nActiveState=inactive\nUnitFileState=\n"), ""

    states = converged.snapshot_units(Module(), ["haproxy.service", "nope.service"])
    assert states == {"haproxy.service": "active/enabled", "nope.service": "inactive/-"}


def test_differences_name_units_and_packages() -> None:
    old = {"haproxy": {"units": {"haproxy.service": "active/enabled"}, "packages": {"haproxy": "2.8.5"}}}
    new = {"haproxy": {"units": {"haproxy.service": "failed/enabled"}, "packages": {"haproxy": "absent"}}}
    reasons = converged.differences(old, new)
    assert "haproxy: unit haproxy.service is failed/enabled, was active/enabled" in reasons
    assert "haproxy: package haproxy is absent, was 2.8.5" in reasons


def test_inputs_name_what_changed_and_match_the_filter_digest(host: dict) -> None:
    from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fingerprint

    inputs = {"collection code": "c1", "engine plan": "p1", "variables of gpu1": "v1", "facts of gpu1": "f1"}
    first = run({"state": "record", "inputs": inputs, "watch": host["watch"], "path": str(host["record"])})
    assert first["changed"] is True
    data = json.loads(host["record"].read_text())
    assert data["fingerprint"] == _fingerprint.digest_of_parts(inputs)
    assert data["inputs"] == inputs
    assert run({"inputs": inputs, "path": str(host["record"])})["converged"] is True
    # The same inputs given as their one fingerprint are the same inputs.
    assert run({"fingerprint": _fingerprint.digest_of_parts(inputs), "path": str(host["record"])})["converged"] is True

    moved = dict(inputs, **{"variables of gpu1": "v2", "engine plan": "p2"})
    reasons = run({"inputs": moved, "path": str(host["record"])})["reasons"]
    assert len(reasons) == 1 and reasons[0].endswith(": engine plan, variables of gpu1"), reasons
    grown = dict(inputs, **{"variables of gpu2": "v", "facts of gpu2": "f"})
    reasons = run({"inputs": grown, "path": str(host["record"])})["reasons"]
    assert reasons[0].endswith(": facts of gpu2, variables of gpu2"), reasons


def test_probe_returns_facts_the_record_and_the_drift_in_one_call(host: dict, tmp_path: Path) -> None:
    from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fingerprint

    probe_args = {"state": "probe", "path": str(host["record"]), "gather_subset": ["min"]}
    nothing = run(probe_args)
    assert nothing["changed"] is False and nothing["recorded_fingerprint"] is None and nothing["drift"] is None
    assert "nothing recorded yet" in nothing["reasons"][0]
    facts = nothing["ansible_facts"]
    # Named as setup names them, and marked gathered so `gathering = smart` keeps them.
    assert facts["_ansible_facts_gathered"] is True and "ansible_distribution" in facts and "ansible_python" in facts
    assert "aphrodite_gpus" not in facts and nothing["gpu_problem"] is None

    inputs = {"collection code": "c" * 64, "facts of gpu1": "f" * 64}
    run({"state": "record", "inputs": inputs, "watch": host["watch"], "path": str(host["record"]), "max_hash_bytes": 1024})
    steady = run(probe_args)
    assert steady["recorded_fingerprint"] == _fingerprint.digest_of_parts(inputs)
    assert steady["recorded_inputs"] == {"collection code": "c" * 16, "facts of gpu1": "f" * 16}
    assert steady["drift"] == []
    assert _fingerprint.verdict(steady, inputs) == {"converged": True, "reasons": []}

    (host["etc"] / "haproxy.cfg").write_text("global\n  maxconn 1\n")
    drifted = run(probe_args)
    assert any("haproxy.cfg changed" in reason for reason in drifted["drift"]), drifted["drift"]
    assert _fingerprint.verdict(drifted, inputs)["converged"] is False
    # The fast path off: facts only, no snapshot.
    assert run(dict(probe_args, compare=False))["drift"] is None


def test_probe_reads_the_gpus_or_says_why_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'garbage that is no CSV'\n")
    smi.chmod(0o755)
    args = {"state": "probe", "path": str(tmp_path / "none.json"), "gather_subset": ["min"], "gpus": True}
    # The module finds nvidia-smi on PATH, as gpu_facts does with its defaults.
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    broken = run(args)
    assert "aphrodite_gpus" not in broken["ansible_facts"] and broken["gpu_problem"], broken["gpu_problem"]
    smi.unlink()
    none = run(args)
    assert none["gpu_problem"] is None and none["ansible_facts"]["aphrodite_gpus"]["count"] == 0


def test_one_systemctl_and_one_package_query_for_every_role(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Fake:
        def get_bin_path(self, name):
            return {"systemctl": "/bin/systemctl", "dpkg-query": "/usr/bin/dpkg-query"}.get(name)

        def run_command(self, argv, environ_update=None):
            calls.append(argv[0])
            if argv[0] == "/bin/systemctl":
                units = argv[argv.index("--") + 1:]
                return 0, "\n\n".join(f"Id={u}\nActiveState=active\nUnitFileState=enabled" for u in units), ""
            names = argv[argv.index("--") + 1:]
            return 0, "".join(f"{n} 1.0 ii \n" for n in names), ""

    watch = {"common": {"units": ["a.service", "b.service"], "packages": ["curl"]},
             "haproxy": {"units": ["a.service", "haproxy.service"], "packages": ["haproxy=2.8*", "curl"]}}
    taken = converged.snapshot(Fake(), watch, 1024)
    assert calls == ["/bin/systemctl", "/usr/bin/dpkg-query"]
    assert taken["haproxy"]["units"] == {"a.service": "active/enabled", "haproxy.service": "active/enabled"}
    assert taken["haproxy"]["packages"] == {"curl": "1.0", "haproxy": "1.0"}
    assert taken["common"]["packages"] == {"curl": "1.0"}



def test_certificates_and_docker_are_read_without_a_process(host: dict, daemon, tmp_path: Path,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The TLS files a role renews and the containers and images it runs: recorded, compared,
    and named when they change; no command is run for either."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(days: int) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lb1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    pem = tmp_path / "edge.pem"
    pem.write_bytes(certificate(90))
    host["watch"]["haproxy"]["certificates"] = [{"path": str(pem), "within_days": 29}]
    host["watch"]["engine"] = {"docker": {"containers": ["aphrodite-llama-0"], "images": ["aphrodite:0.24.1"],
                                          "labelled": ["io.aphrodite.replica"]}}
    monkeypatch.setattr(converged.AnsibleModule, "run_command",
                        lambda self, argv, **kw: pytest.fail(f"ran {argv}") if "docker" in str(argv) else (0, "steady\n", ""))
    socket_path = str(daemon.server_address)
    record(host, docker_socket=socket_path)
    saved = json.loads(host["record"].read_text())["snapshot"]
    assert saved["haproxy"]["certificates"] == {f"{pem} within 29 days": "valid"}
    assert saved["engine"]["docker"]["container aphrodite-llama-0"].endswith('"io.aphrodite.replica":"llama-0"}')
    assert "certificates" not in saved["model_store"] and "docker" not in saved["model_store"]
    assert check(host, docker_socket=socket_path)["converged"] is True

    pem.write_bytes(certificate(20))  # another certificate, due for renewal
    daemon.containers["aphrodite-llama-0"]["State"]["Status"] = "exited"
    del daemon.images["aphrodite:0.24.1"]
    reasons = check(host, docker_socket=socket_path)["reasons"]
    assert f"haproxy: {pem} within 29 days: renew, was valid" in reasons
    assert "engine: container aphrodite-llama-0 changed" in reasons
    assert "engine: image aphrodite:0.24.1 is gone" in reasons
    assert "engine: labelled io.aphrodite.replica changed" in reasons
    # No daemon at all: a state of its own, not a failure of the probe.
    reasons = check(host, docker_socket=str(tmp_path / "none.sock"))["reasons"]
    assert "engine: container aphrodite-llama-0 changed" in reasons
