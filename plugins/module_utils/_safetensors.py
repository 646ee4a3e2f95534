# Copyright: aphrodite.baremetal contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Check a model directory the way an engine will read it, without loading any weights.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (a map
of tensor name to ``dtype``, ``shape`` and ``data_offsets`` relative to the end of the
header, plus an optional ``__metadata__`` map of strings), then the tensor bytes. The
header alone therefore says how long the file must be: ``8 + N + the largest end
offset``. A download that stopped early is shorter than that, which is what these
checks catch before an engine fails half-way through loading on every node.

Only headers are read (a few MiB at most), so checking a 140 GB model over NFS takes
seconds. Pure Python 3.8+: no Ansible imports.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple

HEADER_LENGTH_BYTES = 8
# The safetensors library refuses headers over 100 MB; a larger length means a corrupt file.
MAX_HEADER_LENGTH = 100_000_000
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SUFFIX = ".safetensors"

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: Dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


class SafetensorsError(ValueError):
    """A safetensors file is malformed or does not match its header; the message says which and why."""


@dataclass(frozen=True)
class SafetensorsInfo:
    """What the header of one safetensors file says, and how big the file is."""

    path: str
    size: int
    header_length: int
    data_length: int
    tensors: Tuple[str, ...]
    metadata: Mapping[str, str]

    @property
    def expected_size(self) -> int:
        return HEADER_LENGTH_BYTES + self.header_length + self.data_length


@dataclass
class ModelReport:
    """The result of :func:`check_model_dir`: the files, their sizes and every problem found."""

    path: str
    files: Dict[str, int] = field(default_factory=dict)
    safetensors: List[SafetensorsInfo] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    index_shards: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def tensor_count(self) -> int:
        return sum(len(info.tensors) for info in self.safetensors)


