#!/usr/bin/env python3
"""The lab package repository: NVIDIA's and Docker's repositories, as the roles use them.

The roles' production defaults install the NVIDIA driver from NVIDIA's CUDA
repository, Fabric Manager beside it, the NVIDIA container toolkit from its own
repository and Docker CE from Docker's.  None of them is reachable here, so this
module builds repositories of the same shape with Debian's tools (dpkg-deb,
apt-ftparchive, gpg), signs them with a generated lab key and serves them over HTTP
on the lab networks' gateways, beside the apt cache.  The roles then run their
production code path with only the repository URLs pointed here.

Packages carry the real names, versions and dependencies (the branch's meta package
depends on ``>=`` versions, so only the role's apt pin keeps another branch out; each
repository also holds a newer version than the roles pin).  Their payloads behave
as the roles need (lab/fixtures/gpu/packages, lab/fixtures/docker-ce):

* the driver: nvidia-smi replays the node's recorded hardware (labctl mounts it) and
  answers only once DKMS "built" the module, which needs the kernel headers;
* Fabric Manager: a unit that starts only where the hardware has NVSwitches and the
  driver is its own version;
* the toolkit: nvidia-ctk generating and validating the CDI spec from the same
  hardware and editing daemon.json as the real one;
* Docker CE: Debian's docker.io, containerd, runc and tini binaries repackaged
  under Docker CE's names, a working engine.

Built once per recipe (this file, the payloads, the kernel) into .lab/pkg-repo and
reused: ``python lab/pkgrepo.py build`` prints the directory.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "lab" / "fixtures"
STATE = ROOT / ".lab" / "pkg-repo"
PORT = 3143

CODENAME = "trixie"
DEBIAN_MAJOR = "13"
ARCH = "amd64"
# The roles' pinned driver branch and the next production branch (the upgrade path).
DRIVERS = {"550": "550.90.07", "570": "570.172.08"}
# The versions the roles pin, then a newer one only the pins keep out.
TOOLKIT_VERSIONS = ("1.17.8", "1.18.0")
DOCKER_VERSIONS = ("28.5.2", "29.0.1")
CONTAINERD_VERSION = "1.7.28"
# Debian's packages whose binaries become Docker CE.
DEBIAN_SOURCES = ("docker.io", "docker-cli", "containerd", "runc", "tini")
SOURCE_DATE_EPOCH = "1735689600"  # 2025-01-01
KEY_UID = "aphrodite lab package repository <lab-repo@aphrodite.invalid>"


class RepoError(RuntimeError):
    """Building or serving the repository failed; the message says what to do."""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, check=False, **kwargs)
    if proc.returncode != 0:
        raise RepoError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): "
                        f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


@dataclass
class Package:
    name: str
    version: str
    description: str
    fields: dict[str, str] = field(default_factory=dict)
    # destination -> (content or file to copy, mode)
    files: dict[str, tuple[bytes | Path, int]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    scripts: dict[str, str] = field(default_factory=dict)


def build_deb(pkg: Package, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="lab-deb-") as tmp:
        root = Path(tmp)
        for dest, (content, mode) in pkg.files.items():
            target = root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
            target.chmod(mode)
        for dest, src in pkg.links.items():
            target = root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(src)
        debian = root / "DEBIAN"
        debian.mkdir()
        control = {"Package": pkg.name, "Version": pkg.version, "Architecture": ARCH,
                   "Maintainer": "aphrodite lab <lab-repo@aphrodite.invalid>", **pkg.fields,
                   "Description": pkg.description}
        (debian / "control").write_text("".join(f"{k}: {v}\n" for k, v in control.items() if v))
        for name, body in pkg.scripts.items():
            (debian / name).write_text("#!/bin/sh\nset -e\n" + body)
            (debian / name).chmod(0o755)
        deb = out / f"{pkg.name}_{pkg.version.split(':')[-1]}_{ARCH}.deb"
        # Reproducible: a rebuild of an unchanged package is byte for byte the same file.
        run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(root), str(deb)],
            env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    return deb


# ----------------------------------------------------------------------- payloads
def _text(value: str) -> bytes:
    return (value.strip() + "\n").encode()


SYSTEMD_UP = 'if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi\n'


def _enable_start(*units: str) -> str:
    # As the real packages' postinst (deb-systemd-helper, deb-systemd-invoke) do.
    names = " ".join(units)
    return (f'if [ "$1" = configure ] && [ -d /run/systemd/system ]; then\n'
            f'  systemctl daemon-reload\n  systemctl enable {names}\n  systemctl restart {names}\nfi\n')


def nvidia_packages(branch: str, version: str) -> list[Package]:
    """NVIDIA's CUDA repository for Debian (debian13/x86_64) of one driver branch."""
    deb = f"{version}-1"
    gpu = FIXTURES / "gpu"
    dkms_postinst = (
        # DKMS builds against the running kernel's headers; without them it fails, as the real build does.
        'kernel="$(uname -r)"\n'
        'if [ ! -e "/lib/modules/$kernel/build/Makefile" ]; then\n'
        '  echo "Error! Your kernel headers for kernel $kernel cannot be found at /lib/modules/$kernel/build." >&2\n'
        '  echo "Please install the linux-headers-$kernel package" >&2\n'
        '  exit 1\nfi\n'
        'mkdir -p /var/lib/lab-gpu\n'
        f'echo {version} > /var/lib/lab-gpu/nvidia-module\n')
    dkms_postrm = ('if [ "$1" = remove ] || [ "$1" = purge ]; then\n'
                   '  rm -f /var/lib/lab-gpu/nvidia-module\nfi\n')
    def pkg(name: str, description: str, depends: str = "", **extra) -> Package:
        return Package(name, deb, description, fields={"Depends": depends, "Section": "non-free/libs", **extra},
                       files={f"/usr/share/doc/{name}/lab-driver-version": (_text(version), 0o644)})

    at = f"(= {deb})"
    ge = f"(>= {deb})"
    packages = [
        pkg(f"cuda-drivers-{branch}", f"NVIDIA driver {branch} meta package (lab)",
            f"nvidia-driver-cuda {ge}, nvidia-kernel-open-dkms {ge} | nvidia-kernel-dkms {ge}, "
            f"libcuda1 {ge}, nvidia-persistenced {ge}"),
        pkg("nvidia-driver-cuda", "NVIDIA driver CUDA integration components (lab)",
            f"nvidia-smi {at}, libcuda1 {at}, nvidia-kernel-support {at}"),
        pkg("nvidia-kernel-support", "NVIDIA kernel module support files (lab)"),
        pkg("libnvidia-ml1", "NVIDIA Management Library (lab)"),
        pkg("libcuda1", "NVIDIA CUDA Driver Library (lab)", f"libnvidia-ml1 {at}"),
        pkg(f"libnvidia-nscq-{branch}", "NVSwitch Configuration and Query library (lab)"),
    ]
    for flavour, other in (("nvidia-kernel-open-dkms", "nvidia-kernel-dkms"),
                           ("nvidia-kernel-dkms", "nvidia-kernel-open-dkms")):
        module = pkg(flavour, f"NVIDIA {'open ' if 'open' in flavour else ''}kernel modules built by DKMS (lab)",
                     f"nvidia-kernel-support {at}", Conflicts=other, Provides=f"nvidia-kernel-{version}")
        module.scripts = {"postinst": dkms_postinst, "postrm": dkms_postrm}
        packages.append(module)
    smi = pkg("nvidia-smi", "NVIDIA System Management Interface (lab: replays the node's recorded GPUs)",
              f"libnvidia-ml1 {at}")
    smi.files.update({"/usr/bin/nvidia-smi": (gpu / "nvidia-smi", 0o755),
                      "/usr/share/lab-gpu/nvml-version": (_text(version), 0o644)})
    persistenced = pkg("nvidia-persistenced", "NVIDIA persistence daemon (lab)", f"nvidia-smi {at}")
    persistenced.files.update({
        "/usr/bin/nvidia-persistenced": (gpu / "packages" / "nvidia-persistenced", 0o755),
        "/usr/lib/systemd/system/nvidia-persistenced.service": (_text(
            "[Unit]\nDescription=NVIDIA Persistence Daemon\nWants=syslog.target\n\n"
            "[Service]\nType=notify\nExecStart=/usr/bin/nvidia-persistenced\n\n"
            "[Install]\nWantedBy=multi-user.target"), 0o644)})
    # Enabled, not started: the module may wait for a reboot (the role starts it when loaded).
    persistenced.scripts = {"postinst": 'if [ "$1" = configure ] && [ -d /run/systemd/system ]; then\n'
                                        '  systemctl daemon-reload\n  systemctl enable nvidia-persistenced.service\nfi\n'}
    fabric = pkg(f"nvidia-fabricmanager-{branch}", "NVIDIA Fabric Manager for NVSwitch systems (lab)",
                 Conflicts="nvidia-fabricmanager", Provides="nvidia-fabricmanager")
    fabric.files.update({
        "/usr/bin/nv-fabricmanager": (gpu / "packages" / "nv-fabricmanager", 0o755),
        "/usr/share/lab-gpu/fabricmanager-version": (_text(version), 0o644),
        "/usr/share/nvidia/nvswitch/fabricmanager.cfg": (_text("LOG_LEVEL=4\nFABRIC_MODE=0"), 0o644),
        "/usr/lib/systemd/system/nvidia-fabricmanager.service": (_text(
            "[Unit]\nDescription=NVIDIA fabric manager service\nAfter=network-online.target\n\n"
            "[Service]\nType=notify\n"
            "ExecStart=/usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg\n\n"
            "[Install]\nWantedBy=multi-user.target"), 0o644)})
    # Fabric Manager's package does not start it: the role does, on NVSwitch systems.
    fabric.scripts = {"postinst": SYSTEMD_UP}
    packages += [smi, persistenced, fabric]
    return packages


