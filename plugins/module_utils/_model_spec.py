# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""What a model needs from a GPU: shapes, weight bytes, KV-cache bytes, TP rules.

Pure functions over a model's ``config.json`` (and ``model.safetensors.index.json``
when present), following the engine's own rules (see ``engine.md``): no Ansible
imports, so the filter plugin, the CLI and the tests share this one implementation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

GIB = 1024 ** 3

# Bytes per element of the unquantized dtypes. float32 checkpoints are served in 16 bits
# by the engine's default ``--dtype auto``, so they cost 2 bytes on the GPU too.
_DTYPE_BYTES = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float32": 2, "fp32": 2, "float": 2, "auto": 2,
}
_CHECKPOINT_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4}

# Quantization families the planner knows the memory cost of.
_FP8_METHODS = {"fp8", "fbgemm_fp8", "modelopt", "ptpc_fp8"}
_INT_WEIGHT_ONLY = {"awq", "awq_marlin", "gptq", "gptq_marlin", "marlin"}
_KNOWN_METHODS = _FP8_METHODS | _INT_WEIGHT_ONLY | {"compressed-tensors", "bitsandbytes", "int8"}

# Marlin kernel tile sizes (aphrodite/model_executor/layers/quantization/utils/marlin_utils.py
# of aphrodite-engine 0.24.1: GPTQ_MARLIN_MIN_THREAD_N / _K, MARLIN_SUPPORTED_GROUP_SIZES).
MARLIN_MIN_THREAD_N = 64
MARLIN_MIN_THREAD_K = 128
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)

