#!/usr/bin/env python3
"""What converging and re-running site.yml costs on a lab fleet, and how it grows with hosts.

    .venv/bin/python benchmarks/fleet_bench.py [--small 4] [--large 12] [--repeat 3] [--full 2] [--mitogen]

Brings up its own lab (``bench``, 172.28.90.0/24, beside `make lab`'s) with lab/labctl.py:
two load balancers, one NFS + monitoring host and GPU-node-like hosts (the lab's replayed
8xH100), two engine replicas per GPU node.  In one run it measures

1. a fresh converge of the small fleet (new hosts; lab images cached, the apt cache as
   it is: empty .lab/apt-cache to measure a cold one);
2. on the small fleet, ``--repeat`` times each, interleaved: a facts-only play (the floor:
   Ansible's own fact gathering, every default subset, on every host) and a no-op re-run
   of site.yml; ``--full`` of those rounds add a re-run with the fast path off (every
   task runs, as after a change of inputs), and ``--mitogen`` the same under Mitogen;
3. adding the GPU nodes that make the large fleet (the inputs change, so every host runs
   every task and the new ones install everything), then the same rounds on the large
   fleet (one fast-path-off re-run at most);

and prints each figure (median, min-max), the ratios (no-op / facts-only; large / small)
and the ten slowest tasks of the median no-op re-run.  A no-op re-run that changes
anything is reported as such: it is not a no-op.  Each run's log and the results go
to .lab/bench_runs/ (--json puts results.json elsewhere); --markdown prints the
tables for the README.

Not a test: the figures depend on the machine.  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABCTL = [sys.executable, str(ROOT / "lab" / "labctl.py")]
LAB = "bench"
SUBNET = "172.28.90.0/24"
STATE = ROOT / ".lab" / LAB
# Logs and reports of each run; kept when the bench lab goes.
RUNS = ROOT / ".lab" / "bench_runs"
# Two levels below the checkout, like inventories/lab, so the lab group_vars' paths
# ({{ inventory_dir }}/../../.lab/..., ../../lab/fixtures/...) resolve unchanged.
INVENTORY = ROOT / ".lab" / "bench_inventory"
SOURCE_INVENTORY = ROOT / "inventories" / "lab"
# Container names are global: these must not clash with `make lab`'s or Molecule's.
FIXED_HOSTS = [("bench-lb1", "loadbalancers"), ("bench-lb2", "loadbalancers"),
               ("bench-nfs1", "nfs_servers,monitoring")]
REPLICAS_PER_NODE = 2
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or "ansible-playbook"


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the fleet
def fleet(size: int) -> list[tuple[str, str]]:
    gpus = size - len(FIXED_HOSTS)
    if gpus < 1:
        raise BenchError(f"a fleet of {size} hosts leaves no GPU node: give at least {len(FIXED_HOSTS) + 1}")
    return FIXED_HOSTS + [(f"bench-gpu{i:02d}", "gpu_nodes") for i in range(1, gpus + 1)]


def lab_up(hosts: list[tuple[str, str]]) -> dict:
    args = LABCTL + ["up", "--lab", LAB, "--subnet", SUBNET, "--json"]
    for name, groups in hosts:
        args += ["--host", f"{name}:{groups}"]
    proc = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchError("labctl up failed (its message is above)")
    return json.loads(proc.stdout)


def lab_down() -> None:
    subprocess.run(LABCTL + ["down", "--lab", LAB], cwd=ROOT, check=False)
    shutil.rmtree(INVENTORY, ignore_errors=True)


def write_inventory(info: dict) -> None:
    """The lab inventory's variables over the bench hosts, its own known_hosts and VIP."""
    import yaml

    shutil.rmtree(INVENTORY, ignore_errors=True)
    shutil.copytree(SOURCE_INVENTORY, INVENTORY, ignore=shutil.ignore_patterns("hosts.yml"))
    conn = INVENTORY / "group_vars" / "lab.yml"
    text = conn.read_text()
    if ".lab/lab/known_hosts" not in text:
        raise BenchError(f"{conn}: no .lab/lab/known_hosts to point at the bench lab's")
    conn.write_text(text.replace(".lab/lab/known_hosts", f".lab/{LAB}/known_hosts"))

    children: dict[str, dict] = {}
    for host in info["hosts"]:
        for group in host["groups"]:
            children.setdefault(group, {"hosts": {}})["hosts"][host["name"]] = {"ansible_host": host["address"]}
    children["lab"] = {"children": {g: None for g in list(children)}}
    (INVENTORY / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": children}}, sort_keys=False))

    models = yaml.safe_load((SOURCE_INVENTORY / "group_vars" / "all" / "models.yml").read_text())["aphrodite_models"]
    gpu_nodes = len(children["gpu_nodes"]["hosts"])
    for model in models:
        model["replicas"] = REPLICAS_PER_NODE * gpu_nodes
    net_base = SUBNET.split("/")[0].rsplit(".", 1)[0]
    overrides = {"aphrodite_vip": f"{net_base}.100", "aphrodite_models": models}
    (INVENTORY / "group_vars" / "all" / "zz_bench.yml").write_text(
        "---\n# Written by benchmarks/fleet_bench.py.\n" + yaml.safe_dump(overrides, sort_keys=False))


# --------------------------------------------------------------------------- one run
def playbook(path: Path, label: str, extra: list[str] | None = None, env_extra: dict | None = None) -> dict:
    """Run one playbook against the bench inventory; its bench_timer report, plus the wall time."""
    out = RUNS / f"{label}.json"
    log_path = RUNS / f"{label}.log"
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CALLBACK_PLUGINS": str(ROOT / "benchmarks" / "callback_plugins"),
        "ANSIBLE_CALLBACKS_ENABLED": "bench_timer",
        "BENCH_TIMER_OUT": str(out),
        "ANSIBLE_FORCE_COLOR": "false",
        # Its own fact cache: the bench hosts share names with `make lab`'s.
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(RUNS / "facts"),
    })
    env.update(env_extra or {})
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    with log_path.open("w") as fh:
        proc = subprocess.run([ANSIBLE_PLAYBOOK, str(path), "-i", str(INVENTORY), *(extra or [])], cwd=ROOT, env=env,
                              stdout=fh, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"{path.name} ({label}) failed: see {log_path}")
    report = json.loads(out.read_text())
    report["wall"] = round(wall, 2)
    report["changed_total"] = sum(r["changed"] for r in report["recap"].values())
    log(f"{label}: {wall:6.1f} s, changed={report['changed_total']}, {len(report['recap'])} hosts")
    return report


