"""The capacity model: GPU figures, concurrency, the decode roofline, and published figures it must stay near."""

from __future__ import annotations

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._capacity import (
    MEMORY_EFFICIENCY,
    STEP_OVERHEAD_S,
    active_parameters,
    engine_default_max_num_seqs,
    estimate_decode,
    gpu_figures,
    sustained_concurrency,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._model_spec import load_model_spec, weight_bytes_per_gpu
from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import plan_inventory
from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import ModelRequest, PlanError, kv_cache_tokens

from planner_cases import A100X4, H100X8, MODEL_IDS, MODELS_DIR, RTX3090, RTX4090X2, declared, inventory, model

H100 = ("NVIDIA H100 80GB HBM3", 81559)
A100_40 = ("NVIDIA A100-SXM4-40GB", 40960)


def spec_of(directory, quantization=None):
    return load_model_spec(str(MODELS_DIR / directory / "config.json"), MODEL_IDS[directory], quantization)


def plan(hosts, *models, objective=None):
    hostvars, groups = inventory(hosts)
    return plan_inventory(list(models), hostvars, groups, objective=objective)


# --------------------------------------------------------------------------- GPU figures


@pytest.mark.parametrize(
    ("name", "memory_mib", "figures", "bandwidth_tb_s"),
    [
        ("NVIDIA H200", 143771, "H200 SXM", 4.8),
        ("NVIDIA H200 NVL", 143771, "H200 NVL", 4.8),
        ("NVIDIA H100 80GB HBM3", 81559, "H100 SXM", 3.35),
        ("NVIDIA H100 PCIe", 81559, "H100 PCIe", 2.0),
        ("NVIDIA H100 NVL", 95830, "H100 NVL", 3.9),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100 80GB SXM", 2.039),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100 40GB SXM", 1.555),
        ("NVIDIA A100 80GB PCIe", 81920, "A100 80GB PCIe", 1.935),
        ("NVIDIA A100-PCIE-40GB", 40960, "A100 40GB PCIe", 1.555),
        ("NVIDIA L40S", 46068, "L40S", 0.864),
        ("NVIDIA L4", 23034, "L4", 0.3),
        ("NVIDIA A10", 23028, "A10", 0.6),
        ("NVIDIA A10G", 23028, "A10", 0.6),
        ("NVIDIA GeForce RTX 4090", 24564, "RTX 4090", 1.008),
        ("NVIDIA GeForce RTX 3090", 24576, "RTX 3090", 0.936),
        ("Tesla T4", 15360, "T4", 0.32),
    ],
)
def test_gpu_figures_by_the_name_nvidia_smi_prints(name, memory_mib, figures, bandwidth_tb_s):
    found, note = gpu_figures(name, memory_mib)
    assert (found.name, note, found.known) == (figures, None, True)
    assert found.memory_bandwidth == pytest.approx(bandwidth_tb_s * 1e12)


def test_fp8_tensor_cores_only_where_the_gpu_has_them():
    assert gpu_figures(*H100)[0].fp8_flops == pytest.approx(1979e12)
    assert gpu_figures("NVIDIA L40S", 46068)[0].fp8_flops == pytest.approx(733e12)
    assert gpu_figures("NVIDIA A100-SXM4-80GB", 81920)[0].fp8_flops is None
    assert gpu_figures("NVIDIA GeForce RTX 3090", 24576)[0].fp8_flops is None


def test_an_unknown_gpu_falls_back_to_its_memory_size_and_says_so():
    figures, note = gpu_figures("NVIDIA B300 SXM6", 288 * 1024)
    assert not figures.known and figures.name == "NVIDIA B300 SXM6"
    assert figures.memory_bandwidth == pytest.approx(4.0e12)
    assert note.startswith("NVIDIA B300 SXM6 is not in the capacity model's GPU table")
    assert "typical of a GPU with 288 GiB" in note and "GPU_TABLE" in note
    small, _ = gpu_figures("Mystery Card", 12 * 1024)
    assert small.memory_bandwidth < figures.memory_bandwidth


def test_an_unknown_gpu_is_named_in_the_plan_notes():
    result = plan({"gpu1": declared(2, "NVIDIA X9000", 81920, "nvlink")}, model("llama-3.1-8b-instruct"))
    assert [n for n in result.notes if n.startswith("NVIDIA X9000 is not in the capacity model's GPU table")]


