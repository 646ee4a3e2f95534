#!/usr/bin/env python3
"""Bring up, show and tear down the lab: real Debian 13 hosts on one machine.

Each lab host is a systemd container on a dedicated Docker network with a fixed
address, reached by Ansible over SSH with a generated key, exactly like a server.
The host image is built locally with debootstrap (no image registry is needed)
and rebuilt only when its recipe changes.

GPU nodes carry test fixtures that stand in for hardware this machine does not
have: an ``nvidia-smi`` that replays recorded output of an 8×H100 server and a
CDI spec naming those devices.  The roles never know the difference.  A GPU node
given a hardware fixture (``--gpu-hardware NAME=PROFILE``, or ``lab_gpu_hardware``
in the inventory) has neither: only its PCI bus (lspci) is recorded, and the roles
install the driver, Fabric Manager, the container toolkit and Docker CE from the
lab package repository (lab/pkgrepo.py), which labctl then builds and serves.  Such
a host is made with an apt source of that repository's kernel headers already in
place, as a server has its distribution's archive (the lab shares this machine's
kernel, whose headers Debian's archive lacks).

Usage::

    labctl.py image                 # build the host image if its recipe changed
    labctl.py up [--lab NAME]       # hosts from inventories/lab (or --host ...)
    labctl.py net --lab NAME --subnet CIDR   # a lab's network and the package cache, no hosts
    labctl.py status [--lab NAME]
    labctl.py down [--lab NAME | --all]
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pkgrepo  # noqa: E402 - the lab package repository, beside this file

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = ROOT / "lab"
STATE_ROOT = ROOT / ".lab"
LAB_INVENTORY = ROOT / "inventories" / "lab" / "hosts.yml"
# Recorded nvidia-smi output of real servers; the unit tests parse the same files.
RECORDED_GPU = ROOT / "tests" / "fixtures" / "nvidia_smi"
LABEL = "io.aphrodite.lab"

SUITE = "trixie"
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-apt,openssh-server,iproute2,"
    "sudo,ca-certificates,procps"
)
DEFAULT_SUBNET = "172.28.10.0/24"
ADMIN_USER = "ansible"

# Volumes a group of hosts needs, and where they are mounted.  Docker inside a
# host wants its own volume (overlay2 instead of vfs); nfs-ganesha refuses to
# export overlay or tmpfs paths.
GROUP_VOLUMES = {
    "gpu_nodes": "/var/lib/docker",
    "nfs_servers": "/srv/exports",
}


class LabError(RuntimeError):
    """A lab operation failed; the message says what to do."""


@dataclass
class Host:
    name: str
    address: str
    groups: list[str] = field(default_factory=list)
    # A recorded server (lab/fixtures/gpu/hardware/<name>.json) whose driver the roles install.
    hardware: str | None = None

    @property
    def is_gpu(self) -> bool:
        return "gpu_nodes" in self.groups


def run(cmd: list[str], *, check: bool = True, capture: bool = True,
        stdin: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=stdin, capture_output=capture, check=False)
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() if capture else ""
        raise LabError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err}")
    return proc


def docker(*args: str, check: bool = True) -> str:
    return run(["docker", *args], check=check).stdout.decode().strip()


# --------------------------------------------------------------------------- image
def apt_mirror() -> str:
    """The Debian mirror this machine uses; never written into the repository."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text()
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s*$", text, re.M):
            return match.group(1)
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s", text, re.M):
            return match.group(1)
    raise LabError("no Debian mirror found in /etc/apt/sources.list*; the lab image needs one")


def recipe_digest(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:12]


def image_exists(ref: str) -> bool:
    return run(["docker", "image", "inspect", ref], check=False).returncode == 0


def build_base(mirror: str) -> str:
    tag = "aphrodite-lab-base:" + recipe_digest([SUITE.encode(), PACKAGES.encode(), b"minbase"])
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap is missing: run scripts/bootstrap.sh (apt-get install debootstrap)")
    print(f"lab: debootstrapping Debian {SUITE} (about 80 s) -> {tag}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="aphrodite-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), mirror])
        # Drop the apt lists and caches the bootstrap left: hosts refresh their own.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / sub).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "-c", 'CMD ["/sbin/init"]', "-", tag],
                             stdin=tar.stdout, capture_output=True, check=False)
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise LabError(f"docker import failed: {imp.stderr.decode().strip()}")
    return tag