def toolkit_packages(version: str) -> list[Package]:
    """NVIDIA's container toolkit repository (libnvidia-container/stable/deb/amd64)."""
    deb = f"{version}-1"
    gpu = FIXTURES / "gpu" / "packages"
    base = Package("nvidia-container-toolkit-base", deb, "NVIDIA Container Toolkit Base (lab)",
                   fields={"Section": "utils", "Breaks": "nvidia-container-toolkit (<= 1.10.0-1)"},
                   files={"/usr/bin/nvidia-ctk": (gpu / "nvidia-ctk", 0o755),
                          "/usr/bin/nvidia-container-runtime": (gpu / "nvidia-container-runtime", 0o755),
                          "/usr/share/lab-gpu/toolkit-version": (_text(version), 0o644)})
    return [
        Package("libnvidia-container1", deb, "NVIDIA container runtime library (lab)", fields={"Section": "libs"}),
        Package("libnvidia-container-tools", deb, "NVIDIA container runtime library, CLI (lab)",
                fields={"Section": "utils", "Depends": f"libnvidia-container1 (>= {deb})"}),
        base,
        Package("nvidia-container-toolkit", deb, "NVIDIA Container Toolkit (lab)",
                fields={"Section": "utils",
                        "Depends": f"nvidia-container-toolkit-base (= {deb}), libnvidia-container-tools (>= {deb}), "
                                   "libnvidia-container-tools (<< 2.0.0)"}),
    ]


