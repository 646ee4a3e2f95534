# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Capacity model: how many sequences a layout serves at once and how fast it decodes.

The planner compares the layouts a model fits (tensor parallel size TP, pipeline parallel
size PP, replicas per host) with these estimates. They are a roofline, not a benchmark:
good for ranking layouts and for an order of magnitude, within about 2× of published
figures (``tests/unit/plugins/module_utils/test_capacity.py`` keeps the comparison).

Concurrency of one replica::

    S = min(typical_sequence_tokens, max_model_len)      # tokens a sequence holds
    concurrency C = max(1, min(max_num_seqs, kv_cache_tokens // S))

``max_num_seqs`` is the engine's (``engine_default_max_num_seqs``) unless the inventory
sets one. A sequence is counted at its typical length both for room and for reading: the
engine admits sequences until the cache is full, so a busy replica reads about all of the
cache it holds at every step.

One decode step (every running sequence advances one token). Per GPU of one pipeline stage,
with the batch split into ``PP`` micro-batches of ``b = C / PP`` sequences::

    t_weights = weight bytes per GPU / (memory bandwidth × MEMORY_EFFICIENCY)
    t_compute = 2 × active parameters / (TP × PP) × b / (dense FLOP/s × COMPUTE_EFFICIENCY)
    t_kv      = b × S × KV bytes per token per GPU / (memory bandwidth × MEMORY_EFFICIENCY)
    t_reduce  = 2 × layers / PP × (latency + 2 (TP − 1) / TP × b × hidden × 2 B / (link × LINK_EFFICIENCY))
    t_stage   = max(t_weights, t_compute) + t_kv + t_reduce

The matrix multiplications read the weights once per step and are bound by whichever of
memory and compute is slower; attention reads the KV cache and is memory-bound; tensor
parallelism all-reduces the activations twice per layer, over NVLink when the replica sits
inside an NVLink group, else over PCIe. Pipeline stages pass the micro-batch to the next
node (``t_hop``) and each micro-batch waits for every stage, which is the bubble::

    t_hop     = HOP_LATENCY + b × hidden × 2 B / NETWORK_BANDWIDTH        (PP > 1)
    step time = PP × t_stage + (PP − 1) × t_hop + STEP_OVERHEAD
    tokens/s per replica = C / step time;   per GPU = that / (TP × PP)

The step time is also the inter-token latency a client sees at that load. The GPU figures
come from :data:`GPU_TABLE` (vendor data sheets: dense tensor throughput without sparsity,
NVLink bandwidth per GPU and direction); a GPU missing from it falls back to figures guessed
from its memory size, and :func:`gpu_figures` says so. Pure Python: no Ansible imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._model_spec import ModelSpec, estimate_parameters, kv_bytes_per_token, weight_bytes_per_gpu

GB = 10**9
TB = 10**12
MIB = 1024**2
GIB = 1024**3

# Fractions of the data-sheet peaks that serving kernels reach (decode GEMMs and paged
# attention reach 75-85 % of HBM bandwidth; dense GEMMs about 60 % of tensor peak).
MEMORY_EFFICIENCY = 0.8
COMPUTE_EFFICIENCY = 0.6
LINK_EFFICIENCY = 0.7
ALLREDUCES_PER_LAYER = 2  # after attention and after the MLP (Megatron-style TP)
NVLINK_ALLREDUCE_LATENCY_S = 10e-6  # custom all-reduce / NCCL small-message latency
PCIE_ALLREDUCE_LATENCY_S = 30e-6
ACTIVATION_BYTES = 2  # bf16/fp16 activations
# Scheduler, sampler and launch work of one engine step that the GPU waits for.
STEP_OVERHEAD_S = 2e-3
# Pipeline parallelism crosses nodes: 100 GbE or faster between them.
NETWORK_BANDWIDTH = 12.5 * GB
HOP_LATENCY_S = 50e-6
# Experts a token of a mixture-of-experts model runs through (Mixtral, Qwen-MoE: 2).
MOE_ACTIVE_EXPERTS = 2

DEFAULT_TYPICAL_SEQUENCE_TOKENS = 2048
# The latency objective keeps at least this many sequences running per replica.
DEFAULT_MIN_CONCURRENCY = 16

# Engine batch defaults (aphrodite-engine 0.24.1 get_batch_defaults, engine.md).
LARGE_GPU_MAX_NUM_SEQS = 1024
SMALL_GPU_MAX_NUM_SEQS = 256
LARGE_GPU_GIB = 70


@dataclass(frozen=True)
class GpuFigures:
    """Data-sheet figures of one GPU model (bytes/s and FLOP/s)."""

    name: str
    memory_bandwidth: float
    nvlink_bandwidth: float | None  # per GPU and direction; None: no NVLink
    pcie_bandwidth: float  # per direction, x16 link
    fp16_flops: float  # dense tensor FP16/BF16
    fp8_flops: float | None  # dense tensor FP8; None: no FP8 tensor cores
    known: bool = True


def _gpu(name: str, memory_tb_s: float, nvlink_gb_s: float | None, pcie_gb_s: float, fp16_tflops: float,
         fp8_tflops: float | None) -> GpuFigures:
    return GpuFigures(name, memory_tb_s * TB, nvlink_gb_s * GB if nvlink_gb_s else None, pcie_gb_s * GB,
                      fp16_tflops * TB, fp8_tflops * TB if fp8_tflops else None)


# (words that must all appear in the lower-cased nvidia-smi name, least GiB of memory, figures),
# most specific first. nvidia-smi prints e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB".
GPU_TABLE = (
    (("h200", "nvl"), 0, _gpu("H200 NVL", 4.8, 450, 64, 835, 1671)),
    (("h200",), 0, _gpu("H200 SXM", 4.8, 450, 64, 989, 1979)),
    (("h100", "nvl"), 0, _gpu("H100 NVL", 3.9, 300, 64, 835, 1671)),
    (("h100", "pcie"), 0, _gpu("H100 PCIe", 2.0, 300, 64, 756, 1513)),
    (("h100",), 0, _gpu("H100 SXM", 3.35, 450, 64, 989, 1979)),
    (("a100", "pcie"), 70, _gpu("A100 80GB PCIe", 1.935, 300, 32, 312, None)),
    (("a100", "pcie"), 0, _gpu("A100 40GB PCIe", 1.555, 300, 32, 312, None)),
    (("a100",), 70, _gpu("A100 80GB SXM", 2.039, 300, 32, 312, None)),
    (("a100",), 0, _gpu("A100 40GB SXM", 1.555, 300, 32, 312, None)),
    (("l40s",), 0, _gpu("L40S", 0.864, None, 32, 362, 733)),
    (("l40",), 0, _gpu("L40", 0.864, None, 32, 181, 362)),
    (("l4",), 0, _gpu("L4", 0.3, None, 32, 121, 242)),
    (("a10",), 0, _gpu("A10", 0.6, None, 32, 125, None)),  # also A10G, somewhat slower
    (("a40",), 0, _gpu("A40", 0.696, 56, 32, 150, None)),
    (("rtx", "6000", "ada"), 0, _gpu("RTX 6000 Ada", 0.96, None, 32, 364, 728)),
    (("a6000",), 0, _gpu("RTX A6000", 0.768, 56, 32, 155, None)),
    (("4090",), 0, _gpu("RTX 4090", 1.008, None, 32, 165, 330)),
    (("3090",), 0, _gpu("RTX 3090", 0.936, 56, 32, 71, None)),
    (("v100",), 0, _gpu("V100", 0.9, 150, 16, 125, None)),
    (("t4",), 0, _gpu("T4", 0.32, None, 16, 65, None)),
)

# Unknown GPUs: figures of a typical card of that memory size (least GiB, figures).
_BY_MEMORY = (
    (120, _gpu("unknown, ≥ 120 GiB", 4.0, 450, 64, 800, None)),
    (70, _gpu("unknown, ≥ 70 GiB", 2.0, 300, 32, 312, None)),
    (40, _gpu("unknown, ≥ 40 GiB", 0.864, 56, 32, 180, None)),
    (20, _gpu("unknown, ≥ 20 GiB", 0.6, None, 32, 70, None)),
    (0, _gpu("unknown, < 20 GiB", 0.3, None, 16, 30, None)),
)


def gpu_figures(gpu_name: str, memory_mib: int) -> tuple:
    """``(GpuFigures, note)`` for a GPU as nvidia-smi names it; ``note`` is ``None`` when it is in the table."""
    words = gpu_name.lower().replace("-", " ").replace("_", " ")
    memory_gib = memory_mib * MIB / GIB
    for needles, least_gib, figures in GPU_TABLE:
        if all(n in words for n in needles) and memory_gib >= least_gib - 1:
            return figures, None
    for least_gib, figures in _BY_MEMORY:
        if memory_gib >= least_gib:
            guess = GpuFigures(gpu_name, figures.memory_bandwidth, figures.nvlink_bandwidth, figures.pcie_bandwidth,
                               figures.fp16_flops, figures.fp8_flops, known=False)
            note = (
                f"{gpu_name} is not in the capacity model's GPU table; its throughput estimates assume "
                f"{figures.memory_bandwidth / TB:g} TB/s of memory bandwidth and {figures.fp16_flops / TB:g} TFLOP/s, "
                f"typical of a GPU with {memory_gib:.0f} GiB (add it to GPU_TABLE in _capacity.py for better layouts)"
            )
            return guess, note
    raise AssertionError("unreachable: the last memory rule matches every size")


def engine_default_max_num_seqs(gpu_name: str, memory_mib: int) -> int:
    """``max_num_seqs`` the engine picks itself (0.24.1 ``get_batch_defaults``).

    GPUs with 70 GiB or more that are not A100s (H100, H200, B200) run up to 1024 sequences;
    every other GPU (A100, L40S, RTX) 256.
    """
    large = memory_mib * MIB >= LARGE_GPU_GIB * GIB and "a100" not in gpu_name.lower()
    return LARGE_GPU_MAX_NUM_SEQS if large else SMALL_GPU_MAX_NUM_SEQS


def active_parameters(spec: ModelSpec) -> int:
    """Parameters one token runs through: all of a dense model, the routed experts of a MoE model."""
    total = estimate_parameters(spec)
    if not spec.num_experts:
        return total
    experts = spec.num_layers * 3 * spec.hidden_size * spec.intermediate_size * spec.num_experts
    idle = experts * (spec.num_experts - min(spec.num_experts, MOE_ACTIVE_EXPERTS)) // spec.num_experts
    return total - idle


def sustained_concurrency(kv_tokens: int, max_num_seqs: int, sequence_tokens: int) -> int:
    """Sequences a replica runs at once: ``max(1, min(max_num_seqs, kv_tokens // sequence_tokens))``."""
    return max(1, min(max_num_seqs, kv_tokens // max(1, sequence_tokens)))


@dataclass(frozen=True)
class DecodeEstimate:
    """Roofline estimate of one replica's decode at ``concurrency`` running sequences."""

    concurrency: int
    step_seconds: float  # one decode step: the inter-token latency at this load
    tokens_per_s: float  # whole replica
    tokens_per_s_per_gpu: float
    weights_seconds: float  # per pipeline stage
    compute_seconds: float
    kv_seconds: float
    allreduce_seconds: float

    @property
    def bound(self) -> str:
        """What limits the matrix multiplications: ``memory`` or ``compute``."""
        return "compute" if self.compute_seconds > self.weights_seconds else "memory"


def estimate_decode(spec: ModelSpec, gpu: GpuFigures, tp: int, pp: int, concurrency: int, sequence_tokens: int,
                    kv_cache_dtype: str = "auto", nvlink: bool = True) -> DecodeEstimate:
    """Decode throughput of a ``tp`` × ``pp`` replica running ``concurrency`` sequences of ``sequence_tokens``.

    ``nvlink``: the replica's GPUs share an NVLink group (else all-reduces cross PCIe).
    The formulas are in the module docstring.
    """
    memory = gpu.memory_bandwidth * MEMORY_EFFICIENCY
    quant = spec.quantization
    fp8 = quant is not None and quant.is_float and quant.bits == 8 and gpu.fp8_flops is not None
    flops = (gpu.fp8_flops if fp8 else gpu.fp16_flops) * COMPUTE_EFFICIENCY
    micro = concurrency / pp
    weights_s = weight_bytes_per_gpu(spec, tp, pp) / memory
    compute_s = 2 * active_parameters(spec) / (tp * pp) * micro / flops
    kv_s = micro * sequence_tokens * kv_bytes_per_token(spec, tp, pp, kv_cache_dtype) / memory
    reduce_s = 0.0
    activations = micro * spec.hidden_size * ACTIVATION_BYTES
    if tp > 1:
        link_bw = gpu.nvlink_bandwidth if nvlink and gpu.nvlink_bandwidth else gpu.pcie_bandwidth
        latency = NVLINK_ALLREDUCE_LATENCY_S if nvlink and gpu.nvlink_bandwidth else PCIE_ALLREDUCE_LATENCY_S
        per_reduce = latency + 2 * (tp - 1) / tp * activations / (link_bw * LINK_EFFICIENCY)
        reduce_s = ALLREDUCES_PER_LAYER * -(-spec.num_layers // pp) * per_reduce
    stage_s = max(weights_s, compute_s) + kv_s + reduce_s
    hop_s = HOP_LATENCY_S + activations / NETWORK_BANDWIDTH if pp > 1 else 0.0
    step_s = pp * stage_s + (pp - 1) * hop_s + STEP_OVERHEAD_S
    tokens = concurrency / step_s
    return DecodeEstimate(concurrency, step_s, tokens, tokens / (tp * pp), weights_s, compute_s, kv_s, reduce_s)
