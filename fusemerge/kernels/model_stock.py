"""model_stock's weights for a tensor: how far the base moves toward the models' average, from their angles.

mergekit (merge_methods/model_stock.py, the paper's rule per tensor, `filter_wise: false`), for a base tensor
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

from fusemerge.kernels.fixed_dots import gram_sums

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
