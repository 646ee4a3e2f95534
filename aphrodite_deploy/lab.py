"""``aphrodite-deploy lab up|down|status``: the local lab of ``lab/labctl.py``, from a checkout.

``up`` starts the hosts of ``inventories/lab`` (labctl builds what it needs) and, unless
``--no-deploy``, converges them with ``deploy`` (``make lab`` without the bootstrap);
``down`` removes the lab named ``lab`` only (never Molecule's labs, unlike
``make lab-down``); ``status`` lists the lab's hosts.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

LAB_NAME = "lab"


class LabError(RuntimeError):
    """The lab cannot be reached or changed."""


def labctl_path(project_dir: Path) -> Path:
    path = project_dir / "lab" / "labctl.py"
    if not path.is_file():
        raise LabError(f"{path} does not exist: the lab needs a checkout of aphrodite.baremetal (--project-dir)")
    return path


def run_labctl(project_dir: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """labctl's own command line; its output goes to stderr unless captured."""
    command = [sys.executable, str(labctl_path(project_dir)), *args]
    if capture:
        return subprocess.run(command, cwd=project_dir, capture_output=True, text=True, check=False)
    return subprocess.run(command, cwd=project_dir, stdout=sys.stderr, stderr=sys.stderr, text=True, check=False)


def _load_labctl(project_dir: Path) -> ModuleType:
    path = labctl_path(project_dir)
    spec = importlib.util.spec_from_file_location("aphrodite_labctl", path)
    if spec is None or spec.loader is None:
        raise LabError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def lab_hosts(project_dir: Path, lab: str = LAB_NAME) -> dict[str, Any]:
    """The lab's hosts: those the inventory declares and those Docker runs, with their state."""
    labctl = _load_labctl(project_dir)
    try:
        declared, subnet = labctl.inventory_hosts()
        running = labctl.lab_containers(lab)
    except Exception as exc:  # labctl raises LabError, docker may be missing
        raise LabError(str(exc)) from None
    hosts = []
    names = [h.name for h in declared] + [n for n in sorted(running) if n not in {h.name for h in declared}]
    groups = {h.name: h.groups for h in declared}
    addresses = {h.name: h.address for h in declared}
    for name in names:
        entry: dict[str, Any] = {"name": name, "groups": groups.get(name, []), "address": addresses.get(name),
                                 "container": "absent", "systemd": None}
        if name in running:
            fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} {{.State.Status}}"
            out = subprocess.run(["docker", "inspect", "-f", fmt, name], capture_output=True, text=True, check=False)
            parts = out.stdout.split()
            if len(parts) == 2:
                entry["address"], entry["container"] = parts
            if entry["container"] == "running":
                sysd = subprocess.run(["docker", "exec", name, "systemctl", "is-system-running"],
                                      capture_output=True, text=True, check=False)
                entry["systemd"] = sysd.stdout.strip() or None
        hosts.append(entry)
    return {"lab": lab, "subnet": subnet, "hosts": hosts}


def lab_is_up(info: dict[str, Any]) -> bool:
    return bool(info["hosts"]) and all(h["container"] == "running" and h["systemd"] in ("running", "degraded")
                                       for h in info["hosts"])


def render_lab(info: dict[str, Any]) -> str:
    rows = [("HOST", "ADDRESS", "GROUPS", "CONTAINER", "SYSTEMD")]
    for h in info["hosts"]:
        rows.append((h["name"], h["address"] or "-", ",".join(h["groups"]) or "-", h["container"], h["systemd"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"Lab {info['lab']} ({info['subnet']})", ""]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    up = lab_is_up(info)
    lines += ["", "The lab is up." if up else "The lab is not (completely) up: aphrodite-deploy lab up"]
    return "\n".join(lines) + "\n"
