"""Planner golden tables for the deployment guide's hardware and models, and its rules one by one."""

from __future__ import annotations

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_flags import APHRODITE_FLAGS
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet import from_declared, from_gathered
from ansible_collections.aphrodite.baremetal.plugins.module_utils._model_spec import kv_bytes_per_token, load_model_spec
from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import plan_inventory
from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import (
    SECRET_FLAGS,
    PlanError,
    _find_block,
    node_argv,
    replica_slug,
)

from planner_cases import A100X4, H100X8, HARDWARE, MODEL_IDS, MODELS_DIR, RTX4090X2, gathered, inventory, model


def plan(hosts, *models, objective=None, **host_vars):
    hostvars, groups = inventory(hosts, **host_vars)
    return plan_inventory(list(models), hostvars, groups, objective=objective)


def replicas_of(result, index=0):
    return result.deployments[index][1]


# --------------------------------------------------------------------------- golden table

OK = "ok"
NO = "infeasible"

# (hardware, model, expected): ok -> (tp, pp, replicas, first placement, idle GPUs)
#                              infeasible -> phrases of the one-paragraph message
GOLDEN = [
    ("1xRTX3090", "llama-3.1-8b-instruct", (OK, 1, 1, 1, {"gpu1": [0]}, {"gpu1": []})),
    ("1xRTX3090", "qwen2.5-7b-instruct", (OK, 1, 1, 1, {"gpu1": [0]}, {"gpu1": []})),
    ("1xRTX3090", "llama-3.1-70b-instruct", (NO, ["Llama-3.1-70B-Instruct in bf16 needs 131 GiB of weights",
                                                  "1 host × 1 × 24.0 GiB × 0.92 = 22.1 GiB", "add 7 more nodes like gpu1"])),
    ("1xRTX3090", "llama-3.1-70b-instruct-awq-int4", (NO, ["in AWQ 4-bit needs 37.0 GiB of weights", "add 2 more nodes"])),
    ("1xRTX3090", "llama-3.1-405b-instruct-fp8", (NO, ["in FP8 needs 382 GiB of weights", "use GPUs with more memory"])),
    ("1xRTX3090", "llama-3.1-405b-instruct", (NO, ["in bf16 needs 756 GiB of weights", "use GPUs with more memory"])),
    ("1xRTX3090", "mixtral-8x7b-instruct-v0.1", (NO, ["needs 87.0 GiB of weights", "add 4 more nodes"])),
    # Five times the KV cache of TP 1 (24 GB cards) outweighs the all-reduce over PCIe.
    ("2xRTX4090", "llama-3.1-8b-instruct", (OK, 2, 1, 1, {"gpu1": [0, 1]}, {"gpu1": []})),
    ("2xRTX4090", "qwen2.5-7b-instruct", (OK, 2, 1, 1, {"gpu1": [0, 1]}, {"gpu1": []})),
    ("2xRTX4090", "llama-3.1-70b-instruct", (NO, ["needs 131 GiB of weights", "1 host × 2 × 24.0 GiB × 0.92 = 44.1 GiB"])),
    ("2xRTX4090", "llama-3.1-70b-instruct-awq-int4", (NO, [
        "needs 37.0 GiB of weights plus 10.0 GiB of KV cache for one 32768-token sequence (max_model_len)",
        "set max_model_len to 9216 or less"])),
    ("2xRTX4090", "llama-3.1-405b-instruct-fp8", (NO, ["needs 382 GiB of weights"])),
    ("2xRTX4090", "llama-3.1-405b-instruct", (NO, ["needs 756 GiB of weights"])),
    ("2xRTX4090", "mixtral-8x7b-instruct-v0.1", (NO, ["needs 87.0 GiB of weights", "use a 4-bit AWQ checkpoint (23.0 GiB of weights)"])),
    ("4xA100-80GB", "llama-3.1-8b-instruct", (OK, 1, 1, 4, {"gpu1": [0]}, {"gpu1": []})),
    ("4xA100-80GB", "qwen2.5-7b-instruct", (OK, 1, 1, 4, {"gpu1": [0]}, {"gpu1": []})),
    ("4xA100-80GB", "llama-3.1-70b-instruct", (OK, 4, 1, 1, {"gpu1": [0, 1, 2, 3]}, {"gpu1": []})),
    ("4xA100-80GB", "llama-3.1-70b-instruct-awq-int4", (OK, 1, 1, 4, {"gpu1": [0]}, {"gpu1": []})),
    ("4xA100-80GB", "llama-3.1-405b-instruct-fp8", (NO, ["needs 382 GiB of weights", "1 host × 4 × 80.0 GiB × 0.92 = 294 GiB",
                                                         "use a 4-bit AWQ checkpoint (202 GiB of weights), or add 1 more node"])),
    ("4xA100-80GB", "llama-3.1-405b-instruct", (NO, ["needs 756 GiB of weights", "add 2 more nodes like gpu1"])),
    ("4xA100-80GB", "mixtral-8x7b-instruct-v0.1", (OK, 2, 1, 2, {"gpu1": [0, 1]}, {"gpu1": []})),
    ("8xH100", "llama-3.1-8b-instruct", (OK, 1, 1, 8, {"gpu1": [0]}, {"gpu1": []})),
    ("8xH100", "qwen2.5-7b-instruct", (OK, 1, 1, 8, {"gpu1": [0]}, {"gpu1": []})),
    # TP 2 holds 4 sequences of 8k per replica; TP 4 hundreds (the capacity model, issue 20).
    ("8xH100", "llama-3.1-70b-instruct", (OK, 4, 1, 2, {"gpu1": [0, 1, 2, 3]}, {"gpu1": []})),
    ("8xH100", "llama-3.1-70b-instruct-awq-int4", (OK, 1, 1, 8, {"gpu1": [0]}, {"gpu1": []})),
    ("8xH100", "llama-3.1-405b-instruct-fp8", (OK, 8, 1, 1, {"gpu1": list(range(8))}, {"gpu1": []})),
    ("8xH100", "llama-3.1-405b-instruct", (NO, [
        "Llama-3.1-405B-Instruct in bf16 needs 756 GiB of weights; gpu_nodes offers 1 host × 8 × 79.6 GiB × 0.92 = 586 GiB",
        "use FP8 quantization (382 GiB of weights), or add 1 more node like gpu1 (8 × NVIDIA H100 80GB HBM3)"])),
    ("8xH100", "mixtral-8x7b-instruct-v0.1", (OK, 4, 1, 2, {"gpu1": [0, 1, 2, 3]}, {"gpu1": []})),
    ("2x8xH100", "llama-3.1-8b-instruct", (OK, 1, 1, 16, {"gpu1": [0]}, {"gpu1": [], "gpu2": []})),
    ("2x8xH100", "qwen2.5-7b-instruct", (OK, 1, 1, 16, {"gpu1": [0]}, {"gpu1": [], "gpu2": []})),
    ("2x8xH100", "llama-3.1-70b-instruct", (OK, 4, 1, 4, {"gpu1": [0, 1, 2, 3]}, {"gpu1": [], "gpu2": []})),
    ("2x8xH100", "llama-3.1-70b-instruct-awq-int4", (OK, 1, 1, 16, {"gpu1": [0]}, {"gpu1": [], "gpu2": []})),
    ("2x8xH100", "llama-3.1-405b-instruct-fp8", (OK, 8, 1, 2, {"gpu1": list(range(8))}, {"gpu1": [], "gpu2": []})),
    # Does not fit one node: pipeline parallel across the two identical nodes, gpu1 is rank 0.
    ("2x8xH100", "llama-3.1-405b-instruct", (OK, 8, 2, 1, {"gpu1": list(range(8)), "gpu2": list(range(8))},
                                             {"gpu1": [], "gpu2": []})),
    ("2x8xH100", "mixtral-8x7b-instruct-v0.1", (OK, 4, 1, 4, {"gpu1": [0, 1, 2, 3]}, {"gpu1": [], "gpu2": []})),
]


