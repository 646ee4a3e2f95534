"""GPU node and plain node, checked through the running dockerd, the kernel's module
configuration and apt, not by reading back what the roles wrote."""

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


def _groups(host) -> list[str]:
    return host.ansible.get_variables().get("group_names", [])


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


def test_cdi_devices_0_and_5_give_exactly_those(gpu_node, image):
    with gpu_node.sudo():
        out = gpu_node.check_output(
            f"docker run --rm --device nvidia.com/gpu=0 --device nvidia.com/gpu=5 {image} env")
    assert sorted(set(re.findall(r"^(LAB_GPU_\d)=present$", out, re.M))) == ["LAB_GPU_0", "LAB_GPU_5"]


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
    # dockerd was not asked for CDI (Docker 26 needs the feature flag for it).
    assert not _info(plain_node).get("CDISpecDirs")


def _playbook(playbook: Path, *extra: str) -> subprocess.CompletedProcess:
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    binary = Path(sys.executable).with_name("ansible-playbook")
    # JSON results keep each message on one line.
    env = dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json", ANSIBLE_NOCOLOR="1")
    return subprocess.run([str(binary), "-i", inventory, str(playbook), *extra], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False, timeout=600, env=env)


def test_loaded_branch_means_nothing_to_install(gpu_node):
    run = _playbook(SCENARIO / "converge.yml", "--limit", "gpu_nodes", "--tags", "nvidia_driver")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "branch 550 is loaded (550.90.07): nothing to install" in run.stdout
    assert re.search(r"changed=0\s", run.stdout)


def _failed_tasks(output: str) -> list[str]:
    """Names of the tasks that failed in a playbook run's output."""
    failed, task = [], None
    for line in output.splitlines():
        match = re.match(r"^TASK \[(.+)\]", line)
        if match:
            task = match.group(1)
        elif line.startswith("fatal: "):
            failed.append(task)
    return failed


def test_other_branch_takes_the_install_path_up_to_the_unreachable_repository(gpu_node):
    run = _playbook(SCENARIO / "other_branch.yml")
    assert run.returncode != 0
    assert ("branch 550 is loaded (550.90.07), 570 is wanted: "
            "installing branch 570 from the cuda source in its place.") in run.stdout
    # The failure is the first step that needs NVIDIA's servers, nothing before it.
    assert _failed_tasks(run.stdout) == ["aphrodite.baremetal.nvidia_driver : Add NVIDIA's CUDA repository"], \
        run.stdout[-3000:]
    assert "Could not fetch signed_by key" in run.stdout
    # Nothing was changed before that step: no repository, the pin still on the loaded branch.
    assert not gpu_node.file("/etc/apt/sources.list.d/nvidia-cuda.sources").exists
    assert gpu_node.file("/etc/apt/preferences.d/aphrodite-nvidia-driver").contains("^Pin: version 550\\.\\*$")
