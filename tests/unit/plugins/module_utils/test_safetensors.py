"""Safetensors header checks and model directory checks, on files built byte by byte."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.aphrodite.baremetal.plugins.module_utils._safetensors import (
    DTYPE_BITS,
    SafetensorsError,
    check_model_dir,
    inspect_file,
    validate_header,
)

ROOT = Path(__file__).resolve().parents[4]
LAB_MODEL = ROOT / "lab" / "fixtures" / "models" / "llama-3.1-8b-instruct"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096}


def encode(header: object, data: bytes = b"", pad: int = 8) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad)
    return struct.pack("<Q", len(text)) + text + data


def tensors(spec: dict[str, tuple[str, list[int]]]) -> tuple[dict, bytes]:
    """A header and data buffer for ``{name: (dtype, shape)}``, tensors laid out in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in spec.items():
        count = 1
        for dim in shape:
            count *= dim
        length = count * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    return header, bytes(range(256)) * (offset // 256) + bytes(range(offset % 256))


def write_model(directory: Path, shards: dict[str, dict[str, tuple[str, list[int]]]], index: bool = True,
                config: object = CONFIG) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for shard, spec in shards.items():
        header, data = tensors(spec)
        (directory / shard).write_bytes(encode(header, data))
        weight_map.update({name: shard for name in spec})
    if index:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


TWO_SHARDS = {
    "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": ("BF16", [16, 8]), "model.norm.weight": ("F32", [8])},
    "model-00002-of-00002.safetensors": {"lm_head.weight": ("BF16", [16, 8])},
}


def test_a_valid_file_is_as_long_as_its_header_says(tmp_path: Path) -> None:
    header, data = tensors({"a": ("F32", [3, 5]), "b": ("I64", [7])})
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(header, data))
    info = inspect_file(str(path))
    assert info.size == path.stat().st_size == info.expected_size
    assert info.data_length == 3 * 5 * 4 + 7 * 8
    assert info.tensors == ("a", "b")
    assert info.metadata == {"format": "pt"}


def test_the_lab_fixture_is_a_complete_model() -> None:
    report = check_model_dir(str(LAB_MODEL))
    assert report.problems == []
    assert sorted(report.files) == ["config.json", "model.safetensors"]
    assert report.tensor_count == 4
    assert report.config["model_type"] == "llama"


def test_the_lab_fixture_is_what_make_tiny_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_tiny", LAB_MODEL.parent / "make_tiny.py")
    make_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny)
    assert (LAB_MODEL / "model.safetensors").read_bytes() == make_tiny.build(), (
        "lab/fixtures/models/llama-3.1-8b-instruct/model.safetensors is stale: run lab/fixtures/models/make_tiny.py")
    config = json.loads((ROOT / "inventories" / "lab" / "models" / "llama-3.1-8b-instruct" / "config.json").read_text())
    assert json.loads((LAB_MODEL / "config.json").read_text()) == config


