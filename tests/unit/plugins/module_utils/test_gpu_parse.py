"""Tests of plugins/module_utils/_gpu_parse.py against recorded and generated tool output."""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import (
    QUERY_GPU_ARGS,
    QUERY_GPU_FIELDS,
    GpuParseError,
    NvidiaSmiUnavailable,
    Topology,
    build_facts,
    normalize_bus_id,
    numa_nodes_by_gpu,
    nvlink_groups,
    nvswitch_present,
    parse_lspci,
    parse_lspci_nvswitches,
    parse_numa_node,
    parse_query_gpu,
    parse_topology,
)

RECORDED = Path(__file__).resolve().parents[3] / "fixtures" / "nvidia_smi"

H100_BUS_IDS = [
    "0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
    "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0",
]
LEGEND = """
Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def short_id(value: object) -> str:
    """Readable test ids for tables whose values are whole command outputs."""
    return re.sub(r"\W+", "-", str(value)[:36]).strip("-") or "empty"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text(encoding="utf-8")


def query_line(**override: str) -> str:
    """One line of the standard query; fields may be overridden by name (dots as underscores)."""
    values = {
        "index": "0",
        "uuid": "GPU-a84bba07-931d-b925-306a-0799dc6ebd71",
        "name": "NVIDIA H100 80GB HBM3",
        "pci.bus_id": "00000000:18:00.0",
        "memory.total": "81559",
        "compute_cap": "9.0",
        "driver_version": "550.90.07",
        "persistence_mode": "Enabled",
        "mig.mode.current": "Disabled",
    }
    for key, value in override.items():
        values[key.replace("_dot_", ".")] = value
    return ", ".join(values[name] for name in QUERY_GPU_FIELDS)


# --------------------------------------------------------------------------- #
# parse_query_gpu
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fixture", ["h100x8_query.csv", "h100x8_query_units.csv"])
def test_query_h100x8(fixture: str) -> None:
    gpus = parse_query_gpu(recorded(fixture))
    assert [gpu["index"] for gpu in gpus] == list(range(8))
    assert [gpu["pci_bus_id"] for gpu in gpus] == H100_BUS_IDS
    assert gpus[3] == {
        "index": 3,
        "uuid": "GPU-cbd390b6-56a4-d2ba-d821-df997d529975",
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "0000:5d:00.0",
        "memory_mib": 81559,
        "compute_capability": "9.0",
        "driver_version": "550.90.07",
        "persistence_mode": True,
        "mig_mode": "Disabled",
    }
    assert len({gpu["uuid"] for gpu in gpus}) == 8


def test_query_units_and_nounits_agree() -> None:
    assert parse_query_gpu(recorded("h100x8_query.csv")) == parse_query_gpu(recorded("h100x8_query_units.csv"))


def test_query_h200_driver_580() -> None:
    gpu, = parse_query_gpu(recorded("h200x1_query.csv"))
    assert gpu == {"index": 0, "uuid": "GPU-e6a77d99-856e-0ce9-f740-87dfe5afd184", "name": "NVIDIA H200",
                   "pci_bus_id": "0000:00:06.0", "memory_mib": 143771, "compute_capability": "9.0",
                   "driver_version": "580.159.04", "persistence_mode": True, "mig_mode": "Disabled"}


def test_terminal_escapes_are_no_part_of_the_output() -> None:
    underlined = recorded("h100x8_topo.txt").replace("\tGPU0", "\t\x1b[4mGPU0", 1).replace(
        "NUMA Affinity", "NUMA Affinity\x1b[0m", 1)
    assert parse_topology(underlined) == parse_topology(recorded("h100x8_topo.txt"))
    assert parse_query_gpu("\x1b[1m" + recorded("h100x8_query.csv")) == parse_query_gpu(recorded("h100x8_query.csv"))


@pytest.mark.parametrize(
    "fixture, count, name, memory, persistence",
    [
        ("pcie5_query.csv", 5, "NVIDIA L40S", 46068, True),
        ("pcie2_query.csv", 2, "NVIDIA GeForce RTX 4090", 24564, False),
    ],
)
def test_query_pcie_gpus_without_mig(fixture: str, count: int, name: str, memory: int, persistence: bool) -> None:
    gpus = parse_query_gpu(recorded(fixture))
    assert len(gpus) == count
    assert {gpu["name"] for gpu in gpus} == {name}
    assert {gpu["memory_mib"] for gpu in gpus} == {memory}
    assert {gpu["persistence_mode"] for gpu in gpus} == {persistence}
    assert {gpu["mig_mode"] for gpu in gpus} == {None}
    assert {gpu["compute_capability"] for gpu in gpus} == {"8.9"}


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ({"mig_dot_mode_dot_current": "[N/A]"}, "mig_mode", None),
        ({"mig_dot_mode_dot_current": "Enabled"}, "mig_mode", "Enabled"),
        ({"memory_dot_total": "[N/A]"}, "memory_mib", None),
        ({"memory_dot_total": "81559 MiB"}, "memory_mib", 81559),
        ({"memory_dot_total": "81559MiB"}, "memory_mib", 81559),
        ({"compute_cap": "[Not Supported]"}, "compute_capability", None),
        ({"compute_cap": "10.0"}, "compute_capability", "10.0"),
        ({"persistence_mode": "Disabled"}, "persistence_mode", False),
        ({"persistence_mode": "[N/A]"}, "persistence_mode", None),
        ({"driver_version": "[N/A]"}, "driver_version", None),
        ({"uuid": "[N/A]"}, "uuid", None),
        ({"name": "NVIDIA A100-SXM4-80GB"}, "name", "NVIDIA A100-SXM4-80GB"),
        ({"pci_dot_bus_id": "00000000:DB:00.0"}, "pci_bus_id", "0000:db:00.0"),
    ],
)
def test_query_field_values(override: dict, key: str, expected: object) -> None:
    assert parse_query_gpu(query_line(**override) + "\n")[0][key] == expected


def test_query_tolerates_crlf_blank_lines_and_sorts_by_index() -> None:
    text = "\r\n" + query_line(index="1", pci_dot_bus_id="00000000:2A:00.0") + "\r\n\r\n" + query_line() + "\r\n"
    assert [gpu["index"] for gpu in parse_query_gpu(text)] == [0, 1]


def test_query_args_name_every_field_in_order() -> None:
    assert QUERY_GPU_ARGS == (
        "--query-gpu=index,uuid,name,pci.bus_id,memory.total,compute_cap,driver_version,persistence_mode,"
        "mig.mode.current",
        "--format=csv,noheader,nounits",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "printed nothing"),
        ("\n  \n", "printed nothing"),
        (", ".join(QUERY_GPU_FIELDS) + "\n", "line 1 is a CSV header"),
        (recorded("malformed_query_field_count.csv"), "line 1: expected 9 comma-separated fields"),
        (query_line() + ", extra\n", "expected 9 comma-separated fields (index, uuid, name"),
        (recorded("malformed_query_index.csv"), "line 2: index is 'GPU1'"),
        (query_line(index="-1"), "index is '-1'"),
        (query_line() + "\n" + query_line(), "line 2: GPU index 0 already appeared on line 1"),
        (query_line(pci_dot_bus_id="18:00"), "line 1 (GPU 0): PCI bus id '18:00' is not of the form"),
        (query_line(pci_dot_bus_id="[N/A]"), "pci.bus_id is '[N/A]', but every GPU must have one"),
        (query_line(memory_dot_total="80GB"), "memory.total is '80GB'; expected something like '81559"),
        (query_line(memory_dot_total="[GPU is lost]"), "printed '[GPU is lost]' for memory.total"),
        (query_line(persistence_mode="On"), "persistence_mode is 'On'; expected Enabled, Disabled or [N/A]"),
        (query_line(mig_dot_mode_dot_current="Pending"), "mig.mode.current is 'Pending'"),
        (query_line(uuid="0123"), "uuid is '0123'"),
        (query_line(compute_cap="9"), "compute_cap is '9'"),
        (query_line(driver_version="r550"), "driver_version is 'r550'"),
        (query_line(name=""), "name is empty"),
        ("index 0 is an H100\n", "expected 9 comma-separated fields"),
    ],
    ids=short_id,
)
def test_query_rejects_malformed_output(text: str, message: str) -> None:
    with pytest.raises(GpuParseError) as error:
        parse_query_gpu(text)
    assert message in str(error.value)
    assert not isinstance(error.value, NvidiaSmiUnavailable)


@pytest.mark.parametrize(
    "text, message",
    [
        (recorded("nvidia_smi_no_driver.txt"), "couldn't communicate with the NVIDIA driver"),
        ("No devices were found\n", "No devices were found"),
    ],
    ids=short_id,
)
def test_query_reports_unavailable_nvidia_smi(text: str, message: str) -> None:
    with pytest.raises(NvidiaSmiUnavailable, match=re.escape(message)):
        parse_query_gpu(text)


# --------------------------------------------------------------------------- #
# normalize_bus_id
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "bus_id, expected",
    [
        ("00000000:04:00.0", "0000:04:00.0"),
        ("00000000:2A:00.0", "0000:2a:00.0"),
        ("0000:db:00.0", "0000:db:00.0"),
        ("2a:00.0", "0000:2a:00.0"),
        (" 0000:18:00.1\n", "0000:18:00.1"),
        ("E57A:00:00.0", "e57a:00:00.0"),
        ("00010000:01:00.0", "10000:01:00.0"),
    ],
)
def test_normalize_bus_id(bus_id: str, expected: str) -> None:
    assert normalize_bus_id(bus_id) == expected


@pytest.mark.parametrize("bus_id", ["", "GPU0", "0000:04:00", "0000:4:00.0", "0000:04:00.8", "000000000:04:00.0"])
def test_normalize_bus_id_rejects(bus_id: str) -> None:
    with pytest.raises(GpuParseError, match=r"is not of the form DOMAIN:BUS:DEVICE\.FUNCTION"):
        normalize_bus_id(bus_id)


# --------------------------------------------------------------------------- #
# parse_topology
# --------------------------------------------------------------------------- #


def tabs(text: str) -> str:
    return text


def expanded(text: str) -> str:
    """What a terminal shows: tabs expanded to 8-column stops."""
    return text.expandtabs(8)


def four_spaces(text: str) -> str:
    return text.replace("\t", "    ")


def single_spaces(text: str) -> str:
    """The most collapsed rendering: one space between everything, no indentation."""
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()) + "\n"


RENDERINGS = [tabs, expanded, four_spaces, single_spaces]

# Samples as printed in shared/reference/gpu-facts.md (spacing normalised there).
DOC_H100X8 = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity    NUMA Affinity
GPU0     X      NV18    NV18    NV18    NV18    NV18    NV18    NV18    0-51            0
GPU1    NV18     X      NV18    NV18    NV18    NV18    NV18    NV18    0-51            0
GPU2    NV18    NV18     X      NV18    NV18    NV18    NV18    NV18    0-51            0
GPU3    NV18    NV18    NV18     X      NV18    NV18    NV18    NV18    0-51            0
GPU4    NV18    NV18    NV18    NV18     X      NV18    NV18    NV18    52-103          1
GPU5    NV18    NV18    NV18    NV18    NV18     X      NV18    NV18    52-103          1
GPU6    NV18    NV18    NV18    NV18    NV18    NV18     X      NV18    52-103          1
GPU7    NV18    NV18    NV18    NV18    NV18    NV18    NV18     X      52-103          1
"""
DOC_NVLINK2 = """\
        GPU0    GPU1    CPU Affinity    NUMA Affinity
GPU0     X      NV2     0-23            N/A
GPU1    NV2      X      0-23            N/A
"""
DOC_PCIE2 = """\
        GPU0    GPU1    CPU Affinity    NUMA Affinity
GPU0     X      PHB     0-11            N/A
GPU1    PHB      X      0-11            N/A
"""
DOC_PCIE5 = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    CPU Affinity    NUMA Affinity   GPU NUMA ID
GPU0     X      SYS     SYS     SYS     SYS     8-15,24-31      1               N/A
GPU1    SYS      X      PHB     NODE    NODE    0-7,16-23       0               N/A
GPU2    SYS     PHB      X      NODE    NODE    0-7,16-23       0               N/A
GPU3    SYS     NODE    NODE     X      PHB     0-7,16-23       0               N/A
GPU4    SYS     NODE    NODE    PHB      X      0-7,16-23       0               N/A
"""

H100X8_EXPECTED = dict(
    gpus=list(range(8)),
    nics=[],
    numa={gpu: 0 if gpu < 4 else 1 for gpu in range(8)},
    cpu={0: "0-51", 7: "52-103"},
    gpu_numa_id={},
    groups=[list(range(8))],
    cells={(0, 1): "NV18", (7, 6): "NV18", (3, 3): "X"},
    columns=["CPU Affinity", "NUMA Affinity"],
)
NVLINK2_EXPECTED = dict(
    gpus=[0, 1], nics=[], numa={0: None, 1: None}, cpu={0: "0-23", 1: "0-23"}, gpu_numa_id={},
    groups=[[0, 1]], cells={(0, 1): "NV2", (1, 0): "NV2"}, columns=["CPU Affinity", "NUMA Affinity"],
)
PCIE2_EXPECTED = dict(
    gpus=[0, 1], nics=[], numa={0: None, 1: None}, cpu={0: "0-11"}, gpu_numa_id={},
    groups=[[0], [1]], cells={(0, 1): "PHB", (1, 0): "PHB"}, columns=["CPU Affinity", "NUMA Affinity"],
)
PCIE5_EXPECTED = dict(
    gpus=[0, 1, 2, 3, 4],
    nics=[],
    numa={0: 1, 1: 0, 2: 0, 3: 0, 4: 0},
    cpu={0: "8-15,24-31", 1: "0-7,16-23"},
    gpu_numa_id={0: None, 4: None},
    groups=[[0], [1], [2], [3], [4]],
    cells={(0, 1): "SYS", (1, 2): "PHB", (1, 3): "NODE", (4, 3): "PHB", (2, 4): "NODE"},
    columns=["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"],
)
NICS_EXPECTED = dict(
    gpus=list(range(8)),
    nics=["NIC%d" % nic for nic in range(8)],
    numa={gpu: 0 if gpu < 4 else 1 for gpu in range(8)},
    cpu={0: "0-55,112-167", 4: "56-111,168-223"},
    gpu_numa_id={gpu: None for gpu in range(8)},
    groups=[list(range(8))],
    cells={(0, 5): "NV18", (5, 0): "NV18"},
    nic_cells={(0, "NIC0"): "PXB", (0, "NIC1"): "NODE", (0, "NIC4"): "SYS", (5, "NIC5"): "PXB", (5, "NIC0"): "SYS"},
    nic_names={"NIC%d" % nic: "mlx5_%d" % nic for nic in range(8)},
    columns=["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"],
)

# Recorded on a cloud H200 with driver 580.159.04: the header row comes underlined.
H200X1_EXPECTED = dict(
    gpus=[0], nics=[], numa={0: 0}, cpu={0: "0-15"}, gpu_numa_id={0: None}, groups=[[0]], cells={},
    columns=["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"],
)

TOPOLOGY_CASES = [
    pytest.param(recorded("h200x1_topo.txt"), H200X1_EXPECTED, id="h200x1_topo.txt"),
    pytest.param(recorded("h100x8_topo.txt"), H100X8_EXPECTED, id="h100x8_topo.txt"),
    pytest.param(recorded("h100x8_nics_topo.txt"), NICS_EXPECTED, id="h100x8_nics_topo.txt"),
    pytest.param(recorded("nvlink2_topo.txt"), NVLINK2_EXPECTED, id="nvlink2_topo.txt"),
    pytest.param(recorded("pcie2_topo.txt"), PCIE2_EXPECTED, id="pcie2_topo.txt"),
    pytest.param(recorded("pcie5_numa_id_topo.txt"), PCIE5_EXPECTED, id="pcie5_numa_id_topo.txt"),
    pytest.param(DOC_H100X8, H100X8_EXPECTED, id="doc-h100x8"),
    pytest.param(DOC_H100X8 + LEGEND, H100X8_EXPECTED, id="doc-h100x8-legend"),
    pytest.param(DOC_NVLINK2, NVLINK2_EXPECTED, id="doc-nvlink2"),
    pytest.param(DOC_PCIE2, PCIE2_EXPECTED, id="doc-pcie2"),
    pytest.param(DOC_PCIE5, PCIE5_EXPECTED, id="doc-pcie5"),
]


@pytest.mark.parametrize("render", RENDERINGS, ids=lambda render: render.__name__)
@pytest.mark.parametrize("text, expected", TOPOLOGY_CASES)
def test_topology_shapes(text: str, expected: dict, render) -> None:
    topology = parse_topology(render(text))
    assert topology.gpus == expected["gpus"]
    assert topology.nics == expected["nics"]
    assert topology.columns == expected["columns"]
    assert topology.numa_affinity == expected["numa"]
    for gpu, cpus in expected["cpu"].items():
        assert topology.cpu_affinity[gpu] == cpus
    for gpu, numa_id in expected["gpu_numa_id"].items():
        assert topology.gpu_numa_id[gpu] == numa_id
    for (row, column), cell in expected["cells"].items():
        assert topology.links[row][column] == cell
    for (row, nic), cell in expected.get("nic_cells", {}).items():
        assert topology.nic_links[row][nic] == cell
    assert topology.nic_names == expected.get("nic_names", {})
    assert sorted(topology.links) == expected["gpus"]
    assert all(sorted(row) == expected["gpus"] for row in topology.links.values())
    assert all(topology.links[gpu][gpu] == "X" for gpu in topology.gpus)
    assert nvlink_groups(topology) == expected["groups"]


def test_topology_recorded_fixtures_use_tabs_and_end_with_the_legend() -> None:
    """The lab's fake nvidia-smi replays these files: they must look like the real thing."""
    for path in sorted(RECORDED.glob("*_topo.txt")):
        # Driver 580 underlines the header: \x1b[4m ... \x1b[0m.
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(encoding="utf-8"))
        assert text.startswith("\tGPU0\t"), path.name
        assert "\n\nLegend:\n\n  X    = Self\n" in text, path.name
        assert text.endswith("  NV#  = Connection traversing a bonded set of # NVLinks\n") or text.endswith(
            "mlx5_7\n"
        ), path.name


