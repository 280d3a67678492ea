"""nearswap's kernel: one pass over a chunk of the base `a` and the other model `b`, one write of the result.

    w = clamp(t * (1 / max(|a - b|, 1e-6)), 0, 1),    out = w * b + (1 - w) * a

in float32, with the torch backend's operations one for one (reference.nearswap_torch, which does mergekit's),
so the bytes are the same on every backend:

- mergekit's `t / x` is torch's `x.reciprocal() * t`: two roundings. The reciprocal is `tl.math.div_rn(1, x)`
  (IEEE `div.rn.f32`; Triton's `/` is `div.full.f32` on NVIDIA, up to 2 ulp off), then a float32 product;
- torch's clamps propagate NaN and keep a -0.0 (clamp(-0.0, 0, 1) is -0.0 on CPU): `tl.where` on a
  comparison does both, where `tl.maximum` / `tl.minimum` may return the other operand for a NaN;
- no multiply is fused into the add (`enable_fp_fusion=False`, as for `_merge_kernel`);
- the inputs widen and the result rounds as in triton_merge (`_load_f32`, `_store_rounded`).

Bytes per element: two reads of the input dtype and one write, where the torch operations make about seven
float32 passes over the chunk. `nonfinite` counts in the same pass: slot 0 the other model's NaN / Inf, slot 1
the base's, as the torch backend counts them.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fusemerge.kernels import reference
from fusemerge.kernels.triton_merge import (
    BLOCK,
    NUM_WARPS,
    SUPPORTED_DTYPES,
    _count_input,
    _load_f32,
    _store_rounded,
    check_device,
    launch_guard,
)

NEARSWAP_MIN = tl.constexpr(reference.NEARSWAP_MIN)  # mergekit's clamp of |a - b|, as float32


@triton.jit
def _nearswap_kernel(out_ptr, a_ptr, b_ptr, nf_ptr, t, n, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _load_f32(a_ptr + offs, mask)
    b = _load_f32(b_ptr + offs, mask)
    if COUNT:
        _count_input(nf_ptr, b, mask, 0)
        _count_input(nf_ptr, a, mask, 1)
    x = tl.abs(a - b)
    x = tl.where(x < NEARSWAP_MIN, NEARSWAP_MIN, x)  # clamp_min: a NaN stays NaN
    w = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), x) * t
    w = tl.where(w < 0.0, 0.0, w)
    w = tl.where(w > 1.0, 1.0, w)
    _store_rounded(out_ptr + offs, w * b + (1.0 - w) * a, mask)


def _float32(t: float) -> float:
    """t rounded to float32 on the host (an infinity where it overflows), as reference._scalar rounds it."""
    with np.errstate(over="ignore"):
        return float(np.float32(t))


def nearswap_chunk(base: torch.Tensor, other: torch.Tensor, t: float, out: torch.Tensor,
                   nonfinite: torch.Tensor | None = None) -> torch.Tensor:
    """nearswap of one chunk into `out`: bit-identical to `reference.nearswap_torch(base, other, t, out.dtype)`.

    `base` and `other` are 1-D contiguous chunks of the same length on one CUDA device (or CPU under
    TRITON_INTERPRET=1), each bfloat16, float16 or float32; `out` the same length, any of the three dtypes.
    `nonfinite` (optional, int64 [2] on that device): slot 0 += the other model's NaN / Inf count, slot 1 the
    base's. triton_merge.merge_chunk calls this for `ChunkParams.nearswap`."""
    check_device(other, "other")
    for what, x in (("base", base), ("other", other), ("out", out)):
        if x.dtype not in SUPPORTED_DTYPES or x.dim() != 1 or x.numel() != out.numel() or x.device != out.device:
            raise ValueError(f"{what}: {x.dtype} {tuple(x.shape)} on {x.device}; nearswap_chunk takes 1-D chunks "
                             f"of one length and device, in {', '.join(map(str, SUPPORTED_DTYPES))}")
        if x.numel() > 1 and x.stride(0) != 1:
            raise ValueError(f"{what} is not contiguous")
    if nonfinite is not None and (nonfinite.dtype != torch.int64 or nonfinite.shape != (2,)
                                  or nonfinite.device != out.device):
        raise ValueError(f"nonfinite must be an int64 tensor of 2 counters on {out.device}")
    n = out.numel()
    if n == 0:
        return out
    with launch_guard():
        _nearswap_kernel[(triton.cdiv(n, BLOCK),)](
            out, base, other, nonfinite if nonfinite is not None else out, _float32(t), n,
            COUNT=nonfinite is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
    return out