@pytest.mark.parametrize(
    ("name", "memory_mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, 1024),
        ("NVIDIA H200", 143771, 1024),
        ("NVIDIA B200", 183359, 1024),
        ("NVIDIA A100-SXM4-80GB", 81920, 256),  # A100s keep 256 whatever their memory
        ("NVIDIA L40S", 46068, 256),
        ("NVIDIA GeForce RTX 4090", 24564, 256),
    ],
)
def test_engine_default_max_num_seqs_follows_get_batch_defaults(name, memory_mib, expected):
    assert engine_default_max_num_seqs(name, memory_mib) == expected


# --------------------------------------------------------------------------- concurrency and the roofline


@pytest.mark.parametrize(
    ("kv_tokens", "max_num_seqs", "sequence", "expected"),
    [
        (36480, 1024, 2048, 17),  # 70B bf16 at TP 2 on H100 (the issue): 17 typical sequences
        (503584, 1024, 2048, 245),  # the same at TP 4
        (10**8, 256, 2048, 256),  # max_num_seqs caps it
        (100, 1024, 2048, 1),  # at least the one sequence the engine requires room for
    ],
)
def test_concurrency_is_the_smaller_of_max_num_seqs_and_kv_room(kv_tokens, max_num_seqs, sequence, expected):
    assert sustained_concurrency(kv_tokens, max_num_seqs, sequence) == expected


def test_one_sequence_is_bound_by_reading_the_weights():
    spec = spec_of("llama-3.1-8b-instruct")
    figures, _ = gpu_figures(*H100)
    single = estimate_decode(spec, figures, 1, 1, 1, 2048)
    read = weight_bytes_per_gpu(spec, 1, 1) / (3.35e12 * MEMORY_EFFICIENCY)
    assert single.weights_seconds == pytest.approx(read)
    assert single.bound == "memory" and single.allreduce_seconds == 0
    assert single.step_seconds == pytest.approx(read + single.kv_seconds + STEP_OVERHEAD_S)
    assert single.tokens_per_s == pytest.approx(1 / single.step_seconds)


def test_large_batches_become_compute_bound_and_fp8_halves_the_compute():
    figures, _ = gpu_figures(*H100)
    bf16 = estimate_decode(spec_of("llama-3.1-70b-instruct"), figures, 8, 1, 1024, 512)
    fp8 = estimate_decode(spec_of("llama-3.1-70b-instruct", "fp8"), figures, 8, 1, 1024, 512)
    assert bf16.bound == "compute"
    assert fp8.compute_seconds == pytest.approx(bf16.compute_seconds / 2, rel=0.01)


def test_tensor_parallel_all_reduce_costs_more_over_pcie_and_with_more_gpus():
    spec = spec_of("llama-3.1-8b-instruct")
    figures, _ = gpu_figures(*H100)
    nvlink2 = estimate_decode(spec, figures, 2, 1, 64, 2048, nvlink=True)
    pcie2 = estimate_decode(spec, figures, 2, 1, 64, 2048, nvlink=False)
    nvlink8 = estimate_decode(spec, figures, 8, 1, 64, 2048, nvlink=True)
    assert 0 < nvlink2.allreduce_seconds < pcie2.allreduce_seconds
    assert nvlink2.allreduce_seconds < nvlink8.allreduce_seconds


def test_pipeline_stages_add_hops_and_share_the_batch():
    spec = spec_of("llama-3.1-405b-instruct")
    figures, _ = gpu_figures(*H100)
    two = estimate_decode(spec, figures, 8, 2, 64, 2048)
    assert two.tokens_per_s_per_gpu == pytest.approx(two.tokens_per_s / 16)
    # Each stage holds half the layers and runs half the batch, so a token waits for both.
    assert two.step_seconds > 2 * max(two.weights_seconds, two.compute_seconds)


def test_mixture_of_experts_compute_counts_only_the_routed_experts():
    spec = spec_of("mixtral-8x7b-instruct-v0.1")
    assert 12e9 < active_parameters(spec) < 14e9  # Mixtral-8x7B: about 12.9B active of 46.7B
    assert active_parameters(spec_of("llama-3.1-8b-instruct")) == pytest.approx(8.03e9, rel=0.01)


# --------------------------------------------------------------------------- published figures

