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


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: "cuda" on a GPU machine, "cpu" under the interpreter."""
    return DEVICE