def host_image_files() -> list[Path]:
    return sorted(p for p in (LAB_DIR / "image").iterdir() if p.is_file())


def build_image() -> str:
    """Build (or reuse) the lab host image; returns its tag."""
    base = build_base(apt_mirror())
    files = host_image_files()
    tag = "aphrodite-lab-host:" + recipe_digest([base.encode()] + [p.name.encode() + p.read_bytes() for p in files])
    if image_exists(tag):
        return tag
    print(f"lab: building host image {tag}", file=sys.stderr, flush=True)
    proc = run(["docker", "build", "-q", "--build-arg", f"BASE={base}", "-t", tag, str(LAB_DIR / "image")],
               check=False)
    if proc.returncode != 0:
        raise LabError("docker build of the lab host image failed:\n" + proc.stderr.decode())
    return tag


ENGINE_TAG = "aphrodite-standin:0.24.1-lab"
DCGM_TAG = "aphrodite-dcgm-standin:4.2.3-4.1.3-lab"


def build_fixture_image(tag: str, files: list[Path], what: str) -> Path:
    """Build a stand-in image from ``files`` and save it as a gzipped archive in .lab/images.

    No registry is reachable, so GPU nodes load such images from archives (the roles'
    *_image_archive variables), as an air-gapped site would.  Rebuilt only when the base
    image or one of the files changes.
    """
    base = build_base(apt_mirror())
    digest = recipe_digest([base.encode()] + [p.name.encode() + p.read_bytes() for p in files])
    name = tag.split(":", 1)[0]
    archive = STATE_ROOT / "images" / f"{name}.tar.gz"
    stamp = archive.parent / f"{name}.digest"
    if archive.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return archive
    print(f"lab: building the {what} image {tag} ({digest})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        for path in files:
            shutil.copy2(path, tmp)
        proc = run(["docker", "build", "-q", "--build-arg", f"BASE={base}", "-t", tag, tmp], check=False)
        if proc.returncode != 0:
            raise LabError(f"docker build of the {what} image failed:\n" + proc.stderr.decode())
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(archive, "wb") as out:
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        gz = subprocess.run(["gzip", "-1"], stdin=save.stdout, stdout=out, check=False)
        save.wait()
    if save.returncode != 0 or gz.returncode != 0:
        archive.unlink(missing_ok=True)
        raise LabError(f"docker save {tag} failed")
    stamp.write_text(digest + "\n")
    return archive


def build_engine_image() -> Path:
    """The stand-in engine: aphrodite-engine 0.24.1 at its interfaces (engine_image_archive)."""
    src = LAB_DIR / "fixtures" / "engine"
    flags = ROOT / "plugins" / "module_utils" / "_engine_flags.py"
    return build_fixture_image(ENGINE_TAG, [src / "Dockerfile", src / "standin.py", flags], "stand-in engine")


def build_dcgm_image() -> Path:
    """The DCGM exporter stand-in: DCGM's metric names for the CDI devices it is given
    (monitoring_dcgm_image_archive); lab GPU nodes have no GPU for NVIDIA's exporter."""
    src = LAB_DIR / "fixtures" / "dcgm"
    return build_fixture_image(DCGM_TAG, [src / "Dockerfile", src / "dcgm_standin.py"], "DCGM exporter stand-in")


# --------------------------------------------------------------------------- hosts
def inventory_hosts() -> tuple[list[Host], str]:
    """Hosts, their groups and the subnet declared by inventories/lab."""
    import yaml  # from the virtualenv (ansible depends on PyYAML)

    data = yaml.safe_load(LAB_INVENTORY.read_text())
    hosts: dict[str, Host] = {}

    def walk(group: str, node: dict) -> None:
        node = node or {}
        for name, hvars in (node.get("hosts") or {}).items():
            host = hosts.setdefault(name, Host(name=name, address=""))
            if hvars and hvars.get("ansible_host"):
                host.address = hvars["ansible_host"]
            if hvars and hvars.get("lab_gpu_hardware"):
                host.hardware = hvars["lab_gpu_hardware"]
            if group != "all" and group not in host.groups:
                host.groups.append(group)
        for child, sub in (node.get("children") or {}).items():
            walk(child, sub)

    walk("all", data["all"])
    subnet = (data["all"].get("vars") or {}).get("lab_subnet", DEFAULT_SUBNET)
    missing = [h.name for h in hosts.values() if not h.address]
    if missing:
        raise LabError(f"{LAB_INVENTORY}: give {', '.join(missing)} an ansible_host address in {subnet}")
    return list(hosts.values()), subnet


def parse_host_args(specs: list[str], subnet: str) -> list[Host]:
    """``NAME[:GROUP[,GROUP]]`` -> hosts with addresses .11, .12, ... of the subnet."""
    net = ipaddress.ip_network(subnet)
    hosts = []
    for offset, spec in enumerate(specs, start=11):
        name, _, groups = spec.partition(":")
        group_list = [g for g in groups.split(",") if g]
        hosts.append(Host(name=name, address=str(net.network_address + offset), groups=group_list))
    return hosts


def lab_names(lab: str) -> dict[str, str]:
    return {"network": f"aphrodite-{lab}", "state": str(STATE_ROOT / lab)}


def ensure_key() -> Path:
    key = STATE_ROOT / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aphrodite-lab", "-f", str(key)])
    return key


LAB_SECRETS = ("engine_api_key", "client_api_key", "admin_api_key", "verify_api_key", "vrrp_password",
               "prometheus_password")


def ensure_secrets() -> Path:
    """Random secrets of the lab, in files only root can read.

    The lab inventory reads them with the file lookup: no secret is ever written
    into the repository, as production keeps them in ansible-vault.
    """
    secrets = STATE_ROOT / "secrets"
    secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in LAB_SECRETS:
        path = secrets / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets_token(name))
    return secrets