# Absolute figures: saturated decode throughput with a current engine of this family. The
# estimate must stay within FACTOR of each (it is a roofline for ranking layouts, not a
# benchmark). Columns: source, model, GPU, GPUs per replica (TP), replicas, typical
# sequence tokens of the workload, concurrency the source ran (None: as many as fit),
# gpu_memory_utilization, published output tokens/s of all replicas together.
FACTOR = 2.0
PUBLISHED = [
    # aimultiple.com, "LLM inference engines" benchmark (vLLM, 1,000 ShareGPT prompts offline,
    # bf16, 0.8 GPU memory utilisation): vLLM 12,553 output tokens/s on one H100 80GB.
    # https://research.aimultiple.com/inference-engines — ShareGPT requests hold a few
    # hundred tokens of prompt and of output: 512 typical tokens.
    ("aimultiple vLLM offline", "llama-3.1-8b-instruct", H100, 1, 1, 512, None, 0.8, 12553),
    # johnmusgrave.com, "vLLM throughput-latency sweep on NVIDIA A100" (vLLM 0.23, one A100
    # 40GB, 1,024 input + 128 output tokens): about 75 tokens/s at one request and a 6.6x gain
    # at 8 concurrent requests. https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on
    ("johnmusgrave sweep C=1", "llama-3.1-8b-instruct", A100_40, 1, 1, 1152, 1, 0.92, 75),
    ("johnmusgrave sweep C=8", "llama-3.1-8b-instruct", A100_40, 1, 1, 1152, 8, 0.92, 75 * 6.6),
    # The seed's deployment guide (/work/shared/seed/deployment-guide.md, "Hardware
    # Configurations"): ~1K tokens/s on 1x RTX 3090, ~5K on 2x RTX 4090, ~20K on 4x A100,
    # ~50K on 8x H100. Rounded figures reachable with a small model: Llama-3.1-8B at the
    # layout the planner picks (TP 2 on the two 24 GB 4090s, TP 1 elsewhere), 2,048 tokens.
    ("seed guide 1x RTX 3090", "llama-3.1-8b-instruct", ("NVIDIA GeForce RTX 3090", 24576), 1, 1, 2048, None, 0.92, 1000),
    ("seed guide 2x RTX 4090", "llama-3.1-8b-instruct", ("NVIDIA GeForce RTX 4090", 24564), 2, 1, 2048, None, 0.92, 5000),
    ("seed guide 4x A100", "llama-3.1-8b-instruct", ("NVIDIA A100-SXM4-80GB", 81920), 1, 4, 2048, None, 0.92, 20000),
    ("seed guide 8x H100", "llama-3.1-8b-instruct", H100, 1, 8, 2048, None, 0.92, 50000),
]


def replica_estimate(directory, gpu, tp, sequence, concurrency=None, utilization=0.92, quantization=None, max_model_len=8192):
    spec = spec_of(directory, quantization)
    name, memory = gpu
    figures, _ = gpu_figures(name, memory)
    request = ModelRequest(MODEL_IDS[directory], spec, (), max_model_len=max_model_len, gpu_memory_utilization=utilization)
    fits = sustained_concurrency(kv_cache_tokens(spec, memory, request, tp, 1), engine_default_max_num_seqs(name, memory), sequence)
    running = fits if concurrency is None else min(fits, concurrency)
    return estimate_decode(spec, figures, tp, 1, running, sequence, nvlink="RTX" not in name)


@pytest.mark.parametrize(("source", "directory", "gpu", "tp", "replicas", "sequence", "concurrency", "utilization", "published"),
                         PUBLISHED, ids=[row[0] for row in PUBLISHED])
def test_estimates_stay_within_a_factor_of_published_figures(source, directory, gpu, tp, replicas, sequence, concurrency,
                                                              utilization, published):
    estimated = replicas * replica_estimate(directory, gpu, tp, sequence, concurrency, utilization).tokens_per_s
    assert published / FACTOR <= estimated <= published * FACTOR, f"{source}: estimated {estimated:.0f} tok/s"


