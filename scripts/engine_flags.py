#!/usr/bin/env python3
"""Derive the command-line flags of a released Aphrodite Engine from its wheel.

The collection renders engine arguments (``aphrodite run --model ... -tp 4``) and
every flag it renders must exist in the pinned release; the engine's CLI changed
a lot between releases. The released wheel is the source of truth, so this script
reads the flag definitions out of it with :mod:`ast` (nothing is imported or run)
and writes them as a Python data module that tests and the planner check against:

    scripts/engine_flags.py                       # downloads aphrodite-engine==0.24.1 to /tmp
    scripts/engine_flags.py --wheel ./aphrodite_engine-0.24.1-...whl

Flags come from two files of the wheel:
- ``aphrodite/engine/arg_utils.py``: literal ``"--flag"``/``"-x"`` strings passed
  to ``add_argument`` and the fields of the ``EngineArgs``/``AsyncEngineArgs``
  dataclasses (field ``max_model_len`` is flag ``--max-model-len``);
- ``aphrodite/entrypoints/launchers/cli_args.py``: literal flags and the fields of
  ``FrontendArgs``/``BaseFrontendArgs`` (field ``api_key`` is ``--api-key``).

Besides the names it records each long flag's kind, so that user-chosen engine
arguments (``engine_args``) render the way the engine's argparse reads them. The
kinds mirror ``_compute_kwargs`` of ``arg_utils.py`` (the field's type hint decides
the argparse action) and the explicit ``add_argument`` calls and overrides:

- ``flag``: ``store_true``, a bare flag with no ``--no-`` form;
- ``bool``: ``BooleanOptionalAction``, bare flag or its ``--no-`` form;
- ``optional``: ``nargs="?"`` (``bool | str | None``), bare flag or one value;
- ``list``: ``nargs="+"`` (``list``/``set``/``tuple`` hints), one or more values;
- ``append``: ``action="append"``, the flag repeated once per value;
- ``json``: a dict or config dataclass, one JSON value;
- ``value``: one value (str, int, float, a literal choice, anything else).

Short aliases (``-tp``) map to their long flag.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_VERSION = "0.24.1"
PACKAGE = "aphrodite-engine"
SOURCES: dict[str, tuple[str, ...]] = {
    "aphrodite/engine/arg_utils.py": ("EngineArgs", "AsyncEngineArgs"),
    "aphrodite/entrypoints/launchers/cli_args.py": ("FrontendArgs", "BaseFrontendArgs"),
}
LONG_FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*$")
SHORT_FLAG = re.compile(r"^-[a-z]{1,4}$")
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "plugins" / "module_utils" / "_engine_flags.py"


def flags_from_source(source: str, dataclass_names: tuple[str, ...]) -> set[str]:
    """Return the flags one source file defines: literals in ``add_argument`` calls,
    other whole-string ``--flag`` literals, and dataclass fields of the named classes."""
    tree = ast.parse(source)
    flags: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if LONG_FLAG.match(arg.value) or SHORT_FLAG.match(arg.value):
                        flags.add(arg.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LONG_FLAG.match(node.value):
            flags.add(node.value)
        elif isinstance(node, ast.ClassDef) and node.name in dataclass_names:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    name = item.target.id
                    if not name.startswith("_"):
                        flags.add("--" + name.replace("_", "-"))
    return flags


KINDS = ("flag", "bool", "optional", "list", "append", "json", "value")
_ACTIONS = {"store_true": "flag", "BooleanOptionalAction": "bool", "append": "append"}


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        try:
            return _union_members(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return [node]
    if isinstance(node, ast.Subscript) and _name(node.value) in ("Optional", "Union", "Annotated"):
        inner = node.slice
        parts = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        if _name(node.value) == "Annotated":
            parts = parts[:1]
        members = [m for part in parts for m in _union_members(part)]
        return members + ([ast.Constant(None)] if _name(node.value) == "Optional" else [])
    return [node]


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return None


def kind_of_annotation(annotation: ast.expr) -> str:
    """The argparse kind ``_compute_kwargs`` gives a field with this type hint."""
    names = {_name(m) for m in _union_members(annotation)}
    if any(n and n.endswith("Config") for n in names):  # config dataclasses parse JSON
        return "json"
    if names == {"bool", "str", "None"}:
        return "optional"
    if "bool" in names:
        return "bool"
    if "Literal" in names:
        return "value"
    if names & {"tuple", "list", "set"}:
        return "list"
    if names & {"int", "float"}:
        return "value"
    if names & {"dict"}:
        return "json"
    return "value"


def _kwargs_key(node: ast.expr) -> str | None:
    """``name`` of ``something_kwargs["name"]`` (the splat of a dataclass field's kwargs)."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return None


def _override(target: ast.expr) -> tuple[str, str] | None:
    """``(field, key)`` of ``kwargs["field"]["key"]``."""
    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
        field = _kwargs_key(target.value)
        if field is not None and isinstance(target.slice.value, str):
            return field, target.slice.value
    return None


def kinds_from_source(source: str, dataclass_names: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """``(kinds, aliases)`` of one source file: each long flag's kind, each short flag's long flag."""
    tree = ast.parse(source)
    fields: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in dataclass_names:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and not item.target.id.startswith("_"):
                    fields[item.target.id] = kind_of_annotation(item.annotation)
    # Overrides such as frontend_kwargs["middleware"]["action"] = "append".
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                found = _override(target)
                if found is None or found[0] not in fields:
                    continue
                field, key = found
                value = node.value
                if key == "action" and _name(value) in _ACTIONS or (
                        key == "action" and isinstance(value, ast.Constant) and value.value in _ACTIONS):
                    fields[field] = _ACTIONS[value.value if isinstance(value, ast.Constant) else _name(value)]
                elif key == "type" and "json.loads" in ast.unparse(value) and fields[field] != "append":
                    fields[field] = "json"
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                found = _override(target)
                if found and found[1] == "nargs" and found[0] in fields and fields[found[0]] == "list":
                    fields[found[0]] = "value"
    kinds = {"--" + name.replace("_", "-"): kind for name, kind in fields.items()}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _call_name(node) == "add_argument"):
            continue
        literals = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        longs = [f for f in literals if LONG_FLAG.match(f)]
        if not longs:
            continue
        kind = None
        for keyword in node.keywords:
            if keyword.arg == "action":
                action = keyword.value.value if isinstance(keyword.value, ast.Constant) else _name(keyword.value)
                kind = _ACTIONS.get(action, kind)
            elif keyword.arg == "nargs" and isinstance(keyword.value, ast.Constant) and keyword.value.value in ("+", "*"):
                kind = kind or "list"
            elif keyword.arg is None:  # **group_kwargs["field"]
                field = _kwargs_key(keyword.value)
                if field is not None and kind is None:
                    kind = fields.get(field)
        kinds[longs[0]] = kind or kinds.get(longs[0]) or "value"
        for short in literals:
            if SHORT_FLAG.match(short):
                aliases[short] = longs[0]
    return kinds, aliases


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def flags_from_wheel(wheel: Path) -> set[str]:
    """Read every flag the pinned sources of ``wheel`` define."""
    flags: set[str] = set()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path, classes in SOURCES.items():
            if path not in names:
                raise SystemExit(f"{wheel.name} has no {path}; the engine's layout changed, update SOURCES in {__file__}")
            flags |= flags_from_source(archive.read(path).decode("utf-8"), classes)
    return flags


def flag_table_from_wheel(wheel: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(kinds, aliases)`` of every long and short flag the pinned sources define."""
    flags = flags_from_wheel(wheel)
    kinds: dict[str, str] = {}
    aliases: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as archive:
        for path, classes in SOURCES.items():
            file_kinds, file_aliases = kinds_from_source(archive.read(path).decode("utf-8"), classes)
            for flag, kind in file_kinds.items():
                kinds.setdefault(flag, kind)
            aliases.update(file_aliases)
    long_flags = {f: kinds.get(f, "value") for f in flags if f.startswith("--")}
    return long_flags, {s: aliases[s] for s in flags if not s.startswith("--") and s in aliases}


CHAT_TEMPLATES_DIR = "aphrodite/transformers_utils/chat_templates/"


def chat_templates_from_wheel(wheel: Path) -> set[str]:
    """Names of the chat templates the engine ships (``--chat-template template_chatml.jinja``)."""
    with zipfile.ZipFile(wheel) as archive:
        return {name[len(CHAT_TEMPLATES_DIR):] for name in archive.namelist()
                if name.startswith(CHAT_TEMPLATES_DIR) and name.endswith(".jinja") and "/" not in name[len(CHAT_TEMPLATES_DIR):]}


def download_wheel(version: str, dest: Path) -> Path:
    """Download the wheel with pip (no dependencies) into ``dest``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), f"{PACKAGE}=={version}"],
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip downloaded no wheel of {PACKAGE}=={version} into {dest}")
    return wheels[0]


