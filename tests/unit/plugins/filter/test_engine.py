"""engine_container_argv: the planner's argv adapted to a container, nothing else."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter.engine import engine_container_argv
from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_flags import APHRODITE_FLAGS

PLAN_ARGV = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "1", "--port", "2242"]


def test_model_path_served_name_and_host() -> None:
    argv = engine_container_argv(PLAN_ARGV, "/models/meta-llama/Llama-3.1-8B-Instruct",
                                 "meta-llama/Llama-3.1-8B-Instruct", "10.0.0.5")
    assert argv == ["--model", "/models/meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "1",
                    "--port", "2242", "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct", "--host", "10.0.0.5"]
    assert {a for a in argv if a.startswith("--")} <= APHRODITE_FLAGS
    assert PLAN_ARGV[1] == "meta-llama/Llama-3.1-8B-Instruct"  # the plan is not modified


def test_a_bound_host_and_served_name_in_the_plan_are_kept() -> None:
    argv = engine_container_argv(PLAN_ARGV + ["--host", "10.1.1.1", "--served-model-name", "llama"],
                                 "/models/x", "meta-llama/Llama-3.1-8B-Instruct", "10.0.0.5")
    assert argv.count("--host") == 1 and argv[argv.index("--host") + 1] == "10.1.1.1"
    assert argv[argv.index("--served-model-name") + 1] == "llama"


@pytest.mark.parametrize("argv, address, message", [
    (["--port", "2242"], "10.0.0.5", "expects the argv of a replica"),
    (["--model"], "10.0.0.5", "has no value"),
    (PLAN_ARGV, "", "set aphrodite_bind_address"),
])
def test_bad_input_says_what_to_fix(argv: list, address: str, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        engine_container_argv(argv, "/models/x", "x", address)
