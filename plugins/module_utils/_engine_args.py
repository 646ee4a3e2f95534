# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Engine arguments users choose: ``engine_args`` of a model and ``aphrodite_engine_args``.

Both are mappings of flag to value, keys with or without the leading ``--`` (``-`` for
short aliases such as ``tp``) and with ``_`` or ``-``::

    engine_args:
      enable-prefix-caching: true          # bare flag; false renders --no-enable-prefix-caching
      max-num-seqs: 256                    # one value
      chat-template: templates/llama3.jinja  # a controller file, staged and mounted read-only
      lora-modules: {sql: adapters/sql-lora} # name -> adapter directory, staged likewise
      compilation-config: {level: 3}       # JSON-valued flags take a mapping

Every flag is checked against the pinned release's table (:mod:`._engine_flags`) and
rendered the way its argparse reads it. Flags the plan owns are refused with the key that
sets them; values that change the plan's memory figures (``--kv-cache-dtype``,
``--enforce-eager``, ``--max-num-seqs``) become fields of the model request instead of
free arguments. Files live on the controller (relative to the inventory directory, like
``config``) and appear in the container under :data:`CONTAINER_FILES_DIR`.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ._engine_flags import (
    APHRODITE_CHAT_TEMPLATES,
    APHRODITE_FLAG_ALIASES,
    APHRODITE_FLAG_KINDS,
    APHRODITE_FLAGS,
    APHRODITE_VERSION,
)

# Where staged engine files appear inside every engine container (roles/engine mounts
# <engine_files_dir>/<model slug> here, read-only).
CONTAINER_FILES_DIR = "/engine-files"

# Flags the plan renders itself, with what to set instead (one clause each).
PLAN_OWNED = {
    "--model": "the model is the id (and source) of its aphrodite_models entry",
    "--served-model-name": "set served_model_name of the model in aphrodite_models",
    "--tensor-parallel-size": "set tensor_parallel_size of the model in aphrodite_models, or leave it to the planner",
    "--pipeline-parallel-size": "the planner chooses it (pipeline parallelism only when a model fits no single node)",
    "--max-model-len": "set max_model_len of the model in aphrodite_models",
    "--gpu-memory-utilization": "set gpu_memory_utilization of the model in aphrodite_models",
    "--quantization": "set quantization of the model in aphrodite_models",
    "--host": "the engine binds the node's aphrodite_bind_address (a host variable)",
    "--port": "the planner assigns ports (distinct per host from 2242)",
    "--nnodes": "the planner sets it for replicas that span nodes",
    "--node-rank": "the planner sets it for replicas that span nodes",
    "--master-addr": "the planner sets it for replicas that span nodes",
    "--master-port": "the planner sets it for replicas that span nodes",
    "--headless": "the planner sets it on the worker nodes of replicas that span nodes",
    "--api-key": "set engine_api_key from vault (vault_aphrodite_engine_api_key in inventories/prod); "
                 "it reaches the engine as an environment variable, never in argv",
    "--hf-token": "models are staged by the model_store role, which takes model_store_hf_token from vault; "
                  "engines run offline",
    "--ssl-keyfile": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--ssl-certfile": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--ssl-ca-certs": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--ssl-cert-reqs": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--ssl-ciphers": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--enable-ssl-refresh": "TLS ends at the edge: set haproxy_tls_certificate from vault",
    "--data-parallel-size": "set replicas of the model in aphrodite_models (each replica is its own engine "
                            "behind the edge)",
    "--device-ids": "the planner assigns each replica its GPUs",
    "--distributed-executor-backend": "the roles run replicas that span nodes without Ray",
    "--download-dir": "the model_store role stages the weights; the engine loads them from the staged path",
    "--config": "put the flags in engine_args instead of a config file",
    "--help": "leave it out",
    "--grpc": "the edge speaks HTTP to the engines",
    "--uds": "the edge reaches the engines over TCP",
    "--kv-cache-memory-bytes": "the plan sizes the KV cache from gpu_memory_utilization; set that instead",
    "--num-gpu-blocks-override": "the plan sizes the KV cache from gpu_memory_utilization; set that instead",
}
# Every other data-parallel flag points to replicas as well.
for _flag in APHRODITE_FLAGS:
    if _flag.startswith("--data-parallel-") and _flag not in PLAN_OWNED:
        PLAN_OWNED[_flag] = PLAN_OWNED["--data-parallel-size"]

# Flags whose value changes the plan's memory figures: (request field, model key).
REQUEST_FLAGS = {
    "--kv-cache-dtype": ("kv_cache_dtype", "kv_cache_dtype"),
    "--enforce-eager": ("enforce_eager", "enforce_eager"),
    "--max-num-seqs": ("max_num_seqs", None),
}

