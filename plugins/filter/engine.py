# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Engine command lines for containers, from the planner's arguments."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError


def _set(args: list, flag: str, value: str) -> None:
    if flag in args:
        position = args.index(flag)
        if position + 1 >= len(args) or args[position + 1].startswith("--"):
            raise AnsibleFilterError(f"engine argument {flag} has no value in {args!r}")
        args[position + 1] = value
    else:
        args.extend([flag, value])


def engine_container_argv(argv: Any, model_path: str, served_model_name: str, bind_address: str) -> list:
    """The planner's node arguments, for a container that loads the staged model.

    ``--model`` becomes the model's path inside the container and the model id is kept as
    ``--served-model-name`` (what clients ask for); ``--host`` is the node's private
    address unless the plan already binds one. Flags are never added beyond these three,
    all of which exist in the pinned engine release.
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
    return args


class FilterModule:
    """aphrodite.baremetal engine filters."""

    def filters(self) -> dict:
        return {"engine_container_argv": engine_container_argv}
