#!/usr/bin/env python3
"""What converging and re-running site.yml costs on a lab fleet, and how it grows with hosts.

    .venv/bin/python benchmarks/fleet_bench.py [--sizes 4,12,40] [--repeat 3] [--full 0] [--mitogen]
    .venv/bin/python benchmarks/fleet_bench.py --as-is [--repeat 3]     # the lab kept up by --keep

Brings up its own lab (``bench``, 172.28.90.0/24, beside `make lab`'s) with lab/labctl.py:
two load balancers, one NFS + monitoring host and GPU-node-like hosts (the lab's replayed
8xH100), two engine replicas per GPU node.  In one run it measures

1. a fresh converge of the first fleet (new hosts; lab images cached, the apt cache as
   it is: empty .lab/apt-cache to measure a cold one), with its ten slowest tasks;
2. on that fleet, ``--repeat`` times each, interleaved: a facts-only play (the floor:
   Ansible's own fact gathering, every default subset, on every host) and a no-op re-run
   of site.yml; ``--full`` of those rounds add a re-run with the fast path off (every
   task runs, as after a change of inputs), and ``--mitogen`` the same under Mitogen;
3. for each further size: adding the GPU nodes that make it (the inputs change, so every
   host runs every task and the new ones install everything), then the same rounds
   (one fast-path-off re-run at most), and the memory the bench hosts use;

and prints each figure (median, min-max), the ratio no-op / facts-only at each size,
how each grows per added host, and the ten slowest tasks of the median no-op re-run of
the largest fleet.  A no-op re-run that changes anything is reported as such: it is not
a no-op.  Each run's log and the results go to .lab/bench_runs/ (--json puts
results.json elsewhere); --markdown prints the tables for the README.

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
def fleet(size: int, gpu_max: int | None = None) -> list[tuple[str, str]]:
    """The fleet of ``size`` hosts: the fixed ones, then GPU nodes; past ``gpu_max`` hosts,
    hosts of no service group (``nodes``: base layer, firewall and node exporter only)."""
    gpu_max = size if gpu_max is None else min(size, gpu_max)
    gpus = gpu_max - len(FIXED_HOSTS)
    if gpus < 1:
        raise BenchError(f"a fleet of {size} hosts leaves no GPU node: give at least {len(FIXED_HOSTS) + 1}")
    return (FIXED_HOSTS + [(f"bench-gpu{i:02d}", "gpu_nodes") for i in range(1, gpus + 1)]
            + [(f"bench-node{i:02d}", "nodes") for i in range(1, size - gpu_max + 1)])


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


def _cgroup_memory(name: str) -> tuple[int, int] | None:
    """RSS and page cache (bytes) of a container and everything in it (its nested Docker too),
    from its memory cgroup: the lab's hosts run systemd with the host's cgroup namespace,
    where `docker stats` reads nothing."""
    cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                         check=False).stdout.strip()
    for path in (Path("/sys/fs/cgroup/memory/docker") / cid / "memory.stat",
                 Path("/sys/fs/cgroup/system.slice") / f"docker-{cid}.scope" / "memory.stat"):
        if cid and path.is_file():
            stat = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
            if "total_rss" in stat:  # cgroup v1
                return int(stat["total_rss"]), int(stat.get("total_cache", 0))
            if "anon" in stat:  # cgroup v2
                return int(stat["anon"]), int(stat.get("file", 0))
    return None


def memory() -> dict:
    """What the bench hosts use (MiB: resident, and page cache apart) and what the machine has
    left (MemAvailable)."""
    names = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True,
                           check=False).stdout.split()
    rss = cache = hosts = 0
    for name in names:
        if not name.startswith("bench-"):
            continue
        found = _cgroup_memory(name)
        if found is not None:
            rss, cache, hosts = rss + found[0], cache + found[1], hosts + 1
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) // 1024
    return {"bench_hosts": hosts, "bench_mib": rss // 2**20, "bench_cache_mib": cache // 2**20, "available_mib": available}


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
    out.write_text(json.dumps(report, indent=1))  # with its wall time, for --resume-at
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


def earlier(label: str) -> dict:
    """The report of one run of an earlier, interrupted benchmark (its wall time added as playbook() does)."""
    path = RUNS / f"{label}.json"
    if not path.is_file():
        raise BenchError(f"--resume-at: no {path} (the earlier run did not get that far)")
    report = json.loads(path.read_text())
    if "wall" not in report:  # written by a version that logged wall times only: walls.json from its log
        walls = RUNS / "walls.json"
        report["wall"] = json.loads(walls.read_text())[label] if walls.is_file() else None
    if report["wall"] is None:
        raise BenchError(f"--resume-at: no wall time for {label} (in {path} or {RUNS / 'walls.json'})")
    report["changed_total"] = sum(r["changed"] for r in report["recap"].values())
    return report


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


def growth(sizes: list[int], figures: dict, key: str) -> dict:
    """Seconds per added host between consecutive sizes (medians)."""
    return {f"{a}->{b}": round((figures[f"{key}_{b}"]["median"] - figures[f"{key}_{a}"]["median"]) / (b - a), 3)
            for a, b in zip(sizes, sizes[1:])}


def report(results: dict, markdown: bool) -> str:
    fig = results["figures"]
    sizes = results["sizes"]
    rows = [(f"fresh converge, {sizes[0]} hosts", fig["fresh_converge"])]
    for i, size in enumerate(sizes):
        if i:
            gpu_max = results.get("gpu_max") or size
            gpus = max(0, min(size, gpu_max) - sizes[i - 1])
            plain = size - max(gpu_max, sizes[i - 1]) if size > gpu_max else 0
            added = " and ".join(([f"{gpus} GPU nodes"] if gpus else []) + ([f"{plain} hosts of no service group"] if plain else []))
            rows.append((f"add {added} ({size} hosts; every host runs every task)", fig[f"grow_{size}"]))
        rows += [
            (f"facts-only play, {size} hosts", fig[f"facts_{size}"]),
            (f"no-op re-run, {size} hosts", fig[f"noop_{size}"]),
            (f"re-run with the fast path off, {size} hosts", fig.get(f"full_{size}")),
            (f"same, Mitogen strategy, {size} hosts", fig.get(f"mitogen_{size}")),
        ]
    rows = [(name, s) for name, s in rows if s]
    ratios = results["ratios"]
    largest = sizes[-1]
    lines = []
    if markdown:
        lines += ["| measurement | median | min-max | runs |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['median']:.1f} s | {s['min']:.1f}-{s['max']:.1f} s | {s['n']} |" for name, s in rows]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
        lines += ["", "| seconds per added host | no-op re-run | facts-only |", "|---|---:|---:|"]
        lines += [f"| {k} hosts | {results['growth']['noop'][k]:.3f} | {results['growth']['facts'][k]:.3f} |"
                  for k in results["growth"]["noop"]]
        lines += ["", "| hosts | bench hosts' resident memory (MiB) | their page cache (MiB) | machine's MemAvailable (MiB) |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {size} | {m['bench_mib']} | {m.get('bench_cache_mib', '?')} | {m['available_mib']} |"
                  for size, m in results["memory"].items()]
        for title, key in ((f"Ten slowest tasks of the fresh converge ({sizes[0]} hosts)", "slowest_fresh"),
                           (f"Ten slowest tasks of the median no-op re-run ({largest} hosts)", f"slowest_noop_{largest}")):
            lines += ["", f"{title}:", "", "| seconds | task | play |", "|---:|---|---|"]
            lines += [f"| {t['seconds']:.2f} | {t['task']} | {t['play']} |" for t in results[key]]
    else:
        lines += [f"{name:60} {fmt(s)}" for name, s in rows]
        lines += [""] + [f"{k:60} {v:7.2f}" for k, v in ratios.items()]
        lines += [""] + [f"per added host {k:45} no-op {results['growth']['noop'][k]:6.3f} s, facts-only "
                         f"{results['growth']['facts'][k]:6.3f} s" for k in results["growth"]["noop"]]
        lines += [""] + [f"memory at {size:3} hosts: bench hosts {m['bench_mib']} MiB resident, "
                         f"{m.get('bench_cache_mib', '?')} MiB page cache; machine available {m['available_mib']} MiB"
                         for size, m in results["memory"].items()]
        for title, key in ((f"ten slowest tasks of the fresh converge, {sizes[0]} hosts:", "slowest_fresh"),
                           (f"ten slowest tasks of the median no-op re-run, {largest} hosts:", f"slowest_noop_{largest}")):
            lines += ["", title]
            lines += [f"  {t['seconds']:6.2f} s  {t['task']}  [{t['play']}]" for t in results[key]]
    if results["not_noop"]:
        lines += ["", "NOT A NO-OP: these re-runs changed something:"]
        lines += [f"  {label}: {', '.join(changes)}" for label, changes in results["not_noop"].items()]
    return "\n".join(lines)


def as_is(site: Path, args: argparse.Namespace) -> int:
    """--as-is: the pairs on the lab that is up, after one run that converges it."""
    import yaml

    if not (INVENTORY / "hosts.yml").is_file():
        print(f"fleet_bench: --as-is needs a bench lab kept up (--keep): no {INVENTORY / 'hosts.yml'}", file=sys.stderr)
        return 2
    children = yaml.safe_load((INVENTORY / "hosts.yml").read_text())["all"]["children"]
    size = len({h for group in children.values() for h in (group or {}).get("hosts", {}) or {}})
    RUNS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        converge = playbook(site, f"asis-{stamp}-{size}-converge")
        runs = measure(facts_playbook(), site, args.repeat, f"asis-{stamp}-{size}", 0, False)
    except BenchError as exc:
        print(f"fleet_bench: {exc}", file=sys.stderr)
        return 2
    facts = summary([r["wall"] for r in runs["facts"]])
    noop = summary([r["wall"] for r in runs["noop"]])
    results = {"size": size, "converge": converge["wall"], "facts": facts, "noop": noop,
               "ratio": round(noop["median"] / facts["median"], 2), "memory": memory(),
               "slowest_noop": slowest(runs["noop"]),
               "not_noop": [r["changed"] for r in runs["noop"] if r["changed_total"]]}
    out = RUNS / f"asis-{stamp}-{size}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{size} hosts: converging run {converge['wall']:.1f} s; facts-only {fmt(facts)}; no-op {fmt(noop)}; "
          f"ratio {results['ratio']:.2f}")
    for task in results["slowest_noop"]:
        print(f"  {task['seconds']:6.2f} s  {task['task']}  [{task['play']}]")
    if results["not_noop"]:
        print("NOT A NO-OP: a re-run changed something (see the logs in .lab/bench_runs)")
    log(f"results in {out}")
    return 1 if results["not_noop"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,12,40",
                        help="fleet sizes in hosts, growing, comma-separated (default 4,12,40; at least 4 each)")
    parser.add_argument("--repeat", type=int, default=3, help="facts-only / no-op pairs per fleet size (default 3)")
    parser.add_argument("--json", type=Path, default=RUNS / "results.json", help="where the results go")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--full", type=int, default=0, metavar="N",
                        help="also N re-runs with the fast path off on the first fleet, one on the others (default 0)")
    parser.add_argument("--mitogen", action="store_true",
                        help="also the first fleet's fast-path-off re-runs under Mitogen (pip install mitogen)")
    parser.add_argument("--keep", action="store_true", help="leave the bench lab up afterwards")
    parser.add_argument("--gpu-max", type=int, metavar="N",
                        help="grow past N hosts with hosts of no service group instead of GPU nodes (cheaper to converge)")
    parser.add_argument("--as-is", action="store_true",
                        help="measure the bench lab that is up (from --keep), at its size, without bringing up or adding "
                             "hosts: one converging run of site.yml (the inputs may have changed), then the interleaved pairs")
    parser.add_argument("--resume-at", type=int, metavar="N",
                        help="the bench lab is up and converged at N hosts, one of --sizes, and .lab/bench_runs holds an "
                             "earlier run's reports up to N (an interrupted run): take those, measure only the larger sizes")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers of hosts, such as 4,12,40")
    if sizes != sorted(set(sizes)):
        parser.error("--sizes must grow: each fleet adds GPU nodes to the one before")

    site = ROOT / "site.yml"
    if args.as_is:
        return as_is(site, args)
    if args.mitogen:
        try:
            mitogen_env()
        except BenchError as exc:
            parser.error(str(exc))
    if args.resume_at is not None and args.resume_at not in sizes:
        parser.error("--resume-at must be one of --sizes")
    if args.resume_at is None:
        lab_down()
        shutil.rmtree(RUNS, ignore_errors=True)
    try:
        RUNS.mkdir(parents=True, exist_ok=True)
        facts = facts_playbook()
        started = time.monotonic()
        figures: dict = {}
        runs: dict = {}
        mem: dict = {}
        fresh = None
        for i, size in enumerate(sizes):
            if args.resume_at is not None and size <= args.resume_at:
                log(f"{size} hosts: the reports of an earlier run")
                if i == 0:
                    fresh = earlier(f"{size}-fresh")
                    figures["fresh_converge"] = summary([fresh["wall"]])
                else:
                    figures[f"grow_{size}"] = summary([earlier(f"{size}-grow")["wall"]])
                runs[size] = {kind: [earlier(f"{size}-{kind}-{n}") for n in range(1, args.repeat + 1)]
                              if kind in ("facts", "noop") else [] for kind in ("facts", "noop", "full", "mitogen")}
                # The lab is at this size now: measure it (an older run read nothing with docker stats).
                mem[size] = memory() if size == args.resume_at else json.loads((RUNS / f"memory-{size}.json").read_text())
                for kind in ("facts", "noop"):
                    figures[f"{kind}_{size}"] = summary([r["wall"] for r in runs[size][kind]])
                continue
            log(f"bringing up {size} hosts")
            write_inventory(lab_up(fleet(size, args.gpu_max)))
            converge = playbook(site, f"{size}-fresh" if i == 0 else f"{size}-grow")
            if i == 0:
                fresh = converge
                figures["fresh_converge"] = summary([converge["wall"]])
            else:
                figures[f"grow_{size}"] = summary([converge["wall"]])
            runs[size] = measure(facts, site, args.repeat, str(size), args.full if i == 0 else min(args.full, 1),
                                 args.mitogen and i == 0)
            mem[size] = memory()
            (RUNS / f"memory-{size}.json").write_text(json.dumps(mem[size]) + "\n")
            log(f"{size} hosts: {mem[size]}")
            for kind in ("facts", "noop", "full", "mitogen"):
                if runs[size][kind]:
                    figures[f"{kind}_{size}"] = summary([r["wall"] for r in runs[size][kind]])
        ratios = {f"no-op / facts-only, {size} hosts": figures[f"noop_{size}"]["median"] / figures[f"facts_{size}"]["median"]
                  for size in sizes}
        for a, b in zip(sizes, sizes[1:]):
            ratios[f"no-op {b} / {a} hosts (hosts: {b / a:.1f})"] = figures[f"noop_{b}"]["median"] / figures[f"noop_{a}"]["median"]
            ratios[f"facts-only {b} / {a} hosts"] = figures[f"facts_{b}"]["median"] / figures[f"facts_{a}"]["median"]
        every = [r for size in sizes for kind in ("noop", "full", "mitogen") for r in runs[size][kind]]
        results = {
            "sizes": sizes, "repeat": args.repeat, "gpu_max": args.gpu_max,
            "machine": {"cpus": os.cpu_count()},
            "figures": figures,
            "ratios": ratios,
            "growth": {"noop": growth(sizes, figures, "noop"), "facts": growth(sizes, figures, "facts")},
            "memory": mem,
            "slowest_fresh": slowest([fresh]),
            **{f"slowest_noop_{size}": slowest(runs[size]["noop"]) for size in sizes},
            "not_noop": {
                f"re-run {i}": sorted({f"{c['host']}: {c['task']}" for c in r["changed"]})
                for i, r in enumerate(every, start=1) if r["changed_total"]
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