# Rankings where a source compares layouts of one model on one machine.
# Lambda Labs, "LLMs inference benchmarks, using vLLM, on Lambda Cloud" (vLLM 0.5.4, 320
# prompts at once, output tokens/s), https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md:
# Meta-Llama-3.1-70B-Instruct-FP8 on 2/4/8x H100 SXM (one replica): 1727.69 / 2242.99 / 2572.8;
# Meta-Llama-3.1-8B-FP8 on 1/2/4/8x H100: 3400.4 / 3688.64 / 3475.27 / 3931.83 ("data parallelism
# outperforms tensor parallelism when the model fits"). Its absolute figures include the
# burst's ramp and tail and v0.5.4's CPU overhead, so only the order is compared.
LAMBDA_70B_FP8 = {2: 1727.69, 4: 2242.99, 8: 2572.8}
LAMBDA_8B_FP8 = {1: 3400.4, 2: 3688.64, 4: 3475.27, 8: 3931.83}


def _order(values: dict) -> list:
    return sorted(values, key=values.get)


def test_ranking_of_70b_fp8_replicas_matches_lambda():
    per_replica = {tp: replica_estimate("llama-3.1-70b-instruct", H100, tp, 512, 320, quantization="fp8",
                                        max_model_len=2048).tokens_per_s for tp in LAMBDA_70B_FP8}
    assert _order(per_replica) == _order(LAMBDA_70B_FP8)
    per_gpu = {tp: value / tp for tp, value in per_replica.items()}
    assert _order(per_gpu) == _order({tp: value / tp for tp, value in LAMBDA_70B_FP8.items()})


def test_ranking_of_8b_per_gpu_matches_lambda():
    per_gpu = {tp: replica_estimate("llama-3.1-8b-instruct", H100, tp, 512, 320, quantization="fp8").tokens_per_s_per_gpu
               for tp in LAMBDA_8B_FP8}
    assert _order(per_gpu) == _order({tp: value / tp for tp, value in LAMBDA_8B_FP8.items()})


def test_two_tp4_replicas_beat_one_tp8_on_an_h100_node():
    """ISC High Performance 2026 poster, "scale-up vs scale-out" for Llama-3.3-70B-Instruct (the
    Llama-3.1-70B architecture) with vLLM on one 8x H100 NVSwitch node: two TP 4 replicas give
    18.1% more throughput than one TP 8 in BF16 (2,048-token prompts).
    https://app.swapcard.com/event/isc-high-performance-2026/planning/UGxhbm5pbmdfNDQwOTk3Ng==
    """
    tp4 = 2 * replica_estimate("llama-3.1-70b-instruct", H100, 4, 2048).tokens_per_s
    tp8 = replica_estimate("llama-3.1-70b-instruct", H100, 8, 2048).tokens_per_s
    assert tp4 > tp8
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", max_model_len=8192))
    layouts = {layout["tensor_parallel_size"]: layout for layout in result.to_dict()["deployments"][0]["layouts"]}
    assert layouts[4]["chosen"] and not layouts[8]["chosen"]
    assert layouts[4]["est_tokens_per_s_per_host"] > layouts[8]["est_tokens_per_s_per_host"]


# --------------------------------------------------------------------------- the planner's objectives


def test_70b_on_h100_is_planned_at_tp4_with_seven_times_the_kv_cache_of_tp2():
    """The issue's example: inventories/prod's 70B, bf16, 8,192 tokens, 0.92 on 8x H100."""
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", max_model_len=8192))
    replicas = result.deployments[0][1]
    assert [r.tensor_parallel_size for r in replicas] == [4, 4]
    assert replicas[0].kv_cache_tokens == 503584 and replicas[0].est_concurrency == 245
    deployment = result.to_dict()["deployments"][0]
    assert deployment["objective"] == "throughput"
    tp2 = next(layout for layout in deployment["layouts"] if layout["tensor_parallel_size"] == 2)
    assert (tp2["kv_cache_tokens"], tp2["est_concurrency"], tp2["replicas_per_host"], tp2["chosen"]) == (36480, 17, 4, False)
    assert deployment["replicas"][0]["est_decode_tokens_per_s"] > 5 * tp2["est_decode_tokens_per_s"]


