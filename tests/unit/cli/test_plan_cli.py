"""``aphrodite-deploy plan`` against inventories in a temporary directory: table, JSON, errors, facts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "tests" / "data" / "models"
H100 = "{count: 8, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}"
REPLICA_KEYS = ["argv", "est_concurrency", "est_decode_tokens_per_s", "head", "kv_cache_tokens", "max_num_seqs", "name",
                "pipeline_parallel_size", "placement", "port", "tensor_parallel_size", "weights_gib_per_gpu"]
LAYOUT_KEYS = ["chosen", "est_concurrency", "est_decode_tokens_per_s", "est_inter_token_ms",
               "est_inter_token_ms_at_min_concurrency", "est_tokens_per_s_per_gpu", "est_tokens_per_s_per_host", "gpu",
               "kv_cache_tokens", "max_num_seqs", "pipeline_parallel_size", "replicas_per_host", "tensor_parallel_size"]


def make_inventory(root: Path, models_yaml: str, *, gpu2: str | None = None) -> Path:
    inventory = root / "inventory"
    (inventory / "group_vars" / "all").mkdir(parents=True)
    (inventory / "host_vars").mkdir()
    for name in ("llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "llama-3.1-405b-instruct"):
        shutil.copytree(MODELS / name, inventory / "models" / name)
    (inventory / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            loadbalancers:
              hosts:
                lb1: {ansible_host: 10.0.0.9}
            gpu_nodes:
              hosts:
                gpu1: {ansible_host: 10.0.0.1}
                gpu2: {ansible_host: 10.0.0.2}
        """))
    (inventory / "group_vars" / "gpu_nodes.yml").write_text(f"aphrodite_gpus_declared: {H100}\n")
    (inventory / "group_vars" / "all" / "models.yml").write_text(models_yaml)
    # An inline-vaulted secret must neither break the plan nor reach argv.
    (inventory / "group_vars" / "all" / "vault.yml").write_text(textwrap.dedent("""\
        aphrodite_api_key: !vault |
          $ANSIBLE_VAULT;1.1;AES256
          31363764366164633061396266366630623563363963306632656161323761373366646262343361
          6263353263366235373637653061343363656362333137380a346233346462653038303937306632
          36623138656664633439376538616238316535356530306265376566303432353665623332626561
          3864616435613637380a646639623038663931393838316662396162323934353865626665343566
          3236
        """))
    if gpu2:
        (inventory / "host_vars" / "gpu2.yml").write_text(gpu2)
    return inventory


def run_cli(cwd: Path, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "APHRODITE_"))}
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "aphrodite_deploy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


MODELS_70B_AND_8B = textwrap.dedent("""\
    aphrodite_models:
      - id: meta-llama/Llama-3.1-70B-Instruct
        config: models/llama-3.1-70b-instruct/config.json
        max_model_len: 8192
        replicas: 2
      - id: meta-llama/Llama-3.1-8B-Instruct
        config: models/llama-3.1-8b-instruct/config.json
    """)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    make_inventory(root, MODELS_70B_AND_8B, gpu2="aphrodite_gpus_declared: {count: 4, name: NVIDIA H100 80GB HBM3, "
                                                  "memory_mib: 81559, interconnect: nvlink}\n")
    return root


def test_table_by_default(fleet):
    result = run_cli(fleet, "plan", "-i", "inventory")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("REPLICA"))
    assert header.split() == ["REPLICA", "MODEL", "TP", "PP", "GPUS", "PORT", "WEIGHTS/GPU", "KV", "TOKENS", "SEQS",
                              "DECODE", "TOK/S"]
    rows = [line.split() for line in lines if line.startswith(("llama-3-1-70b-", "llama-3-1-8b-"))]
    assert [row[0] for row in rows] == ["llama-3-1-70b-0", "llama-3-1-70b-1"] + [f"llama-3-1-8b-{i}" for i in range(4)]
    assert rows[0][1:6] == ["meta-llama/Llama-3.1-70B-Instruct", "4", "1", "gpu1[0-3]", "2242"]
    assert rows[0][-2:] == ["245", "~6,701"]  # est. concurrency and decode tokens/s of the replica
    # The 70B's second replica on the other host, never both on one: host_vars/gpu2.yml
    # declares its 4 GPUs; the 8B fills what is left of gpu1.
    assert rows[1][4:6] == ["gpu2[0-3]", "2242"]
    assert [row[4] for row in rows[2:]] == [f"gpu1[{i}]" for i in range(4, 8)]
    assert "Idle GPUs: gpu1: none; gpu2: none" in lines
    assert "aphrodite run --model meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4" in result.stdout
    # Why TP 4: the compared layouts, the chosen one first and starred.
    # Both hosts run a replica of it, so the layouts of both kinds of host (8 and 4 GPUs).
    compared = lines[lines.index("Layouts compared for meta-llama/Llama-3.1-70B-Instruct (objective throughput: tokens/s per host):") + 1:][:5]
    assert [line.split(",")[0].strip() for line in compared] == ["* TP 4", "* TP 4", "TP 2", "TP 8", "TP 2"]
    assert "2 per host" in compared[0] and "1 per host" in compared[1]
    assert "36,480 KV tokens, 17 seqs" in compared[2]
    assert result.stderr == ""


