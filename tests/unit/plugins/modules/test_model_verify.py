"""The model_verify module, run for real against model directories built in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ansible_collections.aphrodite.baremetal.plugins.modules import model_verify
from module_harness import ExitJson, FailJson, module_exits, run_module  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[4]
LAB_MODEL = ROOT / "lab" / "fixtures" / "models" / "llama-3.1-8b-instruct"


def run(args: dict, expect: type = ExitJson, check_mode: bool = False) -> dict:
    outcome = run_module(model_verify.main, args, expect, check_mode)
    assert outcome["changed"] is False
    return outcome


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A copy of the lab's tiny model, nested like a Hugging Face id."""
    target = tmp_path / "models" / "meta-llama" / "Llama-3.1-8B-Instruct"
    shutil.copytree(LAB_MODEL, target)
    return target


@pytest.mark.parametrize("check_mode", [False, True], ids=["run", "check-mode"])
def test_a_complete_model_passes_and_is_described(model: Path, check_mode: bool) -> None:
    result = run({"path": str(model) + "/"}, check_mode=check_mode)
    assert result["path"] == str(model)
    assert result["files"] == ["config.json", "model.safetensors"]
    assert result["sizes"] == {name: (model / name).stat().st_size for name in result["files"]}
    assert result["total_bytes"] == sum(result["sizes"].values())
    assert result["safetensors"] == [
        {"file": "model.safetensors", "size": (model / "model.safetensors").stat().st_size,
         "header_bytes": result["safetensors"][0]["header_bytes"], "tensors": 4}
    ]
    assert result["tensors"] == 4
    assert result["model_type"] == "llama"
    assert result["architectures"] == ["LlamaForCausalLM"]
    assert result["index_shards"] == []
    assert result["problems"] == []


def test_a_truncated_safetensors_file_fails(model: Path) -> None:
    weights = model / "model.safetensors"
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-16])
    result = run({"path": str(model)}, expect=FailJson)
    assert result["msg"].startswith(f"{model} is not a complete model (1 problem): model.safetensors: is {full - 16} bytes")
    assert "the file is truncated" in result["msg"]
    assert result["safetensors"] == []
    assert result["files"] == ["config.json", "model.safetensors"]


def test_every_problem_is_reported_at_once(model: Path) -> None:
    (model / "config.json").write_text("{")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    result = run({"path": str(model)}, expect=FailJson)
    assert len(result["problems"]) == 2
    assert "(2 problems)" in result["msg"]
    assert result["problems"][0].startswith("config.json: is not valid JSON")
    assert "names shard model-00001-of-00002.safetensors (1 tensors), which is missing" in result["problems"][1]
    assert result["model_type"] is None


def test_weights_in_another_format_pass_only_when_allowed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": "not-a-list"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00" * 8)
    assert "holds no *.safetensors weights" in run({"path": str(tmp_path)}, expect=FailJson)["msg"]
    result = run({"path": str(tmp_path), "require_safetensors": False})
    assert result["architectures"] == []
    assert result["total_bytes"] > 8


def test_a_missing_directory_fails_with_what_to_do(tmp_path: Path) -> None:
    result = run({"path": str(tmp_path / "nope")}, expect=FailJson)
    assert "is not a directory; stage the model there first" in result["msg"]
