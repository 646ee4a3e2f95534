"""Read an Ansible inventory and the fact cache without contacting any host."""

from __future__ import annotations

import configparser
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class InventoryError(RuntimeError):
    """The inventory or the fact cache cannot be read."""


@dataclass
class Inventory:
    """What the planner needs from an inventory."""

    path: Path
    directory: Path  # where relative model config paths start
    hostvars: dict[str, dict[str, Any]]
    groups: dict[str, list[str]]
    models: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def _ansible_inventory() -> str:
    beside = Path(sys.executable).parent / "ansible-inventory"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ansible-inventory")
    if not found:
        raise InventoryError("ansible-inventory was not found; install ansible-core (pip install 'ansible-core>=2.19')")
    return found


def _group_hosts(data: dict[str, Any]) -> dict[str, list[str]]:
    """Every group's hosts, children's hosts included, in inventory order."""
    groups = {name: value for name, value in data.items() if name != "_meta" and isinstance(value, dict)}
    resolved: dict[str, list[str]] = {}

    def hosts_of(name: str, seen: tuple[str, ...]) -> list[str]:
        if name in resolved:
            return resolved[name]
        entry = groups.get(name, {})
        hosts = list(entry.get("hosts", []))
        for child in entry.get("children", []):
            if child not in seen:
                hosts.extend(h for h in hosts_of(child, seen + (child,)) if h not in hosts)
        resolved[name] = hosts
        return hosts

    for name in groups:
        hosts_of(name, (name,))
    return resolved


def read_inventory(path: str | os.PathLike[str], vault_password_file: str | None = None) -> Inventory:
    """Run ``ansible-inventory --list`` (group_vars and host_vars included) and collect
    the hosts' variables, the groups and ``aphrodite_models``."""
    inventory = Path(path)
    if not inventory.exists():
        raise InventoryError(f"inventory {inventory} does not exist")
    command = [_ansible_inventory(), "-i", str(inventory), "--list"]
    if vault_password_file:
        command += ["--vault-password-file", vault_password_file]
    # The fact cache is read by read_fact_cache(), read-only; Ansible's own plugin would
    # merge it into hostvars and delete entries it cannot decode.
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_WARNING="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_INVENTORY_IGNORE_REGEX=",".join(inventory_ignore_patterns()),
               ANSIBLE_CACHE_PLUGIN="ansible.builtin.memory")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else "no output"
        if "vault" in reason.lower():
            reason += "; pass --vault-password-file or set ANSIBLE_VAULT_PASSWORD_FILE"
        raise InventoryError(f"ansible-inventory could not read {inventory}: {reason}")
    try:
        data = json.loads(result.stdout)
    except ValueError as exc:
        raise InventoryError(f"ansible-inventory printed no JSON for {inventory}: {exc}")
    hostvars = data.get("_meta", {}).get("hostvars", {})
    groups = _group_hosts(data)
    for host in hostvars:
        groups.setdefault("all", [])
        if host not in groups["all"]:
            groups["all"].append(host)
    models, notes = _models(hostvars, groups)
    directory = inventory if inventory.is_dir() else inventory.parent
    return Inventory(inventory, directory.resolve(), hostvars, groups, models, notes)