def test_json_is_exactly_the_contract(fleet):
    result = run_cli(fleet, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert sorted(plan) == ["deployments", "fleet", "idle_gpus"]
    fleet_model = plan.pop("fleet")
    assert fleet_model["plan"] == plan  # the model of this very plan, as preflight publishes it
    assert {h: v["address"] for h, v in fleet_model["hosts"].items()} == {"gpu1": "10.0.0.1", "gpu2": "10.0.0.2",
                                                                           "lb1": "10.0.0.9"}
    assert fleet_model["loadbalancers"]["members"] == [{"host": "lb1", "address": "10.0.0.9"}]
    assert [r["name"] for r in fleet_model["replicas"]] == [r["name"] for d in plan["deployments"] for r in d["replicas"]]
    assert [sorted(d) for d in plan["deployments"]] == [["layouts", "model", "objective", "replicas"]] * 2
    assert [d["objective"] for d in plan["deployments"]] == ["throughput"] * 2
    layouts = plan["deployments"][0]["layouts"]
    assert all(sorted(layout) == LAYOUT_KEYS for layout in layouts)
    # Those of gpu1's kind (8 GPUs), then gpu2's (4): the 70B runs on both.
    assert [(layout["tensor_parallel_size"], layout["replicas_per_host"], layout["chosen"]) for layout in layouts] == [
        (2, 4, False), (4, 2, True), (8, 1, False), (2, 2, False), (4, 1, True)]
    first = plan["deployments"][0]["replicas"][0]
    assert sorted(first) == REPLICA_KEYS
    assert first["name"] == "llama-3-1-70b-0" and first["head"] == "gpu1"
    assert first["placement"] == {"gpu1": [0, 1, 2, 3]} and first["port"] == 2242
    assert (first["max_num_seqs"], first["est_concurrency"]) == (1024, 245)
    assert first["est_decode_tokens_per_s"] > 0
    assert first["argv"][:2] == ["--model", "meta-llama/Llama-3.1-70B-Instruct"]
    assert plan["idle_gpus"] == {"gpu1": [], "gpu2": []}
    for deployment in plan["deployments"]:
        for replica in deployment["replicas"]:
            assert "--api-key" not in replica["argv"] and "$ANSIBLE_VAULT" not in " ".join(replica["argv"])


def test_infeasible_exits_2_with_one_paragraph(tmp_path):
    make_inventory(tmp_path, textwrap.dedent("""\
        aphrodite_models:
          - id: meta-llama/Llama-3.1-405B-Instruct
            config: models/llama-3.1-405b-instruct/config.json
            hosts: [gpu1]
        """))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message
    assert message.startswith("aphrodite-deploy plan: infeasible: Llama-3.1-405B-Instruct in bf16 needs 756 GiB of weights; "
                              "gpu1 offers 1 host × 8 × 79.6 GiB × 0.92 = 586 GiB")
    assert message.endswith("use FP8 quantization (382 GiB of weights), or add 1 more node like gpu1 (8 × NVIDIA H100 80GB HBM3).")


def test_multi_node_plan_when_the_model_needs_both_nodes(tmp_path):
    make_inventory(tmp_path, textwrap.dedent("""\
        aphrodite_models:
          - id: meta-llama/Llama-3.1-405B-Instruct
            config: models/llama-3.1-405b-instruct/config.json
        """))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    replica, = json.loads(result.stdout)["deployments"][0]["replicas"]
    assert (replica["tensor_parallel_size"], replica["pipeline_parallel_size"], replica["head"]) == (8, 2, "gpu1")
    assert list(replica["placement"]) == ["gpu1", "gpu2"]
    assert replica["argv"][-8:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29501"]


ADDRESSES = {"gpu1": "10.0.0.1", "gpu2": "10.0.0.2"}


def gpu_facts(count: int, source: str = "nvidia-smi", *, root: Path, host: str = "gpu1",
              inventory: Path | None = None, address: str | None = None) -> dict:
    """A cache entry as the preflight leaves it: gpu_facts' facts and where they were gathered."""
    origin = {"inventory": str(inventory or root / "inventory" / "hosts.yml"), "address": address or ADDRESSES[host]}
    return {"aphrodite_gpus_origin": origin, "aphrodite_gpus": {
        "source": source, "count": count, "mig_enabled": False, "nvswitch": False, "nvlink_groups": [list(range(count))],
        "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559 if source == "nvidia-smi" else None,
                  "numa_node": i // 4, "compute_capability": "9.0" if source == "nvidia-smi" else None} for i in range(count)],
    }, "ansible_hostname": host}


def test_gathered_facts_from_the_fact_cache_win_and_mismatches_are_reported(tmp_path):
    make_inventory(tmp_path, MODELS_70B_AND_8B)
    cache = tmp_path / "facts"
    cache.mkdir()
    (cache / "gpu1").write_text(json.dumps(gpu_facts(4, root=tmp_path)))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json", "--fact-cache", str(cache))
    assert result.returncode == 0, result.stderr
    assert "warning: gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs" in result.stderr
    plan = json.loads(result.stdout)
    assert plan["idle_gpus"] == {"gpu1": [], "gpu2": []}
    on_gpu1 = [g for d in plan["deployments"] for r in d["replicas"] for g in r["placement"].get("gpu1", [])]
    assert sorted(on_gpu1) == [0, 1, 2, 3]
    table = run_cli(tmp_path, "plan", "-i", "inventory", "--fact-cache", str(cache))
    assert "GPU facts gathered for gpu1; declared facts for the other hosts" in table.stdout


def test_fact_cache_defaults_to_ansible_cfg(tmp_path):
    make_inventory(tmp_path, MODELS_70B_AND_8B)
    (tmp_path / "ansible.cfg").write_text("[defaults]\nfact_caching = jsonfile\nfact_caching_connection = .ansible/facts\n"
                                          "[inventory]\nignore_patterns = ^models$\n")
    (tmp_path / ".ansible" / "facts").mkdir(parents=True)
    (tmp_path / ".ansible" / "facts" / "gpu2").write_text(json.dumps(gpu_facts(2, root=tmp_path, host="gpu2")))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    assert "gpu2: aphrodite_gpus_declared.count is 8, but the host has 2 GPUs" in result.stderr
    ignored = run_cli(tmp_path, "plan", "-i", "inventory", "--json", "--no-fact-cache")
    assert ignored.stderr == ""


def test_lspci_facts_without_a_declaration_are_refused(tmp_path):
    inventory = make_inventory(tmp_path, MODELS_70B_AND_8B)
    (inventory / "group_vars" / "gpu_nodes.yml").write_text("{}\n")
    (inventory / "host_vars" / "gpu1.yml").write_text(f"aphrodite_gpus_declared: {H100}\n")
    cache = tmp_path / "facts"
    cache.mkdir()
    (cache / "gpu2").write_text(json.dumps(gpu_facts(8, source="lspci", root=tmp_path, host="gpu2")))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--fact-cache", str(cache))
    assert result.returncode == 2
    assert "gpu2: GPU facts come from lspci" in result.stderr
    assert "declare aphrodite_gpus_declared for gpu2 or install the NVIDIA driver first" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "-i", "no-such-inventory"], "inventory no-such-inventory does not exist"),
        (["plan", "-i", "inventory", "--fact-cache", "nowhere"], "fact cache nowhere is not a directory"),
    ],
)
def test_unreadable_input_exits_1(fleet, args, message):
    result = run_cli(fleet, *args)
    assert result.returncode == 1
    assert message in result.stderr


