"""nuslerp's two weights for a tensor: the angle between two models (or their deltas), from exact sums.

mergekit (merge_methods/nuslerp.py, `nuslerp_flatten: true`, its default; false: one arc per row, `row_weights`
below) takes exactly two models besides the
optional base, with weights w_0, w_1, and the whole tensor as one vector:

    t = w_1 / (w_0 + w_1)            (0.5 where |w_0 + w_1| < 1e-6)
    v_0, v_1 = the two models' tensors, or with a base_model their deltas x_i - base
    n_i = max(||v_i||, 1e-7)
    cos = clamp(<v_0, v_1> / (n_0 n_1), -1, 1)
    1 - cos^2 <= 1e-16:  (1 - t) v_0 + t v_1                     (colinear: linear interpolation, see below)
    otherwise:           sin((1 - t) th) / sin th * v_0 + sin(t th) / sin th * v_1,   th = acos(cos)
    result = that, or with a base_model: base + that

So the result is a weighted sum a v_0 + b v_1: without a base the `linear` kernels' sum of the two models, with
one the task-arithmetic kernels' base + a d_0 + b d_1 (float32 products, added in order, rounded once), which
keeps mergekit's order of operations (the same sum as the weights (1 - a - b, a, b) of three models would lose
the deltas to cancellation where a + b is large, near antiparallel deltas). This file finds (a, b):
`nuslerp_weights` runs the statistics pass (kernels/fixed_dots.py: ||v_0||^2, ||v_1||^2 and <v_0, v_1>, exact up
to 2^-32 of a fixed-point unit, so the same for every chunking, device and backend) and `weights_from_sums`
applies the rule above in float64, the weights rounded to float32, but for the colinear test, which is
mergekit's in float32: 1 - cos^2 <= 1e-16 holds in float32 only where cos rounds to +-1 (|cos| > 1 - 2^-25). In
float64 it would hold for exactly parallel vectors only, and near antiparallel ones sin th -> 0 makes the
arc's weights grow without bound (1.5e7 for two deltas that are negatives of each other but for float32
rounding): mergekit's float32 test takes the linear branch there. (mergekit computes cos in float32 or the
config's dtype; within its rounding of 1 - 2^-25 the two tools may take different branches.) A zero vector
has cos = 0, as in mergekit (its norm counts as 1e-7): the quarter arc. Where an entry is NaN or infinite the
angle has no meaning: the weights are the linear ones, (1 - t, t), so only those entries are non-finite in
the output (mergekit's are all NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusemerge.kernels.fixed_dots import gram_sums

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

NORM_EPS = 1e-7  # mergekit's: the smallest norm a vector is divided by
COLINEAR_EPS = 1e-8  # mergekit's: 1 - cos^2 at most its square counts as colinear
WEIGHT_SUM_EPS = 1e-6  # mergekit's: weights adding up to less than this (in absolute value) give t = 0.5


def t_from_weights(w0: float, w1: float) -> float:
    """The interpolation factor of the two models' weights, as mergekit finds it (Python floats: float64).

    >>> t_from_weights(1.0, 3.0), t_from_weights(0.5, -0.5)
    (0.75, 0.5)
    """
    total = w0 + w1
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else w1 / total


def lerp_weights(t: float) -> tuple[float, float]:
    """(1 - t, t) rounded to float32 (mergekit multiplies its float32 tensors by the float64 1 - t and t)."""
    return float(np.float32(1.0 - t)), float(np.float32(t))


def weights_from_sums(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(a, b), rounded to float32, from ||v_0||^2, ||v_1||^2 and <v_0, v_1> (mergekit's rule, in float64).

    >>> weights_from_sums(0.5, 1.0, 1.0, 0.0)  # orthogonal unit vectors: the midpoint of the quarter arc
    (0.7071067690849304, 0.7071067690849304)
    >>> weights_from_sums(0.25, 4.0, 1.0, -2.0)  # antiparallel: linear interpolation
    (0.75, 0.25)
    """
    n0 = max(math.sqrt(aa), NORM_EPS)
    n1 = max(math.sqrt(bb), NORM_EPS)
    cos = min(1.0, max(-1.0, ab / (n0 * n1)))
    c32 = np.float32(cos)
    if np.float32(1.0) - c32 * c32 <= np.float32(COLINEAR_EPS**2):  # mergekit's test, in its float32
        return lerp_weights(t)
    theta = math.acos(cos)
    s = math.sin(theta)
    return float(np.float32(math.sin((1.0 - t) * theta) / s)), float(np.float32(math.sin(t * theta) / s))


def nuslerp_weights(backend: ModuleType, segments: list[Segment], chunk: int, weights: list[float]
                    ) -> tuple[float, float]:
    """The weights (a, b) of the two vectors of `segments` for the models' `weights` (w_0, w_1), read `chunk`
    entries at a time by `backend`'s statistics functions (fixed_dots.gram_sums: two passes over the chunks).
    The vectors are the two models of each chunk, or their deltas from the chunk's base where it has one."""
    t = t_from_weights(*weights)
    dots = gram_sums(backend, segments, chunk, 2, deltas=False)
    if dots is None:
        return lerp_weights(t)
    return weights_from_sums(t, dots[(0, 0)], dots[(1, 1)], dots[(0, 1)])


