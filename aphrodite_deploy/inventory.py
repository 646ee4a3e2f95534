"""Read an Ansible inventory and the fact cache without contacting any host.

The inventory is read in this process by Ansible itself (DataLoader, InventoryManager,
VariableManager, vault), the way ``ansible-playbook`` reads it, so that ``plan`` and the
preflight of ``site.yml`` template the same variables the same way and hand them to the
same function (``_core._plan_hosts.plan_from_hostvars``).
"""

from __future__ import annotations

import configparser
import glob
import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ._core._plan_hosts import ORIGIN, plan_from_hostvars
from ._core._plan_input import DEFAULT_HOSTS_GROUP, plan_inventory
from ._core._fleet_model import FleetModelError, from_hostvars
from ._core._planner import Plan


class InventoryError(RuntimeError):
    """The inventory or the fact cache cannot be read."""


# The expressions the preflight task evaluates on the first host of gpu_nodes
# (playbooks/preflight.yml, run_once); --objective overrides the second.
MODELS_EXPRESSION = "aphrodite_models | default([])"
OBJECTIVE_EXPRESSION = "aphrodite_objective | default('throughput')"
# Fleet-wide variables passed on to the planner when its entry takes them.
FLEET_OPTIONS = {"aphrodite_engine_args": "engine_args"}


@dataclass
class Inventory:
    """What the planner needs from an inventory, as the preflight's planning host sees it."""

    path: Path
    directory: Path  # inventory_dir of the planning host: where relative model config paths start
    hostvars: Any  # Ansible's HostVars: each host's variables, templated when read
    groups: dict[str, list[str]]
    models: list[Any]
    objective: str | None  # as the preflight passes it: None when the inventory sets it to null
    planning_host: str
    hosts: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Ansible:
    """ansible-core's classes, imported when an inventory is first read (other commands do without)."""

    _ready = False

    @classmethod
    def load(cls) -> None:
        if cls._ready:
            return
        from ansible import constants as C
        from ansible.inventory import manager
        from ansible.plugins.loader import init_plugin_loader

        init_plugin_loader(C.COLLECTIONS_PATHS)
        # Model configurations (models/<name>/config.json) sit in the inventory directory:
        # never inventory sources, whatever ansible.cfg says.
        if MODELS_DIR_PATTERN not in C.INVENTORY_IGNORE_PATTERNS:
            manager.IGNORED = re.compile(manager.IGNORED.pattern + b"|" + MODELS_DIR_PATTERN.encode())
        cls._ready = True


def _vault_secrets(loader: Any, password_files: list[str], password: str | None) -> list[tuple[str, Any]]:
    """The vault secrets ansible-playbook would use: given files (or scripts), the configured
    ``vault_password_file`` (ANSIBLE_VAULT_PASSWORD_FILE) and ``vault_identity_list`` files,
    and a password held in memory (APHRODITE_VAULT_PASSWORD)."""
    from ansible import constants as C
    from ansible.errors import AnsibleError
    from ansible.parsing.vault import VaultSecret, VaultSecretsContext, get_file_vault_secret

    sources: list[tuple[str | None, str]] = [(None, f) for f in password_files]
    if C.DEFAULT_VAULT_PASSWORD_FILE:
        sources.append((None, str(C.DEFAULT_VAULT_PASSWORD_FILE)))
    for identity in C.DEFAULT_VAULT_IDENTITY_LIST or []:
        name, _, where = str(identity).rpartition("@")
        if where not in ("prompt", "prompt_ask_vault_pass"):  # plan never prompts
            sources.append((name or None, where))
    secrets: list[tuple[str, Any]] = []
    if password is not None:
        secrets.append((C.DEFAULT_VAULT_IDENTITY, VaultSecret(password.encode())))
    for vault_id, filename in sources:
        try:
            secret = get_file_vault_secret(filename=filename, vault_id=vault_id, loader=loader)
            secret.load()
        except AnsibleError as exc:
            raise InventoryError(f"vault password file {filename} cannot be read: {exc}; "
                                 f"pass a readable --vault-password-file") from None
        secrets.append((vault_id or C.DEFAULT_VAULT_IDENTITY, secret))
    loader.set_vault_secrets(secrets)
    # Inline-vaulted values decrypt through this process-wide context when they are
    # templated (ansible-core 2.19); the CLI reads one inventory per process.
    VaultSecretsContext._current = VaultSecretsContext(secrets)
    return secrets


