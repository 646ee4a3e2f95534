"""The per-platform data of the nvidia_driver role: which packages each supported platform
gets, read from the vars files the role loads (set_vars.yml)."""

from __future__ import annotations

import re

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.filter.nvidia import driver_packages

from role_platforms import PLATFORMS, ROLES, platform_vars


def driver_vars(platform: tuple[str, str, str]) -> dict:
    return platform_vars("nvidia_driver", *platform)


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: f"{p[1]}_{p[2]}")
def test_every_supported_platform_has_complete_driver_data(platform):
    data = driver_vars(platform)
    family, distribution, major = platform
    assert major in data["__nvidia_driver_supported"][distribution]
    assert data["__nvidia_driver_pkg_mgr"] in ("apt", "dnf")
    assert (ROLES / "nvidia_driver" / "tasks" / f"install_{data['__nvidia_driver_pkg_mgr']}.yml").is_file()
    assert data["__nvidia_driver_default_source"] in data["__nvidia_driver_sources"]
    assert re.fullmatch(r"(debian|ubuntu)\d{2}04|debian1[23]|rhel9", data["__nvidia_driver_cuda_repo_name"])
    for source in data["__nvidia_driver_sources"]:
        for open_modules in (True, False):
            assert driver_packages(data["__nvidia_driver_sources"], source, "550", open_modules)
        assert driver_packages(data["__nvidia_driver_sources"], source, "550", part="version_package")


def test_the_supported_lists_agree():
    driver = yaml.safe_load((ROLES / "nvidia_driver" / "vars" / "main.yml").read_text())["__nvidia_driver_supported"]
    runtime = yaml.safe_load((ROLES / "container_runtime" / "vars" / "main.yml").read_text())["__container_runtime_supported"]
    assert driver == runtime
    assert sorted((d, m) for _, d, m in PLATFORMS) == sorted((d, m) for d, ms in driver.items() for m in ms)


# platform, source, open modules -> driver packages for branch 550
DRIVER_PACKAGES = [
    (("Debian", "Ubuntu", "24"), "distribution", True, ["nvidia-driver-550-server-open"]),
    (("Debian", "Ubuntu", "24"), "distribution", False, ["nvidia-driver-550-server"]),
    (("Debian", "Ubuntu", "22"), "cuda", True, ["nvidia-driver-550-open", "cuda-drivers-550"]),
    (("Debian", "Ubuntu", "22"), "cuda", False, ["cuda-drivers-550"]),
    (("Debian", "Debian", "12"), "cuda", True, ["nvidia-kernel-open-dkms", "cuda-drivers-550"]),
    (("Debian", "Debian", "13"), "cuda", False, ["nvidia-kernel-dkms", "cuda-drivers-550"]),
    (("Debian", "Debian", "13"), "distribution", True,
     ["nvidia-open-kernel-dkms", "nvidia-smi", "libcuda1", "nvidia-persistenced"]),
    (("RedHat", "Rocky", "9"), "cuda", True, ["@nvidia-driver:550-open"]),
    (("RedHat", "RedHat", "9"), "cuda", False, ["@nvidia-driver:550-dkms"]),
]


@pytest.mark.parametrize(("platform", "source", "open_modules", "expected"), DRIVER_PACKAGES,
                         ids=lambda v: v[1] if isinstance(v, tuple) else None)
def test_driver_packages_per_platform(platform, source, open_modules, expected):
    sources = driver_vars(platform)["__nvidia_driver_sources"]
    assert driver_packages(sources, source, "550", open_modules) == expected


@pytest.mark.parametrize(("platform", "expected"), [
    (("Debian", "Debian", "12"), "cuda"),
    (("Debian", "Debian", "13"), "cuda"),
    (("Debian", "Ubuntu", "22"), "distribution"),
    (("Debian", "Ubuntu", "24"), "distribution"),
    (("RedHat", "Rocky", "9"), "cuda"),
])
def test_default_source(platform, expected):
    assert driver_vars(platform)["__nvidia_driver_default_source"] == expected


# Fabric Manager at exactly the driver's version, in each package manager's syntax.
@pytest.mark.parametrize(("platform", "source", "expected"), [
    (("Debian", "Ubuntu", "24"), "distribution",
     ["nvidia-fabricmanager-550=550.90.07-*", "libnvidia-nscq-550=550.90.07-*"]),
    (("Debian", "Ubuntu", "22"), "cuda", ["nvidia-fabricmanager-550=550.90.07-*", "libnvidia-nscq-550=550.90.07-*"]),
    (("Debian", "Debian", "12"), "cuda", ["nvidia-fabricmanager-550=550.90.07-*", "libnvidia-nscq-550=550.90.07-*"]),
    (("RedHat", "Rocky", "9"), "cuda", ["nvidia-fabric-manager-550.90.07"]),
])
def test_fabric_manager_matches_the_driver_version(platform, source, expected):
    sources = driver_vars(platform)["__nvidia_driver_sources"]
    # Whatever form the version arrives in (package version with revision, module version).
    for version in ("550.90.07", "550.90.07-1", "3:550.90.07-1.el9"):
        assert driver_packages(sources, source, "550", part="fabric_manager", version=version) == expected


def test_debian_archive_has_no_fabric_manager():
    sources = driver_vars(("Debian", "Debian", "13"))["__nvidia_driver_sources"]
    with pytest.raises(ValueError, match="no Fabric Manager.*CUDA repository"):
        driver_packages(sources, "distribution", "550", part="fabric_manager", version="550.163.01")