@pytest.mark.parametrize(("hardware", "directory", "expected"), GOLDEN, ids=[f"{h}-{m}" for h, m, _ in GOLDEN])
def test_golden_plans(hardware, directory, expected):
    if expected[0] == NO:
        with pytest.raises(PlanError) as caught:
            plan(HARDWARE[hardware], model(directory))
        message = str(caught.value)
        assert "\n" not in message  # one paragraph
        for phrase in expected[1]:
            assert phrase in message
        return
    _, tp, pp, count, first_placement, idle = expected
    result = plan(HARDWARE[hardware], model(directory))
    replicas = replicas_of(result)
    assert len(replicas) == count
    assert {(r.tensor_parallel_size, r.pipeline_parallel_size) for r in replicas} == {(tp, pp)}
    assert {h: list(g) for h, g in replicas[0].placement} == first_placement
    assert list(replicas[0].to_dict()["placement"]) == list(first_placement)  # node-rank order
    assert result.idle_gpus == idle
    spec = load_model_spec(str(MODELS_DIR / directory / "config.json"), MODEL_IDS[directory])
    for replica in replicas:
        assert replica.kv_cache_tokens >= min(spec.max_position_embeddings, 32768)
        assert replica.argv[:2] == ("--model", MODEL_IDS[directory])
        assert set(a for a in replica.argv if a.startswith("--")) <= APHRODITE_FLAGS
        assert not SECRET_FLAGS & set(replica.argv)