def test_inventory_without_models_says_where_to_define_them(tmp_path):
    make_inventory(tmp_path, "other: 1\n")
    result = run_cli(tmp_path, "plan", "-i", "inventory")
    assert result.returncode == 1
    assert ("gpu1 (the first host of gpu_nodes, where the preflight plans) has no aphrodite_models; "
            "define the models in group_vars/all") in result.stderr


def test_plan_is_a_subcommand():
    result = run_cli(ROOT, "--help")
    assert result.returncode == 0
    assert "plan" in result.stdout
    missing = run_cli(ROOT, "plan")
    assert missing.returncode == 2 and "-i/--inventory" in missing.stderr


def ansible_2_19_cache_entry(facts: dict) -> str:
    """A jsonfile cache entry as ansible-core 2.19 writes it: a JSON payload whose strings may carry tags."""
    tagged = json.loads(json.dumps(facts))
    source = tagged["aphrodite_gpus"]["source"]
    tagged["aphrodite_gpus"]["source"] = {"value": source, "tags": [{"__ansible_type": "TrustedAsTemplate"}],
                                          "__ansible_type": "_AnsibleTaggedStr"}
    return json.dumps({"__payload__": json.dumps(tagged)})


def test_ansible_2_19_cache_files_with_a_prefix_are_read(tmp_path):
    make_inventory(tmp_path, MODELS_70B_AND_8B)
    (tmp_path / "ansible.cfg").write_text("[defaults]\nfact_caching = jsonfile\nfact_caching_connection = cache\n"
                                          "fact_caching_prefix = fleet_\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fleet_s1_gpu1").write_text(ansible_2_19_cache_entry(gpu_facts(4, root=tmp_path)))
    # Another host whose name ends like gpu1's must not be taken for it.
    (tmp_path / "cache" / "fleet_s1_old_gpu2").write_text(ansible_2_19_cache_entry(gpu_facts(1, root=tmp_path, host="gpu2")))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == ["warning: gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs"]
    declared_only = run_cli(tmp_path, "plan", "-i", "inventory", "--json", "--no-fact-cache")
    assert declared_only.returncode == 0 and declared_only.stderr == ""
    assert json.loads(declared_only.stdout) != json.loads(result.stdout)


