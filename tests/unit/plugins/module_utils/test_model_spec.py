"""Model spec: config.json fields, weight bytes, KV bytes per token, the engine's TP rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._model_spec import (
    GIB,
    ModelSpecError,
    Quantization,
    apply_quantization_override,
    estimate_parameters,
    kv_bytes_per_token,
    load_model_spec,
    parse_config,
    tensor_parallel_error,
    valid_tensor_parallel_sizes,
    weight_bytes,
    weight_bytes_per_gpu,
)

MODELS = Path(__file__).resolve().parents[3] / "data" / "models"


def spec_of(directory: str, model_id: str | None = None, quantization: str | None = None):
    return load_model_spec(str(MODELS / directory / "config.json"), model_id or directory, quantization)


def engine_kv_bytes_per_token(config: dict, tp: int = 1, pp: int = 1, b_kv: int = 2) -> int:
    """engine.md's formula, written out independently of the planner."""
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    layers = -(-text["num_hidden_layers"] // pp)
    return 2 * layers * max(1, kv_heads // tp) * head_dim * b_kv


# --------------------------------------------------------------------------- shapes of the public configs


@pytest.mark.parametrize(
    ("directory", "layers", "heads", "kv_heads", "head_dim", "intermediate", "experts", "max_pos", "quant"),
    [
        ("llama-3.1-8b-instruct", 32, 32, 8, 128, 14336, 0, 131072, None),
        ("llama-3.1-70b-instruct", 80, 64, 8, 128, 28672, 0, 131072, None),
        ("llama-3.1-70b-instruct-awq-int4", 80, 64, 8, 128, 28672, 0, 131072, ("awq", 4, 128, True)),
        ("llama-3.1-405b-instruct", 126, 128, 8, 128, 53248, 0, 131072, None),
        ("llama-3.1-405b-instruct-fp8", 126, 128, 8, 128, 53248, 0, 131072, ("fbgemm_fp8", 8, -1, False)),
        ("qwen2.5-7b-instruct", 28, 28, 4, 128, 18944, 0, 32768, None),
        ("mixtral-8x7b-instruct-v0.1", 32, 32, 8, 128, 14336, 8, 32768, None),
    ],
)
def test_public_configs_parse(directory, layers, heads, kv_heads, head_dim, intermediate, experts, max_pos, quant):
    spec = spec_of(directory)
    assert (spec.num_layers, spec.num_attention_heads, spec.num_kv_heads, spec.head_dim) == (layers, heads, kv_heads, head_dim)
    assert (spec.intermediate_size, spec.num_experts, spec.max_position_embeddings) == (intermediate, experts, max_pos)
    if quant is None:
        assert spec.quantization is None
    else:
        q = spec.quantization
        assert (q.method, q.bits, q.group_size, q.zero_point) == quant


# --------------------------------------------------------------------------- memory vs the engine's formula


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("llama-3.1-8b-instruct", 131072),  # engine.md: Llama-3.1-8B 131,072 B/token
        ("llama-3.1-70b-instruct", 327680),  # engine.md: Llama-3.1-70B 327,680 B/token
        ("llama-3.1-405b-instruct", 516096),
        ("qwen2.5-7b-instruct", 57344),
        ("mixtral-8x7b-instruct-v0.1", 131072),
    ],
)
def test_kv_bytes_per_token_matches_engine_formula_within_5_percent(directory, expected):
    spec = spec_of(directory)
    config = json.loads((MODELS / directory / "config.json").read_text())
    ours = kv_bytes_per_token(spec)
    assert abs(ours - expected) <= 0.05 * expected
    assert abs(ours - engine_kv_bytes_per_token(config)) <= 0.05 * expected


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (8, 2), (4, 3)])
def test_kv_bytes_per_gpu_follow_tp_and_pp(tp, pp):
    spec = spec_of("llama-3.1-70b-instruct")
    config = json.loads((MODELS / "llama-3.1-70b-instruct" / "config.json").read_text())
    assert kv_bytes_per_token(spec, tp, pp) == engine_kv_bytes_per_token(config, tp, pp)


def test_fp8_kv_cache_halves_kv_bytes():
    spec = spec_of("llama-3.1-8b-instruct")
    assert kv_bytes_per_token(spec, kv_cache_dtype="fp8") == 65536


def test_unknown_kv_cache_dtype_is_named():
    with pytest.raises(ModelSpecError, match="kv_cache_dtype 'int3'"):
        kv_bytes_per_token(spec_of("llama-3.1-8b-instruct"), kv_cache_dtype="int3")


@pytest.mark.parametrize(
    ("directory", "params"),
    [
        ("llama-3.1-8b-instruct", 8_030_261_248),
        ("llama-3.1-70b-instruct", 70_553_706_496),
        ("llama-3.1-405b-instruct", 405_853_388_800),
    ],
)
def test_parameter_count_from_shapes(directory, params):
    assert estimate_parameters(spec_of(directory)) == params