def test_the_issue_example_shape():
    """70B AWQ at TP 4 on an H100 node: 9.3 GiB of weights per GPU, port 2242, name llama-3-1-70b-0."""
    result = plan({"gpu1": H100X8}, {**model("llama-3.1-70b-instruct-awq-int4"), "id": "meta-llama/Llama-3.1-70B-Instruct",
                                     "tensor_parallel_size": 4})
    first = replicas_of(result)[0].to_dict()
    assert first["name"] == "llama-3-1-70b-0"
    assert (first["tensor_parallel_size"], first["pipeline_parallel_size"], first["head"]) == (4, 1, "gpu1")
    assert first["placement"] == {"gpu1": [0, 1, 2, 3]}
    assert first["port"] == 2242
    assert first["weights_gib_per_gpu"] == pytest.approx(9.26, abs=0.01)
    assert first["kv_cache_tokens"] > 400000
    assert first["argv"][:6] == ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--tensor-parallel-size", "4",
                                 "--pipeline-parallel-size", "1"]
    assert sorted(first) == sorted(["name", "tensor_parallel_size", "pipeline_parallel_size", "head", "placement", "port",
                                    "weights_gib_per_gpu", "kv_cache_tokens", "argv", "max_num_seqs", "est_concurrency",
                                    "est_decode_tokens_per_s"])
    assert first["max_num_seqs"] == 1024  # the engine's default on an 80 GB H100
    assert first["est_concurrency"] == min(1024, first["kv_cache_tokens"] // 2048)


# --------------------------------------------------------------------------- objective


@pytest.mark.parametrize(
    ("hosts", "directory", "tp", "count"),
    [
        ({"gpu1": H100X8}, "llama-3.1-8b-instruct", 8, 1),
        ({"gpu1": H100X8}, "llama-3.1-70b-instruct", 8, 1),
        ({"gpu1": H100X8}, "qwen2.5-7b-instruct", 4, 2),  # 28 heads: 4 is the largest valid TP
        ({"gpu1": RTX4090X2}, "llama-3.1-8b-instruct", 2, 1),
        ({"gpu1": A100X4}, "mixtral-8x7b-instruct-v0.1", 4, 1),
    ],
)
def test_latency_objective_uses_the_largest_valid_tp_in_the_nvlink_group(hosts, directory, tp, count):
    replicas = replicas_of(plan(hosts, model(directory, objective="latency")))
    assert [r.tensor_parallel_size for r in replicas] == [tp] * count


def test_latency_stays_inside_an_nvlink_group():
    hostvars, groups = inventory({"gpu1": H100X8})
    hostvars["gpu1"]["aphrodite_gpus"] = gathered(8, nvlink_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    result = plan_inventory([model("llama-3.1-8b-instruct")], hostvars, groups, objective="latency")
    assert [dict(r.placement) for r in replicas_of(result)] == [{"gpu1": (0, 1, 2, 3)}, {"gpu1": (4, 5, 6, 7)}]


def test_default_objective_can_be_set_for_all_models():
    result = plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct"), objective="latency")
    assert [r.tensor_parallel_size for r in replicas_of(result)] == [8]


# --------------------------------------------------------------------------- several models, replicas, ports


def test_models_without_a_count_share_the_gpus_in_turns():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct"), model("llama-3.1-8b-instruct"))
    big, small = replicas_of(result, 0), replicas_of(result, 1)
    # 70B takes a TP 4 block first; the 8B replicas fill the other half.
    assert [dict(r.placement)["gpu1"] for r in big] == [(0, 1, 2, 3)]
    assert [dict(r.placement)["gpu1"] for r in small] == [(4,), (5,), (6,), (7,)]
    assert result.idle_gpus == {"gpu1": []}


def test_replica_counts_are_honoured_and_the_rest_is_filled():
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-70b-instruct", replicas=1),
                  model("llama-3.1-8b-instruct", replicas=2), model("qwen2.5-7b-instruct"))
    assert [len(replicas_of(result, i)) for i in range(3)] == [1, 2, 10]  # the 70B replica is TP 4
    assert result.idle_gpus == {"gpu1": [], "gpu2": []}


def test_replicas_spread_across_hosts_so_one_host_down_keeps_the_model_up():
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-8b-instruct", replicas=2))
    assert [r.head for r in replicas_of(result, 0)] == ["gpu1", "gpu2"]
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-70b-instruct", replicas=3))
    assert sorted(r.head for r in replicas_of(result, 0)) == ["gpu1", "gpu1", "gpu2"]


def test_the_host_with_more_free_gpus_takes_the_next_replica_but_never_every_one():
    result = plan({"gpu1": H100X8, "gpu2": RTX4090X2}, model("llama-3.1-8b-instruct", replicas=4))
    # gpu1 starts with 8 free, gpu2 with 2: the second replica goes to gpu2 all the same, so
    # that losing gpu1 leaves the model up; then gpu1 keeps the lead.
    assert [r.head for r in replicas_of(result, 0)] == ["gpu1", "gpu2", "gpu1", "gpu1"]
    # Where no other host can take one, they all share the one that can.
    result = plan({"gpu1": H100X8, "gpu2": RTX4090X2}, model("llama-3.1-70b-instruct", replicas=2))
    assert [r.head for r in replicas_of(result, 0)] == ["gpu1", "gpu1"]


def test_a_model_that_finds_no_free_gpu_is_an_error_not_a_silent_omission():
    with pytest.raises(PlanError) as caught:
        plan({"gpu1": H100X8}, model("llama-3.1-405b-instruct-fp8"), model("llama-3.1-8b-instruct", hosts=["gpu1"]))
    message = str(caught.value)
    assert message.startswith("meta-llama/Llama-3.1-8B-Instruct needs 1 replica of 1 free GPU in one host, but none could be placed")
    assert "lower replicas" not in message


def test_idle_gpus_when_counts_leave_room():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", replicas=3))
    assert result.idle_gpus == {"gpu1": [6, 7]}
    # Three replicas fit only at TP 2 (TP 4 gives two): the count wins, and the plan says what it costs.
    assert [r.tensor_parallel_size for r in replicas_of(result)] == [2, 2, 2]
    assert any("3 replicas fit only with 2 GPUs each, not the 4 its objective prefers" in n for n in result.notes)
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", replicas=1))
    assert [r.tensor_parallel_size for r in replicas_of(result)] == [4]
    assert result.idle_gpus == {"gpu1": [4, 5, 6, 7]}


def test_too_many_replicas_names_the_numbers_and_the_fix():
    with pytest.raises(PlanError) as caught:
        plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", replicas=5))
    message = str(caught.value)
    assert "needs 5 replicas of 2 free GPUs in one host, but only 4 could be placed" in message
    assert "lower replicas of meta-llama/Llama-3.1-70B-Instruct to 4" in message


def test_a_later_model_with_no_room_says_which_models_took_the_gpus():
    with pytest.raises(PlanError, match=r"replicas placed: meta-llama/Llama-3.1-405B-Instruct-FP8: 1"):
        plan({"gpu1": H100X8}, model("llama-3.1-405b-instruct-fp8", replicas=1), model("llama-3.1-8b-instruct", replicas=1))


def test_ports_are_distinct_per_host_from_2242():
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-70b-instruct"))
    by_host: dict = {}
    for replica in replicas_of(result):
        by_host.setdefault(replica.head, []).append(replica.port)
    assert by_host == {"gpu1": [2242, 2243], "gpu2": [2242, 2243]}
    for replica in replicas_of(result):
        assert replica.argv[replica.argv.index("--port") + 1] == str(replica.port)


def test_replica_names_from_model_ids():
    assert replica_slug("meta-llama/Llama-3.1-70B-Instruct") == "llama-3-1-70b"
    assert replica_slug("hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4") == "llama-3-1-70b-awq-int4"
    assert replica_slug("Qwen/Qwen2.5-7B-Instruct") == "qwen2-5-7b"
    assert replica_slug("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mixtral-8x7b-v0-1"
    assert replica_slug("/models/7b") == "m-7b"


def test_clashing_replica_names_ask_for_a_name():
    with pytest.raises(PlanError, match="would both name their replicas llama-3-1-8b-N; give one of them a name"):
        plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct", replicas=1),
             model("llama-3.1-8b-instruct", replicas=1, max_model_len=4096))
    result = plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct", replicas=1),
                  model("llama-3.1-8b-instruct", replicas=1, max_model_len=4096, name="llama-short"))
    assert [r.name for r in replicas_of(result, 1)] == ["llama-short-0"]