def secrets_token(name: str) -> str:
    import secrets as _secrets

    # VRRP authentication takes at most 8 characters.
    return _secrets.token_urlsafe(6)[:8] if name == "vrrp_password" else _secrets.token_urlsafe(32)


def ensure_network(name: str, subnet: str, lab: str) -> None:
    if run(["docker", "network", "inspect", name], check=False).returncode == 0:
        return
    net = ipaddress.ip_network(subnet)
    # Docker hands out addresses only from the upper half: pinned hosts and the
    # keepalived VIP live in the lower half, where Docker never allocates.
    upper = list(net.subnets(prefixlen_diff=1))[1]
    create = ["network", "create", "--driver", "bridge", "--subnet", subnet, "--ip-range", str(upper),
              "--label", f"{LABEL}={lab}", name]
    # "Pool overlaps" is transient when another lab on this subnet is being torn down (a
    # Molecule destroy beside this create); wait for it a little, then name who holds it.
    deadline = time.monotonic() + 30
    while True:
        proc = run(["docker", *create], check=False)
        if proc.returncode == 0:
            return
        err = proc.stderr.decode(errors="replace").strip()
        if "overlap" not in err.lower() or time.monotonic() > deadline:
            holder = subnet_holder(subnet)
            hint = f"; network {holder} holds it: remove its lab (or `docker network rm {holder}`)" if holder else ""
            raise LabError(f"cannot create network {name} on {subnet}: {err}{hint}")
        time.sleep(2)


def subnet_holder(subnet: str) -> str | None:
    """The Docker network whose subnet overlaps ``subnet``, if any."""
    wanted = ipaddress.ip_network(subnet)
    for net_id in docker("network", "ls", "-q", check=False).split():
        out = docker("network", "inspect", "-f", "{{.Name}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", net_id,
                     check=False).split()
        for cidr in out[1:]:
            try:
                if ipaddress.ip_network(cidr, strict=False).overlaps(wanted):
                    return out[0]
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------- package cache
# One apt-cacher-ng for every lab (common_package_proxy in the lab's group_vars): a fleet
# downloads each package once, and a fresh converge after the first takes them from here.
# It listens only on the lab networks' gateways, never on this machine's other interfaces.
CACHE_PORT = 3142
CACHE_DIR = STATE_ROOT / "apt-cache"
CACHE_USER = "apt-cacher-ng"


