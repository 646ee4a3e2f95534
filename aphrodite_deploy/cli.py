"""``aphrodite-deploy``: the fleet's command line.

One parser per subcommand (``_add_plan``, ``_add_deploy``, ...). ``plan`` reads the
inventory without contacting a host; ``deploy``, ``status``, ``rolling-restart`` and
``upgrade`` run the collection's playbooks through ansible-runner's Python API
(:mod:`.runner`) and read what happened from its events (:mod:`.events`); ``lab`` drives
``lab/labctl.py``. Every command has ``--json`` for programs; the exit statuses are
``EXIT_*`` below and in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from . import __version__
from ._core._planner import Plan, PlanError
from .events import RunLog, StageMap
from .inventory import FactCache, InventoryError, default_fact_cache, read_fact_cache, read_inventory
from .inventory import fleet as fleet_of
from .inventory import plan as plan_inventory_hosts
from .progress import Progress, duration
from .runner import DEFAULT_KEEP, RunnerError, RunResult, artifacts_root, find_project_dir, run_playbook
from .vault import ENV_PASSWORD, VaultError, VaultSecrets, take_env_password

EXIT_OK = 0
EXIT_ERROR = 1  # the command could not run: inventory, fact cache, vault password, checkout, lab
EXIT_INFEASIBLE = 2  # the plan violates a constraint; stderr says which and what to change (argparse: usage)
EXIT_DRIFT = 3  # deploy --check: some host would change
EXIT_FAILED = 4  # a host failed or was unreachable; a rolling operation stopped at a failed replica
EXIT_UNHEALTHY = 5  # status: a replica does not serve; lab status: a lab host is not running
EXIT_INTERRUPTED = 130  # Ctrl-C (the run was cancelled)

EXIT_CODES = f"""\
exit status:
  {EXIT_OK}    success (status: every replica serves; deploy --check: nothing would change)
  {EXIT_ERROR}    the command could not run (unreadable inventory, vault password, no checkout, ...)
  {EXIT_INFEASIBLE}    usage error; plan: the plan is infeasible (the reason is on stderr); deploy and
       the rolling commands: preflight refused the inventory before any host changed
  {EXIT_DRIFT}    deploy --check: drift, some host would change (listed per host)
  {EXIT_FAILED}    a host failed or was unreachable; rolling-restart/upgrade stopped at a failed replica
  {EXIT_UNHEALTHY}    status: a replica does not serve; lab status: a lab host is not running
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""