# --------------------------------------------------------------------------- argv


def test_argv_carries_the_layout_and_never_a_secret():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", replicas=1, max_model_len=8192,
                                          gpu_memory_utilization=0.9, kv_cache_dtype="fp8",
                                          served_model_name="llama-70b"),
                  aphrodite_bind_address="10.1.0.5", aphrodite_api_key="sk-secret")
    argv = list(replicas_of(result)[0].argv)
    assert argv == [
        "--model", "meta-llama/Llama-3.1-70B-Instruct", "--served-model-name", "llama-70b",
        "--tensor-parallel-size", "4", "--pipeline-parallel-size", "1", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.9", "--kv-cache-dtype", "fp8", "--host", "10.1.0.5", "--port", "2242",
    ]
    assert "sk-secret" not in " ".join(argv)


def test_user_flags_follow_the_planned_ones_on_every_node():
    result = plan({"gpu1": H100X8, "gpu2": H100X8},
                  model("llama-3.1-405b-instruct", engine_args={"enable-prefix-caching": True, "max-num-seqs": 64}))
    head = list(replicas_of(result)[0].argv)
    assert head[-9:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29501",
                         "--enable-prefix-caching"]
    assert head.index("--max-num-seqs") < head.index("--port") < head.index("--enable-prefix-caching")
    worker = node_argv(head, 1)
    assert worker[worker.index("--node-rank") + 1] == "1" and worker[-2:] == ["--enable-prefix-caching", "--headless"]


