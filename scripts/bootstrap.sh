#!/usr/bin/env bash
# Set up a fresh Debian machine for the lab and the tests: Debian packages,
# a Docker daemon, the pinned Python toolchain in .venv and the CLI.
# Safe to re-run: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bootstrap: %s\n' "$*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: the Docker engine, debootstrap for the host image,
# apt-cacher-ng (the labs' package cache, lab/labctl.py), apt-utils, the linters
# (shellcheck), promtool for the alert rule tests (package prometheus) and
# git.  Install only what is missing.
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v promtool >/dev/null || need+=(prometheus)
command -v git >/dev/null || need+=(git)
[ -x /usr/sbin/apt-cacher-ng ] || need+=(apt-cacher-ng)
command -v apt-ftparchive >/dev/null || need+=(apt-utils)  # indexes the lab package repository (lab/pkgrepo.py)
command -v ip >/dev/null || need+=(iproute2)  # labctl finds the lab networks' gateways with it
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # labctl runs its own apt-cacher-ng on the lab networks only; the packaged service
  # would listen on every interface of this machine.
  if [[ " ${need[*]} " == *" apt-cacher-ng "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now apt-cacher-ng >/dev/null 2>&1 || true
  fi
fi

# A Docker daemon: this machine may have no systemd, so start dockerd directly.
if ! docker info >/dev/null 2>&1; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl start docker
  else
    log "starting dockerd"
    as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/dockerd.log"; exit 1; }
fi

# The Python toolchain, pinned; reinstalled only when requirements change.
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the Python toolchain into .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
log "ready: $(.venv/bin/ansible --version | head -1), $(docker version -f 'docker {{.Server.Version}}')"