def test_topology_without_affinity_columns() -> None:
    topology = parse_topology("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tNV4\t X \n")
    assert topology.columns == []
    assert topology.numa_affinity == {0: None, 1: None}
    assert topology.cpu_affinity == {0: None, 1: None}
    assert nvlink_groups(topology) == [[0, 1]]


@pytest.mark.parametrize("render", RENDERINGS, ids=lambda render: render.__name__)
def test_topology_keeps_unknown_columns(render) -> None:
    text = (
        "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tFuture Column\n"
        "GPU0\t X \tSYS\t0-7\t0\tfoo\n"
        "GPU1\tSYS\t X \t8-15\t1\tbar\n"
    )
    topology = parse_topology(render(text))
    assert topology.columns == ["CPU Affinity", "NUMA Affinity", "Future Column"]
    assert topology.extra == {0: {"Future Column": "foo"}, 1: {"Future Column": "bar"}}
    assert topology.numa_affinity == {0: 0, 1: 1}


def test_topology_nic_rows_may_carry_affinity() -> None:
    text = (
        "\tGPU0\tNIC0\tCPU Affinity\tNUMA Affinity\n"
        "GPU0\t X \tPIX\t0-15\t0\n"
        "NIC0\tPIX\t X \t0-15\t0\n"
    )
    topology = parse_topology(text)
    assert topology.nic_links == {0: {"NIC0": "PIX"}}
    assert topology.nics == ["NIC0"]


