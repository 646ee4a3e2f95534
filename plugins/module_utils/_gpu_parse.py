# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Parse what ``nvidia-smi``, ``lspci``, sysfs and procfs say about a host's NVIDIA GPUs.

Private to the aphrodite.baremetal collection: the names here may change without notice.

Everything is a pure function over text, with no Ansible import and no I/O, so the
``gpu_facts`` module, the CLI and the unit tests share one implementation. It ships
to managed hosts as module_utils, so it stays valid Python 3.8 and imports only the
standard library.

The formats are those of ``shared/reference/gpu-facts.md``:

* ``nvidia-smi --query-gpu=<QUERY_GPU_FIELDS> --format=csv,noheader,nounits``
  (``parse_query_gpu``; the output with units, ``81559 MiB``, is accepted too);
* ``nvidia-smi topo -m`` (``parse_topology``, ``nvlink_groups``);
* ``lspci -nn -d 10de:`` (``parse_lspci``, ``parse_lspci_nvswitches``);
* ``/sys/bus/pci/devices/<bus id>/numa_node`` (``parse_numa_node``);
* the listing of ``/proc/driver/nvidia-nvswitch/devices`` (``nvswitch_present``).

``build_facts`` assembles the ``aphrodite_gpus`` fact from those pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

__all__ = [
    "GpuParseError",
    "NvidiaSmiUnavailable",
    "QUERY_GPU_FIELDS",
    "QUERY_GPU_ARGS",
    "LINK_VALUES",
    "Topology",
    "parse_query_gpu",
    "normalize_bus_id",
    "parse_topology",
    "nvlink_groups",
    "parse_lspci",
    "parse_lspci_nvswitches",
    "nvswitch_present",
    "parse_numa_node",
    "numa_nodes_by_gpu",
    "build_facts",
]


class GpuParseError(ValueError):
    """Text from nvidia-smi, lspci or sysfs is not in the shape this parser knows.

    The message names the input, the line and what was expected there.
    """


class NvidiaSmiUnavailable(GpuParseError):
    """nvidia-smi ran but says it cannot see any GPU (driver not loaded, no devices).

    Callers fall back to ``lspci`` on this one instead of failing.
    """


# --------------------------------------------------------------------------- #
# nvidia-smi --query-gpu
# --------------------------------------------------------------------------- #

QUERY_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "memory.total",
    "compute_cap",
    "driver_version",
    "persistence_mode",
    "mig.mode.current",
)
"""The fields of the per-GPU query, in the order ``parse_query_gpu`` expects them."""

QUERY_GPU_ARGS = (
    "--query-gpu=" + ",".join(QUERY_GPU_FIELDS),
    "--format=csv,noheader,nounits",
)
"""The nvidia-smi arguments that print what ``parse_query_gpu`` reads."""

_QUERY_COMMAND = "nvidia-smi " + " ".join(QUERY_GPU_ARGS)

# nvidia-smi prints these for a field the GPU does not have (MIG mode on an L40S).
_NOT_AVAILABLE = frozenset(("[N/A]", "[Not Supported]"))

# What nvidia-smi prints instead of a CSV when it cannot reach any GPU.
_UNAVAILABLE_MARKERS = (
    "NVIDIA-SMI has failed",
    "couldn't communicate with the NVIDIA driver",
    "No devices were found",
)

_INDEX = re.compile(r"^\d+$")
_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_MEMORY = re.compile(r"^(\d+)(?:\s*MiB)?$")
_COMPUTE_CAP = re.compile(r"^\d+\.\d+$")
_DRIVER_VERSION = re.compile(r"^\d+\.\d+(?:\.\d+)*$")
_BUS_ID = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)
_ENABLED_DISABLED = {"Enabled": True, "Disabled": False}


def normalize_bus_id(bus_id: str) -> str:
    """Return the sysfs spelling of a PCI address: ``00000000:2A:00.0`` -> ``0000:2a:00.0``.

    nvidia-smi prints an 8-digit domain in upper case; Linux names
    ``/sys/bus/pci/devices`` entries with a 4-digit (``%04x``) domain in lower case.
    An address without a domain (``2a:00.0``, as ``lspci`` prints it) gets domain 0.
    """
    match = _BUS_ID.match(bus_id.strip())
    if match is None:
        raise GpuParseError(
            "PCI bus id {0!r} is not of the form DOMAIN:BUS:DEVICE.FUNCTION in hex, "
            "for example 00000000:18:00.0 (nvidia-smi) or 0000:18:00.0 (sysfs)".format(bus_id)
        )
    domain = int(match.group("domain") or "0", 16)
    return "{0:04x}:{1}:{2}.{3}".format(
        domain, match.group("bus").lower(), match.group("device").lower(), match.group("function")
    )