@pytest.mark.parametrize(
    ("engine_args", "problem"),
    [
        (("--not-a-flag",), "--not-a-flag"),
        (("--api-key", "k"), "--api-key"),
        (("--port", "1"), "--port"),  # the planner renders --port already: a flag must appear once
    ],
)
def test_build_argv_refuses_what_input_checks_should_have_caught(engine_args, problem):
    from dataclasses import replace

    from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import model_request
    from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import build_argv
    from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet import from_declared

    req = replace(model_request(model("llama-3.1-8b-instruct"), {"gpu_nodes": ["gpu1"]}, None), engine_args=engine_args)
    with pytest.raises(AssertionError, match=problem):
        build_argv(req, 1, 1, 8192, 2242, from_declared("gpu1", H100X8, "10.0.0.1"))


def test_checkpoint_format_is_left_to_the_engine_and_load_time_fp8_is_passed():
    awq = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct-awq-int4", quantization="awq", replicas=1))
    assert "--quantization" not in replicas_of(awq)[0].argv  # the engine picks awq_marlin itself
    marlin = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct-awq-int4", quantization="awq_marlin", replicas=1))
    assert replicas_of(marlin)[0].argv[-4:-2] == ("--quantization", "awq_marlin")
    fp8 = plan({"gpu1": H100X8}, model("llama-3.1-405b-instruct", quantization="fp8"))
    replica = replicas_of(fp8)[0]
    assert (replica.tensor_parallel_size, replica.pipeline_parallel_size) == (8, 1)
    assert ("--quantization", "fp8") == tuple(replica.argv[replica.argv.index("--quantization"):][:2])