SECRETS_HELP = f"""\
secrets:
  Vaulted inventory variables are decrypted with --vault-password-file FILE (a file or an
  executable script, as ansible-playbook takes it), or with the password itself in the
  environment variable {ENV_PASSWORD}. Neither the password nor a decrypted secret is
  written to disk: ansible-runner writes no env/ files, and the artefacts keep events and
  output only (results Ansible hides with no_log stay hidden). ANSIBLE_VAULT_PASSWORD_FILE
  works as in Ansible.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def main(argv: list[str] | None = None) -> int:
    # Out of the environment before anything runs: no child process, nor ansible-runner's
    # record of the environment, ever sees it.
    env_password = take_env_password()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.env_vault_password = env_password
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("aphrodite-deploy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aphrodite-deploy",
        formatter_class=_Formatter,
        description="Plan and operate an Aphrodite Engine fleet described by an Ansible inventory.",
        epilog=(
            "start here:\n"
            "  aphrodite-deploy plan -i inventories/prod             what would run where (no host contacted)\n"
            "  aphrodite-deploy deploy -i inventories/prod --check   what deploy would change (drift)\n"
            "  aphrodite-deploy deploy -i inventories/prod           converge the fleet (site.yml)\n"
            "  aphrodite-deploy status -i inventories/prod           is every replica serving?\n"
            "  aphrodite-deploy rolling-restart -i inventories/prod  restart replicas, fleet serving\n"
            "  aphrodite-deploy upgrade -i inventories/prod --image REF\n"
            "  aphrodite-deploy lab up                               the local lab (make lab)\n"
            "Run `aphrodite-deploy COMMAND --help` for a command's options.\n\n" + EXIT_CODES + "\n" + SECRETS_HELP
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_plan(commands)
    common = _run_options()
    _add_deploy(commands, common)
    _add_status(commands, common)
    _add_rolling(commands, common)
    _add_backup(commands, common)
    _add_lab(commands)
    return parser


def _add_plan(commands: Any) -> None:
    plan = commands.add_parser(
        "plan",
        help="show how the models of an inventory run on its GPU hosts (contacts no host)",
        description=(
            "Plan aphrodite_models on the GPU hosts of an inventory: tensor/pipeline parallel sizes, "
            "replicas, GPUs, ports and engine arguments. The inventory is read and templated by Ansible "
            "itself, as the preflight of site.yml reads it, and planned by the same function: the plan "
            "is the one site.yml would publish. Uses gathered GPU facts from the fact cache when they "
            "were gathered for this inventory and host address, else aphrodite_gpus_declared, and "
            f"reports where they disagree. Exit status {EXIT_INFEASIBLE} when the plan is infeasible."
        ),
    )
    plan.add_argument("-i", "--inventory", required=True, help="inventory directory or file")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (the plan's contract) on stdout")
    plan.add_argument(
        "--fact-cache", metavar="DIR", type=Path,
        help="jsonfile fact cache to read gathered facts from (default: fact_caching_connection of ansible.cfg)",
    )
    plan.add_argument("--no-fact-cache", action="store_true", help="plan from declared facts only")
    plan.add_argument("--objective", choices=("throughput", "latency"),
                      help="objective of models that set none (default: the inventory's aphrodite_objective, "
                           "else throughput)")
    plan.add_argument("--vault-password-file", metavar="FILE",
                      help=f"vault password file or script for vaulted variables (or set {ENV_PASSWORD})")
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        # Ansible reads the inventory here as ansible-playbook would (vault included), and the
        # planner gets the variables the preflight's plan_fleet filter gets.
        inventory = read_inventory(args.inventory, args.vault_password_file, getattr(args, "env_vault_password", None),
                                   _playbook_dir())
        gathered: dict[str, Any] = {}
        notes = list(inventory.notes)
        if not args.no_fact_cache:
            cache = default_fact_cache()
            if args.fact_cache:
                if not args.fact_cache.is_dir():
                    raise InventoryError(f"fact cache {args.fact_cache} is not a directory")
                # An explicit directory is read as it is: whatever its age.
                cache = FactCache(args.fact_cache, cache.prefix if cache else "", 0)
            gathered, cache_notes = read_fact_cache(cache, inventory.hosts)
            notes.extend(cache_notes)
        result, from_facts = plan_inventory_hosts(inventory, args.objective, gathered)
        model = fleet_of(inventory, result)  # also checks what preflight checks next: addresses, ports, edge settings
    except InventoryError as exc:
        print(f"aphrodite-deploy plan: {exc}", file=err)
        return EXIT_ERROR
    except PlanError as exc:
        print(f"aphrodite-deploy plan: infeasible: {exc}", file=err)
        return EXIT_INFEASIBLE
    for note in notes + result.notes:
        print(f"warning: {note}", file=err)
    if args.json:
        json.dump(dict(result.to_dict(), fleet=model), out, indent=2)
        out.write("\n")
    else:
        out.write(render_table(result, inventory.path, from_facts))
    return EXIT_OK


def _playbook_dir() -> Path | None:
    """Where the preflight playbook lies: ansible-playbook loads play-adjacent group_vars from there."""
    try:
        return find_project_dir(None) / "playbooks"
    except RunnerError:
        return None


# --------------------------------------------------------------------------- runs


def _run_options() -> argparse.ArgumentParser:
    """Options every command that runs a playbook takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("-i", "--inventory", required=True, metavar="PATH",
                       help="inventory directory or file (e.g. inventories/prod)")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for programs)")
    group.add_argument("--vault-password-file", metavar="FILE",
                       help=f"vault password file or script (or set {ENV_PASSWORD} to the password)")
    group.add_argument("--project-dir", metavar="DIR",
                       help="the aphrodite.baremetal checkout whose playbooks run (default: the one this tool "
                            "belongs to, or the current directory)")
    group.add_argument("--artifacts-dir", metavar="DIR",
                       help="where runs keep events and output (default: $APHRODITE_DEPLOY_ARTIFACTS or "
                            "~/.cache/aphrodite-deploy)")
    group.add_argument("--keep-artifacts", type=int, default=DEFAULT_KEEP, metavar="N",
                       help=f"keep the artefacts of the newest N runs (default {DEFAULT_KEEP})")
    group.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    return common