def _unavailable_reason(text: str) -> Optional[str]:
    for line in text.splitlines():
        if any(marker in line for marker in _UNAVAILABLE_MARKERS):
            return line.strip()
    return None


def _query_value(raw: str, field_name: str, where: str) -> Optional[str]:
    """The text of one CSV field, or None for ``[N/A]`` / ``[Not Supported]``."""
    if raw in _NOT_AVAILABLE:
        return None
    if raw.startswith("[") and raw.endswith("]"):
        # [GPU is lost], [Unknown Error], [Insufficient Permissions]: nvidia-smi could
        # not read the GPU at all; a planner must not guess around a broken device.
        raise GpuParseError(
            "{0}: nvidia-smi printed {1!r} for {2}; the GPU cannot be read. Check "
            "`nvidia-smi -q` and `dmesg` for Xid errors, and run as root if it says "
            "insufficient permissions".format(where, raw, field_name)
        )
    if raw == "":
        raise GpuParseError("{0}: {1} is empty; expected a value or [N/A]".format(where, field_name))
    return raw


def _query_required(raw: str, field_name: str, where: str) -> str:
    value = _query_value(raw, field_name, where)
    if value is None:
        raise GpuParseError(
            "{0}: {1} is {2!r}, but every GPU must have one; check `nvidia-smi -q` "
            "for this GPU".format(where, field_name, raw)
        )
    return value


def _query_matching(raw: str, field_name: str, where: str, pattern: re.Pattern[str], example: str) -> Optional[str]:
    value = _query_value(raw, field_name, where)
    if value is not None and not pattern.match(value):
        raise GpuParseError(
            "{0}: {1} is {2!r}; expected something like {3!r} or [N/A]".format(where, field_name, value, example)
        )
    return value


def _query_switch(raw: str, field_name: str, where: str) -> Optional[str]:
    value = _query_value(raw, field_name, where)
    if value is not None and value not in _ENABLED_DISABLED:
        raise GpuParseError(
            "{0}: {1} is {2!r}; expected Enabled, Disabled or [N/A]".format(where, field_name, value)
        )
    return value


