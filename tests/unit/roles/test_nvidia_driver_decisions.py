"""What the nvidia_driver role decides (plugins/filter/nvidia.py), from recorded hardware output.

These are the cases the lab cannot show: NVSwitch systems, a driver waiting for its
reboot, a user space newer than the loaded module, Secure Boot on a UEFI host.
"""

from __future__ import annotations

import base64

import pytest

from ansible_collections.aphrodite.baremetal.plugins.filter.nvidia import (
    FilterModule,
    branch_of,
    driver_state,
    secure_boot_state,
    upstream_version,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import (
    build_facts,
    parse_query_gpu,
)


def _facts(fixtures_dir, query: str | None, lspci: str | None = None, nvswitch_devices=None) -> dict:
    recorded = fixtures_dir / "nvidia_smi"
    smi = parse_query_gpu((recorded / query).read_text()) if query else None
    lspci_text = (recorded / lspci).read_text() if lspci else None
    return build_facts(smi, lspci_text=lspci_text, nvswitch_devices=nvswitch_devices,
                       smi_problem=None if query else "nvidia-smi not found")


@pytest.fixture()
def h100(fixtures_dir) -> dict:
    """The lab's 8xH100 replay: driver 550.90.07 loaded, no NVSwitch visible to lspci."""
    return _facts(fixtures_dir, "h100x8_query.csv")


@pytest.mark.parametrize(("version", "upstream", "branch"), [
    ("550.90.07", "550.90.07", "550"),
    ("550.90.07\n", "550.90.07", "550"),
    ("550.90.07-1", "550.90.07", "550"),
    ("550.163.01-0ubuntu0.24.04.1", "550.163.01", "550"),
    ("3:550.90.07-1.el9", "550.90.07", "550"),
    ("535.216.01-1~deb12u1", "535.216.01", "535"),
    ("1010.12", "1010.12", "1010"),
    (None, None, None),
    ("", None, None),
])
def test_versions_reduce_to_upstream_and_branch(version, upstream, branch):
    assert upstream_version(version) == upstream
    assert branch_of(version) == branch


@pytest.mark.parametrize("version", ["latest", "v550.90", "55.1", "550", "1.17.8-1"])
def test_what_is_not_a_driver_version_is_refused(version):
    with pytest.raises(ValueError, match="is not an NVIDIA driver version"):
        upstream_version(version)


# (wanted, kernel module, installed package, action, reboot pending)
CASES = [
    # The lab: the wanted branch is loaded, installed by hand (no package): nothing to do.
    ("550", None, None, "none", False),
    # Same branch, packages match the module.
    ("550", "550.90.07", "550.90.07-1", "none", False),
    # Another branch loaded, nothing of the wanted one installed: replace it.
    ("570", None, None, "change", False),
    ("570", "550.90.07", "550.90.07-1", "change", False),
    # The wanted branch installed by an earlier run, the old module still loaded.
    ("570", "550.90.07", "570.133.20-1", "none", True),
    # Unattended upgrade inside the branch: libraries newer than the module.
    ("550", "550.90.07", "550.127.05-1", "none", True),
    # Back to an older branch after an upgrade: refused, never a reboot into the same driver.
    ("550", "570.172.08", "570.172.08-1", "downgrade", False),
    ("550", "550.90.07", "570.172.08-1", "downgrade", True),
]


@pytest.mark.parametrize(("wanted", "module", "installed", "action", "reboot"), CASES)
def test_the_decision_table(h100, wanted, module, installed, action, reboot):
    state = driver_state(h100, wanted, module_version=module, installed_version=installed)
    assert (state["action"], state["reboot_pending"]) == (action, reboot)
    assert state["wanted_branch"] == wanted
    assert state["gpu_count"] == 8


def test_the_kernel_module_outranks_nvidia_smi(h100):
    # nvidia-smi (the facts) reports 550.90.07, but the module in the kernel is 535.
    state = driver_state(h100, "550", module_version="535.216.01\n")
    assert state["loaded_version"] == "535.216.01"
    assert state["action"] == "change"
    assert state["reason"] == "branch 535 is loaded (535.216.01), 550 is wanted"


def test_no_driver_loaded_means_install(fixtures_dir):
    # A fresh server: no nvidia-smi, the GPUs counted by lspci.
    facts = _facts(fixtures_dir, None, lspci="lspci_l40s_pcie5.txt")
    state = driver_state(facts, "550")
    assert state["action"] == "install"
    assert state["loaded_version"] is None
    assert state["reason"] == "no NVIDIA driver is loaded; branch 550 is wanted"


def test_installed_but_not_loaded_waits_for_the_reboot(fixtures_dir):
    facts = _facts(fixtures_dir, None, lspci="lspci_l40s_pcie5.txt")
    state = driver_state(facts, "550", installed_version="550.90.07-1")
    assert state["action"] == "none"
    assert state["reboot_pending"] is True
    assert "waits for a reboot" in state["reason"]


def test_reasons_name_both_branches(h100):
    state = driver_state(h100, "570")
    assert state["reason"] == "branch 550 is loaded (550.90.07), 570 is wanted"
    # The same words when the packages of the loaded branch are installed (the usual upgrade).
    state = driver_state(h100, "570", module_version="550.90.07", installed_version="550.90.07-1")
    assert state["reason"] == "branch 550 is loaded (550.90.07), 570 is wanted"
    state = driver_state(h100, "570", module_version="550.90.07", installed_version="535.216.01-1")
    assert state["reason"] == "branch 535 is installed, 570 is wanted"
    assert driver_state(h100, "550")["reason"] == "branch 550 is loaded (550.90.07)"


@pytest.mark.parametrize(("lspci", "nvswitch_devices", "expected"), [
    ("lspci_h100x8_nvswitch.txt", None, True),     # NVSwitch bridges on the PCI bus
    ("lspci_rtx4090x2.txt", None, False),
    ("lspci_l40s_pcie5.txt", None, False),
    ("lspci_l40s_pcie5.txt", ["0000:05:00.0"], True),  # the nvswitch driver lists them
])
def test_nvswitches_are_detected_from_the_hardware(fixtures_dir, lspci, nvswitch_devices, expected):
    facts = _facts(fixtures_dir, None, lspci=lspci, nvswitch_devices=nvswitch_devices)
    assert driver_state(facts, "550")["nvswitch"] is expected


def test_an_hgx_with_driver_loaded_still_shows_its_nvswitches(fixtures_dir):
    facts = _facts(fixtures_dir, "h100x8_query.csv", lspci="lspci_h100x8_nvswitch.txt")
    state = driver_state(facts, "550")
    assert (state["action"], state["nvswitch"]) == ("none", True)


def test_a_host_without_gpus_is_refused():
    facts = build_facts(None, lspci_text="", smi_problem="nvidia-smi not found")
    with pytest.raises(ValueError, match="take the host out of the gpu_nodes group"):
        driver_state(facts, "550")


@pytest.mark.parametrize("branch", ["latest", "55", "550.90", "", None])
def test_a_branch_must_be_a_branch(h100, branch):
    with pytest.raises(ValueError, match='nvidia_driver_branch is .*such as "550"'):
        driver_state(h100, branch)


def test_the_filter_turns_errors_into_filter_errors(h100):
    from ansible.errors import AnsibleFilterError

    state_filter = FilterModule().filters()["nvidia_driver_state"]
    assert state_filter(h100, "550")["action"] == "none"
    with pytest.raises(AnsibleFilterError, match="nvidia_driver_branch"):
        state_filter(h100, "next")


def _efivar(value: int, attributes: bytes = b"\x06\x00\x00\x00") -> str:
    return base64.b64encode(attributes + bytes([value])).decode()


MISSING_MOKUTIL = {"failed": True, "rc": 2, "msg": "[Errno 2] No such file or directory: b'mokutil'",
                   "stdout": "", "stderr": ""}


@pytest.mark.parametrize(("mokutil", "efi", "efivar", "state"), [
    ({"rc": 0, "stdout": "SecureBoot enabled\n", "stderr": ""}, True, None, "enabled"),
    ({"rc": 0, "stdout": "SecureBoot disabled\n", "stderr": ""}, True, None, "disabled"),
    ({"rc": 0, "stdout": "SecureBoot disabled\nPlatform is in Setup Mode\n", "stderr": ""}, True, None, "disabled"),
    ({"rc": 255, "stdout": "", "stderr": "EFI variables are not supported on this system\n"}, True, None, "not-uefi"),
    (MISSING_MOKUTIL, False, None, "not-uefi"),       # legacy BIOS: no Secure Boot possible
    (MISSING_MOKUTIL, True, _efivar(1), "enabled"),  # UEFI without mokutil: the variable decides
    (MISSING_MOKUTIL, True, _efivar(0, b"\x16\x00\x00\x00"), "disabled"),
    (MISSING_MOKUTIL, True, None, "unknown"),
    (MISSING_MOKUTIL, True, "not base64!", "unknown"),
    (MISSING_MOKUTIL, True, base64.b64encode(b"\x06").decode(), "unknown"),
])
def test_secure_boot_state(mokutil, efi, efivar, state):
    assert secure_boot_state(mokutil, efi, efivar) == state