@pytest.mark.parametrize(
    ("hosts", "directory", "tp"),
    [
        ({"gpu1": H100X8}, "llama-3.1-8b-instruct", 1),
        ({"gpu1": H100X8}, "qwen2.5-7b-instruct", 1),
        ({"gpu1": H100X8}, "llama-3.1-70b-instruct-awq-int4", 1),
        ({"gpu1": A100X4}, "llama-3.1-8b-instruct", 1),
        ({"gpu1": RTX3090}, "llama-3.1-8b-instruct", 1),
        ({"gpu1": RTX4090X2}, "llama-3.1-8b-instruct", 2),  # 24 GB cards: TP 1 holds only 20 sequences
    ],
)
def test_small_models_stay_at_small_tp(hosts, directory, tp):
    result = plan(hosts, model(directory))
    assert {r.tensor_parallel_size for r in result.deployments[0][1]} == {tp}


def test_an_explicit_tensor_parallel_size_wins_and_the_better_layout_is_still_shown():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", max_model_len=8192, tensor_parallel_size=2))
    assert [r.tensor_parallel_size for r in result.deployments[0][1]] == [2, 2, 2, 2]
    layouts = result.to_dict()["deployments"][0]["layouts"]
    assert [(layout["tensor_parallel_size"], layout["chosen"]) for layout in layouts] == [(2, True), (4, False), (8, False)]


def test_a_forced_tp_never_shrinks_to_meet_a_count():
    with pytest.raises(PlanError, match="needs 3 replicas of 4 free GPUs in one host, but only 2 could be placed"):
        plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", tensor_parallel_size=4, replicas=3))


def test_latency_keeps_min_concurrency_then_takes_the_fastest_token():
    result = plan({"gpu1": H100X8}, model("llama-3.1-70b-instruct", max_model_len=8192, objective="latency"))
    deployment = result.to_dict()["deployments"][0]
    assert deployment["objective"] == "latency"
    chosen = next(layout for layout in deployment["layouts"] if layout["chosen"])
    assert chosen["tensor_parallel_size"] == 8
    assert all(chosen["est_inter_token_ms_at_min_concurrency"] <= layout["est_inter_token_ms_at_min_concurrency"]
               for layout in deployment["layouts"])


def test_latency_with_a_concurrency_no_layout_reaches_takes_the_most_concurrent():
    # One 24 GB card: Qwen2.5-7B at TP 1 holds fewer than 64 sequences of 32k; TP 2 far more.
    result = plan({"gpu1": RTX4090X2}, model("qwen2.5-7b-instruct", objective="latency", min_concurrency=100000))
    layouts = result.to_dict()["deployments"][0]["layouts"]
    chosen = next(layout for layout in layouts if layout["chosen"])
    assert chosen["est_concurrency"] == max(layout["est_concurrency"] for layout in layouts)


def test_typical_sequence_tokens_and_max_num_seqs_set_the_concurrency():
    short = plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct", typical_sequence_tokens=512, replicas=1))
    replica = short.deployments[0][1][0]
    assert replica.est_concurrency == min(1024, replica.kv_cache_tokens // 512)
    hostvars, groups = inventory({"gpu1": H100X8})
    requests = plan_inventory([model("llama-3.1-8b-instruct", replicas=1)], hostvars, groups)
    assert requests.deployments[0][1][0].max_num_seqs == 1024


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"typical_sequence_tokens": 0}, "typical_sequence_tokens 0 of meta-llama/Llama-3.1-8B-Instruct must be at least 1"),
        ({"typical_sequence_tokens": "long"}, "typical_sequence_tokens of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models must be an integer"),
        ({"min_concurrency": 0}, "min_concurrency 0 of meta-llama/Llama-3.1-8B-Instruct must be at least 1"),
    ],
)
def test_capacity_keys_are_validated(options, message):
    with pytest.raises(PlanError, match=message):
        plan({"gpu1": H100X8}, model("llama-3.1-8b-instruct", **options))


def test_leftover_gpus_take_a_smaller_layout_of_the_same_model():
    # A fixed 8B replica on each host breaks one TP 4 block per host; the 70B fills the rest.
    result = plan({"gpu1": H100X8, "gpu2": H100X8}, model("llama-3.1-8b-instruct", replicas=2),
                  model("llama-3.1-70b-instruct", max_model_len=8192))
    big = result.deployments[1][1]
    assert sorted(r.tensor_parallel_size for r in big) == [2, 2, 4, 4]
    assert result.idle_gpus == {"gpu1": [1], "gpu2": [1]}
    assert any("2 more replicas with 2 GPUs each use GPUs its preferred layout left over" in n for n in result.notes)
