"""multislerp's weights for a tensor: barycentric interpolation of N vectors on the sphere, from exact sums.

mergekit (merge_methods/multislerp.py) takes the N models' tensors, or with a base their deltas
v_i = x_i - base, the weights l_i (divided by their sum when `normalize_weights`), n_i = ||v_i|| and
u_i = v_i / (n_i + eps):

    mean = sum l_i u_i                                    (if ||mean|| < eps: l_0 v_0 + l_1 v_1 for N = 2, an
    m = mean / ||mean||                                    error for more)
    tangent = sum l_i (u_i - <u_i, m> m)
    tn = ||tangent|| + eps
    result = (sum n_i l_i) (cos(tn) m + sin(tn) / tn tangent)      (+ base)

Every vector in it is a combination of the v_i, so each is kept as its N coefficients and every inner product
comes from the Gram matrix of the v_i (kernels/fixed_dots.py: exact fixed-point sums, two reads). The result is
sum w_i v_i: without a base the `linear` kernels' weighted sum of the models, with one task arithmetic's
base + sum w_i d_i (as nuslerp's). (mergekit computes all of it on whole float32 tensors.) Where an entry is
NaN or infinite the angles have no meaning: the weights are the l_i, the weighted average, so only those
entries are non-finite in the output (mergekit's tensor is all NaN).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fusemerge.errors import InputError
from fusemerge.kernels.fixed_dots import combination_norm, gram_matrix, gram_sums

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

EPS = 1e-8  # mergekit's default `eps`


def normalized(weights: list[float], normalize: bool) -> list[float]:
    """The l_i: the weights in float32, divided by their float32 sum when `normalize` (as mergekit's tensor of
    weights in the float32 math)."""
    w = [np.float32(x) for x in weights]
    if not normalize:
        return [float(x) for x in w]
    total = np.float32(0.0)
    for x in w:
        total = np.float32(total + x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(np.float32(x / total)) for x in w]


def weights_from_gram(gram: list[list[float]], lam: list[float], eps: float = EPS, name: str = "") -> tuple[float, ...]:
    """The N weights w_i (float32 values) of sum w_i v_i for vectors with Gram matrix `gram` and the (already
    normalized) weights `lam`, by mergekit's rule (module docstring) in float64.

    >>> weights_from_gram([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], eps=0.0)  # orthogonal unit vectors: the arc midpoint
    (0.7071067690849304, 0.7071067690849304)
    """
    n = len(gram)
    if n == 1:
        return (1.0,)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    inv = [1.0 / (nm + eps) if nm + eps > 0 else 0.0 for nm in norms]  # u_i = v_i * inv_i
    raw = [lam[i] * inv[i] for i in range(n)]  # mean = sum l_i u_i, as coefficients of the v_i
    mean_norm = combination_norm(raw, gram)
    if mean_norm < eps:
        if n == 2:
            return tuple(float(np.float32(x)) for x in lam)
        raise InputError(f"tensor '{name}': multislerp's weighted mean of the unit vectors is zero (antipodal models "
                         "whose weights balance out, as mergekit reports); give other weights")
    m = [x / mean_norm for x in raw]
    # <u_i, m> for each i, then tangent = sum l_i u_i - (sum l_i <u_i, m>) m = raw - s m
    dots = [inv[i] * sum(gram[i][j] * m[j] for j in range(n)) for i in range(n)]
    s = sum(lam[i] * dots[i] for i in range(n))
    tangent = [raw[j] - s * m[j] for j in range(n)]
    tn = combination_norm(tangent, gram) + eps
    if tn == 0.0:  # eps = 0 and every u_i already at m: the exponential map is m
        result = m
    else:
        result = [math.cos(tn) * m[j] + math.sin(tn) / tn * tangent[j] for j in range(n)]
    avg_norm = sum(norms[i] * lam[i] for i in range(n))
    return tuple(float(np.float32(avg_norm * r)) for r in result)


def multislerp_weights(backend: ModuleType, segments: list[Segment], chunk: int, weights: list[float],
                       normalize: bool = True, eps: float = EPS, name: str = "") -> tuple[float, ...]:
    """The weights of the N vectors of `segments` (the models of each chunk, or their deltas from the chunk's base
    where it has one), read `chunk` entries at a time by `backend`'s statistics functions (fixed_dots.gram_sums:
    two passes over the chunks)."""
    lam = normalized(weights, normalize)
    n = len(lam)
    if n == 1:
        return (1.0,)
    dots = gram_sums(backend, segments, chunk, n, deltas=False)
    if dots is None:
        return tuple(lam)
    return weights_from_gram(gram_matrix(dots, n), lam, eps, name)
