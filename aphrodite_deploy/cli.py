"""``aphrodite-deploy``: the fleet's command line.

Subcommands live in one parser each (``_add_plan``); ``status``, ``deploy`` and
``rolling-restart`` (on ansible-runner) slot in beside ``plan`` the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from . import __version__
from ._core._plan_input import plan_inventory
from ._core._planner import Plan, PlanError
from .inventory import FactCache, InventoryError, default_fact_cache, read_fact_cache, read_inventory

EXIT_OK = 0
EXIT_ERROR = 1  # the inventory or the fact cache cannot be read
EXIT_INFEASIBLE = 2  # the plan violates a constraint; stderr says which and what to change


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aphrodite-deploy",
        description="Plan and operate an Aphrodite Engine fleet described by an Ansible inventory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_plan(commands)
    return parser


def _add_plan(commands: Any) -> None:
    plan = commands.add_parser(
        "plan",
        help="show how the models of an inventory run on its GPU hosts (contacts no host)",
        description=(
            "Plan aphrodite_models on the GPU hosts of an inventory: tensor/pipeline parallel sizes, "
            "replicas, GPUs, ports and engine arguments. Uses gathered GPU facts from the fact cache "
            "when present, else aphrodite_gpus_declared, and reports where they disagree. "
            f"Exit status {EXIT_INFEASIBLE} when the plan is infeasible."
        ),
    )
    plan.add_argument("-i", "--inventory", required=True, help="inventory directory or file")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (the plan's contract) on stdout")
    plan.add_argument(
        "--fact-cache", metavar="DIR", type=Path,
        help="jsonfile fact cache to read gathered facts from (default: fact_caching_connection of ansible.cfg)",
    )
    plan.add_argument("--no-fact-cache", action="store_true", help="plan from declared facts only")
    plan.add_argument("--objective", choices=("throughput", "latency"), help="default objective of models that set none")
    plan.add_argument("--vault-password-file", help="passed to ansible-inventory for vaulted variables")
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        inventory = read_inventory(args.inventory, args.vault_password_file)
        gathered: dict[str, Any] = {}
        notes = list(inventory.notes)
        if not args.no_fact_cache:
            cache = default_fact_cache()
            if args.fact_cache:
                if not args.fact_cache.is_dir():
                    raise InventoryError(f"fact cache {args.fact_cache} is not a directory")
                # An explicit directory is read as it is: whatever its age.
                cache = FactCache(args.fact_cache, cache.prefix if cache else "", 0)
            gathered, cache_notes = read_fact_cache(cache, sorted(inventory.hostvars))
            notes.extend(cache_notes)
    except InventoryError as exc:
        print(f"aphrodite-deploy plan: {exc}", file=err)
        return EXIT_ERROR
    try:
        plan = plan_inventory(inventory.models, inventory.hostvars, inventory.groups, str(inventory.directory),
                              args.objective, gathered)
    except PlanError as exc:
        print(f"aphrodite-deploy plan: infeasible: {exc}", file=err)
        return EXIT_INFEASIBLE
    for note in notes + plan.notes:
        print(f"warning: {note}", file=err)
    if args.json:
        json.dump(plan.to_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(render_table(plan, inventory.path, sorted(gathered)))
    return EXIT_OK


# --------------------------------------------------------------------------- table


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``0-3,6``."""
    parts: list[str] = []
    start = prev = None
    for index in indices:
        if start is None:
            start = prev = index
        elif index == prev + 1:
            prev = index
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = index
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def render_table(plan: Plan, inventory: Path, gathered_hosts: list[str]) -> str:
    """The plan as a table a person reads: one line per replica, then idle GPUs."""
    header = ("REPLICA", "MODEL", "TP", "PP", "GPUS", "PORT", "WEIGHTS/GPU", "KV TOKENS")
    rows = [header]
    for model, replicas in plan.deployments:
        for replica in replicas:
            gpus = " ".join(f"{host}[{_ranges(list(indices))}]" for host, indices in replica.placement)
            rows.append((
                replica.name, model, str(replica.tensor_parallel_size), str(replica.pipeline_parallel_size),
                gpus, str(replica.port), f"{replica.weights_gib_per_gpu:.2f} GiB", f"{replica.kv_cache_tokens:,}",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 5, 6, 7}
    lines = [f"Plan for {inventory}"]
    if gathered_hosts:
        lines.append(f"GPU facts gathered for {', '.join(gathered_hosts)}; declared facts for the other hosts")
    else:
        lines.append("GPU facts: declared (aphrodite_gpus_declared); no gathered facts in the fact cache")
    lines.append("")
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in numeric and row is not header else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    idle = "; ".join(f"{host}: {_ranges(gpus) or 'none'}" for host, gpus in plan.idle_gpus.items())
    lines += ["", f"Idle GPUs: {idle or 'none'}", "", "Engine arguments of each model's first replica (head node):"]
    for model, replicas in plan.deployments:
        if replicas:
            lines.append(f"  {replicas[0].name}: aphrodite run {' '.join(replicas[0].argv)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
