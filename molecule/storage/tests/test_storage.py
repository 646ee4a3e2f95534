"""Shared model storage, checked through a real NFSv4 client (libnfs) and the files themselves.

The export is read from the GPU nodes and from the load balancer with nfs-ls/nfs-cat, as a
client sees it; local copies are compared byte for byte (sha256) with what the server
serves. Two tests change a model on purpose and run the client role again to show that
a damaged copy or a model staged again is copied anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra
import yaml

SCENARIO = Path(__file__).resolve().parents[1]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
NFS, GPUS, LB = "st-nfs1", ["st-gpu1", "st-gpu2"], "st-lb1"
LLAMA, EXTRA, HUB = "meta-llama/Llama-3.1-8B-Instruct", "aphrodite-lab/Tiny-Extra", "aphrodite-lab/Tiny-Hub"
TOKEN = "hf_labSecretToken0123456789"  # vars/hub.yml
MODELS_DIR = "/srv/exports/models"
LOCAL_DIR = "/var/lib/aphrodite/models"
MARKER = ".aphrodite-model.json"
FIXTURE = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", SCENARIO.parents[1])) / "lab/fixtures/models/llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def lab() -> dict:
    return {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY) for name in [NFS, *GPUS, LB]}


@pytest.fixture(scope="module")
def url(lab) -> str:
    """The export as clients address it: nfs://<server>/models."""
    return f"nfs://{lab[NFS].ansible.get_variables()['ansible_host']}/models"


def nfs(host, tool: str, target: str, *extra: str, uid: int | None = None):
    """Run a libnfs tool as root on ``host`` against an nfs:// URL (NFSv4)."""
    query = "version=4" + (f"&uid={uid}&gid={uid}" if uid is not None else "")
    with host.sudo():
        return host.run(" ".join([tool, *extra, f"'{target}?{query}'"]))


