"""What each stage tag of site.yml runs: the README's promise that ``--tags edge`` runs the edge.

A tag selects tasks; ``always`` selects a task under every tag, and so does a dynamic
include tagged ``always`` for everything it includes.  Such a task in a role runs on the
hosts of another stage whenever any stage is asked for (it once installed packages on the
GPU nodes under ``--tags edge``).  These tests ask ``ansible-playbook --list-tasks`` (which
contacts no host) what each stage tag selects, and check every task that is not the
stage's own against the read-only exceptions below.  Whether a task changes a host is read
from the task files themselves: its module, its ``changed_when``, and, for a dynamic
include that ``--list-tasks`` cannot expand, everything the included files hold.

What legitimately runs under every stage tag, read-only (README.md, "What site.yml does"):

* the probe (playbooks/probe.yml), first: each host's one call, which gathers its facts,
  its GPU facts and its managed state and reads its record;
* the plan (playbooks/preflight.yml): the plan and its asserts (GPU facts when the probe
  has none);
* the fast path (playbooks/fast_path.yml): the fingerprint and the decision from each
  host's probe (the stage plays then leave the unchanged hosts out of their ``hosts``);
* Ansible's own argument validation of each role (``validate_argument_spec``, which Ansible
  tags ``always`` itself), and the fact gathering of a play without a tag of its own (which
  ``--list-tasks`` does not show; ansible.cfg's ``gathering = smart`` answers it from the
  fast path's facts);
* under ``--tags verify`` only: each role's own checks (its tasks tagged ``verify``) and the
  read-only parts of its preflight those checks read: the firewall's rule-set digest,
  HAProxy's private address, the platform data and package facts of nvidia_driver and
  container_runtime.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
NAMESPACE = "aphrodite.baremetal."

# The tag that selects each playbook of site.yml is its name, but preflight's is plan; the
# plan and the fast path also run under every other tag, the record only in a complete run.
STAGE_TAG = {"preflight": "plan", "fleet_model": "plan", "link_tls": "engines"}
EVERY_TAG = {"probe", "preflight", "fleet_model", "fast_path"}
STAGES = ["plan", "common", "firewall", "gpu_hosts", "storage", "engines", "edge", "monitoring", "logs", "verify"]

# Modules that only read (facts, checks, messages, flow).
READS = {
    "ansible.builtin." + m for m in (
        "assert", "debug", "fail", "set_fact", "include_vars", "setup", "gather_facts", "package_facts",
        "service_facts", "stat", "slurp", "find", "getent", "wait_for", "meta", "validate_argument_spec")
} | {"aphrodite.baremetal.gpu_facts", "community.docker.docker_host_info", "community.docker.docker_image_info",
     "community.docker.docker_container_info"}
# Modules that run anything: they read only when the task says it changes nothing (uri: or GETs).
RUNS = {"ansible.builtin." + m for m in ("command", "shell", "raw", "script", "uri")}
# Modules that put software (or where it comes from) on a host.
INSTALLS = {
    "ansible.builtin." + m for m in (
        "apt", "package", "dnf", "yum", "pip", "get_url", "unarchive", "deb822_repository", "apt_repository",
        "apt_key", "yum_repository", "rpm_key", "dpkg_selections")
} | {"community.general.npm", "community.general.pipx"}
INCLUDES = {"ansible.builtin." + m for m in ("include_tasks", "import_tasks", "include_role", "import_role")}
VALIDATION = "Validating arguments against arg spec"


# --------------------------------------------------------------------------- what a task does
def module_of(task: dict) -> str:
    """The module a task calls: the one key with a collection's dots (the collection uses FQCNs)."""
    modules = [key for key in task if "." in key]
    assert len(modules) == 1, f"task {task.get('name')!r} calls {modules or 'no FQCN module'}"
    return modules[0]


def _tasks_of(node: list | None) -> Iterator[dict]:
    """Every task of a task list, those inside blocks (and their rescue/always) included."""
    for task in node or []:
        if "block" in task:
            for part in ("block", "rescue", "always"):
                yield from _tasks_of(task.get(part))
        else:
            yield task


def _included_files(task: dict, module: str, tasks_dir: Path) -> list[Path]:
    """The files an include or import may load; a templated name stands for every match."""
    args = task[module]
    if module.endswith("_role"):
        role = re.sub(r"\{\{.*?\}\}", "*", args["name"].removeprefix(NAMESPACE))
        tasks_from = Path(re.sub(r"\{\{.*?\}\}", "*", args.get("tasks_from", "main"))).stem
        found = sorted((ROOT / "roles").glob(f"{role}/tasks/{tasks_from}.yml"))
        assert found, f"{tasks_dir}: role {args['name']} tasks_from {args.get('tasks_from', 'main')} includes no file"
        return found
    name = args if isinstance(args, str) else args["file"]
    pattern = re.sub(r"\{\{.*?\}\}", "*", name.removeprefix("tasks/"))
    found = sorted(tasks_dir.glob(pattern))
    assert found, f"{tasks_dir}: {name} includes no file"
    return found


