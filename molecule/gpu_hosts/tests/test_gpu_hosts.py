"""GPU nodes and a plain node after the roles' production install path, checked through
the running dockerd and services, the kernel's module configuration, nvidia-smi and
apt, not by reading back what the roles wrote.

The lab package repository (lab/pkgrepo.py) offers the next driver branch and newer
Docker CE and toolkit versions than the roles pin: only the pins keep them out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).resolve().parents[1]
IMAGE = "lab-busybox"
GPU_NAMES = [f"LAB_GPU_{n}" for n in range(8)]
DRIVER = "550.90.07"
NEXT_DRIVER = "570.172.08"
DOCKER_CE = "5:28.5.2-1~debian.13~trixie"
TOOLKIT = "1.17.8-1"
# The recorded servers of molecule.yml's gpu_hardware: GPU count, NVSwitches.
HARDWARE = {"gh-gpu1": (8, True), "gh-gpu2": (5, False)}
DRIVER_PACKAGES = ["cuda-drivers-550", "nvidia-kernel-open-dkms", "nvidia-driver-cuda", "nvidia-smi", "libcuda1",
                   "libnvidia-ml1", "nvidia-persistenced", "nvidia-kernel-support"]
FABRIC_MANAGER = ["nvidia-fabricmanager-550", "libnvidia-nscq-550"]
DOCKER_PACKAGES = ["docker-ce", "docker-ce-cli", "containerd.io"]
TOOLKIT_PACKAGES = ["nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
                    "libnvidia-container1"]


def _groups(host) -> list[str]:
    return host.ansible.get_variables().get("group_names", [])


def _name(host) -> str:
    return host.ansible.get_variables()["inventory_hostname"]


def _installed(host, package: str) -> str | None:
    result = host.run(f"dpkg-query -W -f '${{db:Status-Status}} ${{Version}}' {package}")
    status, _, version = result.stdout.partition(" ")
    return version if result.rc == 0 and status == "installed" else None


def _held(host) -> set[str]:
    return set(host.check_output("apt-mark showhold").split())


@pytest.fixture()
def gpu_node(host):
    if "gpu_nodes" not in _groups(host):
        pytest.skip("GPU nodes only")
    return host


@pytest.fixture()
def plain_node(host):
    if "gpu_nodes" in _groups(host):
        pytest.skip("hosts without GPUs only")
    return host


@pytest.fixture()
def image(host) -> str:
    """The busybox image prepare.yml packed, imported into the host's dockerd."""
    with host.sudo():
        if host.run(f"docker image inspect {IMAGE}").rc != 0:
            host.check_output(f"docker import /opt/lab-image/busybox.tar {IMAGE}")
    return IMAGE


def _info(host) -> dict:
    with host.sudo():
        return json.loads(host.check_output("docker info --format '{{json .}}'"))


def test_dockerd_runs_with_live_restore_and_the_seeded_label(host):
    assert host.service("docker").is_running
    assert host.service("docker").is_enabled
    info = _info(host)
    assert info["LiveRestoreEnabled"] is True
    # A key another tool wrote before the role ran is still in effect.
    assert "aphrodite.lab=seeded" in info["Labels"]


def test_gpu_node_stores_images_on_overlay2(gpu_node):
    # The lab gives GPU nodes a volume at /var/lib/docker, as servers have a disk there.
    assert _info(gpu_node)["Driver"] == "overlay2"


def test_container_logs_rotate_and_keep_the_seeded_option(host, image):
    with host.sudo():
        name = "gh-logcheck"
        host.run(f"docker rm -f {name}")
        host.check_output(f"docker run --name {name} {image} true")
        log_config = json.loads(host.check_output(f"docker inspect --format '{{{{json .HostConfig.LogConfig}}}}' {name}"))
        host.check_output(f"docker rm {name}")
    assert log_config["Type"] == "json-file"
    # The role's rotation and the seeded nested key, merged.
    assert log_config["Config"] == {"max-size": "100m", "max-file": "5", "compress": "true"}


