"""Playbook runs through ansible-runner's Python API, the way every command of the CLI makes them.

- The playbooks come from the collection checkout (``--project-dir``; by default the
  checkout this package lives in, or the current directory when it holds ``site.yml``),
  and Ansible runs in that directory, so its ``ansible.cfg`` applies exactly as for
  ``ansible-playbook site.yml``: roles, collections, and the fact cache that ``plan`` reads
  (ansible-runner's own per-run fact cache is not used).
- Nothing secret is written: ``suppress_env_files`` keeps ansible-runner from writing
  ``env/`` (extra variables, environment, command line), the vault password reaches Ansible
  only as the path of a file or script (:mod:`.vault`), and the environment that
  ansible-runner records in ``artifacts/<ident>/command`` keeps only the values of
  Ansible's own variables.
- Artefacts (events, stdout) live under ``--artifacts-dir``, one directory per run, the
  newest ``--keep-artifacts`` kept.
- Host key checking stays as Ansible would do it (ansible-runner turns it off by default).
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .inventory import ansible_cfg

DEFAULT_KEEP = 20
ENV_ARTIFACTS = "APHRODITE_DEPLOY_ARTIFACTS"
ENV_PROJECT = "APHRODITE_DEPLOY_PROJECT"
# Environment values the artefacts keep; every other variable is recorded by name only.
_KEPT_ENV_PREFIXES = ("ANSIBLE_", "RUNNER_", "AWX_")
_KEPT_ENV_NAMES = ("PATH", "HOME", "USER", "LANG", "PYTHONPATH", "VIRTUAL_ENV")


class RunnerError(RuntimeError):
    """A run cannot start: what is missing and how to provide it."""


@dataclass
class RunResult:
    status: str  # successful, failed, canceled, timeout
    rc: int
    ident: str
    artifact_dir: Path
    duration: float
    stdout_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0


def find_project_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The collection checkout whose playbooks the CLI runs."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    elif os.environ.get(ENV_PROJECT):
        candidates.append(Path(os.environ[ENV_PROJECT]).expanduser())
    else:
        candidates += [Path(__file__).resolve().parent.parent, Path.cwd()]
    for candidate in candidates:
        if (candidate / "site.yml").is_file() and (candidate / "playbooks").is_dir():
            return candidate.resolve()
    where = ", ".join(str(c) for c in candidates)
    raise RunnerError(f"no aphrodite.baremetal checkout (site.yml and playbooks/) at {where}; "
                      f"run from a checkout or pass --project-dir (or set {ENV_PROJECT})")


def artifacts_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where runs keep their artefacts: --artifacts-dir, $APHRODITE_DEPLOY_ARTIFACTS, else the user's cache."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(ENV_ARTIFACTS):
        return Path(os.environ[ENV_ARTIFACTS]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser().resolve() / "aphrodite-deploy"


def host_key_checking(project_dir: Path) -> str:
    """Ansible's own setting (ansible-runner would turn checking off): environment, ansible.cfg, else on."""
    if "ANSIBLE_HOST_KEY_CHECKING" in os.environ:
        return os.environ["ANSIBLE_HOST_KEY_CHECKING"]
    cfg = ansible_cfg(project_dir)
    if cfg is not None:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(cfg)
            value = parser.get("defaults", "host_key_checking", fallback=None)
        except configparser.Error:
            value = None
        if value is not None:
            return value
    return "True"


def run_environment(project_dir: Path) -> dict[str, str]:
    """Variables every run gets on top of this process's environment."""
    env = {
        "ANSIBLE_HOST_KEY_CHECKING": host_key_checking(project_dir),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    # ansible-playbook from the same virtual environment as this CLI, even when it is not on PATH.
    here = Path(sys.executable).parent
    if (here / "ansible-playbook").exists():
        env["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")]).rstrip(os.pathsep)
    return env


def scrub_command_artifact(artifact_dir: Path) -> None:
    """Keep only Ansible's own variables' values in the environment ansible-runner recorded."""
    path = artifact_dir / "command"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    env = data.get("env")
    if isinstance(env, dict):
        data["env"] = {key: (value if key.startswith(_KEPT_ENV_PREFIXES) or key in _KEPT_ENV_NAMES else "<not recorded>")
                       for key, value in env.items()}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)


def run_playbook(
    playbook: str,
    *,
    inventory: str | os.PathLike[str],
    project_dir: Path,
    private_dir: Path,
    command: str,
    handlers: list[Callable[[dict[str, Any]], Any]],
    vault_args: list[str] | None = None,
    limit: str | None = None,
    tags: str | None = None,
    skip_tags: str | None = None,
    check: bool = False,
    diff: bool = False,
    extravars: dict[str, Any] | None = None,
    keep_artifacts: int = DEFAULT_KEEP,
    forks: int | None = None,
    timeout: int | None = None,
) -> RunResult:
    """Run ``playbook`` (relative to the project directory) and feed every event to ``handlers``."""
    import ansible_runner  # imported here: ``plan`` does not need it

    inventory_path = Path(inventory).expanduser()
    if not inventory_path.exists():
        raise RunnerError(f"inventory {inventory} does not exist")
    if not (project_dir / playbook).is_file():
        raise RunnerError(f"{project_dir / playbook} does not exist; is {project_dir} a complete checkout?")
    private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(private_dir, 0o700)
    cmdline = []
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    cmdline += vault_args or []
    ident = f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def on_event(event: dict[str, Any]) -> bool:
        for handler in handlers:
            handler(event)
        return True

    started = time.monotonic()
    runner = ansible_runner.run(
        private_data_dir=str(private_dir),
        project_dir=str(project_dir),
        playbook=playbook,
        inventory=str(inventory_path.resolve()),
        limit=limit or None,
        tags=tags or None,
        skip_tags=skip_tags or None,
        cmdline=shlex.join(cmdline) if cmdline else None,
        extravars=extravars or None,
        envvars=run_environment(project_dir),
        forks=forks,
        ident=ident,
        event_handler=on_event,
        quiet=True,
        rotate_artifacts=max(1, keep_artifacts),
        suppress_env_files=True,
        # Not "jsonfile": Ansible keeps the fact cache that ansible.cfg configures.
        fact_cache_type="ansible.cfg",
        timeout=timeout,
    )
    elapsed = time.monotonic() - started
    artifact_dir = Path(runner.config.artifact_dir)
    scrub_command_artifact(artifact_dir)
    tail = ""
    try:
        lines = (artifact_dir / "stdout").read_text(encoding="utf-8", errors="replace").splitlines()
        tail = "\n".join(lines[-15:])
    except OSError:
        pass
    return RunResult(status=str(runner.status), rc=int(runner.rc if runner.rc is not None else 1), ident=ident,
                     artifact_dir=artifact_dir, duration=elapsed, stdout_tail=tail)
