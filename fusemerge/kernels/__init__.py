"""Merge kernels: the torch backend (`reference`) and the Triton kernels, behind one loader."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch


def load_backend(name: str, device_type: str) -> tuple[ModuleType, ModuleType]:
    """(merge module, statistics module) of backend `name` ("torch" or "triton") for a device type.

    Triton on a CPU-only machine runs through Triton's interpreter, which must be chosen before the
    kernels are first defined: TRITON_INTERPRET=1 is set here, before their import.
    """
    if name == "triton":
        if device_type == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from fusemerge.kernels import triton_merge, triton_select

        return triton_merge, triton_select
    from fusemerge.kernels import reference

    return reference, reference


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Where kernels for tensors on `device` must be launched from: Triton launches on the current CUDA device,
    whatever device its tensors are on (tensors on cuda:1 launched with cuda:0 current are refused: "Pointer
    argument cannot be accessed from Triton"), so this makes `device` current for the `with` block. Nothing
    for other devices. The pipeline's threads set their device themselves."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