_KV_DTYPE_BYTES = {"auto": None, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


class ModelSpecError(ValueError):
    """A model's configuration cannot be read or does not say what the planner needs."""


@dataclass(frozen=True)
class Quantization:
    """How the weights of a checkpoint are stored."""

    method: str  # as in quantization_config.quant_method, or given by the inventory
    bits: int  # bits per linear-layer weight
    group_size: int  # -1: one scale per output channel
    zero_point: bool
    from_checkpoint: bool  # False: the engine quantizes at load time (e.g. --quantization fp8)

    @property
    def uses_marlin(self) -> bool:
        """Whether the engine runs this format with Marlin kernels on Ampere and newer."""
        if self.method in _INT_WEIGHT_ONLY:
            return self.bits in (4, 8) and self.group_size in MARLIN_GROUP_SIZES
        if self.method == "compressed-tensors":
            return self.bits in (4, 8) and self.group_size in MARLIN_GROUP_SIZES and not self.is_float
        return False

    @property
    def is_float(self) -> bool:
        return self.method in _FP8_METHODS or self.method.startswith("fp8")

    @property
    def label(self) -> str:
        if self.is_float:
            return "FP8"
        if self.method in ("bitsandbytes",):
            return f"bitsandbytes {self.bits}-bit"
        return f"{self.method.split('_')[0].upper()} {self.bits}-bit"

    def bytes_per_weight(self) -> float:
        """Average bytes per linear-layer weight, scales and zero points included."""
        base = self.bits / 8.0
        if self.is_float or self.group_size <= 0:
            return base
        # One 16-bit scale (and a packed zero point) per group of weights.
        return base + (2.0 + (self.bits / 8.0 if self.zero_point else 0.0)) / self.group_size


@dataclass(frozen=True)
class ModelSpec:
    """The facts of one model that decide how the engine can run it."""

    model_id: str
    architectures: tuple
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int  # per expert for mixture-of-experts models
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str
    num_experts: int  # 0 for dense models
    quantization: Quantization | None
    checkpoint_bytes: int | None  # metadata.total_size of model.safetensors.index.json

    @property
    def short_name(self) -> str:
        """The last part of the model id, for messages: ``Llama-3.1-70B-Instruct``."""
        return self.model_id.rstrip("/").rsplit("/", maxsplit=1)[-1]

    @property
    def precision_label(self) -> str:
        if self.quantization is not None:
            return self.quantization.label
        return "bf16" if self.dtype in ("bfloat16", "bf16") else ("fp16" if self.dtype in ("float16", "fp16", "half") else self.dtype)


# --------------------------------------------------------------------------- reading


def _first(config: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return None


def _positive_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelSpecError(f"{where}: {field} must be a positive integer, got {value!r}")
    return value


def parse_quantization(qconfig: Mapping[str, Any] | None, where: str) -> Quantization | None:
    """Read ``quantization_config`` of a checkpoint; ``None`` when it has none."""
    if not qconfig:
        return None
    method = str(qconfig.get("quant_method") or "").lower()
    if not method:
        raise ModelSpecError(f"{where}: quantization_config has no quant_method")
    if method in _FP8_METHODS:
        return Quantization(method, 8, -1, False, True)
    if method in _INT_WEIGHT_ONLY:
        bits = int(qconfig.get("bits") or qconfig.get("w_bit") or 4)
        group = int(qconfig.get("group_size") or qconfig.get("q_group_size") or -1)
        zero = bool(qconfig.get("zero_point", method.startswith("awq")))
        return Quantization(method, bits, group, zero, True)
    if method == "compressed-tensors":
        bits, group, is_float = 16, -1, False
        for group_cfg in (qconfig.get("config_groups") or {}).values():
            weights = (group_cfg or {}).get("weights") or {}
            bits = int(weights.get("num_bits") or bits)
            group = int(weights.get("group_size") or -1)
            is_float = weights.get("type") == "float"
            break
        if is_float:
            return Quantization("fp8", bits, -1, False, True)
        return Quantization("compressed-tensors", bits, group, False, True)
    if method == "bitsandbytes":
        bits = 4 if qconfig.get("load_in_4bit") else 8
        return Quantization("bitsandbytes", bits, 64 if bits == 4 else -1, False, True)
    if method == "int8":
        return Quantization("int8", 8, -1, False, True)
    raise ModelSpecError(
        f"{where}: quantization method {method!r} is not one the planner can size; "
        f"known: {', '.join(sorted(_KNOWN_METHODS))}"
    )


def apply_quantization_override(spec: ModelSpec, method: str | None) -> ModelSpec:
    """Return ``spec`` with the inventory's ``quantization`` applied.

    A method matching the checkpoint's keeps the checkpoint's bits and groups. ``fp8`` on
    an unquantized checkpoint means the engine quantizes at load time. Asking for a
    weight-only integer format (AWQ, GPTQ) that the checkpoint is not stored in is an error:
    the engine cannot produce those weights itself.
    """
    if not method:
        return spec
    wanted = method.lower()
    current = spec.quantization
    family = wanted.split("_")[0]
    if current is not None:
        if current.method.split("_")[0] == family or (current.is_float and family == "fp8"):
            return spec
        raise ModelSpecError(
            f"{spec.model_id}: quantization {method} was asked for, but the checkpoint is stored as "
            f"{current.label} ({current.method}); drop quantization to use the checkpoint's format, "
            f"or point config at a {method.upper()} checkpoint"
        )
    if family == "fp8":
        return _replace_quant(spec, Quantization("fp8", 8, -1, False, False))
    raise ModelSpecError(
        f"{spec.model_id}: quantization {method} needs a checkpoint already quantized with {method.upper()}, "
        f"but its config.json has no quantization_config; use an {method.upper()} checkpoint "
        f"(for example a '-{method.upper()}' variant of {spec.short_name}) or quantization fp8, "
        f"which the engine applies at load time"
    )


def _replace_quant(spec: ModelSpec, quant: Quantization | None) -> ModelSpec:
    # The checkpoint's size no longer says what loads.
    return replace(spec, quantization=quant, checkpoint_bytes=None)


def parse_config(
    config: Mapping[str, Any],
    model_id: str,
    *,
    checkpoint_bytes: int | None = None,
    where: str | None = None,
) -> ModelSpec:
    """Build a :class:`ModelSpec` from the parsed ``config.json`` of ``model_id``."""
    where = where or f"config.json of {model_id}"
    if not isinstance(config, Mapping):
        raise ModelSpecError(f"{where}: expected a JSON object, got {type(config).__name__}")
    # Vision-language models keep the language model's shapes under text_config.
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
    merged: dict[str, Any] = dict(config)
    if text:
        merged.update({k: v for k, v in text.items() if v is not None})

    layers = _positive_int(_first(merged, "num_hidden_layers", "n_layer", "num_layers"), "num_hidden_layers", where)
    heads = _positive_int(_first(merged, "num_attention_heads", "n_head"), "num_attention_heads", where)
    kv_raw = _first(merged, "num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
    kv_heads = heads if kv_raw is None else _positive_int(kv_raw, "num_key_value_heads", where)
    hidden = _positive_int(_first(merged, "hidden_size", "n_embd", "d_model"), "hidden_size", where)
    head_dim_raw = merged.get("head_dim")
    if head_dim_raw is None:
        if hidden % heads:
            raise ModelSpecError(f"{where}: hidden_size {hidden} is not a multiple of {heads} heads and head_dim is missing")
        head_dim = hidden // heads
    else:
        head_dim = _positive_int(head_dim_raw, "head_dim", where)
    num_experts = int(_first(merged, "num_local_experts", "num_experts", "n_routed_experts") or 0)
    inter_raw = merged.get("moe_intermediate_size") if num_experts and merged.get("moe_intermediate_size") else None
    intermediate = _positive_int(
        inter_raw if inter_raw is not None else _first(merged, "intermediate_size", "ffn_hidden_size", "n_inner"),
        "intermediate_size", where,
    )
    vocab = _positive_int(merged.get("vocab_size"), "vocab_size", where)
    max_pos = _positive_int(
        _first(merged, "max_position_embeddings", "max_sequence_length", "seq_length", "n_positions") or 2048,
        "max_position_embeddings", where,
    )
    dtype = str(_first(config, "torch_dtype", "dtype") or _first(merged, "torch_dtype", "dtype") or "bfloat16").lower()
    if dtype.startswith("torch."):
        dtype = dtype[len("torch."):]
    quant = parse_quantization(config.get("quantization_config") or merged.get("quantization_config"), where)
    architectures = tuple(str(a) for a in (config.get("architectures") or ()))
    if checkpoint_bytes is not None and quant is None and dtype in _CHECKPOINT_DTYPE_BYTES:
        # A float32 checkpoint is loaded in 16 bits.
        checkpoint_bytes = checkpoint_bytes // 2
    return ModelSpec(
        model_id=model_id,
        architectures=architectures,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=bool(merged.get("tie_word_embeddings", False)),
        max_position_embeddings=max_pos,
        dtype=dtype,
        num_experts=num_experts,
        quantization=quant,
        checkpoint_bytes=checkpoint_bytes,
    )


def read_checkpoint_bytes(index_path: str) -> int | None:
    """``metadata.total_size`` of a ``model.safetensors.index.json``; ``None`` if absent."""
    if not os.path.isfile(index_path):
        return None
    try:
        with open(index_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"{index_path}: cannot read the safetensors index: {exc}")
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data, dict) else None
    if total is None:
        return None
    if isinstance(total, str) and total.isdigit():
        total = int(total)
    if not isinstance(total, int) or total <= 0:
        raise ModelSpecError(f"{index_path}: metadata.total_size must be a positive integer, got {total!r}")
    return total


def load_model_spec(config_path: str, model_id: str, quantization: str | None = None) -> ModelSpec:
    """Read ``config.json`` (and the safetensors index beside it) for ``model_id``."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ModelSpecError(f"{model_id}: config file {config_path} does not exist; copy the model's config.json there")
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"{model_id}: cannot read {config_path}: {exc}")
    index = os.path.join(os.path.dirname(config_path), "model.safetensors.index.json")
    spec = parse_config(config, model_id, checkpoint_bytes=read_checkpoint_bytes(index), where=config_path)
    return apply_quantization_override(spec, quantization)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class WeightBreakdown:
    """Bytes of the weights, split the way tensor and pipeline parallelism split them."""

    layers: int  # all decoder layers together
    embedding: int  # input embedding (vocab-parallel across TP)
    lm_head: int  # output projection (none when tied to the embedding) and the final norm

    @property
    def total(self) -> int:
        return self.layers + self.embedding + self.lm_head


def _param_counts(spec: ModelSpec) -> tuple[int, int, int]:
    """(linear weights per layer, other weights per layer, embedding weights)."""
    q = spec.hidden_size * spec.num_attention_heads * spec.head_dim
    kv = 2 * spec.hidden_size * spec.num_kv_heads * spec.head_dim
    o = spec.num_attention_heads * spec.head_dim * spec.hidden_size
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    if spec.num_experts:
        mlp *= spec.num_experts
    router = spec.hidden_size * spec.num_experts
    norms = 2 * spec.hidden_size
    return q + kv + o + mlp, router + norms, spec.vocab_size * spec.hidden_size


def estimate_parameters(spec: ModelSpec) -> int:
    """Parameter count from the shapes (Llama-3.1-8B: 8,030,261,248)."""
    linear, other, embed = _param_counts(spec)
    lm_head = 0 if spec.tie_word_embeddings else embed
    return spec.num_layers * (linear + other) + embed + lm_head + spec.hidden_size


def weight_breakdown(spec: ModelSpec) -> WeightBreakdown:
    """Bytes the weights take on the GPUs.

    The checkpoint's own size (``metadata.total_size``) is preferred; without it the size
    is the parameter count times the bytes per weight of the format. Embeddings and the
    output head stay 16-bit in quantized checkpoints.
    """
    linear, other, embed = _param_counts(spec)
    elem = _DTYPE_BYTES.get(spec.dtype, 2)
    per_linear = spec.quantization.bytes_per_weight() if spec.quantization else float(elem)
    layer_bytes = int(spec.num_layers * (linear * per_linear + other * elem))
    embed_bytes = embed * elem
    # The output head sits on the last pipeline stage with the final norm.
    head_bytes = (0 if spec.tie_word_embeddings else embed * elem) + spec.hidden_size * elem
    if spec.checkpoint_bytes:
        # Keep the checkpoint's total; attribute the difference to the layers.
        layer_bytes = max(0, spec.checkpoint_bytes - embed_bytes - head_bytes)
    return WeightBreakdown(layer_bytes, embed_bytes, head_bytes)


def weight_bytes(spec: ModelSpec) -> int:
    return weight_breakdown(spec).total


def weight_bytes_per_gpu(spec: ModelSpec, tp: int, pp: int) -> int:
    """Weights held by the fullest GPU of a replica.

    Pipeline stages get ``ceil(layers / pp)`` layers at most; the first stage also holds
    the embedding and the last the output head (both split across TP ranks).
    """
    parts = weight_breakdown(spec)
    layers_on_stage = -(-spec.num_layers // pp)
    stage_layers = parts.layers * layers_on_stage // spec.num_layers
    ends = parts.embedding + parts.lm_head if pp == 1 else max(parts.embedding, parts.lm_head)
    return -(-(stage_layers + ends) // tp)


def kv_bytes_per_token(spec: ModelSpec, tp: int = 1, pp: int = 1, kv_cache_dtype: str = "auto") -> int:
    """KV-cache bytes one token takes on one GPU (whole model with tp = pp = 1).

    ``2 × ceil(layers / pp) × max(1, kv_heads // tp) × head_dim × B_kv``:
    Llama-3.1-8B 131,072 B; Llama-3.1-70B 327,680 B.
    """
    if kv_cache_dtype not in _KV_DTYPE_BYTES:
        raise ModelSpecError(
            f"kv_cache_dtype {kv_cache_dtype!r} is not one the planner knows; use one of {', '.join(sorted(_KV_DTYPE_BYTES))}"
        )
    b_kv = _KV_DTYPE_BYTES[kv_cache_dtype] or _DTYPE_BYTES.get(spec.dtype, 2)
    layers = -(-spec.num_layers // pp)
    return 2 * layers * max(1, spec.num_kv_heads // tp) * spec.head_dim * b_kv


# --------------------------------------------------------------------------- tensor parallel


def _join_or(values: list) -> str:
    words = [str(v) for v in values]
    if not words:
        return "none"
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def tensor_parallel_problem(spec: ModelSpec, tp: int, marlin: bool | None = None) -> str | None:
    """Why the engine would refuse ``tp`` for this model, or ``None`` when it accepts it.

    ``marlin`` says whether Marlin kernels run the quantized layers (Ampere or newer);
    ``None`` means it follows the checkpoint's format.
    """
    if tp < 1:
        return f"tensor parallel size must be at least 1, got {tp}"
    if spec.num_attention_heads % tp:
        return f"tensor parallel size {tp} does not divide the {spec.num_attention_heads} attention heads"
    kv = spec.num_kv_heads
    if tp >= kv and tp % kv:
        return f"tensor parallel size {tp} is not a multiple of the {kv} KV heads"
    if tp < kv and kv % tp:
        return f"tensor parallel size {tp} does not divide the {kv} KV heads"
    if spec.intermediate_size % tp:
        return f"tensor parallel size {tp} does not divide the intermediate size {spec.intermediate_size}"
    quant = spec.quantization
    use_marlin = quant is not None and quant.uses_marlin if marlin is None else (marlin and quant is not None and quant.uses_marlin)
    if use_marlin:
        return _marlin_problem(spec, tp)
    return None


def _marlin_problem(spec: ModelSpec, tp: int) -> str | None:
    """Shape checks of verify_marlin_supports_shape for every linear layer of a replica."""
    quant = spec.quantization
    group = quant.group_size if quant is not None else -1
    kv_per_rank = max(1, spec.num_kv_heads // tp)
    # (layer, output per partition, input per partition, full input)
    layers = [
        ("qkv_proj", (spec.num_attention_heads // tp + 2 * kv_per_rank) * spec.head_dim, spec.hidden_size, spec.hidden_size),
        ("o_proj", spec.hidden_size, spec.num_attention_heads * spec.head_dim // tp, spec.num_attention_heads * spec.head_dim),
        ("gate_up_proj", 2 * spec.intermediate_size // tp, spec.hidden_size, spec.hidden_size),
        ("down_proj", spec.hidden_size, spec.intermediate_size // tp, spec.intermediate_size),
    ]
    for name, out_part, in_part, in_full in layers:
        if out_part % MARLIN_MIN_THREAD_N:
            return (f"tensor parallel size {tp} leaves {name} {out_part} output columns per GPU, "
                    f"not a multiple of the Marlin tile of {MARLIN_MIN_THREAD_N}")
        if in_part % MARLIN_MIN_THREAD_K:
            return (f"tensor parallel size {tp} leaves {name} {in_part} input rows per GPU, "
                    f"not a multiple of the Marlin tile of {MARLIN_MIN_THREAD_K}")
        if 0 < group < in_full and in_part % group:
            return (f"tensor parallel size {tp} leaves {name} {in_part} input rows per GPU, "
                    f"not a multiple of the quantization group size {group}")
    return None


def valid_tensor_parallel_sizes(spec: ModelSpec, limit: int, marlin: bool | None = None) -> list[int]:
    """Every TP size from 1 to ``limit`` that the engine accepts for this model."""
    return [tp for tp in range(1, limit + 1) if tensor_parallel_problem(spec, tp, marlin) is None]


def tensor_parallel_error(spec: ModelSpec, tp: int, limit: int, marlin: bool | None = None) -> str | None:
    """A sentence naming the model, the constraint and the sizes that work, or ``None``.

    ``tensor parallel size 8 does not divide the 28 attention heads of Qwen2.5-7B; use 1, 2, 4 or 7``
    """
    problem = tensor_parallel_problem(spec, tp, marlin)
    if problem is None:
        return None
    valid = valid_tensor_parallel_sizes(spec, max(limit, 1), marlin)
    return f"{problem} of {spec.short_name}; use {_join_or(valid)}"