def docker_packages(version: str, debian: Path) -> list[Package]:
    """Docker's repository for Debian 13 (docker/linux/debian trixie stable), from Debian's binaries."""
    suffix = f"-1~debian.{DEBIAN_MAJOR}~{CODENAME}"
    ce = f"5:{version}{suffix}"
    src = FIXTURES / "docker-ce"
    conflicts = "docker (<< 1.5~), docker-engine, docker.io"
    enable = _enable_start("docker.socket", "docker.service")
    group = "getent group docker >/dev/null || groupadd --system docker\n"
    return [
        Package("docker-ce-cli", ce, "Docker CLI (lab: Debian's docker-cli)",
                fields={"Depends": "libc6 (>= 2.34)", "Recommends": "docker-buildx-plugin, docker-compose-plugin",
                        "Conflicts": conflicts, "Replaces": "docker-ce (<< 5:0), docker-engine"},
                files={"/usr/bin/docker": (debian / "docker-cli/usr/bin/docker", 0o755)}),
        Package("docker-ce", ce, "Docker: the open-source application container engine (lab: Debian's docker.io)",
                fields={"Depends": f"containerd.io (>= 1.7.27), docker-ce-cli, iptables, libc6 (>= 2.34), libsystemd0",
                        "Recommends": "ca-certificates, docker-ce-rootless-extras, git, pigz, procps, xz-utils",
                        "Conflicts": conflicts, "Replaces": "docker-engine"},
                files={"/usr/bin/dockerd": (src / "dockerd", 0o755),
                       "/usr/libexec/lab-docker/dockerd": (debian / "docker.io/usr/sbin/dockerd", 0o755),
                       "/usr/bin/docker-proxy": (debian / "docker.io/usr/sbin/docker-proxy", 0o755),
                       "/usr/bin/docker-init": (debian / "tini/usr/bin/tini-static", 0o755),
                       "/usr/lib/systemd/system/docker.service": (src / "docker.service", 0o644),
                       "/usr/lib/systemd/system/docker.socket": (src / "docker.socket", 0o644)},
                scripts={"postinst": group + enable}),
    ]


