"""Safetensors header parsing and validation.

A safetensors file is: 8 bytes little-endian u64 `N`, then `N` bytes of UTF-8 JSON (the header), then the data.
The header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` with offsets relative to
the start of the data; an optional `"__metadata__"` entry holds a str -> str map.

`read_header` reads the first 8 + N bytes only (never the data) and reports every problem of a file at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fusemerge.errors import InputError

# The safetensors library refuses headers larger than this (N_MAX_HEADER = 100_000_000 in its Rust source).
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code -> (torch dtype, bytes per element). The float8 / unsigned entries exist only where this
# torch has them (float8 from 2.1, uint16/32/64 from 2.3).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _code, _name, _size in [
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E5M2", "float8_e5m2", 1),
    ("U16", "uint16", 2),
    ("U32", "uint32", 4),
    ("U64", "uint64", 8),
]:
    if hasattr(torch, _name):
        DTYPES[_code] = (getattr(torch, _name), _size)
del _code, _name, _size

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: `start` / `end` are absolute byte offsets in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype matching `dtype`."""
        return DTYPES[self.dtype][0]


@dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file; `tensors` keeps the order of the header JSON."""

    path: Path
    header_len: int
    data_start: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at `path` without reading its data.

    Raises `InputError` listing every problem found in the file (each line starts with the file name).

    >>> header = read_header("model.safetensors")  # doctest: +SKIP
    >>> header.tensors["lm_head.weight"].shape  # doctest: +SKIP
    (32000, 4096)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: file has {file_size} bytes, too short for a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len == 0:
                raise InputError(f"{path}: header length is 0; not a safetensors file")
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit "
                    "of safetensors; not a safetensors file or a corrupted one"
                )
            if 8 + header_len > file_size:
                raise InputError(
                    f"{path}: truncated or not a safetensors file: header of {header_len} bytes "
                    f"runs past the end of the file ({file_size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e

    data_start = 8 + header_len
    problems: list[str] = []
    header = _parse_json(path, raw, problems)
    metadata = _check_metadata(path, header.pop("__metadata__", None), problems)
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entry = _check_entry(path, name, info, data_start, file_size, problems)
        if entry is not None:
            tensors[name] = entry
    problems += _overlaps(path, data_start, tensors.values())
    if problems:
        raise InputError(problems)
    return SafetensorsHeader(path, header_len, data_start, file_size, tensors, metadata)


def _parse_json(path: Path, raw: bytes, problems: list[str]) -> dict:
    """Decode the header JSON: bad UTF-8, bad JSON and non-objects raise, duplicate keys are recorded."""
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header is not valid UTF-8 (byte {8 + e.start}); not a safetensors file") from e
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: header is not valid JSON ({e.msg} at char {e.pos}); not a safetensors file") from e
    except RecursionError as e:
        raise InputError(f"{path}: header JSON is nested too deeply; not a safetensors file") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    problems += [f"{path}: header has duplicate key {key!r}" for key in dict.fromkeys(duplicates)]
    return header


def _check_metadata(path: Path, metadata: object, problems: list[str]) -> dict[str, str] | None:
    """Return `__metadata__` if it is a str -> str map (or absent / null), else record a problem."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append(f"{path}: __metadata__ must be an object of string values, got {json.dumps(metadata)}")
        return None
    return metadata


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(
    path: Path, name: str, info: object, data_start: int, file_size: int, problems: list[str]
) -> TensorEntry | None:
    """Validate one header entry; record its problems and return None, or return the TensorEntry."""
    where = f"{path}: tensor {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape of a lone surrogate, e.g. "\ud800": safetensors refuses it too
        problems.append(f"{where}: name is not valid Unicode (a lone surrogate)")
        return None
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        problems.append(f"{where}: entry must be an object with exactly dtype, shape, data_offsets; got {got}")
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    ok = True
    if not isinstance(dtype, str) or dtype not in DTYPES:
        problems.append(f"{where}: unknown dtype {json.dumps(dtype)} (known: {', '.join(DTYPES)})")
        ok = False
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        problems.append(f"{where}: shape {json.dumps(shape)} is not a list of non-negative integers")
        ok = False
    pair = isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
    if not (pair and 0 <= offsets[0] <= offsets[1]):
        problems.append(f"{where}: data_offsets {json.dumps(offsets)} is not [begin, end] with 0 <= begin <= end")
        ok = False
    if not ok:
        return None
    begin, end = offsets
    if data_start + end > file_size:
        problems.append(
            f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {file_size} bytes"
        )
        return None
    needed = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != needed:
        problems.append(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes "
            f"but shape {json.dumps(shape)} of {dtype} needs {needed}"
        )
        return None
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _overlaps(path: Path, data_start: int, entries: Iterable[TensorEntry]) -> list[str]:
    """A problem for every non-empty tensor whose bytes overlap those of a tensor starting before it."""
    problems = []
    last: TensorEntry | None = None  # of the tensors seen so far, the one reaching furthest
    for e in sorted((e for e in entries if e.nbytes), key=lambda e: (e.start, e.end)):
        if last is not None and e.start < last.end:
            a = [last.start - data_start, last.end - data_start]
            b = [e.start - data_start, e.end - data_start]
            problems.append(f"{path}: data_offsets of tensors {last.name!r} {a} and {e.name!r} {b} overlap")
        if last is None or e.end > last.end:
            last = e
    return problems
