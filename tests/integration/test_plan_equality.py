"""`aphrodite-deploy plan --json` is the plan and the fleet model the preflight of site.yml publishes, on the same inventory.

The playbook side is the real playbooks/preflight.yml, run on this machine through
``ansible_connection: local`` under each inventory's host names, followed by a play that
writes ``hostvars['localhost'].aphrodite_plan`` to a file. This machine has no NVIDIA GPU:
gpu_facts reports none, and both sides plan from the declared facts (the test checks that
the plans are not empty). Both sides share one jsonfile fact cache in a temporary
directory: the CLI reads what the preflight cached, origin records included.

About 5 s per inventory, 25-30 s for the file, on 2 cores (ansible-playbook's start dominates).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ansible.parsing.vault import VaultLib, VaultSecret

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODELS = ROOT / "tests" / "data" / "models"
VAULT_PASSWORD = "equality-test-password"
H100 = "{count: 8, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}"

DUMP = """\
- name: Preflight
  ansible.builtin.import_playbook: {preflight}

- name: Dump the plan the preflight published
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write hostvars['localhost'].aphrodite_plan, with the fleet model beside it as `plan --json` prints it
      ansible.builtin.copy:
        content: "{{{{ hostvars['localhost'].aphrodite_plan | combine({{'fleet': hostvars['localhost'].aphrodite_fleet}}) | to_json }}}}"
        dest: "{{{{ aphrodite_test_plan_file }}}}"
        mode: "0644"
"""


def vaulted(value: str, indent: int) -> str:
    """An inline-vaulted YAML value encrypted with the test password."""
    text = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt(value).decode()
    pad = " " * indent
    return "!vault |\n" + "".join(f"{pad}{line}\n" for line in text.splitlines())


def generated_inventory(root: Path, objective: str | None) -> Path:
    """Templated variables, vaulted values (inline and a whole vaulted file), group and host precedence."""
    inventory = root / "inventory"
    for folder in ("group_vars/all", "host_vars", "models"):
        (inventory / folder).mkdir(parents=True)
    for name in ("llama-3.1-8b-instruct", "llama-3.1-70b-instruct"):
        shutil.copytree(MODELS / name, inventory / "models" / name)
    (inventory / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            gpu_nodes:
              hosts:
                node-a: {ansible_host: 10.9.0.1}
                node-b: {ansible_host: 10.9.0.2}
                node-c: {ansible_host: "{{ cluster_prefix }}.3"}
            loadbalancers:
              hosts:
                lb-a: {ansible_host: 10.9.0.9}
        """))
    (inventory / "group_vars" / "all" / "main.yml").write_text(textwrap.dedent(f"""\
        cluster_prefix: 10.9.0
        family: Llama-3.1
        context_tokens: 4096
        aphrodite_gpus_declared: {{count: 2, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}}
        aphrodite_models:
          - id: "meta-llama/{{{{ family }}}}-8B-Instruct"
            config: "models/{{{{ family | lower }}}}-8b-instruct/config.json"
            max_model_len: "{{{{ context_tokens }}}}"
            served_model_name: "{{{{ vault_served_name }}}}"
            replicas: 2
          - id: meta-llama/Llama-3.1-70B-Instruct
            config: models/llama-3.1-70b-instruct/config.json
            max_model_len: 8192
            served_model_name: big
        # Never read by the planner: a missing file must not stop the plan.
        engine_api_key: "{{{{ lookup('ansible.builtin.file', '/nonexistent/aphrodite/secret') }}}}"
        """) + (f"aphrodite_objective: {objective}\n" if objective else ""))
    secret_file = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt(
        "vault_served_name: chat-small\n").decode()
    (inventory / "group_vars" / "all" / "vault.yml").write_text(secret_file)
    # Group beats all, host beats group; the planning host (node-a, first of gpu_nodes) templates the models.
    (inventory / "group_vars" / "gpu_nodes.yml").write_text(textwrap.dedent(f"""\
        aphrodite_gpus_declared: {H100}
        aphrodite_bind_address: "{{{{ ansible_host }}}}"
        context_tokens: 16384
        """))
    (inventory / "host_vars" / "node-a.yml").write_text("context_tokens: 8192\n")
    (inventory / "host_vars" / "node-b.yml").write_text(
        "aphrodite_gpus_declared: {count: 4, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, interconnect: nvlink}\n"
        "aphrodite_bind_address: " + vaulted("10.9.1.2", 2))
    return inventory


def preflight(inventory: Path, work: Path, password_file: Path | None, *extra: str) -> tuple:
    """``(plan, output)`` of the real preflight, facts cached in ``work``/facts."""
    playbook = work / "dump.yml"
    playbook.write_text(DUMP.format(preflight=ROOT / "playbooks" / "preflight.yml"))
    plan_file = work / "plan.json"
    plan_file.unlink(missing_ok=True)  # a run whose dump play did not run must not pass with an older plan
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_CACHE_PLUGIN": "jsonfile",
           "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(work / "facts"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("ANSIBLE_CONFIG", None)
    command = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), "-e", "ansible_connection=local",
               "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"aphrodite_test_plan_file={plan_file}"]
    if password_file:
        command += ["--vault-password-file", str(password_file)]
    proc = subprocess.run(command + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(plan_file.read_text()), proc.stdout + proc.stderr


def preflight_plan(inventory: Path, work: Path, password_file: Path | None) -> dict:
    return preflight(inventory, work, password_file)[0]


def cli(inventory: Path, work: Path, password_file: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "APHRODITE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "aphrodite_deploy", "plan", "-i", str(inventory), "--json",
               "--fact-cache", str(work / "facts")]
    if password_file:
        command += ["--vault-password-file", str(password_file)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def cli_plan(inventory: Path, work: Path, password_file: Path | None) -> dict:
    proc = cli(inventory, work, password_file)
    # The preflight's facts were read, and their origin matched (no "are not used" note).
    assert "GPU facts come from none" in proc.stderr and "are not used" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def replicas(plan: dict) -> list:
    return [r for d in plan["deployments"] for r in d["replicas"]]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "inventories").iterdir() if p.is_dir()))
