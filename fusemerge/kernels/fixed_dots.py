"""Exact dot products of whole tensors, for the methods whose weights come from angles (slerp, model_stock,
nuslerp).

`gram_sums` runs their statistics pass: for vectors v_0 .. v_{m-1} (the models themselves for slerp and a
nuslerp without a base, the deltas x_i - base for model_stock and a nuslerp with one) it finds every
<v_i, v_j>, i <= j, over a tensor's chunks. Each sum is exact up to 2^-32 of a fixed-point unit, so it is the
same for every chunking, device and backend:

- pass 1: the largest |v_i| (backend.max_abs, all of them in one read); after a NaN or infinite entry there
  is no pass 2 (None: the angle has no meaning, and the methods fall back to fixed weights);
- pass 2: a product of two float32 values is exact in float64; scaled by the power of two 2^S (S from the
  pair's largest possible product, `shift_for`, so each scaled product is below 2^32) it splits into its
  integer part and 32 bits of fraction. backend.gram_fixed sums both over a chunk as integers (the CPU's
  compiled loop, the Triton kernel in triton_select.py, or `gram_fixed_torch`: the same integers), and the
  chunks' sums are added as Python integers.

(mergekit sums in float32: its cosine was off by 8e-5 on a 1M-entry tensor of bench/compare_mergekit.py's
model, docs/mergekit.md.)
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

# A block's sums add up to 2^20 integers below 2^32: every partial sum is an integer below 2^52, so float64
# adds them exactly, in whatever order a device reduces them.
BLOCK = 1 << 20
PRODUCT_BITS = 32  # each scaled product is below 2^32
FRACTION_BITS = 32  # bits of each scaled product's fraction kept: the sums are exact up to 2^-(S + 32)

Pair = tuple[int, int]


def shift_for(max_product: float) -> int:
    """The power of two S for which every |product| * 2^S is below 2^PRODUCT_BITS."""
    _, e = math.frexp(max_product)  # max_product < 2^e
    return PRODUCT_BITS - e


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


def gram_fixed_torch(base: torch.Tensor | None, xs: list[torch.Tensor], shifts: dict[Pair, int]
                     ) -> dict[Pair, tuple[int, int]]:
    """reference.gram_fixed in torch operations: the vectors are float32(x_i) - float32(base), or the x_i."""
    vs = [x.float() - base.float() for x in xs] if base is not None else [x.float() for x in xs]
    return {(i, j): dot_fixed_torch(vs[i], vs[j], s) for (i, j), s in shifts.items()}


def gram_sums(backend: ModuleType, segments: list[Segment], chunk: int, m: int, deltas: bool
              ) -> dict[Pair, float] | None:
    """<v_i, v_j> for every i <= j < m over the tensor of `segments`, read `chunk` entries at a time, with v_i
    the m models of the segments (deltas False) or the deltas x_i - x_0 of models 1..m from model 0 (deltas
    True); where the segments have a base (a delta method's chunks), the deltas of the m models from it. None
    where an entry of some v_i is NaN or infinite. A vector of zeros needs no second pass."""
    from fusemerge.kernels.select import _chunks, largest

    def vectors(base: torch.Tensor | None, models: list[torch.Tensor]
                ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        if base is not None:
            return base, models
        return (models[0], models[1:]) if deltas else (None, models)

    top = [0.0] * m
    for _, given, models in _chunks(segments, chunk):
        base, xs = vectors(given, models)
        if xs[0].numel():
            top = [largest(t, v) for t, v in zip(top, backend.max_abs(base, xs), strict=True)]
    if not all(math.isfinite(v) for v in top):
        return None
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    shifts = {p: shift_for(top[p[0]] * top[p[1]]) for p in pairs if top[p[0]] * top[p[1]] > 0.0}
    sums = dict.fromkeys(shifts, 0)
    if shifts:
        for _, given, models in _chunks(segments, chunk):
            for p, (whole, part) in backend.gram_fixed(*vectors(given, models), shifts).items():
                sums[p] += (whole << FRACTION_BITS) + part
    return {p: math.ldexp(float(sums[p]), -(shifts[p] + FRACTION_BITS)) if p in shifts else 0.0 for p in pairs}


def gram_matrix(dots: dict[Pair, float], m: int) -> list[list[float]]:
    """gram_sums' sums (i <= j) as the full symmetric m x m matrix."""
    return [[dots[(min(i, j), max(i, j))] for j in range(m)] for i in range(m)]


def combination_norm(c: list[float], gram: list[list[float]]) -> float:
    """|| sum c_i v_i || of the vectors whose Gram matrix is `gram`, in float64 (karcher's and multislerp's
    iterates, kept as coefficients)."""
    k = len(c)
    return math.sqrt(max(sum(c[i] * c[j] * gram[i][j] for i in range(k) for j in range(k)), 0.0))


def slice_shifts(top: torch.Tensor) -> torch.Tensor:
    """float64, per slice: the power of two S for which every |product| * 2^S of the slice is below 2^PRODUCT_BITS,
    `top` (float64) bounding them (shift_for, vectorized; 0 for a slice whose bound is 0)."""
    _, e = torch.frexp(torch.where(top > 0, top, torch.ones_like(top)))  # top < 2^e
    return (PRODUCT_BITS - e).to(torch.float64)


def fixed_parts(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-point sums along `dim` of p = x * y * 2^shift (float32 [rows, cols] inputs, `shift` broadcast along
    `dim`): (sum of trunc(p), sum of trunc((p - trunc(p)) * 2^32)) as float64 integers, exact whatever the device's
    summation order while a slice holds fewer than 2^21 entries (each term is below 2^32)."""
    p = torch.ldexp(x.to(torch.float64).mul_(y.to(torch.float64)), shift)  # exact: 48-bit products, a power of 2
    whole = p.trunc()
    part = p.sub_(whole).mul_(2.0**FRACTION_BITS).trunc_()
    return whole.sum(dim=dim), part.sum(dim=dim)


def fixed_value(whole: torch.Tensor, part: torch.Tensor, shift: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """float64 sums from fixed_parts' integer sums (added over any number of chunks): (whole + part 2^-32) 2^-shift,
    0 where the slice's bound `top` is 0."""
    total = whole.to(torch.float64).add_(part.to(torch.float64).mul_(2.0**-FRACTION_BITS))
    return torch.where(top > 0, torch.ldexp(total, -shift), torch.zeros_like(total))


def row_gram(vs: list[torch.Tensor]) -> tuple[dict[Pair, torch.Tensor], torch.Tensor]:
    """Every <v_i, v_j>, i <= j, per row of the vectors (float32 [rows, cols]), exact to 2^-32 of a fixed-point unit
    set per row and pair as gram_sums' are, so the same on every device; and which rows are finite (where a row of
    some v_i holds a NaN or Inf its sums are not computed: 0)."""
    top = [v.abs().amax(dim=1).to(torch.float64) for v in vs]
    finite = torch.stack([torch.isfinite(t) for t in top]).all(dim=0)
    top = [torch.where(finite, t, torch.zeros_like(t)) for t in top]
    dots = {}
    for i in range(len(vs)):
        for j in range(i, len(vs)):
            bound = top[i] * top[j]
            shift = slice_shifts(bound)
            whole, part = fixed_parts(vs[i], vs[j], shift.unsqueeze(1), dim=1)
            dots[(i, j)] = fixed_value(whole, part, shift, bound)
    return dots, finite