def _add_deploy(commands: Any, common: argparse.ArgumentParser) -> None:
    deploy = commands.add_parser(
        "deploy", parents=[common], formatter_class=_Formatter,
        help="converge the fleet: run site.yml (or, with --check, report what would change)",
        description=(
            "Run site.yml against the inventory: preflight (plan), common, GPU hosts, storage,\n"
            "engines, edge, firewall, monitoring, verify. Live progress on stderr (a bar per stage\n"
            "and host), then a summary table per host (ok, changed, failed, unreachable, ...).\n\n"
            "With --check nothing changes: the drift report lists, per host, the tasks that would\n"
            "change (exit 3 when there are any)."),
        epilog=("examples:\n"
                "  aphrodite-deploy deploy -i inventories/prod\n"
                "  aphrodite-deploy deploy -i inventories/prod --check --limit gpu_nodes\n"
                "  aphrodite-deploy deploy -i inventories/prod --tags engines,edge\n\n" + EXIT_CODES + "\n"
                + SECRETS_HELP),
    )
    deploy.add_argument("--check", action="store_true", help="change nothing; report the drift per host")
    deploy.add_argument("--diff", action="store_true", help="also let Ansible compute diffs (kept in the artefacts)")
    deploy.add_argument("--limit", metavar="PATTERN", help="only these hosts or groups (Ansible's --limit)")
    deploy.add_argument("--tags", metavar="TAGS",
                        help="only these stages, comma-separated (preflight always runs): common, gpu_hosts, "
                             "storage, engines, edge, firewall, monitoring, verify")
    deploy.add_argument("--skip-tags", metavar="TAGS", help="skip these stages")
    deploy.add_argument("--forks", type=int, metavar="N", help="hosts in parallel (default: ansible.cfg)")
    deploy.set_defaults(handler=run_deploy)


def _add_status(commands: Any, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status", parents=[common], formatter_class=_Formatter,
        help="show every replica: health, load-balancer state, requests and KV cache (read-only)",
        description=(
            "For every replica of the plan: its container on the GPU node, /health as each load\n"
            "balancer reaches it, HAProxy's view of it (runtime API: UP, DOWN, DRAIN, MAINT and the\n"
            "last check), and the engine's requests running and waiting and KV-cache use. Probes\n"
            "run on the load balancers (the firewall lets only them reach engine ports); nothing\n"
            "changes anywhere (playbooks/status.yml). Exit 5 when a replica does not serve."),
        epilog="examples:\n  aphrodite-deploy status -i inventories/prod\n  aphrodite-deploy status -i inventories/prod "
               "--json | jq '.replicas[] | {name, state}'\n\n" + EXIT_CODES + "\n" + SECRETS_HELP,
    )
    status.set_defaults(handler=run_status)


def _add_rolling(commands: Any, common: argparse.ArgumentParser) -> None:
    rolling = argparse.ArgumentParser(add_help=False)
    group = rolling.add_argument_group("rolling options")
    group.add_argument("--replicas", metavar="NAMES",
                       help="only these replicas, comma-separated (names as in `plan`; default: all)")
    group.add_argument("--drain-timeout", type=int, default=600, metavar="SECONDS",
                       help="how long a drained replica may take to finish its last request (default 600)")
    group.add_argument("--health-timeout", type=int, metavar="SECONDS",
                       help="how long a restarted replica may take to answer /health (default: the inventory's "
                            "engine_health_retries x engine_health_delay, 15 minutes)")
    how = ("Canary first: one GPU node, then a quarter of the nodes at a time. On a node, one\n"
           "replica at a time is drained on every load balancer, waited for until no request is in\n"
           "flight (HAProxy sessions and the engine's requests running), {verb},\n"
           "checked with /health and a warm-up request, and put back in the pool. The first failure\n"
           "stops the roll: the failed replica stays out of the pool, the replicas not rolled yet\n"
           "are not touched and serve, and the command says which is which (exit 4).\n"
           "playbooks/rolling.yml does the work.")
    restart = commands.add_parser(
        "rolling-restart", parents=[common, rolling], formatter_class=_Formatter,
        help="restart every replica, one at a time, with the fleet serving",
        description="Restart the engine containers of every replica without failing a request.\n\n"
                    + how.format(verb="restarted"),
        epilog="examples:\n  aphrodite-deploy rolling-restart -i inventories/prod\n"
               "  aphrodite-deploy rolling-restart -i inventories/prod --replicas llama-3-1-8b-0\n\n"
               + EXIT_CODES + "\n" + SECRETS_HELP,
    )
    restart.set_defaults(handler=run_rolling, action="restart", image=None, image_archive=None)
    upgrade = commands.add_parser(
        "upgrade", parents=[common, rolling], formatter_class=_Formatter,
        help="replace every replica with another engine image, one at a time, with the fleet serving",
        description="Move the engines to the image REF without failing a request.\n\n"
                    "The image is pulled (or loaded from --image-archive) on every GPU node first; a node\n"
                    "that cannot get it stops the upgrade before any replica is touched.\n\n"
                    + how.format(verb="replaced by REF") + "\n"
                    "An image that never answers /health stops the upgrade at the canary.\n\n"
                    "Afterwards set engine_image: REF in the inventory: deploy runs what the inventory names.",
        epilog="examples:\n  aphrodite-deploy upgrade -i inventories/prod --image alpindale/aphrodite-openai:v0.24.2\n"
               "  aphrodite-deploy upgrade -i inventories/prod --image REF --image-archive /srv/images/engine.tar\n\n"
               + EXIT_CODES + "\n" + SECRETS_HELP,
    )
    upgrade.add_argument("--image", required=True, metavar="REF",
                         help="the engine image to run, pinned (name:tag, or name@sha256:... in production)")
    upgrade.add_argument("--image-archive", metavar="FILE",
                         help="a `docker save` archive of REF on this machine, for nodes that cannot pull")
    upgrade.set_defaults(handler=run_rolling, action="upgrade")