def _ansible_message(exc: BaseException) -> str:
    message = " ".join(str(getattr(exc, "message", None) or exc).split()).rstrip(".")
    where = _origin(getattr(exc, "obj", None))
    if where:
        message += f" (in {where})"
    if "vault" in message.lower() or "decrypt" in message.lower():
        message += "; pass --vault-password-file or set APHRODITE_VAULT_PASSWORD (or ANSIBLE_VAULT_PASSWORD_FILE)"
    return message


def _origin(value: Any) -> str | None:
    """``file:line`` of an inventory value, where ansible-core recorded it."""
    try:
        from ansible._internal._datatag._tags import Origin  # no public accessor in ansible-core 2.19
    except ImportError:
        return None
    origin = Origin.get_tag(value) if value is not None else None
    if origin is None or not origin.path:
        return None
    return f"{origin.path}:{origin.line_num}" if origin.line_num else origin.path


def _planning_host(inventory: Any) -> Any:
    """The host the preflight plans on: run_once takes the first host of gpu_nodes in play order."""
    hosts = inventory.get_hosts(DEFAULT_HOSTS_GROUP) if DEFAULT_HOSTS_GROUP in inventory.groups else []
    if not hosts:  # no gpu_nodes: the planner says so for models that do not name their hosts
        hosts = inventory.get_hosts("all")
    if not hosts:
        raise InventoryError("the inventory has no hosts; list the GPU hosts in group gpu_nodes")
    return hosts[0]


def read_inventory(path: str | os.PathLike[str], vault_password_file: str | None = None,
                   vault_password: str | None = None, basedir: str | os.PathLike[str] | None = None) -> Inventory:
    """Read the inventory with Ansible and the fleet variables as the preflight task sees them.

    ``basedir`` is the playbook directory (play-adjacent group_vars and host_vars load from
    it, as in ``ansible-playbook``); the hosts' own variables are templated later, when
    the planner reads them.
    """
    inventory_path = Path(path)
    if not inventory_path.exists():
        raise InventoryError(f"inventory {inventory_path} does not exist")
    if vault_password_file and vault_password:
        raise InventoryError("the vault password comes from --vault-password-file or from APHRODITE_VAULT_PASSWORD, "
                             "not both; unset APHRODITE_VAULT_PASSWORD or leave out --vault-password-file")
    if vault_password_file and not Path(vault_password_file).expanduser().is_file():
        raise InventoryError(f"vault password file {vault_password_file} does not exist")
    _Ansible.load()
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import cache_loader
    from ansible.template import Templar, trust_as_template
    from ansible.vars.hostvars import HostVars
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    if basedir is not None:
        loader.set_basedir(str(basedir))
    try:
        _vault_secrets(loader, [str(Path(vault_password_file).expanduser())] if vault_password_file else [],
                       vault_password)
        manager = InventoryManager(loader=loader, sources=[str(inventory_path)])
        variables = VariableManager(loader=loader, inventory=manager)
        # Gathered facts come from read_fact_cache(), read-only and checked against their
        # origin; Ansible's cache plugin would hand them over unchecked (and delete entries
        # it cannot decode).
        variables._fact_cache = cache_loader.get("ansible.builtin.memory")
        hostvars = HostVars(manager, variables, loader)
        host = _planning_host(manager)
        context = variables.get_vars(host=host, include_hostvars=True)
        templar = Templar(loader=loader, variables=context)
        models = templar.evaluate_expression(trust_as_template(MODELS_EXPRESSION))
        objective = templar.evaluate_expression(trust_as_template(OBJECTIVE_EXPRESSION))
        accepted = inspect.signature(plan_inventory).parameters
        options = {name: templar.evaluate_expression(trust_as_template(variable))
                   for variable, name in FLEET_OPTIONS.items() if name in accepted and variable in context}
        notes = _differing_models(manager, variables, host, context.get("aphrodite_models"))
    except AnsibleError as exc:
        raise InventoryError(f"Ansible could not read inventory {inventory_path}: {_ansible_message(exc)}") from None
    if not models:
        raise InventoryError(
            f"{host.name} (the first host of {DEFAULT_HOSTS_GROUP}, where the preflight plans) has no aphrodite_models; "
            f"define the models in group_vars/all (id and config for each, see docs)"
        )
    if not isinstance(models, list):
        raise InventoryError(f"aphrodite_models of {host.name} must be a list, got {type(models).__name__}")
    directory = Path(str(context.get("inventory_dir") or (inventory_path if inventory_path.is_dir()
                                                          else inventory_path.parent)))
    return Inventory(inventory_path, directory.resolve(), hostvars, _groups(context["groups"]), list(models),
                     None if objective is None else str(objective), host.name, [h.name for h in manager.get_hosts("all")], options, notes)


