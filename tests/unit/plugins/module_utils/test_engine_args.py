"""engine_args and aphrodite_engine_args: checked against the pinned flag table, rendered as the engine reads them."""

from __future__ import annotations

import json

import pytest

from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_args import (
    CONTAINER_FILES_DIR,
    EngineArgsError,
    content_digest,
    is_rendered_flag,
    resolve,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_flags import APHRODITE_FLAGS
from ansible_collections.aphrodite.baremetal.plugins.module_utils._plan_input import plan_inventory
from ansible_collections.aphrodite.baremetal.plugins.module_utils._planner import SECRET_FLAGS, PlanError

from planner_cases import H100X8, inventory, model

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def argv_of(args, fleet=None, inventory_dir=None, **keys):
    return list(resolve(fleet, args, MODEL, "llama-3-1-8b", inventory_dir, keys).argv)


def plan(*models, engine_args=None, inventory_dir=None):
    hostvars, groups = inventory({"gpu1": H100X8})
    return plan_inventory(list(models), hostvars, groups, inventory_dir, engine_args=engine_args)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"enable-prefix-caching": True}, ["--enable-prefix-caching"]),
        ({"--enable-prefix-caching": False}, ["--no-enable-prefix-caching"]),  # on by default in the engine
        ({"no-enable-prefix-caching": True}, ["--no-enable-prefix-caching"]),
        ({"trust_remote_code": True}, ["--trust-remote-code"]),
        ({"disable-log-stats": True}, ["--disable-log-stats"]),  # store_true: no --no- form
        ({"disable-log-stats": False}, []),
        ({"tool-call-parser": "llama3_json", "enable-auto-tool-choice": True},
         ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]),  # by flag name
        ({"otlp-traces-endpoint": "http://otel.internal:4317"}, ["--otlp-traces-endpoint", "http://otel.internal:4317"]),
        ({"max-num-batched-tokens": 8192}, ["--max-num-batched-tokens", "8192"]),
        ({"seed": -1}, ["--seed", "-1"]),
        ({"cpu-offload-gb": 2.5}, ["--cpu-offload-gb", "2.5"]),
        ({"compilation-config": {"level": 3, "cudagraph_capture_sizes": [1, 2]}},
         ["--compilation-config", '{"cudagraph_capture_sizes":[1,2],"level":3}']),
        ({"compilation-config": '{"level": 3}'}, ["--compilation-config", '{"level": 3}']),
        ({"collect-detailed-traces": ["model", "worker"]}, ["--collect-detailed-traces", "model", "worker"]),
        ({"middleware": ["a.b", "c.d"]}, ["--middleware", "a.b", "--middleware", "c.d"]),
        ({"hf-overrides": '{"rope_scaling": null}'}, ["--hf-overrides", '{"rope_scaling": null}']),
        ({"chat-template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
         ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"]),
        ({"generation-config": "auto"}, ["--generation-config", "auto"]),
        ({"chat-template": "template_chatml.jinja"}, ["--chat-template", "template_chatml.jinja"]),  # shipped
    ],
)
def test_flags_render_the_way_the_engine_parses_them(args, expected):
    rendered = argv_of(args)
    assert rendered == expected
    assert all(is_rendered_flag(a) for a in rendered if a.startswith("--"))


def test_argv_does_not_depend_on_the_order_of_the_mapping():
    forward = {"enable-prefix-caching": True, "max-num-batched-tokens": 8192, "compilation-config": {"a": 1, "b": 2}}
    backward = dict(reversed(list(forward.items())))
    backward["compilation-config"] = {"b": 2, "a": 1}
    assert argv_of(forward) == argv_of(backward)


def test_the_model_wins_over_the_fleet_per_flag():
    fleet = {"enable-prefix-caching": True, "max-num-batched-tokens": 4096, "trust-remote-code": True}
    rendered = argv_of({"max_num_batched_tokens": 8192, "enable-prefix-caching": False}, fleet=fleet)
    assert rendered == ["--no-enable-prefix-caching", "--max-num-batched-tokens", "8192", "--trust-remote-code"]


