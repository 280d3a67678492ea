"""Helpers for the streaming tests: fresh random tensors (never all zeros), raw files and byte comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fusemerge.streaming.safetensors_header import DTYPES


def random_tensor(code: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random tensor of safetensors dtype `code`, every element non-zero (except for BOOL, where False is)."""
    dtype = DTYPES[code][0]
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype.is_floating_point:
        x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5  # |x| in [0.5, 1.5): no float8 zero
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return (x * sign).to(dtype)
    low = 0 if code.startswith("U") else -100
    x = torch.randint(1, 100, shape, generator=gen)
    return (x if low == 0 else x * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype)


def as_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, any shape including 0-d)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, same shape, same bytes."""
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert as_bytes(a) == as_bytes(b)


def split_file(path: Path) -> tuple[dict, bytes]:
    """The header JSON (as a dict, in order) and the data bytes of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict | str | bytes, data: bytes) -> Path:
    """Write a safetensors file with the given header (dict, JSON text or raw bytes) and data, padded to 8."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path