def _valid() -> bytes:
    header, data = tensors({"w": ("BF16", [4, 4]), "b": ("F32", [4])})
    return encode(header, data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short for a safetensors file"),
        (b"\x10\x00\x00", "too short for a safetensors file"),
        (_valid()[:-1], "the file is truncated"),
        (_valid()[:40], "shorter than its own"),
        (_valid() + b"\x00" * 3, "3 more than its header describes"),
        (struct.pack("<Q", 200_000_000) + b"{}", "exceeds the format's limit"),
        (struct.pack("<Q", 4) + b"[1] ", "does not start with '{'"),
        (struct.pack("<Q", 4) + b"{no}", "not valid UTF-8 JSON"),
        (encode({"__metadata__": {"n": 1}}), "__metadata__ must map strings to strings"),
        (encode({"w": [1, 2]}), "is not described by an object"),
        (encode({"w": {"shape": [1], "data_offsets": [0, 2]}}, b"\x00\x00"), "has no dtype"),
        (encode({"w": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}, b"\x00\x00"), "has shape"),
        (encode({"w": {"dtype": "F16", "shape": [1], "data_offsets": [2, 0]}}, b"\x00\x00"), "has data_offsets"),
        (encode({"w": {"dtype": "F16", "shape": [1], "data_offsets": [0]}}, b"\x00\x00"), "has data_offsets"),
        (encode({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}}, b"\x00\x00"), "needs 4 bytes"),
        (encode({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\x00\x00"), "needs 1.5 bytes"),
        (encode({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                 "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}, b"\x00" * 5), "leaves a hole at byte 2"),
        (encode({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                 "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\x00" * 3), "overlaps"),
        (encode({"w": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\x00" * 3), "leaves a hole at byte 0"),
    ],
    ids=[
        "empty", "shorter-than-length-field", "truncated-by-one-byte", "truncated-inside-header", "trailing-bytes",
        "huge-header-length", "header-not-an-object", "header-not-json", "metadata-not-strings", "entry-not-object",
        "no-dtype", "negative-dimension", "reversed-offsets", "one-offset", "offsets-disagree-with-shape",
        "sub-byte-dtype-not-whole-bytes", "hole", "overlap", "hole-at-start",
    ],
)
def test_malformed_or_truncated_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError) as caught:
        inspect_file(str(path), "model.safetensors")
    assert str(caught.value).startswith("model.safetensors: ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("dtype", "shape", "length"),
    [("F4", [4], 2), ("F6_E2M3", [4], 3), ("F8_E4M3", [3, 3], 9), ("BF16", [0, 7], 0), ("C64", [2], 16), ("BOOL", [], 1)],
)
def test_every_dtype_is_sized_by_its_bit_width(dtype: str, shape: list[int], length: int) -> None:
    header = {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, length]}}
    assert validate_header(header, "x")[0] == length


def test_a_dtype_newer_than_this_list_is_checked_by_offsets_only() -> None:
    header = {"w": {"dtype": "F2_FUTURE", "shape": [4], "data_offsets": [0, 1]},
              "v": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}
    assert validate_header(header, "x")[0] == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.dictionaries(
        st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12),
        st.tuples(st.sampled_from(["BF16", "F16", "F32", "I64", "U8", "F8_E4M3"]),
                  st.lists(st.integers(min_value=0, max_value=6), max_size=3)),
        min_size=1, max_size=6),
    cut=st.integers(min_value=1, max_value=10_000),
)
def test_any_well_formed_file_passes_and_any_shortened_copy_fails(tmp_path: Path, spec, cut: int) -> None:
    header, data = tensors(spec)
    content = encode(header, data)
    path = tmp_path / "p.safetensors"
    path.write_bytes(content)
    assert inspect_file(str(path)).size == len(content)
    path.write_bytes(content[:max(0, len(content) - cut)])
    with pytest.raises(SafetensorsError):
        inspect_file(str(path))


def test_a_sharded_model_with_its_index_passes(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TWO_SHARDS)
    report = check_model_dir(str(model))
    assert report.ok, report.problems
    assert report.index_shards == sorted(TWO_SHARDS)
    assert report.tensor_count == 3
    assert report.total_bytes == sum(p.stat().st_size for p in model.iterdir())
    assert list(report.files) == sorted(report.files)


def test_a_missing_shard_named_by_the_index_fails(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TWO_SHARDS)
    (model / "model-00002-of-00002.safetensors").unlink()
    report = check_model_dir(str(model))
    assert report.problems == [
        "model.safetensors.index.json: names shard model-00002-of-00002.safetensors (1 tensors), which is missing; "
        "copy or download the model again"
    ]


def test_a_truncated_shard_is_the_only_problem_reported(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TWO_SHARDS)
    shard = model / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    report = check_model_dir(str(model))
    assert len(report.problems) == 1
    assert report.problems[0].startswith("model-00001-of-00002.safetensors: is ")
    assert "the file is truncated" in report.problems[0]
    assert [info.path for info in report.safetensors] == [str(model / "model-00002-of-00002.safetensors")]


def test_an_index_from_another_revision_is_caught(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TWO_SHARDS)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = check_model_dir(str(model)).problems
    assert "maps model.layers.0.mlp.up_proj.weight to model-00002-of-00002.safetensors, whose header lacks them" in problem


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"metadata": {"total_size": 1}}, "has no weight_map"),
        ({"weight_map": {"w": "../outside.safetensors"}}, "points outside the model directory"),
        ({"weight_map": {"w": "/etc/passwd"}}, "points outside the model directory"),
    ],
)
def test_an_unusable_index_is_reported(tmp_path: Path, index: dict, message: str) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"w": ("U8", [4])}}, index=False)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = check_model_dir(str(model)).problems
    assert problem.startswith("model.safetensors.index.json: ") and message in problem


@pytest.mark.parametrize(
    ("config", "message"),
    [(None, "config.json: missing in"), ("[1, 2]", "config.json: is JSON but not an object"),
     ("{\"a\": ", "config.json: is not valid JSON")],
)
def test_config_json_must_parse_to_an_object(tmp_path: Path, config, message: str) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"w": ("U8", [4])}}, index=False, config=None)
    if config is not None:
        (model / "config.json").write_text(config)
    (problem,) = check_model_dir(str(model)).problems
    assert problem.startswith(message)


def test_weights_are_required_unless_allowed(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {}, index=False)
    (model / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    assert "holds no *.safetensors weights" in check_model_dir(str(model)).problems[0]
    assert check_model_dir(str(model), require_safetensors=False).ok


def test_a_missing_directory_is_one_problem(tmp_path: Path) -> None:
    report = check_model_dir(str(tmp_path / "absent"))
    assert report.problems == [f"{tmp_path / 'absent'}: is not a directory; stage the model there first"]
    assert report.files == {}


def test_files_in_subdirectories_are_listed_with_relative_paths(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"w": ("U8", [4])}}, index=False)
    (model / "original").mkdir()
    (model / "original" / "params.json").write_text("{}")
    assert "original/params.json" in check_model_dir(str(model)).files
