"""SCE (mergekit's `sce`, arXiv:2408.07990): Select the entries whose deltas vary most across the experts,
Calculate each expert's weight from its selected deltas, Erase the deltas whose sign disagrees with the elected
one, then average the rest with those weights.

Per tensor, with d_i = float32(x_i) - float32(base) and N experts (mergekit/merge_methods/sce.py):

- select, where `select_topk` < 1: v = the population variance over i of the d_i, per entry, computed in float64
  and rounded to float32 (mergekit: torch.var(unbiased=False) on float32, which accumulates in double on CPU); the
  k = int(count_nonzero(v) * select_topk) entries (a float32 product, as mergekit's) of largest v are kept in
  every expert, the rest set to d * 0. Ties at the k-th value are kept lowest index first (mergekit: torch.topk's
  order): `select.top_cuts` on the float32 bits of v, an exact selection over the tensor's chunks. select_topk >= 1
  keeps every entry, k = 0 none;
- weights: m_i = float32(sum of the kept d_i^2 / n) (exact fixed-point sums, fixed_dots), S = m_0 + m_1 + ...
  in float32, w_i = float32(m_i / S), or float32(1 / N) each where |S| < 1e-6 (mergekit's sce_weight, whose
  float32 mean rounds differently in the last bits);
- per entry: s = d_0 + d_1 + ... (kept), g = +1 where s >= 0 else -1; e_i = w_i where sign(d_i) == g (a zero delta
  agrees with neither sign), else 0; out = base + (d_0 e_0 + d_1 e_1 + ...) / max(e_0 + e_1 + ..., 1e-6), each
  sum from +0.0 in expert order, one float32 operation at a time, rounded once to the output dtype.

The merge runs as torch operations on every backend (on a GPU, on the chunk's device): the variance and the
selected set need more than the fused kernel's per-expert threshold. Reads of a tensor not held whole: one for
the non-zero count and the deltas' largest magnitudes, the selection's (select_topk < 1), one for the sums of
squares, one for the merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from fusemerge.kernels.params import EMPTY_C, EMPTY_T, ChunkParams
from fusemerge.kernels.select import Segment, _chunks, largest, top_cuts

F32 = torch.float32
F64 = torch.float64
SELECT_TOPK = 1.0  # mergekit's default: no selection
WEIGHT_FLOOR = 1e-6  # mergekit: below this weight sum, every expert weighs 1 / N
DIVISOR_FLOOR = 1e-6  # mergekit: clamp(min=1e-6) of each entry's agreeing weight sum


def deltas(base: torch.Tensor, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    b = base.to(F32)
    return [x.to(F32) - b for x in xs]


def variance(ds: Sequence[torch.Tensor]) -> torch.Tensor:
    """float32 of the population variance over the experts of each entry, computed in float64 in expert order:
    mean = (d_0 + d_1 + ...) / N, then ((d_0 - mean)^2 + ...) / N. Three float64 temporaries at a time (24 bytes
    per entry, what the planner's per-element budget allows for), whatever N."""
    mean = ds[0].to(F64)
    for d in ds[1:]:
        mean.add_(d.to(F64))
    mean.div_(len(ds))
    acc = torch.zeros_like(mean)
    for d in ds:
        acc.add_(d.to(F64).sub_(mean).square_())
    return acc.div_(len(ds)).to(F32)


def selected(ds: Sequence[torch.Tensor], start: int, cut: tuple[int, int]) -> torch.Tensor:
    """The kept entries of a chunk (bool): the top set of the variance's float32 bits by threshold and index cut."""
    from fusemerge.kernels.reference import in_top

    bits = variance(ds).view(torch.int32) & 0x7FFFFFFF
    return in_top(bits, start, *cut)


def _kept(ds: list[torch.Tensor], start: int, cut: tuple[int, int] | None) -> list[torch.Tensor]:
    """The deltas after the selection: d * 1.0 where kept, d * 0.0 elsewhere (mergekit multiplies by the mask)."""
    if cut is None:
        return ds
    keep = selected(ds, start, cut).to(F32)
    return [d.mul_(keep) for d in ds]


def _variance_segments(segments: list[Segment]) -> list[Segment]:
    """Segments whose one "expert" is v and whose base is 0, so top_cuts ranks the entries by v's bits. Never
    `whole`: the bracket select would load v of the whole tensor at once, and its float64 temporaries (24 bytes
    per entry) with it; the radix select reads it a chunk at a time."""
    def wrap(seg: Segment) -> Segment:
        def load(s: int, c: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
            base, xs = seg.load(s, c)
            v = variance(deltas(base, xs))
            return torch.zeros_like(v), [v]

        return Segment(seg.numel, load)

    return [wrap(s) for s in segments]


def sce_params(backend: ModuleType, segments: list[Segment], chunk: int, select_topk: float,
               keep_bytes: int | None = None) -> ChunkParams:
    """A tensor's SCE statistics (the selection's cut, the N weights) as the ChunkParams its chunks merge with."""
    numel = sum(s.numel for s in segments)
    nonzero, top, n = 0, None, None
    for _, base, xs in _chunks(segments, chunk):
        n = len(xs)
        if not xs[0].numel():
            continue
        if select_topk < 1.0:
            nonzero += int(torch.count_nonzero(variance(deltas(base, xs))))
        found = backend.max_abs(base, xs)
        top = found if top is None else [largest(t, v) for t, v in zip(top, found, strict=True)]
    if n is None:
        raise ValueError("SCE needs at least one expert")
    cut: tuple[int, int] | None = None
    if select_topk < 1.0:
        # mergekit: int(count_nonzero(v) * select_topk), an int64 tensor times a float: a float32 product
        k = int(np.float32(np.float32(nonzero) * np.float32(select_topk))) if select_topk > 0 else 0
        cut = (EMPTY_T, EMPTY_C) if k == 0 else top_cuts(backend, _variance_segments(segments), chunk, [[k]],
                                                          keep_bytes=keep_bytes)[0][0]
    means = _mean_squares(backend, segments, chunk, n, numel, top, cut)
    return ChunkParams(sparsifier="sce", consensus="sign", linear=False, weights=sce_weights(means),
                       sce_cut=cut)


def _mean_squares(backend: ModuleType, segments: list[Segment], chunk: int, n: int, numel: int,
                  top: list[float] | None, cut: tuple[int, int] | None) -> list[float]:
    """float32(sum of each expert's kept d^2 / numel): exact fixed-point sums (fixed_dots), NaN where some d is
    not finite (mergekit's float32 mean is NaN or Inf there)."""
    from fusemerge.kernels import fixed_dots

    if top is None or numel == 0:
        return [float("nan")] * n
    if not all(math.isfinite(v) for v in top):
        return [float("nan")] * n
    shifts = {(i, i): fixed_dots.shift_for(top[i] * top[i]) for i in range(n) if top[i] > 0.0}
    sums = dict.fromkeys(shifts, 0)
    if shifts:
        for start, base, xs in _chunks(segments, chunk):
            kept = _kept(deltas(base, xs), start, cut)
            for p, (whole, part) in backend.gram_fixed(None, kept, shifts).items():
                sums[p] += (whole << fixed_dots.FRACTION_BITS) + part
    out = []
    for i in range(n):
        if (i, i) not in shifts:
            out.append(0.0)
            continue
        exact = math.ldexp(float(sums[(i, i)]), -(shifts[(i, i)] + fixed_dots.FRACTION_BITS))
        out.append(float(np.float32(exact / numel)))
    return out


def sce_weights(means: Sequence[float]) -> tuple[float, ...]:
    """mergekit's sce_weight from the experts' mean squares: each over their float32 sum, or 1 / N each where that
    sum is below 1e-6 in magnitude (float32 operations)."""
    f32 = np.float32
    m = [f32(v) for v in means]
    total = f32(0.0)
    for v in m:
        total = f32(total + v)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if abs(float(total)) < WEIGHT_FLOOR:
            return tuple(float(f32(1.0) / f32(len(m))) for _ in m)
        return tuple(float(f32(v / total)) for v in m)


def merge_sce(base: torch.Tensor, experts: Sequence[torch.Tensor], start: int, p: ChunkParams,
              out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk of an SCE merge in torch operations (float32 unrounded until the end): the module docstring's
    per-entry rule."""
    from fusemerge.kernels.reference import _rounded, _scalar

    device = base.device
    b = base.to(F32)
    ds = _kept(deltas(b, experts), start, p.sce_cut)
    s = torch.zeros_like(b)
    for d in ds:
        s.add_(d)
    g = torch.where(s >= 0, _scalar(1.0, device), _scalar(-1.0, device))
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for d, w in zip(ds, p.weights, strict=True):
        e = (torch.sign(d) == g).to(F32).mul_(_scalar(w, device))
        num.add_(d.mul_(e))
        den.add_(e)
    den.clamp_min_(DIVISOR_FLOOR)
    return _rounded(b + num.div_(den), out_dtype)
