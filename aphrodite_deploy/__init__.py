"""aphrodite-deploy: plan and operate an Aphrodite Engine fleet from an Ansible inventory.

The planner is the collection's own ``plugins/module_utils`` code, packaged as
``aphrodite_deploy._core`` (see ``pyproject.toml``), so the CLI and the playbooks share
one implementation. Run from a source checkout without installing, ``_core`` is mapped
to ``plugins/module_utils`` of that checkout here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _map_core_from_checkout() -> None:
    name = f"{__name__}._core"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    source = Path(__file__).resolve().parent.parent / "plugins" / "module_utils"
    if not (source / "_planner.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module


_map_core_from_checkout()