@pytest.mark.parametrize(
    ("args", "request_fields"),
    [
        ({"max-num-seqs": 256}, {"max_num_seqs": 256}),
        ({"kv-cache-dtype": "fp8"}, {"kv_cache_dtype": "fp8"}),
        ({"enforce-eager": True}, {"enforce_eager": True}),
    ],
)
def test_memory_flags_become_request_fields_not_free_arguments(args, request_fields):
    resolved = resolve(None, args, MODEL, "slug", None)
    assert resolved.argv == ()
    assert dict(resolved.request) == request_fields


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max-num-seq": 8}, "sets --max-num-seq, which aphrodite-engine 0.24.1 does not accept; the nearest known flag is --max-num-seqs"),
        ({"enable-prefix-cache": True}, "the nearest known flag is --enable-prefix-caching"),
        ({"disable-log-requests": True}, "--disable-log-requests, which aphrodite-engine 0.24.1 does not accept"),
        ({"model": "x"}, "sets --model, which the plan owns; the model is the id"),
        ({"tensor-parallel-size": 2}, "set tensor_parallel_size of the model in aphrodite_models"),
        ({"tp": 2}, "sets --tensor-parallel-size, which the plan owns"),
        ({"-pp": 2}, "sets --pipeline-parallel-size, which the plan owns"),
        ({"port": 8000}, "the planner assigns ports"),
        ({"host": "0.0.0.0"}, "aphrodite_bind_address"),
        ({"nnodes": 2}, "--nnodes, which the plan owns"),
        ({"node-rank": 1}, "--node-rank, which the plan owns"),
        ({"master-addr": "10.0.0.1"}, "--master-addr, which the plan owns"),
        ({"master-port": 1}, "--master-port, which the plan owns"),
        ({"headless": True}, "--headless, which the plan owns"),
        ({"api-key": "k"}, "set engine_api_key from vault (vault_aphrodite_engine_api_key"),
        ({"hf-token": "t"}, "model_store_hf_token"),
        ({"ssl-keyfile": "k.pem"}, "haproxy_tls_certificate"),
        ({"served-model-name": "x"}, "set served_model_name"),
        ({"max-model-len": 4096}, "set max_model_len"),
        ({"gpu-memory-utilization": 0.5}, "set gpu_memory_utilization"),
        ({"quantization": "fp8"}, "set quantization"),
        ({"-q": "fp8"}, "set quantization"),
        ({"data-parallel-size": 2}, "set replicas"),
        ({"data-parallel-rank": 1}, "set replicas"),
        ({"kv-cache-memory-bytes": 1}, "set that instead"),
        ({"max-num-seqs": 0}, "--max-num-seqs to 0; it must be a positive integer"),
        ({"max-num-seqs": "many"}, "it must be a positive integer"),
        ({"max-num-seqs": True}, "it must be a positive integer"),
        ({"enable-prefix-caching": "yes"}, "--enable-prefix-caching is a switch, give true or false"),
        ({"max-num-batched-tokens": True}, "takes a value, not true or false"),
        ({"max-num-batched-tokens": None}, "to null; give a value or leave --max-num-batched-tokens out"),
        ({"otlp-traces-endpoint": {"a": 1}}, "takes one value"),
        ({"otlp-traces-endpoint": ""}, "to an empty string"),
        ({"collect-detailed-traces": []}, "to an empty list"),
        ({"max-num-batched-tokens": 1, "max_num_batched_tokens": 2}, "sets --max-num-batched-tokens twice"),
        ({"no-enable-prefix-caching": "x"}, "it takes true or false"),
        ({7: True}, "has the key 7"),
        ({"chat-template": "templates/missing.jinja"}, "is not a file on the controller"),
        ({"chat-template": "template_unknown.jinja"}, "is not a file on the controller"),
        ({"generation-config": "vllm"}, "is not a directory on the controller"),
        ({"lora-modules": "sql=adapters/sql"}, "give a mapping of adapter name to adapter directory"),
        ({"lora-modules": {}}, "to no adapters"),
        ({"lora-modules": {MODEL: "a"}}, "letters, digits"),
        ({"otlp-traces-endpoint": "--port"}, "would read a value that starts with - as another flag"),
        ({"lora-modules": {"bad name": "adapters/sql"}}, "letters, digits"),
        ({"lora-modules": [{"name": "a", "path": "p", "base_model_name": "b"}]}, "give each as name=path"),
    ],
)
def test_bad_engine_args_are_refused_in_one_paragraph(args, message, tmp_path):
    with pytest.raises(EngineArgsError) as caught:
        resolve(None, args, MODEL, "slug", str(tmp_path))
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_the_message_names_where_the_flag_was_set():
    with pytest.raises(EngineArgsError, match="^aphrodite_engine_args sets --max-num-seq,"):
        resolve({"max-num-seq": 1}, None, MODEL, "slug", None)
    with pytest.raises(EngineArgsError, match=f"^engine_args of {MODEL} in aphrodite_models sets --port,"):
        resolve(None, {"port": 1}, MODEL, "slug", None)