def _groups(groups: Mapping[str, Any]) -> dict[str, list[str]]:
    return {str(name): [str(h) for h in members] for name, members in groups.items()}


def _differing_models(manager: Any, variables: Any, host: Any, models: Any) -> list[str]:
    """A note per GPU host whose aphrodite_models (as written, untemplated) differs from the planning host's."""
    notes = []
    group = manager.groups.get(DEFAULT_HOSTS_GROUP)
    for other in (group.get_hosts() if group else []):
        if other.name == host.name:
            continue
        value = variables.get_vars(host=other, include_hostvars=False).get("aphrodite_models")
        if value is not None and value != models:
            notes.append(f"aphrodite_models of {other.name} differs from {host.name}'s; the plan (as the preflight's) "
                         f"uses {host.name}'s: define it once, in group_vars/all")
    return notes


def plan(inventory: Inventory, objective: str | None = None, gathered: Mapping[str, Any] | None = None) -> tuple:
    """``(plan, hosts planned from gathered facts)``: the function the plan_fleet filter calls, on the
    inventory's hostvars. Raises PlanError when infeasible, InventoryError when a variable the
    planner reads cannot be templated."""
    from ansible.errors import AnsibleError

    try:
        result: tuple[Plan, list[str]] = plan_from_hostvars(
            inventory.models, inventory.hostvars, inventory.groups, str(inventory.directory),
            objective or inventory.objective, gathered, **inventory.options)
    except AnsibleError as exc:
        raise InventoryError(f"a variable the planner reads cannot be templated: {_ansible_message(exc)}") from None
    return result


def fleet(inventory: Inventory, planned: Plan) -> dict[str, Any]:
    """The fleet model of ``planned`` on the inventory: what ``hostvars['localhost'].aphrodite_fleet``
    holds in a run (playbooks/fleet_model.yml calls the same function).  Raises InventoryError
    when the inventory's addresses, ports or edge settings are invalid."""
    from ansible.errors import AnsibleError

    try:
        return from_hostvars(planned.to_dict(), inventory.hostvars, inventory.groups)
    except FleetModelError as exc:
        raise InventoryError(f"the fleet model: {exc}") from None
    except AnsibleError as exc:
        raise InventoryError(f"a variable the fleet model reads cannot be templated: {_ansible_message(exc)}") from None


# Model configurations live in the inventory directory (``models/<name>/config.json``);
# Ansible would otherwise read those JSON files as inventory sources.
MODELS_DIR_PATTERN = "^models$"


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
    """Per host, its cached ``aphrodite_gpus`` with the record of where they were gathered
    (``aphrodite_gpus_origin``) and the file (``source``); notes on what was skipped.

    Whether the facts belong to this inventory's host is decided by the planner's entry
    (``plan_from_hostvars``), as in the playbook. Read-only: unlike Ansible's cache plugin,
    a corrupt or stale file is reported, never removed.
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
        if not isinstance(facts, dict):
            continue
        nested = facts.get("ansible_facts") if isinstance(facts.get("ansible_facts"), dict) else {}
        gpus = facts.get("aphrodite_gpus", nested.get("aphrodite_gpus"))
        if gpus is not None:
            found[host] = {"aphrodite_gpus": gpus, ORIGIN: facts.get(ORIGIN, nested.get(ORIGIN)), "source": str(path)}
    return found, notes
