"""Hardware and models of the deployment guide, shared by the planner tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parents[3] / "data" / "models"

MODEL_IDS = {
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.1-70b-instruct-awq-int4": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
    "llama-3.1-405b-instruct": "meta-llama/Llama-3.1-405B-Instruct",
    "llama-3.1-405b-instruct-fp8": "meta-llama/Llama-3.1-405B-Instruct-FP8",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "mixtral-8x7b-instruct-v0.1": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}


def declared(count: int, name: str, memory_mib: int, interconnect: str) -> dict[str, Any]:
    return {"count": count, "name": name, "memory_mib": memory_mib, "interconnect": interconnect}


RTX3090 = declared(1, "NVIDIA GeForce RTX 3090", 24576, "pcie")
RTX4090X2 = declared(2, "NVIDIA GeForce RTX 4090", 24564, "pcie")
A100X4 = declared(4, "NVIDIA A100-SXM4-80GB", 81920, "nvlink")
H100X8 = declared(8, "NVIDIA H100 80GB HBM3", 81559, "nvlink")

HARDWARE = {
    "1xRTX3090": {"gpu1": RTX3090},
    "2xRTX4090": {"gpu1": RTX4090X2},
    "4xA100-80GB": {"gpu1": A100X4},
    "8xH100": {"gpu1": H100X8},
    "2x8xH100": {"gpu1": H100X8, "gpu2": H100X8},
}


def model(directory: str, **options: Any) -> dict[str, Any]:
    """An aphrodite_models entry for a test model."""
    return {"id": MODEL_IDS[directory], "config": str(MODELS_DIR / directory / "config.json"), **options}


def inventory(hosts: dict[str, dict[str, Any]], **extra_vars: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(hostvars, groups) of an inventory whose gpu_nodes declare ``hosts``."""
    hostvars = {name: {"aphrodite_gpus_declared": facts, "ansible_host": f"10.0.0.{i + 1}", **extra_vars}
                for i, (name, facts) in enumerate(hosts.items())}
    return hostvars, {"all": list(hosts), "gpu_nodes": list(hosts)}


def gathered(count: int, name: str = "NVIDIA H100 80GB HBM3", memory_mib: int = 81559,
             nvlink_groups: list[list[int]] | None = None, numa: list[int | None] | None = None,
             source: str = "nvidia-smi", capability: str = "9.0", mig: bool = False) -> dict[str, Any]:
    """aphrodite_gpus facts as the gpu_facts module returns them."""
    numa = numa if numa is not None else [None] * count
    gpus = [{
        "index": i, "uuid": f"GPU-{i:08d}", "name": name,
        "memory_mib": memory_mib if source == "nvidia-smi" else None,
        "pci_bus_id": f"00000000:{i + 4:02X}:00.0", "numa_node": numa[i],
        "compute_capability": capability if source == "nvidia-smi" else None,
        "persistence_mode": "Enabled", "mig_mode": "Enabled" if mig else "Disabled",
    } for i in range(count)]
    nodes: dict[str, list[int]] = {}
    for i, node in enumerate(numa):
        if node is not None:
            nodes.setdefault(str(node), []).append(i)
    return {
        "source": source, "driver_version": "550.90.07" if source == "nvidia-smi" else None, "count": count,
        "gpus": gpus, "nvlink_groups": nvlink_groups if nvlink_groups is not None else [list(range(count))],
        "nvswitch": False, "mig_enabled": mig, "numa_nodes": nodes, "links": {}, "notes": [],
    }