def test_stale_cache_entries_are_ignored_and_said_so(tmp_path):
    make_inventory(tmp_path, MODELS_70B_AND_8B)
    (tmp_path / "ansible.cfg").write_text("[defaults]\nfact_caching = jsonfile\nfact_caching_connection = cache\n"
                                          "fact_caching_timeout = 60\n")
    (tmp_path / "cache").mkdir()
    entry = tmp_path / "cache" / "s1_gpu1"
    entry.write_text(ansible_2_19_cache_entry(gpu_facts(4, root=tmp_path)))
    os.utime(entry, (1_000_000_000, 1_000_000_000))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    assert "are older than fact_caching_timeout (60 s); ignored" in result.stderr
    assert entry.exists()  # read-only: never removed


def test_tagged_cache_values_are_unwrapped():
    sys.path.insert(0, str(ROOT))
    from aphrodite_deploy.inventory import _plain

    assert _plain({"a": {"value": [1, {"__ansible_unsafe": "x"}], "tags": [], "__ansible_type": "_AnsibleTaggedList"},
                   "v": {"__ansible_vault": "$ANSIBLE_VAULT;1.1"}, "e": {"__ansible_type": "EncryptedString"}}) == {
        "a": [1, "x"], "v": None, "e": None}


def test_engine_args_of_models_and_of_the_fleet_reach_argv(tmp_path):
    inventory = make_inventory(tmp_path, textwrap.dedent("""\
        aphrodite_engine_args:
          trust-remote-code: true
          max-num-seqs: 64
        aphrodite_models:
          - id: meta-llama/Llama-3.1-8B-Instruct
            config: models/llama-3.1-8b-instruct/config.json
            served_model_name: llama-8b
            replicas: 1
            engine_args:
              enable-prefix-caching: true
              max-num-seqs: 256
              chat-template: templates/llama3.jinja
        """))
    (inventory / "templates").mkdir()
    (inventory / "templates" / "llama3.jinja").write_text("{{ messages }}")
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    replica = json.loads(result.stdout)["deployments"][0]["replicas"][0]
    argv = replica["argv"]
    assert argv[argv.index("--served-model-name") + 1] == "llama-8b"
    assert argv[argv.index("--max-num-seqs") + 1] == "256"
    assert argv[-4:] == ["--chat-template", "/engine-files/llama-3-1-8b/chat-template/llama3.jinja",
                         "--enable-prefix-caching", "--trust-remote-code"]  # by flag name
    assert [f["path"] for f in replica["files"]] == ["llama-3-1-8b/chat-template/llama3.jinja"]
    assert replica["files"][0]["source"] == str((inventory / "templates" / "llama3.jinja").resolve())


