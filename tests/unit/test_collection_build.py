"""The built collection is what users install: only the collection, and its docs work."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FORBIDDEN_TOP = {"tests", "lab", "molecule", "inventories", ".lab", ".venv", ".ci", ".config", "collections",
                 "scripts", "benchmarks", "aphrodite_deploy", "Makefile", "ansible.cfg", ".git"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("collection")
    # Outside the checkout, so the checkout's ansible.cfg (which sees the source) is not used.
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(work / "collections")}
    subprocess.run([BIN / "ansible-galaxy", "collection", "build", "--output-path", work, ROOT],
                   cwd=work, env=env, check=True, capture_output=True)
    tarball = next(work.glob("aphrodite-baremetal-*.tar.gz"))
    subprocess.run([BIN / "ansible-galaxy", "collection", "install", "--offline", "--no-deps",
                    "-p", work / "collections", tarball], cwd=work, env=env, check=True, capture_output=True)
    return tarball, work


def test_tarball_has_no_test_lab_or_local_artefacts(installed: tuple[Path, Path]) -> None:
    tarball, _ = installed
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    top = {n.split("/", 1)[0] for n in names}
    assert not top & FORBIDDEN_TOP, sorted(top & FORBIDDEN_TOP)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {"MANIFEST.json", "FILES.json", "README.md", "roles", "plugins", "playbooks", "meta"} <= top, sorted(top)


def _ansible_doc(work: Path, *args: str) -> str:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(work / "collections")}
    proc = subprocess.run([BIN / "ansible-doc", *args], cwd=work, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ansible_doc_lists_the_modules(installed: tuple[Path, Path]) -> None:
    _, work = installed
    assert "aphrodite.baremetal.gpu_facts" in _ansible_doc(work, "-l", "aphrodite.baremetal")


def test_ansible_doc_lists_the_filters(installed: tuple[Path, Path]) -> None:
    _, work = installed
    assert "aphrodite.baremetal.plan_fleet" in _ansible_doc(work, "-t", "filter", "-l", "aphrodite.baremetal")


def test_every_module_documents_itself(installed: tuple[Path, Path]) -> None:
    _, work = installed
    for module in sorted((ROOT / "plugins" / "modules").glob("*.py")):
        text = _ansible_doc(work, f"aphrodite.baremetal.{module.stem}")
        assert "EXAMPLES" in text and "RETURN VALUES" in text, module.stem


def test_roles_and_site_playbook_ship(installed: tuple[Path, Path]) -> None:
    _, work = installed
    base = work / "collections" / "ansible_collections" / "aphrodite" / "baremetal"
    assert (base / "playbooks" / "site.yml").is_file()
    assert (base / "roles" / "common" / "meta" / "argument_specs.yml").is_file()