def containerd_package(debian: Path) -> Package:
    version = f"{CONTAINERD_VERSION}-1~debian.{DEBIAN_MAJOR}~{CODENAME}"
    binaries = ("containerd", "containerd-shim", "containerd-shim-runc-v1", "containerd-shim-runc-v2", "ctr")
    files: dict[str, tuple[bytes | Path, int]] = {
        f"/usr/bin/{name}": (debian / "containerd/usr/bin" / name, 0o755) for name in binaries}
    files["/usr/bin/runc"] = (debian / "runc/usr/sbin/runc", 0o755)
    files["/etc/containerd/config.toml"] = (_text('disabled_plugins = ["cri"]'), 0o644)
    files["/usr/lib/systemd/system/containerd.service"] = (debian / "containerd/usr/lib/systemd/system/containerd.service",
                                                           0o644)
    return Package("containerd.io", version, "An open and reliable container runtime (lab: Debian's containerd, runc)",
                   fields={"Depends": "libc6 (>= 2.34), libseccomp2 (>= 2.4.0)", "Conflicts": "containerd, runc",
                           "Replaces": "containerd, runc", "Provides": "containerd, runc"},
                   files=files, scripts={"postinst": _enable_start("containerd.service")})


def kernel_package(release: str) -> Package:
    """Headers of the kernel the lab hosts share with this machine, which Debian's archive lacks."""
    return Package(f"linux-headers-{release}", "1.0-lab1", f"Header files of Linux {release} (lab stand-in)",
                   fields={"Section": "kernel"},
                   files={f"/usr/src/linux-headers-{release}/Makefile": (_text(f"# Linux {release} (lab)"), 0o644)},
                   links={f"/lib/modules/{release}/build": f"/usr/src/linux-headers-{release}"})


# ---------------------------------------------------------------------- building
def fetch_debian(base_image: str) -> Path:
    """Debian's Docker packages of the lab hosts' release, downloaded once and unpacked."""
    cache = STATE / "debian" / base_image.replace(":", "_")
    if (cache / ".complete").exists():
        return cache
    shutil.rmtree(cache, ignore_errors=True)
    downloads = cache / "debs"
    downloads.mkdir(parents=True)
    print(f"lab: downloading Debian {CODENAME}'s {', '.join(DEBIAN_SOURCES)} for the lab Docker CE",
          file=sys.stderr, flush=True)
    run(["docker", "run", "--rm", "-v", f"{downloads}:/out", "-w", "/out", base_image, "sh", "-c",
         "apt-get update -qq && apt-get download -q " + " ".join(DEBIAN_SOURCES)])
    for name in DEBIAN_SOURCES:
        found = sorted(downloads.glob(f"{name}_*.deb"))
        if not found:
            raise RepoError(f"apt-get download did not fetch {name}")
        run(["dpkg-deb", "-x", str(found[-1]), str(cache / name)])
    (cache / ".complete").touch()
    return cache


