"""Kernel tests run on the GPU when one is present, else through Triton's interpreter on CPU.

TRITON_INTERPRET must be set before any @triton.jit function is created (Triton picks the
interpreter when the decorator runs), so this conftest sets it before the kernel modules are imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def on_kernels(x):
    """x (a tensor, None, or a list of them) moved to DEVICE, where backend="triton" runs: CUDA on a GPU machine,
    where the kernels refuse CPU tensors (no interpreter there), else CPU."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [on_kernels(e) for e in x]
    return x.to(DEVICE)


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: "cuda" on a GPU machine, "cpu" under the interpreter."""
    return DEVICE


@pytest.fixture
def native_cache(monkeypatch, tmp_path):
    """Compiled CPU code (kernels/native_build.py) built into tmp_path/cache, its temp-dir fallback in tmp_path/tmp."""
    from fusemerge.kernels import native_build

    monkeypatch.setenv("FUSEMERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return tmp_path


def _stat_backends() -> dict:
    from fusemerge.kernels import reference, triton_select

    return {"torch": (reference, "cpu"), "triton": (triton_select, DEVICE)}


@pytest.fixture(params=["torch", "triton"])
def stats(request) -> str:
    """Which statistics functions a test runs: the torch backend's (on CPU: the compiled loops) or the Triton
    kernels' (on the GPU, else through the interpreter); BACKENDS[stats] is (module, device of its inputs)."""
    return request.param


BACKENDS = _stat_backends()
