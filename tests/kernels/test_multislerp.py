"""multislerp (kernels/multislerp.py): its weights from exact sums against mergekit's rule run in float64 on whole
tensors, on fresh random data, with and without a base; its edges; every backend and chunking giving the same
weights; and its merge."""

from __future__ import annotations

import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.multislerp import multislerp_weights, normalized, weights_from_gram
from fusemerge.kernels.select import Segment
from tests.kernels.conftest import BACKENDS
from tests.kernels.test_karcher import family
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def mergekits(xs: list[torch.Tensor], weight: list[float], base: torch.Tensor | None = None, normalize: bool = True,
              eps: float = 1e-8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """mergekit 0.1.5's multislerp (merge_methods/multislerp.py) as it reads, in `dtype` on whole tensors (float32:
    what a `dtype: float32` config runs; bench/float32_drift.py)."""
    if len(xs) == 1:
        return xs[0].to(dtype).reshape(-1)
    t = torch.stack([x.to(dtype).reshape(-1) for x in xs])
    if base is not None:
        t = t - base.to(dtype).reshape(-1)
    w = torch.tensor(weight, dtype=dtype)
    if normalize:
        w = w / w.sum()
    norms = torch.norm(t, dim=-1, keepdim=True)
    units = t / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    if torch.norm(mean) < eps:
        assert len(xs) == 2, "mergekit raises"
        res = t[0] * w[0] + t[1] * w[1]
    else:
        mean = mean / torch.norm(mean)
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
        tn = torch.norm(tangent) + eps
        res = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    return res + base.to(dtype).reshape(-1) if base is not None else res


def weights(stats: str, xs: list[torch.Tensor], lam: list[float], base: torch.Tensor | None = None,
            chunk: int | None = None, split: int | None = None, **kw) -> tuple[float, ...]:
    """multislerp_weights of `xs` (or their deltas from `base`) by backend `stats`'s statistics functions."""
    backend, device = BACKENDS[stats]
    xs = [x.reshape(-1).to(device) for x in xs]
    b = base.reshape(-1).to(device) if base is not None else None
    total = xs[0].numel()
    cuts = [0, total] if split is None else [0, split, total]
    segments = [Segment(hi - lo, lambda s, c, lo=lo: (None if b is None else b[lo + s:lo + s + c],
                                                      [x[lo + s:lo + s + c] for x in xs]))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
    return multislerp_weights(backend, segments, chunk or max(1, total), lam, **kw)


def combine(w: tuple[float, ...], xs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        return sum(wi * x.double().reshape(-1) for wi, x in zip(w, xs, strict=True))
    b = base.double().reshape(-1)
    return b + sum(wi * (x.double().reshape(-1) - b) for wi, x in zip(w, xs, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lam", "spread", "with_base", "normalize"), [
    ([1.0, 1.0], 1.0, False, True), ([0.2, 0.5, 1.5], 0.5, True, True), ([1.0, 2.0, 3.0, 4.0, 0.5], 2.0, False, True),
    ([0.3, 0.4, 0.2], 1.0, True, False), ([1.0, -0.2, 0.7], 1.0, True, True)])
def test_within_a_rounding_of_mergekits_rule_in_float64(dtype: torch.dtype, lam: list[float], spread: float,
                                                        with_base: bool, normalize: bool) -> None:
    """Fresh data: the models (or base + deltas) weighted by the weights found from the sums are within a few
    float32 ulps, of the result's scale, of mergekit's rule run in float64; and not the weighted average."""
    n = len(lam)
    xs = family(n + 1, 2003 + n, dtype, seed=3 * n + DTYPES.index(dtype), spread=spread)
    base, xs = (xs[0], xs[1:]) if with_base else (None, xs[:n])
    w = weights("torch", xs, lam, base, normalize=normalize)
    got, want = combine(w, xs, base), mergekits(xs, lam, base, normalize)
    scale = sum(x.double().abs().reshape(-1) for x in xs) * max(abs(v) for v in lam) + (
        0 if base is None else base.double().abs().reshape(-1))
    assert bool(((got - want).abs() <= 8 * ulp(scale, torch.float32)).all())
    average = combine(tuple(normalized(lam, normalize)), xs, base)
    assert float((want - average).abs().max()) > 100 * float(ulp(scale, torch.float32).max())


def test_backends_and_chunkings_give_the_same_weights(stats: str) -> None:
    xs = family(4, 4099, torch.bfloat16, seed=5)
    for base in (None, xs[0]):
        want = weights("torch", xs[1:], [1.0, 0.5, 2.0], base)
        assert weights(stats, xs[1:], [1.0, 0.5, 2.0], base) == want
        assert weights(stats, xs[1:], [1.0, 0.5, 2.0], base, chunk=500, split=1234) == want


def test_edges() -> None:
    ones = torch.ones(16)
    assert weights("torch", [ones * 3], [0.5]) == (1.0,)  # one model: itself, as mergekit returns it
    # antipodal models of equal weights: their mean is 0; two models fall back to the weighted sum, as mergekit
    assert weights("torch", [ones, -ones], [1.0, 1.0]) == (0.5, 0.5)
    with pytest.raises(InputError, match="tensor 'w': multislerp's weighted mean of the unit vectors is zero"):
        weights("torch", [ones, -ones, ones * 0], [1.0, 1.0, 1.0], name="w")
    # a NaN: the normalized weights, so only that entry is non-finite
    bad = ones.clone()
    bad[3] = float("nan")
    assert weights("torch", [bad, ones * 2], [1.0, 3.0]) == (0.25, 0.75)
    assert weights("torch", [bad, ones * 2], [1.0, 3.0], normalize=False) == (1.0, 3.0)
    # orthogonal unit vectors at equal weights: the middle of the quarter arc (eps = 0: no guard)
    assert weights_from_gram([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], eps=0.0) == pytest.approx((0.7071068,) * 2)


def test_merge_tensors_through_the_kernels(stats: str) -> None:
    xs = family(4, 37 * 11, torch.bfloat16, seed=8)
    xs = [x.reshape(37, 11) for x in xs]
    backend, device = ("torch", "cpu") if stats == "torch" else ("triton", BACKENDS[stats][1])
    for base in (None, xs[0]):
        got = merge_tensors(base if base is None else base.to(device), [x.to(device) for x in xs[1:]], "multislerp",
                            weight=[1.0, 0.5, 2.0], backend=backend, chunk=100).cpu()
        assert got.shape == (37, 11) and got.dtype == torch.bfloat16
        want = mergekits(xs[1:], [1.0, 0.5, 2.0], base).reshape(37, 11)
        assert bool(((got.double() - want).abs() <= ulp(want, torch.bfloat16)).all())


def test_settings_are_checked() -> None:
    xs = family(2, 64, torch.float32, seed=1)
    with pytest.raises(InputError, match="add up to 0, and normalize_weights is true"):
        merge_tensors(None, xs, "multislerp", weight=[1.0, -1.0])
    assert merge_tensors(None, xs, "multislerp", weight=[1.0, -1.0], normalize_weights=False).shape == (64,)
    with pytest.raises(InputError, match=r"eps: -1.0 is outside \[0, inf\)"):
        merge_tensors(None, xs, "multislerp", eps=-1.0)
    with pytest.raises(InputError, match="normalize_weights: must be true or false"):
        merge_tensors(None, xs, "multislerp", normalize_weights=1)
