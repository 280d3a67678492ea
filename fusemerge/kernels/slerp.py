"""slerp's two weights for a tensor: the angle between the base and the other model, from exact sums.

mergekit (merge_methods/slerp.py) interpolates a whole tensor `a` (the base model's) and `b` (the other
model's) along the arc between them, in float32:

    na = ||a||, nb = ||b||           (a norm <= 1e-8 counts as 1)
    dot = clamp(<a, b> / (na nb), -1, 1)
    |dot| > 0.9995:  (1 - t) a + t b                            (nearly parallel: linear interpolation)
    otherwise:       sin((1 - t) th) / sin th * a + sin(t th) / sin th * b,   th = acos(dot)

The merged tensor is the weighted sum w_a a + w_b b, which the `linear` kernels compute as they do for
`linear` (float32 products, added base first, rounded once). This file finds (w_a, w_b): `slerp_weights`
runs the statistics pass over the tensor's chunks (kernels/fixed_dots.py: ||a||^2, ||b||^2 and <a, b>, exact
up to 2^-32 of a fixed-point unit, so the same for every chunking, device and backend) and
`weights_from_sums` turns its sums into the two weights. (mergekit sums in float32, norms of chunk norms:
where |dot| is close to 0.9995 it may pick the other branch.) Where an entry of `a` or `b` is NaN or
infinite, the angle has no meaning: the weights are the linear ones, (1 - t, t), so only those entries are
non-finite in the output (mergekit's are all NaN).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fusemerge.kernels.fixed_dots import gram_sums

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

DOT_THRESHOLD = 0.9995  # mergekit's: above it (in absolute value) the two tensors count as parallel
EPS = 1e-8  # mergekit's: a norm at most this is not divided by


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


def slerp_weights(backend: ModuleType, segments: list[Segment], chunk: int, t: float) -> tuple[float, float]:
    """The weights (w_a, w_b) of tensor (a, b) = the two models of `segments` (the base's first), read `chunk`
    entries at a time by `backend`'s statistics functions (fixed_dots.gram_sums: two passes over the
    chunks)."""
    dots = gram_sums(backend, segments, chunk, 2, deltas=False)
    if dots is None:
        return lerp_weights(t)
    return weights_from_sums(t, dots[(0, 0)], dots[(1, 1)], dots[(0, 1)])
