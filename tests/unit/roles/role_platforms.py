"""The supported platforms and the data a role loads for each (set_vars.yml), for the role tests."""

from __future__ import annotations

from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"

# (os_family, distribution, major version) of every platform the roles are written for.
PLATFORMS = [
    ("Debian", "Debian", "12"),
    ("Debian", "Debian", "13"),
    ("Debian", "Ubuntu", "22"),
    ("Debian", "Ubuntu", "24"),
    ("RedHat", "RedHat", "9"),
    ("RedHat", "Rocky", "9"),
    ("RedHat", "AlmaLinux", "9"),
]


def platform_vars(role: str, family: str, distribution: str, major: str) -> dict:
    """vars/main.yml, then the files set_vars.yml loads, in its order (later files win)."""
    vars_dir = ROLES / role / "vars"
    data = yaml.safe_load((vars_dir / "main.yml").read_text())
    for name in (f"{family}.yml", f"{family}_{major}.yml", f"{distribution}.yml", f"{distribution}_{major}.yml"):
        path = vars_dir / name
        if path.is_file():
            data.update(yaml.safe_load(path.read_text()) or {})
    return data