def facts_playbook() -> Path:
    """Ansible's own fact gathering (every default subset) on every host, whatever the
    fact cache holds: an explicit task, since `gathering = smart` would reuse cached facts."""
    path = RUNS / "facts_only.yml"
    path.write_text("---\n- name: Facts only\n  hosts: all\n  gather_facts: false\n  tasks:\n"
                    "    - name: Gather facts\n      ansible.builtin.setup:\n")
    return path


# --------------------------------------------------------------------------- figures
def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def slowest(reports: list[dict], count: int = 10) -> list[dict]:
    """The slowest tasks of the run whose wall time is the median."""
    ordered = sorted(reports, key=lambda r: r["wall"])
    median_run = ordered[len(ordered) // 2]
    tasks = sorted(median_run["tasks"], key=lambda t: t["seconds"], reverse=True)
    return [{"seconds": t["seconds"], "task": t["task"], "play": t["play"]} for t in tasks[:count]]


FULL = ["-e", "aphrodite_fast_path=false"]


def mitogen_env() -> dict:
    try:
        import ansible_mitogen  # optional, not in requirements.txt
    except ImportError:
        raise BenchError("--mitogen needs Mitogen in the virtualenv: .venv/bin/pip install mitogen") from None

    return {"ANSIBLE_STRATEGY_PLUGINS": str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"),
            "ANSIBLE_STRATEGY": "mitogen_linear"}


def measure(facts: Path, site: Path, repeat: int, tag: str, full: int, mitogen: bool) -> dict:
    """Interleaved runs, so a slow spell of the machine hits every kind alike."""
    runs: dict[str, list[dict]] = {"facts": [], "noop": [], "full": [], "mitogen": []}
    for i in range(1, repeat + 1):
        runs["facts"].append(playbook(facts, f"{tag}-facts-{i}"))
        runs["noop"].append(playbook(site, f"{tag}-noop-{i}"))
        if i <= full:
            runs["full"].append(playbook(site, f"{tag}-full-{i}", FULL))
            if mitogen:
                runs["mitogen"].append(playbook(site, f"{tag}-full-mitogen-{i}", FULL, mitogen_env()))
    return runs


def fmt(s: dict) -> str:
    return f"{s['median']:7.1f} s  ({s['min']:.1f}-{s['max']:.1f}, n={s['n']})"


def report(results: dict, markdown: bool) -> str:
    fig = results["figures"]
    small, large = results["small"], results["large"]
    rows = [
        (f"fresh converge, {small} hosts", fig["fresh_converge"]),
        (f"facts-only play, {small} hosts", fig["facts_small"]),
        (f"no-op re-run, {small} hosts", fig["noop_small"]),
        (f"re-run with the fast path off, {small} hosts", fig.get("full_small")),
        (f"same, Mitogen strategy, {small} hosts", fig.get("mitogen_small")),
        (f"add {large - small} GPU nodes (converge them, rest no-op)", fig["grow"]),
        (f"facts-only play, {large} hosts", fig["facts_large"]),
        (f"no-op re-run, {large} hosts", fig["noop_large"]),
        (f"re-run with the fast path off, {large} hosts", fig.get("full_large")),
    ]
    rows = [(name, s) for name, s in rows if s]
    ratios = results["ratios"]
    lines = []
    if markdown:
        lines += ["| measurement | median | min-max | runs |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['median']:.1f} s | {s['min']:.1f}-{s['max']:.1f} s | {s['n']} |" for name, s in rows]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
        lines += ["", f"Ten slowest tasks of the median no-op re-run ({large} hosts):", "",
                  "| seconds | task | play |", "|---:|---|---|"]
        lines += [f"| {t['seconds']:.2f} | {t['task']} | {t['play']} |" for t in results["slowest_noop_large"]]
    else:
        lines += [f"{name:48} {fmt(s)}" for name, s in rows]
        lines += [""] + [f"{k:48} {v:7.2f}" for k, v in ratios.items()]
        lines += ["", f"ten slowest tasks of the median no-op re-run, {large} hosts:"]
        lines += [f"  {t['seconds']:6.2f} s  {t['task']}  [{t['play']}]" for t in results["slowest_noop_large"]]
    if results["not_noop"]:
        lines += ["", "NOT A NO-OP: these re-runs changed something:"]
        lines += [f"  {label}: {', '.join(changes)}" for label, changes in results["not_noop"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=4, help="hosts in the small fleet (default 4)")
    parser.add_argument("--large", type=int, default=12, help="hosts in the large fleet (default 12)")
    parser.add_argument("--repeat", type=int, default=3, help="facts-only / no-op pairs per fleet size (default 3)")
    parser.add_argument("--json", type=Path, default=RUNS / "results.json", help="where the results go")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--full", type=int, default=2, metavar="N",
                        help="also N re-runs with the fast path off per fleet size (default 2; 0 for none)")
    parser.add_argument("--mitogen", action="store_true",
                        help="also the small fleet's fast-path-off re-runs under Mitogen (pip install mitogen)")
    parser.add_argument("--keep", action="store_true", help="leave the bench lab up afterwards")
    args = parser.parse_args(argv)
    if args.large <= args.small:
        parser.error("--large must exceed --small")

    site = ROOT / "site.yml"
    if args.mitogen:
        try:
            mitogen_env()
        except BenchError as exc:
            parser.error(str(exc))
    lab_down()
    shutil.rmtree(RUNS, ignore_errors=True)
    try:
        RUNS.mkdir(parents=True)
        facts = facts_playbook()
        started = time.monotonic()

        log(f"bringing up {args.small} hosts")
        write_inventory(lab_up(fleet(args.small)))
        fresh = playbook(site, "small-fresh")
        small = measure(facts, site, args.repeat, "small", args.full, args.mitogen)

        log(f"adding {args.large - args.small} GPU nodes")
        write_inventory(lab_up(fleet(args.large)))
        grow = playbook(site, "large-grow")
        large = measure(facts, site, args.repeat, "large", min(args.full, 1), False)
        facts_small, noop_small, facts_large, noop_large = small["facts"], small["noop"], large["facts"], large["noop"]

        figures = {
            "fresh_converge": summary([fresh["wall"]]),
            "facts_small": summary([r["wall"] for r in facts_small]),
            "noop_small": summary([r["wall"] for r in noop_small]),
            "grow": summary([grow["wall"]]),
            "facts_large": summary([r["wall"] for r in facts_large]),
            "noop_large": summary([r["wall"] for r in noop_large]),
        }
        for key, runs in (("full_small", small["full"]), ("mitogen_small", small["mitogen"]),
                          ("full_large", large["full"])):
            if runs:
                figures[key] = summary([r["wall"] for r in runs])
        results = {
            "small": args.small, "large": args.large, "repeat": args.repeat,
            "machine": {"cpus": os.cpu_count()},
            "figures": figures,
            "ratios": {
                f"no-op / facts-only, {args.small} hosts": figures["noop_small"]["median"] / figures["facts_small"]["median"],
                f"no-op / facts-only, {args.large} hosts": figures["noop_large"]["median"] / figures["facts_large"]["median"],
                f"no-op {args.large} / {args.small} hosts": figures["noop_large"]["median"] / figures["noop_small"]["median"],
                f"facts-only {args.large} / {args.small} hosts": figures["facts_large"]["median"] / figures["facts_small"]["median"],
                f"hosts {args.large} / {args.small}": args.large / args.small,
            },
            "slowest_noop_small": slowest(noop_small),
            "slowest_noop_large": slowest(noop_large),
            "not_noop": {
                f"re-run {i}": sorted({f"{c['host']}: {c['task']}" for c in r["changed"]})
                for i, r in enumerate(noop_small + noop_large + small["full"] + small["mitogen"] + large["full"], start=1)
                if r["changed_total"]
            },
            "total_seconds": round(time.monotonic() - started, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(report(results, args.markdown))
        log(f"results in {args.json}; the benchmark took {results['total_seconds']:.0f} s")
        return 1 if results["not_noop"] else 0
    except BenchError as exc:
        print(f"fleet_bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            lab_down()


if __name__ == "__main__":
    sys.exit(main())