def test_multi_node_argv_and_node_ranks():
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-405b-instruct"))
    replica = replicas_of(result)[0]
    head = list(replica.argv)
    assert head[-8:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29501"]
    worker = node_argv(head, 1)
    assert worker[-9:] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29501",
                           "--headless"]
    assert node_argv(head, 0) == head
    with pytest.raises(PlanError, match="runs on a single node"):
        node_argv(["--model", "m"], 1)


# --------------------------------------------------------------------------- forced tensor parallel size


def test_forced_tp_is_used_as_given():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", tensor_parallel_size=4))
    assert [r.tensor_parallel_size for r in replicas_of(result)] == [4, 4]


@pytest.mark.parametrize(
    ("hosts", "directory", "tp", "message"),
    [
        ({"gpu1": H100X8}, "qwen2.5-7b-instruct", 8,
         "tensor parallel size 8 does not divide the 28 attention heads of Qwen2.5-7B-Instruct; use 1, 2 or 4"),
        ({"gpu1": A100X4}, "llama-3.1-8b-instruct", 8,
         "tensor_parallel_size 8 of meta-llama/Llama-3.1-8B-Instruct needs 8 GPUs in one host, but the hosts of gpu_nodes have at most 4; use 1, 2, 4"),
        ({"gpu1": H100X8}, "llama-3.1-70b-instruct", 1,
         "tensor_parallel_size 1 of meta-llama/Llama-3.1-70B-Instruct leaves 131 GiB of weights on each GPU"),
    ],
)
def test_forced_tp_is_validated_never_changed(hosts, directory, tp, message):
    with pytest.raises(PlanError) as caught:
        plan(hosts, model(directory, tensor_parallel_size=tp))
    assert message in str(caught.value)
    if tp == 1:
        assert str(caught.value).endswith("use tensor_parallel_size 2 or leave it out")


# --------------------------------------------------------------------------- facts and inventory input


def test_gathered_facts_win_and_mismatches_are_reported():
    hostvars, groups = inventory({"gpu1": H100X8})
    hostvars["gpu1"]["aphrodite_gpus"] = gathered(4)
    result = plan_inventory([model("llama-3.1-8b-instruct")], hostvars, groups)
    assert len(replicas_of(result)) == 4
    assert "gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs" in result.notes


def test_lspci_facts_cannot_be_planned_from():
    hostvars = {"gpu1": {"aphrodite_gpus": gathered(8, source="lspci")}}
    with pytest.raises(PlanError) as caught:
        plan_inventory([model("llama-3.1-8b-instruct")], hostvars, {"gpu_nodes": ["gpu1"]})
    message = str(caught.value)
    assert "GPU facts come from lspci" in message
    assert "declare aphrodite_gpus_declared for gpu1 or install the NVIDIA driver first" in message