def test_cdi_device_1_gives_exactly_gpu_1(gpu_node, image):
    result = gpu_node.ansible(
        "community.docker.docker_container",
        json.dumps({
            "name": "gh-cdi-gpu1",
            "image": image,
            "command": ["env"],
            "detach": False,
            "cleanup": True,
            "device_requests": [{"driver": "cdi", "device_ids": ["nvidia.com/gpu=1"]}],
        }),
        check=False,
        become=True,
    )
    env = dict(line.split("=", 1) for line in result["container"]["Output"].splitlines() if "=" in line)
    assert env.get("LAB_GPU_1") == "present"
    assert [name for name in GPU_NAMES if name in env] == ["LAB_GPU_1"]
    assert env.get("LAB_CDI") == "aphrodite-lab"


def test_cdi_devices_0_and_the_last_give_exactly_those(gpu_node, image):
    last = HARDWARE[_name(gpu_node)][0] - 1
    with gpu_node.sudo():
        out = gpu_node.check_output(
            f"docker run --rm --device nvidia.com/gpu=0 --device nvidia.com/gpu={last} {image} env")
    assert sorted(set(re.findall(r"^(LAB_GPU_\d)=present$", out, re.M))) == ["LAB_GPU_0", f"LAB_GPU_{last}"]


def test_cdi_spec_names_every_gpu_of_the_loaded_driver(gpu_node, image):
    count = HARDWARE[_name(gpu_node)][0]
    with gpu_node.sudo():
        out = gpu_node.check_output(f"docker run --rm --device nvidia.com/gpu=all {image} env")
        runtimes = _info(gpu_node)["Runtimes"]
    assert sorted(set(re.findall(r"^(LAB_GPU_\d)=present$", out, re.M))) == [f"LAB_GPU_{n}" for n in range(count)]
    # nvidia-ctk generated it from what the loaded driver reports.
    assert re.search(rf"^LAB_DRIVER={re.escape(DRIVER)}$", out, re.M)
    # nvidia-ctk runtime configure's key, merged into daemon.json by the role.
    assert runtimes["nvidia"]["path"] == "nvidia-container-runtime"


def test_driver_comes_from_the_pinned_branch_though_the_next_one_is_offered(gpu_node):
    offered = gpu_node.check_output("apt-cache madison nvidia-kernel-open-dkms")
    assert f"{NEXT_DRIVER}-1" in offered
    assert {p: _installed(gpu_node, p) for p in DRIVER_PACKAGES} == {p: f"{DRIVER}-1" for p in DRIVER_PACKAGES}
    assert _installed(gpu_node, "cuda-drivers-570") is None


def test_nvidia_smi_reports_the_driver_with_persistence_mode_on(gpu_node):
    assert gpu_node.service("nvidia-persistenced").is_running
    assert gpu_node.service("nvidia-persistenced").is_enabled
    rows = gpu_node.check_output("nvidia-smi --query-gpu=driver_version,persistence_mode --format=csv,noheader")
    assert rows.splitlines() == [f"{DRIVER}, Enabled"] * HARDWARE[_name(gpu_node)][0]


def test_driver_toolkit_and_docker_packages_are_held(gpu_node):
    held = _held(gpu_node)
    assert set(DRIVER_PACKAGES + DOCKER_PACKAGES + TOOLKIT_PACKAGES) <= held
    # The container toolkit is not the driver: not pinned to the driver branch.
    assert {p: _installed(gpu_node, p) for p in TOOLKIT_PACKAGES} == {p: TOOLKIT for p in TOOLKIT_PACKAGES}


def test_fabric_manager_runs_where_the_server_has_nvswitches(gpu_node):
    if not HARDWARE[_name(gpu_node)][1]:
        pytest.skip("NVSwitch servers only")
    assert {p: _installed(gpu_node, p) for p in FABRIC_MANAGER} == {p: f"{DRIVER}-1" for p in FABRIC_MANAGER}
    assert set(FABRIC_MANAGER) <= _held(gpu_node)
    service = gpu_node.service("nvidia-fabricmanager")
    assert service.is_running
    assert service.is_enabled


