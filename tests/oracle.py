"""The float64 oracle: METHODS.md written as plainly as possible, with sorts instead of selection.

Deliberately independent of fusemerge's kernels: top-k by a stable sort of (-|d|, index), norms in
float64, no chunking. Only what METHODS.md pins to float32 is float32 here: the deltas and the
sign-election sum (so the elected sign is the same bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fusemerge.kernels.philox import dare_key, philox_rand
from fusemerge.methods import METHODS


def topk_mask(absd: np.ndarray, k: int) -> np.ndarray:
    """Exactly the k largest entries, ties broken by lowest index (stable sort)."""
    order = np.argsort(-absd, kind="stable")
    mask = np.zeros(absd.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def della_ranks(absd: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's della_magprune ranks (a 1-D tensor unsqueezed to one row; argsort of argsort along dimension 1,
    here a stable one: equal |d| in index order) as (rank - min rank, max rank - min rank), flat."""
    a = absd.reshape(shape if len(shape) >= 2 else (1, absd.size))
    ranks = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float64) + 1
    low, high = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    return (ranks - low).reshape(-1), np.broadcast_to(high - low, a.shape).reshape(-1)


def della_keep(absd: np.ndarray, shape: tuple[int, ...], density: float, epsilon: float, u: np.ndarray
               ) -> np.ndarray:
    """DELLA's keep test u < p, p = (density - epsilon) + rank_norm * 2 * epsilon in float32 as mergekit computes
    it (an entry ranked alone: p = density)."""
    if density >= 1.0:
        return np.ones(absd.size, dtype=bool)
    r, span = della_ranks(absd, shape)
    f = np.float32
    q = np.where(span > 0, (r.astype(f) / np.maximum(span, 1).astype(f)), f(0.0)).astype(f)
    p = (f(density - epsilon) + (q * f(2.0)) * f(epsilon)).astype(f)
    p = np.where(span > 0, p, f(density))
    return u < p


def sparsify(method, d32: np.ndarray, i: int, density: float, gamma: float, seed: int, name: str,
             rescale, epsilon: float = 0.15, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """float64 sparsified delta of one expert."""
    n = d32.size
    absd = np.abs(d32.astype(np.float64))
    d = d32.astype(np.float64)
    if method.sparsifier == "magnitude":
        return l1_rescaled(np.where(topk_mask(absd, max(1, math.floor(density * n))), d, 0.0), absd, rescale)
    if method.sparsifier == "breadcrumbs":
        if density >= 1.0:
            return d
        keep = math.floor(density * n)
        top = min(math.floor(gamma * n), n - keep)
        mask = topk_mask(absd, top + keep) & ~topk_mask(absd, top)
        return l1_rescaled(np.where(mask, d, 0.0), absd, rescale)
    if method.sparsifier == "dare":
        u = philox_rand(dare_key(seed, name, i), torch.arange(n, dtype=torch.int64)).numpy()
        kept = u < np.float32(density)
        dh = np.where(kept, d, 0.0)
        if rescale == "inverse":
            return dh / density
        return l1_rescaled(dh, absd, rescale)
    if method.sparsifier == "della":
        u = philox_rand(dare_key(seed, name, i), torch.arange(n, dtype=torch.int64)).numpy()
        kept = della_keep(np.abs(d32), shape if shape is not None else (n,), density, epsilon, u)
        return l1_rescaled(np.where(kept, d, 0.0), absd, rescale)
    return d


def l1_rescaled(dh: np.ndarray, absd: np.ndarray, rescale) -> np.ndarray:
    """With `rescale: true`, the kept deltas times ||d||_1 / ||kept d||_1 (unchanged when nothing is kept)."""
    if rescale is not True:
        return dh
    s = np.abs(dh).sum()
    return dh * (absd.sum() / s) if s > 0 else dh


def merge(base, experts, method_name: str, *, weight, density=1.0, gamma=0.01, lam=1.0, normalize=None,
          rescale=None, seed=0, name="", epsilon=0.15) -> np.ndarray:
    """The merged tensor in float64 (flat); `rescale` None: the method's default. DELLA ranks by the base's shape."""
    method = METHODS[method_name]
    if rescale is None:
        rescale = method.params["rescale"].default if "rescale" in method.params else False
    n = len(experts)
    w = [float(x) for x in weight]
    dens = density if isinstance(density, list) else [density] * n
    gam = gamma if isinstance(gamma, list) else [gamma] * n
    eps = epsilon if isinstance(epsilon, list) else [epsilon] * n
    if normalize is None:
        normalize = method.params["normalize"].default
    if method.is_linear:
        models = [e.reshape(-1).to(torch.float64).numpy() for e in experts]
        num = sum(wi * m for wi, m in zip(w, models, strict=False))
        return num / sum(w) if normalize and sum(w) != 0 else num
    b32 = base.reshape(-1).to(torch.float32).numpy()
    dh = []
    for i, e in enumerate(experts):
        d32 = e.reshape(-1).to(torch.float32).numpy() - b32
        dh.append(sparsify(method, d32, i, dens[i], gam[i], seed, name, rescale, eps[i], tuple(base.shape)))
    if method.consensus == "sign":
        # the election, to the bit: float32 products summed left to right in float32
        s = np.zeros_like(b32)
        p32 = []
        for wi, x in zip(w, dh, strict=False):
            p32.append(np.float32(wi) * x.astype(np.float32))
        s = p32[0].copy()
        for p in p32[1:]:
            s = s + p
        g = np.where(s >= 0, 1.0, -1.0)
        agree = [np.sign(p.astype(np.float64)) == g for p in p32]
        num = sum(np.where(a, wi * x, 0.0) for a, wi, x in zip(agree, w, dh, strict=False))
        if normalize:
            den = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w, strict=False))
            den = np.where(den == 0, 1.0, den)
            num = num / den
    else:
        num = sum(wi * x for wi, x in zip(w, dh, strict=False))
        if normalize and sum(w) != 0:
            num = num / sum(w)
    return b32.astype(np.float64) + lam * num