def bridge_addresses(net_id: str) -> set[str]:
    """This machine's addresses on a lab network: the gateway of its hosts."""
    # Docker names a bridge network's interface br-<first 12 of its id>; its address is
    # the gateway, which `network inspect` leaves out when Docker picked it.
    out = run(["ip", "-4", "-o", "addr", "show", "dev", f"br-{net_id[:12]}"], check=False).stdout.decode()
    return {m.group(1) for m in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)}


def lab_gateways() -> list[str]:
    """This machine's address on each lab network (the hosts' default gateway)."""
    found = set()
    for net in docker("network", "ls", "-q", "--no-trunc", "--filter", f"label={LABEL}").split():
        found |= bridge_addresses(net)
    return sorted(found)


def network_gateway(network: str) -> str:
    found = sorted(bridge_addresses(docker("network", "inspect", "-f", "{{.Id}}", network)))
    if not found:
        raise LabError(f"network {network} has no gateway address on this machine; `labctl down` its lab and retry")
    return found[0]


def kernel_archive(state: Path, gateway: str, repo: Path) -> Path:
    """The apt source of the running kernel's headers, for hosts whose driver the roles install.

    The lab hosts run this machine's kernel, whose headers Debian's archive lacks; on a
    server they come from the distribution's archive, configured before any role runs.
    So such a host is made with this source in place, as its image has Debian's: the lab
    package repository's ``kernel/`` archive, signed with its key.  Returns a directory
    laid out like /etc/apt, copied into the host when it is made: plain files of the
    host, which a test may remove like a server's.
    """
    etc_apt = state / "etc-apt"
    (etc_apt / "keyrings").mkdir(parents=True, exist_ok=True)
    (etc_apt / "sources.list.d").mkdir(parents=True, exist_ok=True)
    key = etc_apt / "keyrings" / "lab-kernel.asc"
    shutil.copyfile(repo / "kernel" / "key.asc", key)
    sources = etc_apt / "sources.list.d" / "lab-kernel.sources"
    sources.write_text(
        "# The running kernel's headers, served by the lab package repository (lab/pkgrepo.py).\n"
        "Types: deb\n"
        f"URIs: http://{gateway}:{pkgrepo.PORT}/kernel/\n"
        "Suites: /\n"
        "Signed-By: /etc/apt/keyrings/lab-kernel.asc\n")
    for path in (etc_apt, etc_apt / "keyrings", etc_apt / "sources.list.d"):
        path.chmod(0o755)
    for path in (key, sources):
        path.chmod(0o644)
    return etc_apt


def _cache_pid() -> int | None:
    return pkgrepo.daemon_pid(CACHE_DIR / "run" / "pid")


def stop_package_cache() -> None:
    pkgrepo.stop_daemon(CACHE_DIR / "run" / "pid")