def test_topology_leading_blank_lines_and_crlf() -> None:
    text = "\r\n\r\n" + recorded("nvlink2_topo.txt").replace("\n", "\r\n")
    assert nvlink_groups(parse_topology(text)) == [[0, 1]]


H100 = recorded("h100x8_topo.txt")
H100_LINES = H100.split("\n")


def replace_line(number: int, old: str, new: str, text: str = H100) -> str:
    lines = text.split("\n")
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
    return "\n".join(lines)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "printed nothing"),
        ("\n\n", "printed nothing"),
        (recorded("malformed_topo_no_header.txt"), "line 1: no header row"),
        ("Topology of this host:\n" + H100, "line 1: no header row"),
        (H100_LINES[0] + "\n", "there is no row for GPU0, GPU1, GPU2, GPU3, GPU4, GPU5, GPU6, GPU7"),
        (recorded("malformed_topo_nonsquare.txt"), "not square: the header (line 1) names 8 GPU column(s)"),
        (recorded("malformed_topo_nonsquare.txt"), "no row for GPU7 (7 GPU row(s) found)"),
        (recorded("malformed_topo_unknown_cell.txt"), "line 4 (row GPU2): unknown cell 'NVX' in column GPU0"),
        (replace_line(2, "NV18", "NV0"), "unknown cell 'NV0'"),
        (replace_line(2, "NV18", "SOC"), "expected one of X, NV#, PIX, PXB, PHB, NODE, SYS"),
        (
            replace_line(2, "NV18", "X"),
            "line 2 (row GPU0): column GPU1 holds 'X'; X must appear exactly on the diagonal",
        ),
        (replace_line(3, " X ", "NV18"), "row GPU1): column GPU1 holds 'NV18'"),
        (replace_line(4, "NV18\t", ""), "line 4 (row GPU2): found 9 values after the label; expected 8 link cells"),
        (replace_line(4, "\t0-51", "\tNV18\t0-51"), "found 11 values after the label"),
        (
            replace_line(5, "\t0-51\t0", "\t0-51"),
            "line 5 (row GPU3): found 9 values after the label; expected 8 link cells "
            "(GPU0 GPU1 GPU2 GPU3 GPU4 GPU5 GPU6 GPU7) followed by 2 value(s) for CPU Affinity, NUMA Affinity",
        ),
        (replace_line(6, "GPU4", "GPU9"), "line 6 (row GPU9): GPU9 has a row but no column"),
        (replace_line(6, "GPU4", "GPU3"), "line 6 (row GPU3): GPU3 already has a row on line 5"),
        (replace_line(1, "GPU1", "GPU0"), "the header names GPU0 more than once"),
        (replace_line(2, "\t0-51\t0", "\t0-51\tzero"), "NUMA Affinity is 'zero'; expected a NUMA node number or N/A"),
        (replace_line(2, "0-51", "0-51x"), "CPU Affinity is '0-51x'; expected a CPU list"),
        (replace_line(9, "GPU7", "foo"), "line 9: expected a row starting with GPUn or NICn, found 'foo"),
        (H100.replace("\nLegend:", "\nGPU8\t X \nLegend:"), "line 11: unexpected 'GPU8  X' after the matrix"),
        ("\tNIC0\nNIC0\t X \n", "names no GPU column"),
        ("\tGPU0\tCPU Affinity\tGPU1\nGPU0\t X \t0-7\n", "device column GPU1 comes after the affinity columns"),
        (
            "\tGPU0\tCPU Affinity\tCPU Affinity\nGPU0\t X \t0-7\t0-7\n",
            "the header repeats a column",
        ),
        (
            "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-7\t0\t\tone\n",
            "GPU NUMA ID is 'one'",
        ),
    ],
    ids=short_id,
)
def test_topology_rejects_malformed_output(text: str, message: str) -> None:
    with pytest.raises(GpuParseError) as error:
        parse_topology(text)
    assert message in str(error.value).replace("\\t", " ").replace("\t", " ")


