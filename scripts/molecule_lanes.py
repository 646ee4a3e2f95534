#!/usr/bin/env python3
"""Run every Molecule scenario, two at a time, and fail if any fails.

`molecule test --all` runs the scenarios one after another; on a 2-core CI machine most
of each scenario's time is waiting (SSH round trips, systemd, apt, sleeps in the tests),
so two lanes finish in about 60 % of the time.  Scenarios can run side by side because
each has its own lab network, subnet and host names (molecule/*/molecule.yml).

What they share is made first, once, so that no scenario changes it under another: the
host and fixture images, the SSH key and lab secrets, every scenario's network and the
package cache on those networks' gateways (``labctl.py net``).  A keeper network stays
up until the end so the cache is never stopped between two scenarios.

Each scenario's output goes to tests/output/molecule/<scenario>.log and is printed whole
when the scenario ends, so the CI log reads one scenario at a time.  The longest
scenarios start first (by the last passing run's durations, kept in tests/output/molecule).

CI keeps only the end of its output, so the summary at the end repeats, for each failed
scenario, the lines that say why: Ansible's fatal and failed results and pytest's failures.

Usage: scripts/molecule_lanes.py [--lanes N] [SCENARIO ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LABCTL = [sys.executable, str(ROOT / "lab" / "labctl.py")]
OUTPUT = ROOT / "tests" / "output" / "molecule"
KEEPER = ("molecule-lanes", "172.28.99.0/24")
# Seconds of each scenario in two lanes on 2 cores beside the checks (6 Dec 2026), for the
# order only: the longest start first, as a fresh checkout keeps no durations of its own.
EXPECTED = {"default": 1100, "edge": 966, "operations": 822, "gpu_hosts": 537, "firewall": 272,
            "storage": 230}


def scenarios() -> dict[str, str]:
    """Scenario name -> its lab subnet, for every scenario with a molecule.yml."""
    found = {}
    for path in sorted((ROOT / "molecule").glob("*/molecule.yml")):
        driver = (yaml.safe_load(path.read_text()) or {}).get("driver") or {}
        found[path.parent.name] = driver.get("lab_subnet", "172.28.20.0/24")
    return found


def prepare(selected: dict[str, str]) -> None:
    for what in ("image", "engine-image", "dcgm-image"):
        subprocess.run(LABCTL + [what], check=True, stdout=subprocess.DEVNULL)
    subnets = list(selected.values()) + [KEEPER[1]]
    if len(set(subnets)) != len(subnets):
        raise SystemExit(f"molecule_lanes: two scenarios share a lab subnet: {sorted(selected.items())}")
    for lab, subnet in [KEEPER] + [(f"molecule-{name}", net) for name, net in selected.items()]:
        subprocess.run(LABCTL + ["net", "--lab", lab, "--subnet", subnet], check=True)


def run_lanes(names: list[str], lanes: int) -> dict[str, tuple[int, float]]:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    queue = list(names)
    results: dict[str, tuple[int, float]] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
                print(f"molecule_lanes: start {name} ({time.strftime('%H:%M:%S')})", flush=True)
            log = OUTPUT / f"{name}.log"
            start = time.monotonic()
            with log.open("wb") as out:
                rc = subprocess.run(["molecule", "test", "-s", name], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, check=False).returncode
            took = time.monotonic() - start
            with lock:
                results[name] = (rc, took)
                sys.stdout.write(f"\n===== molecule scenario {name}: "
                                 f"{'passed' if rc == 0 else f'FAILED (rc {rc})'} in {took:.0f} s =====\n")
                sys.stdout.write(log.read_text(errors="replace"))
                sys.stdout.write(f"===== end of scenario {name} =====\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=worker) for _ in range(max(1, lanes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# Lines that say why a scenario failed: Ansible's failed results (with the lines of their
# message after them) and pytest's summary lines.
RESULT = ("fatal: [", "failed: [")
SUMMARY = ("FAILED ", "ERROR ", "E   ", "CRITICAL ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def why_failed(log: Path, limit: int = 40, width: int = 300, follow: int = 8) -> list[str]:
    """The last `limit` lines of a scenario's log that say why it failed, each cut to `width`:
    every failed Ansible result with the `follow` lines of its message, and pytest's failures.
    Molecule frames Ansible's output (colours, a bar); the frame is taken off."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    lines = [ANSI.sub("", line).lstrip(" \u2502").rstrip() for line in text.splitlines()]
    found: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(RESULT):
            found.extend(lines[index:index + 1 + follow])
            index += 1 + follow
            continue
        if line.startswith(SUMMARY):
            found.append(line)
        index += 1
    return [line[:width] for line in found][-limit:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lanes", type=int, default=int(os.environ.get("MOLECULE_LANES", "2")))
    parser.add_argument("scenario", nargs="*")
    args = parser.parse_args(argv)
    found = scenarios()
    unknown = sorted(set(args.scenario) - set(found))
    if unknown:
        parser.error(f"no such scenario: {', '.join(unknown)} (have: {', '.join(found)})")
    selected = {name: found[name] for name in (args.scenario or found)}
    durations_file = OUTPUT / "durations.json"
    try:
        last = json.loads(durations_file.read_text())
    except (OSError, ValueError):
        last = {}
    order = sorted(selected, key=lambda n: -float(last.get(n, EXPECTED.get(n, 300))))

    begin = time.monotonic()
    try:
        prepare(selected)
        results = run_lanes(order, args.lanes)
    finally:
        subprocess.run(LABCTL + ["down", "--lab", KEEPER[0]], check=False)
    wall = time.monotonic() - begin

    OUTPUT.mkdir(parents=True, exist_ok=True)
    # Kept for the next run's order: a scenario that failed stopped early, and one not run
    # this time keeps its last duration.
    kept = {**(last if isinstance(last, dict) else {}), **{n: round(t) for n, (rc, t) in results.items() if rc == 0}}
    durations_file.write_text(json.dumps({n: kept[n] for n in sorted(kept) if n in found}, indent=1) + "\n")
    print(f"\nmolecule_lanes: {len(results)} scenarios in {args.lanes} lanes, {wall:.0f} s wall "
          f"({sum(t for _, t in results.values()):.0f} s of scenario time)")
    for name in order:
        rc, took = results.get(name, (None, 0.0))
        state = "not run" if rc is None else ("passed" if rc == 0 else f"FAILED rc {rc}")
        print(f"  {name:12} {took:6.0f} s  {state}")
    for name in order:
        if results.get(name, (0, 0))[0] not in (0, None):
            print(f"\nmolecule_lanes: why {name} failed (tests/output/molecule/{name}.log):")
            for line in why_failed(OUTPUT / f"{name}.log"):
                print(f"  | {line}")
    return 0 if all(results.get(n, (1, 0))[0] == 0 for n in order) else 1


if __name__ == "__main__":
    sys.exit(main())