def changes(task: dict, tasks_dir: Path, seen: frozenset[Path] = frozenset()) -> set[str]:
    """The modules by which a task (an include: any task it may load) changes a host; empty if it only reads."""
    module = module_of(task)
    if module in INCLUDES:
        found: set[str] = set()
        for path in _included_files(task, module, tasks_dir):
            if path not in seen:
                for sub in _tasks_of(yaml.safe_load(path.read_text())):
                    found |= changes(sub, path.parent, seen | {path})
        return found
    if module in READS:
        return set()
    if module == "aphrodite.baremetal.converged":
        return {module} if task[module].get("state") == "record" else set()
    if module in RUNS and task.get("changed_when") is False:
        return set()
    if module == "ansible.builtin.uri" and str(task[module].get("method", "GET")).upper() in ("GET", "HEAD") \
            and "dest" not in task[module]:
        return set()
    return {module}


@cache
def task_index() -> dict[tuple[str, str], set[str]]:
    """(role or '', task name) -> how it changes a host, for every task the collection's files name.

    A name used twice in one role counts as the union of both: never less than the truth.
    """
    index: dict[tuple[str, str], set[str]] = {}
    sources = [(p.parts[-3], p) for p in (ROOT / "roles").glob("*/tasks/*.yml")]
    sources += [("", p) for p in (ROOT / "playbooks").glob("*.yml")]
    for owner, path in sources:
        data = yaml.safe_load(path.read_text()) or []
        task_lists = [data] if owner else [play.get(k) for play in data for k in ("pre_tasks", "tasks", "post_tasks")
                                           if "hosts" in play]
        for tasks in task_lists:
            for task in _tasks_of(tasks):
                index.setdefault((owner, task.get("name", "")), set()).update(changes(task, path.parent))
    return index


@pytest.mark.parametrize("task, expected", [
    ({"name": "x", "ansible.builtin.apt": {"name": "pciutils"}}, {"ansible.builtin.apt"}),
    ({"name": "x", "ansible.builtin.command": {"argv": ["nvidia-smi"]}, "changed_when": False}, set()),
    ({"name": "x", "ansible.builtin.command": {"argv": ["nvidia-smi"]}}, {"ansible.builtin.command"}),
    ({"name": "x", "ansible.builtin.template": {"src": "a", "dest": "b"}}, {"ansible.builtin.template"}),
    ({"name": "x", "ansible.builtin.uri": {"url": "http://a/-/ready"}}, set()),
    ({"name": "x", "ansible.builtin.uri": {"url": "http://a/x", "method": "POST"}}, {"ansible.builtin.uri"}),
    ({"name": "x", "ansible.builtin.uri": {"url": "http://a/x", "dest": "/tmp/x"}}, {"ansible.builtin.uri"}),
    ({"name": "x", "aphrodite.baremetal.converged": {"inputs": {}}}, set()),
    ({"name": "x", "aphrodite.baremetal.converged": {"state": "record"}}, {"aphrodite.baremetal.converged"}),
    ({"name": "x", "ansible.builtin.include_tasks": {"file": "tools_{{ __nvidia_driver_pkg_mgr }}.yml"}},
     {"ansible.builtin.apt", "ansible.builtin.dnf"}),
    ({"name": "x", "ansible.builtin.include_tasks": "state.yml"}, set()),
])
def test_a_task_changes_a_host_by_its_module_and_what_it_includes(task: dict, expected: set[str]) -> None:
    assert changes(task, ROOT / "roles" / "nvidia_driver" / "tasks") == expected


# --------------------------------------------------------------------------- what a tag runs
@dataclass(frozen=True)
class Listed:
    """A task that --list-tasks shows, in the play it shows it under."""

    playbook: str  # playbooks/<playbook>.yml holds the play
    play: str
    role: str  # '' for a play's own task
    name: str
    tags: frozenset[str]

    @property
    def stage(self) -> str:
        return STAGE_TAG.get(self.playbook, self.playbook)

    def __str__(self) -> str:
        return f"{self.playbook}.yml {self.play!r}: {self.role + ' : ' if self.role else ''}{self.name}"


def _site_plays(name: str = "site.yml") -> list[tuple[str, str]]:
    """(playbook, play name) of every play site.yml runs, imports inside a stage expanded."""
    plays = []
    for entry in yaml.safe_load((ROOT / "playbooks" / name).read_text()):
        if "ansible.builtin.import_playbook" in entry:
            plays += _site_plays(entry["ansible.builtin.import_playbook"])
        else:
            plays.append((Path(name).stem, entry["name"]))
    return plays


PLAY_LINE = re.compile(r"^  play #(\d+) \((.*?)\): (.*)\tTAGS: \[.*\]$")
TASK_LINE = re.compile(r"^      (?:(\S+) : )?(.*)\tTAGS: \[(.*)\]$")