@pytest.mark.parametrize("value", [["a"], "enable-prefix-caching", 3])
def test_engine_args_must_be_a_mapping(value):
    with pytest.raises(EngineArgsError, match="must be a mapping of engine flag to value"):
        resolve(None, value, MODEL, "slug", None)


@pytest.mark.parametrize(
    ("keys", "args", "ok"),
    [
        ({"kv_cache_dtype": "fp8"}, {"kv-cache-dtype": "fp8"}, True),
        ({"kv_cache_dtype": "fp8"}, {"kv-cache-dtype": "auto"}, False),
        ({"enforce_eager": True}, {"enforce-eager": True}, True),
        ({"enforce_eager": False}, {"enforce-eager": True}, False),
        ({"kv_cache_dtype": None}, {"kv-cache-dtype": "fp8"}, True),
    ],
)
def test_a_flag_and_its_model_key_must_agree(keys, args, ok):
    if ok:
        resolve(None, args, MODEL, "slug", None, keys)
    else:
        with pytest.raises(EngineArgsError, match="they disagree, keep one"):
            resolve(None, args, MODEL, "slug", None, keys)


def test_no_plan_owned_or_secret_flag_can_be_set():
    for flag in SECRET_FLAGS | {"--model", "--port", "--host", "--nnodes", "--node-rank", "--master-addr",
                                "--master-port", "--headless", "--tensor-parallel-size", "--pipeline-parallel-size"}:
        with pytest.raises(EngineArgsError, match="which the plan owns"):
            resolve(None, {flag: "1"}, MODEL, "slug", None)


# --------------------------------------------------------------------------- files


def test_files_are_staged_under_the_model_and_the_argv_names_the_container_path(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "llama3.jinja").write_text("{{ messages }}")
    adapter = tmp_path / "adapters" / "sql-lora"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    resolved = resolve(None, {"chat-template": "templates/llama3.jinja", "lora-modules": {"sql": "adapters/sql-lora"}},
                       MODEL, "llama-3-1-8b", str(tmp_path))
    assert list(resolved.argv) == [
        "--chat-template", f"{CONTAINER_FILES_DIR}/llama-3-1-8b/chat-template/llama3.jinja",
        "--lora-modules", f"sql={CONTAINER_FILES_DIR}/llama-3-1-8b/lora/sql",
        "--enable-lora",
    ]
    assert [(f.source, f.path, f.kind) for f in resolved.files] == [
        (str(tmp_path / "templates" / "llama3.jinja"), "llama-3-1-8b/chat-template/llama3.jinja", "file"),
        (str(adapter), "llama-3-1-8b/lora/sql", "dir"),
    ]
    assert resolved.files[0].sha256 == content_digest(str(tmp_path / "templates" / "llama3.jinja"))


def test_a_changed_file_changes_its_digest(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "w").write_bytes(b"1")
    before = content_digest(str(adapter))
    (adapter / "w").write_bytes(b"2")
    assert content_digest(str(adapter)) != before