# Flags whose value is a controller file (or directory) that is staged onto the nodes.
# Values in the second element are passed through as they are (keywords, not paths).
FILE_FLAGS = {
    "--chat-template": "file",
    "--tool-parser-plugin": "file",
    "--reasoning-parser-plugin": "file",
    "--log-config-file": "file",
    "--generation-config": "dir",
}
_FILE_KEYWORDS = {"--generation-config": {"auto", "aphrodite"}}
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class EngineArgsError(ValueError):
    """An ``engine_args`` entry is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class EngineFile:
    """A controller file or directory staged for one model's engines."""

    source: str  # absolute path on the controller
    path: str  # relative to the model's staging directory (<slug>/...)
    kind: str  # "file" or "dir"
    sha256: str  # of the content (a directory: of its files' names and contents)

    def to_dict(self) -> dict:
        return {"source": self.source, "path": self.path, "kind": self.kind, "sha256": self.sha256}


@dataclass(frozen=True)
class ResolvedArgs:
    """``engine_args`` after checking: what the request gets and what argv gets."""

    argv: tuple = ()  # rendered flags and values, by flag name
    files: tuple = ()  # EngineFile, ...
    request: tuple = ()  # ((request field, value), ...) from REQUEST_FLAGS


# --------------------------------------------------------------------------- flag names


def normalize_flag(key: Any, where: str) -> tuple:
    """``(long flag, negated)`` for a key of ``engine_args``; ``negated`` for ``no-x`` keys."""
    if not isinstance(key, str) or not key.strip("-_ "):
        raise EngineArgsError(f"{where} has the key {key!r}; keys are engine flags such as enable-prefix-caching")
    text = key.strip()
    negated = False
    if re.match(r"^-?[a-z]{1,4}$", text) and ("-" + text.lstrip("-")) in APHRODITE_FLAG_ALIASES:
        flag = APHRODITE_FLAG_ALIASES["-" + text.lstrip("-")]
    else:
        flag = "--" + text.lstrip("-").replace("_", "-").lower()
    if flag not in APHRODITE_FLAGS and flag.startswith("--no-") and APHRODITE_FLAG_KINDS.get("--" + flag[5:]) == "bool":
        flag, negated = "--" + flag[5:], True
    if flag not in APHRODITE_FLAGS:
        close = difflib.get_close_matches(flag, sorted(f for f in APHRODITE_FLAGS if f.startswith("--")), n=1, cutoff=0.6)
        hint = f"the nearest known flag is {close[0]}" if close else "run `aphrodite run --help` of that release for the list"
        raise EngineArgsError(
            f"{where} sets {flag}, which aphrodite-engine {APHRODITE_VERSION} does not accept; {hint}"
        )
    if flag in PLAN_OWNED:
        raise EngineArgsError(f"{where} sets {flag}, which the plan owns; {PLAN_OWNED[flag]}")
    return flag, negated


def normalize(value: Any, where: str) -> dict:
    """``engine_args`` as ``{long flag: value}``; refuses a flag given twice under two spellings."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, Mapping):
        raise EngineArgsError(
            f"{where} must be a mapping of engine flag to value (for example enable-prefix-caching: true), "
            f"got {type(value).__name__}"
        )
    result: dict = {}
    spelled: dict = {}
    for key, item in value.items():
        flag, negated = normalize_flag(key, where)
        if flag in result:
            raise EngineArgsError(f"{where} sets {flag} twice (as {spelled[flag]!r} and {key!r}); keep one")
        if negated:
            if not isinstance(item, bool):
                raise EngineArgsError(f"{where} sets {key} to {item!r}; it takes true or false")
            item = not item
        result[flag] = item
        spelled[flag] = key
    return result


# --------------------------------------------------------------------------- values


def _scalar(flag: str, value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (Mapping, list, tuple)):
        raise EngineArgsError(
            f"{where} sets {flag} to {value!r}; {flag} takes one value (a string or a number)"
        )
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if not text:
        raise EngineArgsError(f"{where} sets {flag} to an empty string; give a value or leave {flag} out")
    if text.startswith("-") and not is_number(text):
        raise EngineArgsError(
            f"{where} sets {flag} to {text!r}; the engine would read a value that starts with - as another flag"
        )
    return text


def is_number(text: str) -> bool:
    """Whether an argv item is a number (a negative one is a value, not a flag)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def render(flag: str, value: Any, where: str) -> list:
    """The argv of one flag, by the kind the engine's argparse gives it."""
    kind = APHRODITE_FLAG_KINDS.get(flag, "value")
    if value is None:
        raise EngineArgsError(f"{where} sets {flag} to null; give a value or leave {flag} out")
    if kind in ("flag", "bool"):
        if not isinstance(value, bool):
            raise EngineArgsError(f"{where} sets {flag} to {value!r}; {flag} is a switch, give true or false")
        if value:
            return [flag]
        return ["--no-" + flag[2:]] if kind == "bool" else []
    if kind == "optional":
        if value is True:
            return [flag]
        if value is False:
            return []
        return [flag, _scalar(flag, value, where)]
    if isinstance(value, bool):
        raise EngineArgsError(f"{where} sets {flag} to {value}; {flag} takes a value, not true or false")
    if kind == "json":
        if isinstance(value, (Mapping, list)):
            return [flag, json.dumps(value, separators=(",", ":"), sort_keys=True)]
        return [flag, _scalar(flag, value, where)]
    if kind in ("list", "append"):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise EngineArgsError(f"{where} sets {flag} to an empty list; give values or leave {flag} out")
        values = [_scalar(flag, item, where) for item in items]
        return [flag] + values if kind == "list" else [part for v in values for part in (flag, v)]
    return [flag, _scalar(flag, value, where)]