@pytest.mark.parametrize(("directory", "total_size"), [("llama-3.1-8b-instruct", 16060522496), ("llama-3.1-70b-instruct", 141107412992)])
def test_weights_come_from_the_safetensors_index_and_the_estimate_agrees(directory, total_size):
    spec = spec_of(directory)
    assert spec.checkpoint_bytes == total_size
    assert weight_bytes(spec) == total_size
    estimated = weight_bytes(parse_config(json.loads((MODELS / directory / "config.json").read_text()), directory))
    assert abs(estimated - total_size) <= 0.01 * total_size


@pytest.mark.parametrize(
    ("directory", "gib"),
    [
        ("llama-3.1-405b-instruct", 756),  # issue 3: "Llama-3.1-405B in bf16 needs 756 GiB of weights"
        ("llama-3.1-70b-instruct-awq-int4", 37),  # 4-bit layers + 16-bit embeddings and head
        ("llama-3.1-405b-instruct-fp8", 382),
        ("mixtral-8x7b-instruct-v0.1", 87),
    ],
)
def test_weight_estimates(directory, gib):
    assert round(weight_bytes(spec_of(directory)) / GIB) == gib


def test_awq_bytes_per_weight_counts_scales_and_zero_points():
    assert Quantization("awq", 4, 128, True, True).bytes_per_weight() == pytest.approx(0.5 + 2.5 / 128)
    assert Quantization("gptq", 4, 128, False, True).bytes_per_weight() == pytest.approx(0.5 + 2 / 128)
    assert Quantization("fp8", 8, -1, False, False).bytes_per_weight() == 1.0


def test_weights_per_gpu_split_by_tp_and_by_pipeline_stage():
    spec = spec_of("llama-3.1-405b-instruct")
    whole = weight_bytes(spec)
    assert weight_bytes_per_gpu(spec, 8, 1) == pytest.approx(whole / 8, rel=1e-6)
    # 63 layers per stage, and the embedding or the head at each end.
    assert weight_bytes_per_gpu(spec, 8, 2) == pytest.approx(whole / 16, rel=1e-3)
    # 5 stages of 126 layers: the fullest holds ceil(126 / 5) = 26 layers.
    assert weight_bytes_per_gpu(spec, 8, 5) > whole / 40 * 26 / 25.2


def test_float32_checkpoints_load_in_16_bits():
    config = json.loads((MODELS / "llama-3.1-8b-instruct" / "config.json").read_text())
    config["torch_dtype"] = "float32"
    spec = parse_config(config, "x/fp32", checkpoint_bytes=2 * 16060522496)
    assert weight_bytes(spec) == 16060522496


# --------------------------------------------------------------------------- config.json fallbacks


BASE = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512, "intermediate_size": 1024, "vocab_size": 1000}


@pytest.mark.parametrize(
    ("extra", "kv_heads"),
    [
        ({}, 8),  # absent: as many KV heads as heads
        ({"num_key_value_heads": 2}, 2),
        ({"n_head_kv": 1}, 1),
        ({"num_kv_heads": 4}, 4),
        ({"multi_query_group_num": 2}, 2),
    ],
)
def test_kv_head_fallbacks(extra, kv_heads):
    assert parse_config({**BASE, **extra}, "m").num_kv_heads == kv_heads


def test_head_dim_defaults_to_hidden_over_heads_and_explicit_wins():
    assert parse_config(BASE, "m").head_dim == 64
    assert parse_config({**BASE, "head_dim": 128}, "m").head_dim == 128


def test_vision_language_models_read_text_config():
    config = {"architectures": ["LlavaForConditionalGeneration"], "text_config": dict(BASE, num_key_value_heads=2), "torch_dtype": "float16"}
    spec = parse_config(config, "llava")
    assert (spec.num_layers, spec.num_kv_heads, spec.dtype) == (4, 2, "float16")


def test_newer_dtype_field_is_read():
    assert parse_config({**BASE, "dtype": "float16"}, "m").dtype == "float16"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**BASE, "num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({k: v for k, v in BASE.items() if k != "num_attention_heads"}, "num_attention_heads must be a positive integer"),
        ({**BASE, "quantization_config": {"quant_method": "hqq"}}, "quantization method 'hqq'"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ModelSpecError, match=message):
        parse_config(config, "m")


def test_missing_config_file_says_where_to_put_it(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist; copy the model's config.json there"):
        load_model_spec(str(tmp_path / "nope" / "config.json"), "org/model")


def test_broken_index_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {"total_size": -3}}')
    with pytest.raises(ModelSpecError, match="total_size must be a positive integer"):
        load_model_spec(str(tmp_path / "config.json"), "m")