def slerp_weights(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """mergekit's slerp weights (merge_methods/slerp.py) in float64, from float64 sums (t taken as float32)."""
    x, y = a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()
    na, nb = np.sqrt(np.sum(x * x)), np.sqrt(np.sum(y * y))
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = float(np.clip(np.sum(x * y) / (na * nb), -1.0, 1.0))
    t = float(np.float32(t))
    if abs(dot) > 0.9995:
        return 1.0 - t, t
    theta = np.arccos(dot)
    return float(np.sin((1 - t) * theta) / np.sin(theta)), float(np.sin(t * theta) / np.sin(theta))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> np.ndarray:
    """The slerp of tensors a (the base's) and b in float64 (flat)."""
    wa, wb = slerp_weights(a, b, t)
    return wa * a.reshape(-1).double().numpy() + wb * b.reshape(-1).double().numpy()


def nuslerp_weights(x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float], base: torch.Tensor | None = None
                    ) -> tuple[float, float]:
    """mergekit's nuslerp weights (merge_methods/nuslerp.py, flatten) in float64, from float64 sums of the two
    vectors: the models, or their float32 deltas from `base`."""
    def vec(x: torch.Tensor) -> np.ndarray:
        return (x.reshape(-1).float() - base.reshape(-1).float() if base is not None else x.reshape(-1).float()
                ).double().numpy()

    v0, v1 = vec(x0), vec(x1)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    n0, n1 = max(np.linalg.norm(v0), 1e-7), max(np.linalg.norm(v1), 1e-7)
    cos = float(np.clip(np.dot(v0, v1) / (n0 * n1), -1.0, 1.0))
    if 1 - cos * cos <= 1e-16:
        return 1.0 - t, t
    theta = np.arccos(cos)
    return float(np.sin((1 - t) * theta) / np.sin(theta)), float(np.sin(t * theta) / np.sin(theta))


def nuslerp(x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float], base: torch.Tensor | None = None
            ) -> np.ndarray:
    """The nuslerp of two models (or, with `base`, of their deltas, added to it) in float64 (flat)."""
    a, b = nuslerp_weights(x0, x1, w, base)
    if base is None:
        return a * x0.reshape(-1).double().numpy() + b * x1.reshape(-1).double().numpy()
    d = [(x.reshape(-1).float() - base.reshape(-1).float()).double().numpy() for x in (x0, x1)]
    return base.reshape(-1).double().numpy() + a * d[0] + b * d[1]


def model_stock_weights(base: torch.Tensor, models: list[torch.Tensor]) -> list[float]:
    """mergekit's model_stock weights (merge_methods/model_stock.py) in float64: (1 - t, t / N, ..., t / N)."""
    ds = [(m.reshape(-1).float() - base.reshape(-1).float()).double().numpy() for m in models]  # float32 deltas
    n = len(ds)
    cos = [np.clip(np.dot(ds[i], ds[j]) / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6), -1.0, 1.0)
           for i in range(n) for j in range(i + 1, n)]
    c = float(np.mean(cos))
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return [1.0 - t] + [t / n] * n


def model_stock(base: torch.Tensor, models: list[torch.Tensor]) -> np.ndarray:
    """The model_stock merge of `models` onto `base` in float64 (flat)."""
    w = model_stock_weights(base, models)
    xs = [base.reshape(-1).double().numpy()] + [m.reshape(-1).double().numpy() for m in models]
    return sum(wi * x for wi, x in zip(w, xs, strict=True))


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> np.ndarray:
    """mergekit's nearswap (merge_methods/nearswap.py) of the base a and the other model b in float64 (flat):
    w = clip(t / max(|a - b|, 1e-6), 0, 1), then w b + (1 - w) a (t taken as float32)."""
    x, y = a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        w = np.clip(float(np.float32(t)) / np.maximum(np.abs(x - y), float(np.float32(1e-6))), 0.0, 1.0)
        w = np.where(np.isnan(x - y), np.nan, w)  # np.maximum keeps a NaN, np.clip too: as torch's clamp
        return w * y + (1.0 - w) * x