def test_lspci_facts_fall_back_to_declared_with_a_note():
    hostvars, groups = inventory({"gpu1": H100X8})
    hostvars["gpu1"]["aphrodite_gpus"] = gathered(8, source="lspci")
    result = plan_inventory([model("llama-3.1-8b-instruct")], hostvars, groups)
    assert len(replicas_of(result)) == 8
    assert any("planning gpu1 from aphrodite_gpus_declared instead" in note for note in result.notes)


def test_mig_hosts_are_refused():
    hostvars = {"gpu1": {"aphrodite_gpus": gathered(8, mig=True)}}
    with pytest.raises(PlanError, match="MIG is enabled"):
        plan_inventory([model("llama-3.1-8b-instruct")], hostvars, {"gpu_nodes": ["gpu1"]})


def test_host_without_facts_is_named():
    with pytest.raises(PlanError, match="gpu2 has neither gathered GPU facts .* nor aphrodite_gpus_declared"):
        plan_inventory([model("llama-3.1-8b-instruct")], {"gpu1": {"aphrodite_gpus_declared": H100X8}, "gpu2": {}},
                       {"gpu_nodes": ["gpu1", "gpu2"]})


def test_multi_node_replicas_need_identical_nodes():
    with pytest.raises(PlanError) as caught:
        plan({"gpu1": H100X8, "gpu2": {**H100X8, "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920}},
             model("llama-3.1-405b-instruct"))
    assert "a replica spans only identical nodes" in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"config": "x"}, "every aphrodite_models entry needs an id"),
        ({"id": "m/x"}, "m/x needs config: the path of its config.json"),
        ({**model("llama-3.1-8b-instruct"), "tp": 2}, "unknown keys tp"),
        ({**model("llama-3.1-8b-instruct"), "hosts": "gpu_nodez"}, "names 'gpu_nodez', which is neither a group nor a host"),
        ({**model("llama-3.1-8b-instruct"), "max_model_len": 200000}, "max_model_len 200000 of meta-llama/Llama-3.1-8B-Instruct exceeds the 131072 positions"),
        ({**model("llama-3.1-8b-instruct"), "max_model_len": "long"}, "max_model_len of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models must be an integer"),
        ({**model("llama-3.1-8b-instruct"), "gpu_memory_utilization": 1.5}, "gpu_memory_utilization 1.5"),
        ({**model("llama-3.1-8b-instruct"), "objective": "cheap"}, "objective 'cheap'"),
        ({**model("llama-3.1-8b-instruct"), "replicas": 0},
         "replicas of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is 0; it must be a positive integer"),
        ({**model("llama-3.1-8b-instruct"), "max_model_len": -5},
         "max_model_len of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is -5; it must be a positive integer"),
        ({**model("llama-3.1-8b-instruct"), "max_model_len": 0}, "max_model_len of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is 0"),
        ({**model("llama-3.1-8b-instruct"), "tensor_parallel_size": 0}, "tensor_parallel_size of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is 0"),
        ({**model("llama-3.1-8b-instruct"), "tensor_parallel_size": -2}, "is -2; it must be a positive integer"),
        ({**model("llama-3.1-8b-instruct"), "replicas": "-1"}, "replicas of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is '-1'"),
        ({**model("llama-3.1-8b-instruct"), "replicas": True}, "replicas of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models must be an integer"),
        ({**model("llama-3.1-8b-instruct"), "max_model_len": 1.5}, "must be an integer, got 1.5"),
        ({**model("llama-3.1-8b-instruct"), "gpu_memory_utilization": True},
         "gpu_memory_utilization of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models must be a number"),
        ({**model("llama-3.1-8b-instruct"), "served_model_name": ["a", "b"]},
         "served_model_name of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models must be one name"),
        ({**model("llama-3.1-8b-instruct"), "engine_args": {"port": 1}}, "sets --port, which the plan owns"),
        ({"id": "m/x", "config": "models/x/config.json"}, "relative to the inventory directory, which was not given"),
    ],
)
def test_bad_model_entries_say_what_to_change(entry, message):
    with pytest.raises(PlanError) as caught:
        plan({"gpu1": H100X8}, entry)
    assert message in str(caught.value)


