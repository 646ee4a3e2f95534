# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Fleet layout planner: which GPUs of which host each engine replica gets.

From the GPUs of the hosts (:mod:`._fleet`) and what each model needs (:mod:`._model_spec`)
it decides tensor and pipeline parallel sizes, replicas, placements, node ranks, ports,
weights per GPU, KV-cache capacity and the engine's arguments. The rules follow the
engine (``engine.md``):

- TP passes the engine's checks (heads, KV heads, intermediate size, Marlin shapes); it
  stays inside an NVLink group and, where known, inside one NUMA node; a replica's GPUs
  are contiguous.
- Pipeline parallelism spans nodes only when a model fits no single node, and only
  across identical nodes (node rank 0 is the head).
- A replica holds its weights plus one ``max_model_len`` sequence of KV cache within
  ``gpu_memory_utilization`` minus runtime overhead on every GPU.
- Among the layouts that fit (every valid TP on one host; TP × nodes when a model needs
  several), the capacity model (:mod:`._capacity`) estimates each one's concurrency and
  decode tokens/s. ``throughput`` (default) picks the most estimated tokens/s per host;
  ``latency`` the lowest inter-token latency among layouts that keep ``min_concurrency``
  sequences running. A larger layout must win by more than ``LAYOUT_MARGIN`` over a smaller
  one, since more, smaller replicas survive a GPU failure better and the estimate is rough.
  An explicit ``tensor_parallel_size`` is used as given; the plan still lists the layouts
  it was compared with.
- No GPU is used twice; idle GPUs are reported; ports are distinct per host from 2242.

Infeasible input raises :class:`PlanError` with one paragraph naming the constraint,
the numbers and the nearest feasible alternative. Pure Python: no Ansible imports.
"""

from __future__ import annotations

import heapq

import re
from dataclasses import dataclass, field, replace
from typing import Any

from ._engine_args import is_number, is_rendered_flag
from ._engine_flags import APHRODITE_FLAG_KINDS
from ._capacity import (
    DEFAULT_MIN_CONCURRENCY,
    DEFAULT_TYPICAL_SEQUENCE_TOKENS,
    DecodeEstimate,
    engine_default_max_num_seqs,
    estimate_decode,
    gpu_figures,
    sustained_concurrency,
)
from ._fleet import MIB, HostGpus
from ._model_spec import (
    GIB,
    ModelSpec,
    Quantization,
    kv_bytes_per_token,
    tensor_parallel_error,
    tensor_parallel_problem,
    valid_tensor_parallel_sizes,
    weight_bytes,
    weight_bytes_per_gpu,
)

DEFAULT_PORT = 2242
DEFAULT_MASTER_PORT = 29501
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# Default context when the inventory sets none: the model's own limit, capped here so that
# a 128k-context model does not demand 16+ GiB of KV cache per sequence by default.
DEFAULT_MAX_MODEL_LEN_CAP = 32768
# Activations, the sampler and NCCL buffers (engine.md: about 1-2 GiB), plus CUDA graphs.
RUNTIME_OVERHEAD_BYTES = int(1.5 * GIB)
CUDA_GRAPH_BYTES = int(0.5 * GIB)
KV_BLOCK_TOKENS = 16
OBJECTIVES = ("throughput", "latency")
# A layout with more GPUs per replica must beat a smaller one by this fraction to be chosen.
LAYOUT_MARGIN = 0.05
# Pipeline parallelism over more nodes than this is not suggested as a remedy.
MAX_SUGGESTED_NODES = 8
SECRET_FLAGS = frozenset(("--api-key", "--hf-token", "--ssl-keyfile"))

_SLUG_DROP = {"instruct", "chat", "hf"}


class PlanError(ValueError):
    """The requested fleet cannot be planned; the message says what to change."""


@dataclass(frozen=True)
class ModelRequest:
    """One entry of ``aphrodite_models``, resolved against the inventory."""

    model_id: str
    spec: ModelSpec
    hosts: tuple  # inventory hostnames the model may run on
    hosts_label: str = "gpu_nodes"  # group name (or host list) for messages
    max_model_len: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    tensor_parallel_size: int | None = None
    replicas: int | None = None  # None: as many as fit
    objective: str = "throughput"
    quantization_flag: str | None = None  # value of --quantization; None lets the engine detect it
    kv_cache_dtype: str = "auto"
    served_model_name: str | None = None
    name: str | None = None  # prefix of replica names; default from the model id
    enforce_eager: bool = False
    max_num_seqs: int | None = None  # --max-num-seqs; None: the engine's default for the GPU
    engine_args: tuple = ()  # the user's flags (engine_args), rendered and checked by _engine_args
    engine_files: tuple = ()  # _engine_args.EngineFile, ...: controller files those flags name
    typical_sequence_tokens: int = DEFAULT_TYPICAL_SEQUENCE_TOKENS  # prompt + output of a typical request
    min_concurrency: int = DEFAULT_MIN_CONCURRENCY  # latency objective: sequences a replica must still run


@dataclass(frozen=True)
class Replica:
    name: str
    model: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    placement: tuple  # ((host, (gpu, ...)), ...) in node-rank order
    port: int
    weights_gib_per_gpu: float
    kv_cache_tokens: int
    argv: tuple
    files: tuple = ()  # _engine_args.EngineFile, ... staged on every node of the replica
    max_num_seqs: int = 0  # effective --max-num-seqs (the inventory's or the engine's default)
    est_concurrency: int = 0  # sequences it runs at once (capacity model)
    est_decode_tokens_per_s: float = 0.0  # estimated decode tokens/s of the whole replica

    @property
    def head(self) -> str:
        return self.placement[0][0]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "head": self.head,
            "placement": {host: list(gpus) for host, gpus in self.placement},
            "port": self.port,
            "weights_gib_per_gpu": self.weights_gib_per_gpu,
            "kv_cache_tokens": self.kv_cache_tokens,
            "argv": list(self.argv),
            **({"files": [f.to_dict() for f in self.files]} if self.files else {}),
            "max_num_seqs": self.max_num_seqs,
            "est_concurrency": self.est_concurrency,
            "est_decode_tokens_per_s": round(self.est_decode_tokens_per_s),
        }


@dataclass
class Plan:
    deployments: list  # [(model id, [Replica, ...]), ...] in inventory order
    idle_gpus: dict  # host -> [gpu index, ...]
    notes: list = field(default_factory=list)  # warnings that do not stop the plan
    # Per deployment (same order): {"objective": ..., "layouts": [layout dict, ...]} (see Layout.to_dict).
    comparisons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON contract of ``aphrodite-deploy plan --json``."""
        deployments = []
        for number, (model, replicas) in enumerate(self.deployments):
            entry = {"model": model, "replicas": [r.to_dict() for r in replicas]}
            if number < len(self.comparisons):
                entry.update(self.comparisons[number])
            deployments.append(entry)
        return {
            "deployments": deployments,
            "idle_gpus": {host: list(gpus) for host, gpus in self.idle_gpus.items()},
        }