@pytest.mark.parametrize(
    ("lora", "extra", "message"),
    [
        ({"sql": "adapters/sql"}, {"enable-lora": False}, "sets enable-lora: false; drop one of them"),
        ({"sql": "adapters/sql"}, {}, "LoRA adapter sql has rank 64 (adapter_config.json) above --max-lora-rank 16"),
        ({"sql": "adapters/sql"}, {"max-lora-rank": 32}, "above --max-lora-rank 32; set max-lora-rank: 64"),
        ({"sql": "adapters/nothing"}, {}, "is not a directory on the controller"),
    ],
)
def test_lora_adapters_are_checked(tmp_path, lora, extra, message):
    adapter = tmp_path / "adapters" / "sql"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64}))
    with pytest.raises(EngineArgsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(None, {"lora-modules": lora, **extra}, MODEL, "slug", str(tmp_path))


def test_an_adapter_may_not_take_the_name_of_its_base_model(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(EngineArgsError, match="llama-8b, which is already the name clients use for the base model"):
        resolve(None, {"lora-modules": {"llama-8b": "a"}}, MODEL, "slug", str(tmp_path), {"served_model_name": "llama-8b"})


def test_lora_adapters_as_a_list_keep_their_names(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    rendered = argv_of({"lora-modules": ["one=a", {"name": "two", "path": "b"}], "enable-lora": True},
                       inventory_dir=str(tmp_path))
    assert rendered == ["--enable-lora", "--lora-modules", f"one={CONTAINER_FILES_DIR}/llama-3-1-8b/lora/one",
                        f"two={CONTAINER_FILES_DIR}/llama-3-1-8b/lora/two"]


# --------------------------------------------------------------------------- through the planner


def test_engine_args_reach_every_replica_after_the_planned_flags():
    result = plan(model("llama-3.1-8b-instruct", engine_args={"enable-prefix-caching": True, "max-num-seqs": 128}),
                  engine_args={"trust-remote-code": True, "max-num-seqs": 64})
    replicas = result.deployments[0][1]
    assert len(replicas) == 8
    for replica in replicas:
        argv = list(replica.argv)
        assert argv[argv.index("--max-num-seqs") + 1] == "128"
        assert argv[-2:] == ["--enable-prefix-caching", "--trust-remote-code"]
        flags = [a for a in argv if a.startswith("--")]
        assert len(flags) == len(set(flags))
        assert all(f in APHRODITE_FLAGS for f in flags)


def test_kv_cache_dtype_from_engine_args_changes_the_plan():
    plain = plan(model("llama-3.1-8b-instruct"))
    fp8 = plan(model("llama-3.1-8b-instruct", engine_args={"kv-cache-dtype": "fp8"}))
    assert fp8.deployments[0][1][0].kv_cache_tokens > plain.deployments[0][1][0].kv_cache_tokens
    assert "--kv-cache-dtype" in fp8.deployments[0][1][0].argv


def test_staged_files_appear_in_the_plan_json(tmp_path):
    (tmp_path / "models").mkdir()
    entry = model("llama-3.1-8b-instruct", engine_args={"chat-template": "t.jinja"})
    (tmp_path / "t.jinja").write_text("{{ x }}")
    replica = plan(entry, inventory_dir=str(tmp_path)).to_dict()["deployments"][0]["replicas"][0]
    assert replica["files"] == [{"source": str(tmp_path / "t.jinja"), "path": "llama-3-1-8b/chat-template/t.jinja",
                                 "kind": "file", "sha256": content_digest(str(tmp_path / "t.jinja"))}]
    assert "files" not in plan(model("llama-3.1-8b-instruct")).to_dict()["deployments"][0]["replicas"][0]


def test_bad_engine_args_are_plan_errors():
    with pytest.raises(PlanError, match="the nearest known flag is --max-num-seqs"):
        plan(model("llama-3.1-8b-instruct", engine_args={"max-num-seq": 1}))
    with pytest.raises(PlanError, match="aphrodite_engine_args sets --port"):
        plan(model("llama-3.1-8b-instruct"), engine_args={"port": 1})