def test_fabric_manager_needs_a_known_driver_version():
    sources = driver_vars(("Debian", "Ubuntu", "24"))["__nvidia_driver_sources"]
    with pytest.raises(ValueError, match="match the driver version exactly"):
        driver_packages(sources, "distribution", "550", part="fabric_manager", version=None)


def test_rhel_has_no_distribution_driver():
    sources = driver_vars(("RedHat", "Rocky", "9"))["__nvidia_driver_sources"]
    with pytest.raises(ValueError, match="nvidia_driver_source is 'distribution'.*use one of cuda"):
        driver_packages(sources, "distribution", "550")


@pytest.mark.parametrize(("platform", "branches"), [
    (("Debian", "Debian", "12"), ["535"]),
    (("Debian", "Debian", "13"), ["550"]),
    (("Debian", "Ubuntu", "24"), []),   # Ubuntu's archive has a package set per branch
])
def test_branches_of_the_distribution_archive(platform, branches):
    assert driver_vars(platform)["__nvidia_driver_distribution_branches"] == branches


def test_a_package_template_with_an_unknown_placeholder_is_refused():
    with pytest.raises(ValueError, match=r"unknown placeholder 'flavour'"):
        driver_packages({"cuda": {"packages": {"open": ["nvidia-{flavour}"]}}}, "cuda", "550")


HELD = {
    ("Debian", "Ubuntu", "24"): [
        "nvidia-driver-550-server-open", "libnvidia-compute-550-server", "nvidia-utils-550-server",
        "nvidia-fabricmanager-550", "libnvidia-nscq-550", "linux-modules-nvidia-550-server-open-6.8.0-45-generic",
    ],
    ("Debian", "Debian", "12"): [
        "nvidia-kernel-open-dkms", "cuda-drivers-550", "libcuda1", "nvidia-smi", "firmware-nvidia-gsp",
        "nvidia-fabricmanager-550",
    ],
    ("RedHat", "Rocky", "9"): ["nvidia-driver", "kmod-nvidia-open-dkms", "nvidia-fabric-manager", "cuda-drivers"],
}
NOT_HELD = ["nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container1",
            "libnvidia-container-tools", "docker-ce", "python3-apt", "linux-image-amd64", "kernel-devel"]


@pytest.mark.parametrize("platform", list(HELD), ids=lambda p: f"{p[1]}_{p[2]}")
def test_driver_packages_are_held_but_not_the_container_toolkit(platform):
    data = driver_vars(platform)
    installed = HELD[platform] + NOT_HELD
    held = [name for name in installed
            if re.match(data["__nvidia_driver_hold_pattern"], name)
            and not re.match(data["__nvidia_driver_hold_exclude"], name)]
    assert held == HELD[platform]


@pytest.mark.parametrize("platform", [p for p in PLATFORMS if p[0] == "Debian"], ids=lambda p: f"{p[1]}_{p[2]}")
def test_the_apt_pin_covers_every_held_driver_package(platform):
    globs = driver_vars(platform)["__nvidia_driver_pin_packages"].split()
    sources = driver_vars(platform)["__nvidia_driver_sources"]
    names = {spec.split("=")[0] for source in sources for flavour in (True, False)
             for spec in driver_packages(sources, source, "550", flavour)}
    for name in names:
        assert any(re.fullmatch(glob.replace("*", ".*"), name) for glob in globs), name


def _templated(platform: tuple[str, str, str], expression: str, architecture: str = "x86_64", **overrides) -> str:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    variables = yaml.safe_load((ROLES / "nvidia_driver" / "defaults" / "main.yml").read_text())
    variables.update(driver_vars(platform))
    variables.update(overrides)
    variables = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in variables.items()}
    variables["ansible_facts"] = {"architecture": architecture}
    return Templar(loader=DataLoader(), variables=variables).template(trust_as_template(expression))


CUDA = "https://developer.download.nvidia.com/compute/cuda/repos"


@pytest.mark.parametrize(("platform", "architecture", "key"), [
    (("Debian", "Debian", "12"), "x86_64", f"{CUDA}/debian12/x86_64/3bf863cc.pub"),
    (("Debian", "Debian", "13"), "x86_64", f"{CUDA}/debian13/x86_64/3bf863cc.pub"),
    (("Debian", "Ubuntu", "22"), "x86_64", f"{CUDA}/ubuntu2204/x86_64/3bf863cc.pub"),
    (("Debian", "Ubuntu", "24"), "aarch64", f"{CUDA}/ubuntu2404/sbsa/3bf863cc.pub"),
    (("RedHat", "Rocky", "9"), "x86_64", f"{CUDA}/rhel9/x86_64/D42D0685.pub"),
])
def test_cuda_repository_and_key_per_platform(platform, architecture, key):
    assert _templated(platform, "{{ __nvidia_driver_cuda_key }}", architecture) == key
    assert _templated(platform, "{{ __nvidia_driver_cuda_repo }}", architecture) == key.rsplit("/", 1)[0]


def test_a_mirror_moves_repository_and_key():
    platform = ("Debian", "Debian", "12")
    mirror = {"nvidia_driver_cuda_repo_url": "https://mirror.example.net/cuda/repos/"}
    assert _templated(platform, "{{ __nvidia_driver_cuda_key }}", **mirror) == \
        "https://mirror.example.net/cuda/repos/debian12/x86_64/3bf863cc.pub"
    assert _templated(platform, "{{ __nvidia_driver_cuda_key }}", nvidia_driver_cuda_repo_key_url="https://k.example/key.pub",
                      **mirror) == "https://k.example/key.pub"