# --------------------------------------------------------------------------- small helpers


def replica_slug(model_id: str) -> str:
    """Replica name prefix from a model id: ``meta-llama/Llama-3.1-70B-Instruct`` -> ``llama-3-1-70b``."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", model_id.rstrip("/").rsplit("/", maxsplit=1)[-1].lower()) if t]
    if tokens and tokens[0] == "meta" and len(tokens) > 1:
        tokens = tokens[1:]
    kept = [t for t in tokens if t not in _SLUG_DROP] or tokens or ["model"]
    slug = "-".join(kept)[:50].strip("-")
    return slug if slug[:1].isalpha() else "m-" + slug


def _gib(value: float) -> str:
    return f"{value / GIB:.0f}" if value >= 100 * GIB else f"{value / GIB:.1f}"


def _util(value: float) -> str:
    return f"{value:g}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def overhead_bytes(req: ModelRequest) -> int:
    return RUNTIME_OVERHEAD_BYTES + (0 if req.enforce_eager else CUDA_GRAPH_BYTES)


def usable_bytes(memory_mib: int, req: ModelRequest) -> int:
    """Bytes of one GPU the engine may fill with weights and KV cache."""
    return int(memory_mib * MIB * req.gpu_memory_utilization) - overhead_bytes(req)


def kv_cache_tokens(spec: ModelSpec, memory_mib: int, req: ModelRequest, tp: int, pp: int) -> int:
    """Tokens of KV cache every GPU of a ``tp`` x ``pp`` replica can hold (whole blocks)."""
    budget = usable_bytes(memory_mib, req) - weight_bytes_per_gpu(spec, tp, pp)
    if budget <= 0:
        return 0
    tokens = budget // kv_bytes_per_token(spec, tp, pp, req.kv_cache_dtype)
    return int(tokens - tokens % KV_BLOCK_TOKENS)


def resolve_max_model_len(req: ModelRequest) -> int:
    spec = req.spec
    if req.max_model_len is None:
        return min(spec.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
    if req.max_model_len > spec.max_position_embeddings:
        raise PlanError(
            f"max_model_len {req.max_model_len} of {req.model_id} exceeds the {spec.max_position_embeddings} positions "
            f"its config.json allows; use {spec.max_position_embeddings} or less"
        )
    return req.max_model_len


def _marlin(host: HostGpus) -> bool:
    capability = host.min_compute_capability()
    return capability is None or capability >= (8, 0)


# --------------------------------------------------------------------------- argv


def build_argv(req: ModelRequest, tp: int, pp: int, max_model_len: int, port: int, head: HostGpus,
               nnodes: int = 1, master_addr: str | None = None, master_port: int | None = None) -> tuple:
    """Engine arguments of the head node (the image's ``aphrodite run`` excluded).

    Secrets never appear here: the API key reaches the engine as APHRODITE_API_KEY from
    an env file, because argv is readable in /proc and ``docker inspect``.
    """
    argv = ["--model", req.model_id]
    if req.served_model_name:
        argv += ["--served-model-name", req.served_model_name]
    argv += ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    argv += ["--max-model-len", str(max_model_len)]
    argv += ["--gpu-memory-utilization", _util(req.gpu_memory_utilization)]
    if req.quantization_flag:
        argv += ["--quantization", req.quantization_flag]
    if req.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", req.kv_cache_dtype]
    if req.enforce_eager:
        argv += ["--enforce-eager"]
    if req.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(req.max_num_seqs)]
    if head.bind_address:
        argv += ["--host", head.bind_address]
    argv += ["--port", str(port)]
    if nnodes > 1:
        argv += [
            "--nnodes", str(nnodes), "--node-rank", "0",
            "--master-addr", master_addr or head.address or head.host,
            "--master-port", str(master_port or DEFAULT_MASTER_PORT),
        ]
    argv += [str(a) for a in req.engine_args]  # the user's flags, after the planned ones
    flags = [a for a in argv if a.startswith("-") and not is_number(a)]
    unknown = [a for a in flags if not is_rendered_flag(a)]
    secret = [a for a in argv if a in SECRET_FLAGS]
    repeated = sorted({a for a in flags if flags.count(a) > 1 and APHRODITE_FLAG_KINDS.get(a) != "append"})
    if unknown or secret or repeated:  # a planner bug: _engine_args refuses such input
        raise AssertionError(
            f"rendered engine flags {unknown + secret + repeated} must exist in the pinned release, hold no secret "
            f"and appear once"
        )
    return tuple(argv)


def node_argv(argv: Any, rank: int) -> list:
    """Arguments of node ``rank`` of a multi-node replica, from the head's arguments.

    Every node runs the same command with its own ``--node-rank``; ranks above 0 add
    ``--headless`` (engine.md, multi-node without Ray).
    """
    args = [str(a) for a in argv]
    if rank == 0:
        return args
    if "--node-rank" not in args:
        raise PlanError(f"node rank {rank} was asked for, but the replica runs on a single node")
    position = args.index("--node-rank")
    args[position + 1] = str(rank)
    if "--headless" not in args:
        args.append("--headless")
    return args


# --------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class _Shape:
    tp: int
    pp: int
    nodes: int  # pp across this many identical nodes (1: single node)
    kv_tokens: int
    weights_per_gpu: int
    max_num_seqs: int = 0  # effective, once estimated
    estimate: DecodeEstimate | None = None  # at the concurrency it sustains


@dataclass(frozen=True)
class Layout:
    """One layout the objective compared, with the capacity model's estimates."""

    gpu: str
    shape: _Shape
    slots_per_host: int  # blocks of tp GPUs one host offers
    light: DecodeEstimate  # at min(min_concurrency, concurrency): the latency objective's view
    chosen: bool = False

    @property
    def estimate(self) -> DecodeEstimate:
        return self.shape.estimate

    @property
    def tokens_per_s_per_host(self) -> float:
        """Decode tokens/s a full host yields with this layout (a multi-node replica counts 1/nodes per host)."""
        return self.estimate.tokens_per_s * self.slots_per_host / self.shape.nodes

    def to_dict(self) -> dict:
        shape, est = self.shape, self.estimate
        entry = {
            "tensor_parallel_size": shape.tp,
            "pipeline_parallel_size": shape.pp,
        }
        if shape.nodes > 1:
            entry["nodes"] = shape.nodes
        else:
            entry["replicas_per_host"] = self.slots_per_host
        entry.update({
            "gpu": self.gpu,
            "kv_cache_tokens": shape.kv_tokens,
            "max_num_seqs": shape.max_num_seqs,
            "est_concurrency": est.concurrency,
            "est_decode_tokens_per_s": round(est.tokens_per_s),
            "est_tokens_per_s_per_gpu": round(est.tokens_per_s_per_gpu),
            "est_tokens_per_s_per_host": round(self.tokens_per_s_per_host),
            "est_inter_token_ms": round(est.step_seconds * 1000, 1),
            "est_inter_token_ms_at_min_concurrency": round(self.light.step_seconds * 1000, 1),
            "chosen": self.chosen,
        })
        return entry


class _State:
    """Free GPUs and used ports while planning; never shared between plans."""

    def __init__(self, hosts: dict) -> None:
        self.hosts = hosts
        self.free = {name: [True] * host.count for name, host in hosts.items()}
        self.free_count = {name: host.count for name, host in hosts.items()}
        self.ports = {name: set() for name in hosts}

    def take(self, host: str, positions: tuple) -> None:
        for position in positions:
            if not self.free[host][position]:  # a planner bug, never an input problem
                raise AssertionError(f"GPU {position} of {host} assigned twice")
            self.free[host][position] = False
        self.free_count[host] -= len(positions)

    def snapshot(self) -> tuple:
        return ({h: list(v) for h, v in self.free.items()}, dict(self.free_count), {h: set(v) for h, v in self.ports.items()})

    def restore(self, snapshot: tuple) -> None:
        free, free_count, ports = snapshot
        self.free = {h: list(v) for h, v in free.items()}
        self.free_count = dict(free_count)
        self.ports = {h: set(v) for h, v in ports.items()}

    def port(self, hosts: list, start: int) -> int:
        port = start
        while any(port in self.ports[h] for h in hosts):
            port += 1
        for h in hosts:
            self.ports[h].add(port)
        return port


def _find_block(host: HostGpus, free: list, tp: int) -> tuple | None:
    """The best run of ``tp`` contiguous free GPUs of ``host`` (positions), or ``None``.

    A block must sit inside one NVLink group when the host has a group that large; among
    the rest it prefers one NUMA node, then alignment to ``tp`` (less fragmentation),
    then the lowest index.
    """
    count = host.count
    if tp > count:
        return None
    gpus = host.gpus
    need_nvlink = tp > 1 and any(len(g) >= tp for g in host.nvlink_groups)
    best = None
    best_score = None
    for start in range(count - tp + 1):
        if not all(free[start:start + tp]):
            continue
        block = range(start, start + tp)
        # Contiguous means consecutive GPU indices, not only consecutive list positions.
        if gpus[start + tp - 1].index - gpus[start].index != tp - 1:
            continue
        if need_nvlink:
            group = host.nvlink_group_of(gpus[start].index)
            if group is None or any(host.nvlink_group_of(gpus[p].index) != group for p in block):
                continue
        numa = {gpus[p].numa_node for p in block}
        score = (len(numa) == 1, start % tp == 0, -start)
        if best_score is None or score > best_score:
            best, best_score = tuple(block), score
            if score[0] and score[1]:
                break
    return best


class _ModelPlanner:
    """Places the replicas of one model."""

    def __init__(self, req: ModelRequest, hosts: dict, state: _State, notes: list) -> None:
        self.req = req
        self.spec = req.spec
        self.state = state
        self.notes = notes
        self.hosts = [hosts[h] for h in req.hosts]
        self.max_model_len = resolve_max_model_len(req)
        self.slug = req.name or replica_slug(req.model_id)
        self.replicas: list = []
        self.cursor = 0
        self._single_heap: list | None = None
        self._shape_cache: dict = {}  # (memory, tp, pp) -> _Shape
        self._choice_cache: dict = {}  # the objective's picks, per host kind and GPU cap
        self.gpu_cap: int | None = None  # at most this many GPUs per replica (None: the objective's choice)
        self._check_inputs()
        self.multi_node = not any(self.single_node_shape(h, free_tp=True) for h in self.hosts)
        if not self.multi_node and not any(self.single_node_shape(h) for h in self.hosts):
            raise PlanError(self._forced_tp_message())
        self.multi_shape: _Shape | None = None
        self.multi_group: list = []
        self.multi_layouts: list = []
        if self.multi_node:
            self.multi_shape, self.multi_group = self._multi_node_shape()
        else:
            skipped = [h.host for h in self.hosts if self.single_node_shape(h) is None]
            if skipped:
                self.notes.append(
                    f"{req.model_id} fits no single host among {', '.join(skipped)}; its replicas run on the other hosts of {req.hosts_label}"
                )

    # ---- inputs

    def _check_inputs(self) -> None:
        req, spec = self.req, self.spec
        if not self.hosts:
            raise PlanError(
                f"{req.model_id} targets {req.hosts_label}, which has no hosts; add GPU hosts to {req.hosts_label} "
                f"or set hosts: for this model in aphrodite_models"
            )
        if req.objective not in OBJECTIVES:
            raise PlanError(f"objective {req.objective!r} of {req.model_id} is not one of {', '.join(OBJECTIVES)}")
        if not 0.05 <= req.gpu_memory_utilization <= 1.0:
            raise PlanError(
                f"gpu_memory_utilization {req.gpu_memory_utilization} of {req.model_id} must be a fraction of GPU memory "
                f"between 0.05 and 1.0 (engine default 0.92)"
            )
        if req.replicas is not None and req.replicas < 1:
            raise PlanError(f"replicas {req.replicas} of {req.model_id} must be at least 1; leave it out for as many as fit")
        if req.max_num_seqs is not None and req.max_num_seqs < 1:
            raise PlanError(
                f"max_num_seqs {req.max_num_seqs} of {req.model_id} must be at least 1; leave it out for the engine's "
                f"default (1024 on H100/H200, 256 on other GPUs)"
            )
        if req.typical_sequence_tokens < 1:
            raise PlanError(
                f"typical_sequence_tokens {req.typical_sequence_tokens} of {req.model_id} must be at least 1 "
                f"(prompt plus output tokens of a typical request; default {DEFAULT_TYPICAL_SEQUENCE_TOKENS})"
            )
        if req.min_concurrency < 1:
            raise PlanError(
                f"min_concurrency {req.min_concurrency} of {req.model_id} must be at least 1 "
                f"(sequences a latency-planned replica still runs at once; default {DEFAULT_MIN_CONCURRENCY})"
            )
        quant = spec.quantization
        if quant is not None and quant.is_float:
            old = [h for h in self.hosts if (h.min_compute_capability() or (9, 0)) < (8, 0)]
            if old:
                raise PlanError(
                    f"{req.model_id} in FP8 needs GPUs of compute capability 8.0 or newer; {old[0].host} has "
                    f"{old[0].gpu_name} ({'.'.join(map(str, old[0].min_compute_capability()))}); use a 16-bit or AWQ checkpoint there"
                )
        tp = req.tensor_parallel_size
        if tp is not None:
            largest = max(h.count for h in self.hosts)
            marlin = all(_marlin(h) for h in self.hosts)
            message = tensor_parallel_error(spec, tp, largest, marlin)
            if message:
                raise PlanError(message)
            if tp > largest:
                valid = valid_tensor_parallel_sizes(spec, largest, marlin)
                raise PlanError(
                    f"tensor_parallel_size {tp} of {req.model_id} needs {tp} GPUs in one host, but the hosts of "
                    f"{req.hosts_label} have at most {largest}; use {', '.join(map(str, valid))} or leave tensor_parallel_size out"
                )

    # ---- shapes

    def _fit(self, host: HostGpus, tp: int, pp: int, nodes: int) -> _Shape | None:
        key = (host.memory_mib, tp, pp)
        if key not in self._shape_cache:
            tokens = kv_cache_tokens(self.spec, host.memory_mib, self.req, tp, pp)
            self._shape_cache[key] = _Shape(tp, pp, nodes, tokens, weight_bytes_per_gpu(self.spec, tp, pp))
        shape = self._shape_cache[key]
        if shape.kv_tokens < self.max_model_len:
            return None
        return shape if shape.nodes == nodes else replace(shape, nodes=nodes)

    def _tp_choices(self, host: HostGpus, free_tp: bool = False) -> list:
        """TP sizes to try on ``host``: the forced one, or every size the engine accepts.

        ``free_tp`` ignores a forced size (to tell whether the model fits a node at all).
        """
        if self.req.tensor_parallel_size is not None and not free_tp:
            tp = self.req.tensor_parallel_size
            return [tp] if tp <= host.count else []
        return valid_tensor_parallel_sizes(self.spec, host.count, _marlin(host))

    def single_node_shape(self, host: HostGpus, free_tp: bool = False) -> _Shape | None:
        """The replica shape for one host, or ``None`` when the model does not fit it.

        ``free_tp`` only asks whether the model fits at all: the fewest GPUs that hold it,
        whatever ``tensor_parallel_size`` says.
        """
        key = ("single", free_tp, self.gpu_cap, host.signature, host.nvlink_groups, _marlin(host))
        if key in self._choice_cache:
            return self._choice_cache[key]
        if free_tp:
            fitting = [s for s in (self._fit(host, tp, 1, 1) for tp in self._tp_choices(host, True)) if s]
            shape = fitting[0] if fitting else None
        else:
            chosen = [layout for layout in self.layouts(host, self.gpu_cap) if layout.chosen]
            shape = chosen[0].shape if chosen else None
        self._choice_cache[key] = shape
        return shape

    def layouts(self, host: HostGpus, cap: int | None = None) -> list:
        """Every single-host layout the model fits on ``host``, estimated; the objective's pick is ``chosen``.

        ``cap`` limits the pick to at most that many GPUs per replica (see :meth:`shrink`).
        With a forced ``tensor_parallel_size`` the forced layout is the chosen one (when it
        fits) and the others are listed for comparison.
        """
        key = ("layouts", cap, host.signature, host.nvlink_groups, _marlin(host))
        if key in self._choice_cache:
            return self._choice_cache[key]
        candidates = []
        for tp in self._tp_choices(host, free_tp=True):
            shape = self._fit(host, tp, 1, 1)
            if shape is not None:
                candidates.append(self._layout(host, shape))
        forced = self.req.tensor_parallel_size
        if forced is not None:
            pick = next((c for c in candidates if c.shape.tp == forced), None)
        else:
            pick = self._choose([c for c in candidates if cap is None or c.shape.tp <= cap])
        result = [replace(c, chosen=c is pick) for c in candidates]
        self._choice_cache[key] = result
        return result

    def _layout(self, host: HostGpus, shape: _Shape) -> Layout:
        """``shape`` on ``host`` with the capacity model's estimates."""
        req = self.req
        figures, note = gpu_figures(host.gpu_name, host.memory_mib)
        if note and note not in self.notes:
            self.notes.append(note)
        max_num_seqs = req.max_num_seqs or engine_default_max_num_seqs(host.gpu_name, host.memory_mib)
        sequence = min(req.typical_sequence_tokens, self.max_model_len)
        concurrency = sustained_concurrency(shape.kv_tokens, max_num_seqs, sequence)
        nvlink = shape.tp > 1 and any(len(group) >= shape.tp for group in host.nvlink_groups)
        full = estimate_decode(self.spec, figures, shape.tp, shape.pp, concurrency, sequence, req.kv_cache_dtype, nvlink)
        light = estimate_decode(self.spec, figures, shape.tp, shape.pp, min(concurrency, req.min_concurrency), sequence,
                                req.kv_cache_dtype, nvlink)
        estimated = replace(shape, max_num_seqs=max_num_seqs, estimate=full)
        return Layout(host.gpu_name, estimated, host.count // shape.tp, light)

    def _choose(self, layouts: list, hosts_of: Any = None) -> Layout | None:
        """The objective's pick among ``layouts``; ``hosts_of(layout)``: hosts that can run it (multi-node)."""
        if not layouts:
            return None
        ordered = sorted(layouts, key=lambda c: (c.shape.tp * c.shape.nodes, c.shape.nodes))
        if self.req.objective == "latency":
            floor = self.req.min_concurrency
            eligible = [c for c in ordered if c.estimate.concurrency >= floor]
            if not eligible:  # none keeps min_concurrency running: those that come closest
                most = max(c.estimate.concurrency for c in ordered)
                eligible = [c for c in ordered if c.estimate.concurrency == most]

            def value(layout: Layout) -> float:
                return 1.0 / layout.light.step_seconds
        else:
            eligible = ordered

            def value(layout: Layout) -> float:
                return layout.tokens_per_s_per_host * (hosts_of(layout) if hosts_of else 1)
        best = eligible[0]
        for layout in eligible[1:]:
            if value(layout) > value(best) * (1 + LAYOUT_MARGIN):
                best = layout
        return best

    def _multi_node_shape(self) -> tuple:
        """The objective's (nodes x tp) replica over identical hosts, with the hosts that can run it."""
        groups: dict = {}
        for host in self.hosts:
            groups.setdefault(host.signature, []).append(host)
        candidates = []
        members_of: dict = {}
        for members in groups.values():
            sample = members[0]
            for nodes in range(2, min(len(members), self.spec.num_layers) + 1):
                for tp in self._tp_choices(sample):
                    shape = self._fit(sample, tp, nodes, nodes)
                    if shape is None:
                        continue
                    layout = self._layout(sample, shape)
                    members_of[id(layout)] = members
                    candidates.append(layout)
        allowed = [c for c in candidates if self.gpu_cap is None or c.shape.tp * c.shape.nodes <= self.gpu_cap]
        best = self._choose(allowed, lambda c: len(members_of[id(c)]))
        if best is None:
            raise PlanError(self._does_not_fit_message())
        if not self.multi_layouts:
            self.multi_layouts = [replace(c, chosen=c is best) for c in candidates]
        return best.shape, members_of[id(best)]

    def shrink(self) -> bool:
        """Allow only layouts with fewer GPUs per replica than the current pick; ``False`` when none is left.

        Used when the objective's layout cannot place a model's ``replicas``, and to fill
        GPUs that its layout leaves over. A forced ``tensor_parallel_size`` never shrinks.
        """
        if self.req.tensor_parallel_size is not None:
            return False
        if self.multi_node:
            cap = self.multi_shape.tp * self.multi_shape.nodes - 1
        else:
            shapes = [self.single_node_shape(h) for h in self.hosts]
            cap = max(s.tp for s in shapes if s) - 1
        if cap < 1:
            return False
        previous = (self.gpu_cap, self.multi_shape, self.multi_group)
        self.gpu_cap = cap
        if self.multi_node:
            try:
                self.multi_shape, self.multi_group = self._multi_node_shape()
            except PlanError:
                self.gpu_cap, self.multi_shape, self.multi_group = previous
                return False
        elif not any(self.single_node_shape(h) for h in self.hosts):
            self.gpu_cap = previous[0]
            return False
        self._single_heap = None  # hosts skipped for the larger layout may take a smaller one
        self.cursor = 0
        return True

    def restart(self) -> None:
        """Forget the replicas placed so far (the caller restores the free GPUs)."""
        self.replicas = []
        self._single_heap = None
        self.cursor = 0

    def comparison(self) -> dict:
        """The objective and the layouts it compared, for the plan's JSON and table."""
        if self.multi_node:
            layouts = self.multi_layouts
        else:
            kinds = []
            heads = {r.head for r in self.replicas}
            for host in self.hosts:
                if (not heads or host.host in heads) and host.signature not in [h.signature for h in kinds]:
                    kinds.append(host)
            layouts = [layout for host in kinds for layout in self.layouts(host, None)]
        return {"objective": self.req.objective, "layouts": [layout.to_dict() for layout in layouts]}

    # ---- placing

    def place_one(self) -> bool:
        """Place one more replica; ``False`` when no free GPUs can take one."""
        return self._place_multi() if self.multi_node else self._place_single()

    def _place_single(self) -> bool:
        """Place one replica on the host with the most free GPUs (ties: inventory order), but
        never every replica of a model on one host while another host can take one.

        On hosts of one size, replicas spread across hosts, so losing one host takes as few
        replicas of a model as possible.  Where sizes differ, the larger host takes replicas
        until it has no more free GPUs than the others (an 8-GPU host listed before a 5-GPU
        one takes the first four single-GPU replicas), except that a model's second replica
        goes to another host if one can take it: otherwise one host's reboot or failure
        would take the model down.  Spreading by replica count all the way leaves GPUs idle
        that this packs (inventories/prod: 4 idle GPUs instead of 2, one 4-GPU replica of the
        70B fewer).  Filling the fleet ends with the same GPUs used either way.
        """
        heads = {replica.head for replica in self.replicas}
        if len(heads) == 1:
            for host in sorted((h for h in self.hosts if h.host not in heads),
                               key=lambda h: -self.state.free_count[h.host]):
                if self._place_on(host):
                    return True
        heap = self._single_heap
        if heap is None:
            heap = [(-self.state.free_count[h.host], order, h) for order, h in enumerate(self.hosts)]
            heapq.heapify(heap)
            self._single_heap = heap
        while heap:
            neg_free, order, host = heapq.heappop(heap)
            free = self.state.free_count[host.host]
            if -neg_free != free:  # another model took GPUs since: requeue with the true count
                heapq.heappush(heap, (-free, order, host))
                continue
            # Hosts only lose free GPUs, so a host that cannot take a replica now never will.
            if not self._place_on(host):
                continue
            heapq.heappush(heap, (-self.state.free_count[host.host], order, host))
            return True
        return False

    def _place_on(self, host: HostGpus) -> bool:
        """Place one single-node replica on ``host`` if its free GPUs hold one; ``False`` if not."""
        shape = self.single_node_shape(host)
        if shape is None or self.state.free_count[host.host] < shape.tp:
            return False
        block = _find_block(host, self.state.free[host.host], shape.tp)
        if block is None:
            return False
        self._add([(host, block)], shape)
        return True

    def _place_multi(self) -> bool:
        shape = self.multi_shape
        if shape is None:
            return False
        chosen = []
        hosts = self.multi_group
        # Hosts only lose free GPUs, so ones that are full now stay full.
        while self.cursor < len(hosts) and _find_block(hosts[self.cursor], self.state.free[hosts[self.cursor].host], shape.tp) is None:
            self.cursor += 1
        for host in hosts[self.cursor:]:
            if self.state.free_count[host.host] < shape.tp:
                continue
            block = _find_block(host, self.state.free[host.host], shape.tp)
            if block is not None:
                chosen.append((host, block))
                if len(chosen) == shape.nodes:
                    self._add(chosen, shape)
                    return True
        return False

    def _add(self, nodes: list, shape: _Shape) -> None:
        state = self.state
        names = [host.host for host, _block in nodes]
        for host, block in nodes:
            state.take(host.host, block)
        port = state.port(names, DEFAULT_PORT)
        master_port = state.port(names, DEFAULT_MASTER_PORT) if len(nodes) > 1 else None
        head = nodes[0][0]
        argv = build_argv(self.req, shape.tp, shape.pp, self.max_model_len, port, head,
                          len(nodes), head.address or head.host, master_port)
        placement = tuple((host.host, tuple(host.gpus[p].index for p in block)) for host, block in nodes)
        self.replicas.append(Replica(
            name=f"{self.slug}-{len(self.replicas)}",
            model=self.req.model_id,
            tensor_parallel_size=shape.tp,
            pipeline_parallel_size=shape.pp,
            placement=placement,
            port=port,
            weights_gib_per_gpu=round(shape.weights_per_gpu / GIB, 2),
            kv_cache_tokens=shape.kv_tokens,
            argv=argv,
            files=self.req.engine_files,
            max_num_seqs=shape.max_num_seqs,
            est_concurrency=shape.estimate.concurrency if shape.estimate else 0,
            est_decode_tokens_per_s=shape.estimate.tokens_per_s if shape.estimate else 0.0,
        ))

    # ---- messages

    def _does_not_fit_message(self) -> str:
        """One paragraph: the constraint, the numbers, the nearest feasible alternative."""
        req, spec = self.req, self.spec
        groups: dict = {}
        for host in self.hosts:
            groups.setdefault(host.signature, []).append(host)
        members = max(groups.values(), key=lambda m: len(m) * m[0].count * m[0].memory_mib)
        host = members[0]
        n_hosts, per_host = len(members), host.count
        gpus = n_hosts * per_host
        weights = weight_bytes(spec)
        usable_all = usable_bytes(host.memory_mib, req) * gpus
        raw = host.memory_mib * MIB * req.gpu_memory_utilization * gpus
        offer = (
            f"{req.hosts_label} offers {_plural(n_hosts, 'host')} × {per_host} × {host.memory_mib * MIB / GIB:.1f} GiB "
            f"× {_util(req.gpu_memory_utilization)} = {_gib(raw)} GiB"
        )
        forced = req.tensor_parallel_size
        forced_note = f" with tensor_parallel_size {forced}" if forced else ""
        alternatives = self._alternatives(host, n_hosts)
        if weights >= usable_all or weights >= raw:
            head = (
                f"{spec.short_name} in {spec.precision_label} needs {_gib(weights)} GiB of weights; {offer} "
                f"before {_gib(overhead_bytes(req))} GiB of runtime overhead per GPU and the KV cache"
            )
        else:
            kv_seq = kv_bytes_per_token(spec, 1, 1, req.kv_cache_dtype) * self.max_model_len
            head = (
                f"{spec.short_name} in {spec.precision_label} needs {_gib(weights)} GiB of weights plus "
                f"{_gib(kv_seq)} GiB of KV cache for one {self.max_model_len}-token sequence (max_model_len){forced_note}, "
                f"spread so that every GPU holds its share after {_gib(overhead_bytes(req))} GiB of runtime overhead; "
                f"{offer}, and no valid tensor/pipeline split of it fits"
            )
        if len(groups) > 1:
            kinds = "; ".join(
                f"{', '.join(h.host for h in m[:3])}{' ...' if len(m) > 3 else ''}: {m[0].count} × {m[0].gpu_name}"
                for m in groups.values()
            )
            head += f" (a replica spans only identical nodes, and {req.hosts_label} mixes {kinds})"
        return f"{head}; {alternatives}."

    def _alternatives(self, host: HostGpus, n_hosts: int) -> str:
        """The nearest feasible changes, best first, as 'use X or Y'."""
        req, spec = self.req, self.spec
        options = []
        # 1. A shorter context on the hardware that exists.
        best_tokens = 0
        for tp in self._tp_choices(host):
            for nodes in range(1, min(n_hosts, spec.num_layers) + 1):
                best_tokens = max(best_tokens, kv_cache_tokens(spec, host.memory_mib, req, tp, nodes))
        if best_tokens >= 1024:
            length = best_tokens - best_tokens % 1024
            options.append(f"set max_model_len to {length} or less")
        # 2. Smaller weights.
        if spec.quantization is None:
            for label, quant in (("FP8 quantization", Quantization("fp8", 8, -1, False, False)),
                                 ("a 4-bit AWQ checkpoint", Quantization("awq", 4, 128, True, True))):
                variant = replace(spec, quantization=quant, checkpoint_bytes=None)
                if self._fits_somewhere(variant, host, n_hosts):
                    options.append(f"use {label} ({_gib(weight_bytes(variant))} GiB of weights)")
                    break
        elif spec.quantization.bits > 4:
            variant = replace(spec, quantization=Quantization("awq", 4, 128, True, True), checkpoint_bytes=None)
            if self._fits_somewhere(variant, host, n_hosts):
                options.append(f"use a 4-bit AWQ checkpoint ({_gib(weight_bytes(variant))} GiB of weights)")
        # 3. More identical nodes.
        for total in range(n_hosts + 1, max(n_hosts, MAX_SUGGESTED_NODES) + 1):
            if self._fits_somewhere(spec, host, total, only_nodes=total):
                more = total - n_hosts
                options.append(f"add {more} more {'node' if more == 1 else 'nodes'} like {host.host} "
                               f"({host.count} × {host.gpu_name})")
                break
        if self.req.tensor_parallel_size is not None:
            options.append("leave tensor_parallel_size out")
        if not options:
            return (f"no shorter context, smaller quantization or up to {MAX_SUGGESTED_NODES} such nodes make it fit; "
                    f"use GPUs with more memory")
        return "; ".join(options[:1]) if len(options) == 1 else options[0] + ", or " + options[1]

    def _fits_somewhere(self, spec: ModelSpec, host: HostGpus, n_hosts: int, only_nodes: int | None = None) -> bool:
        tps = ([self.req.tensor_parallel_size] if self.req.tensor_parallel_size
               else valid_tensor_parallel_sizes(spec, host.count, _marlin(host)))
        node_counts = [only_nodes] if only_nodes else range(1, min(n_hosts, spec.num_layers) + 1)
        for nodes in node_counts:
            if nodes > spec.num_layers:
                continue
            for tp in tps:
                if tp <= host.count and tensor_parallel_problem(spec, tp, _marlin(host)) is None:
                    if kv_cache_tokens(spec, host.memory_mib, self.req, tp, nodes) >= self.max_model_len:
                        return True
        return False

    def _forced_tp_message(self) -> str:
        req, spec = self.req, self.spec
        tp = req.tensor_parallel_size
        host = max(self.hosts, key=lambda h: h.memory_mib)
        working = [s.tp for s in (self.single_node_shape(h, free_tp=True) for h in self.hosts) if s]
        weights = weight_bytes_per_gpu(spec, tp, 1)
        kv_seq = kv_bytes_per_token(spec, tp, 1, req.kv_cache_dtype) * self.max_model_len
        return (
            f"tensor_parallel_size {tp} of {req.model_id} leaves {_gib(weights)} GiB of weights on each GPU, which with "
            f"{_gib(kv_seq)} GiB of KV cache for one {self.max_model_len}-token sequence exceeds the "
            f"{_gib(usable_bytes(host.memory_mib, req))} GiB that one {host.gpu_name} offers "
            f"({host.memory_mib} MiB × {_util(req.gpu_memory_utilization)} − {_gib(overhead_bytes(req))} GiB runtime); "
            f"use tensor_parallel_size {min(working)} or leave it out"
        )

    def no_room_message(self, placed_before: dict) -> str:
        req = self.req
        if self.multi_node:
            shape = self.multi_shape
            need = f"{shape.nodes} identical hosts with {_plural(shape.tp, 'free GPU')} each"
        else:
            shapes = [self.single_node_shape(h) for h in self.hosts]
            need = f"{_plural(min(s.tp for s in shapes if s), 'free GPU')} in one host"
        wanted = req.replicas or 1
        have = len(self.replicas)
        taken = ", ".join(f"{model}: {count}" for model, count in placed_before.items() if count) or "none"
        free = sum(self.state.free_count[h.host] for h in self.hosts)
        placed = f"only {have} could be placed" if have else "none could be placed"
        remedies = ["set replicas on the earlier models to leave room"] if placed_before else []
        if have:
            remedies.append(f"lower replicas of {req.model_id} to {have}")
        remedies.append(f"add hosts to {req.hosts_label}")
        return (
            f"{req.model_id} needs {_plural(wanted, 'replica')} of {need}, but {placed}; "
            f"{req.hosts_label} has {_plural(free, 'free GPU')} left after earlier models (replicas placed: {taken}); "
            f"{', '.join(remedies[:-1])}{', or ' if len(remedies) > 1 else ''}{remedies[-1]}"
        )


def plan_fleet(requests: list, hosts: dict, extra_hosts: tuple = ()) -> Plan:
    """Plan every model of ``requests`` on ``hosts`` (hostname -> :class:`HostGpus`).

    Models with a ``replicas`` count get exactly that many; the others get one each first,
    then take turns adding replicas until no free GPUs fit another one. ``extra_hosts`` are
    reported in ``idle_gpus`` even when no model targets them.
    """
    state = _State(hosts)
    notes: list = []
    seen_ids: dict = {}
    planners = []
    for req in requests:
        missing = [h for h in req.hosts if h not in hosts]
        if missing:
            raise PlanError(f"{req.model_id} targets {', '.join(missing)}, which have no GPU facts; declare aphrodite_gpus_declared for them")
        planner = _ModelPlanner(req, hosts, state, notes)
        if planner.slug in seen_ids:
            raise PlanError(
                f"{req.model_id} and {seen_ids[planner.slug]} would both name their replicas {planner.slug}-N; "
                f"give one of them a name: in aphrodite_models"
            )
        seen_ids[planner.slug] = req.model_id
        planners.append(planner)

    placed: dict = {}
    for planner in planners:
        wanted = planner.req.replicas or 1
        before = state.snapshot() if wanted > 1 else None
        first_tp = None
        while True:
            while len(planner.replicas) < wanted and planner.place_one():
                pass
            if first_tp is None and planner.replicas:
                first_tp = planner.replicas[0].tensor_parallel_size * planner.replicas[0].pipeline_parallel_size
            # The objective's layout leaves no room for the count asked for: smaller layouts may.
            if len(planner.replicas) >= wanted or before is None or not planner.shrink():
                break
            state.restore(before)
            planner.restart()
        if len(planner.replicas) < wanted:
            raise PlanError(planner.no_room_message(placed))
        gpus = planner.replicas[0].tensor_parallel_size * planner.replicas[0].pipeline_parallel_size
        if first_tp is not None and gpus < first_tp:
            notes.append(
                f"{planner.req.model_id}: {wanted} replicas fit only with {_plural(gpus, 'GPU')} each, not the "
                f"{first_tp} its objective prefers; set fewer replicas to get the better layout"
            )
        placed[planner.req.model_id] = len(planner.replicas)

    fillers = [p for p in planners if p.req.replicas is None]
    while fillers:
        fillers = [p for p in fillers if p.place_one()]
    # GPUs the chosen layouts leave over take smaller layouts of the same models, in turns.
    fillers = [p for p in planners if p.req.replicas is None and p.shrink()]
    while fillers:
        counts = {id(p): len(p.replicas) for p in fillers}
        active = [p for p in fillers if p.place_one()]
        while active:
            active = [p for p in active if p.place_one()]
        for p in fillers:
            if len(p.replicas) > counts[id(p)]:
                notes.append(
                    f"{p.req.model_id}: {len(p.replicas) - counts[id(p)]} more replicas with "
                    f"{_plural(p.replicas[-1].tensor_parallel_size * p.replicas[-1].pipeline_parallel_size, 'GPU')} "
                    f"each use GPUs its preferred layout left over"
                )
        fillers = [p for p in fillers if p.shrink()]

    idle: dict = {}
    targeted = []
    for req in requests:
        targeted.extend(h for h in req.hosts if h not in targeted)
    targeted.extend(h for h in extra_hosts if h not in targeted and h in hosts)
    for name in targeted:
        host = hosts[name]
        idle[name] = [host.gpus[p].index for p, free in enumerate(state.free[name]) if free]
    return Plan([(p.req.model_id, p.replicas) for p in planners], idle, notes, [p.comparison() for p in planners])
