"""Every role keeps the collection's contracts (STYLE.md), checked on every role that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if p.is_dir())
SECRET_NAME = re.compile(r"(password|passphrase|secret|token|api_keys?|private_key)$")


def _spec(role: Path) -> dict:
    return yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]


def _defaults(role: Path) -> dict:
    path = role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_defaults_and_argument_specs_name_the_same_variables(role: Path) -> None:
    options = _spec(role).get("options", {})
    defaults = _defaults(role)
    required = {name for name, opt in options.items() if opt.get("required")}
    assert set(defaults) == set(options) - required, (
        f"{role.name}: only in defaults: {sorted(set(defaults) - set(options))}; "
        f"only in argument_specs: {sorted(set(options) - required - set(defaults))}"
    )


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_spec_defaults_match_defaults_file(role: Path) -> None:
    options = _spec(role).get("options", {})
    for name, value in _defaults(role).items():
        assert options[name].get("default") == value, f"{role.name}: {name} default differs"
        assert options[name].get("description"), f"{role.name}: {name} has no description"
        assert name.startswith(f"{role.name}_"), f"{role.name}: public variable {name} lacks the role prefix"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_secret_options_are_no_log(role: Path) -> None:
    for name, opt in _spec(role).get("options", {}).items():
        if SECRET_NAME.search(name):
            assert opt.get("no_log") is True, f"{role.name}: {name} looks secret but is not no_log"


@pytest.mark.parametrize("template", sorted(ROOT.glob("roles/*/templates/**/*.j2")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_templates_say_they_are_managed(template: Path) -> None:
    first = template.read_text().splitlines()[0]
    assert "ansible_managed" in first, f"{template} must start with {{{{ ansible_managed | comment }}}}"


def test_readme_variable_tables_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "role_docs.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^exec make test$", ci, re.M)