def sce(base: torch.Tensor, experts: list[torch.Tensor], select_topk: float = 1.0) -> np.ndarray:
    """mergekit's sce (merge_methods/sce.py) in float64 (flat), with its selection made exact: the k =
    int(float32(count_nonzero(v)) * float32(select_topk)) entries of largest v (v: the population variance over the
    experts of the float32 deltas, computed in float64 and rounded to float32), ties by lowest index (a stable
    sort); the weights m_i / sum m (m_i the mean of the kept d_i^2, exact: math.fsum), 1 / N each where that sum
    is below 1e-6; the election on the float32 sum of the kept deltas; then sum of the agreeing d_i w_i over
    max(sum of their w_i, 1e-6)."""
    f32 = np.float32
    b32 = base.reshape(-1).float().numpy()
    d32 = np.stack([x.reshape(-1).float().numpy() - b32 for x in experts])  # float32, as METHODS.md pins
    n = d32.shape[1]
    if select_topk < 1.0:
        v = d32.astype(np.float64).var(axis=0).astype(f32)
        k = int(f32(f32(np.count_nonzero(v)) * f32(select_topk))) if select_topk > 0 else 0
        keep = topk_mask(v.astype(np.float64), k)
        d32 = d32 * keep.astype(f32)
    m = [math.fsum((row.astype(np.float64) ** 2).tolist()) / n for row in d32]
    total = sum(m)
    w = [1.0 / len(m)] * len(m) if abs(total) < 1e-6 else [x / total for x in m]
    s = np.zeros(n, dtype=f32)
    for row in d32:
        s = (s + row).astype(f32)
    g = np.where(s >= 0, 1.0, -1.0)
    d64 = d32.astype(np.float64)
    e = [np.where(np.sign(row) == g, wi, 0.0) for row, wi in zip(d64, w, strict=True)]
    num = sum(row * ei for row, ei in zip(d64, e, strict=True))
    den = np.maximum(sum(e), float(f32(1e-6)))
    return b32.astype(np.float64) + num / den


def ram(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float = 1e-5,
        plus: tuple[float, float] | None = None) -> np.ndarray:
    """mergekit's ram (and, with `plus` = (r, alpha), ramplus_tl; merge_methods/ram.py) in float64 (flat): the
    deltas changed where |d| > float32(epsilon) (float32 deltas, as METHODS.md pins); where one expert changed an
    entry its delta, where several did their mean; RAM+ scales each expert's own entries by
    1 + r clamp(shared / max(own, epsilon), 0, alpha), the counts over the tensor."""
    f32 = np.float32
    b32 = base.reshape(-1).float().numpy()
    d32 = np.stack([x.reshape(-1).float().numpy() - b32 for x in experts])
    nz = np.abs(d32) > f32(epsilon)
    count = nz.sum(axis=0)
    lam = np.ones(len(experts))
    if plus is not None:
        r, alpha = plus
        shared = (nz & (count > 1)).sum(axis=1)
        own = (nz & (count == 1)).sum(axis=1)
        lam = 1.0 + r * np.clip(shared / np.maximum(own, epsilon), 0.0, alpha)
    z = d32.astype(np.float64) * nz
    merged = sum(z[i] * (count == 1) * lam[i] + z[i] * (count > 1) / np.maximum(count, 1) for i in range(len(experts)))
    return b32.astype(np.float64) + merged


def model_stock_rows(base: torch.Tensor, models: list[torch.Tensor]) -> np.ndarray:
    """mergekit's model_stock with filter_wise: true in float64 (flat): model_stock's rule on each row (the last
    dimension; a 1-D tensor is one row)."""
    cols = base.shape[-1] if base.dim() >= 2 else base.numel()
    b = base.reshape(-1, cols)
    ms = [m.reshape(-1, cols) for m in models]
    return np.concatenate([model_stock(b[r], [m[r] for m in ms]) for r in range(b.shape[0])])


def nuslerp_rows(x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float], base: torch.Tensor | None = None
                 ) -> np.ndarray:
    """nuslerp with nuslerp_flatten: false (mergekit: one arc per row of the last dimension) in float64 (flat)."""
    cols = x0.shape[-1] if x0.dim() >= 2 else x0.numel()
    r0, r1 = x0.reshape(-1, cols), x1.reshape(-1, cols)
    rb = base.reshape(-1, cols) if base is not None else None
    return np.concatenate([nuslerp(r0[r], r1[r], w, rb[r] if rb is not None else None) for r in range(r0.shape[0])])


def nuslerp_cols(x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float], base: torch.Tensor | None = None
                 ) -> np.ndarray:
    """nuslerp with nuslerp_flatten: false and nuslerp_row_wise: true (mergekit: the vectors along dimension 0, one
    arc per index of the others) in float64 (flat, in the tensor's order)."""
    lead = x0.shape[0] if x0.dim() >= 1 else 1
    c0, c1 = x0.reshape(lead, -1), x1.reshape(lead, -1)
    cb = base.reshape(lead, -1) if base is not None else None
    cols = [nuslerp(c0[:, c], c1[:, c], w, cb[:, c] if cb is not None else None) for c in range(c0.shape[1])]
    return np.stack(cols, axis=1).reshape(-1)
