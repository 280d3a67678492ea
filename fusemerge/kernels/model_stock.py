"""model_stock's weights for a tensor: how far the base moves toward the models' average, from their angles.

mergekit (merge_methods/model_stock.py, the paper's rule per tensor, `filter_wise: false`; per row with
`filter_wise: true`, `row_weights` below), for a base tensor
w_0 and N >= 2 others w_1 .. w_N, with deltas d_i = w_i - w_0:

    cos_ij = clamp(<d_i, d_j> / max(||d_i|| ||d_j||, 1e-6), -1, 1)       every pair i < j
    cos = the mean of the cos_ij;  den = 1 + (N - 1) cos
    t = N cos / den   (0 where |den| < 1e-6: the base is kept)
    result = t * (w_1 + ... + w_N) / N + (1 - t) * w_0

So the result is the weighted sum (1 - t) w_0 + (t / N) w_1 + ... + (t / N) w_N, which the `linear` kernels
compute; this file finds those N + 1 weights. The norms and dot products of the deltas (float32, as every
delta: METHODS.md) are the fixed-point sums of kernels/fixed_dots.py (exact to 2^-32 of a unit set by the
largest product; all pairs in one read of a chunk), so the weights are the same for every chunking, device,
backend and thread count; the cosines and t are found in float64 and the weights rounded to float32.
(mergekit computes all of it in float32.) Where a delta is NaN or infinite the angles have no meaning: the
weights are those of t = 1, the models' average, so the result is non-finite only where an input is (NaN where
the base is infinite: 0 * inf); mergekit's tensor becomes NaN everywhere.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusemerge.kernels.fixed_dots import gram_sums, row_gram

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

EPS = 1e-6  # mergekit's: the smallest norm product a dot product is divided by, and the singular |den|


def weights_from_cosine(cos: float, n: int) -> tuple[float, ...]:
    """(1 - t, t / n, ..., t / n) as float32 values for the mean pairwise cosine `cos` of n deltas.

    >>> weights_from_cosine(1.0, 3)  # identical deltas: t = 1, the models' average
    (0.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408)
    >>> weights_from_cosine(0.0, 2)  # orthogonal deltas: t = 0, the base
    (1.0, 0.0, 0.0)
    """
    den = 1.0 + (n - 1) * cos
    t = 0.0 if abs(den) < EPS else n * cos / den
    return (float(np.float32(1.0 - t)), *(float(np.float32(t / n)),) * n)


def cosine_from_sums(dots: dict[tuple[int, int], float], n: int) -> float:
    """The mean over pairs i < j of clamp(<d_i, d_j> / max(||d_i|| ||d_j||, 1e-6), -1, 1), from the sums
    dots[(i, j)] = <d_i, d_j> (i <= j: the squared norms on the diagonal)."""
    norms = [math.sqrt(dots[(i, i)]) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum(min(1.0, max(-1.0, dots[p] / max(norms[p[0]] * norms[p[1]], EPS))) for p in pairs) / len(pairs)


def model_stock_weights(backend: ModuleType, segments: list[Segment], chunk: int, n: int) -> tuple[float, ...]:
    """The weights (base first) of the n + 1 models of `segments` (the base's first), read `chunk` entries at a
    time by `backend`'s statistics functions (fixed_dots.gram_sums over the n deltas: two passes over the
    chunks)."""
    dots = gram_sums(backend, segments, chunk, n, deltas=True)
    if dots is None:
        return weights_from_cosine(1.0, n)
    return weights_from_cosine(cosine_from_sums(dots, n), n)


def row_weights(models: list[torch.Tensor], cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model_stock with `filter_wise: true` (mergekit: the cosines per row, along the last dimension; a 1-D tensor is
    one row): for each row of the models (the base's first, then n >= 2 others; chunks of whole rows of `cols`), the
    float32 weights (1 - t, t / n) of the base and of each other model, t from the row's mean pairwise cosine of the
    deltas as weights_from_cosine finds it (float64, exact row sums). A row with a NaN or infinite delta takes t = 1
    (the models' average), as a whole tensor does."""
    x0 = models[0].to(torch.float32).reshape(-1, cols)
    ds = [m.to(torch.float32).reshape(-1, cols) - x0 for m in models[1:]]
    n = len(ds)
    dots, finite = row_gram(ds)
    norms = [dots[(i, i)].sqrt() for i in range(n)]
    cos = torch.zeros_like(norms[0])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for i, j in pairs:
        cos.add_((dots[(i, j)] / (norms[i] * norms[j]).clamp_min(EPS)).clamp_(-1.0, 1.0))
    cos.div_(len(pairs))
    den = 1.0 + (n - 1) * cos
    t = torch.where(den.abs() < EPS, torch.zeros_like(cos), n * cos / den)
    t = torch.where(finite, t, torch.ones_like(t))
    return (1.0 - t).to(torch.float32), (t / n).to(torch.float32)


def merge_rows(models: list[torch.Tensor], cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk (whole rows) of a filter-wise model_stock merge: per row (1 - t) w_0 + (t / n) w_1 + ... + (t / n)
    w_n, left to right in float32 (as the linear kernels sum the whole-tensor weights), rounded once."""
    from fusemerge.kernels.reference import _rounded

    a, b = row_weights(models, cols)
    rows = [m.to(torch.float32).reshape(-1, cols) for m in models]
    out = rows[0] * a.unsqueeze(1)
    for x in rows[1:]:
        out.add_(x * b.unsqueeze(1))
    return _rounded(out.reshape(-1), out_dtype)
