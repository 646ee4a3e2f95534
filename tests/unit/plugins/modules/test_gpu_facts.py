"""Tests of the gpu_facts module: the real module code against fake nvidia-smi and lspci binaries.

Each test writes shell scripts that replay recorded output (tests/fixtures/nvidia_smi)
for exactly the arguments the module is meant to pass, and a temporary sysfs/procfs
tree; anything else the scripts are asked exits 64, which shows up as a wrong result.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Optional

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import QUERY_GPU_ARGS
from ansible_collections.aphrodite.baremetal.plugins.modules import gpu_facts
from module_harness import ExitJson, FailJson, module_exits, run_module  # noqa: F401  (autouse fixture)

RECORDED = Path(__file__).resolve().parents[3] / "fixtures" / "nvidia_smi"
H100_BUS_IDS = [
    "0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
    "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0",
]
LSPCI_NOTE = "counted GPUs with lspci (names only, no memory)"


class Host:
    """A fake host: a bin directory, a sysfs tree and a procfs tree under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.sys = root / "sys"
        self.proc = root / "proc"
        for path in (self.bin, self.sys, self.proc):
            path.mkdir(parents=True)
        self.calls = root / "calls.log"

    def script(self, name: str, replies: dict[tuple[str, ...], tuple[int, str, str]]) -> Path:
        """A /bin/sh script answering each argument list with (rc, stdout fixture or text, stderr)."""
        cases = []
        for args, (rc, stdout, stderr) in replies.items():
            body = []
            if stdout:
                source = RECORDED / stdout
                body.append("cat %s" % shlex.quote(str(source)) if source.is_file() else "printf '%%s\\n' %s"
                            % shlex.quote(stdout))
            if stderr:
                body.append("printf '%%s\\n' %s >&2" % shlex.quote(stderr))
            body.append("exit %d" % rc)
            cases.append("  %s)\n    %s\n    ;;" % (shlex.quote(" ".join(args)), "\n    ".join(body)))
        text = (
            "#!/bin/sh\n"
            "PATH=/usr/bin:/bin\n"  # the test's PATH holds only the fakes
            'echo "%s $*" >> %s\n'
            'case "$*" in\n%s\n  *)\n    echo "unexpected arguments: $*" >&2\n    exit 64\n    ;;\nesac\n'
        ) % (name, shlex.quote(str(self.calls)), "\n".join(cases))
        path = self.bin / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)
        return path

    def nvidia_smi(self, query: str = "h100x8_query.csv", topo: str = "h100x8_topo.txt", query_rc: int = 0,
                   topo_rc: int = 0, query_stderr: str = "", topo_stderr: str = "") -> Path:
        return self.script("nvidia-smi", {
            QUERY_GPU_ARGS: (query_rc, query, query_stderr),
            ("topo", "-m"): (topo_rc, topo, topo_stderr),
        })

    def lspci(self, fixture: str = "", rc: int = 0, stderr: str = "") -> Path:
        return self.script("lspci", {("-nn", "-d", "10de:"): (rc, fixture, stderr)})

    def numa(self, bus_id: str, text: str) -> None:
        device = self.sys / "bus" / "pci" / "devices" / bus_id
        device.mkdir(parents=True)
        (device / "numa_node").write_text(text, encoding="ascii")

    def nvswitches(self, *bus_ids: str) -> None:
        devices = self.proc / "driver" / "nvidia-nvswitch" / "devices"
        devices.mkdir(parents=True)
        for bus_id in bus_ids:
            (devices / bus_id).mkdir()

    def called(self) -> list[str]:
        return self.calls.read_text(encoding="utf-8").splitlines() if self.calls.exists() else []

    def args(self, **extra) -> dict:
        args = {"sysfs_root": str(self.sys), "proc_root": str(self.proc)}
        args.update(extra)
        return args


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    fake = Host(tmp_path)
    monkeypatch.setenv("PATH", str(fake.bin))
    return fake


def run(args: dict, check_mode: bool = False) -> dict:
    outcome = run_module(gpu_facts.main, args, check_mode=check_mode)
    assert outcome["changed"] is False
    return outcome["ansible_facts"]["aphrodite_gpus"]


