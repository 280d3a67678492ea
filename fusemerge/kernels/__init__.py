"""Merge kernels: the torch backend (`reference`) and the Triton kernels, behind one loader."""

from __future__ import annotations

import os
from types import ModuleType


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