def sha256s(host, directory: str) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``directory`` on ``host``."""
    with host.sudo():
        out = host.check_output(f"cd '{directory}' && find . -type f -print0 | sort -z | xargs -0 -r sha256sum")
    return {line.split(None, 1)[1][2:]: line.split(None, 1)[0] for line in out.splitlines()}


def exported_sha256s(host, url: str, model: str) -> dict[str, str]:
    """The same, read over NFSv4 from ``host`` with nfs-ls -R and nfs-cat."""
    listing = nfs(host, "nfs-ls", f"{url}/{model}", "-R")
    assert listing.rc == 0, listing.stderr
    files = [line.split(None, 5)[5] for line in listing.stdout.splitlines() if line.startswith("-")]
    result = {}
    for name in files:
        with host.sudo():
            out = host.check_output(f"nfs-cat '{url}/{model}/{name}?version=4' | sha256sum")
        result[name] = out.split()[0]
    return result


def changed(result: subprocess.CompletedProcess, name: str) -> int:
    match = re.search(rf"^{name}\s*:\s*ok=\d+\s+changed=(\d+)", result.stdout, re.M)
    assert match, result.stdout[-3000:]
    return int(match.group(1))


def playbook(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("ansible-playbook")
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    return subprocess.run([str(binary), "-i", INVENTORY, str(SCENARIO / "converge.yml"), *args],
                          capture_output=True, text=True, check=False, timeout=600, env=env)


# --------------------------------------------------------------------------- server
def test_ganesha_serves_nfsv4_only(lab):
    server = lab[NFS]
    assert server.service("nfs-ganesha").is_running
    assert server.service("nfs-ganesha").is_enabled
    assert server.socket("tcp://2049").is_listening
    # NFSv4 only: no MOUNT or NLM programs registered with rpcbind.
    with server.sudo():
        programs = server.check_output("rpcinfo -p 127.0.0.1 || true")
    assert "mountd" not in programs and "nlockmgr" not in programs
    with server.sudo():
        assert server.check_output("systemctl is-system-running || true") in ("running", "degraded")
        assert "run-rpc_pipefs.mount" not in server.check_output("systemctl --failed --no-legend --plain")


def test_models_are_staged_once_with_their_marker(lab):
    server = lab[NFS]
    with server.sudo():
        marker = json.loads(server.file(f"{MODELS_DIR}/{LLAMA}/{MARKER}").content_string)
        staging = server.file("/srv/exports/.staging")
        leftovers = server.check_output("find /srv/exports/.staging -mindepth 2 | wc -l")
    assert marker["id"] == LLAMA
    assert marker["source"]["type"] == "local" and len(marker["source"]["digest"]) == 64
    assert marker["files"] == 2 and marker["total_bytes"] == sum(p.stat().st_size for p in FIXTURE.iterdir())
    # Staging is closed to everyone but root (the export's squashed clients included), and empty.
    assert staging.mode == 0o700 and staging.user == "root"
    assert leftovers == "0"
    # The staged bytes are the controller's.
    fixture = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURE.iterdir()}
    staged = sha256s(server, f"{MODELS_DIR}/{LLAMA}")
    assert {name: digest for name, digest in staged.items() if name != MARKER} == fixture
    for name in fixture:
        served = server.file(f"{MODELS_DIR}/{LLAMA}/{name}")
        assert served.mode == 0o644 and served.user == "root"


# --------------------------------------------------------------------------- clients
@pytest.mark.parametrize("name", GPUS)
def test_gpu_nodes_read_the_models_over_nfsv4(lab, url, name):
    listing = nfs(lab[name], "nfs-ls", f"{url}/meta-llama")
    assert listing.rc == 0, listing.stderr
    assert listing.stdout.split()[-1] == "Llama-3.1-8B-Instruct"
    config = nfs(lab[name], "nfs-cat", f"{url}/{LLAMA}/config.json")
    assert json.loads(config.stdout)["model_type"] == "llama"


def test_a_host_outside_the_gpu_nodes_is_refused(lab, url):
    # The load balancer is not a client of the export: it does not even see /models.
    refused = nfs(lab[LB], "nfs-ls", url)
    assert refused.rc != 0
    assert "NFS4ERR_NOENT" in refused.stderr or "NFS4ERR_ACCESS" in refused.stderr or "NFS4ERR_PERM" in refused.stderr
    # The server itself answers it, so this is the export's access list at work, not the network.
    assert lab[LB].addr(lab[NFS].ansible.get_variables()["ansible_host"]).port(2049).is_reachable


def test_root_on_a_gpu_node_is_squashed(lab, url):
    server, client = lab[NFS], lab[GPUS[0]]
    with server.sudo():
        server.check_output(f"echo root-only > {MODELS_DIR}/.probe-0600 && chmod 0600 {MODELS_DIR}/.probe-0600")
        server.check_output(f"echo everyone > {MODELS_DIR}/.probe-0644 && chmod 0644 {MODELS_DIR}/.probe-0644")
    try:
        # A file only root may read: root on the server can, root over NFS is mapped to the
        # anonymous user and cannot; the world-readable file beside it shows the path works.
        denied = nfs(client, "nfs-cat", f"{url}/.probe-0600", uid=0)
        assert denied.rc != 0 and "NFS4ERR_ACCESS" in denied.stderr
        assert nfs(client, "nfs-cat", f"{url}/.probe-0644", uid=0).stdout.strip() == "everyone"
    finally:
        with server.sudo():
            server.run(f"rm -f {MODELS_DIR}/.probe-0600 {MODELS_DIR}/.probe-0644")


def test_the_export_is_read_only(lab, url):
    client = lab[GPUS[0]]
    with client.sudo():
        client.check_output("echo x > /tmp/st-write-probe")
        written = client.run(f"nfs-cp /tmp/st-write-probe '{url}/write-probe?version=4'")
    assert written.rc != 0
    with lab[NFS].sudo():
        assert not lab[NFS].file(f"{MODELS_DIR}/write-probe").exists


@pytest.mark.parametrize("name", GPUS)
def test_local_copies_match_the_export_byte_for_byte(lab, url, name):
    local = sha256s(lab[name], f"{LOCAL_DIR}/{LLAMA}")
    assert local == exported_sha256s(lab[name], url, LLAMA)
    assert local == sha256s(lab[NFS], f"{MODELS_DIR}/{LLAMA}")
    assert set(local) == {"config.json", "model.safetensors", MARKER}
    with lab[name].sudo():
        assert lab[name].file(f"{LOCAL_DIR}/{LLAMA}/model.safetensors").mode == 0o644


def test_each_node_copies_only_the_models_the_plan_gives_it(lab):
    with lab["st-gpu1"].sudo():
        assert lab["st-gpu1"].file(f"{LOCAL_DIR}/{EXTRA}/model.safetensors").is_file
    with lab["st-gpu2"].sudo():
        assert not lab["st-gpu2"].file(f"{LOCAL_DIR}/aphrodite-lab").exists


def test_a_model_missing_from_the_export_stops_the_node_with_what_to_do(lab):
    result = playbook("--limit", "st-gpu2", "--tags", "nfs_client", "-e", '{"nfs_client_models": ["aphrodite-lab/Missing"]}')
    assert result.returncode != 0
    # Failures go to stderr (display_failed_stderr); the YAML callback wraps long messages.
    said = " ".join((result.stdout + result.stderr).split())
    assert "aphrodite-lab/Missing has no files on the export" in said
    assert "stage it first (playbooks/storage.yml, tag models)" in said


# --------------------------------------------------------------------------- hub
def test_a_hub_model_is_staged_once_with_the_token_in_the_environment_only(lab):
    server = lab[NFS]
    first = playbook("--limit", NFS, "--tags", "models", "-e", f"@{SCENARIO / 'vars' / 'hub.yml'}")
    assert first.returncode == 0, first.stdout[-3000:]
    assert changed(first, NFS) > 0
    assert TOKEN not in first.stdout + first.stderr
    with server.sudo():
        calls = [json.loads(line) for line in server.file("/opt/fake-hub/calls.jsonl").content_string.splitlines()]
        marker = json.loads(server.file(f"{MODELS_DIR}/{HUB}/{MARKER}").content_string)
        assert not server.file("/root/.cache/huggingface").exists
    assert [call["call"] for call in calls] == ["model_info", "snapshot_download"]
    for call in calls:
        assert call["token"] == TOKEN
        assert TOKEN not in " ".join(call["argv"])
        assert call["hf_home"].startswith("/srv/exports/.staging/")
    assert marker["source"] == {"type": "hub", "revision": "4c1d6f2b9e0a8d7c6b5a49382716f5e4d3c2b1a0", "include": [],
                                "exclude": ["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.onnx"]}
    # The excluded original checkpoint and the client's bookkeeping stayed out of the export.
    fixture = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURE.iterdir()}
    assert sha256s(server, f"{MODELS_DIR}/{HUB}") == {**fixture, MARKER: sha256s(server, f"{MODELS_DIR}/{HUB}")[MARKER]}

    second = playbook("--limit", NFS, "--tags", "models", "-e", f"@{SCENARIO / 'vars' / 'hub.yml'}")
    assert second.returncode == 0, second.stdout[-3000:]
    assert changed(second, NFS) == 0
    with server.sudo():
        assert len(server.file("/opt/fake-hub/calls.jsonl").content_string.splitlines()) == 2


# --------------------------------------------------------------------------- repair
def test_a_damaged_local_copy_is_repaired(lab, url):
    node = lab["st-gpu2"]
    with node.sudo():
        node.check_output(f"truncate -s 100 {LOCAL_DIR}/{LLAMA}/model.safetensors")
        node.check_output(f"rm {LOCAL_DIR}/{LLAMA}/config.json && touch {LOCAL_DIR}/{LLAMA}/stale.bin")
    result = playbook("--limit", "st-gpu2", "--tags", "nfs_client")
    assert result.returncode == 0, result.stdout[-3000:]
    assert changed(result, "st-gpu2") > 0
    assert sha256s(node, f"{LOCAL_DIR}/{LLAMA}") == exported_sha256s(node, url, LLAMA)


def test_a_model_staged_again_with_same_sized_files_is_copied_again(lab, url):
    """Sizes alone would miss new weights of the same shape; the marker catches them."""
    server, node = lab[NFS], lab["st-gpu2"]
    weights, marker = f"{MODELS_DIR}/{LLAMA}/model.safetensors", f"{MODELS_DIR}/{LLAMA}/{MARKER}"
    with server.sudo():
        original_weights = server.check_output(f"base64 -w0 {weights}")
        original_marker = server.check_output(f"base64 -w0 {marker}")
        # Same size, different bytes: the last tensor byte, and another digest in the marker.
        server.check_output(f"printf '\\177' | dd of={weights} bs=1 seek=$(( $(stat -c %s {weights}) - 1 )) conv=notrunc")
        server.check_output(f"sed -i 's/\"digest\": \"./\"digest\": \"X/' {marker}")
    try:
        result = playbook("--limit", "st-gpu2", "--tags", "nfs_client")
        assert result.returncode == 0, result.stdout[-3000:]
        assert sha256s(node, f"{LOCAL_DIR}/{LLAMA}") == exported_sha256s(node, url, LLAMA)
    finally:
        with server.sudo():
            server.check_output(f"echo {original_weights} | base64 -d > {weights}")
            server.check_output(f"echo {original_marker} | base64 -d > {marker}")
    result = playbook("--limit", "st-gpu2", "--tags", "nfs_client")
    assert result.returncode == 0, result.stdout[-3000:]
    assert sha256s(node, f"{LOCAL_DIR}/{LLAMA}") == sha256s(server, f"{MODELS_DIR}/{LLAMA}")


# --------------------------------------------------------------------------- recovery
LAB_NAME = "molecule-storage"
PROJECT = SCENARIO.parents[1]


def _remove_host(name: str, address: str) -> None:
    """What losing a machine leaves: no container, no volume (the export's disk), no SSH connection."""
    subprocess.run(["docker", "rm", "-f", "-v", name], check=True, capture_output=True)
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name=aphrodite-{LAB_NAME}-{name}-"],
                             check=True, capture_output=True, text=True).stdout.split()
    assert volumes, "the NFS server's export volume should exist before the drill"
    subprocess.run(["docker", "volume", "rm", *volumes], check=True, capture_output=True)
    sys.path.insert(0, str(PROJECT / "lab"))
    import labctl  # noqa: PLC0415 - the lab's own helper, only for this drill

    labctl.stop_ssh_masters({address})


