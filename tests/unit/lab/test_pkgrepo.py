"""The lab package repository (lab/pkgrepo.py) offers what the roles' production defaults ask
for, and its payloads fail where the real tools fail."""

from __future__ import annotations

import fnmatch
import importlib.machinery
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLES = ROOT / "roles"


def _load(name: str, path: Path):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    loader.exec_module(module)
    return module


pkgrepo = _load("pkgrepo", ROOT / "lab" / "pkgrepo.py")
smi = _load("lab_nvidia_smi", ROOT / "lab" / "fixtures" / "gpu" / "nvidia-smi")

FAKE_DEBIAN = Path("/nonexistent")  # docker_packages only names the files it would copy


def _defaults(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


def _vars(role: str, name: str) -> dict:
    return yaml.safe_load((ROLES / role / "vars" / f"{name}.yml").read_text())


def _all_packages() -> list:
    packages = [p for b, v in pkgrepo.DRIVERS.items() for p in pkgrepo.nvidia_packages(b, v)]
    packages += [p for v in pkgrepo.TOOLKIT_VERSIONS for p in pkgrepo.toolkit_packages(v)]
    packages += [pkgrepo.containerd_package(FAKE_DEBIAN)]
    packages += [p for v in pkgrepo.DOCKER_VERSIONS for p in pkgrepo.docker_packages(v, FAKE_DEBIAN)]
    return packages


def _offers(spec: str) -> list:
    """Packages of the repository that an apt spec (name, name=version-glob) selects."""
    name, _, version = spec.partition("=")
    return [p for p in _all_packages() if p.name == name and (not version or fnmatch.fnmatch(p.version, version))]


def test_the_default_driver_branch_and_the_next_are_offered() -> None:
    branch = _defaults("nvidia_driver")["nvidia_driver_branch"]
    branches = sorted(pkgrepo.DRIVERS)
    assert branches[0] == branch
    assert len(branches) == 2 and int(branches[1]) > int(branch)


@pytest.mark.parametrize("branch", sorted(pkgrepo.DRIVERS))
def test_debian_13_cuda_source_finds_every_driver_package_and_fabric_manager(branch: str) -> None:
    sources = {**_vars("nvidia_driver", "Debian"), **_vars("nvidia_driver", "Debian_13")}["__nvidia_driver_sources"]
    cuda = sources["cuda"]
    version = pkgrepo.DRIVERS[branch]
    for flavour in ("open", "proprietary"):
        for spec in cuda["packages"][flavour]:
            assert _offers(spec.replace("{branch}", branch)), spec
    for spec in cuda["fabric_manager"]:
        found = _offers(spec.replace("{branch}", branch).replace("{version}", version))
        assert [p.version for p in found] == [f"{version}-1"], spec
    assert _offers(cuda["version_package"].replace("{branch}", branch))


def test_without_the_pin_apt_would_take_the_next_branch() -> None:
    """The meta package asks for >= versions: only the role's apt pin keeps the branch."""
    low, high = sorted(pkgrepo.DRIVERS)
    meta = next(p for p in pkgrepo.nvidia_packages(low, pkgrepo.DRIVERS[low]) if p.name == f"cuda-drivers-{low}")
    assert re.search(r"nvidia-kernel-open-dkms \(>= ", meta.fields["Depends"])
    assert _offers(f"nvidia-kernel-open-dkms={pkgrepo.DRIVERS[high]}-*")


def test_docker_and_toolkit_defaults_are_offered_beside_a_newer_version() -> None:
    defaults = _defaults("container_runtime")
    docker = {**_vars("container_runtime", "Debian"), **_vars("container_runtime", "Debian_13")}
    for spec in docker["__container_runtime_sources"]["docker"]["packages"]:
        assert len(_offers(spec.replace("{version}", defaults["container_runtime_docker_version"]))) == 1, spec
    for spec in docker["__container_runtime_toolkit_package_specs"]:
        assert len(_offers(spec.replace("{version}", defaults["container_runtime_nvidia_toolkit_version"]))) == 1, spec
    assert defaults["container_runtime_docker_version"] == pkgrepo.DOCKER_VERSIONS[0]
    assert defaults["container_runtime_nvidia_toolkit_version"] == pkgrepo.TOOLKIT_VERSIONS[0]
    assert len(_offers("docker-ce")) == len(pkgrepo.DOCKER_VERSIONS) > 1


BASE_SYSTEM = {"libc6", "libsystemd0", "libseccomp2", "iptables"}


def test_every_dependency_is_in_the_repository_or_the_base_system() -> None:
    names = {p.name for p in _all_packages()}
    for package in _all_packages():
        for alternatives in filter(None, (package.fields.get("Depends") or "").split(",")):
            options = [re.match(r"\s*([a-z0-9.+-]+)", alt).group(1) for alt in alternatives.split("|")]
            assert any(o in names or o in BASE_SYSTEM for o in options), (package.name, alternatives)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_built_package_carries_its_control_fields_and_files(tmp_path: Path) -> None:
    package = pkgrepo.toolkit_packages("1.17.8")[2]
    deb = pkgrepo.build_deb(package, tmp_path)
    fields = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: nvidia-container-toolkit-base\n" in fields and "Version: 1.17.8-1\n" in fields
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^-rwxr-xr-x root/root .* \./usr/bin/nvidia-ctk$", listing, re.M)


# ---------------------------------------------------------------- payloads
@pytest.fixture()
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GPU node's files for the packaged nvidia-smi: the PCIe server's recording, driver 550."""
    recorded = ROOT / "tests" / "fixtures" / "nvidia_smi"
    hardware = ROOT / "lab" / "fixtures" / "gpu" / "hardware" / "l40s-pcie.json"
    for name, path in (("RECORDED", str(recorded)), ("HARDWARE", str(hardware)),
                       ("LIBRARY", str(tmp_path / "nvml-version")), ("BUILT", str(tmp_path / "built")),
                       ("LOADED", str(tmp_path / "run" / "loaded")), ("PERSISTENCE", str(tmp_path / "run" / "pm"))):
        monkeypatch.setattr(smi, name, path)
    (tmp_path / "nvml-version").write_text("550.90.07\n")
    return tmp_path


def _smi(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = smi.main(list(argv))
    return code, capsys.readouterr().out


def test_packaged_nvidia_smi_fails_like_the_real_one_without_a_module(node: Path, capsys) -> None:
    code, out = _smi(capsys, "--query-gpu=index", "--format=csv,noheader")
    assert code == 9
    assert out.strip() == (ROOT / "tests" / "fixtures" / "nvidia_smi" / "nvidia_smi_no_driver.txt").read_text().strip()


def test_packaged_nvidia_smi_loads_the_built_module_and_reports_it(node: Path, capsys) -> None:
    (node / "built").write_text("550.90.07\n")
    code, out = _smi(capsys, "--query-gpu=index,driver_version,persistence_mode", "--format=csv,noheader")
    assert code == 0
    assert out.splitlines() == [f"{n}, 550.90.07, Disabled" for n in range(5)]
    assert (node / "run" / "loaded").read_text().strip() == "550.90.07"
    code, out = _smi(capsys, "-pm", "1")
    assert code == 0 and "Enabled persistence mode for GPU" in out
    code, out = _smi(capsys, "--query-gpu=persistence_mode", "--format=csv,noheader")
    assert set(out.split()) == {"Enabled"}


def test_packaged_nvidia_smi_after_an_upgrade_without_reboot_reports_the_mismatch(node: Path, capsys) -> None:
    (node / "run").mkdir()
    (node / "run" / "loaded").write_text("550.90.07\n")
    (node / "built").write_text("570.172.08\n")
    (node / "nvml-version").write_text("570.172.08\n")
    code, out = _smi(capsys, "-L")
    assert code == 18
    assert out.startswith("Failed to initialize NVML: Driver/library version mismatch")
    # The reboot: /run is empty again, and the new module loads.
    shutil.rmtree(node / "run")
    code, out = _smi(capsys, "--query-gpu=driver_version", "--format=csv,noheader")
    assert code == 0 and set(out.split()) == {"570.172.08"}


def test_bind_mounted_nvidia_smi_replays_the_server_a_test_names(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without the package: the default profile, or the recorded server replay.json names."""
    monkeypatch.setattr(smi, "RECORDED", str(ROOT / "tests" / "fixtures" / "nvidia_smi"))
    monkeypatch.setattr(smi, "LIBRARY", str(tmp_path / "no-package"))
    monkeypatch.setattr(smi, "REPLAY", str(tmp_path / "replay.json"))
    code, out = _smi(capsys, "--query-gpu=name", "--format=csv,noheader")
    assert code == 0 and out.splitlines() == ["NVIDIA H100 80GB HBM3"] * 8
    (tmp_path / "replay.json").write_text((ROOT / "lab" / "fixtures" / "gpu" / "hardware" / "l40s-pcie.json").read_text())
    code, out = _smi(capsys, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
    assert code == 0 and out.splitlines() == ["NVIDIA L40S, 46068"] * 5
    code, out = _smi(capsys, "topo", "-m")
    assert out == (ROOT / "tests" / "fixtures" / "nvidia_smi" / "pcie5_numa_id_topo.txt").read_text()


def test_nvidia_ctk_adds_the_runtime_and_keeps_every_other_key(tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text(json.dumps({"labels": ["a=b"], "runtimes": {"other": {"path": "x"}}}))
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "fixtures" / "gpu" / "packages" / "nvidia-ctk"),
                           "runtime", "configure", "--runtime=docker", f"--config={config}", "--dry-run"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == {"labels": ["a=b"], "runtimes": {
        "other": {"path": "x"}, "nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    assert proc.stdout.startswith('{\n    "labels"')  # Go's four-space indentation, sorted keys
    assert json.loads(config.read_text()) == {"labels": ["a=b"], "runtimes": {"other": {"path": "x"}}}


def test_nvidia_ctk_cdi_generate_fails_when_the_driver_does_not_answer(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed\"\nexit 9\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "fixtures" / "gpu" / "packages" / "nvidia-ctk"),
                           "cdi", "generate"], capture_output=True, text=True, check=False,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert "failed to initialize NVML: ERROR_DRIVER_NOT_LOADED" in proc.stderr


def test_nvidia_ctk_cdi_spec_names_each_gpu_the_driver_and_the_gpu_model(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in *nounits*) ;; *) echo 'memory.total needs nounits here' >&2; exit 2;; esac\n"
                    "echo '0, GPU-aaaa, 570.172.08, NVIDIA L40S, 46068'\n"
                    "echo '1, GPU-bbbb, 570.172.08, NVIDIA L40S, 46068'\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "fixtures" / "gpu" / "packages" / "nvidia-ctk"),
                           "cdi", "generate", "--format=json"], capture_output=True, text=True, check=False,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    assert {d["name"]: d["containerEdits"]["env"] for d in spec["devices"]} == {
        "0": ["LAB_GPU_0=present"], "1": ["LAB_GPU_1=present"], "GPU-aaaa": ["LAB_GPU_0=present"],
        "GPU-bbbb": ["LAB_GPU_1=present"], "all": ["LAB_GPU_0=present", "LAB_GPU_1=present"]}
    assert spec["containerEdits"]["env"] == ["LAB_CDI=aphrodite-lab", "LAB_DRIVER=570.172.08",
                                             "LAB_GPU_MODEL=NVIDIA L40S", "LAB_GPU_MEMORY_MIB=46068"]


def test_a_running_lab_daemon_restarts_only_for_a_gateway_it_does_not_bind(tmp_path: Path, monkeypatch) -> None:
    binds = tmp_path / "binds"
    binds.write_text("172.28.20.1 172.28.30.1\n")
    monkeypatch.setattr(pkgrepo, "local_addresses", lambda: {"172.28.20.1", "172.28.30.1", "172.28.40.1"})
    # A network re-made with a known gateway: the listening sockets survived, keep running.
    assert pkgrepo.addresses_to_bind(True, binds, ["172.28.20.1"]) is None
    # A new gateway: restart, keeping the old ones that still exist on this machine.
    assert pkgrepo.addresses_to_bind(True, binds, ["172.28.40.1"]) == ["172.28.20.1", "172.28.30.1", "172.28.40.1"]
    monkeypatch.setattr(pkgrepo, "local_addresses", lambda: {"172.28.40.1"})
    assert pkgrepo.addresses_to_bind(True, binds, ["172.28.40.1"]) == ["172.28.40.1"]
    # Not running: start on what is asked, whatever the stale file says.
    assert pkgrepo.addresses_to_bind(False, binds, ["172.28.50.1"]) == ["172.28.50.1"]