def render_module(flags: set[str], version: str, wheel_name: str, sha256: str,
                  kinds: dict[str, str] | None = None, aliases: dict[str, str] | None = None,
                  chat_templates: set[str] | None = None) -> str:
    lines = [
        "# Generated by scripts/engine_flags.py from the released wheel; do not edit by hand.",
        f"# Source: {wheel_name} (sha256 {sha256})",
        "# Regenerate: python scripts/engine_flags.py [--version X.Y.Z | --wheel PATH]",
        '"""Command-line flags that the pinned Aphrodite Engine release accepts."""',
        "",
        "from __future__ import annotations",
        "",
        f'APHRODITE_VERSION = "{version}"',
        "",
        "APHRODITE_FLAGS = frozenset(",
        "    (",
    ]
    lines += [f'        "{flag}",' for flag in sorted(flags)]
    lines += ["    )", ")", ""]
    lines += [
        "# How the engine's argparse reads each long flag (see scripts/engine_flags.py): flag (store_true),",
        "# bool (--x/--no-x), optional (bare or one value), list (one or more values), append (repeated),",
        "# json (one JSON value), value (one value).",
        "APHRODITE_FLAG_KINDS = {",
    ]
    lines += [f'    "{flag}": "{kind}",' for flag, kind in sorted((kinds or {}).items())]
    lines += ["}", "", "# Short aliases of long flags.", "APHRODITE_FLAG_ALIASES = {"]
    lines += [f'    "{short}": "{flag}",' for short, flag in sorted((aliases or {}).items())]
    lines += ["}", "", "# Chat templates the engine ships; --chat-template takes their names as they are.",
              "APHRODITE_CHAT_TEMPLATES = frozenset(", "    ("]
    lines += [f'        "{name}",' for name in sorted(chat_templates or ())]
    lines += ["    )", ")", ""]
    return "\n".join(lines)


def _version_from_wheel(wheel: Path) -> str:
    # aphrodite_engine-0.24.1-cp38-abi3-manylinux_2_34_x86_64.whl
    parts = wheel.name.split("-")
    return parts[1] if len(parts) > 1 else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="an aphrodite-engine wheel already on disk")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="release to download when --wheel is not given")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="data module to write")
    args = parser.parse_args(argv)

    tmp: Path | None = None
    try:
        if args.wheel:
            wheel = args.wheel
        else:
            tmp = Path(tempfile.mkdtemp(prefix="engine-flags-", dir="/tmp"))
            wheel = download_wheel(args.version, tmp)
        sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
        flags = flags_from_wheel(wheel)
        kinds, aliases = flag_table_from_wheel(wheel)
        version = args.version if not args.wheel else _version_from_wheel(wheel)
        templates = chat_templates_from_wheel(wheel)
        args.output.write_text(render_module(flags, version, wheel.name, sha256, kinds, aliases, templates),
                               encoding="utf-8")
        print(f"{len(flags)} flags of aphrodite-engine {version} written to {args.output}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