def ensure_key() -> tuple[Path, str]:
    """The lab signing key (generated once, kept in .lab/pkg-repo/gnupg) and its fingerprint."""
    home = STATE / "gnupg"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet"]

    def fingerprint() -> str | None:
        out = subprocess.run(gpg + ["--with-colons", "--list-secret-keys"], capture_output=True,
                             check=False).stdout.decode()
        return next((line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")), None)

    fpr = fingerprint()
    if fpr is None:
        run(gpg + ["--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key", KEY_UID,
                   "ed25519", "sign", "never"])
        fpr = fingerprint()
        if fpr is None:
            raise RepoError("gpg made no key; see gpg's output above")
    return home, fpr


def sign(home: Path, fpr: str, directory: Path) -> None:
    """Release, then InRelease and Release.gpg from it, in ``directory``."""
    gpg = ["gpg", "--homedir", str(home), "--batch", "--yes", "--quiet", "--local-user", fpr, "--digest-algo", "SHA512"]
    run(gpg + ["--clearsign", "-o", str(directory / "InRelease"), str(directory / "Release")])
    run(gpg + ["--armor", "--detach-sign", "-o", str(directory / "Release.gpg"), str(directory / "Release")])


def release(directory: Path, **fields: str) -> None:
    opts = []
    for key, value in fields.items():
        opts += ["-o", f"APT::FTPArchive::Release::{key}={value}"]
    text = run(["apt-ftparchive", *opts, "release", "."], cwd=directory).stdout
    (directory / "Release").write_bytes(text)


def packages_index(repo_root: Path, pool: str, target: Path) -> None:
    text = run(["apt-ftparchive", "packages", pool], cwd=repo_root).stdout
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text)
    run(["gzip", "-9kf", str(target)])


def flat_repo(directory: Path, debs: list[Path], label: str, home: Path, fpr: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.move(str(deb), directory / deb.name)
    packages_index(directory, ".", directory / "Packages")
    release(directory, Origin=label, Label=label, Architectures=ARCH)
    sign(home, fpr, directory)


def recipe() -> str:
    if shutil.which("apt-ftparchive") is None:
        raise RepoError("apt-ftparchive is missing (package apt-utils): run scripts/bootstrap.sh")
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted((FIXTURES / "gpu" / "packages").iterdir()) + sorted((FIXTURES / "docker-ce").iterdir()) \
            + [FIXTURES / "gpu" / "nvidia-smi"]:
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update(os.uname().release.encode())
    return digest.hexdigest()[:12]


def build(base_image: str) -> Path:
    """The served directory, built when its recipe changed."""
    www = STATE / "www"
    digest = recipe()
    stamp = STATE / "www.digest"
    if www.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        return www
    started = time.monotonic()
    debian = fetch_debian(base_image)
    home, fpr = ensure_key()
    key = run(["gpg", "--homedir", str(home), "--batch", "--armor", "--export", fpr]).stdout
    staging = Path(tempfile.mkdtemp(prefix="www-", dir=STATE))
    try:
        with tempfile.TemporaryDirectory(prefix="debs-", dir=STATE) as tmp:
            out = Path(tmp)

            def debs(packages: list[Package]) -> list[Path]:
                return [build_deb(p, out) for p in packages]

            # NVIDIA's CUDA repository: <url>/debian13/x86_64/, its key file beside the index.
            cuda = staging / "cuda" / "repos" / f"debian{DEBIAN_MAJOR}" / "x86_64"
            flat_repo(cuda, debs([p for b, v in DRIVERS.items() for p in nvidia_packages(b, v)]),
                      "NVIDIA CUDA (aphrodite lab)", home, fpr)
            (cuda / "3bf863cc.pub").write_bytes(key)
            # NVIDIA's container toolkit: <url>/deb/amd64/, the key at a URL of its own.
            toolkit = staging / "libnvidia-container" / "stable"
            flat_repo(toolkit / "deb" / ARCH, debs([p for v in TOOLKIT_VERSIONS for p in toolkit_packages(v)]),
                      "NVIDIA container toolkit (aphrodite lab)", home, fpr)
            # As at nvidia.github.io: the key beside the channels, not inside one.
            (toolkit.parent / "gpgkey").write_bytes(key)
            # Docker's repository: <url>/debian/dists/trixie/stable, its key at <url>/debian/gpg.
            docker = staging / "docker" / "linux" / "debian"
            pool = docker / "pool" / "stable" / ARCH
            pool.mkdir(parents=True)
            for deb in debs([containerd_package(debian)] + [p for v in DOCKER_VERSIONS
                                                            for p in docker_packages(v, debian)]):
                shutil.move(str(deb), pool / deb.name)
            dist = docker / "dists" / CODENAME
            packages_index(docker, "pool/stable", dist / "stable" / f"binary-{ARCH}" / "Packages")
            release(dist, Origin="Docker", Label="Docker CE (aphrodite lab)", Suite=CODENAME, Codename=CODENAME,
                    Components="stable", Architectures=ARCH)
            sign(home, fpr, dist)
            (docker / "gpg").write_bytes(key)
            # The running kernel's headers: part of the distribution's archive on a real server.
            flat_repo(staging / "kernel", debs([kernel_package(os.uname().release)]),
                      "Linux headers (aphrodite lab)", home, fpr)
            (staging / "kernel" / "key.asc").write_bytes(key)
        shutil.rmtree(www, ignore_errors=True)
        staging.chmod(0o755)
        staging.rename(www)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stamp.write_text(digest + "\n")
    print(f"lab: built the package repository in {time.monotonic() - started:.0f} s -> {www}",
          file=sys.stderr, flush=True)
    return www


# ----------------------------------------------------------------------- serving
RUN = STATE / "run"


def daemon_pid(pidfile: Path) -> int | None:
    """The process ``pidfile`` names, if it still runs (the lab's daemons: this server, the apt cache)."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_daemon(pidfile: Path) -> None:
    """SIGTERM to the process ``pidfile`` names; waits up to 10 s for it to end."""
    pid = daemon_pid(pidfile)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while daemon_pid(pidfile) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def _server_pid() -> int | None:
    return daemon_pid(RUN / "pid")


def stop() -> None:
    stop_daemon(RUN / "pid")


def local_addresses() -> set[str]:
    """This machine's IPv4 addresses (``ip -4 -o addr``)."""
    proc = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False)
    return set(re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", proc.stdout))


def addresses_to_bind(running: bool, binds: Path, gateways: list[str]) -> list[str] | None:
    """What a lab daemon (this server, the apt cache) must bind, or None when it can keep running.

    A running daemon keeps the gateways it was started with: a listening socket survives its
    network being removed and made again with the same gateway.  So it restarts only for a
    gateway it does not bind yet, and then binds the old ones too (those still on this
    machine), so labs running beside this one never lose it except for that restart.
    """
    if running and binds.exists():
        bound = binds.read_text().split()
        if set(gateways) <= set(bound):
            return None
        return sorted(set(gateways) | (set(bound) & local_addresses()))
    return sorted(set(gateways))


def ensure_served(www: Path, gateways: list[str]) -> None:
    """An HTTP server for ``www`` on each lab gateway (restarted only for a new gateway)."""
    if not gateways:
        raise RepoError("no lab network gateway to serve the package repository on")
    binds = RUN / "binds"
    gateways = addresses_to_bind(_server_pid() is not None, binds, gateways)
    if gateways is None:
        return
    stop()
    RUN.mkdir(parents=True, exist_ok=True)
    log = open(RUN / "log", "ab")  # noqa: SIM115 - handed to the daemon
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--dir", str(www), "--port", str(PORT)]
    for address in gateways:
        cmd += ["--bind", address]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    (RUN / "pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((gateways[0], PORT), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RepoError(f"the package repository does not answer on {gateways[0]}:{PORT}; "
                                f"see {RUN / 'log'}") from None
            time.sleep(0.2)
    binds.write_text(" ".join(gateways) + "\n")
    print(f"lab: package repository on {', '.join(gateways)} port {PORT}", file=sys.stderr, flush=True)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(directory: str, port: int, addresses: list[str]) -> int:
    handler = partial(_Handler, directory=directory)
    servers = [http.server.ThreadingHTTPServer((address, port), handler) for address in addresses]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build the repository if its recipe changed; print its directory")
    p_build.add_argument("--base-image", help="the lab's Debian base image (default: labctl's)")
    p_serve = sub.add_parser("serve", help="serve a directory over HTTP (labctl starts it)")
    p_serve.add_argument("--dir", required=True)
    p_serve.add_argument("--port", type=int, default=PORT)
    p_serve.add_argument("--bind", action="append", required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            base = args.base_image
            if not base:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                import labctl

                base = labctl.build_base(labctl.apt_mirror())
            print(build(base))
        elif args.cmd == "serve":
            return serve(args.dir, args.port, args.bind)
    except RepoError as exc:
        print(f"pkgrepo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