def ensure_package_cache() -> None:
    """apt-cacher-ng on the gateway of every lab network (restarted when that set changes)."""
    exe = shutil.which("apt-cacher-ng") or "/usr/sbin/apt-cacher-ng"
    if not os.access(exe, os.X_OK):
        raise LabError("apt-cacher-ng is missing (the lab's package cache): run scripts/bootstrap.sh")
    gateways = lab_gateways()
    if not gateways:
        raise LabError("found no address of this machine on the lab networks (needs `ip`, from iproute2: "
                       "run scripts/bootstrap.sh)")
    binds = CACHE_DIR / "run" / "binds"
    gateways = pkgrepo.addresses_to_bind(_cache_pid() is not None, binds, gateways)
    if gateways is None:
        return
    stop_package_cache()
    for sub in ("conf", "cache", "log", "run"):
        (CACHE_DIR / sub).mkdir(parents=True, exist_ok=True)
    (CACHE_DIR / "conf" / "acng.conf").write_text(
        f"CacheDir: {CACHE_DIR / 'cache'}\nLogDir: {CACHE_DIR / 'log'}\nSupportDir: /usr/lib/apt-cacher-ng\n"
        f"Port: {CACHE_PORT}\nBindAddress: {' '.join(gateways)}\nExThreshold: 4\n")
    argv = [exe, "-c", str(CACHE_DIR / "conf"), "ForeGround=0", f"pidfile={CACHE_DIR / 'run' / 'pid'}",
            f"SocketPath={CACHE_DIR / 'run' / 'socket'}"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # Not as root: the daemon faces the lab networks.
        run(["chown", "-R", f"{CACHE_USER}:{CACHE_USER}", str(CACHE_DIR / "cache"), str(CACHE_DIR / "log"),
             str(CACHE_DIR / "run")])
        argv = ["setpriv", f"--reuid={CACHE_USER}", f"--regid={CACHE_USER}", "--init-groups"] + argv
    run(argv)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((gateways[0], CACHE_PORT), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise LabError(f"apt-cacher-ng does not answer on {gateways[0]}:{CACHE_PORT}; "
                               f"see {CACHE_DIR / 'log'}") from None
            time.sleep(0.3)
    binds.write_text(" ".join(gateways) + "\n")
    print(f"lab: package cache apt-cacher-ng on {', '.join(gateways)} port {CACHE_PORT}", file=sys.stderr, flush=True)


def container_state(name: str) -> str | None:
    proc = run(["docker", "inspect", "-f", "{{.State.Status}}", name], check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def start_host(lab: str, host: Host, image: str, network: str, key: Path,
               etc_apt: Path | None = None) -> bool:
    """Create and start one host container; returns True when it was created.

    ``etc_apt``: files copied into the new host's /etc/apt (:func:`kernel_archive`).
    """
    state = container_state(host.name)
    if state == "running":
        return False
    if state is not None:
        docker("start", host.name)
        return False
    cmd = [
        "run", "-d", "--name", host.name, "--hostname", host.name,
        "--network", network, "--ip", host.address,
        "--label", f"{LABEL}={lab}",
        "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--security-opt", "systempaths=unconfined",
        "--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
        "-v", f"{key}.pub:/home/{ADMIN_USER}/.ssh/authorized_keys:ro",
    ]
    for group, path in GROUP_VOLUMES.items():
        if group in host.groups:
            volume = f"aphrodite-{lab}-{host.name}-{path.strip('/').replace('/', '-')}"
            cmd += ["--mount", f"type=volume,src={volume},dst={path},volume-label={LABEL}={lab}"]
    gpu = LAB_DIR / "fixtures" / "gpu"
    if host.hardware:
        cmd += ["-v", f"{RECORDED_GPU}:/usr/local/share/lab-gpu/recorded:ro",
                "-v", f"{hardware_file(host.hardware)}:/usr/local/share/lab-gpu/hardware.json:ro",
                "-v", f"{gpu / 'lspci'}:/usr/local/bin/lspci:ro"]
    elif host.is_gpu:
        cmd += ["-v", f"{RECORDED_GPU}:/usr/local/share/lab-gpu/recorded:ro",
                "-v", f"{gpu / 'nvidia-smi'}:/usr/local/bin/nvidia-smi:ro",
                "-v", f"{gpu / 'cdi-lab.yaml'}:/etc/cdi/lab-gpus.yaml:ro"]
    docker(*cmd, image, "/sbin/init")
    if etc_apt is not None:
        docker("cp", f"{etc_apt}/.", f"{host.name}:/etc/apt/")
    return True


def hardware_file(name: str) -> Path:
    path = LAB_DIR / "fixtures" / "gpu" / "hardware" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise LabError(f"no GPU hardware fixture {name!r}; use one of {', '.join(known)}")
    return path


def wait_ssh(hosts: list[Host], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    pending = {h.name: h for h in hosts}
    while pending and time.monotonic() < deadline:
        for name, host in list(pending.items()):
            try:
                with socket.create_connection((host.address, 22), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        del pending[name]
            except OSError:
                pass
        if pending:
            time.sleep(0.5)
    if pending:
        raise LabError(f"no SSH banner from {', '.join(pending)} after {timeout:.0f} s; "
                       f"see `docker logs {next(iter(pending))}`")


def write_known_hosts(state: Path, hosts: list[Host]) -> Path:
    """Record each host's freshly generated key so SSH can check it strictly."""
    known = state / "known_hosts"
    lines = []
    for host in hosts:
        proc = run(["ssh-keyscan", "-T", "5", "-t", "ed25519", host.address], check=False)
        found = [l for l in proc.stdout.decode().splitlines() if l and not l.startswith("#")]
        if not found:
            raise LabError(f"ssh-keyscan got no key from {host.name} ({host.address})")
        lines += found
        lines += [l.replace(host.address, host.name, 1) for l in found]
    known.write_text("\n".join(lines) + "\n")
    return known


def wait_running(hosts: list[Host], timeout: float = 60.0) -> None:
    """Wait until systemd in every host says running (or degraded, reported)."""
    deadline = time.monotonic() + timeout
    for host in hosts:
        while True:
            proc = run(["docker", "exec", host.name, "systemctl", "is-system-running"], check=False)
            status = proc.stdout.decode().strip()
            if status in ("running", "degraded"):
                if status == "degraded":
                    failed = docker("exec", host.name, "systemctl", "--failed", "--no-legend", "--plain")
                    print(f"lab: warning: {host.name} is degraded:\n{failed}", file=sys.stderr)
                break
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: systemd still '{status}' after {timeout:.0f} s")
            time.sleep(0.5)


# A lab host rebooted from inside (systemctl reboot, ansible.builtin.reboot) ends its PID 1
# by SIGHUP, as reboot(2) does in a PID namespace: the container exits with 129; powered off,
# by SIGINT (130).  No restart policy tells those apart, so a watcher of Docker's events
# plays the server's firmware: it starts a host again that ended by a reboot (with an
# empty /run, as a server boots); one powered off, or stopped with `docker stop`, stays off.
REBOOT_EXIT = "129"
WATCHER_PID = STATE_ROOT / "run" / "reboot-watcher.pid"


def ensure_reboot_watcher() -> None:
    if pkgrepo.daemon_pid(WATCHER_PID) is not None:
        return
    WATCHER_PID.parent.mkdir(parents=True, exist_ok=True)
    with (WATCHER_PID.parent / "reboot-watcher.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "reboot-watcher"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    WATCHER_PID.write_text(f"{proc.pid}\n")


def reboot_watcher() -> int:
    """Start again every lab host whose PID 1 ended by a reboot; runs until SIGTERM."""
    events = subprocess.Popen(["docker", "events", "--filter", "type=container", "--filter", "event=die",
                               "--filter", f"label={LABEL}", "--format", "{{json .Actor.Attributes}}"],
                              stdout=subprocess.PIPE, text=True)

    def stop(*_: object) -> None:
        events.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    assert events.stdout is not None
    for line in events.stdout:
        try:
            attributes = json.loads(line)
        except ValueError:
            continue
        if attributes.get("exitCode") == REBOOT_EXIT and attributes.get("name"):
            started = run(["docker", "start", attributes["name"]], check=False)
            print(f"{time.strftime('%H:%M:%S')} {attributes['name']} rebooted: "
                  f"{'started again' if started.returncode == 0 else started.stderr.decode().strip()}", flush=True)
    return events.wait()


def up(lab: str, hosts: list[Host], subnet: str) -> dict:
    image = build_image()
    for host in hosts:
        if host.hardware:
            hardware_file(host.hardware)
    if any(h.is_gpu for h in hosts):
        build_engine_image()
        build_dcgm_image()
    repo = pkgrepo.build(build_base(apt_mirror())) if any(h.hardware for h in hosts) else None
    names = lab_names(lab)
    state = Path(names["state"])
    state.mkdir(parents=True, exist_ok=True)
    key = ensure_key()
    ensure_secrets()
    ensure_network(names["network"], subnet, lab)
    ensure_package_cache()
    if repo is not None:
        pkgrepo.ensure_served(repo, lab_gateways())
    ensure_reboot_watcher()
    etc_apt = kernel_archive(state, network_gateway(names["network"]), repo) if repo is not None else None
    created = [h for h in hosts if start_host(lab, h, image, names["network"], key,
                                              etc_apt if h.hardware else None)]
    wait_running(hosts)
    wait_ssh(hosts)
    known = write_known_hosts(state, hosts)
    info = {
        "lab": lab, "network": names["network"], "subnet": subnet, "image": image,
        "ssh_user": ADMIN_USER, "ssh_key": str(key), "known_hosts": str(known),
        "hosts": [{"name": h.name, "address": h.address, "groups": h.groups, "gpu_hardware": h.hardware}
                  for h in hosts],
        "created": [h.name for h in created],
    }
    (state / "lab.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def prepare_network(lab: str, subnet: str) -> None:
    """A lab's network, the shared SSH key and secrets, and the package cache on its gateway.

    What ``up`` would make first; run for every lab before labs start side by side, so none
    of them makes a key another is using or restarts the cache another is downloading from.
    """
    ensure_key()
    ensure_secrets()
    ensure_network(lab_names(lab)["network"], subnet, lab)
    ensure_package_cache()


def write_instance_config(path: Path, info: dict) -> None:
    """Molecule's delegated driver reads how to reach each instance from here."""
    import yaml

    instances = [{"instance": h["name"], "address": h["address"], "user": info["ssh_user"],
                  "port": 22, "identity_file": info["ssh_key"]} for h in info["hosts"]]
    path.write_text(yaml.safe_dump(instances, sort_keys=False))
    path.chmod(0o600)


def lab_containers(lab: str | None) -> list[str]:
    flt = f"label={LABEL}" + (f"={lab}" if lab else "")
    out = docker("ps", "-a", "--filter", flt, "--format", "{{.Names}}")
    return [line for line in out.splitlines() if line]


def lab_addresses(names: list[str]) -> set[str]:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    found: set[str] = set()
    for name in names:
        found.update(docker("inspect", "-f", fmt, name, check=False).split())
    return found


def stop_ssh_masters(addresses: set[str]) -> None:
    """End the SSH connections Ansible keeps open (ControlPersist) to removed hosts."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv if w]
        if not words or Path(words[0]).name != "ssh" or not any("ControlPersist" in w for w in words):
            continue
        if any(w in addresses or w.split("@")[-1] in addresses for w in words):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass


def down(lab: str | None) -> None:
    """Remove hosts (nested containers first), volumes, networks, SSH masters and state."""
    names = lab_containers(lab)
    addresses = lab_addresses(names)
    for name in names:
        if container_state(name) == "running":
            # Nested engine containers first: removed with their host they leave
            # empty cgroup directories behind on this machine.
            run(["docker", "exec", name, "sh", "-c",
                 "command -v docker >/dev/null && systemctl is-active -q docker "
                 "&& docker ps -aq | xargs -r docker rm -f; true"], check=False)
        docker("rm", "-f", "-v", name)
    flt = f"label={LABEL}" + (f"={lab}" if lab else "")
    for vol in docker("volume", "ls", "-q", "--filter", flt).splitlines():
        docker("volume", "rm", vol)
    # Networks made before they carried the lab's name as their label carry the network's.
    nets = set(docker("network", "ls", "-q", "--filter", flt).splitlines())
    if lab:
        nets |= set(docker("network", "ls", "-q", "--filter", f"name=^aphrodite-{lab}$").splitlines())
    for net in nets:
        docker("network", "rm", net)
    if not lab_gateways():
        stop_package_cache()  # its cache stays in .lab/apt-cache for the next lab
        pkgrepo.stop()  # and the package repository in .lab/pkg-repo
        pkgrepo.stop_daemon(WATCHER_PID)
    stop_ssh_masters(addresses)
    if lab:
        shutil.rmtree(STATE_ROOT / lab, ignore_errors=True)
    else:
        for entry in STATE_ROOT.glob("*"):
            if entry.name not in ("ssh", "images", "secrets", "apt-cache", "pkg-repo"):
                shutil.rmtree(entry, ignore_errors=True)


def status(lab: str | None) -> int:
    names = lab_containers(lab)
    if not names:
        print("lab: no hosts" + (f" in lab {lab!r}" if lab else ""))
        return 1
    print(f"{'HOST':10} {'LAB':16} {'ADDRESS':15} {'CONTAINER':10} SYSTEMD")
    for name in sorted(names):
        fmt = ('{{index .Config.Labels "' + LABEL + '"}} '
               '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} {{.State.Status}}')
        lab_name, address, cstate = docker("inspect", "-f", fmt, name).split(" ")
        sysd = "-"
        if cstate == "running":
            sysd = run(["docker", "exec", name, "systemctl", "is-system-running"],
                       check=False).stdout.decode().strip()
        print(f"{name:10} {lab_name:16} {address:15} {cstate:10} {sysd}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("image", help="build the host image if its recipe changed")
    sub.add_parser("engine-image", help="build the stand-in engine image archive for GPU nodes")
    sub.add_parser("dcgm-image", help="build the DCGM exporter stand-in image archive for GPU nodes")
    p_up = sub.add_parser("up", help="start hosts and wait until SSH answers")
    p_up.add_argument("--lab", default="lab")
    p_up.add_argument("--subnet", help="defaults to lab_subnet from inventories/lab")
    p_up.add_argument("--host", action="append", default=[], metavar="NAME[:GROUP,...]",
                      help="hosts to start instead of those in inventories/lab")
    p_up.add_argument("--gpu-hardware", action="append", default=[], metavar="NAME=PROFILE",
                      help="give GPU node NAME the recorded server PROFILE (lab/fixtures/gpu/hardware) "
                           "instead of a preinstalled driver")
    p_up.add_argument("--json", action="store_true", help="print the lab description as JSON")
    p_up.add_argument("--instance-config", metavar="PATH",
                      help="also write Molecule's instance config (how to reach each host)")
    p_net = sub.add_parser("net", help="make a lab's network (no hosts) and serve the package cache on it")
    p_net.add_argument("--lab", required=True)
    p_net.add_argument("--subnet", required=True)
    sub.add_parser("reboot-watcher", help="start again the lab hosts rebooted from inside (labctl up runs it)")
    p_st = sub.add_parser("status", help="list lab hosts")
    p_st.add_argument("--lab")
    p_down = sub.add_parser("down", help="remove hosts, volumes, networks and state")
    grp = p_down.add_mutually_exclusive_group()
    grp.add_argument("--lab", default="lab")
    grp.add_argument("--all", action="store_true", help="every lab, molecule's included")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "image":
            print(build_image())
        elif args.cmd == "engine-image":
            print(build_engine_image())
        elif args.cmd == "dcgm-image":
            print(build_dcgm_image())
        elif args.cmd == "up":
            if args.host:
                hosts = parse_host_args(args.host, args.subnet or DEFAULT_SUBNET)
                subnet = args.subnet or DEFAULT_SUBNET
            else:
                hosts, subnet = inventory_hosts()
                subnet = args.subnet or subnet
            for spec in args.gpu_hardware:
                name, _, profile = spec.partition("=")
                match = [h for h in hosts if h.name == name]
                if not match or not profile:
                    raise LabError(f"--gpu-hardware {spec}: give NAME=PROFILE for one of the hosts")
                match[0].hardware = profile
            info = up(args.lab, hosts, subnet)
            if args.instance_config:
                write_instance_config(Path(args.instance_config), info)
            if args.json:
                print(json.dumps(info))
            else:
                for h in info["hosts"]:
                    print(f"lab: {h['name']:8} {h['address']:15} {','.join(h['groups'])}")
        elif args.cmd == "net":
            prepare_network(args.lab, args.subnet)
        elif args.cmd == "status":
            return status(args.lab)
        elif args.cmd == "reboot-watcher":
            return reboot_watcher()
        elif args.cmd == "down":
            down(None if args.all else args.lab)
    except (LabError, pkgrepo.RepoError) as exc:
        print(f"labctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