# --------------------------------------------------------------------------- #
# nvlink_groups
# --------------------------------------------------------------------------- #


def topology_of(cells: dict[tuple[int, int], str], count: int) -> Topology:
    links = {gpu: {peer: "X" if gpu == peer else "SYS" for peer in range(count)} for gpu in range(count)}
    for (gpu, peer), cell in cells.items():
        links[gpu][peer] = links[peer][gpu] = cell
    return Topology(gpus=list(range(count)), links=links)


@pytest.mark.parametrize(
    "cells, count, groups",
    [
        ({}, 1, [[0]]),
        ({}, 3, [[0], [1], [2]]),
        ({(0, 1): "NV4", (2, 3): "NV4"}, 4, [[0, 1], [2, 3]]),
        ({(0, 1): "NV12", (1, 2): "NV12"}, 4, [[0, 1, 2], [3]]),
        ({(3, 0): "NV1", (1, 2): "PIX"}, 4, [[0, 3], [1], [2]]),
        ({(0, 2): "NV2", (1, 3): "NV2", (2, 3): "NODE"}, 4, [[0, 2], [1, 3]]),
        ({(a, b): "NV18" for a in range(8) for b in range(8) if a < b}, 8, [list(range(8))]),
    ],
)
def test_nvlink_groups(cells: dict, count: int, groups: list) -> None:
    assert nvlink_groups(topology_of(cells, count)) == groups