def _positive_int(flag: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() or int(value) < 1:
        raise EngineArgsError(f"{where} sets {flag} to {value!r}; it must be a positive integer")
    return int(value)


# --------------------------------------------------------------------------- files


def _controller_path(flag: str, value: Any, where: str, inventory_dir: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise EngineArgsError(f"{where} sets {flag} to {value!r}; give the path of a file relative to the inventory directory")
    if os.path.isabs(value):
        return os.path.normpath(value)
    if not inventory_dir:
        raise EngineArgsError(
            f"{where} sets {flag} to {value}, a path relative to the inventory directory, which was not given; "
            f"make it an absolute path on the controller"
        )
    return os.path.normpath(os.path.join(inventory_dir, value))


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, or of a directory's relative names and file contents."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            digest.update(content_digest(full).encode())
    return digest.hexdigest()


def _stage(flag: str, value: Any, kind: str, where: str, inventory_dir: str | None, slug: str,
           relative: str | None = None) -> tuple:
    """``(EngineFile, container path)`` for a controller path given to ``flag``.

    It is staged as ``<slug>/<relative>``; by default ``<flag name>/<its base name>``.
    """
    source = _controller_path(flag, value, where, inventory_dir)
    exists = os.path.isfile(source) if kind == "file" else os.path.isdir(source)
    if not exists:
        what = "file" if kind == "file" else "directory"
        raise EngineArgsError(
            f"{where} sets {flag} to {value}, but {source} is not a {what} on the controller; "
            f"put the {what} there (paths are relative to the inventory directory) or fix the path"
        )
    relative = relative or f"{flag[2:]}/{os.path.basename(source.rstrip('/'))}"
    return EngineFile(source, f"{slug}/{relative}", kind, content_digest(source)), f"{CONTAINER_FILES_DIR}/{slug}/{relative}"


def _lora_modules(value: Any, where: str, inventory_dir: str | None, slug: str, taken: tuple = ()) -> tuple:
    """Adapters as ``name=path`` values (the edge reads the names) and their staged directories."""
    pairs: list = []
    if isinstance(value, Mapping):
        pairs = sorted(value.items(), key=lambda pair: str(pair[0]))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, str) and item.count("=") == 1:
                pairs.append(tuple(item.split("=")))
            elif isinstance(item, Mapping) and set(item) == {"name", "path"}:
                pairs.append((item["name"], item["path"]))
            else:
                raise EngineArgsError(
                    f"{where} lists the LoRA adapter {item!r}; give each as name=path or {{name: ..., path: ...}}, "
                    f"or lora-modules as a mapping of name to adapter directory"
                )
    else:
        raise EngineArgsError(
            f"{where} sets --lora-modules to {value!r}; give a mapping of adapter name to adapter directory "
            f"(for example lora-modules: {{sql: adapters/sql-lora}})"
        )
    if not pairs:
        raise EngineArgsError(f"{where} sets --lora-modules to no adapters; list some or leave it out")
    values, files, names = [], [], set()
    for name, path in pairs:
        name = str(name)
        if not _LORA_NAME.match(name):
            raise EngineArgsError(
                f"{where} names a LoRA adapter {name!r}; adapter names are what clients ask for, use letters, digits, "
                f". _ and - only"
            )
        if name in names:
            raise EngineArgsError(f"{where} names the LoRA adapter {name} twice; give each adapter its own name")
        if name in taken:
            raise EngineArgsError(
                f"{where} names a LoRA adapter {name}, which is already the name clients use for the base model; "
                f"give the adapter another name"
            )
        names.add(name)
        # The adapter directory itself becomes lora/<name>, whatever its controller name.
        staged, target = _stage("--lora-modules", path, "dir", where, inventory_dir, slug, f"lora/{name}")
        files.append(staged)
        values.append(f"{name}={target}")
    return ["--lora-modules"] + values, files


def _max_lora_rank_problem(files: list, rank: Any) -> str | None:
    """An adapter whose rank exceeds --max-lora-rank (the engine refuses to load it)."""
    limit = int(rank) if str(rank).isdigit() else 16  # the engine's default
    for staged in files:
        config = os.path.join(staged.source, "adapter_config.json")
        try:
            with open(config, encoding="utf-8") as handle:
                found = json.load(handle).get("r")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, int) and found > limit:
            name = staged.path.rsplit("/", maxsplit=1)[-1]
            return f"LoRA adapter {name} has rank {found} (adapter_config.json) above --max-lora-rank {limit}; " \
                   f"set max-lora-rank: {found} or more in engine_args"
    return None