def test_pcie_server_gets_no_fabric_manager(gpu_node):
    if HARDWARE[_name(gpu_node)][1]:
        pytest.skip("servers without NVSwitches only")
    assert [p for p in FABRIC_MANAGER if _installed(gpu_node, p)] == []
    assert not gpu_node.service("nvidia-fabricmanager").is_running


def test_docker_ce_runs_at_the_pinned_version(host):
    assert {p: _installed(host, p) for p in DOCKER_PACKAGES[:2]} == {p: DOCKER_CE for p in DOCKER_PACKAGES[:2]}
    assert _installed(host, "docker.io") is None
    # The repository offers a newer Docker CE; the pin keeps it out, the hold keeps it so.
    assert "29.0.1" in host.check_output("apt-cache madison docker-ce")
    assert set(DOCKER_PACKAGES) <= _held(host)


def test_unknown_cdi_device_is_refused(gpu_node, image):
    with gpu_node.sudo():
        result = gpu_node.run(f"docker run --rm --device nvidia.com/gpu=9 {image} true")
    assert result.rc != 0
    assert "unresolvable CDI devices" in result.stderr


def test_nouveau_is_blacklisted_for_modprobe(gpu_node):
    config = gpu_node.check_output("/usr/sbin/modprobe --showconfig")
    assert re.search(r"^blacklist nouveau$", config, re.M)
    assert re.search(r"^options nouveau modeset=0$", config, re.M)


def test_apt_accepts_the_driver_branch_pin(gpu_node):
    pin = gpu_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver")
    assert pin.contains("^Pin: version 550\\.\\*$")
    # apt refuses to run with a malformed preferences file.
    result = gpu_node.run("apt-cache policy")
    assert result.rc == 0
    assert "preferences" not in result.stderr


def test_host_without_gpus_has_nothing_gpu_related(plain_node):
    packages = plain_node.check_output("dpkg-query -W -f '${Package}\\n'").split()
    assert [p for p in packages if re.match(r"(lib)?nvidia|cuda|libcuda", p)] == []
    assert not plain_node.file("/etc/apt/sources.list.d/nvidia-container-toolkit.sources").exists
    assert not plain_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver").exists
    # No CDI spec: Docker CE 28.2 and later look for specs everywhere, and find none here.
    assert plain_node.run("ls /etc/cdi /var/run/cdi 2>/dev/null | grep -E '[.](yaml|json)$'").rc != 0


def _playbook(playbook: Path, *extra: str) -> subprocess.CompletedProcess:
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    binary = Path(sys.executable).with_name("ansible-playbook")
    # JSON results keep each message on one line.
    env = dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json", ANSIBLE_NOCOLOR="1")
    return subprocess.run([str(binary), "-i", inventory, str(playbook), *extra], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False, timeout=600, env=env)


def test_loaded_branch_means_nothing_to_install(gpu_node):
    run = _playbook(SCENARIO / "converge.yml", "--limit", _name(gpu_node), "--tags", "nvidia_driver")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "branch 550 is loaded (550.90.07): nothing to install" in run.stdout
    assert re.search(r"changed=0\s", run.stdout)


