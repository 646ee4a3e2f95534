"""Shared pytest set-up for the unit tests of the aphrodite.baremetal collection.

Collection code imports itself by its full name
(``ansible_collections.aphrodite.baremetal.plugins.module_utils...``), so the tests
need a directory on ``sys.path`` that holds ``ansible_collections/aphrodite/baremetal``.
When this checkout already sits at such a path (``ansible-test units`` copies it
there) its own ancestor is used; otherwise a temporary tree with a symlink to the
checkout is made once per test session and removed at exit. This runs when pytest
imports this file, before any test module is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

COLLECTION_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "aphrodite"
NAME = "baremetal"
FIXTURES = COLLECTION_ROOT / "tests" / "fixtures"


def _collections_dir() -> Path:
    """A directory whose ``ansible_collections/aphrodite/baremetal`` is this checkout."""
    if (COLLECTION_ROOT.name, COLLECTION_ROOT.parent.name, COLLECTION_ROOT.parent.parent.name) == (
        NAME,
        NAMESPACE,
        "ansible_collections",
    ):
        return COLLECTION_ROOT.parents[2]
    tree = Path(tempfile.mkdtemp(prefix="aphrodite-unit-collections-"))
    atexit.register(shutil.rmtree, str(tree), True)
    namespace_dir = tree / "ansible_collections" / NAMESPACE
    namespace_dir.mkdir(parents=True)
    (namespace_dir / NAME).symlink_to(COLLECTION_ROOT, target_is_directory=True)
    return tree


COLLECTIONS_DIR = str(_collections_dir())
if COLLECTIONS_DIR not in sys.path:
    sys.path.insert(0, COLLECTIONS_DIR)
# For tests that start Ansible's own collection loader (plugin loader, templar).
os.environ["ANSIBLE_COLLECTIONS_PATH"] = os.pathsep.join(
    part for part in (COLLECTIONS_DIR, os.environ.get("ANSIBLE_COLLECTIONS_PATH")) if part
)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures`` of this checkout (recorded command output and other test data)."""
    return FIXTURES