# --------------------------------------------------------------------------- quantization from the inventory


def test_fp8_on_a_16_bit_checkpoint_quantizes_at_load_time():
    spec = spec_of("llama-3.1-405b-instruct", quantization="fp8")
    assert spec.quantization.method == "fp8" and not spec.quantization.from_checkpoint
    assert round(weight_bytes(spec) / GIB) == 382


def test_matching_quantization_keeps_the_checkpoint():
    spec = spec_of("llama-3.1-70b-instruct-awq-int4")
    assert apply_quantization_override(spec, "awq") is spec
    assert apply_quantization_override(spec, "awq_marlin") is spec


def test_awq_on_a_16_bit_checkpoint_is_refused_with_the_way_out():
    with pytest.raises(ModelSpecError, match="needs a checkpoint already quantized with AWQ.*or quantization fp8"):
        spec_of("llama-3.1-70b-instruct", quantization="awq")


def test_other_format_than_the_checkpoint_is_refused():
    with pytest.raises(ModelSpecError, match="stored as AWQ 4-bit"):
        spec_of("llama-3.1-70b-instruct-awq-int4", quantization="gptq")


# --------------------------------------------------------------------------- tensor parallel rules


@pytest.mark.parametrize(
    ("directory", "model_id", "limit", "valid"),
    [
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", 8, [1, 2, 4, 8]),
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 8, [1, 2, 4]),
        ("mixtral-8x7b-instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1", 16, [1, 2, 4, 8, 16]),
        ("llama-3.1-70b-instruct-awq-int4", "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4", 16, [1, 2, 4, 8, 16]),
    ],
)
def test_valid_tensor_parallel_sizes(directory, model_id, limit, valid):
    assert valid_tensor_parallel_sizes(spec_of(directory, model_id), limit) == valid


@pytest.mark.parametrize(
    ("directory", "model_id", "tp", "message"),
    [
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 8,
         "tensor parallel size 8 does not divide the 28 attention heads of Qwen2.5-7B-Instruct; use 1, 2 or 4"),
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 7,
         "tensor parallel size 7 is not a multiple of the 4 KV heads of Qwen2.5-7B-Instruct; use 1, 2 or 4"),
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", 6,
         "tensor parallel size 6 does not divide the 32 attention heads of Llama-3.1-8B-Instruct; use 1, 2, 4 or 8"),
    ],
)
def test_tensor_parallel_errors_name_the_constraint_and_the_fix(directory, model_id, tp, message):
    assert tensor_parallel_error(spec_of(directory, model_id), tp, 8) == message


QWEN72_AWQ = {
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_size": 8192,
    "intermediate_size": 29568, "vocab_size": 152064, "torch_dtype": "float16",
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
}


def test_kv_heads_that_tp_does_not_divide():
    spec = parse_config({**BASE, "num_attention_heads": 12, "num_key_value_heads": 8, "hidden_size": 768, "intermediate_size": 3072}, "org/odd")
    assert tensor_parallel_error(spec, 3, 12) == "tensor parallel size 3 does not divide the 8 KV heads of odd; use 1, 2 or 4"


def test_marlin_shapes_reject_tp_for_qwen2_5_72b_awq_unless_padded():
    """Qwen2.5-72B's intermediate size 29568 split in 2 leaves 14784 down_proj rows per GPU,
    not a multiple of Marlin's 128; its AWQ release pads the size to 29696 for that reason."""
    spec = parse_config(QWEN72_AWQ, "Qwen/Qwen2.5-72B-Instruct-AWQ")
    assert tensor_parallel_error(spec, 2, 8) == (
        "tensor parallel size 2 leaves down_proj 14784 input rows per GPU, not a multiple of the Marlin tile "
        "of 128 of Qwen2.5-72B-Instruct-AWQ; use 1"
    )
    assert tensor_parallel_error(spec, 8, 8).startswith(
        "tensor parallel size 8 leaves gate_up_proj 7392 output columns per GPU, not a multiple of the Marlin tile of 64"
    )
    padded = parse_config({**QWEN72_AWQ, "intermediate_size": 29696}, "Qwen/Qwen2.5-72B-Instruct-AWQ")
    assert valid_tensor_parallel_sizes(padded, 8) == [1, 2, 4, 8]
    # Without Marlin kernels (pre-Ampere) only the plain divisibility rules apply.
    assert tensor_parallel_error(spec, 8, 8, marlin=False) is None
    # The same shapes unquantized are fine at TP 8.
    unquantized = parse_config({k: v for k, v in QWEN72_AWQ.items() if k != "quantization_config"}, "Qwen/Qwen2.5-72B-Instruct")
    assert tensor_parallel_error(unquantized, 8, 8) is None