def fail(args: dict) -> dict:
    with patch_module_args(args):
        with pytest.raises(FailJson) as result:
            gpu_facts.main()
    return result.value.args[0]


def sbin_has(name: str) -> bool:
    """get_bin_path also searches the sbin directories, outside the test's PATH."""
    return shutil.which(name, path="/sbin:/usr/sbin:/usr/local/sbin") is not None


def expected_h100_gpu(index: int, numa: Optional[int]) -> dict:
    uuids = [line.split(", ")[1] for line in (RECORDED / "h100x8_query.csv").read_text().splitlines()]
    return {
        "index": index,
        "uuid": uuids[index],
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mib": 81559,
        "pci_bus_id": H100_BUS_IDS[index],
        "numa_node": numa,
        "compute_capability": "9.0",
        "persistence_mode": True,
        "mig_mode": "Disabled",
    }


@pytest.mark.parametrize("query", ["h100x8_query.csv", "h100x8_query_units.csv"])
@pytest.mark.parametrize("check_mode", [False, True])
def test_h100x8_with_driver(host: Host, query: str, check_mode: bool) -> None:
    host.nvidia_smi(query=query)
    host.lspci("lspci_h100x8_nvswitch.txt")
    for number, bus_id in enumerate(H100_BUS_IDS):
        host.numa(bus_id, "0\n" if number < 4 else "1\n")
    host.nvswitches("0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0")

    facts = run(host.args(), check_mode=check_mode)

    assert facts == {
        "source": "nvidia-smi",
        "driver_version": "550.90.07",
        "count": 8,
        "gpus": [expected_h100_gpu(index, 0 if index < 4 else 1) for index in range(8)],
        "nvlink_groups": [[0, 1, 2, 3, 4, 5, 6, 7]],
        "nvswitch": True,
        "mig_enabled": False,
        "numa_nodes": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]},
        "links": {str(gpu): {str(peer): "NV18" for peer in range(8) if peer != gpu} for gpu in range(8)},
        "notes": [],
    }
    assert host.called() == [
        "nvidia-smi " + " ".join(QUERY_GPU_ARGS),
        "nvidia-smi topo -m",
        "lspci -nn -d 10de:",
    ]


