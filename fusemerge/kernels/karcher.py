"""karcher's weights for a tensor: the models' Karcher (Riemannian) mean on the unit sphere, from exact sums.

mergekit (merge_methods/karcher.py) takes the N models' tensors x_i (the base too, when one is given), their
norms n_i and unit vectors u_i = x_i / n_i, and with alpha_i = 1/N over the models whose norm exceeds `tol`:

    m = normalize(sum alpha_i u_i)                              (u_first where that sum's norm < tol)
    repeat max_iter times:
        v = sum over i with theta_i >= tol of alpha_i theta_i / sin(theta_i) (u_i - cos_i m),
            cos_i = clamp(<m, u_i>, -1, 1), theta_i = acos(cos_i)
        stop once ||v|| < tol;  m = normalize(cos(||v||) m + sin(||v||) v / ||v||)
    result = (sum over all i of n_i / N) m

Every vector in it is a combination of the u_i, so it is kept as its coefficients c (m = sum c_i u_i), and
every inner product comes from the Gram matrix <u_i, u_j> = <x_i, x_j> / (n_i n_j): the tensors are read
twice (kernels/fixed_dots.py: the largest magnitudes, then every pair's exact dot product), the iteration runs
on N numbers in float64, and the result is the weighted sum sum w_i x_i with w_i = scale c_i / n_i, which the
`linear` kernels compute. (mergekit iterates on whole float32 tensors, so its last bits differ.) Where an
entry is NaN or infinite the angles have no meaning: the weights are the plain mean's (1/N each), so only those
entries are non-finite in the output (mergekit's tensor is all NaN).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fusemerge.kernels.fixed_dots import combination_norm, gram_matrix, gram_sums

if TYPE_CHECKING:
    from fusemerge.kernels.select import Segment

MAX_ITER = 10  # mergekit's defaults
TOL = 1e-5


def weights_from_gram(gram: list[list[float]], max_iter: int = MAX_ITER, tol: float = TOL) -> tuple[float, ...]:
    """The N weights w_i (float32 values) of the Karcher mean sum w_i x_i of N vectors with Gram matrix `gram`
    (gram[i][j] = <x_i, x_j>), by mergekit's iteration (module docstring) on coefficients, in float64.

    >>> weights_from_gram([[1.0, 0.0], [0.0, 1.0]])  # orthogonal unit vectors: the midpoint of the quarter arc
    (0.7071067690849304, 0.7071067690849304)
    >>> weights_from_gram([[4.0, 4.0], [4.0, 4.0]])  # the same vector twice: itself
    (0.5, 0.5)
    """
    n = len(gram)
    if n == 1:
        return (1.0,)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return (0.0,) * n  # mergekit: sum of tensor * 0
    k = len(valid)
    units = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]  # <u_i, u_j> over the valid
    alpha = [1.0 / k] * k  # 1/N each, normalized over the valid ones: 1/k
    c = list(alpha)
    norm = combination_norm(c, units)
    c = [1.0] + [0.0] * (k - 1) if norm < tol else [x / norm for x in c]
    for _ in range(max_iter):
        v = [0.0] * k
        for i in range(k):
            cos = min(1.0, max(-1.0, sum(c[j] * units[j][i] for j in range(k))))  # <m, u_i>
            theta = math.acos(cos)
            if theta < tol:
                continue
            f = alpha[i] * theta / math.sin(theta)
            v = [v[j] - f * cos * c[j] for j in range(k)]
            v[i] += f
        v_norm = combination_norm(v, units)
        if v_norm < tol:
            break
        c = [math.cos(v_norm) * c[j] + math.sin(v_norm) * v[j] / v_norm for j in range(k)]
        m_norm = combination_norm(c, units)
        if m_norm > tol:
            c = [x / m_norm for x in c]
    scale = sum(norms) / n
    w = [0.0] * n
    for j, i in enumerate(valid):
        w[i] = float(np.float32(scale * c[j] / norms[i]))
    return tuple(w)


def karcher_weights(backend: ModuleType, segments: list[Segment], chunk: int, n: int, max_iter: int = MAX_ITER,
                    tol: float = TOL) -> tuple[float, ...]:
    """The weights of the n models of `segments`, read `chunk` entries at a time by `backend`'s statistics
    functions (fixed_dots.gram_sums over the models themselves: two passes over the chunks)."""
    if n == 1:
        return (1.0,)
    dots = gram_sums(backend, segments, chunk, n, deltas=False)
    if dots is None:
        return (float(np.float32(1.0 / n)),) * n
    return weights_from_gram(gram_matrix(dots, n), max_iter, tol)
