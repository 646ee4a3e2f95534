"""Invariants of every plan, over random fleets and model lists (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_flags import APHRODITE_FLAGS
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fleet import host_gpus
from ansible_collections.aphrodite.baremetal.plugins.module_utils._model_spec import (
    kv_bytes_per_token,
    tensor_parallel_problem,
    weight_bytes_per_gpu,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import model_request, plan_inventory
from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import (
    SECRET_FLAGS,
    PlanError,
    overhead_bytes,
    resolve_max_model_len,
)

from planner_cases import declared, gathered, model

GPU_KINDS = [
    ("NVIDIA GeForce RTX 3090", 24576, "8.6"),
    ("NVIDIA GeForce RTX 4090", 24564, "8.9"),
    ("NVIDIA L40S", 46068, "8.9"),
    ("NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ("NVIDIA H100 80GB HBM3", 81559, "9.0"),
    ("NVIDIA H200", 143771, "9.0"),
]


# Small models more often than the 405B ones, so that most fleets can be planned.
MODEL_CHOICES = (["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "llama-3.1-70b-instruct-awq-int4", "mixtral-8x7b-instruct-v0.1"] * 3
                 + ["llama-3.1-70b-instruct"] * 2 + ["llama-3.1-405b-instruct-fp8", "llama-3.1-405b-instruct"])


@st.composite
def host_facts(draw, kind=None):
    """Declared or gathered facts of one host, with NVLink groups and NUMA nodes when gathered."""
    name, memory, capability = kind or draw(st.sampled_from(GPU_KINDS))
    count = draw(st.sampled_from([1, 2, 4, 8]))
    if draw(st.booleans()):
        return {"aphrodite_gpus_declared": declared(count, name, memory, draw(st.sampled_from(["nvlink", "pcie"])))}
    group_size = draw(st.sampled_from([s for s in (1, 2, 4, 8) if s <= count]))
    groups = [list(range(i, i + group_size)) for i in range(0, count, group_size)] if group_size > 1 else []
    numa_split = draw(st.sampled_from([None, 1, 2]))
    numa = [None if numa_split is None else (i * numa_split) // count for i in range(count)]
    return {"aphrodite_gpus": gathered(count, name, memory, groups, numa, capability=capability)}


@st.composite
def fleets(draw):
    # Half the fleets use one GPU kind throughout, as real ones mostly do.
    kind = draw(st.sampled_from(GPU_KINDS)) if draw(st.booleans()) else None
    hosts = draw(st.lists(host_facts(kind), min_size=1, max_size=6))
    hostvars = {f"gpu{i + 1}": {**facts, "ansible_host": f"10.0.0.{i + 1}"} for i, facts in enumerate(hosts)}
    directories = draw(st.lists(st.sampled_from(MODEL_CHOICES), min_size=1, max_size=3, unique=True))
    models = []
    for directory in directories:
        options = {}
        if draw(st.booleans()):
            options["max_model_len"] = draw(st.sampled_from([2048, 4096, 8192, 16384]))
        if draw(st.booleans()):
            options["replicas"] = draw(st.integers(min_value=1, max_value=3))
        options["objective"] = draw(st.sampled_from(["throughput", "latency"]))
        if draw(st.booleans()):
            options["hosts"] = draw(st.lists(st.sampled_from(sorted(hostvars)), min_size=1, unique=True))
        models.append(model(directory, **options))
    return hostvars, models


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_every_plan_keeps_the_invariants(fleet):
    hostvars, models = fleet
    groups = {"all": list(hostvars), "gpu_nodes": list(hostvars)}
    try:
        plan = plan_inventory(models, hostvars, groups)
    except PlanError as exc:
        message = str(exc)
        assert message and "\n" not in message  # one paragraph, always
        return
    hosts = {name: host_gpus(name, v.get("aphrodite_gpus_declared"), v.get("aphrodite_gpus"))[0] for name, v in hostvars.items()}
    used: set = set()
    ports: dict = {}
    names: set = set()
    for entry, (model_id, replicas) in zip(models, plan.deployments):
        req = model_request(entry, groups, None)
        assert model_id == req.model_id
        if "replicas" in entry:
            assert len(replicas) == entry["replicas"]
        else:
            assert replicas, "a model without a count gets at least one replica"
        max_len = resolve_max_model_len(req)
        for replica in replicas:
            tp, pp = replica.tensor_parallel_size, replica.pipeline_parallel_size
            assert replica.name not in names
            names.add(replica.name)
            # The engine accepts the TP size (heads, KV heads, intermediate size, Marlin shapes).
            assert tensor_parallel_problem(req.spec, tp) is None
            # Pipeline stages are nodes; every node gives tp contiguous GPUs; nodes are identical.
            assert len(replica.placement) == pp
            assert len({hosts[h].signature for h, _ in replica.placement}) == 1
            for host, gpus in replica.placement:
                assert host in req.hosts
                assert len(gpus) == tp
                assert list(gpus) == list(range(gpus[0], gpus[0] + tp))
                # No GPU is used twice.
                for gpu in gpus:
                    assert (host, gpu) not in used
                    used.add((host, gpu))
                # TP inside one NVLink group whenever the host has a group that large.
                facts = hosts[host]
                if tp > 1 and any(len(g) >= tp for g in facts.nvlink_groups):
                    assert len({facts.nvlink_group_of(g) for g in gpus}) == 1
                # The replica fits: weights plus one max_model_len sequence within the usable memory.
                usable = int(facts.memory_mib * 2**20 * req.gpu_memory_utilization) - overhead_bytes(req)
                need = weight_bytes_per_gpu(req.spec, tp, pp) + max_len * kv_bytes_per_token(req.spec, tp, pp)
                assert need <= usable
                # Distinct port per replica on a host.
                assert replica.port not in ports.setdefault(host, set())
                ports[host].add(replica.port)
            assert replica.kv_cache_tokens >= max_len
            flags = {a for a in replica.argv if a.startswith("--")}
            assert flags <= APHRODITE_FLAGS
            assert not flags & SECRET_FLAGS
            assert ("--nnodes" in flags) == (pp > 1)
    # Idle GPUs are exactly the unused ones of every targeted host.
    for host, idle in plan.idle_gpus.items():
        every = {g.index for g in hosts[host].gpus}
        assert set(idle) == every - {g for h, g in used if h == host}
