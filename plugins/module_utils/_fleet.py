# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""The GPUs of each host, normalised from gathered or declared facts.

A host's GPUs are known either from the ``gpu_facts`` module (``aphrodite_gpus``,
gathered with nvidia-smi) or, before the hosts are reachable, from the inventory's
``aphrodite_gpus_declared``. The planner only sees :class:`HostGpus`; this module
turns both sources into it and says where they disagree. Pure Python, no Ansible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

MIB = 1024 ** 2


class FactsError(ValueError):
    """A host's GPU facts are missing, malformed or cannot be planned from."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int
    numa_node: int | None = None
    compute_capability: tuple | None = None  # (major, minor)


@dataclass(frozen=True)
class HostGpus:
    """What the planner knows about one host."""

    host: str
    gpus: tuple  # of Gpu, ordered by index
    nvlink_groups: tuple  # of tuples of GPU indices joined by NVLink
    source: str  # "declared" or "gathered"
    address: str | None = None  # where other nodes reach this host (--master-addr)
    bind_address: str | None = None  # where the engine listens (--host)

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def signature(self) -> tuple:
        """Hosts with equal signatures can form one multi-node replica."""
        return (self.count, self.gpus[0].name if self.gpus else "", min((g.memory_mib for g in self.gpus), default=0))

    @property
    def gpu_name(self) -> str:
        return self.gpus[0].name if self.gpus else "no GPU"

    @property
    def memory_mib(self) -> int:
        return min((g.memory_mib for g in self.gpus), default=0)

    def nvlink_group_of(self, index: int) -> int | None:
        for number, group in enumerate(self.nvlink_groups):
            if index in group:
                return number
        return None

    def min_compute_capability(self) -> tuple | None:
        caps = [g.compute_capability for g in self.gpus if g.compute_capability is not None]
        return min(caps) if caps else None


# Compute capability by product name, for declared facts (nvidia-smi reports it itself).
_CAPABILITY_BY_NAME = (
    ("B200", (10, 0)), ("B100", (10, 0)), ("GB200", (10, 0)),
    ("H200", (9, 0)), ("H100", (9, 0)), ("H800", (9, 0)), ("GH200", (9, 0)),
    ("L40", (8, 9)), ("L4", (8, 9)), ("RTX 40", (8, 9)), ("RTX 6000 Ada", (8, 9)), ("4090", (8, 9)), ("4080", (8, 9)),
    ("A100", (8, 0)), ("A800", (8, 0)), ("A30", (8, 0)),
    ("A40", (8, 6)), ("A10", (8, 6)), ("A16", (8, 6)), ("A6000", (8, 6)), ("RTX 30", (8, 6)), ("3090", (8, 6)), ("3080", (8, 6)),
    ("V100", (7, 0)), ("T4", (7, 5)), ("RTX 20", (7, 5)),
)


def capability_from_name(name: str) -> tuple | None:
    """Best guess of the compute capability from a product name; ``None`` if unknown."""
    for needle, capability in _CAPABILITY_BY_NAME:
        if needle.lower() in name.lower():
            return capability
    return None


def _capability(value: Any) -> tuple | None:
    if value is None:
        return None
    match = re.match(r"^\s*(\d+)\.(\d+)\s*$", str(value))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _int(value: Any, what: str, host: str, source: str) -> int:
    if isinstance(value, bool):
        raise FactsError(f"{host}: {source} {what} must be an integer, got {value!r}")
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise FactsError(f"{host}: {source} {what} must be an integer, got {value!r}")
    return number


def from_declared(host: str, declared: Mapping[str, Any], address: str | None = None,
                  bind_address: str | None = None) -> HostGpus:
    """Normalise ``aphrodite_gpus_declared`` (count, name, memory_mib, interconnect)."""
    where = "aphrodite_gpus_declared"
    if not isinstance(declared, Mapping):
        raise FactsError(f"{host}: {where} must be a mapping with count, name, memory_mib and interconnect")
    missing = [key for key in ("count", "name", "memory_mib") if declared.get(key) in (None, "")]
    if missing:
        raise FactsError(
            f"{host}: {where} lacks {', '.join(missing)}; declare for example "
            "{count: 8, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}"
        )
    count = _int(declared["count"], "count", host, where)
    memory = _int(declared["memory_mib"], "memory_mib", host, where)
    if count < 1 or count > 64:
        raise FactsError(f"{host}: {where}.count must be between 1 and 64, got {count}")
    if memory < 1024:
        raise FactsError(f"{host}: {where}.memory_mib must be the memory of one GPU in MiB (H100: 81559), got {memory}")
    interconnect = str(declared.get("interconnect", "pcie")).lower()
    if interconnect not in ("nvlink", "pcie"):
        raise FactsError(f"{host}: {where}.interconnect must be nvlink or pcie, got {interconnect!r}")
    name = str(declared["name"])
    capability = capability_from_name(name)
    gpus = tuple(Gpu(i, name, memory, None, capability) for i in range(count))
    groups = (tuple(range(count)),) if interconnect == "nvlink" and count > 1 else ()
    return HostGpus(host, gpus, groups, "declared", address, bind_address)


def from_gathered(host: str, facts: Mapping[str, Any], address: str | None = None,
                  bind_address: str | None = None) -> HostGpus:
    """Normalise the ``aphrodite_gpus`` facts of the gpu_facts module."""
    where = "aphrodite_gpus"
    if not isinstance(facts, Mapping):
        raise FactsError(f"{host}: {where} must be a mapping as returned by aphrodite.baremetal.gpu_facts")
    source = str(facts.get("source") or "none")
    if source != "nvidia-smi":
        detail = "without an NVIDIA driver, lspci does not report GPU memory" if source == "lspci" else "no NVIDIA GPU was found"
        raise FactsError(
            f"{host}: GPU facts come from {source} ({detail}), so the planner cannot size replicas on it; "
            f"declare aphrodite_gpus_declared for {host} or install the NVIDIA driver first"
        )
    if facts.get("mig_enabled"):
        raise FactsError(
            f"{host}: MIG is enabled, so its GPUs are split into instances the planner does not place replicas on; "
            f"disable MIG (nvidia-smi -mig 0) or leave {host} out of the model's hosts"
        )
    raw = facts.get("gpus") or []
    if not isinstance(raw, list) or not raw:
        raise FactsError(f"{host}: {where}.gpus is empty although source is nvidia-smi; gather facts again")
    gpus = []
    for entry in raw:
        if not isinstance(entry, Mapping):
            raise FactsError(f"{host}: {where}.gpus entries must be mappings, got {entry!r}")
        memory = entry.get("memory_mib")
        if memory in (None, ""):
            raise FactsError(f"{host}: GPU {entry.get('index')} has no memory_mib in {where}; gather facts again")
        numa = entry.get("numa_node")
        numa_node = None if numa in (None, "", -1, "-1") else _int(numa, "numa_node", host, where)
        name = str(entry.get("name") or "unknown GPU")
        gpus.append(Gpu(
            _int(entry.get("index"), "index", host, where),
            name,
            _int(memory, "memory_mib", host, where),
            numa_node,
            _capability(entry.get("compute_capability")) or capability_from_name(name),
        ))
    gpus.sort(key=lambda g: g.index)
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise FactsError(f"{host}: {where}.gpus lists GPU indices more than once: {indices}")
    known = set(indices)
    groups = []
    for group in facts.get("nvlink_groups") or []:
        members = tuple(sorted(_int(i, "nvlink group member", host, where) for i in group))
        if not set(members) <= known:
            raise FactsError(f"{host}: {where}.nvlink_groups names GPUs {members} that are not in gpus {indices}")
        if len(members) > 1:
            groups.append(members)
    return HostGpus(host, tuple(gpus), tuple(groups), "gathered", address, bind_address)


def facts_mismatches(host: str, declared: Mapping[str, Any], gathered: HostGpus) -> list:
    """Sentences naming each difference between declared and gathered GPU facts."""
    problems = []
    if not isinstance(declared, Mapping):
        return problems
    count = declared.get("count")
    if count is not None and str(count) != str(gathered.count):
        problems.append(f"{host}: aphrodite_gpus_declared.count is {count}, but the host has {gathered.count} GPUs")
    name = declared.get("name")
    names = sorted({g.name for g in gathered.gpus})
    if name and names and str(name) not in names:
        problems.append(f"{host}: aphrodite_gpus_declared.name is {name!r}, but the host has {', '.join(names)}")
    memory = declared.get("memory_mib")
    if memory not in (None, ""):
        try:
            declared_mib = int(memory)
        except (TypeError, ValueError):
            declared_mib = None
        # nvidia-smi readings vary by a few MiB between drivers and boards.
        if declared_mib is not None and abs(declared_mib - gathered.memory_mib) > max(64, declared_mib // 400):
            problems.append(
                f"{host}: aphrodite_gpus_declared.memory_mib is {declared_mib}, but the GPUs have {gathered.memory_mib} MiB"
            )
    interconnect = str(declared.get("interconnect") or "").lower()
    all_linked = bool(gathered.nvlink_groups) and len(gathered.nvlink_groups) == 1 and len(gathered.nvlink_groups[0]) == gathered.count
    if interconnect == "nvlink" and not all_linked and gathered.count > 1:
        shown = ", ".join(str(list(g)) for g in gathered.nvlink_groups) or "none"
        problems.append(f"{host}: aphrodite_gpus_declared.interconnect is nvlink, but the NVLink groups found are {shown}")
    if interconnect == "pcie" and gathered.nvlink_groups:
        problems.append(f"{host}: aphrodite_gpus_declared.interconnect is pcie, but NVLink joins GPUs {[list(g) for g in gathered.nvlink_groups]}")
    return problems


def host_gpus(host: str, declared: Any = None, gathered: Any = None, address: str | None = None,
              bind_address: str | None = None) -> tuple:
    """Pick the facts to plan from: gathered ones when usable, else the declared ones.

    Returns ``(HostGpus, notes)``; notes name declared/gathered mismatches and why gathered
    facts were passed over.
    """
    notes = []
    if gathered:
        try:
            chosen = from_gathered(host, gathered, address, bind_address)
        except FactsError as exc:
            if not declared:
                raise
            notes.append(f"{exc}; planning {host} from aphrodite_gpus_declared instead")
        else:
            if declared:
                notes.extend(facts_mismatches(host, declared, chosen))
            return chosen, notes
    if declared:
        return from_declared(host, declared, address, bind_address), notes
    raise FactsError(
        f"{host} has neither gathered GPU facts (aphrodite_gpus) nor aphrodite_gpus_declared; declare "
        f"aphrodite_gpus_declared in host_vars/{host}.yml (count, name, memory_mib, interconnect) or gather facts first"
    )