def _add_backup(commands: Any, common: argparse.ArgumentParser) -> None:
    backup = commands.add_parser(
        "backup", parents=[common], formatter_class=_Formatter,
        help="back up the edge PKI (encrypted), Prometheus and the model markers to the backup host",
        description=(
            "Run playbooks/backup.yml: the edge PKI of every load balancer (encrypted with gpg on the\n"
            "host, with aphrodite_backup_passphrase from vault), a Prometheus TSDB snapshot of every\n"
            "monitoring host and the staged models' markers, into a new root-only directory on the\n"
            "backup host (the first NFS server by default); older runs beyond aphrodite_backup_keep\n"
            "are removed. playbooks/restore.yml brings the edge CA back (README, On call)."),
        epilog="examples:\n  aphrodite-deploy backup -i inventories/prod --vault-password-file ~/.vault-pass\n\n"
               + EXIT_CODES + "\n" + SECRETS_HELP,
    )
    backup.set_defaults(handler=run_backup)


def run_backup(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = _streams(stdout, stderr)
    try:
        result, log = _run_with_progress(args, err, "backup", "playbooks/backup.yml")
    except (RunnerError, VaultError) as exc:
        print(f"aphrodite-deploy backup: {exc}", file=err)
        return EXIT_ERROR
    if result.status == "canceled":
        code, word = EXIT_INTERRUPTED, "interrupted"
    elif not result.ok or log.failed_hosts() or log.unreachable_hosts():
        code, word = EXIT_FAILED, "failed"
    else:
        code, word = EXIT_OK, "done"
    if args.json:
        json.dump({"command": "backup", "result": word, "exit_status": code,
                   "runner": {"status": result.status, "rc": result.rc}, "hosts": log.host_recap(),
                   "failures": [f.to_dict() for f in log.failures], "artifacts": str(result.artifact_dir)}, out, indent=2)
        out.write("\n")
        return code
    out.write(_recap_table(log))
    failures = _failure_lines(log)
    out.write(("Failures:\n" + "\n".join(failures) + "\n") if failures else "")
    out.write(f"backup {word} (artefacts: {result.artifact_dir})\n")
    return code


def _add_lab(commands: Any) -> None:
    lab_common = argparse.ArgumentParser(add_help=False)
    group = lab_common.add_argument_group("common options")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    group.add_argument("--project-dir", metavar="DIR", help="the aphrodite.baremetal checkout (default: this one)")
    group.add_argument("--artifacts-dir", metavar="DIR", help="where deploy keeps its artefacts")
    group.add_argument("--keep-artifacts", type=int, default=DEFAULT_KEEP, metavar="N", help=argparse.SUPPRESS)
    group.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    lab = commands.add_parser(
        "lab", formatter_class=_Formatter,
        help="the local lab: hosts as containers on this machine (up, down, status)",
        description=("The local lab of lab/labctl.py: the hosts of inventories/lab as systemd containers on\n"
                     "this machine, reached over SSH like servers (needs Docker; a checkout)."),
        epilog="examples:\n  aphrodite-deploy lab up\n  aphrodite-deploy status -i inventories/lab\n"
               "  aphrodite-deploy lab down\n\n" + EXIT_CODES,
    )
    actions = lab.add_subparsers(title="actions", metavar="ACTION", required=True)
    up = actions.add_parser("up", parents=[lab_common], formatter_class=_Formatter,
                            help="start the lab's hosts and deploy the fleet onto them",
                            description="Start the hosts of inventories/lab (building the host and stand-in images\n"
                                        "when their recipes changed), then deploy site.yml onto them, like `make lab`.")
    up.add_argument("--no-deploy", action="store_true", help="only start the hosts")
    up.set_defaults(handler=run_lab, lab_action="up")
    down = actions.add_parser("down", parents=[lab_common], formatter_class=_Formatter,
                              help="remove the lab's hosts, volumes, network and state (not Molecule's)",
                              description="Remove the lab named 'lab': its containers (engines first), volumes,\n"
                                          "network, SSH masters and state. Molecule's labs are left alone.")
    down.set_defaults(handler=run_lab, lab_action="down")
    status = actions.add_parser("status", parents=[lab_common], formatter_class=_Formatter,
                                help="list the lab's hosts and whether they run",
                                description="The hosts of inventories/lab: address, groups, container and systemd state.\n"
                                            f"Exit {EXIT_UNHEALTHY} when a host is not running.")
    status.set_defaults(handler=run_lab, lab_action="status")


def _streams(stdout: TextIO | None, stderr: TextIO | None) -> tuple[TextIO, TextIO]:
    return stdout or sys.stdout, stderr or sys.stderr


def _show_progress(args: argparse.Namespace, err: TextIO) -> tuple[bool, bool]:
    """(enabled, live): live redraws on a terminal; with --json, progress only on a terminal."""
    tty = bool(getattr(err, "isatty", lambda: False)())
    enabled = not getattr(args, "quiet", False) and (tty or not getattr(args, "json", False))
    return enabled, tty


def _run_with_progress(args: argparse.Namespace, err: TextIO, command: str, playbook: str) -> tuple[Any, RunLog]:
    """Run one of the project's playbooks with the run log and the progress display on ``err``;
    RunnerError and VaultError reach the caller."""
    stages = StageMap.from_playbook(find_project_dir(args.project_dir) / playbook)
    log = RunLog(stages)
    enabled, live = _show_progress(args, err)
    progress = Progress(err, stages, live=live, enabled=enabled, title=command)
    result = _run(args, command, playbook, [log, progress])
    progress.close()
    return result, log


def _run(args: argparse.Namespace, command: str, playbook: str, handlers: list[Callable[[dict[str, Any]], Any]],
         **options: Any) -> RunResult:
    project = find_project_dir(args.project_dir)
    with VaultSecrets(getattr(args, "vault_password_file", None), getattr(args, "env_vault_password", None)) as vault:
        return run_playbook(playbook, inventory=args.inventory, project_dir=project,
                            private_dir=artifacts_root(args.artifacts_dir), command=command, handlers=handlers,
                            vault_args=vault.args, keep_artifacts=args.keep_artifacts, **options)


def _recap_table(log: RunLog) -> str:
    recap = log.host_recap()
    header = ("HOST", "OK", "CHANGED", "FAILED", "UNREACHABLE", "SKIPPED", "RESCUED", "IGNORED")
    keys = ("ok", "changed", "failed", "unreachable", "skipped", "rescued", "ignored")
    rows = [header] + [(host, *(str(values[k]) for k in keys)) for host, values in recap.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip() for row in rows) + "\n"


def _failure_lines(log: RunLog) -> list[str]:
    lines = []
    for failure in log.failures:
        kind = "unreachable" if failure.unreachable else "failed"
        where = f"{failure.stage}: " if failure.stage else ""
        lines.append(f"  {failure.host} {kind}: {where}{failure.task}: {failure.message}")
    return lines


def _result_word(result: RunResult) -> str:
    return {"canceled": "interrupted", "timeout": "timed out"}.get(result.status, result.status)


# The stages that only read: a failure there stopped the run before any host changed.
READ_ONLY_STAGES = frozenset({"probe", "preflight"})


def refused_by_preflight(log: RunLog) -> bool:
    """The run stopped in the plan's checks, every host reached and none changed.

    That is the inventory (or a host's state) violating a constraint, as `plan` exits
    EXIT_INFEASIBLE for; the failure message names the fix.
    """
    return (bool(log.failures) and not log.changes
            and all(f.stage in READ_ONLY_STAGES and not f.unreachable for f in log.failures))


def deploy_outcome(result: RunResult, log: RunLog, check: bool) -> tuple[int, str]:
    """The exit status and one word for a deploy run."""
    if result.status == "canceled":
        return EXIT_INTERRUPTED, "interrupted"
    if refused_by_preflight(log):
        return EXIT_INFEASIBLE, "refused"
    if not result.ok or log.failed_hosts() or log.unreachable_hosts():
        return EXIT_FAILED, "failed"
    if check and log.changes:
        return EXIT_DRIFT, "drift"
    return EXIT_OK, "in sync" if check else "converged"


def deploy_payload(result: RunResult, log: RunLog, check: bool) -> dict[str, Any]:
    code, word = deploy_outcome(result, log, check)
    drift = {host: [c.to_dict() for c in changes] for host, changes in log.drift().items()}
    return {
        "command": "deploy", "check": check, "result": word, "exit_status": code,
        "runner": {"status": result.status, "rc": result.rc}, "duration_s": round(result.duration, 1),
        "hosts": log.host_recap(), "failures": [f.to_dict() for f in log.failures],
        ("drift" if check else "changed"): drift, "artifacts": str(result.artifact_dir),
    }


def render_deploy(result: RunResult, log: RunLog, check: bool) -> str:
    code, word = deploy_outcome(result, log, check)
    lines = [_recap_table(log).rstrip("\n")] if log.host_recap() else []
    drift = log.drift()
    if check:
        lines += ["", "Drift (what deploy would change):" if drift else "Drift: none, every host matches the inventory."]
        for host in log.host_recap():
            changes = drift.get(host, [])
            if not changes:
                lines.append(f"  {host}: no change")
                continue
            lines.append(f"  {host}: {len(changes)} task(s) would change")
            for change in changes:
                items = f" [{', '.join(change.items)}]" if change.items else ""
                lines.append(f"    {change.stage}: {change.task}{items}")
    failures = _failure_lines(log)
    if failures:
        lines += ["", "Failures:"] + failures
    elif not result.ok and result.status != "canceled":
        lines += ["", f"ansible-playbook ended with {result.status} (exit {result.rc}) before any host failed; "
                      "its last lines:", result.stdout_tail]
    hosts = len(log.host_recap())
    changed = sum(1 for v in log.host_recap().values() if v["changed"])
    name = "deploy --check" if check else "deploy"
    if code == EXIT_OK and not check:
        summary = f"{name}: converged in {duration(result.duration)}: {hosts} host(s), {changed} changed."
    elif code == EXIT_OK:
        summary = f"{name}: in sync ({hosts} host(s)), {duration(result.duration)}."
    elif code == EXIT_DRIFT:
        summary = (f"{name}: drift on {len(drift)} of {hosts} host(s) "
                   f"({sum(len(c) for c in drift.values())} task(s) would change), {duration(result.duration)}.")
    elif code == EXIT_INFEASIBLE:
        summary = f"{name}: refused by preflight after {duration(result.duration)}; no host changed (the fix is above)."
    elif code == EXIT_INTERRUPTED:
        summary = f"{name}: interrupted after {duration(result.duration)}; hosts may be half-way through a stage."
    else:
        bad = ", ".join(log.failed_hosts() + [f"{h} (unreachable)" for h in log.unreachable_hosts()]) or "the run"
        summary = f"{name}: failed after {duration(result.duration)}: {bad}."
    lines += ["", summary, f"Artefacts: {result.artifact_dir}"]
    return "\n".join(lines).lstrip("\n") + "\n"


def run_deploy(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = _streams(stdout, stderr)
    code, payload, text = _deploy(args, err)
    if payload is None:
        return code
    if args.json:
        json.dump(payload, out, indent=2)
        out.write("\n")
    else:
        out.write(text)
    return code


def _deploy(args: argparse.Namespace, err: TextIO, inventory: str | None = None) -> tuple[int, dict | None, str]:
    name = "deploy"
    try:
        project = find_project_dir(args.project_dir)
        stages = StageMap.from_playbook(project / "site.yml")
        log = RunLog(stages)
        enabled, live = _show_progress(args, err)
        progress = Progress(err, stages, live=live, enabled=enabled, title="deploy --check" if getattr(args, "check", False) else name)
        if inventory is not None:
            args.inventory = inventory
        result = _run(args, name, "site.yml", [log, progress], limit=getattr(args, "limit", None),
                      tags=getattr(args, "tags", None), skip_tags=getattr(args, "skip_tags", None),
                      check=getattr(args, "check", False), diff=getattr(args, "diff", False),
                      forks=getattr(args, "forks", None))
        progress.close()
    except (RunnerError, VaultError) as exc:
        print(f"aphrodite-deploy {name}: {exc}", file=err)
        return EXIT_ERROR, None, ""
    check = getattr(args, "check", False)
    code, _ = deploy_outcome(result, log, check)
    return code, deploy_payload(result, log, check), render_deploy(result, log, check)


def run_status(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    from .status import build_status, render_status

    out, err = _streams(stdout, stderr)
    try:
        result, log = _run_with_progress(args, err, "status", "playbooks/status.yml")
    except (RunnerError, VaultError) as exc:
        print(f"aphrodite-deploy status: {exc}", file=err)
        return EXIT_ERROR
    status = build_status(log)
    if result.status == "canceled":
        code = EXIT_INTERRUPTED
    elif not status.all_serving:
        code = EXIT_UNHEALTHY
    elif not result.ok:
        code = EXIT_FAILED
    else:
        code = EXIT_OK
    if args.json:
        payload = status.to_dict()
        payload.update({"command": "status", "exit_status": code,
                        "runner": {"status": result.status, "rc": result.rc},
                        "failures": [f.to_dict() for f in log.failures], "artifacts": str(result.artifact_dir)})
        json.dump(payload, out, indent=2)
        out.write("\n")
        return code
    out.write(render_status(status))
    failures = _failure_lines(log)
    if failures:
        out.write("Hosts that did not answer:\n" + "\n".join(failures) + "\n")
    elif not result.ok and result.status != "canceled":
        out.write(f"The status run ended with {result.status} (exit {result.rc}); its last lines:\n"
                  f"{result.stdout_tail}\n")
    return code


def rolling_extravars(args: argparse.Namespace) -> dict[str, Any]:
    """What rolling-restart and upgrade tell playbooks/rolling.yml (never a secret)."""
    extravars: dict[str, Any] = {
        "aphrodite_rolling_action": args.action,
        "aphrodite_rolling_replicas": [r.strip() for r in (args.replicas or "").split(",") if r.strip()],
        "aphrodite_rolling_drain_timeout": int(args.drain_timeout),
    }
    if args.health_timeout:
        delay = 2 if args.health_timeout <= 120 else 5
        extravars["engine_health_delay"] = delay
        extravars["engine_health_retries"] = max(1, math.ceil(args.health_timeout / delay))
    if args.action == "upgrade":
        extravars["engine_image"] = args.image
        extravars["engine_image_archive"] = str(Path(args.image_archive).expanduser().resolve()) if args.image_archive else ""
    return extravars


def run_rolling(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    from .rolling import RollingProgress, render_roll, summarize

    out, err = _streams(stdout, stderr)
    command = "upgrade" if args.action == "upgrade" else "rolling-restart"
    if args.action == "upgrade" and args.image_archive and not Path(args.image_archive).expanduser().is_file():
        print(f"aphrodite-deploy {command}: image archive {args.image_archive} does not exist", file=err)
        return EXIT_ERROR
    try:
        project = find_project_dir(args.project_dir)
        log = RunLog(StageMap.from_playbook(project / "playbooks" / "rolling.yml"))
        enabled, _ = _show_progress(args, err)
        progress = RollingProgress(err, enabled=enabled)
        result = _run(args, command, "playbooks/rolling.yml", [log, progress], extravars=rolling_extravars(args))
    except (RunnerError, VaultError) as exc:
        print(f"aphrodite-deploy {command}: {exc}", file=err)
        return EXIT_ERROR
    summary = summarize(log, args.action)
    if result.status == "canceled":
        code, word = EXIT_INTERRUPTED, "interrupted"
    elif refused_by_preflight(log):
        code, word = EXIT_INFEASIBLE, "refused"
    elif result.ok and not summary.failed:
        code, word = EXIT_OK, "done"
    else:
        code, word = EXIT_FAILED, "failed"
    if args.json:
        payload = {"command": command, "image": args.image, "result": word, "exit_status": code,
                   "duration_s": round(result.duration, 1), "roll": summary.to_dict(),
                   "runner": {"status": result.status, "rc": result.rc}, "hosts": log.host_recap(),
                   "failures": [f.to_dict() for f in log.failures], "artifacts": str(result.artifact_dir)}
        json.dump(payload, out, indent=2)
        out.write("\n")
        return code
    if code == EXIT_INTERRUPTED:
        out.write(render_roll(summary, log, result.duration, False, args.image))
        out.write("Interrupted: a replica may be left drained; `aphrodite-deploy status` shows which.\n")
    else:
        out.write(render_roll(summary, log, result.duration, code == EXIT_OK, args.image))
    out.write(f"Artefacts: {result.artifact_dir}\n")
    return code


def run_lab(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    from .lab import LAB_NAME, LabError, lab_hosts, lab_is_up, render_lab, run_labctl

    out, err = _streams(stdout, stderr)
    try:
        project = find_project_dir(args.project_dir)
        if args.lab_action == "status":
            info = lab_hosts(project)
            code = EXIT_OK if lab_is_up(info) else EXIT_UNHEALTHY
            if args.json:
                json.dump(dict(info, up=code == EXIT_OK), out, indent=2)
                out.write("\n")
            else:
                out.write(render_lab(info))
            return code
        if args.lab_action == "down":
            done = run_labctl(project, "down", "--lab", LAB_NAME)
            if args.json:
                json.dump({"lab": LAB_NAME, "removed": done.returncode == 0}, out)
                out.write("\n")
            elif done.returncode == 0:
                out.write(f"Lab {LAB_NAME} removed.\n")
            return EXIT_OK if done.returncode == 0 else EXIT_ERROR
        started = run_labctl(project, "up", "--lab", LAB_NAME)
        if started.returncode != 0:
            print("aphrodite-deploy lab up: labctl could not start the lab (see above)", file=err)
            return EXIT_ERROR
        payload: dict[str, Any] = {"lab": lab_hosts(project)}
        code = EXIT_OK
        if not args.no_deploy:
            deploy_args = argparse.Namespace(**vars(args))
            for name, value in (("vault_password_file", None), ("check", False), ("diff", False), ("limit", None),
                                ("tags", None), ("skip_tags", None), ("forks", None)):
                setattr(deploy_args, name, value)
            code, deployed, text = _deploy(deploy_args, err, inventory=str(project / "inventories" / LAB_NAME))
            if deployed is None:
                return code
            payload["deploy"] = deployed
            if not args.json:
                out.write(text)
        if args.json:
            json.dump(payload, out, indent=2)
            out.write("\n")
        else:
            out.write(render_lab(payload["lab"]))
        return code
    except (RunnerError, LabError) as exc:
        print(f"aphrodite-deploy lab {args.lab_action}: {exc}", file=err)
        return EXIT_ERROR


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
    """The plan as a table a person reads: one line per replica, idle GPUs, then why each layout."""
    header = ("REPLICA", "MODEL", "TP", "PP", "GPUS", "PORT", "WEIGHTS/GPU", "KV TOKENS", "SEQS", "DECODE TOK/S")
    rows = [header]
    for model, replicas in plan.deployments:
        for replica in replicas:
            gpus = " ".join(f"{host}[{_ranges(list(indices))}]" for host, indices in replica.placement)
            rows.append((
                replica.name, model, str(replica.tensor_parallel_size), str(replica.pipeline_parallel_size),
                gpus, str(replica.port), f"{replica.weights_gib_per_gpu:.2f} GiB", f"{replica.kv_cache_tokens:,}",
                f"{replica.est_concurrency:,}", f"~{replica.est_decode_tokens_per_s:,.0f}",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 5, 6, 7, 8, 9}
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
    lines += ["", f"Idle GPUs: {idle or 'none'}"]
    lines += _layout_lines(plan)
    lines += ["", "Engine arguments of each model's first replica (head node):"]
    for model, replicas in plan.deployments:
        if replicas:
            lines.append(f"  {replicas[0].name}: aphrodite run {' '.join(replicas[0].argv)}")
    return "\n".join(lines) + "\n"


def _layout_lines(plan: Plan) -> list[str]:
    """Per model, the layouts its objective compared, chosen first (SEQS and tok/s are estimates)."""
    lines: list[str] = []
    for (model, _replicas), comparison in zip(plan.deployments, plan.comparisons):
        layouts = sorted(comparison.get("layouts", []), key=lambda entry: not entry["chosen"])
        if not layouts:
            continue
        objective = comparison.get("objective", "throughput")
        key = "tokens/s per host" if objective == "throughput" else "inter-token latency at min_concurrency"
        lines += ["", f"Layouts compared for {model} (objective {objective}: {key}):"]
        for entry in layouts:
            shape = f"TP {entry['tensor_parallel_size']}"
            if "nodes" in entry:
                shape += f" × PP {entry['pipeline_parallel_size']} over {entry['nodes']} nodes"
            else:
                shape += f", {entry['replicas_per_host']} per host"
            lines.append(
                f"  {'*' if entry['chosen'] else ' '} {shape} on {entry['gpu']}: {entry['kv_cache_tokens']:,} KV tokens, "
                f"{entry['est_concurrency']:,} seqs, ~{entry['est_decode_tokens_per_s']:,} tok/s per replica, "
                f"~{entry['est_tokens_per_s_per_host']:,} per host, {entry['est_inter_token_ms']} ms/token "
                f"({entry['est_inter_token_ms_at_min_concurrency']} at min_concurrency)"
            )
    return lines

if __name__ == "__main__":
    sys.exit(main())
