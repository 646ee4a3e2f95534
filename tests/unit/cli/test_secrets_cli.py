"""No secret reaches argv, ansible-runner's env files or the artefacts; artefacts are rotated.

Real ansible-runner runs of a small local project: a vaulted variable, used by a no_log
task, decrypted with a vault password file or with APHRODITE_VAULT_PASSWORD; afterwards
every file the run left is searched for the password and the secret.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _eventlib import ROOT

from aphrodite_deploy.runner import host_key_checking, scrub_command_artifact
from aphrodite_deploy.vault import ENV_PASSWORD, VaultError, VaultSecrets, take_env_password

PASSWORD = "fake-vault-password-" + secrets.token_hex(8)
SECRET = "engine-key-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secrets")
    (root / "playbooks").mkdir()
    (root / "site.yml").write_text(textwrap.dedent("""\
        - name: Use the vaulted key
          hosts: all
          gather_facts: false
          tasks:
            - name: Use the key without showing it
              ansible.builtin.command: "echo {{ engine_api_key }}"
              no_log: true
              changed_when: true
            - name: Check the key decrypted
              ansible.builtin.assert:
                that: engine_api_key | hash('sha256') == expected_sha256
                quiet: true
        """))
    inventory = root / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(textwrap.dedent(f"""\
        all:
          hosts:
            node1:
              ansible_connection: local
              ansible_python_interpreter: {sys.executable}
        """))
    password_file = root / "vault-pass"
    password_file.write_text(PASSWORD + "\n")
    encrypted = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-vault"), "encrypt_string", "--vault-password-file", str(password_file),
         SECRET, "--name", "engine_api_key"], capture_output=True, text=True, check=True).stdout
    import hashlib

    (inventory / "group_vars" / "all.yml").write_text(
        encrypted + f"expected_sha256: {hashlib.sha256(SECRET.encode()).hexdigest()}\n")
    return root


def cli(project: Path, *args: str, env_password: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "APHRODITE_"))}
    env["PYTHONPATH"] = str(ROOT)
    if env_password:
        env[ENV_PASSWORD] = env_password
    return subprocess.run([sys.executable, "-m", "aphrodite_deploy", "deploy", "-i", str(project / "inventory"),
                           "--project-dir", str(project), "--artifacts-dir", str(project / "runs"), "--json", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)


def files_with(root: Path, *needles: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {needle[:12]}…" for needle in needles if needle.encode() in data]
    return found


def test_password_file_and_environment_leave_no_secret_behind(project):
    by_file = cli(project, "--vault-password-file", str(project / "vault-pass"), "--keep-artifacts", "2")
    assert by_file.returncode == 0, by_file.stdout + by_file.stderr
    payload = json.loads(by_file.stdout)
    assert payload["result"] == "converged" and payload["hosts"]["node1"]["changed"] == 1
    by_env = cli(project, "--keep-artifacts", "2", env_password=PASSWORD)
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    assert json.loads(by_env.stdout)["hosts"]["node1"]["failed"] == 0  # the assert saw the decrypted key

    runs = project / "runs"
    assert not (runs / "env").exists(), "ansible-runner wrote env/ files"
    assert files_with(runs, PASSWORD, SECRET) == []
    assert PASSWORD not in by_file.stdout + by_file.stderr + by_env.stdout + by_env.stderr
    assert SECRET not in by_file.stdout + by_file.stderr + by_env.stdout + by_env.stderr
    # argv names only the file (or the per-run password script), never the password.
    commands = [json.loads(p.read_text()) for p in runs.glob("artifacts/*/command")]
    argvs = [c["command"] for c in commands]
    assert any(str(project / "vault-pass") in argv for argv in argvs)
    assert any(any(a.endswith("/vault-password") for a in argv) for argv in argvs)
    for command in commands:
        assert ENV_PASSWORD not in command["env"]
        assert command["env"].get("ANSIBLE_HOST_KEY_CHECKING") == "True"  # ansible-runner would switch it off
    # The per-run password script and its socket are gone.
    script = next(a for argv in argvs for a in argv if a.endswith("/vault-password"))
    assert not Path(script).exists() and not Path(script).parent.exists()


def test_artefacts_are_rotated(project):
    for _ in range(2):
        assert cli(project, "--vault-password-file", str(project / "vault-pass"), "--keep-artifacts", "2").returncode == 0
    assert len(list((project / "runs" / "artifacts").iterdir())) == 2


def test_a_wrong_password_fails_and_says_so(project):
    result = cli(project, "--keep-artifacts", "2", env_password="not-the-password")
    assert result.returncode == 4
    payload = json.loads(result.stdout)
    assert payload["result"] == "failed"
    assert "not-the-password" not in result.stdout + result.stderr
    assert files_with(project / "runs", "not-the-password") == []


def test_the_password_script_serves_the_password_to_this_user_only_while_open():
    with VaultSecrets(password="s3cret value") as vault:
        assert vault.args[0] == "--vault-password-file"
        script = Path(vault.path)
        assert oct(script.parent.stat().st_mode & 0o777) == "0o700"
        assert "s3cret" not in script.read_text()
        assert subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout == "s3cret value\n"
    assert not script.exists()


def test_one_way_in_at_a_time(tmp_path):
    with pytest.raises(VaultError, match="not both"):
        VaultSecrets(tmp_path / "f", "pw")
    with pytest.raises(VaultError, match="does not exist"):
        VaultSecrets(tmp_path / "missing").__enter__()
    with VaultSecrets() as vault:
        assert vault.args == []


def test_the_environment_variable_is_taken_out_of_the_environment():
    env = {ENV_PASSWORD: "pw", "OTHER": "1"}
    assert take_env_password(env) == "pw" and env == {"OTHER": "1"}
    assert take_env_password({}) is None


def test_recorded_environment_keeps_only_ansibles_values(tmp_path):
    (tmp_path / "command").write_text(json.dumps({"command": ["ansible-playbook"], "env": {
        "ANSIBLE_NOCOLOR": "1", "AWS_SECRET_ACCESS_KEY": "abc", "PATH": "/bin"}}))
    scrub_command_artifact(tmp_path)
    assert json.loads((tmp_path / "command").read_text())["env"] == {
        "ANSIBLE_NOCOLOR": "1", "AWS_SECRET_ACCESS_KEY": "<not recorded>", "PATH": "/bin"}
    assert oct((tmp_path / "command").stat().st_mode & 0o777) == "0o600"


def test_host_key_checking_follows_ansible_cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("ANSIBLE_HOST_KEY_CHECKING", raising=False)
    monkeypatch.delenv("ANSIBLE_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert host_key_checking(tmp_path) in ("True", "true", "yes", "False", "false")  # /etc/ansible may say
    (tmp_path / "ansible.cfg").write_text("[defaults]\nhost_key_checking = False\n")
    assert host_key_checking(tmp_path) == "False"
