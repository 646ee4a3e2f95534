# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Engine command lines, staged files and mounts for containers, from the planner's replicas."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_args import CONTAINER_FILES_DIR

_FILE_KEYS = ("source", "path", "kind", "sha256")


def _set(args: list, flag: str, value: str) -> None:
    if flag in args:
        position = args.index(flag)
        if position + 1 >= len(args) or args[position + 1].startswith("--"):
            raise AnsibleFilterError(f"engine argument {flag} has no value in {args!r}")
        args[position + 1] = value
    else:
        args.extend([flag, value])


def engine_container_argv(argv: Any, model_path: str, served_model_name: str, bind_address: str,
                          defaults: Mapping | None = None) -> list:
    """The planner's node arguments, for a container that loads the staged model.

    ``--model`` becomes the model's path inside the container and the model id is kept as
    ``--served-model-name`` (what clients ask for); ``--host`` is the node's private
    address unless the plan already binds one; each flag of ``defaults`` (the engine
    role's own, such as ``--shutdown-timeout``) is added unless the plan sets it.
    """
    if not isinstance(argv, (list, tuple)) or "--model" not in argv:
        raise AnsibleFilterError("engine_container_argv expects the argv of a replica from aphrodite.baremetal.host_replicas")
    args = [str(a) for a in argv]
    _set(args, "--model", str(model_path))
    if "--served-model-name" not in args:
        args.extend(["--served-model-name", str(served_model_name)])
    if "--host" not in args:
        if not bind_address:
            raise AnsibleFilterError("engine_container_argv needs the node's bind address; set aphrodite_bind_address")
        args.extend(["--host", str(bind_address)])
    if defaults is not None and not isinstance(defaults, Mapping):
        raise AnsibleFilterError(f"engine_container_argv defaults must be a mapping of flag to value, got {defaults!r}")
    for flag, value in (defaults or {}).items():
        if not str(flag).startswith("--"):
            raise AnsibleFilterError(f"engine_container_argv default {flag!r} must be a --flag")
        if flag not in args:
            args.extend([str(flag), str(value)])
    return args


def _checked_files(replica: Any) -> list:
    if not isinstance(replica, Mapping):
        raise AnsibleFilterError("expects a replica from aphrodite.baremetal.host_replicas")
    files = replica.get("files") or []
    for item in files:
        if not isinstance(item, Mapping) or any(not item.get(k) for k in _FILE_KEYS) or item["kind"] not in ("file", "dir"):
            raise AnsibleFilterError(
                f"replica {replica.get('name')} has a staged file entry {item!r}; each needs source, path, kind "
                f"(file or dir) and sha256, as aphrodite.baremetal.plan_fleet writes them"
            )
        path = str(item["path"])
        if path.startswith("/") or ".." in path.split("/") or "/" not in path:
            raise AnsibleFilterError(f"staged file path {path!r} of replica {replica.get('name')} must be <model>/<name>")
    return list(files)


def engine_staged_files(replicas: Any) -> list:
    """The files and directories the replicas' engine arguments name, each once (by path).

    Every entry keeps ``source`` (controller), ``path`` (under the staging directory),
    ``kind`` and ``sha256``, and gains ``dir``: the directory that must exist before it is
    copied (the entry itself for a directory, its parent for a file).
    """
    if not isinstance(replicas, (list, tuple)):
        raise AnsibleFilterError("engine_staged_files expects the list of aphrodite.baremetal.host_replicas")
    seen: dict = {}
    for replica in replicas:
        for item in _checked_files(replica):
            path = str(item["path"])
            if path in seen and seen[path]["sha256"] != item["sha256"]:
                raise AnsibleFilterError(f"staged file {path} has two contents in one plan; plan the fleet again")
            seen.setdefault(path, {**{k: item[k] for k in _FILE_KEYS},
                                   "dir": path if item["kind"] == "dir" else posixpath.dirname(path)})
    return [seen[path] for path in sorted(seen)]


def engine_file_mounts(replica: Any, files_dir: str) -> list:
    """Read-only bind mounts of the replica's staged files: ``<files_dir>/<model>`` at
    ``/engine-files/<model>``, where the planner's argv expects them. Empty without files."""
    if not files_dir or not str(files_dir).startswith("/"):
        raise AnsibleFilterError(f"engine_file_mounts needs engine_files_dir as an absolute path, got {files_dir!r}")
    tops = sorted({str(item["path"]).split("/", maxsplit=1)[0] for item in _checked_files(replica)})
    return [
        {"type": "bind", "source": f"{str(files_dir).rstrip('/')}/{top}", "target": f"{CONTAINER_FILES_DIR}/{top}",
         "read_only": True}
        for top in tops
    ]


def engine_files_digest(replica: Any) -> str:
    """One digest of the content of every file the replica stages ('' without files).

    It labels the container: a changed chat template or adapter keeps its path, so only
    the label tells Docker that the replica must be replaced to read it again.
    """
    files = sorted(_checked_files(replica), key=lambda item: str(item["path"]))
    if not files:
        return ""
    text = "\n".join(f"{item['path']} {item['sha256']}" for item in files)
    return hashlib.sha256(text.encode()).hexdigest()


def engine_stale_files(found: Any, staged: Any, files_dir: str) -> list:
    """What of ``found`` (paths under ``files_dir`` on a node) no staged entry accounts for.

    ``staged`` is the list of aphrodite.baremetal.engine_staged_files.  A staged file keeps
    its path and its parent directories; a staged directory keeps every file and directory
    of its source on the controller (walked here: copying a directory adds and updates but
    never removes).  Returns only the topmost stale paths (removing a directory removes what
    is inside), sorted: a model no longer run, an adapter dropped from lora-modules, a file
    deleted from a staged directory.
    """
    if not files_dir or not str(files_dir).startswith("/"):
        raise AnsibleFilterError(f"engine_stale_files needs engine_files_dir as an absolute path, got {files_dir!r}")
    if not isinstance(found, (list, tuple)) or not isinstance(staged, (list, tuple)):
        raise AnsibleFilterError("engine_stale_files expects the found paths and the list of engine_staged_files")
    root = posixpath.normpath(str(files_dir))
    keep = {root}

    def keep_with_parents(path: str) -> None:
        while path not in keep and path.startswith(root + "/"):
            keep.add(path)
            path = posixpath.dirname(path)

    for entry in staged:
        if not isinstance(entry, Mapping) or any(not entry.get(k) for k in _FILE_KEYS):
            raise AnsibleFilterError(f"engine_stale_files: {entry!r} is not an entry of engine_staged_files")
        target = posixpath.normpath(f"{root}/{entry['path']}")
        keep_with_parents(target)
        if entry["kind"] == "dir":
            source = str(entry["source"]).rstrip("/")
            for current, dirs, names in os.walk(source):
                relative = os.path.relpath(current, source)
                base = target if relative == "." else posixpath.join(target, relative.replace(os.sep, "/"))
                for name in dirs + names:
                    keep_with_parents(posixpath.join(base, name))
    stale: list = []
    for path in sorted(posixpath.normpath(str(p)) for p in found):
        if path in keep or not path.startswith(root + "/"):
            continue
        if stale and path.startswith(stale[-1] + "/"):
            continue  # inside a directory that goes as a whole
        stale.append(path)
    return stale


class FilterModule:
    """aphrodite.baremetal engine filters."""

    def filters(self) -> dict:
        return {
            "engine_container_argv": engine_container_argv,
            "engine_staged_files": engine_staged_files,
            "engine_file_mounts": engine_file_mounts,
            "engine_files_digest": engine_files_digest,
            "engine_stale_files": engine_stale_files,
        }