def _product(shape: List[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_header(header: Any, name: str) -> Tuple[int, Tuple[str, ...], Dict[str, str]]:
    """``(data length, tensor names, metadata)`` of a parsed header; raises SafetensorsError.

    Checks every entry (known dtype, shape of non-negative integers, offsets that
    match dtype x shape) and that the entries tile the data buffer without holes or
    overlaps, as the safetensors library itself requires.
    """
    if not isinstance(header, dict):
        raise SafetensorsError(f"{name}: the header is JSON but not an object (got {type(header).__name__})")
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{name}: __metadata__ must map strings to strings")
    spans = []
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{name}: tensor {tensor} is not described by an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise SafetensorsError(f"{name}: tensor {tensor} has no dtype")
        if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
            raise SafetensorsError(f"{name}: tensor {tensor} has shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise SafetensorsError(f"{name}: tensor {tensor} has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
        bits = DTYPE_BITS.get(dtype)
        if bits is not None:  # a dtype newer than this list is checked by its offsets only
            total_bits = _product(shape) * bits
            expected = total_bits // 8
            if total_bits % 8 or offsets[1] - offsets[0] != expected:
                raise SafetensorsError(
                    f"{name}: tensor {tensor} ({dtype} {shape}) needs {total_bits / 8:g} bytes "
                    f"but data_offsets {offsets} span {offsets[1] - offsets[0]}"
                )
        spans.append((offsets[0], offsets[1], tensor))
    spans.sort()
    position = 0
    for begin, end, tensor in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a hole at byte {position}"
            raise SafetensorsError(f"{name}: tensor {tensor} starts at data byte {begin} and {what}")
        position = end
    return position, tuple(span[2] for span in spans), dict(metadata)


def read_header(handle: BinaryIO, name: str, file_size: int) -> Tuple[int, Any]:
    """``(header length, parsed header)`` read from the start of an open file."""
    prefix = handle.read(HEADER_LENGTH_BYTES)
    if len(prefix) < HEADER_LENGTH_BYTES:
        raise SafetensorsError(
            f"{name}: {file_size} bytes is too short for a safetensors file (at least 8 bytes of header length); "
            f"the file is truncated or empty: copy or download it again"
        )
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_LENGTH:
        raise SafetensorsError(
            f"{name}: header length {length} exceeds the format's limit of {MAX_HEADER_LENGTH} bytes; "
            f"the file is not safetensors or is corrupt"
        )
    if HEADER_LENGTH_BYTES + length > file_size:
        raise SafetensorsError(
            f"{name}: is {file_size} bytes, shorter than its own {length}-byte header; "
            f"the file is truncated: copy or download it again"
        )
    raw = handle.read(length)
    if len(raw) != length:
        raise SafetensorsError(f"{name}: could read only {len(raw)} of its {length} header bytes")
    if not raw.lstrip(b" ").startswith(b"{"):
        raise SafetensorsError(f"{name}: the header does not start with '{{'; the file is not safetensors")
    try:
        return length, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"{name}: the header is not valid UTF-8 JSON ({exc})")


def inspect_file(path: str, name: Optional[str] = None) -> SafetensorsInfo:
    """Read and check one safetensors file's header against its size."""
    label = name or path
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length, header = read_header(handle, label, size)
    except OSError as exc:
        raise SafetensorsError(f"{label}: cannot be read ({exc.strerror or exc})")
    data_length, tensors, metadata = validate_header(header, label)
    info = SafetensorsInfo(path=path, size=size, header_length=length, data_length=data_length,
                           tensors=tensors, metadata=metadata)
    if size < info.expected_size:
        raise SafetensorsError(
            f"{label}: is {size} bytes but its header describes {info.expected_size} "
            f"(8 + {length} header + {data_length} tensor data); the file is truncated: copy or download it again"
        )
    if size > info.expected_size:
        raise SafetensorsError(
            f"{label}: is {size} bytes, {size - info.expected_size} more than its header describes "
            f"({info.expected_size}); the file is corrupt or not what its header says"
        )
    return info


def list_files(root: str) -> Dict[str, int]:
    """Regular files below ``root`` (relative POSIX paths) and their sizes, sorted by path."""
    found = {}
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for entry in names:
            full = os.path.join(directory, entry)
            if os.path.isfile(full):
                found[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(found.items()))


def _load_json(path: str, name: str, problems: List[str]) -> Any:
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except OSError as exc:
        problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{name}: is not valid JSON ({exc}); copy or download it again")
    return None


def _check_index(root: str, files: Mapping[str, int], by_name: Mapping[str, SafetensorsInfo],
                 report: ModelReport) -> None:
    index = _load_json(os.path.join(root, INDEX_FILE), INDEX_FILE, report.problems)
    if index is None:
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        report.problems.append(f"{INDEX_FILE}: has no weight_map of tensor name to shard file")
        return
    shards: Dict[str, List[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    report.index_shards = sorted(shards)
    for shard in report.index_shards:
        normalised = os.path.normpath(shard).replace(os.sep, "/")
        if os.path.isabs(shard) or normalised.startswith("../") or normalised == "..":
            report.problems.append(f"{INDEX_FILE}: shard {shard} points outside the model directory")
            continue
        if normalised not in files:
            report.problems.append(
                f"{INDEX_FILE}: names shard {shard} ({len(shards[shard])} tensors), which is missing; "
                f"copy or download the model again"
            )
            continue
        info = by_name.get(normalised)
        if info is None:  # the shard itself failed its check; that problem is already reported
            continue
        absent = sorted(set(shards[shard]) - set(info.tensors))
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            report.problems.append(
                f"{INDEX_FILE}: maps {', '.join(absent[:3])}{more} to {shard}, whose header lacks them; "
                f"the index and the shard come from different revisions"
            )


def check_model_dir(root: str, require_safetensors: bool = True) -> ModelReport:
    """Check a model directory; problems are collected in the report, not raised."""
    report = ModelReport(path=root)
    if not os.path.isdir(root):
        report.problems.append(f"{root}: is not a directory; stage the model there first")
        return report
    report.files = list_files(root)

    if CONFIG_FILE not in report.files:
        report.problems.append(f"{CONFIG_FILE}: missing in {root}; every model needs one")
    else:
        config = _load_json(os.path.join(root, CONFIG_FILE), CONFIG_FILE, report.problems)
        if config is not None and not isinstance(config, dict):
            report.problems.append(f"{CONFIG_FILE}: is JSON but not an object")
        elif isinstance(config, dict):
            report.config = config

    by_name: Dict[str, SafetensorsInfo] = {}
    for name in report.files:
        if not name.endswith(SUFFIX):
            continue
        try:
            info = inspect_file(os.path.join(root, name), name)
        except SafetensorsError as exc:
            report.problems.append(str(exc))
            continue
        by_name[name] = info
        report.safetensors.append(info)

    if INDEX_FILE in report.files:
        _check_index(root, report.files, by_name, report)

    if require_safetensors and not any(name.endswith(SUFFIX) for name in report.files):
        report.problems.append(
            f"{root}: holds no *.safetensors weights; stage the model's safetensors files "
            f"(or allow models without them)"
        )
    return report