def test_nvlink_groups_one_sided_cell_still_joins() -> None:
    topology = topology_of({}, 2)
    topology.links[0][1] = "NV2"  # real output is symmetric; a one-sided NVLink still counts
    assert nvlink_groups(topology) == [[0, 1]]


# --------------------------------------------------------------------------- #
# Property: rendered matrices round-trip through parse_topology
# --------------------------------------------------------------------------- #

LINK_CELLS = st.one_of(
    st.sampled_from(["PIX", "PXB", "PHB", "NODE", "SYS"]),
    st.integers(min_value=1, max_value=18).map(lambda links: "NV%d" % links),
)
CPU_LISTS = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 64)).map(
        lambda pair: str(pair[0]) if pair[1] == 0 else "%d-%d" % (pair[0], pair[0] + pair[1])
    ),
    min_size=1,
    max_size=3,
).map(",".join)
COLUMN_SETS = st.sampled_from(
    [[], ["CPU Affinity"], ["CPU Affinity", "NUMA Affinity"], ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"]]
)


@st.composite
def matrices(draw):
    gpus = draw(st.integers(min_value=1, max_value=8))
    nics = draw(st.integers(min_value=0, max_value=3))
    labels = ["GPU%d" % gpu for gpu in range(gpus)] + ["NIC%d" % nic for nic in range(nics)]
    cells = {}
    for row, row_label in enumerate(labels):
        for column in range(row + 1, len(labels)):
            cell = draw(LINK_CELLS)
            cells[(row_label, labels[column])] = cells[(labels[column], row_label)] = cell
        cells[(row_label, row_label)] = "X"
    columns = draw(COLUMN_SETS)
    values = {}
    for gpu in range(gpus):
        row = {}
        row["CPU Affinity"] = draw(st.one_of(CPU_LISTS, st.just("N/A")))
        row["NUMA Affinity"] = draw(st.one_of(st.integers(0, 7).map(str), st.just("N/A")))
        row["GPU NUMA ID"] = draw(st.one_of(st.integers(8, 15).map(str), st.just("N/A")))
        values["GPU%d" % gpu] = {column: row[column] for column in columns}
    nic_names = {"NIC%d" % nic: "mlx5_%d" % nic for nic in range(nics)}
    return labels, cells, columns, values, nic_names


def render_matrix(labels, cells, columns, values, nic_names) -> str:
    """Render like nvidia-smi: tab separated, ' X ' on the diagonal, two tabs before GPU NUMA ID."""
    lines = ["\t" + "\t".join(labels + columns)]
    for row in labels:
        line = row + "\t" + "\t".join(
            " X " if cells[(row, column)] == "X" else cells[(row, column)] for column in labels
        )
        trailing = values.get(row)
        if trailing is None:
            line += "\t" * len(columns)
        else:
            for column in columns:
                line += ("\t\t" if column == "GPU NUMA ID" else "\t") + trailing[column]
        lines.append(line)
    text = "\n".join(lines) + "\n" + LEGEND
    if nic_names:
        text += "\nNIC Legend:\n\n" + "".join("  %s: %s\n" % item for item in nic_names.items())
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrix=matrices(), render=st.sampled_from(RENDERINGS))
def test_rendered_matrix_round_trips(matrix, render) -> None:
    labels, cells, columns, values, nic_names = matrix
    topology = parse_topology(render(render_matrix(*matrix)))
    gpu_labels = [label for label in labels if label.startswith("GPU")]
    assert topology.gpus == [int(label[3:]) for label in gpu_labels]
    assert topology.nics == [label for label in labels if label.startswith("NIC")]
    assert topology.columns == columns
    assert topology.nic_names == nic_names
    for row in gpu_labels:
        gpu = int(row[3:])
        assert topology.links[gpu] == {int(column[3:]): cells[(row, column)] for column in gpu_labels}
        assert topology.nic_links[gpu] == {nic: cells[(row, nic)] for nic in topology.nics}
        expected_cpu = values[row].get("CPU Affinity", "N/A")
        assert topology.cpu_affinity[gpu] == (None if expected_cpu == "N/A" else expected_cpu)
        expected_numa = values[row].get("NUMA Affinity", "N/A")
        assert topology.numa_affinity[gpu] == (None if expected_numa == "N/A" else int(expected_numa))
        expected_numa_id = values[row].get("GPU NUMA ID", "N/A")
        assert topology.gpu_numa_id[gpu] == (None if expected_numa_id == "N/A" else int(expected_numa_id))


