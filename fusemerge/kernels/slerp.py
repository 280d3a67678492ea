"""slerp's two weights for a tensor: the angle between the base and the other model, from exact sums.

mergekit (merge_methods/slerp.py) interpolates a whole tensor `a` (the base model's) and `b` (the other
model's) along the arc between them, in float32:

    na = ||a||, nb = ||b||           (a norm <= 1e-8 counts as 1)
    dot = clamp(<a, b> / (na nb), -1, 1)
    |dot| > 0.9995:  (1 - t) a + t b                            (nearly parallel: linear interpolation)
    otherwise:       sin((1 - t) th) / sin th * a + sin(t th) / sin th * b,   th = acos(dot)

The merged tensor is the weighted sum w_a a + w_b b, which the `linear` kernels compute as they do for
`linear` (float32 products, added base first, rounded once). This file finds (w_a, w_b): `slerp_weights`
runs the statistics pass over the tensor's chunks and `weights_from_sums` turns its sums into the two weights.

The three sums ||a||^2, ||b||^2 and <a, b> are exact up to 2^-32 of a fixed-point unit, and so the same for
every chunking, device and thread count: a product of two float32 values is exact in float64; scaled by the
power of two 2^S (S from the tensor's largest product, so each scaled product is below 2^32) it splits into
its integer part and 32 bits of fraction, each summed in float64 over a block of at most 2^20 entries (sums
of integers below 2^52: exact in any order) and the blocks' sums added as Python integers. (mergekit sums
in float32, norms of chunk norms: its cosine was off by 8e-5 on a 1M-entry tensor of bench/compare_mergekit.py's
model, its weights by 1e-5 of their sum, and where |dot| is that close to 0.9995 it may pick the other branch.)
Where an entry of `a` or `b` is NaN or infinite, the angle has no meaning: the weights are the linear ones,
(1 - t, t), so only those entries are non-finite in the output (mergekit's are all NaN).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusemerge.kernels import cpu_fused

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

DOT_THRESHOLD = 0.9995  # mergekit's: above it (in absolute value) the two tensors count as parallel
EPS = 1e-8  # mergekit's: a norm at most this is not divided by
# A block's sums add up to 2^20 integers below 2^32: every partial sum is an integer below 2^52, so float64
# adds them exactly, in whatever order a device reduces them.
BLOCK = 1 << 20
PRODUCT_BITS = 32  # each scaled product is below 2^32
FRACTION_BITS = 32  # bits of each scaled product's fraction kept: the sums are exact up to 2^-(S + 32)


def lerp_weights(t: float) -> tuple[float, float]:
    """(1 - t, t) as mergekit computes them: t rounded to float32, then 1 - t in float32."""
    t32 = np.float32(t)
    return float(np.float32(np.float32(1.0) - t32)), float(t32)


def weights_from_sums(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(w_a, w_b), rounded to float32, from ||a||^2, ||b||^2 and <a, b> (mergekit's rule, in float64).

    >>> weights_from_sums(0.5, 1.0, 1.0, 0.0)  # orthogonal unit vectors: the midpoint of the quarter arc
    (0.7071067690849304, 0.7071067690849304)
    >>> weights_from_sums(0.25, 4.0, 4.0, 4.0)  # parallel: linear interpolation
    (0.75, 0.25)
    """
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    dot = min(1.0, max(-1.0, ab / na / nb))
    if abs(dot) > DOT_THRESHOLD:
        return lerp_weights(t)
    theta = math.acos(dot)
    t = float(np.float32(t))
    s = math.sin(theta)
    return float(np.float32(math.sin((1.0 - t) * theta) / s)), float(np.float32(math.sin(t * theta) / s))


def shift_for(max_product: float) -> int:
    """The power of two S for which every |product| * 2^S is below 2^PRODUCT_BITS."""
    _, e = math.frexp(max_product)  # max_product < 2^e
    return PRODUCT_BITS - e


def fixed_sum(x: torch.Tensor, y: torch.Tensor, shift: int) -> int:
    """sum(x * y) * 2^(shift + FRACTION_BITS) as an integer, truncated term by term (x, y: 1-D float chunks):
    on CPU by a compiled loop (cpu_fused.dot_fixed), else by torch operations (dot_fixed_torch); the same
    integers."""
    sums = cpu_fused.dot_fixed(x, y, shift) if x.device.type == "cpu" else None
    whole, part = sums if sums is not None else dot_fixed_torch(x, y, shift)
    return (whole << FRACTION_BITS) + part


def dot_fixed_torch(x: torch.Tensor, y: torch.Tensor, shift: int) -> tuple[int, int]:
    """(sum of trunc(p), sum of trunc((p - trunc(p)) * 2^32)) for p = x * y * 2^shift, in torch operations on
    x's device (float64 temporaries of at most BLOCK entries)."""
    whole = part = 0
    for s in range(0, x.numel(), BLOCK):
        p = x[s:s + BLOCK].to(torch.float64)
        p.mul_(y[s:s + BLOCK].to(torch.float64)).mul_(2.0 ** shift)  # exact: 48-bit products, a power of two
        w = p.trunc()
        f = p.sub_(w).mul_(2.0 ** FRACTION_BITS).trunc_()
        sums = torch.stack([w.sum(), f.sum()]).tolist()  # integers below 2^52, exact
        whole, part = whole + int(sums[0]), part + int(sums[1])
    return whole, part


def slerp_weights(segments: list[Segment], chunk: int, t: float) -> tuple[float, float]:
    """The weights (w_a, w_b) of tensor (a, b) = the two models of `segments` (the base's first), read `chunk`
    entries at a time: one pass for the largest magnitudes, one for the sums (a and b when they are resident)."""
    from fusemerge.kernels.select import _chunks, largest

    top = [0.0, 0.0]
    for _, _, (a, b) in _chunks(segments, chunk):
        for i, x in enumerate((a, b)):
            if x.numel():
                m = float(x.abs().max())
                top[i] = largest(top[i], m)
    if not all(math.isfinite(m) for m in top):
        return lerp_weights(t)
    pairs = [(0, 0), (1, 1), (0, 1)]  # ||a||^2, ||b||^2, <a, b>; a zero tensor's sums are 0 without a pass
    live = [k for k, (i, j) in enumerate(pairs) if top[i] * top[j] > 0.0]
    shifts = [shift_for(top[i] * top[j]) if k in live else 0 for k, (i, j) in enumerate(pairs)]
    sums = [0, 0, 0]
    if live:
        for _, _, ab in _chunks(segments, chunk):
            for k in live:
                i, j = pairs[k]
                sums[k] += fixed_sum(ab[i], ab[j], shifts[k])
    aa, bb, ab = (math.ldexp(float(v), -(s + FRACTION_BITS)) for v, s in zip(sums, shifts, strict=True))
    return weights_from_sums(t, aa, bb, ab)