@pytest.mark.parametrize(
    ("models_yaml", "message"),
    [
        ("aphrodite_engine_args: {max-num-seq: 8}\n" + MODELS_70B_AND_8B,
         "aphrodite_engine_args sets --max-num-seq, which aphrodite-engine 0.24.1 does not accept; "
         "the nearest known flag is --max-num-seqs"),
        ("aphrodite_engine_args: [enable-prefix-caching]\n" + MODELS_70B_AND_8B,
         "aphrodite_engine_args must be a mapping of engine flag to value"),
        (MODELS_70B_AND_8B + "    engine_args: {port: 8000}\n",
         "engine_args of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models sets --port, which the plan owns"),
        (MODELS_70B_AND_8B + "    engine_args: {tensor-parallel-size: 2}\n",
         "set tensor_parallel_size of the model in aphrodite_models"),
        (MODELS_70B_AND_8B + "    engine_args: {chat-template: templates/none.jinja}\n", "is not a file on the controller"),
        (MODELS_70B_AND_8B + "    max_model_len: -5\n",
         "max_model_len of meta-llama/Llama-3.1-8B-Instruct in aphrodite_models is -5; it must be a positive integer"),
    ],
)
def test_bad_engine_args_exit_2_with_one_paragraph(tmp_path, models_yaml, message):
    make_inventory(tmp_path, models_yaml)
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "\n" not in result.stderr.strip()
    assert message in result.stderr


@pytest.mark.parametrize(
    ("origin", "used", "why"),
    [
        ({}, True, None),
        ({"inventory": "/elsewhere/inventories/lab/hosts.yml"}, False,
         "they were gathered for gpu1 of inventory /elsewhere/inventories/lab/hosts.yml, not of this inventory "
         "({inventory})"),
        ({"address": "172.28.10.31"}, False,
         "they were gathered at address 172.28.10.31, and gpu1 is now at 10.0.0.1"),
        (None, False, "they carry no record of the inventory and address they were gathered from"),
    ],
    ids=["same inventory and address", "another inventory", "the host moved", "no origin"],
)
def test_cached_facts_count_only_for_the_inventory_and_address_they_were_gathered_from(tmp_path, origin, used, why):
    make_inventory(tmp_path, MODELS_70B_AND_8B)
    cache = tmp_path / "facts"
    cache.mkdir()
    entry = gpu_facts(4, root=tmp_path)
    if origin is None:
        del entry["aphrodite_gpus_origin"]
    else:
        entry["aphrodite_gpus_origin"].update(origin)
    (cache / "s1_gpu1").write_text(json.dumps(entry))
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json", "--fact-cache", str(cache))
    assert result.returncode == 0, result.stderr
    on_gpu1 = sorted(g for d in json.loads(result.stdout)["deployments"] for r in d["replicas"]
                     for g in r["placement"].get("gpu1", []))
    assert on_gpu1 == (list(range(4)) if used else list(range(8)))
    warnings = result.stderr.strip().splitlines()
    if used:
        assert warnings == ["warning: gpu1: aphrodite_gpus_declared.count is 8, but the host has 4 GPUs"]
    else:
        why = why.format(inventory=tmp_path / "inventory" / "hosts.yml")
        assert warnings == [f"warning: gpu1: the GPU facts cached in {cache / 's1_gpu1'} are not used: {why}; "
                            "it is planned from aphrodite_gpus_declared until the preflight gathers its facts again"]
        table = run_cli(tmp_path, "plan", "-i", "inventory", "--fact-cache", str(cache))
        assert "GPU facts: declared (aphrodite_gpus_declared); no gathered facts in the fact cache" in table.stdout


VAULT_PASSWORD = "plan-test-password"