def test_the_repository_inventories(tmp_path: Path, name: str) -> None:
    inventory = ROOT / "inventories" / name
    published = preflight_plan(inventory, tmp_path, None)
    assert replicas(published), published  # a real plan, from the declared 8×H100 per node
    assert cli_plan(inventory, tmp_path, None) == published


@pytest.mark.parametrize("objective", [None, "latency"])
def test_templated_vaulted_and_layered_variables(tmp_path: Path, objective: str | None) -> None:
    inventory = generated_inventory(tmp_path, objective)
    password_file = tmp_path / "vault-password"
    password_file.write_text(VAULT_PASSWORD + "\n")
    published = preflight_plan(inventory, tmp_path, password_file)
    assert cli_plan(inventory, tmp_path, password_file) == published
    # What both sides agree on is the templated inventory, not an empty or literal plan.
    small, big = published["deployments"]
    assert small["model"] == "meta-llama/Llama-3.1-8B-Instruct" and len(small["replicas"]) == 2
    argv = " ".join(small["replicas"][0]["argv"])
    assert "--served-model-name chat-small" in argv and "--max-model-len 8192" in argv  # node-a's context_tokens
    assert "{{" not in json.dumps(published)
    hosts = {r["head"]: r for r in replicas(published)}
    node_b = [r for r in replicas(published) if "node-b" in r["placement"]]
    assert node_b and all(max(r["placement"]["node-b"]) < 4 for r in node_b)  # host_vars: 4 GPUs
    assert "--host 10.9.1.2" in " ".join(node_b[0]["argv"])  # the vaulted bind address
    if "node-c" in hosts:
        assert "--host 10.9.0.3" in " ".join(hosts["node-c"]["argv"])
    big_tp = {r["tensor_parallel_size"] for r in big["replicas"]}
    # aphrodite_objective reaches the planner: throughput fills the GPUs the TP 4 replicas leave with TP 2 ones
    assert big["objective"] == (objective or "throughput")
    assert big_tp == ({4} if objective == "latency" else {2, 4}), big_tp


def two_sites(root: Path) -> tuple:
    """Two inventories with hosts of the same names at other addresses (a lab and a site)."""
    made = []
    for name, prefix in (("lab", "172.28.10"), ("site", "10.20.1")):
        inventory = root / name
        (inventory / "group_vars").mkdir(parents=True)
        shutil.copytree(MODELS / "llama-3.1-8b-instruct", inventory / "models" / "llama-3.1-8b-instruct")
        (inventory / "hosts.yml").write_text(textwrap.dedent(f"""\
            all:
              children:
                gpu_nodes:
                  hosts:
                    gpu1: {{ansible_host: {prefix}.31}}
                    gpu2: {{ansible_host: {prefix}.32}}
            """))
        (inventory / "group_vars" / "gpu_nodes.yml").write_text(textwrap.dedent(f"""\
            aphrodite_gpus_declared: {H100}
            aphrodite_models:
              - id: meta-llama/Llama-3.1-8B-Instruct
                config: models/llama-3.1-8b-instruct/config.json
                max_model_len: 8192
            """))
        made.append(inventory)
    return tuple(made)


def test_facts_cached_for_another_inventory_are_not_used_by_either_side(tmp_path: Path) -> None:
    lab, site = two_sites(tmp_path)
    preflight(lab, tmp_path, None)  # caches gpu1 and gpu2 of the lab
    # The site's preflight limited to gpu2: gpu1's facts come from the cache, and are the lab's.
    # (localhost named too: the play that writes the plan runs there.)
    plan, output = preflight(site, tmp_path, None, "--limit", "gpu2,localhost")
    ignored = (f"gpu1: its gathered GPU facts are not used: they were gathered for gpu1 of inventory "
               f"{lab / 'hosts.yml'}, not of this inventory ({site / 'hosts.yml'})")
    assert ignored in " ".join(output.split()), output
    assert "gpu2: its gathered GPU facts are not used" not in output  # gathered by this run, for this site
    assert replicas(plan)
    # The CLI reads the same cache: gpu2's entry is now the site's, gpu1's still the lab's.
    proc = cli(site, tmp_path, None)
    assert f"warning: gpu1: the GPU facts cached in {tmp_path / 'facts' / 's1_gpu1'} are not used: they were gathered " \
           f"for gpu1 of inventory {lab / 'hosts.yml'}" in proc.stderr
    assert "gpu2: GPU facts come from none" in proc.stderr  # used: the origin matches
    assert json.loads(proc.stdout) == plan
