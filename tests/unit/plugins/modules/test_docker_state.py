"""The probe's questions to Docker, asked of a stand-in of the Engine API on a Unix socket
(docker_api_standin.py)."""

from __future__ import annotations

import json
from pathlib import Path

from docker_api_standin import REPLICA, daemon  # noqa: F401  (fixture)

from ansible_collections.aphrodite.baremetal.plugins.module_utils._docker_state import DockerState


def _ask(daemon) -> dict:
    docker = DockerState(daemon.server_address)
    try:
        return {"replica": docker.container("aphrodite-llama-0"), "missing": docker.container("aphrodite-llama-9"),
                "image": docker.image("aphrodite:0.24.1"), "no image": docker.image("registry.local:5000/x/y:1"),
                "labelled": docker.labelled("io.aphrodite.replica")}
    finally:
        docker.close()


def test_what_the_probe_reads_of_containers_and_images(daemon) -> None:
    found = _ask(daemon)
    assert found["replica"] == ("c0ffee" * 10 + "abcd sha256:" + "1" * 64 + " running unless-stopped "
                                '{"io.aphrodite.digest":"abc","io.aphrodite.replica":"llama-0"}')
    assert found["missing"] == "absent" and found["no image"] == "absent"
    assert found["image"] == "sha256:" + "1" * 64
    assert found["labelled"].startswith("1 container(s) sha256=")
    # One connection for every question, and the image reference's slashes and colon kept.
    assert "/images/registry.local:5000/x/y:1/json" in daemon.requests


def test_uptime_and_health_are_no_change_and_the_rest_is(daemon) -> None:
    before = _ask(daemon)
    replica = daemon.containers["aphrodite-llama-0"]
    replica["State"]["StartedAt"] = "2026-12-06T11:00:00Z"
    replica["State"]["Health"]["Status"] = "starting"
    assert _ask(daemon) == before
    replica["HostConfig"]["RestartPolicy"]["Name"] = "no"
    after = _ask(daemon)
    assert after["replica"] != before["replica"] and after["labelled"] == before["labelled"]
    replica["State"]["Status"] = "exited"
    assert _ask(daemon)["labelled"] != before["labelled"]
    extra = json.loads(json.dumps(REPLICA))
    extra.update(Id="f" * 64, Name="/aphrodite-stale-3")
    daemon.containers["aphrodite-stale-3"] = extra
    assert _ask(daemon)["labelled"].startswith("2 container(s) ")


def test_a_daemon_that_closes_each_connection_is_asked_again(daemon) -> None:
    expected = _ask(daemon)
    daemon.close_after_each = True
    assert _ask(daemon) == expected


def test_no_daemon_is_a_state_not_a_failure(tmp_path: Path) -> None:
    docker = DockerState(str(tmp_path / "none.sock"))
    assert docker.container("x") == "no docker socket" and docker.image("y") == "no docker socket"
    (tmp_path / "dead.sock").write_text("")  # a socket file no daemon listens on
    dead = DockerState(str(tmp_path / "dead.sock"))
    assert dead.labelled("z") == "docker did not answer (ConnectionRefusedError)"
