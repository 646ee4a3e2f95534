#!/usr/bin/env python3
"""Render each role's variable table in README.md from meta/argument_specs.yml.

The tables sit between ``<!-- BEGIN ROLE VARIABLES -->`` and
``<!-- END ROLE VARIABLES -->``.  ``--check`` exits 1 when README.md is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN ROLE VARIABLES -->"
END = "<!-- END ROLE VARIABLES -->"


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|") + "`" if text else ""


def role_table(role_dir: Path) -> str:
    spec = yaml.safe_load((role_dir / "meta" / "argument_specs.yml").read_text())
    main = spec["argument_specs"]["main"]
    lines = [f"### `aphrodite.baremetal.{role_dir.name}`", "", main.get("short_description", ""), "",
             "| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, opt in sorted(main.get("options", {}).items()):
        kind = opt.get("type", "str")
        if kind == "list" and opt.get("elements"):
            kind = f"list of {opt['elements']}"
        desc = opt.get("description", "")
        if isinstance(desc, list):
            desc = " ".join(desc)
        if opt.get("required"):
            desc = "**Required.** " + desc
        if opt.get("no_log"):
            desc += " Secret: keep it in ansible-vault."
        lines.append(f"| `{name}` | {kind} | {_cell(opt.get('default'))} | {desc.strip()} |")
    return "\n".join(lines)


def render(root: Path = ROOT) -> str:
    roles = sorted(p for p in (root / "roles").iterdir() if (p / "meta" / "argument_specs.yml").is_file())
    return "\n\n".join(role_table(r) for r in roles)


def updated_readme(text: str, tables: str) -> str:
    try:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"README.md lacks the {BEGIN} / {END} markers") from None
    return f"{head}{BEGIN}\n{tables}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md is out of date")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = updated_readme(text, render())
    if args.check:
        if new != text:
            print("README.md role variable tables are stale: run scripts/role_docs.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