@settings(max_examples=150, deadline=None)
@given(matrix=matrices())
def test_nvlink_groups_are_the_nvlink_components(matrix) -> None:
    topology = parse_topology(render_matrix(*matrix))
    groups = nvlink_groups(topology)
    assert sorted(gpu for group in groups for gpu in group) == topology.gpus  # a partition
    assert all(group == sorted(group) for group in groups)
    assert [group[0] for group in groups] == sorted(group[0] for group in groups)
    group_of = {gpu: number for number, group in enumerate(groups) for gpu in group}
    nvlinked = {
        gpu: {peer for peer, cell in row.items() if cell.startswith("NV")} for gpu, row in topology.links.items()
    }
    for gpu, peers in nvlinked.items():
        assert all(group_of[peer] == group_of[gpu] for peer in peers)
    for group in groups:  # each group is connected by NVLink alone
        reached, queue = {group[0]}, deque([group[0]])
        while queue:
            for peer in nvlinked[queue.popleft()] - reached:
                reached.add(peer)
                queue.append(peer)
        assert reached == set(group)


# --------------------------------------------------------------------------- #
# lspci
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "fixture, bus_ids, name, device_id, switches",
    [
        ("lspci_h100x8_nvswitch.txt", H100_BUS_IDS, "GH100 [H100 SXM5 80GB]", "2330", 4),
        (
            "lspci_l40s_pcie5.txt",
            ["0000:17:00.0", "0000:31:00.0", "0000:32:00.0", "0000:4b:00.0", "0000:4c:00.0"],
            "AD102GL [L40S]",
            "26b9",
            0,
        ),
        ("lspci_rtx4090x2.txt", ["0000:01:00.0", "0000:02:00.0"], "AD102 [GeForce RTX 4090]", "2684", 0),
    ],
)
def test_lspci_fixtures(fixture: str, bus_ids: list, name: str, device_id: str, switches: int) -> None:
    text = recorded(fixture)
    gpus = parse_lspci(text)
    assert [gpu["pci_bus_id"] for gpu in gpus] == bus_ids
    assert {gpu["name"] for gpu in gpus} == {name}
    assert {gpu["device_id"] for gpu in gpus} == {device_id}
    assert len(parse_lspci_nvswitches(text)) == switches
    assert nvswitch_present(None, text) is (switches > 0)


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "0000:1b:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)",
            {"pci_bus_id": "0000:1b:00.0", "class_code": "0302", "class_name": "3D controller",
             "name": "GH100 [H100 SXM5 80GB]", "device_id": "2330"},
        ),
        (
            "18:00.0 3D controller: NVIDIA Corporation GH100 [H100 SXM5 80GB] (rev a1)",
            {"pci_bus_id": "0000:18:00.0", "class_code": None, "class_name": "3D controller",
             "name": "GH100 [H100 SXM5 80GB]", "device_id": None},
        ),
        (
            "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation AD102 [GeForce RTX 4090] [10de:2684] (rev a1)",
            {"pci_bus_id": "0000:01:00.0", "class_code": "0300", "class_name": "VGA compatible controller",
             "name": "AD102 [GeForce RTX 4090]", "device_id": "2684"},
        ),
        (
            "47:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:20b2] (rev a1)",
            {"pci_bus_id": "0000:47:00.0", "class_code": "0302", "class_name": "3D controller",
             "name": "Device", "device_id": "20b2"},
        ),
        (
            "07:00.0 3D controller [0302]: nVidia Corporation GK210GL [Tesla K80] [10de:102d] (rev a1)",
            {"pci_bus_id": "0000:07:00.0", "class_code": "0302", "class_name": "3D controller",
             "name": "GK210GL [Tesla K80]", "device_id": "102d"},
        ),
    ],
)
def test_lspci_line_formats(line: str, expected: dict) -> None:
    assert parse_lspci(line + "\n") == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "01:00.1 Audio device [0403]: NVIDIA Corporation AD102 High Definition Audio Controller [10de:22ba] (rev a1)\n",
        "05:00.0 Bridge [0680]: NVIDIA Corporation GH100 [H100 NVSwitch] [10de:22a3] (rev a1)\n",
        "04:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000] (rev 52)\n",
        "04:00.0 VGA compatible controller: ASPEED Technology, Inc. ASPEED Graphics Family (rev 52)\n",
        "e57a:00:00.0 3D controller: Microsoft Corporation Device 008e\n",
        "",
    ],
)
def test_lspci_skips_what_is_not_an_nvidia_gpu(text: str) -> None:
    assert parse_lspci(text) == []


def test_lspci_full_listing_with_detail_lines() -> None:
    text = (
        "0000:04:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000]"
        " (rev 52)\n"
        "\tSubsystem: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000]\n"
        "\tKernel driver in use: ast\n"
        "0000:07:00.0 Bridge [0680]: NVIDIA Corporation GH100 [H100 NVSwitch] [10de:22a3] (rev a1)\n"
        "\tKernel driver in use: nvidia-nvswitch\n"
        "0001:00:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)\n"
        "0000:1b:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)\n"
        "    Kernel modules: nvidiafb, nouveau\n"
        "10000:01:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)\n"
    )
    assert [gpu["pci_bus_id"] for gpu in parse_lspci(text)] == ["0000:1b:00.0", "0001:00:00.0", "10000:01:00.0"]
    assert [switch["pci_bus_id"] for switch in parse_lspci_nvswitches(text)] == ["0000:07:00.0"]


