"""scripts/molecule_lanes.py's summary: CI keeps only the end of the output, so it must say why."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("molecule_lanes", ROOT / "scripts" / "molecule_lanes.py")
lanes = importlib.util.module_from_spec(_spec)
sys.modules["molecule_lanes"] = lanes
_spec.loader.exec_module(lanes)

# As Molecule frames Ansible's output: colours and a bar before each line.
LOG = """\
  \x1b[2m\u2502\x1b[0m PLAY [Converge] ****
  \x1b[2m\u2502\x1b[0m TASK [aphrodite.baremetal.engine : Wait for /health] ****
  \x1b[2m\u2502\x1b[0m ok: [ops-gpu1] =>
  \x1b[2m\u2502\x1b[0m     msg: 2 replica(s) answered 200
  \x1b[2m\u2502\x1b[0m fatal: [ops-gpu2]: FAILED! =>
  \x1b[2m\u2502\x1b[0m     msg: 'Status code was 503 and not [200]: HTTP Error 503: Service Unavailable'
  \x1b[2m\u2502\x1b[0m PLAY RECAP ****
  \x1b[2m\u2502\x1b[0m ops-gpu2 : ok=3 changed=0 unreachable=0 failed=1
=========================== short test summary info ============================
FAILED molecule/operations/tests/test_operations.py::test_upgrade - AssertionError: 3 requests failed
E   AssertionError: 3 requests failed
"""


def test_the_summary_quotes_the_fatal_result_and_the_failed_test(tmp_path: Path) -> None:
    log = tmp_path / "operations.log"
    log.write_text(LOG)
    why = lanes.why_failed(log)
    assert why[0].startswith("fatal: [ops-gpu2]: FAILED!")
    assert why[1] == "msg: 'Status code was 503 and not [200]: HTTP Error 503: Service Unavailable'"
    assert not any("answered 200" in line for line in why)
    assert any(line.startswith("FAILED molecule/operations/tests/test_operations.py::test_upgrade") for line in why)
    assert not any(line.startswith(("ok:", "PLAY [", "TASK")) for line in why)


def test_the_summary_is_bounded_and_a_missing_log_says_nothing(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    log.write_text("".join(f"fatal: [h{i}]: FAILED! {'x' * 500}\n" for i in range(100)))
    why = lanes.why_failed(log, limit=10, width=80, follow=0)
    assert len(why) == 10 and why[-1].startswith("fatal: [h99]") and all(len(line) <= 80 for line in why)
    assert lanes.why_failed(tmp_path / "absent.log") == []
