"""The fast path's contracts: what the fingerprint covers, and how site.yml uses it.

The fingerprint decides whether a host is skipped, so a missed input would silently leave
a change unapplied.  These tests hold the pieces to that: the fingerprint reacts to every
kind of input (in a real ansible-playbook run, templating and lookups included) and to
nothing volatile; every fact a role reads is covered; every stage play leaves the skipped
hosts out and every role declares what it manages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils import _fingerprint as fp

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
# Facts that roles gather themselves as probes of the host's state (package_facts, service_facts).
PROBE_FACTS = {"packages", "services"}
# Plays of site.yml that run on converged hosts too: they decide, verify or record.
NOT_STAGES = {"probe.yml", "preflight.yml", "fast_path.yml", "verify.yml", "record.yml"}


# --------------------------------------------------------------------------- pure parts
def test_stable_facts_keep_what_roles_read_and_drop_what_moves() -> None:
    facts = {
        "distribution": "Debian", "kernel": "6.1.0", "uptime_seconds": 12, "memfree_mb": 100,
        "default_ipv4": {"address": "10.0.0.5", "gateway": "10.0.0.1", "interface": "eth0", "macaddress": "x",
                         "broadcast": "10.0.0.255", "mtu": 1500, "type": "ether", "alias": "eth0"},
        "interfaces": ["lo", "eth0", "docker0", "veth1234abc", "br-5f2e"],
        "python": {"executable": "/usr/bin/python3", "version": {"major": 3}, "type": "cpython", "has_sslcontext": True},
        "all_ipv4_addresses": ["10.0.0.5", "10.0.0.100"],
        "date_time": {"epoch": "1"},
    }
    picked = fp.stable_facts(facts)
    assert set(picked) == {"distribution", "kernel", "default_ipv4", "interfaces", "python"}
    assert picked["interfaces"] == ["eth0", "lo"]
    assert set(picked["default_ipv4"]) == {"address", "gateway", "interface", "netmask", "network", "prefix"}
    assert set(picked["python"]) == {"executable", "version"}


@pytest.mark.parametrize("name, expected", [
    ("haproxy_api_keys", True), ("ansible_host", True), ("ansible_user", True), ("inventory_dir", True),
    ("aphrodite_fast_path", False), ("ansible_check_mode", False), ("ansible_run_tags", False),
    ("__engine_replace", False), ("ansible_distribution", False), ("ansible_facts", False), ("omit", False),
    ("playbook_dir", False), ("group_names", False),
    # set_fact cacheable in preflight: a variable on the first run, a cached fact on the next
    ("aphrodite_gpus_origin", False),
])
def test_which_variables_are_inputs(name: str, expected: bool) -> None:
    assert fp.is_input_variable(name, {"distribution": "Debian"}) is expected


def test_fingerprint_ignores_order_and_sees_every_change() -> None:
    hosts = {"a": {"vars": {"x": 1, "y": [1, 2]}, "facts": {}}, "b": {"vars": {}, "facts": {"kernel": "6"}}}
    groups = {"all": ["b", "a"], "gpu_nodes": ["a"]}
    base = fp.fingerprint(hosts, groups, {"deployments": []}, "code")
    assert base == fp.fingerprint(dict(reversed(list(hosts.items()))), {"gpu_nodes": ["a"], "all": ["a", "b"]},
                                  {"deployments": []}, "code")
    changed = [
        fp.fingerprint({**hosts, "a": {"vars": {"x": 2, "y": [1, 2]}, "facts": {}}}, groups, {"deployments": []}, "code"),
        fp.fingerprint({**hosts, "a": {"vars": {"x": 1, "y": [2, 1]}, "facts": {}}}, groups, {"deployments": []}, "code"),
        fp.fingerprint({**hosts, "b": {"vars": {}, "facts": {"kernel": "7"}}}, groups, {"deployments": []}, "code"),
        fp.fingerprint(hosts, {**groups, "gpu_nodes": ["a", "b"]}, {"deployments": []}, "code"),
        fp.fingerprint(hosts, groups, {"deployments": [1]}, "code"),
        fp.fingerprint(hosts, groups, {"deployments": []}, "code2"),
        fp.fingerprint({**hosts, "c": {"vars": {}, "facts": {}}}, groups, {"deployments": []}, "code"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_objects_without_json_form_count_by_type_not_address() -> None:
    class Marker:
        pass

    one = fp.fingerprint({"a": {"vars": {"x": Marker()}, "facts": {}}}, {}, None, "c")
    two = fp.fingerprint({"a": {"vars": {"x": Marker()}, "facts": {}}}, {}, None, "c")
    assert one == two


def test_code_digest_covers_roles_plugins_and_playbooks(tmp_path: Path) -> None:
    for rel in ("roles/r/tasks/main.yml", "plugins/filter/f.py", "playbooks/p.yml", "galaxy.yml", "tests/t.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    base = fp.code_digest(tmp_path)
    (tmp_path / "tests" / "t.py").write_text("y")  # not code the fleet runs
    (tmp_path / "plugins" / "filter" / "__pycache__").mkdir()
    (tmp_path / "plugins" / "filter" / "__pycache__" / "f.cpython-311.pyc").write_bytes(b"\0")
    assert fp.code_digest(tmp_path) == base
    for rel in ("roles/r/tasks/main.yml", "plugins/filter/f.py", "playbooks/p.yml", "galaxy.yml"):
        (tmp_path / rel).write_text("changed")
        assert fp.code_digest(tmp_path) != base, rel
        (tmp_path / rel).write_text("x")
    (tmp_path / "roles" / "r" / "templates").mkdir()
    (tmp_path / "roles" / "r" / "templates" / "new.j2").write_text("")
    assert fp.code_digest(tmp_path) != base


# --------------------------------------------------------------------------- a real run
PLAYBOOK = """
- name: Fingerprint
  hosts: all
  gather_facts: false
  tasks:
    - name: Print it
      ansible.builtin.debug:
        msg: "FP={{ hostvars | aphrodite.baremetal.fleet_fingerprint(groups['all'], groups, plan | default(none)) }}"
      run_once: true

    # A fact under its own name that changes every run, kept by the fact cache (as
    # package_facts' packages is): the next run sees last run's value among its variables.
    - name: Remember this run in the fact cache
      ansible.builtin.set_fact:
        seen_run: "{{ lookup('ansible.builtin.env', 'RUN_ID') }}"
        cacheable: true
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    inv = tmp_path / "inventory"
    (inv / "group_vars" / "all").mkdir(parents=True)
    (inv / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            loadbalancers:
              hosts:
                lb1: {ansible_connection: local, ansible_python_interpreter: "%s"}
            gpu_nodes:
              hosts:
                gpu1: {ansible_connection: local, ansible_python_interpreter: "%s", engine_port: 2242}
        """ % (sys.executable, sys.executable)))
    (tmp_path / "secret").write_text("s3cret-one")
    (inv / "group_vars" / "all" / "main.yml").write_text(textwrap.dedent("""\
        edge_key: "{{ lookup('ansible.builtin.file', inventory_dir ~ '/../secret') }}"
        derived: "{{ engine_port | default(0) + 1 }}"
        """))
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    # Not the checkout's (no lab inventory); a fact cache of its own.
    (tmp_path / "ansible.cfg").write_text(f"[defaults]\nfact_caching = jsonfile\nfact_caching_connection = {tmp_path / 'facts'}\n")
    return tmp_path


def fingerprint_of(project: Path, *args: str, run_id: str = "1") -> str:
    env = dict(os.environ, RUN_ID=run_id, ANSIBLE_COLLECTIONS_PATH=str(ROOT / "collections"), ANSIBLE_FORCE_COLOR="false",
               ANSIBLE_NOCOLOR="true", ANSIBLE_CONFIG=str(project / "ansible.cfg"))
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(project / "inventory"), str(project / "play.yml"), *args],
                          capture_output=True, text=True, env=env, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.findall(r"FP=([0-9a-f]{64})", proc.stdout)
    assert len(found) == 1, proc.stdout
    return found[0]


def test_fingerprint_in_a_real_run(project: Path) -> None:
    base = fingerprint_of(project)
    # The same inputs, whatever the run's own settings or what the fact cache kept of the last run.
    assert fingerprint_of(project, run_id="2") == base
    assert fingerprint_of(project, run_id="3") == base
    assert fingerprint_of(project, "--check", "--diff", "-e", "aphrodite_fast_path=false", "-v") == base
    # A variable, an extra variable, the plan, a variable that another one derives from.
    assert fingerprint_of(project, "-e", "engine_image=aphrodite:0.24.2") != base
    assert fingerprint_of(project, "-e", '{"plan": {"deployments": [1]}}') != base
    (project / "inventory" / "host_vars").mkdir()
    (project / "inventory" / "host_vars" / "gpu1.yml").write_text("engine_port: 2243\n")
    moved = fingerprint_of(project)
    assert moved != base
    # A secret read by a lookup: the file changes, the variable's text does not.
    (project / "secret").write_text("s3cret-two")
    assert fingerprint_of(project) != moved


def test_a_nested_template_that_needs_the_play_counts_by_its_text(project: Path) -> None:
    """A list of dicts whose string reads hostvars, as an Alertmanager receiver's URL does:
    another host's variables are templated without hostvars, lazily, item by item.  The run
    must not fail on it, the fingerprint must stay the same run to run, and an edit to the
    template must change it."""
    receivers = project / "inventory" / "group_vars" / "all" / "receivers.yml"
    receivers.write_text(textwrap.dedent("""\
        receivers:
          - name: hook
            url: "http://{{ hostvars[groups.loadbalancers[0]].inventory_hostname }}:9095/alerts"
        """))
    base = fingerprint_of(project)
    assert fingerprint_of(project, run_id="2") == base
    receivers.write_text(receivers.read_text().replace(":9095/", ":9096/"))
    assert fingerprint_of(project) != base


# --------------------------------------------------------------------------- contracts
def _role_sources() -> list[Path]:
    files = []
    for top in ("roles", "playbooks"):
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in (".yml", ".j2", ".yaml")]
    return files


def test_every_fact_the_roles_read_is_in_the_fingerprint() -> None:
    used = set()
    for path in _role_sources():
        used |= set(re.findall(r"ansible_facts(?:\.|\[['\"])([a-z_0-9]+)", path.read_text()))
        used |= {m for m in re.findall(r"\bansible_([a-z_0-9]+)", path.read_text())
                 if m in {"distribution", "kernel", "architecture", "os_family", "default_ipv4", "interfaces",
                          "hostname", "fqdn", "all_ipv4_addresses", "memtotal_mb", "processor_vcpus", "mounts"}}
    assert used, "found no fact use at all: the pattern is wrong"
    missing = used - set(fp.FACT_KEYS) - PROBE_FACTS
    assert not missing, (f"roles read facts the fast path's fingerprint leaves out: {sorted(missing)}; "
                         "add them to FACT_KEYS in plugins/module_utils/_fingerprint.py (stable parts only)")


def _site_plays() -> list[tuple[str, dict]]:
    site = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())
    plays = []
    for entry in site:
        name = entry["ansible.builtin.import_playbook"]
        for play in yaml.safe_load((ROOT / "playbooks" / name).read_text()):
            # A stage may import a decision play first (firewall.yml: the fleet model when
            # run alone); only its own plays are stages.
            if "hosts" in play:
                plays.append((name, play))
    return plays


def test_site_runs_probe_preflight_then_fast_path_first_and_records_last() -> None:
    names = [e["ansible.builtin.import_playbook"] for e in yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())]
    assert names[:3] == ["probe.yml", "preflight.yml", "fast_path.yml"] and names[-1] == "record.yml"


def test_one_round_trip_per_host_before_the_decision() -> None:
    """Up to the decision, the only task that reaches the hosts is the probe: the preflight
    reads GPUs itself only on the nodes the probe did not read (its play leaves the others
    out), and the fast path decides for the whole fleet in one task on the controller."""
    probe_play, = yaml.safe_load((ROOT / "playbooks" / "probe.yml").read_text())
    probe_task, = probe_play["tasks"]
    assert probe_task["aphrodite.baremetal.converged"]["state"] == "probe"
    assert set(probe_task["aphrodite.baremetal.converged"]["origin"]) == {"inventory", "address"}
    assert probe_task["register"] == "__aphrodite_probe" and probe_play["hosts"] == "all"
    preflight = yaml.safe_load((ROOT / "playbooks" / "preflight.yml").read_text())
    gpu_play = next(p for p in preflight if any("aphrodite.baremetal.gpu_facts" in t for t in p.get("tasks", [])))
    assert "rejectattr('__aphrodite_probe.ansible_facts.aphrodite_gpus', 'defined')" in gpu_play["hosts"]
    for play in preflight:
        if play is not gpu_play and "hosts" in play:
            assert all(t.get("run_once") for t in play["tasks"]), play["name"]
    fast, = yaml.safe_load((ROOT / "playbooks" / "fast_path.yml").read_text())
    assert all(task.get("run_once") for task in fast["tasks"]), "the decision is one task for the fleet, not one per host"
    modules = {k for task in fast["tasks"] for k in task if "." in k}
    assert modules == {"ansible.builtin.set_fact", "ansible.builtin.debug"}, modules


def _probe(parts: dict, drift=(), **extra) -> dict:
    return dict({"recorded_fingerprint": fp.digest_of_parts(parts), "recorded_at": "2026-12-05T10:00:00+00:00",
                 "recorded_inputs": {k: v[:16] for k, v in parts.items()}, "drift": None if drift is None else list(drift),
                 "reasons": []}, **extra)


def test_verdict_needs_the_same_inputs_and_no_drift() -> None:
    parts = {"collection code": "a" * 64, "facts of gpu1": "b" * 64, "variables of gpu1": "c" * 64}
    assert fp.verdict(_probe(parts), parts) == {"converged": True, "reasons": []}
    # GPUs, driver or topology: the facts of the host, so its inputs, differ.
    moved = dict(parts, **{"facts of gpu1": "d" * 64})
    result = fp.verdict(_probe(parts), moved)
    assert not result["converged"] and result["reasons"] == [
        "the inputs changed since 2026-12-05T10:00:00+00:00: facts of gpu1"]
    # A difference beyond the digits the probe returns is still a change.
    late = dict(parts, **{"facts of gpu1": "b" * 63 + "e"})
    assert not fp.verdict(_probe(parts), late)["converged"]
    assert fp.verdict(_probe(parts, drift=["common: /etc/x changed"]), parts) == {
        "converged": False, "reasons": ["common: /etc/x changed"]}
    # No record, no probe, the fast path off, a probe that did not compare: never converged.
    assert fp.verdict({"recorded_fingerprint": None, "reasons": ["nothing recorded yet (...)"]}, parts) == {
        "converged": False, "reasons": ["nothing recorded yet (...)"]}
    assert not fp.verdict(None, parts)["converged"]
    assert not fp.verdict({"skipped": True}, parts)["converged"]
    assert not fp.verdict(_probe(parts), parts, fast_path=False)["converged"]
    assert not fp.verdict(_probe(parts, drift=None), parts)["converged"]


STAGE_HOSTS = re.compile(r"^\{\{ \[('[a-z_]+'(, '[a-z_]+')*)\] \| aphrodite\.baremetal\.fast_path_hosts\(groups, hostvars \| default\(\{\}\)\) \}\}$")


def test_every_stage_play_leaves_the_skipped_hosts_out() -> None:
    """No worker per skipped host: every stage play takes its hosts through fast_path_hosts
    (a no-op run leaves each play with no host at all), none ends hosts one by one."""
    stages = [(name, play) for name, play in _site_plays() if name not in NOT_STAGES]
    assert len(stages) >= 10
    for name, play in stages:
        assert STAGE_HOSTS.match(play["hosts"]), f"{name}: {play['name']}: hosts {play['hosts']!r}"
        for task in (play.get("pre_tasks") or []) + (play.get("tasks") or []):
            assert task.get("ansible.builtin.meta") != "end_host", f"{name}: {play['name']}"
    verify = yaml.safe_load((ROOT / "playbooks" / "verify.yml").read_text())
    assert "fast_path_hosts(groups, hostvars | default({}))" in verify[0]["hosts"]
    assert "'verify' in ansible_run_tags" in verify[0]["hosts"] and "__aphrodite_fast_path" in verify[1]["hosts"]
    record, = yaml.safe_load((ROOT / "playbooks" / "record.yml").read_text())
    assert STAGE_HOSTS.match(record["hosts"])


STAGE_PLAYBOOK = """
- name: Decide (as playbooks/fast_path.yml does)
  hosts: all
  gather_facts: false
  tasks:
    - name: Decide
      ansible.builtin.set_fact:
        __aphrodite_fast_path: "{{ hostvars | aphrodite.baremetal.fast_path_decision(ansible_play_hosts, groups) }}"
      delegate_to: localhost
      delegate_facts: true
      run_once: true
      when: lookup('ansible.builtin.env', 'DECIDE') == 'yes'

- name: A stage
  hosts: "{{ ['loadbalancers', 'gpu_nodes'] | aphrodite.baremetal.fast_path_hosts(groups, hostvars | default({})) }}"
  gather_facts: false
  tasks:
    - name: Say who runs
      ansible.builtin.debug:
        msg: "RUNS={{ inventory_hostname }}"
"""


def _stage_run(project: Path, playbook: str, decide: bool) -> list[str]:
    (project / "stage.yml").write_text(playbook)
    env = dict(os.environ, DECIDE="yes" if decide else "no", ANSIBLE_COLLECTIONS_PATH=str(ROOT / "collections"),
               ANSIBLE_FORCE_COLOR="false", ANSIBLE_NOCOLOR="true", ANSIBLE_CONFIG=str(project / "ansible.cfg"))
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(project / "inventory"), str(project / "stage.yml")],
                          capture_output=True, text=True, env=env, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(set(re.findall(r"RUNS=(\w+)", proc.stdout)))


def test_a_stage_play_leaves_out_exactly_the_hosts_the_decision_skipped(project: Path) -> None:
    """In a real run: a probe that says converged (a record of these very inputs, no drift)
    leaves its host out of the stage play; no decision, every host runs; the stage play as
    a run's first play (a playbook run on its own, before hostvars exists) runs every host."""
    with_probe = STAGE_PLAYBOOK.replace("  tasks:\n    - name: Decide\n", """  tasks:
    - name: A probe of gpu1 that found its record of these inputs and no drift
      ansible.builtin.set_fact:
        __aphrodite_probe:
          recorded_fingerprint: "{{ hostvars | aphrodite.baremetal.fleet_fingerprint(groups['all'], groups) }}"
          recorded_inputs: {}
          drift: []
      when: inventory_hostname == 'gpu1'

    - name: Decide
""", 1)
    assert _stage_run(project, with_probe, decide=True) == ["lb1"]
    assert _stage_run(project, with_probe, decide=False) == ["gpu1", "lb1"]
    first = STAGE_PLAYBOOK[STAGE_PLAYBOOK.index("- name: A stage"):]
    assert _stage_run(project, first, decide=False) == ["gpu1", "lb1"]


def test_the_decision_for_the_fleet_names_why_hosts_run() -> None:
    from ansible_collections.aphrodite.baremetal.plugins.filter import converged as flt

    groups = {"all": ["lb1", "gpu1", "gpu2"], "gpu_nodes": ["gpu1", "gpu2"], "loadbalancers": ["lb1"]}
    hostvars = {"lb1": {}, "gpu1": {}, "gpu2": {}}
    inputs = flt.fleet_inputs(hostvars, groups["all"], groups)
    hostvars["gpu1"]["__aphrodite_probe"] = _probe(inputs)
    hostvars["gpu2"]["__aphrodite_probe"] = _probe(inputs, drift=["engine: unit x is inactive, was active"])
    decision = flt.fast_path_decision(hostvars, ["lb1", "gpu1", "gpu2"], groups)
    assert decision["inputs"] == inputs
    assert decision["skipped"] == ["gpu1"] and decision["running"] == ["lb1", "gpu2"]
    assert decision["summary"] == [
        "1 of 3 host(s) unchanged since their last complete run, skipped: gpu1",
        "lb1 runs every task: the host was not probed in this run",
        "gpu2 runs every task: engine: unit x is inactive, was active"]
    off = flt.fast_path_decision(hostvars, ["gpu1"], groups, None, False)
    assert off["skipped"] == [] and off["verdicts"]["gpu1"]["reasons"] == ["the fast path is off (aphrodite_fast_path=false)"]
    # The stage plays' hosts: group order, no repeats, the skipped ones out; no decision, all.
    hostvars["localhost"] = {"__aphrodite_fast_path": decision}
    assert flt.fast_path_hosts(["loadbalancers", "gpu_nodes", "all"], groups, hostvars) == ["lb1", "gpu2"]
    assert flt.fast_path_hosts("gpu_nodes", groups, {}) == ["gpu1", "gpu2"]
    assert flt.fast_path_hosts(["nfs_servers"], groups, hostvars) == []
    with pytest.raises(Exception, match="groups"):
        flt.fast_path_hosts(["all"], None, hostvars)


def test_inputs_refreshed_after_the_gpu_stage_change_only_those_facts_and_the_plan() -> None:
    """After a driver install the GPU stage fingerprints again the re-read nodes' facts and the new
    plan, and nothing the run set meanwhile (a group_by group, a set_fact): the record then equals
    what the next run fingerprints at its start."""
    from ansible_collections.aphrodite.baremetal.plugins.filter import converged as flt

    groups = {"all": ["lb1", "gpu1", "gpu2"], "gpu_nodes": ["gpu1", "gpu2"]}
    lspci = {"source": "lspci", "count": 8}
    smi = {"source": "nvidia-smi", "count": 8, "driver_version": "550.90.07"}
    before = {"lb1": {}, "gpu1": {"ansible_facts": {"aphrodite_gpus": lspci}},
              "gpu2": {"ansible_facts": {"aphrodite_gpus": smi}}}
    started = flt.fleet_inputs(before, groups["all"], groups, {"plan": "declared"})
    # During the run: gpu1's driver installed, a group made and a fact set.
    during = {"lb1": {}, "gpu1": {"ansible_facts": {"aphrodite_gpus": smi}, "nvidia_driver_reboot_pending": False},
              "gpu2": {"ansible_facts": {"aphrodite_gpus": smi}}}
    refreshed = flt.fleet_inputs_refreshed(started, during, ["gpu1"], {"plan": "gathered"})
    changed = sorted(k for k in refreshed if refreshed[k] != started[k])
    assert changed == ["engine plan", "facts of gpu1"]
    # What the next run fingerprints at its start, with the facts as they now are.
    after = {"lb1": {}, "gpu1": {"ansible_facts": {"aphrodite_gpus": smi}}, "gpu2": {"ansible_facts": {"aphrodite_gpus": smi}}}
    assert refreshed == flt.fleet_inputs(after, groups["all"], groups, {"plan": "gathered"})
    with pytest.raises(Exception, match="this run's inputs"):
        flt.fleet_inputs_refreshed(None, during, ["gpu1"])


def test_every_role_site_runs_declares_what_it_manages() -> None:
    entry_points = set()
    for _, play in _site_plays():
        for role in play.get("roles") or []:
            entry_points.add((role["role"].split(".")[-1], "main"))
        for task in (play.get("tasks") or []):
            for key in ("ansible.builtin.import_role", "ansible.builtin.include_role"):
                if key in task:
                    name = task[key]["name"].split(".")[-1]
                    entry_points.add((name, Path(task[key].get("tasks_from", "main")).stem))
    entry_points.discard(("engine", "replace"))  # replaces what the engine role declared
    entry_points.discard(("engine", "maintenance"))  # takes replicas out and back; their roles declared
    assert ("monitoring", "exporters") in entry_points and ("haproxy", "main") in entry_points
    for role, entry in sorted(entry_points):
        tasks = yaml.safe_load((ROOT / "roles" / role / "tasks" / f"{entry}.yml").read_text())
        last = tasks[-1]
        assert "ansible.builtin.set_fact" in last, f"roles/{role}/tasks/{entry}.yml must end declaring __aphrodite_watch"
        assert "__aphrodite_watch" in last["ansible.builtin.set_fact"], f"roles/{role}/tasks/{entry}.yml"


def _tags(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        tags = node.get("tags")
        found |= {tags} if isinstance(tags, str) else set(map(str, tags or []))
        for value in node.values():
            found |= _tags(value)
    elif isinstance(node, list):
        for value in node:
            found |= _tags(value)
    return found


def test_record_knows_every_tag_that_makes_a_run_partial() -> None:
    files = list((ROOT / "roles").glob("*/tasks/*.yml")) + list((ROOT / "roles").glob("*/handlers/*.yml"))
    files += list((ROOT / "playbooks").glob("*.yml"))
    used = set().union(*(_tags(yaml.safe_load(p.read_text())) for p in files)) - {"always"}
    record, = yaml.safe_load((ROOT / "playbooks" / "record.yml").read_text())
    assert set(record["vars"]["__record_site_tags"]) == used, (
        "playbooks/record.yml must list exactly the collection's tags: skipping one of them makes a run partial")


def test_fingerprint_parts_name_each_input() -> None:
    hosts = {"gpu1": {"vars": {"x": 1}, "facts": {"kernel": "6"}}, "lb1": {"vars": {}, "facts": {}}}
    parts = fp.fingerprint_parts(hosts, {"all": ["gpu1", "lb1"]}, None, "code")
    assert set(parts) == {"collection code", "inventory groups", "engine plan",
                          "variables of gpu1", "facts of gpu1", "variables of lb1", "facts of lb1"}
    moved = fp.fingerprint_parts({**hosts, "gpu1": {"vars": {"x": 2}, "facts": {"kernel": "6"}}},
                                 {"all": ["gpu1", "lb1"]}, None, "code")
    assert [k for k in parts if parts[k] != moved[k]] == ["variables of gpu1"]
    assert fp.fingerprint(hosts, {"all": ["gpu1", "lb1"]}, None, "code") == fp.digest_of_parts(parts)


def test_facts_injected_under_their_own_names_are_no_inputs() -> None:
    facts = {"packages": {"haproxy": [{"version": "2.8"}]}, "services": {}, "gather_subset": ["all"], "kernel": "6"}
    assert fp.is_injected_fact("packages", {"haproxy": [{"version": "2.8"}]}, facts)
    assert fp.is_injected_fact("gather_subset", ["all"], facts)
    # An inventory variable that shares a fact's name, with its own value, still counts.
    assert not fp.is_injected_fact("kernel", "pinned-6.8", facts)
    assert not fp.is_injected_fact("engine_image", "x", facts)
