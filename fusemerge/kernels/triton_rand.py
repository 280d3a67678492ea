"""DARE's Philox stream on the GPU as numbers: the float32 uniforms ``tl.rand(key, j)`` for a run of global
indices j in [start, start + n), the stream the merge kernel's DARE branch draws (triton_merge._product) and
kernels/philox.py reproduces on CPU (docs/METHODS: the random-stream rules).

Who needs the numbers themselves rather than the merge kernel: DELLA (kernels/della.py), whose keep
probability comes from each entry's rank in its row (a sort, done by torch on the chunk's device), and the
torch backend's DARE masks on a GPU. Drawn by torch's integer ops (philox._uniform_torch), Philox costs about
120 launches and five int64 temporaries per 2^22 entries; here it is one launch that writes 4 bytes per entry.

The key arrives in a 1-element int64 tensor, not as a scalar argument: Triton types an integer argument by
its value (i32 when it fits), which would change how tl.rand splits a small or negative key into its two
32-bit words, and would compile one variant per key range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusemerge.kernels.triton_merge import check_device, launch_guard

BLOCK = 1024
NUM_WARPS = 4


@triton.jit(do_not_specialize=["start", "n"])
def _uniform_kernel(out_ptr, key_ptr, start, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = tl.cast(start, tl.int64) + offs
    tl.store(out_ptr + offs, tl.rand(tl.load(key_ptr), j), mask=mask)


def uniform_run(key: int, start: int, n: int, device: torch.device | str) -> torch.Tensor:
    """float32 [n] on `device`: ``philox.philox_rand(key, torch.arange(start, start + n))``, bit for bit.
    `device` is CUDA, or CPU under TRITON_INTERPRET=1 (tests)."""
    if start < 0 or n < 0 or start + n > (1 << 63):
        raise ValueError(f"entries [{start}, {start + n}) are outside [0, 2^63)")
    if not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"Philox key {key} does not fit in 64 bits")
    out = torch.empty(n, dtype=torch.float32, device=device)
    check_device(out, "the uniforms' buffer")
    if n == 0:
        return out
    signed = key - (1 << 64) if key >= (1 << 63) else key
    key_t = torch.tensor([signed], dtype=torch.int64).to(out.device)
    with launch_guard():
        _uniform_kernel[(triton.cdiv(n, BLOCK),)](out, key_t, start, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