def parse_query_gpu(text: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=<QUERY_GPU_FIELDS> --format=csv,noheader[,nounits]``.

    Returns one dict per GPU, sorted by index, with the keys ``index`` (int),
    ``uuid``, ``name``, ``pci_bus_id`` (sysfs form, ``0000:18:00.0``), ``memory_mib``
    (int), ``compute_capability`` (``"9.0"``), ``driver_version``,
    ``persistence_mode`` (bool) and ``mig_mode`` (``"Enabled"``/``"Disabled"``).
    A field the GPU does not support (``[N/A]``, ``[Not Supported]``) is None.

    Raises NvidiaSmiUnavailable when nvidia-smi says it cannot reach the driver or
    finds no device, and GpuParseError, naming the line, for anything else that is
    not this CSV.
    """
    reason = _unavailable_reason(text)
    if reason is not None:
        raise NvidiaSmiUnavailable("nvidia-smi cannot query GPUs: " + reason)
    lines = [(number, line.strip()) for number, line in enumerate(_ANSI_ESCAPE.sub("", text).splitlines(), start=1)
             if line.strip()]
    if not lines:
        raise GpuParseError(
            "nvidia-smi --query-gpu printed nothing; expected one CSV line per GPU from `{0}`".format(_QUERY_COMMAND)
        )
    gpus: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    for number, line in lines:
        where = "nvidia-smi --query-gpu output, line {0}".format(number)
        fields = [part.strip() for part in line.split(",")]
        if fields[0] == "index":
            raise GpuParseError(
                "{0} is a CSV header ({1!r}); run nvidia-smi with --format=csv,noheader,nounits".format(where, line)
            )
        if len(fields) != len(QUERY_GPU_FIELDS):
            raise GpuParseError(
                "{0}: expected {1} comma-separated fields ({2}) but found {3} in {4!r}; "
                "run exactly `{5}`".format(
                    where, len(QUERY_GPU_FIELDS), ", ".join(QUERY_GPU_FIELDS), len(fields), line, _QUERY_COMMAND
                )
            )
        raw = dict(zip(QUERY_GPU_FIELDS, fields))
        if not _INDEX.match(raw["index"]):
            raise GpuParseError(
                "{0}: index is {1!r}; expected a GPU index such as 0 as the first field (field order: {2})".format(
                    where, raw["index"], ", ".join(QUERY_GPU_FIELDS)
                )
            )
        index = int(raw["index"])
        if index in seen:
            raise GpuParseError(
                "{0}: GPU index {1} already appeared on line {2}; every GPU must be listed once".format(
                    where, index, seen[index]
                )
            )
        seen[index] = number
        where = "{0} (GPU {1})".format(where, index)
        memory = _query_matching(raw["memory.total"], "memory.total", where, _MEMORY, "81559 or 81559 MiB")
        memory_mib = None if memory is None else int(memory.split()[0].replace("MiB", ""))
        persistence = _query_switch(raw["persistence_mode"], "persistence_mode", where)
        bus_text = _query_required(raw["pci.bus_id"], "pci.bus_id", where)
        try:
            bus_id = normalize_bus_id(bus_text)
        except GpuParseError as exc:
            raise GpuParseError("{0}: {1}".format(where, exc)) from None
        gpus.append(
            {
                "index": index,
                "uuid": _query_matching(
                    raw["uuid"], "uuid", where, _UUID, "GPU-a84bba07-931d-b925-306a-0799dc6ebd71"
                ),
                "name": _query_value(raw["name"], "name", where),
                "pci_bus_id": bus_id,
                "memory_mib": memory_mib,
                "compute_capability": _query_matching(raw["compute_cap"], "compute_cap", where, _COMPUTE_CAP, "9.0"),
                "driver_version": _query_matching(
                    raw["driver_version"], "driver_version", where, _DRIVER_VERSION, "550.90.07"
                ),
                "persistence_mode": None if persistence is None else _ENABLED_DISABLED[persistence],
                "mig_mode": _query_switch(raw["mig.mode.current"], "mig.mode.current", where),
            }
        )
    gpus.sort(key=lambda gpu: gpu["index"])
    return gpus


# --------------------------------------------------------------------------- #
# nvidia-smi topo -m
# --------------------------------------------------------------------------- #

LINK_VALUES = ("X", "NV#", "PIX", "PXB", "PHB", "NODE", "SYS")
"""Cells of ``nvidia-smi topo -m``; ``NV#`` stands for NV1, NV2, ... NV18."""

_LINK = re.compile(r"^(?:X|NV[1-9]\d*|PIX|PXB|PHB|NODE|SYS)$")
_NVLINK = re.compile(r"^NV[1-9]\d*$")
_DEVICE_LABEL = re.compile(r"^(GPU|NIC)(\d+)$")
# Terminal escapes (CSI sequences): driver 580's topo -m underlines its header row even
# when its output is no terminal.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CPU_LIST = re.compile(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$")
_NIC_NAME = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")

CPU_AFFINITY = "CPU Affinity"
NUMA_AFFINITY = "NUMA Affinity"
GPU_NUMA_ID = "GPU NUMA ID"
# Known multi-word column names, longest first so a greedy match prefers them.
_KNOWN_COLUMNS = tuple(
    tuple(name.split()) for name in sorted((CPU_AFFINITY, NUMA_AFFINITY, GPU_NUMA_ID), key=len, reverse=True)
)


@dataclass
class Topology:
    """The matrix of ``nvidia-smi topo -m``.

    ``links[a][b]`` is the cell in row GPU``a``, column GPU``b`` (``"X"`` on the
    diagonal); ``nic_links[a]["NIC0"]`` the cell from GPU``a`` to NIC0. Affinity maps
    are keyed by GPU index; None stands for ``N/A`` or a column the driver did not print.
    """

    gpus: list[int] = field(default_factory=list)
    nics: list[str] = field(default_factory=list)
    links: dict[int, dict[int, str]] = field(default_factory=dict)
    nic_links: dict[int, dict[str, str]] = field(default_factory=dict)
    cpu_affinity: dict[int, Optional[str]] = field(default_factory=dict)
    numa_affinity: dict[int, Optional[int]] = field(default_factory=dict)
    gpu_numa_id: dict[int, Optional[int]] = field(default_factory=dict)
    nic_names: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    extra: dict[int, dict[str, str]] = field(default_factory=dict)


def _split_known_columns(words: Sequence[str]) -> list[str]:
    """Group header words into column names, preferring the known multi-word ones.

    Space-separated output loses the tabs between ``CPU Affinity`` and ``NUMA
    Affinity``; the known names are matched first, unknown words in between become
    one column each run.
    """
    columns: list[str] = []
    unknown: list[str] = []
    position = 0
    while position < len(words):
        for known in _KNOWN_COLUMNS:
            if tuple(words[position:position + len(known)]) == known:
                if unknown:
                    columns.append(" ".join(unknown))
                    unknown = []
                columns.append(" ".join(known))
                position += len(known)
                break
        else:
            unknown.append(words[position])
            position += 1
    if unknown:
        columns.append(" ".join(unknown))
    return columns


def _parse_header(line: str, number: int) -> tuple[list[str], list[str]]:
    """Split the header row into device columns (GPUn, NICn) and trailing columns."""
    if "\t" in line:
        chunks = [chunk.strip() for chunk in line.split("\t") if chunk.strip()]
    else:
        chunks = [chunk for chunk in re.split(r" {2,}", line.strip()) if chunk]
    devices: list[str] = []
    trailing_words: list[list[str]] = []
    for chunk in chunks:
        words = chunk.split()
        while not trailing_words and words and _DEVICE_LABEL.match(words[0]):
            devices.append(words.pop(0))
        if words:
            trailing_words.append(words)
    trailing: list[str] = []
    for words in trailing_words:
        for word in words:
            if _DEVICE_LABEL.match(word):
                raise GpuParseError(
                    "nvidia-smi topo -m, line {0}: device column {1} comes after the affinity columns; "
                    "expected all GPUn/NICn columns first, then CPU Affinity, NUMA Affinity, ...".format(number, word)
                )
        trailing.extend(_split_known_columns(words))
    if len(set(devices)) != len(devices):
        duplicates = sorted({label for label in devices if devices.count(label) > 1})
        raise GpuParseError(
            "nvidia-smi topo -m, line {0}: the header names {1} more than once".format(number, ", ".join(duplicates))
        )
    if len(set(trailing)) != len(trailing):
        raise GpuParseError(
            "nvidia-smi topo -m, line {0}: the header repeats a column in {1}".format(number, trailing)
        )
    if not any(label.startswith("GPU") for label in devices):
        raise GpuParseError(
            "nvidia-smi topo -m, line {0}: the header {1!r} names no GPU column; expected "
            "'GPU0 GPU1 ... CPU Affinity NUMA Affinity'".format(number, line.strip())
        )
    return devices, trailing


def _label_index(label: str) -> int:
    return int(label[3:])


def _optional_int(value: str, column: str, where: str) -> Optional[int]:
    if value == "N/A":
        return None
    if not re.match(r"^\d+$", value):
        raise GpuParseError("{0}: {1} is {2!r}; expected a NUMA node number or N/A".format(where, column, value))
    return int(value)


def parse_topology(text: str) -> Topology:
    """Parse the matrix printed by ``nvidia-smi topo -m``.

    Accepts tab-separated output (as nvidia-smi prints it) and the same with tabs
    turned into runs of spaces; NIC columns and rows; the ``CPU Affinity``,
    ``NUMA Affinity`` and ``GPU NUMA ID`` columns, each present or not, with
    ``N/A`` values; the ``Legend:`` / ``NIC Legend:`` blocks after the matrix; and
    terminal escapes (driver 580 underlines the header row even into a pipe).
    Raises GpuParseError, naming the line, on any other shape.
    """
    lines = _ANSI_ESCAPE.sub("", text).splitlines()
    position = 0
    while position < len(lines) and not lines[position].strip():
        position += 1
    if position == len(lines):
        raise GpuParseError("nvidia-smi topo -m printed nothing; expected a GPU matrix with a header row")
    header_number = position + 1
    header = lines[position]
    tokens = header.split()
    if not _DEVICE_LABEL.match(tokens[0]) or (len(tokens) > 1 and _LINK.match(tokens[1])):
        raise GpuParseError(
            "nvidia-smi topo -m, line {0}: no header row; expected the first line to name the "
            "columns ('GPU0  GPU1 ...  CPU Affinity  NUMA Affinity'), found {1!r}".format(header_number, header.strip())
        )
    devices, trailing = _parse_header(header, header_number)
    column_of = {label: column for column, label in enumerate(devices)}
    gpu_labels = [label for label in devices if label.startswith("GPU")]
    topology = Topology(
        gpus=[_label_index(label) for label in gpu_labels],
        nics=[label for label in devices if label.startswith("NIC")],
        columns=list(trailing),
    )
    seen_rows: dict[str, int] = {}
    position += 1
    while position < len(lines):
        line = lines[position]
        number = position + 1
        if not line.strip() or line.strip() == "Legend:":
            break
        position += 1
        values = line.split()
        label = values.pop(0)
        where = "nvidia-smi topo -m, line {0} (row {1})".format(number, label)
        if not _DEVICE_LABEL.match(label):
            raise GpuParseError(
                "nvidia-smi topo -m, line {0}: expected a row starting with GPUn or NICn, found {1!r}; "
                "the matrix must end with a blank line before 'Legend:'".format(number, line.strip())
            )
        if label not in column_of:
            raise GpuParseError(
                "{0}: {1} has a row but no column; the header names {2}".format(where, label, " ".join(devices))
            )
        if label in seen_rows:
            raise GpuParseError("{0}: {1} already has a row on line {2}".format(where, label, seen_rows[label]))
        seen_rows[label] = number
        is_gpu = label.startswith("GPU")
        # NIC rows leave the affinity columns empty; GPU rows fill every one.
        allowed = {len(devices) + len(trailing)} if is_gpu else {len(devices), len(devices) + len(trailing)}
        if len(values) not in allowed:
            expected = "{0} link cells ({1})".format(len(devices), " ".join(devices))
            if trailing:
                expected += " {0} {1} value(s) for {2}".format(
                    "followed by" if is_gpu else "optionally followed by", len(trailing), ", ".join(trailing)
                )
            raise GpuParseError(
                "{0}: found {1} values after the label; expected {2}".format(where, len(values), expected)
            )
        cells = values[:len(devices)]
        for column_label, cell in zip(devices, cells):
            if not _LINK.match(cell):
                raise GpuParseError(
                    "{0}: unknown cell {1!r} in column {2}; expected one of {3}".format(
                        where, cell, column_label, ", ".join(LINK_VALUES)
                    )
                )
            if (cell == "X") != (column_label == label):
                raise GpuParseError(
                    "{0}: column {1} holds {2!r}; X must appear exactly on the diagonal (row {3}, column {3})".format(
                        where, column_label, cell, label
                    )
                )
        if not is_gpu:
            continue
        gpu = _label_index(label)
        topology.links[gpu] = {
            _label_index(column_label): cell
            for column_label, cell in zip(devices, cells) if column_label.startswith("GPU")
        }
        topology.nic_links[gpu] = {
            column_label: cell for column_label, cell in zip(devices, cells) if column_label.startswith("NIC")
        }
        named = dict(zip(trailing, values[len(devices):]))
        cpu = named.pop(CPU_AFFINITY, None)
        if cpu is not None and cpu != "N/A" and not _CPU_LIST.match(cpu):
            raise GpuParseError(
                "{0}: {1} is {2!r}; expected a CPU list such as 0-51 or 0-7,16-23, or N/A".format(
                    where, CPU_AFFINITY, cpu
                )
            )
        topology.cpu_affinity[gpu] = None if cpu in (None, "N/A") else cpu
        numa = named.pop(NUMA_AFFINITY, None)
        topology.numa_affinity[gpu] = None if numa is None else _optional_int(numa, NUMA_AFFINITY, where)
        numa_id = named.pop(GPU_NUMA_ID, None)
        topology.gpu_numa_id[gpu] = None if numa_id is None else _optional_int(numa_id, GPU_NUMA_ID, where)
        if named:
            topology.extra[gpu] = named
    missing = [label for label in devices if label not in seen_rows]
    if missing:
        gpu_rows = [label for label in seen_rows if label.startswith("GPU")]
        raise GpuParseError(
            "nvidia-smi topo -m: the matrix is not square: the header (line {0}) names {1} GPU column(s) "
            "and {2} NIC column(s) but there is no row for {3} ({4} GPU row(s) found)".format(
                header_number, len(gpu_labels), len(topology.nics), ", ".join(missing), len(gpu_rows)
            )
        )
    _parse_after_matrix(lines, position, topology)
    return topology


def _parse_after_matrix(lines: Sequence[str], position: int, topology: Topology) -> None:
    """Check that only blank lines separate the matrix from ``Legend:``; read ``NIC Legend:``."""
    while position < len(lines) and not lines[position].strip():
        position += 1
    if position == len(lines):
        return
    if lines[position].strip() != "Legend:":
        raise GpuParseError(
            "nvidia-smi topo -m, line {0}: unexpected {1!r} after the matrix; expected a blank line "
            "then 'Legend:' (is a row separated from the matrix by a blank line?)".format(
                position + 1, lines[position].strip()
            )
        )
    in_nic_legend = False
    for line in lines[position + 1:]:
        if line.strip() == "NIC Legend:":
            in_nic_legend = True
            continue
        match = _NIC_NAME.match(line) if in_nic_legend else None
        if match is not None:
            topology.nic_names[match.group(1)] = match.group(2)


def nvlink_groups(topology: Topology) -> list[list[int]]:
    """GPUs joined by NVLink (``NV#`` cells), as sorted connected components.

    A GPU with no NVLink to any other is a group of its own. Groups are sorted by
    their smallest GPU index.
    """
    parent = {gpu: gpu for gpu in topology.gpus}

    def root(gpu: int) -> int:
        while parent[gpu] != gpu:
            parent[gpu] = parent[parent[gpu]]
            gpu = parent[gpu]
        return gpu

    for gpu, row in topology.links.items():
        for peer, cell in row.items():
            if peer in parent and _NVLINK.match(cell):
                parent[root(gpu)] = root(peer)
    groups: dict[int, list[int]] = {}
    for gpu in topology.gpus:
        groups.setdefault(root(gpu), []).append(gpu)
    return sorted((sorted(members) for members in groups.values()), key=lambda members: members[0])


# --------------------------------------------------------------------------- #
# lspci -nn -d 10de:
# --------------------------------------------------------------------------- #

_LSPCI_LINE = re.compile(
    r"^(?P<slot>(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<class_name>[^\[\]:]+?)(?:\s+\[(?P<class_code>[0-9a-fA-F]{4})\])?:\s+"
    r"(?P<rest>.*\S)\s*$"
)
_LSPCI_SUFFIX = re.compile(r"\s*\((?:rev|prog-if)\s[^)]*\)")
_LSPCI_IDS = re.compile(r"\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]$")
_NVIDIA_VENDOR = re.compile(r"^nvidia corporation\s+", re.IGNORECASE)
_GPU_CLASSES = {"0300": "VGA compatible controller", "0302": "3D controller"}
# NVSwitch device ids, for hosts whose pci.ids predates the switch and prints "Device".
_NVSWITCH_DEVICE_IDS = frozenset(("1af1", "22a3"))  # A100 (LR10), H100 (LS10)


def _lspci_nvidia_devices(text: str) -> list[dict[str, Any]]:
    """Every NVIDIA device that ``lspci [-nn] [-D]`` lists, in the order printed."""
    devices: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line[:1] in (" ", "\t"):
            continue  # blank, or the detail lines of lspci -k / -v
        match = _LSPCI_LINE.match(line)
        if match is None:
            raise GpuParseError(
                "lspci output, line {0}: {1!r} is not a device line; expected "
                "'BB:DD.F Class [cccc]: Vendor Device [vvvv:dddd] (rev rr)' as `lspci -nn -d 10de:` "
                "prints it".format(number, line.strip())
            )
        description = _LSPCI_SUFFIX.sub("", match.group("rest")).strip()
        ids = _LSPCI_IDS.search(description)
        device_id = None
        if ids is not None:
            description = description[:ids.start()].strip()
            if ids.group("vendor").lower() != "10de":
                continue
            device_id = ids.group("device").lower()
        elif not _NVIDIA_VENDOR.match(description):
            continue
        class_code = (match.group("class_code") or "").lower() or None
        devices.append(
            {
                "pci_bus_id": normalize_bus_id(match.group("slot")),
                "class_code": class_code,
                "class_name": match.group("class_name").strip(),
                "name": _NVIDIA_VENDOR.sub("", description),
                "device_id": device_id,
            }
        )
    return devices


def _bus_order(device: Mapping[str, Any]) -> tuple[int, ...]:
    """Numeric PCI order: domain 0x10000 sorts after 0xffff, which text order gets wrong."""
    return tuple(int(part, 16) for part in re.split(r"[:.]", device["pci_bus_id"]))


def _is_gpu(device: Mapping[str, Any]) -> bool:
    if device["class_code"] is not None:
        return device["class_code"] in _GPU_CLASSES
    return device["class_name"] in _GPU_CLASSES.values()


def _is_nvswitch(device: Mapping[str, Any]) -> bool:
    return "nvswitch" in device["name"].lower() or device["device_id"] in _NVSWITCH_DEVICE_IDS


def parse_lspci(text: str) -> list[dict[str, Any]]:
    """NVIDIA GPUs (class 0300 VGA, 0302 3D controller) listed by ``lspci -nn -d 10de:``.

    Returns dicts with ``pci_bus_id`` (sysfs form), ``name`` (what pci.ids calls it,
    ``GH100 [H100 SXM5 80GB]``), ``device_id`` (``2330``, None without ``-nn``),
    ``class_code`` and ``class_name``, sorted by bus id: the order in which nvidia-smi
    numbers GPUs. Audio functions, USB controllers and NVSwitch bridges are left out;
    other vendors' lines are skipped, so a full ``lspci -nn`` works as well.
    """
    gpus = [device for device in _lspci_nvidia_devices(text) if _is_gpu(device)]
    return sorted(gpus, key=_bus_order)


def parse_lspci_nvswitches(text: str) -> list[dict[str, Any]]:
    """NVSwitch bridges (``Bridge [0680]: NVIDIA Corporation GH100 [H100 NVSwitch]``) in lspci output.

    A switch is recognised by its name or, where pci.ids is too old to name it
    (``NVIDIA Corporation Device [10de:1af1]``), by its device id.
    """
    switches = [device for device in _lspci_nvidia_devices(text) if _is_nvswitch(device)]
    return sorted(switches, key=_bus_order)


def nvswitch_present(proc_devices: Optional[Sequence[str]], lspci_text: Optional[str]) -> bool:
    """Whether the host has NVSwitches (and so needs Fabric Manager).

    ``proc_devices`` is the listing of ``/proc/driver/nvidia-nvswitch/devices``
    (None when it does not exist, before the driver is loaded); ``lspci_text`` the
    output of ``lspci -nn -d 10de:`` (None when lspci is not available).
    """
    if proc_devices:
        return True
    return bool(lspci_text) and bool(parse_lspci_nvswitches(lspci_text or ""))


# --------------------------------------------------------------------------- #
# sysfs
# --------------------------------------------------------------------------- #


def parse_numa_node(text: str, path: str = "numa_node") -> Optional[int]:
    """The content of ``/sys/bus/pci/devices/<bus id>/numa_node``: ``-1`` (no NUMA) -> None."""
    value = text.strip()
    if not re.match(r"^-?\d+$", value):
        raise GpuParseError("{0} holds {1!r}; expected a NUMA node number or -1".format(path, text.strip()))
    node = int(value)
    if node < -1:
        raise GpuParseError("{0} holds {1}; expected a NUMA node number or -1".format(path, node))
    return None if node == -1 else node


def numa_nodes_by_gpu(gpus: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """GPU indices per NUMA node, keys as strings (``{"0": [0, 1], "1": [2, 3]}``); unknown nodes left out."""
    nodes: dict[int, list[int]] = {}
    for gpu in gpus:
        if gpu.get("numa_node") is not None:
            nodes.setdefault(gpu["numa_node"], []).append(gpu["index"])
    return {str(node): sorted(nodes[node]) for node in sorted(nodes)}


# --------------------------------------------------------------------------- #
# The aphrodite_gpus fact
# --------------------------------------------------------------------------- #

LSPCI_NOTE = "counted GPUs with lspci (names only, no memory)"


def build_facts(
    smi_gpus: Optional[Sequence[Mapping[str, Any]]],
    topology: Optional[Topology] = None,
    lspci_text: Optional[str] = None,
    nvswitch_devices: Optional[Sequence[str]] = None,
    sysfs_numa: Optional[Mapping[str, Optional[int]]] = None,
    smi_problem: Optional[str] = None,
    lspci_problem: Optional[str] = None,
    topology_problem: Optional[str] = None,
    notes: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Assemble the ``aphrodite_gpus`` fact.

    ``smi_gpus`` is ``parse_query_gpu``'s result, or None when nvidia-smi is missing
    or failed; ``topology`` is ``parse_topology``'s result or None; ``lspci_text``
    the output of ``lspci -nn -d 10de:`` or None when lspci is missing or failed;
    ``nvswitch_devices`` the listing of ``/proc/driver/nvidia-nvswitch/devices`` or
    None; ``sysfs_numa`` maps a sysfs bus id to its ``numa_node`` (None for -1),
    leaving out GPUs whose file is missing. The ``*_problem`` sentences say why a
    piece is None ("nvidia-smi not found") and end up in ``notes``, after the
    ``notes`` passed in.

    Raises GpuParseError when the pieces contradict each other (topo -m and the
    query list different GPUs) or ``lspci_text`` cannot be parsed.
    """
    all_notes = list(notes or [])
    sysfs_numa = sysfs_numa or {}
    gpus: list[dict[str, Any]] = []
    source = "none"
    driver_version = None
    links: dict[str, dict[str, str]] = {}
    groups: list[list[int]] = []

    if smi_gpus is not None:
        source = "nvidia-smi"
        if topology is not None and sorted(topology.gpus) != sorted(gpu["index"] for gpu in smi_gpus):
            raise GpuParseError(
                "nvidia-smi topo -m shows GPUs {0} but nvidia-smi --query-gpu lists GPUs {1}; both must "
                "describe the same GPUs (is CUDA_VISIBLE_DEVICES or a container hiding some?)".format(
                    sorted(topology.gpus), sorted(gpu["index"] for gpu in smi_gpus)
                )
            )
        from_topology = []
        for smi in smi_gpus:
            numa = sysfs_numa.get(smi["pci_bus_id"])
            if smi["pci_bus_id"] not in sysfs_numa and topology is not None:
                numa = topology.numa_affinity.get(smi["index"])
                if numa is not None:
                    from_topology.append(smi["index"])
            gpus.append(
                {
                    "index": smi["index"],
                    "uuid": smi["uuid"],
                    "name": smi["name"],
                    "memory_mib": smi["memory_mib"],
                    "pci_bus_id": smi["pci_bus_id"],
                    "numa_node": numa,
                    "compute_capability": smi["compute_capability"],
                    "persistence_mode": smi["persistence_mode"],
                    "mig_mode": smi["mig_mode"],
                }
            )
        versions = sorted({smi["driver_version"] for smi in smi_gpus if smi["driver_version"]})
        driver_version = versions[0] if versions else None
        if len(versions) > 1:
            all_notes.append("GPUs report different driver versions ({0})".format(", ".join(versions)))
        if from_topology:
            all_notes.append(
                "numa_node of GPU(s) {0} taken from nvidia-smi topo -m: sysfs has no numa_node for them".format(
                    ", ".join(str(index) for index in from_topology)
                )
            )
        if lspci_text is not None:
            seen = {smi["pci_bus_id"] for smi in smi_gpus}
            unseen = [device["pci_bus_id"] for device in parse_lspci(lspci_text) if device["pci_bus_id"] not in seen]
            if unseen:
                all_notes.append(
                    "lspci lists NVIDIA GPU(s) at {0} that nvidia-smi does not show; they are left out (bound to "
                    "another driver such as vfio-pci, or fallen off the bus: check dmesg for Xid errors)".format(
                        ", ".join(unseen)
                    )
                )
        if topology is not None:
            links = {
                str(gpu): {str(peer): cell for peer, cell in sorted(row.items()) if peer != gpu}
                for gpu, row in sorted(topology.links.items())
            }
            groups = nvlink_groups(topology)
        else:
            all_notes.append(
                "{0}; links and nvlink_groups are empty".format(topology_problem or "nvidia-smi topo -m gave no matrix")
            )
    else:
        problem = smi_problem or "nvidia-smi gave no GPU list"
        if lspci_text is None:
            all_notes.append(
                "{0}, and {1}, so no GPU could be counted".format(problem, lspci_problem or "lspci gave no device list")
            )
        else:
            found = parse_lspci(lspci_text)
            if found:
                source = "lspci"
                all_notes.append("{0}; {1}".format(problem, LSPCI_NOTE))
                all_notes.append("NVLink topology needs the NVIDIA driver; links and nvlink_groups are empty")
            else:
                all_notes.append("{0}; lspci lists no NVIDIA GPU".format(problem))
            for index, device in enumerate(found):
                gpus.append(
                    {
                        "index": index,
                        "uuid": None,
                        "name": device["name"],
                        "memory_mib": None,
                        "pci_bus_id": device["pci_bus_id"],
                        "numa_node": sysfs_numa.get(device["pci_bus_id"]),
                        "compute_capability": None,
                        "persistence_mode": None,
                        "mig_mode": None,
                    }
                )

    return {
        "source": source,
        "driver_version": driver_version,
        "count": len(gpus),
        "gpus": gpus,
        "nvlink_groups": groups,
        "nvswitch": nvswitch_present(nvswitch_devices, lspci_text),
        "mig_enabled": any(gpu["mig_mode"] == "Enabled" for gpu in gpus),
        "numa_nodes": numa_nodes_by_gpu(gpus),
        "links": links,
        "notes": all_notes,
    }