def test_hosts_as_a_list_and_relative_config_paths(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text((MODELS_DIR / "llama-3.1-8b-instruct" / "config.json").read_text())
    hostvars, groups = inventory({"gpu1": H100X8, "gpu2": H100X8})
    result = plan_inventory([{"id": "meta-llama/Llama-3.1-8B-Instruct", "config": "models/m/config.json", "hosts": ["gpu2"]}],
                            hostvars, groups, str(tmp_path))
    assert {r.head for r in replicas_of(result)} == {"gpu2"}
    assert result.idle_gpus == {"gpu2": [], "gpu1": list(range(8))}


def test_inline_config_mapping():
    import json

    config = json.loads((MODELS_DIR / "qwen2.5-7b-instruct" / "config.json").read_text())
    result = plan({"gpu1": A100X4}, {"id": "Qwen/Qwen2.5-7B-Instruct", "config": config})
    assert len(replicas_of(result)) == 4


def test_staging_keys_are_accepted_and_leave_the_plan_unchanged():
    # source and revision are read by the model_store role, not the planner.
    staged = {**model("llama-3.1-8b-instruct"), "revision": "0e9e39f249a16976918f6564b8830bc894c89659",
              "source": {"type": "local", "path": "models/llama-3.1-8b-instruct"}}
    assert plan({"gpu1": H100X8}, staged).to_dict() == plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct")).to_dict()


def test_plans_are_deterministic():
    first = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-70b-instruct"), model("llama-3.1-8b-instruct")).to_dict()
    second = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-70b-instruct"), model("llama-3.1-8b-instruct")).to_dict()
    assert first == second


# --------------------------------------------------------------------------- GPU blocks


def test_blocks_stay_inside_nvlink_groups():
    host = from_gathered("g", gathered(4, nvlink_groups=[[0, 1], [2, 3]]))
    assert _find_block(host, [True] * 4, 2) == (0, 1)
    assert _find_block(host, [False, True, True, False], 2) is None  # 1-2 would cross groups
    assert _find_block(host, [True] * 4, 4) == (0, 1, 2, 3)  # no group that large: PCIe between them


def test_blocks_prefer_one_numa_node_on_pcie():
    host = from_gathered("g", gathered(4, name="NVIDIA L40S", memory_mib=46068, nvlink_groups=[], numa=[0, 1, 1, 0]))
    assert _find_block(host, [True] * 4, 2) == (1, 2)


def test_blocks_prefer_alignment_to_limit_fragmentation():
    host = from_declared("g", H100X8)
    free = [False] + [True] * 7
    assert _find_block(host, free, 2) == (2, 3)
    assert _find_block(host, free, 4) == (4, 5, 6, 7)


def test_kv_capacity_reported_per_gpu_matches_the_budget():
    result = plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct", replicas=1))
    replica = replicas_of(result)[0]
    spec = load_model_spec(str(MODELS_DIR / "llama-3.1-8b-instruct" / "config.json"), "m")
    budget = 81559 * 2**20 * 0.92 - 2 * 2**30 - 16060522496
    assert replica.kv_cache_tokens == pytest.approx(budget / kv_bytes_per_token(spec), abs=16)


def test_inventory_without_gpu_nodes_says_where_hosts_go():
    with pytest.raises(PlanError, match="the inventory has no gpu_nodes group; put the GPU hosts in gpu_nodes or set hosts:"):
        plan_inventory([model("llama-3.1-8b-instruct")], {"gpu1": {"aphrodite_gpus_declared": H100X8}}, {"all": ["gpu1"]})
    with pytest.raises(PlanError, match="targets gpu_nodes, which has no hosts"):
        plan_inventory([model("llama-3.1-8b-instruct")], {}, {"all": [], "gpu_nodes": []})