def _weights(host, model: str) -> str:
    """Inode, change time and size of the local weights: a copy made again changes them."""
    with host.sudo():
        return host.check_output(f"stat -c '%i %Z %s' '{LOCAL_DIR}/{model}/model.safetensors'")


def test_a_lost_nfs_server_is_rebuilt_and_nodes_keep_their_valid_copies(lab, url):
    """The drill of README "On call: restore": the NFS server is lost with its export's
    volume; deploy (converge) builds it again and stages the models anew from their
    source; the GPU nodes read the export again and copy nothing, their copies still valid."""
    before = {(node, model): _weights(lab[node], model)
              for node, model in [("st-gpu1", LLAMA), ("st-gpu2", LLAMA), ("st-gpu1", EXTRA)]}
    molecule = yaml.safe_load((SCENARIO / "molecule.yml").read_text())
    hosts = [f"--host={p['name']}:{','.join(p.get('groups', []))}" for p in molecule["platforms"]]
    started = time.monotonic()
    _remove_host(NFS, lab[NFS].ansible.get_variables()["ansible_host"])
    up = subprocess.run([sys.executable, str(PROJECT / "lab" / "labctl.py"), "up", "--json", "--lab", LAB_NAME,
                         "--subnet", molecule["driver"]["lab_subnet"], *hosts],
                        check=True, capture_output=True, text=True, timeout=300)
    assert json.loads(up.stdout)["created"] == [NFS]
    result = playbook()
    recovered = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:]
    print(f"storage: NFS server lost and rebuilt by deploy: {recovered:.1f} s")
    path = os.environ.get("APHRODITE_TEST_TIMINGS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"storage: NFS server lost and rebuilt by deploy: {recovered:.1f} s\n")
    assert changed(result, NFS) > 0
    for node in GPUS:
        assert changed(result, node) == 0
        assert sha256s(lab[node], f"{LOCAL_DIR}/{LLAMA}") == exported_sha256s(lab[node], url, LLAMA)
    assert {key: _weights(lab[key[0]], key[1]) for key in before} == before
