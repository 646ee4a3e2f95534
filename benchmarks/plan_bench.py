#!/usr/bin/env python3
"""How long planning a large fleet takes: 1,000 nodes × 8 GPUs must plan in under a second.

    .venv/bin/python benchmarks/plan_bench.py [--nodes 1000] [--repeat 5]

Plans three models (Llama-3.1-70B at TP 4 (the capacity model's pick), Llama-3.1-8B at TP 1, Llama-3.1-405B FP8 at
TP 8 with a fixed count) over declared 8×H100 nodes, through the same entry point as the
filter plugin and the CLI, and prints the best of a few runs. Not a unit test: timings
depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aphrodite_deploy  # noqa: E402,F401  (maps aphrodite_deploy._core to plugins/module_utils)
from aphrodite_deploy._core._plan_input import plan_inventory  # noqa: E402

MODELS = ROOT / "tests" / "data" / "models"
H100X8 = {"count": 8, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "interconnect": "nvlink"}
LIMIT_SECONDS = 1.0


def fleet(nodes: int) -> tuple[list[dict], dict, dict]:
    hosts = [f"gpu-{i:04d}" for i in range(nodes)]
    hostvars = {h: {"aphrodite_gpus_declared": H100X8, "ansible_host": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"}
                for i, h in enumerate(hosts)}
    models = [
        {"id": "meta-llama/Llama-3.1-405B-Instruct-FP8", "config": str(MODELS / "llama-3.1-405b-instruct-fp8" / "config.json"),
         "replicas": nodes // 10},
        {"id": "meta-llama/Llama-3.1-70B-Instruct", "config": str(MODELS / "llama-3.1-70b-instruct" / "config.json")},
        {"id": "meta-llama/Llama-3.1-8B-Instruct", "config": str(MODELS / "llama-3.1-8b-instruct" / "config.json")},
    ]
    return models, hostvars, {"all": hosts, "gpu_nodes": hosts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    models, hostvars, groups = fleet(args.nodes)
    best = float("inf")
    plan = None
    for _ in range(args.repeat):
        start = time.perf_counter()
        plan = plan_inventory(models, hostvars, groups)
        best = min(best, time.perf_counter() - start)
    assert plan is not None
    replicas = sum(len(r) for _, r in plan.deployments)
    gpus = sum(r.tensor_parallel_size * r.pipeline_parallel_size for _, rs in plan.deployments for r in rs)
    idle = sum(len(v) for v in plan.idle_gpus.values())
    print(f"planned {args.nodes} nodes × 8 GPUs: {replicas} replicas on {gpus} GPUs, {idle} idle; "
          f"best of {args.repeat}: {best:.3f} s (limit {LIMIT_SECONDS:.1f} s)")
    return 0 if best < LIMIT_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