def row_weights(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`nuslerp_flatten: false` (mergekit: one arc per row of the last dimension): the float32 weights (a, b) of
    each row of the two vectors (float32 [rows, cols]), weights_from_sums applied to the row's exact sums
    (fixed_dots.row_gram); the trigonometry runs on the host in Python's math, as for a whole tensor, so the weights
    are the same on every device. A row with a NaN or infinite entry takes the linear weights."""
    from fusemerge.kernels.fixed_dots import row_gram

    dots, finite = row_gram([v0, v1])
    sums = torch.stack([dots[(0, 0)], dots[(1, 1)], dots[(0, 1)]]).cpu().tolist()
    ok = finite.cpu().tolist()
    pairs = [weights_from_sums(t, aa, bb, ab) if good else lerp_weights(t)
             for aa, bb, ab, good in zip(*sums, ok, strict=True)]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=v0.device)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=v0.device)
    return a, b


def merge_rows(base: torch.Tensor | None, models: list[torch.Tensor], cols: int, t: float, out_dtype: torch.dtype
               ) -> torch.Tensor:
    """One chunk (whole rows) of a per-row nuslerp: each row a x_0 + b x_1 (no base), or base + (a d_0 + b d_1)
    with one, as the whole-tensor merge's kernels sum (float32 products, added in order, rounded once)."""
    return _combine(base, models, cols, lambda v0, v1: (w.unsqueeze(1) for w in row_weights(v0, v1, t)), out_dtype)


def _combine(base: torch.Tensor | None, models: list[torch.Tensor], cols: int, weigh, out_dtype: torch.dtype
             ) -> torch.Tensor:
    """a v_0 + b v_1 over a chunk seen as rows of `cols` (v_i the models, or their deltas from `base`, then added
    to it), (a, b) = weigh(v_0, v_1) broadcast over the rows; float32, rounded once."""
    from fusemerge.kernels.reference import _rounded

    x0, x1 = (m.to(torch.float32).reshape(-1, cols) for m in models)
    b32 = base.to(torch.float32).reshape(-1, cols) if base is not None else None
    v0, v1 = (x0 - b32, x1 - b32) if b32 is not None else (x0, x1)
    a, b = weigh(v0, v1)
    out = (v0 * a).add_(v1 * b)
    if b32 is not None:
        out = b32 + out
    return _rounded(out.reshape(-1), out_dtype)


def column_weights(segments: list[Segment], chunk: int, t: float, cols: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`nuslerp_flatten: false` with `nuslerp_row_wise: true` (mergekit: one arc per index of dimensions 1.. , the
    vector along dimension 0; `cols` = their product, 1 for a 1-D tensor): the float32 weights (a, b) of each such
    column, from its exact sums over every chunk (whole rows of `cols`): a pass for each column's largest
    magnitudes, then one for its fixed-point sums (fixed_dots' rule, one shift per column, the chunks' integer sums
    added exactly as int64), then weights_from_sums per column on the host. A column with a NaN or infinite entry
    takes the linear weights."""
    from fusemerge.kernels.fixed_dots import fixed_parts, fixed_value, slice_shifts
    from fusemerge.kernels.select import _chunks

    def vectors(base: torch.Tensor | None, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        vs = [x.to(torch.float32) - base.to(torch.float32) if base is not None else x.to(torch.float32) for x in xs]
        return [v.reshape(-1, cols) for v in vs]

    top: list[torch.Tensor] | None = None
    for _, base, xs in _chunks(segments, chunk):
        found = [v.abs().amax(dim=0).to(torch.float64) for v in vectors(base, xs)] if xs[0].numel() else None
        if found is not None:
            top = found if top is None else [torch.maximum(a, b) for a, b in zip(top, found, strict=True)]
    if top is None:
        return lerp_weights(t)[:1] * cols, lerp_weights(t)[1:] * cols
    finite = torch.isfinite(top[0]) & torch.isfinite(top[1])
    top = [torch.where(finite, x, torch.zeros_like(x)) for x in top]
    bounds = {(0, 0): top[0] * top[0], (1, 1): top[1] * top[1], (0, 1): top[0] * top[1]}
    shifts = {key: slice_shifts(bound) for key, bound in bounds.items()}
    whole = {key: torch.zeros(cols, dtype=torch.int64, device=top[0].device) for key in bounds}
    part = {key: torch.zeros(cols, dtype=torch.int64, device=top[0].device) for key in bounds}
    for _, base, xs in _chunks(segments, chunk):
        if not xs[0].numel():
            continue
        v = vectors(base, xs)
        for (i, j), s in shifts.items():  # a chunk's integer sums, then added over the chunks exactly as int64
            w, f = fixed_parts(v[i], v[j], s, dim=0)
            whole[(i, j)] += w.to(torch.int64)
            part[(i, j)] += f.to(torch.int64)
    sums = {key: fixed_value(whole[key], part[key], s, bounds[key]).cpu().tolist() for key, s in shifts.items()}
    ok = finite.cpu().tolist()
    found = [weights_from_sums(t, aa, bb, ab) if good else lerp_weights(t)
             for aa, bb, ab, good in zip(sums[(0, 0)], sums[(1, 1)], sums[(0, 1)], ok, strict=True)]
    return tuple(w[0] for w in found), tuple(w[1] for w in found)


def merge_columns(base: torch.Tensor | None, models: list[torch.Tensor], a: Sequence[float], b: Sequence[float],
                  out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk (whole rows of len(a) columns) of a per-column nuslerp: a_c x_0 + b_c x_1, or base + (a_c d_0 +
    b_c d_1), as merge_rows sums."""
    def weigh(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(w, dtype=torch.float32, device=v0.device) for w in (a, b))

    return _combine(base, models, len(a), weigh, out_dtype)