def vaulted_models(tmp_path: Path) -> Path:
    """Models whose served name comes from a vaulted vars file (encrypted as a whole)."""
    from ansible.parsing.vault import VaultLib, VaultSecret

    inventory = make_inventory(tmp_path, textwrap.dedent("""\
        aphrodite_models:
          - id: meta-llama/Llama-3.1-8B-Instruct
            config: models/llama-3.1-8b-instruct/config.json
            served_model_name: "{{ vault_served_name }}"
        """))
    vault = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))])
    (inventory / "group_vars" / "all" / "secrets.yml").write_text(vault.encrypt("vault_served_name: chat\n").decode())
    (tmp_path / "password").write_text(VAULT_PASSWORD + "\n")
    return inventory


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--vault-password-file", "password"], {}),
        ([], {"APHRODITE_VAULT_PASSWORD": VAULT_PASSWORD}),
        ([], {"ANSIBLE_VAULT_PASSWORD_FILE": "password"}),
    ],
    ids=["--vault-password-file", "APHRODITE_VAULT_PASSWORD", "ANSIBLE_VAULT_PASSWORD_FILE"],
)
def test_vaulted_variables_are_decrypted_as_ansible_playbook_would(tmp_path, args, env):
    vaulted_models(tmp_path)
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json", *args, extra_env=env)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["deployments"][0]["replicas"][0]["argv"]
    assert argv[argv.index("--served-model-name") + 1] == "chat"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "pass --vault-password-file or set APHRODITE_VAULT_PASSWORD"),
        (["--vault-password-file", "password"], {"APHRODITE_VAULT_PASSWORD": VAULT_PASSWORD}, "not both"),
        (["--vault-password-file", "nowhere"], {}, "vault password file nowhere does not exist"),
    ],
    ids=["no password", "two passwords", "missing file"],
)
def test_vault_problems_exit_1_and_say_what_to_do(tmp_path, args, env, message):
    vaulted_models(tmp_path)
    result = run_cli(tmp_path, "plan", "-i", "inventory", *args, extra_env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("aphrodite-deploy plan: ") and message in result.stderr


def test_the_plan_uses_the_variables_of_the_host_the_preflight_plans_on(tmp_path):
    """The preflight evaluates aphrodite_models and aphrodite_objective once, on the first host of gpu_nodes."""
    inventory = make_inventory(tmp_path, textwrap.dedent("""\
        context: 4096
        aphrodite_models:
          - id: meta-llama/Llama-3.1-8B-Instruct
            config: models/llama-3.1-8b-instruct/config.json
            max_model_len: "{{ context }}"
        """))
    (inventory / "host_vars" / "gpu1.yml").write_text("context: 2048\naphrodite_objective: latency\n")
    (inventory / "host_vars" / "gpu2.yml").write_text("aphrodite_models: []\n")
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["deployments"][0]["replicas"][0]["argv"]
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert result.stderr.strip() == ("warning: aphrodite_models of gpu2 differs from gpu1's; the plan (as the "
                                     "preflight's) uses gpu1's: define it once, in group_vars/all")


def test_variables_the_planner_does_not_read_are_never_templated(tmp_path):
    inventory = make_inventory(tmp_path, MODELS_70B_AND_8B)
    (inventory / "group_vars" / "gpu_nodes.yml").write_text(
        f"aphrodite_gpus_declared: {H100}\n"
        "aphrodite_bind_address: \"{{ ansible_host }}\"\n"
        "engine_api_key: \"{{ lookup('ansible.builtin.file', '/nonexistent/engine_api_key') }}\"\n")
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 0, result.stderr
    head = json.loads(result.stdout)["deployments"][0]["replicas"][0]
    assert head["argv"][head["argv"].index("--host") + 1] == "10.0.0.1"


def test_a_variable_the_planner_reads_that_cannot_be_templated_exits_1(tmp_path):
    inventory = make_inventory(tmp_path, MODELS_70B_AND_8B)
    (inventory / "host_vars" / "gpu2.yml").write_text("aphrodite_bind_address: \"{{ no_such_variable }}\"\n")
    result = run_cli(tmp_path, "plan", "-i", "inventory", "--json")
    assert result.returncode == 1
    assert "a variable the planner reads cannot be templated" in result.stderr and "no_such_variable" in result.stderr