def test_numa_from_topology_without_sysfs_and_no_lspci(host: Host) -> None:
    """The lab's GPU nodes: recorded nvidia-smi, no sysfs entries, no pciutils."""
    host.nvidia_smi(topo="h100x8_nics_topo.txt")
    facts = run(host.args(lspci_path=str(host.bin / "lspci")))
    assert facts["source"] == "nvidia-smi"
    assert facts["numa_nodes"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    assert facts["nvswitch"] is False
    assert facts["nvlink_groups"] == [list(range(8))]
    assert facts["notes"] == [
        "numa_node of GPU(s) 0, 1, 2, 3, 4, 5, 6, 7 taken from nvidia-smi topo -m: sysfs has no numa_node for them"
    ]


@pytest.mark.parametrize(
    "proc_devices, lspci, expected",
    [
        (["0000:05:00.0", "0000:06:00.0"], None, True),
        (None, "lspci_h100x8_nvswitch.txt", True),
        ([], "lspci_h100x8_nvswitch.txt", True),
        ([], "lspci_l40s_pcie5.txt", False),
        (None, None, False),
    ],
)
def test_nvswitch_from_procfs_or_lspci(host: Host, proc_devices, lspci, expected: bool) -> None:
    host.nvidia_smi()
    if proc_devices is not None:
        host.nvswitches(*proc_devices)
    if lspci is not None:
        host.lspci(lspci)
    facts = run(host.args(lspci_path=str(host.bin / "lspci")))
    assert facts["nvswitch"] is expected


def test_sysfs_minus_one_and_pcie_box(host: Host) -> None:
    host.nvidia_smi(query="pcie5_query.csv", topo="pcie5_numa_id_topo.txt")
    host.lspci("lspci_l40s_pcie5.txt")
    for bus_id in ("0000:17:00.0", "0000:31:00.0", "0000:32:00.0", "0000:4b:00.0", "0000:4c:00.0"):
        host.numa(bus_id, "-1\n")
    facts = run(host.args())
    assert facts["count"] == 5
    assert [gpu["numa_node"] for gpu in facts["gpus"]] == [None] * 5
    assert facts["numa_nodes"] == {}
    assert [gpu["mig_mode"] for gpu in facts["gpus"]] == [None] * 5
    assert facts["mig_enabled"] is False
    assert facts["nvswitch"] is False
    assert facts["nvlink_groups"] == [[0], [1], [2], [3], [4]]
    assert facts["links"]["0"] == {"1": "SYS", "2": "SYS", "3": "SYS", "4": "SYS"}
    assert facts["notes"] == []


def test_driver_not_loaded_falls_back_to_lspci(host: Host) -> None:
    host.nvidia_smi(query="nvidia_smi_no_driver.txt", query_rc=9)
    host.lspci("lspci_h100x8_nvswitch.txt")
    host.numa("0000:18:00.0", "0\n")
    host.numa("0000:db:00.0", "1\n")
    facts = run(host.args())
    assert facts["source"] == "lspci"
    assert facts["driver_version"] is None
    assert facts["count"] == 8
    assert [gpu["pci_bus_id"] for gpu in facts["gpus"]] == H100_BUS_IDS
    assert facts["gpus"][7] == {
        "index": 7,
        "uuid": None,
        "name": "GH100 [H100 SXM5 80GB]",
        "memory_mib": None,
        "pci_bus_id": "0000:db:00.0",
        "numa_node": 1,
        "compute_capability": None,
        "persistence_mode": None,
        "mig_mode": None,
    }
    assert facts["numa_nodes"] == {"0": [0], "1": [7]}
    assert facts["nvswitch"] is True
    assert facts["nvlink_groups"] == []
    assert facts["links"] == {}
    assert facts["notes"][0] == (
        "nvidia-smi --query-gpu failed (rc=9: NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running.); "
        + LSPCI_NOTE
    )
    assert "nvidia-smi topo -m" not in host.called()


@pytest.mark.parametrize(
    "query, query_rc, stderr, problem",
    [
        ("No devices were found", 6, "", "No devices were found"),
        ("nvidia_smi_no_driver.txt", 0, "", "nvidia-smi cannot query GPUs: NVIDIA-SMI has failed"),
        ("", 2, 'Field "compute_cap" is not a valid field to query.', 'rc=2: Field "compute_cap" is not a valid'),
    ],
)
def test_other_nvidia_smi_failures_fall_back_to_lspci(host: Host, query: str, query_rc: int, stderr: str,
                                                      problem: str) -> None:
    host.nvidia_smi(query=query, query_rc=query_rc, query_stderr=stderr)
    host.lspci("lspci_rtx4090x2.txt")
    facts = run(host.args())
    assert facts["source"] == "lspci"
    assert [gpu["name"] for gpu in facts["gpus"]] == ["AD102 [GeForce RTX 4090]"] * 2
    assert problem in facts["notes"][0]
    assert facts["notes"][0].endswith(LSPCI_NOTE)


@pytest.mark.skipif(sbin_has("nvidia-smi"), reason="this machine has a real nvidia-smi in an sbin directory")
def test_nvidia_smi_not_on_path(host: Host) -> None:
    host.lspci("lspci_h100x8_nvswitch.txt")
    facts = run(host.args())
    assert facts["source"] == "lspci"
    assert facts["count"] == 8
    assert facts["notes"][0] == "nvidia-smi not found; " + LSPCI_NOTE


def test_nvidia_smi_path_that_is_not_executable(host: Host, tmp_path: Path) -> None:
    host.lspci("lspci_l40s_pcie5.txt")
    missing = tmp_path / "opt" / "nvidia-smi"
    facts = run(host.args(nvidia_smi_path=str(missing)))
    assert facts["source"] == "lspci"
    assert facts["count"] == 5
    assert facts["notes"][0] == "nvidia-smi %s is not an executable file (nvidia_smi_path); %s" % (missing, LSPCI_NOTE)


def test_explicit_paths_win_over_path(host: Host, tmp_path: Path) -> None:
    elsewhere = Host(tmp_path / "elsewhere")
    smi = elsewhere.nvidia_smi(query="pcie2_query.csv", topo="pcie2_topo.txt")
    lspci = elsewhere.lspci("lspci_rtx4090x2.txt")
    host.nvidia_smi()  # on PATH, must not be used
    facts = run(host.args(nvidia_smi_path=str(smi), lspci_path=str(lspci)))
    assert facts["count"] == 2
    assert facts["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert facts["gpus"][0]["persistence_mode"] is False
    assert facts["nvlink_groups"] == [[0], [1]]
    assert host.called() == []


@pytest.mark.skipif(sbin_has("nvidia-smi"), reason="this machine has a real nvidia-smi in an sbin directory")
def test_no_nvidia_device(host: Host) -> None:
    host.lspci("")
    facts = run(host.args())
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
        "notes": ["nvidia-smi not found; lspci lists no NVIDIA GPU"],
    }


def test_neither_nvidia_smi_nor_lspci(host: Host, tmp_path: Path) -> None:
    facts = run(host.args(nvidia_smi_path=str(tmp_path / "none"), lspci_path=str(tmp_path / "none")))
    assert facts["source"] == "none"
    assert facts["count"] == 0
    assert facts["notes"] == [
        "nvidia-smi %s is not an executable file (nvidia_smi_path), and lspci %s is not an executable file "
        "(lspci_path), so no GPU could be counted" % (tmp_path / "none", tmp_path / "none")
    ]


def test_lspci_failure_is_noted(host: Host) -> None:
    host.nvidia_smi(query="nvidia_smi_no_driver.txt", query_rc=9)
    host.lspci(rc=1, stderr="lspci: Cannot open /sys/bus/pci/devices")
    facts = run(host.args())
    assert facts["source"] == "none"
    assert facts["notes"][0].endswith(
        ", and lspci -nn -d 10de: failed (rc=1: lspci: Cannot open /sys/bus/pci/devices), so no GPU could be counted"
    )


def test_topology_failure_is_noted(host: Host) -> None:
    host.nvidia_smi(topo="No devices were found", topo_rc=6, topo_stderr="Unable to determine the device handle")
    host.lspci("lspci_h100x8_nvswitch.txt")
    facts = run(host.args())
    assert facts["source"] == "nvidia-smi"
    assert facts["count"] == 8
    assert facts["links"] == {}
    assert facts["nvlink_groups"] == []
    assert facts["notes"] == [
        "nvidia-smi topo -m failed (rc=6: Unable to determine the device handle); links and nvlink_groups are empty"
    ]


@pytest.mark.parametrize(
    "smi, message",
    [
        (
            {"query": "malformed_query_field_count.csv"},
            "nvidia-smi --query-gpu output, line 1: expected 9 comma-separated fields",
        ),
        ({"query": "malformed_query_index.csv"}, "line 2: index is 'GPU1'"),
        ({"query": "h100x8_topo.txt"}, "line 1: expected 9 comma-separated fields"),
        ({"topo": "malformed_topo_nonsquare.txt"}, "nvidia-smi topo -m: the matrix is not square"),
        ({"topo": "malformed_topo_unknown_cell.txt"}, "unknown cell 'NVX' in column GPU0"),
        ({"topo": "malformed_topo_no_header.txt"}, "line 1: no header row"),
        ({"topo": "pcie2_topo.txt"}, "topo -m shows GPUs [0, 1] but nvidia-smi --query-gpu lists GPUs [0, 1, 2"),
    ],
)
def test_unparseable_nvidia_smi_output_fails(host: Host, smi: dict, message: str) -> None:
    host.nvidia_smi(**smi)
    host.lspci("lspci_h100x8_nvswitch.txt")
    result = fail(host.args())
    assert message in result["msg"]


def test_unparseable_sysfs_fails(host: Host) -> None:
    host.nvidia_smi()
    host.lspci("lspci_h100x8_nvswitch.txt")
    host.numa("0000:18:00.0", "zero\n")
    result = fail(host.args())
    assert "0000:18:00.0/numa_node holds 'zero'; expected a NUMA node number or -1" in result["msg"]


def test_unparseable_lspci_fails_in_fallback(host: Host) -> None:
    host.nvidia_smi(query="nvidia_smi_no_driver.txt", query_rc=9)
    host.lspci("lspci: Unable to load libkmod resources: error -2")
    result = fail(host.args())
    assert "lspci output, line 1" in result["msg"]
