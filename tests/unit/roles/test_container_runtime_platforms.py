"""The per-platform data of the container_runtime role: which Docker and toolkit packages
each supported platform gets, read from the vars files the role loads (set_vars.yml)."""

from __future__ import annotations

import pytest

from role_platforms import PLATFORMS, platform_vars


def runtime_vars(platform: tuple[str, str, str]) -> dict:
    return platform_vars("container_runtime", *platform)


@pytest.mark.parametrize(("platform", "source", "expected"), [
    (("Debian", "Debian", "12"), "docker", ["docker-ce=5:{version}-1~*", "docker-ce-cli=5:{version}-1~*", "containerd.io"]),
    (("Debian", "Debian", "12"), "distribution", ["docker.io"]),
    (("Debian", "Debian", "13"), "distribution", ["docker.io", "docker-cli"]),
    (("Debian", "Ubuntu", "24"), "distribution", ["docker.io"]),
    (("RedHat", "Rocky", "9"), "docker", ["docker-ce-{version}", "docker-ce-cli-{version}", "containerd.io"]),
])
def test_docker_packages_per_platform(platform, source, expected):
    assert runtime_vars(platform)["__container_runtime_sources"][source]["packages"] == expected


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: f"{p[1]}_{p[2]}")
def test_docker_from_dockers_repository_is_held_and_distribution_docker_is_not(platform):
    sources = runtime_vars(platform)["__container_runtime_sources"]
    assert sources["docker"]["held"] == ["docker-ce", "docker-ce-cli", "containerd.io"]
    assert sources.get("distribution", {"held": []})["held"] == []


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: f"{p[1]}_{p[2]}")
def test_the_container_toolkit_is_pinned_to_one_version(platform):
    specs = runtime_vars(platform)["__container_runtime_toolkit_package_specs"]
    assert len(specs) == 4
    assert all("{version}-1" in spec for spec in specs)