@pytest.mark.parametrize(
    "line, is_switch",
    [
        ("54:00.0 Bridge [0680]: NVIDIA Corporation GA100 [A100 NVSwitch] [10de:1af1] (rev a1)", True),
        ("54:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:1af1] (rev a1)", True),
        ("05:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)", True),
        ("05:00.0 Bridge: NVIDIA Corporation GH100 [H100 NVSwitch] (rev a1)", True),
        ("00:07.0 Bridge [0680]: nVidia Corporation MCP61 Ethernet [10de:03ef] (rev a2)", False),
        ("18:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)", False),
    ],
)
def test_lspci_nvswitch_detection(line: str, is_switch: bool) -> None:
    assert bool(parse_lspci_nvswitches(line + "\n")) is is_switch


@pytest.mark.parametrize(
    "text, message",
    [
        ("lspci: Unable to load libkmod resources: error -2\n", "line 1: 'lspci: Unable to load libkmod"),
        (
            recorded("lspci_h100x8_nvswitch.txt") + "garbage\n",
            "line 13: 'garbage' is not a device line; expected 'BB:DD.F Class [cccc]",
        ),
    ],
    ids=short_id,
)
def test_lspci_rejects_malformed_output(text: str, message: str) -> None:
    with pytest.raises(GpuParseError) as error:
        parse_lspci(text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "proc_devices, lspci_text, expected",
    [
        (["0000:05:00.0", "0000:06:00.0"], None, True),
        (["0000:05:00.0"], recorded("lspci_l40s_pcie5.txt"), True),
        ([], recorded("lspci_h100x8_nvswitch.txt"), True),
        (None, recorded("lspci_h100x8_nvswitch.txt"), True),
        ([], recorded("lspci_l40s_pcie5.txt"), False),
        (None, None, False),
        ([], "", False),
    ],
)
def test_nvswitch_present(proc_devices, lspci_text, expected: bool) -> None:
    assert nvswitch_present(proc_devices, lspci_text) is expected


# --------------------------------------------------------------------------- #
# sysfs numa_node
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("text, expected", [("0\n", 0), ("1", 1), ("7\n", 7), ("-1\n", None)])
def test_parse_numa_node(text: str, expected) -> None:
    assert parse_numa_node(text) == expected


@pytest.mark.parametrize("text", ["", "abc\n", "-2\n", "0 1\n"])
def test_parse_numa_node_rejects(text: str) -> None:
    path = "/sys/bus/pci/devices/0000:18:00.0/numa_node"
    with pytest.raises(GpuParseError, match=re.escape(path) + ".*expected a NUMA node number or -1"):
        parse_numa_node(text, path)


def test_numa_nodes_by_gpu_sorts_keys_numerically_and_skips_unknown() -> None:
    gpus = [{"index": 0, "numa_node": 10}, {"index": 1, "numa_node": 2}, {"index": 2, "numa_node": None},
            {"index": 3, "numa_node": 2}]
    result = numa_nodes_by_gpu(gpus)
    assert result == {"2": [1, 3], "10": [0]}
    assert list(result) == ["2", "10"]


# --------------------------------------------------------------------------- #
# build_facts
# --------------------------------------------------------------------------- #

H100_SYSFS = {bus: (0 if number < 4 else 1) for number, bus in enumerate(H100_BUS_IDS)}