def _models(hostvars: dict[str, dict[str, Any]], groups: dict[str, list[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``aphrodite_models`` as the hosts see it; it must be the same for every host."""
    order = list(groups.get("gpu_nodes", [])) + [h for h in hostvars if h not in groups.get("gpu_nodes", [])]
    found: list[tuple[str, Any]] = [(h, hostvars[h]["aphrodite_models"]) for h in order
                                    if h in hostvars and "aphrodite_models" in hostvars[h]]
    if not found:
        raise InventoryError(
            "no host of the inventory has aphrodite_models; define the models in group_vars/all "
            "(id and config for each, see docs)"
        )
    host, models = found[0]
    for other, value in found[1:]:
        if value != models:
            raise InventoryError(
                f"aphrodite_models differs between {host} and {other}; define it once, in group_vars/all"
            )
    if not isinstance(models, list):
        raise InventoryError(f"aphrodite_models of {host} must be a list, got {type(models).__name__}")
    return models, []


def fleet_engine_args(hostvars: dict[str, dict[str, Any]], groups: dict[str, list[str]]) -> Any:
    """``aphrodite_engine_args`` as the GPU nodes see it (the playbook plans on one of them);
    it must be the same for every GPU node, unset included. ``None`` when no host sets it."""
    order = [h for h in (groups.get("gpu_nodes") or list(hostvars)) if h in hostvars]
    found = [(h, hostvars[h].get("aphrodite_engine_args")) for h in order]
    if not found:
        return None
    host, value = found[0]
    for other, other_value in found[1:]:
        if other_value != value:
            raise InventoryError(
                f"aphrodite_engine_args differs between {host} and {other}; define it once, in group_vars/all, "
                f"and put per-model flags in engine_args of the model in aphrodite_models"
            )
    return value


# Model configurations live in the inventory directory (``models/<name>/config.json``);
# Ansible would otherwise read those JSON files as inventory sources.
MODELS_DIR_PATTERN = "^models$"


def inventory_ignore_patterns() -> list[str]:
    """The configured inventory ignore patterns plus the models directory."""
    value = os.environ.get("ANSIBLE_INVENTORY_IGNORE_REGEX")
    if value is None:
        cfg = _read_cfg()
        if cfg is not None:
            value = cfg.get("inventory", "ignore_patterns", fallback=None) or cfg.get(
                "defaults", "inventory_ignore_patterns", fallback=None)
    patterns = [p.strip() for p in (value or "").split(",") if p.strip()]
    return patterns + ([MODELS_DIR_PATTERN] if MODELS_DIR_PATTERN not in patterns else [])


def _read_cfg() -> configparser.ConfigParser | None:
    path = ansible_cfg()
    if path is None:
        return None
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(path)
    except configparser.Error:
        return None
    return parser


# --------------------------------------------------------------------------- fact cache


def ansible_cfg(workdir: Path | None = None) -> Path | None:
    """The ansible.cfg that Ansible would use when run in ``workdir`` (default: here), in its own search order."""
    local = str(workdir / "ansible.cfg") if workdir else "ansible.cfg"
    candidates = [os.environ.get("ANSIBLE_CONFIG"), local, "~/.ansible.cfg", "/etc/ansible/ansible.cfg"]
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            path = path / "ansible.cfg"
        if path.is_file():
            return path.resolve()
    return None


@dataclass
class FactCache:
    """Where Ansible's jsonfile fact cache lives and how it names and expires entries."""

    directory: Path
    prefix: str = ""
    timeout: int = 86400  # seconds; 0 never expires


def default_fact_cache() -> FactCache | None:
    """The jsonfile fact cache configured by the environment or ansible.cfg, if any."""
    plugin = os.environ.get("ANSIBLE_CACHE_PLUGIN")
    connection = os.environ.get("ANSIBLE_CACHE_PLUGIN_CONNECTION")
    timeout = os.environ.get("ANSIBLE_CACHE_PLUGIN_TIMEOUT")
    prefix = os.environ.get("ANSIBLE_CACHE_PLUGIN_PREFIX")
    base = Path.cwd()
    cfg_path = ansible_cfg()
    parser = _read_cfg()
    if cfg_path is not None and parser is not None and parser.has_section("defaults"):
        plugin = plugin or parser.get("defaults", "fact_caching", fallback=None)
        if connection is None:
            connection = parser.get("defaults", "fact_caching_connection", fallback=None)
            base = cfg_path.parent  # relative paths in ansible.cfg start at its directory
        timeout = timeout or parser.get("defaults", "fact_caching_timeout", fallback=None)
        prefix = prefix if prefix is not None else parser.get("defaults", "fact_caching_prefix", fallback=None)
    if not connection or (plugin and plugin.split(".")[-1] != "jsonfile"):
        return None
    path = Path(os.path.expandvars(connection)).expanduser()
    if not path.is_absolute():
        path = base / path
    try:
        seconds = int(timeout) if timeout else 86400
    except ValueError:
        seconds = 86400
    return FactCache(path, prefix or "", seconds)


def _plain(value: Any) -> Any:
    """Ansible's cache encoding of tagged values, unwrapped to plain JSON data.

    ansible-core 2.19 writes ``{"value": ..., "tags": [...], "__ansible_type": "_AnsibleTaggedStr"}``;
    older releases wrote ``{"__ansible_unsafe": ...}``. Vaulted values are left out.
    """
    if isinstance(value, dict):
        if "__ansible_type" in value:
            return _plain(value["value"]) if "value" in value else None
        if len(value) == 1 and ("__ansible_unsafe" in value or "__ansible_vault" in value):
            return _plain(value["__ansible_unsafe"]) if "__ansible_unsafe" in value else None
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _cache_file(cache: FactCache, host: str) -> Path | None:
    """The newest cache file of ``host``: schema-qualified (``s1_gpu1``, ansible-core 2.19) or legacy (``gpu1``)."""
    exact = re.compile(rf"{re.escape(cache.prefix)}s\d+_{re.escape(host)}")
    candidates = [p for p in cache.directory.glob(f"{glob.escape(cache.prefix)}s[0-9]*_{glob.escape(host)}")
                  if exact.fullmatch(p.name)]
    legacy = cache.directory / f"{cache.prefix}{host}"
    if legacy.is_file():
        candidates.append(legacy)
    files = [p for p in candidates if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def read_fact_cache(cache: FactCache | None, hosts: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``aphrodite_gpus`` facts per host from a jsonfile fact cache; notes on what was skipped.

    Read-only: unlike Ansible's cache plugin, a corrupt or stale file is reported, never removed.
    """
    found: dict[str, Any] = {}
    notes: list[str] = []
    if cache is None or not cache.directory.is_dir():
        return found, notes
    now = time.time()
    for host in hosts:
        path = _cache_file(cache, host)
        if path is None:
            continue
        if cache.timeout > 0 and now - path.stat().st_mtime > cache.timeout:
            notes.append(f"{host}: cached facts in {path} are older than fact_caching_timeout ({cache.timeout} s); ignored")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("__payload__"), str):
                data = json.loads(data["__payload__"])
        except (OSError, ValueError) as exc:
            notes.append(f"{host}: cannot read cached facts {path}: {exc}; ignored")
            continue
        facts = _plain(data)
        gpus = facts.get("aphrodite_gpus") if isinstance(facts, dict) else None
        if gpus is None and isinstance(facts, dict) and isinstance(facts.get("ansible_facts"), dict):
            gpus = facts["ansible_facts"].get("aphrodite_gpus")
        if gpus is not None:
            found[host] = gpus
    return found, notes