def parse(output: str) -> list[Listed]:
    plays = _site_plays()
    listed, play = [], None
    for line in output.splitlines():
        if match := PLAY_LINE.match(line):
            play = plays[int(match[1]) - 1]
            assert play[1] == match[3], f"play #{match[1]} is {match[3]!r}, site.yml's is {play[1]!r}"
        elif match := TASK_LINE.match(line):
            assert play is not None, line
            role = (match[1] or "").removeprefix(NAMESPACE)
            listed.append(Listed(play[0], play[1], role, match[2], frozenset(t.strip() for t in match[3].split(","))))
    return listed


def _list_tasks(args: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="true", ANSIBLE_FORCE_COLOR="false")
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "site.yml", "-i", "inventories/lab", "--list-tasks", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return args, proc.stdout


# --skip-tags TAG drops exactly the tasks that carry TAG: one real run shows it, the
# full run's tags show it for every other stage.
SKIP_SAMPLE = ("--skip-tags", "gpu_hosts")
RUNS_ASKED = [()] + [("--tags", tag) for tag in STAGES] + [SKIP_SAMPLE]


@pytest.fixture(scope="module")
def listings() -> dict[tuple[str, ...], list[Listed]]:
    """Every listing at once: each is one ansible-playbook start (about 2 s), and they run side by side."""
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        done = list(pool.map(_list_tasks, RUNS_ASKED))
    return {args: parse(out) for args, out in done}


def exception(task: Listed, tag: str) -> str | None:
    """Why a task of another stage may run under ``--tags tag`` (the module docstring's list), or None."""
    if task.playbook in EVERY_TAG:
        return "the plan and the fast path run under every tag"
    if task.name.startswith(VALIDATION):
        return "Ansible validates each role's arguments under every tag"
    if tag == "verify" and "verify" in task.tags:
        return "a role's own checks, and the preflight facts they read, run under --tags verify"
    return None


def _changes_of(task: Listed) -> set[str]:
    if task.name.startswith(VALIDATION):
        return set()
    key = (task.role, task.name)
    assert key in task_index(), (
        f"{task}: no task of that name in roles/{task.role or '../playbooks'}; give the task a name of its own")
    return task_index()[key]


@pytest.mark.parametrize("tag", STAGES)
def test_a_stage_tag_runs_only_its_stage_and_the_read_only_exceptions(listings, tag: str) -> None:
    strays = [str(t) for t in listings[("--tags", tag)] if t.stage != tag and exception(t, tag) is None]
    assert not strays, (f"--tags {tag} runs tasks of other stages that no exception in tests/unit/test_tags.py allows: "
                        + "; ".join(strays))


@pytest.mark.parametrize("tag", STAGES)
def test_nothing_outside_its_stage_changes_a_host(listings, tag: str) -> None:
    wrong = {str(t): _changes_of(t) for t in listings[("--tags", tag)] if t.stage != tag}
    installs = {task: mods for task, mods in wrong.items() if mods & INSTALLS}
    assert not installs, (f"--tags {tag} installs packages outside its stage: "
                          + "; ".join(f"{task} ({', '.join(sorted(mods))})" for task, mods in installs.items())
                          + ". Tag the task with its own stage only (no `always`, no `always` on the include).")
    changing = {task: mods for task, mods in wrong.items() if mods}
    assert not changing, (f"--tags {tag} changes hosts outside its stage: "
                          + "; ".join(f"{task} ({', '.join(sorted(mods))})" for task, mods in changing.items()))


@pytest.mark.parametrize("tag", STAGES)
def test_a_stage_tag_runs_its_whole_stage(listings, tag: str) -> None:
    whole = [t for t in listings[()] if t.stage == tag]
    under_tag = set(listings[("--tags", tag)])
    assert whole, f"no play of site.yml belongs to stage {tag}"
    missing = [str(t) for t in whole if t not in under_tag]
    assert not missing, f"--tags {tag} leaves out tasks of its own stage: " + "; ".join(missing)


def test_skip_tags_drops_exactly_the_tasks_that_carry_the_tag(listings) -> None:
    tag = SKIP_SAMPLE[1]
    assert listings[SKIP_SAMPLE] == [t for t in listings[()] if tag not in t.tags]


@pytest.mark.parametrize("tag", STAGES)
def test_skipping_a_stage_skips_all_it_changes(listings, tag: str) -> None:
    left = [str(t) for t in listings[()] if t.stage == tag and tag not in t.tags and _changes_of(t)]
    assert not left, f"--skip-tags {tag} still runs: " + "; ".join(left)


def test_the_full_run_lists_every_stage_and_the_record(listings) -> None:
    full = listings[()]
    # A stage counts by its own tasks, not by the skip and the validation every stage play lists.
    stages = {t.stage for t in full if t.playbook in EVERY_TAG or exception(t, "") is None}
    missing = (set(STAGES) | {"fast_path", "record"}) - stages
    assert not missing, f"a run without tags lists no task of {sorted(missing)}"
    assert [t.name for t in full if t.playbook == "record"] == ["Record the fingerprint and the managed state"]
    # Every play of site.yml is listed (parse checks their order and names).
    assert {(t.playbook, t.play) for t in full} == set(_site_plays())