def test_build_facts_h100x8() -> None:
    facts = build_facts(
        parse_query_gpu(recorded("h100x8_query.csv")),
        topology=parse_topology(recorded("h100x8_topo.txt")),
        lspci_text=recorded("lspci_h100x8_nvswitch.txt"),
        nvswitch_devices=None,
        sysfs_numa=H100_SYSFS,
    )
    assert facts["source"] == "nvidia-smi"
    assert facts["driver_version"] == "550.90.07"
    assert facts["count"] == 8
    assert facts["nvlink_groups"] == [list(range(8))]
    assert facts["nvswitch"] is True
    assert facts["mig_enabled"] is False
    assert facts["numa_nodes"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    assert facts["links"]["0"] == {str(peer): "NV18" for peer in range(1, 8)}
    assert sorted(facts["links"]) == [str(gpu) for gpu in range(8)]
    assert facts["notes"] == []
    assert facts["gpus"][7] == {
        "index": 7,
        "uuid": "GPU-7fa42f93-ceaf-2ffb-f3e0-b6e9aba45ee6",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mib": 81559,
        "pci_bus_id": "0000:db:00.0",
        "numa_node": 1,
        "compute_capability": "9.0",
        "persistence_mode": True,
        "mig_mode": "Disabled",
    }


@pytest.mark.parametrize(
    "query, lspci, note",
    [
        ("h100x8_query.csv", "lspci_h100x8_nvswitch.txt", None),
        ("pcie2_query.csv", "lspci_rtx4090x2.txt", None),
        ("pcie2_query.csv", "", None),
        (
            "pcie2_query.csv",
            "lspci_l40s_pcie5.txt",
            "lspci lists NVIDIA GPU(s) at 0000:17:00.0, 0000:31:00.0, 0000:32:00.0, 0000:4b:00.0, 0000:4c:00.0 "
            "that nvidia-smi does not show",
        ),
    ],
)
def test_build_facts_notes_gpus_nvidia_smi_does_not_show(query: str, lspci: str, note) -> None:
    facts = build_facts(parse_query_gpu(recorded(query)), lspci_text=recorded(lspci) if lspci else "")
    assert facts["source"] == "nvidia-smi"
    lspci_notes = [text for text in facts["notes"] if text.startswith("lspci")]
    if note is None:
        assert lspci_notes == []
    else:
        assert len(lspci_notes) == 1 and lspci_notes[0].startswith(note)


def test_build_facts_notes_a_gpu_missing_from_nvidia_smi() -> None:
    query = "\n".join(recorded("h100x8_query.csv").splitlines()[:7]) + "\n"
    facts = build_facts(parse_query_gpu(query), lspci_text=recorded("lspci_h100x8_nvswitch.txt"))
    assert facts["count"] == 7
    assert facts["notes"][0] == (
        "lspci lists NVIDIA GPU(s) at 0000:db:00.0 that nvidia-smi does not show; they are left out (bound to "
        "another driver such as vfio-pci, or fallen off the bus: check dmesg for Xid errors)"
    )


def test_build_facts_sysfs_wins_over_topology_and_minus_one_means_none() -> None:
    sysfs = dict(H100_SYSFS)
    sysfs["0000:18:00.0"] = None  # numa_node said -1
    sysfs["0000:db:00.0"] = 3
    facts = build_facts(
        parse_query_gpu(recorded("h100x8_query.csv")),
        topology=parse_topology(recorded("h100x8_topo.txt")),
        sysfs_numa=sysfs,
    )
    assert facts["gpus"][0]["numa_node"] is None
    assert facts["numa_nodes"] == {"0": [1, 2, 3], "1": [4, 5, 6], "3": [7]}
    assert facts["notes"] == []


def test_build_facts_numa_from_topology_when_sysfs_is_missing() -> None:
    facts = build_facts(
        parse_query_gpu(recorded("pcie5_query.csv")),
        topology=parse_topology(recorded("pcie5_numa_id_topo.txt")),
        sysfs_numa={"0000:17:00.0": 1},
    )
    assert facts["numa_nodes"] == {"0": [1, 2, 3, 4], "1": [0]}
    assert facts["notes"] == [
        "numa_node of GPU(s) 1, 2, 3, 4 taken from nvidia-smi topo -m: sysfs has no numa_node for them"
    ]
    assert facts["nvlink_groups"] == [[0], [1], [2], [3], [4]]
    assert facts["links"]["1"] == {"0": "SYS", "2": "PHB", "3": "NODE", "4": "NODE"}
    assert facts["nvswitch"] is False


def test_build_facts_mig_and_mixed_driver_versions() -> None:
    text = query_line(mig_dot_mode_dot_current="Enabled") + "\n" + query_line(
        index="1", pci_dot_bus_id="00000000:2A:00.0", driver_version="550.54.15"
    )
    facts = build_facts(parse_query_gpu(text))
    assert facts["mig_enabled"] is True
    assert facts["driver_version"] == "550.54.15"
    assert "GPUs report different driver versions (550.54.15, 550.90.07)" in facts["notes"]


def test_build_facts_without_topology() -> None:
    facts = build_facts(
        parse_query_gpu(recorded("h100x8_query.csv")),
        topology_problem="nvidia-smi topo -m failed (rc=3: Unable to determine the device handle)",
    )
    assert facts["links"] == {}
    assert facts["nvlink_groups"] == []
    assert facts["numa_nodes"] == {}
    assert facts["notes"] == [
        "nvidia-smi topo -m failed (rc=3: Unable to determine the device handle); links and nvlink_groups are empty"
    ]


def test_build_facts_refuses_a_topology_of_other_gpus() -> None:
    message = r"topo -m shows GPUs \[0, 1\] but nvidia-smi --query-gpu lists GPUs \[0, 1, 2"
    with pytest.raises(GpuParseError, match=message):
        build_facts(parse_query_gpu(recorded("h100x8_query.csv")), topology=parse_topology(recorded("pcie2_topo.txt")))


def test_build_facts_lspci_fallback() -> None:
    facts = build_facts(
        None,
        lspci_text=recorded("lspci_h100x8_nvswitch.txt"),
        sysfs_numa={"0000:18:00.0": 0, "0000:db:00.0": None},
        smi_problem="nvidia-smi not found",
    )
    assert facts["source"] == "lspci"
    assert facts["driver_version"] is None
    assert facts["count"] == 8
    assert facts["nvswitch"] is True
    assert facts["nvlink_groups"] == []
    assert facts["links"] == {}
    assert facts["numa_nodes"] == {"0": [0]}
    assert facts["gpus"][0] == {
        "index": 0,
        "uuid": None,
        "name": "GH100 [H100 SXM5 80GB]",
        "memory_mib": None,
        "pci_bus_id": "0000:18:00.0",
        "numa_node": 0,
        "compute_capability": None,
        "persistence_mode": None,
        "mig_mode": None,
    }
    assert facts["notes"] == [
        "nvidia-smi not found; counted GPUs with lspci (names only, no memory)",
        "NVLink topology needs the NVIDIA driver; links and nvlink_groups are empty",
    ]


@pytest.mark.parametrize(
    "lspci_text, lspci_problem, note",
    [
        ("", None, "nvidia-smi not found; lspci lists no NVIDIA GPU"),
        (
            "04:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000]\n",
            None,
            "nvidia-smi not found; lspci lists no NVIDIA GPU",
        ),
        (
            None,
            "lspci not found (install pciutils)",
            "nvidia-smi not found, and lspci not found (install pciutils), so no GPU could be counted",
        ),
    ],
)
def test_build_facts_no_gpu(lspci_text, lspci_problem, note: str) -> None:
    facts = build_facts(None, lspci_text=lspci_text, smi_problem="nvidia-smi not found", lspci_problem=lspci_problem)
    assert facts == {
        "source": "none",
        "driver_version": None,
        "count": 0,
        "gpus": [],
        "nvlink_groups": [],
        "nvswitch": False,
        "mig_enabled": False,
        "numa_nodes": {},
        "links": {},
        "notes": [note],
    }


def test_build_facts_keeps_notes_passed_in_first() -> None:
    facts = build_facts(None, lspci_text="", smi_problem="nvidia-smi not found", notes=["earlier"])
    assert facts["notes"][0] == "earlier"