# Last, since it changes the node: the branch upgrade on the NVSwitch server, where
# Fabric Manager must follow the driver to its exact version.
def test_branch_upgrade_is_reported_in_check_mode_held_and_rebooted_into_only_when_allowed(gpu_node, image):
    if not HARDWARE[_name(gpu_node)][1]:
        pytest.skip("once, on the NVSwitch server")
    name = _name(gpu_node)
    wanted = (f"branch 550 is loaded ({DRIVER}), 570 is wanted: "
              "installing branch 570 from the cuda source in its place.")

    check = _playbook(SCENARIO / "other_branch.yml", "--limit", name, "--check")
    assert check.returncode == 0, check.stdout[-3000:]
    assert wanted in check.stdout
    assert _installed(gpu_node, "cuda-drivers-570") is None
    assert gpu_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver").contains("^Pin: version 550\\.\\*$")

    run = _playbook(SCENARIO / "other_branch.yml", "--limit", name)
    assert run.returncode == 0, run.stdout[-3000:]
    assert wanted in run.stdout
    assert f"REBOOT PENDING on {name}: NVIDIA driver {NEXT_DRIVER} is installed" in run.stdout
    upgraded = ["cuda-drivers-570", "nvidia-kernel-open-dkms", "nvidia-smi", "nvidia-fabricmanager-570",
                "libnvidia-nscq-570"]
    assert {p: _installed(gpu_node, p) for p in upgraded} == {p: f"{NEXT_DRIVER}-1" for p in upgraded}
    assert _installed(gpu_node, "nvidia-fabricmanager-550") is None
    # Unheld to upgrade, held again after it.
    assert set(upgraded) <= _held(gpu_node)
    # No reboot without nvidia_driver_reboot_ok: the old module is still the loaded one.
    assert gpu_node.run("nvidia-smi -L").rc == 18

    # With nvidia_driver_reboot_ok the GPU nodes' plays reboot it (nothing serves from it:
    # no drain), wait for the new driver to answer and write the CDI spec of that driver.
    boot = gpu_node.check_output("cut -d ' ' -f 22 /proc/1/stat")
    reboot = _playbook(SCENARIO / "converge.yml", "--limit", name, "-e", "nvidia_driver_branch=570",
                       "-e", "nvidia_driver_reboot_ok=true")
    assert reboot.returncode == 0, reboot.stdout[-3000:]
    assert "TASK [aphrodite.baremetal.nvidia_driver : Reboot " in reboot.stdout, reboot.stdout[-3000:]
    assert gpu_node.check_output("cut -d ' ' -f 22 /proc/1/stat") != boot, "the node did not reboot"
    with gpu_node.sudo():
        out = gpu_node.check_output(f"docker run --rm --device nvidia.com/gpu=all {image} env")
    assert re.search(rf"^LAB_DRIVER={re.escape(NEXT_DRIVER)}$", out, re.M), out

    after = _playbook(SCENARIO / "other_branch.yml", "--limit", name)
    assert after.returncode == 0, after.stdout[-3000:]
    assert f"branch 570 is loaded ({NEXT_DRIVER}): nothing to install" in after.stdout
    rows = gpu_node.check_output("nvidia-smi --query-gpu=driver_version,persistence_mode --format=csv,noheader")
    assert set(rows.splitlines()) == {f"{NEXT_DRIVER}, Enabled"}
    assert gpu_node.service("nvidia-fabricmanager").is_running


# Last, since it changes the node: the PCIe server loses its kernel's headers (their
# package and the archive that has them), then is asked for another branch.
def test_missing_kernel_headers_stop_the_branch_change_before_anything_changes(gpu_node):
    if HARDWARE[_name(gpu_node)][1]:
        pytest.skip("once, on the PCIe server")
    name = _name(gpu_node)
    kernel = gpu_node.check_output("uname -r")
    with gpu_node.sudo():
        gpu_node.check_output(f"apt-get remove -y -q linux-headers-{kernel}")
        gpu_node.check_output("rm /etc/apt/sources.list.d/lab-kernel.sources && apt-get update -q")
    pin_before = gpu_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver").content_string

    run = _playbook(SCENARIO / "other_branch.yml", "--limit", name)
    assert run.returncode != 0
    assert re.findall(r"^fatal: \[(\S+)\]", run.stdout, re.M) == [name], run.stdout[-3000:]
    # The JSON result keeps the message on one line.
    message = next(line for line in run.stdout.splitlines() if "\"msg\"" in line and "no package source of the host" in line)
    assert f"offers its headers (linux-headers-{kernel})" in message
    assert "Nothing was installed" in message and "apt install linux-image-amd64 linux-headers-amd64" in message
    assert gpu_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver").content_string == pin_before
    assert _installed(gpu_node, "cuda-drivers-570") is None
    assert _installed(gpu_node, "nvidia-smi") == f"{DRIVER}-1"