# --------------------------------------------------------------------------- entry point


def resolve(fleet: Any, model: Any, model_id: str, slug: str, inventory_dir: str | None,
            model_keys: Mapping[str, Any] | None = None) -> ResolvedArgs:
    """Check and render a model's engine arguments: ``aphrodite_engine_args`` overlaid by its own.

    ``model_keys`` holds the entry's keys that a flag of :data:`REQUEST_FLAGS` may duplicate
    (``kv_cache_dtype``, ``enforce_eager``), a flag and its key that disagree are refused,
    and ``served_model_name``, which no LoRA adapter may take.
    Raises :class:`EngineArgsError` with one paragraph naming the flag and the fix.
    """
    fleet_where = "aphrodite_engine_args"
    model_where = f"engine_args of {model_id} in aphrodite_models"
    merged: dict = {}
    origin: dict = {}
    for where, value in ((fleet_where, fleet), (model_where, model)):
        for flag, item in normalize(value, where).items():
            merged[flag] = item  # the model's own value wins, per flag
            origin[flag] = where
    argv: list = []
    files: list = []
    request: list = []
    keys = model_keys or {}
    # Sorted: the same flags give the same argv whatever order the inventory (or
    # ansible-inventory's JSON) lists them in, so a re-ordered mapping replaces no replica.
    for flag, value in sorted(merged.items()):
        where = origin[flag]
        if flag in REQUEST_FLAGS:
            field, key = REQUEST_FLAGS[flag]
            if flag == "--max-num-seqs":
                checked: Any = _positive_int(flag, value, where)
            elif flag == "--enforce-eager":
                render(flag, value, where)  # a switch: true or false
                checked = value
            else:
                checked = _scalar(flag, value, where)
            given = keys.get(key) if key else None
            if given is not None and given != "" and str(given).lower() != str(checked).lower():
                raise EngineArgsError(
                    f"{model_id} sets {key}: {given} in aphrodite_models and {flag} {checked} in {where}; "
                    f"they disagree, keep one (the key)"
                )
            request.append((field, checked))
            continue
        if flag == "--lora-modules":
            taken = tuple(str(n) for n in (model_id, keys.get("served_model_name")) if n)
            rendered, staged = _lora_modules(value, where, inventory_dir, slug, taken)
            argv += rendered
            files += staged
            continue
        if flag in FILE_FLAGS and not (isinstance(value, str) and value in _FILE_KEYWORDS.get(flag, ())):
            if flag == "--chat-template" and isinstance(value, str) and ("{" in value or "}" in value or "\n" in value):
                argv += [flag, value]  # an inline template, not a path (the engine's own test)
                continue
            if (flag == "--chat-template" and value in APHRODITE_CHAT_TEMPLATES
                    and not os.path.isfile(_controller_path(flag, value, where, inventory_dir or "/nonexistent"))):
                argv += [flag, value]  # one of the templates the engine ships
                continue
            if flag == "--tool-parser-plugin" and value == "":
                continue
            staged, target = _stage(flag, value, FILE_FLAGS[flag], where, inventory_dir, slug)
            files.append(staged)
            argv += [flag, target]
            continue
        argv += render(flag, value, where)
    if any(path.path.startswith(f"{slug}/lora/") for path in files):
        if merged.get("--enable-lora") is False:
            raise EngineArgsError(
                f"{model_where} lists LoRA adapters (lora-modules) and sets enable-lora: false; drop one of them"
            )
        if "--enable-lora" not in merged:
            argv += ["--enable-lora"]
        problem = _max_lora_rank_problem([f for f in files if "/lora/" in f.path], merged.get("--max-lora-rank"))
        if problem:
            raise EngineArgsError(f"{model_id}: {problem}")
    return ResolvedArgs(tuple(argv), tuple(files), tuple(request))


def is_rendered_flag(arg: str) -> bool:
    """Whether ``arg`` is a flag of the pinned release, ``--no-x`` forms included."""
    if arg in APHRODITE_FLAGS:
        return True
    return arg.startswith("--no-") and APHRODITE_FLAG_KINDS.get("--" + arg[5:]) == "bool"
