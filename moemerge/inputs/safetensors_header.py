"""Read a safetensors header without touching tensor bytes, and check it tells the truth about sizes.

The merge plan is built from these headers alone, so a truncated or lying file is caught before any byte
of output is written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import MoemergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file, and what they hold."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose names are unique: with a name twice, which entry wins would be a reader's guess."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the name {key!r} appears twice")
        result[key] = value
    return result


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(file: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One tensor's dtype, shape and relative offsets, each of the type and range the format requires."""
    where = f"{file}: tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise MoemergeError(f"{where}: header entry needs dtype, shape and data_offsets; the file is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MoemergeError(f"{where}: unreadable or unsupported dtype {dtype!r}; moemerge reads {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_whole(d) and d >= 0 for d in shape):
        raise MoemergeError(f"{where}: shape {shape!r} is not a list of whole numbers >= 0; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise MoemergeError(f"{where}: data_offsets {offsets!r} is not two whole numbers; the file is corrupt")
    begin, finish = offsets
    if begin < 0 or finish < begin:
        raise MoemergeError(f"{where}: data_offsets {offsets} are negative or reversed; the file is corrupt")
    count = 1
    for dim in shape:
        count *= dim
    expected = count * DTYPES[dtype].itemsize
    if finish - begin != expected:
        raise MoemergeError(
            f"{where}: header says {finish - begin} bytes but {dtype}{shape} needs {expected}; the file is corrupt"
        )
    return DTYPES[dtype], tuple(shape), begin, finish


def _check_layout(file: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The format's rule: tensors tile the data buffer exactly, in offset order, without overlap or gap, and
    the buffer ends where the file does. Overlapping tensors would hand one tensor another's bytes."""
    position, previous = data_start, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < position:
            raise MoemergeError(f"{file}: tensors {previous} and {name} overlap; the file is corrupt")
        if info.start > position:
            raise MoemergeError(f"{file}: {info.start - position} unindexed bytes before tensor {name}; corrupt")
        if info.end > size:
            raise MoemergeError(f"{file}: tensor {name} lies past the end of the file; the file is truncated")
        position, previous = info.end, name
    if position != size:
        raise MoemergeError(f"{file}: {size - position} bytes after the last tensor; the file is corrupt")


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header as the format requires; offsets become absolute positions."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise MoemergeError(f"{file}: truncated safetensors file (no header); re-download or re-save it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise MoemergeError(f"{file}: corrupt safetensors header (length {header_len} exceeds the file)")
        try:
            header = json.loads(handle.read(header_len), object_pairs_hook=_unique_keys)
        except ValueError as exc:  # JSONDecodeError, a bad UTF-8 byte, a name twice
            reason = str(exc) if "appears twice" in str(exc) else "not JSON"
            raise MoemergeError(f"{file}: corrupt safetensors header ({reason})") from None
        except RecursionError:
            raise MoemergeError(f"{file}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise MoemergeError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MoemergeError(f"{file}: corrupt safetensors header (__metadata__ must map names to strings)")
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype, shape, begin, finish = _entry(file, name, entry)
        tensors[name] = TensorInfo(file, dtype, shape, base + begin, base + finish)
    _check_layout(file, tensors, base, size)
    return tensors


def read_weights(files: list[Path], weight_map: dict[str, str] | None, index: Path | None) -> dict[str, TensorInfo]:
    """Every tensor of a set of safetensors files, each in exactly one file, and, given an index, in the
    file the index names for it, with every tensor it lists present: otherwise which copy a reader takes
    is left to chance."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise MoemergeError(f"tensor {name} is in both {tensors[name].file} and {file}; keep one copy")
            if weight_map is not None and weight_map.get(name) != file.name:
                listed = weight_map.get(name)
                where = f"lists it in {listed}" if listed else "does not list it"
                raise MoemergeError(f"{index}: tensor {name} is in {file.name}, but the index {where}")
            tensors[name] = info
    for name, shard in (weight_map or {}).items():
        if name not in tensors:
            raise MoemergeError(f"{index}: lists tensor {name} in {shard}, which does not hold it")
    return tensors
