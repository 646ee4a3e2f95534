"""GPU facts of a host: declared and gathered forms, and where they disagree."""

from __future__ import annotations

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet import (
    FactsError,
    capability_from_name,
    facts_mismatches,
    from_declared,
    from_gathered,
    host_gpus,
)

from planner_cases import H100X8, gathered


def test_declared_nvlink_is_one_group_of_all_gpus_and_pcie_none():
    nvlink = from_declared("gpu1", H100X8)
    assert nvlink.count == 8 and nvlink.nvlink_groups == (tuple(range(8)),)
    assert nvlink.gpus[0].numa_node is None  # unknown for declared facts
    assert nvlink.min_compute_capability() == (9, 0)
    pcie = from_declared("gpu1", {**H100X8, "interconnect": "pcie"})
    assert pcie.nvlink_groups == ()


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"count": 8}, "lacks name, memory_mib; declare for example"),
        ({**H100X8, "count": 0}, "count must be between 1 and 64"),
        ({**H100X8, "count": "eight"}, "count must be an integer, got 'eight'"),
        ({**H100X8, "memory_mib": 80}, "memory_mib must be the memory of one GPU in MiB"),
        ({**H100X8, "interconnect": "infiniband"}, "interconnect must be nvlink or pcie, got 'infiniband'"),
        ("8xH100", "must be a mapping"),
    ],
)
def test_bad_declarations_name_the_field(declared, message):
    with pytest.raises(FactsError, match=message):
        from_declared("gpu1", declared)


def test_gathered_facts_keep_groups_numa_and_capability():
    host = from_gathered("gpu1", gathered(8, nvlink_groups=[[0, 1, 2, 3], [4, 5, 6, 7]], numa=[0, 0, 0, 0, 1, 1, 1, 1]))
    assert host.nvlink_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert [g.numa_node for g in host.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert host.nvlink_group_of(5) == 1
    assert host.source == "gathered"


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        (gathered(8, source="lspci"), "GPU facts come from lspci"),
        (gathered(0, source="none"), "no NVIDIA GPU was found"),
        ({**gathered(2), "gpus": []}, "gpus is empty although source is nvidia-smi"),
        ({**gathered(2), "nvlink_groups": [[0, 5]]}, r"names GPUs \(0, 5\) that are not in gpus \[0, 1\]"),
        ({**gathered(2), "gpus": [gathered(2)["gpus"][0]] * 2}, "lists GPU indices more than once"),
    ],
)
def test_unusable_gathered_facts(facts, message):
    with pytest.raises(FactsError, match=message):
        from_gathered("gpu1", facts)


def test_mismatches_are_each_named():
    facts = from_gathered("gpu1", gathered(4, name="NVIDIA A100-SXM4-80GB", memory_mib=81920, nvlink_groups=[[0, 1], [2, 3]]))
    problems = facts_mismatches("gpu1", H100X8, facts)
    assert problems == [
        "gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs",
        "gpu1: aphrodite_gpus_declared.name is 'NVIDIA H100 80GB HBM3', but the host has NVIDIA A100-SXM4-80GB",
        "gpu1: aphrodite_gpus_declared.memory_mib is 81559, but the GPUs have 81920 MiB",
        "gpu1: aphrodite_gpus_declared.interconnect is nvlink, but the NVLink groups found are [0, 1], [2, 3]",
    ]


def test_matching_facts_have_no_mismatch():
    assert facts_mismatches("gpu1", H100X8, from_gathered("gpu1", gathered(8))) == []


def test_host_without_any_facts_says_what_to_declare():
    with pytest.raises(FactsError, match="declare aphrodite_gpus_declared in host_vars/gpu9.yml"):
        host_gpus("gpu9")


@pytest.mark.parametrize(
    ("name", "capability"),
    [("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3090", (8, 6)),
     ("NVIDIA GeForce RTX 4090", (8, 9)), ("Tesla T4", (7, 5)), ("Mystery GPU", None)],
)
def test_capability_from_product_name(name, capability):
    assert capability_from_name(name) == capability
