"""karcher (kernels/karcher.py): its weights from exact sums against mergekit's iteration run in float64 on whole
tensors, on fresh random data; its edges; every backend and chunking giving the same weights; and its merge."""

from __future__ import annotations

import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.config import load_config
from fusemerge.errors import InputError
from fusemerge.kernels.karcher import karcher_weights, weights_from_gram
from fusemerge.kernels.select import Segment
from tests.kernels.conftest import BACKENDS
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def mergekits(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit 0.1.5's karcher_merge_tensors (merge_methods/karcher.py) as it reads, in float64 on whole tensors."""
    return mergekits_steps(xs, max_iter, tol)[0]


def mergekits_steps(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """mergekits in `dtype` (float32: what a `dtype: float32` config runs; bench/float32_drift.py), and the norm
    of the last step it took (0 for no step)."""
    xs = [x.to(dtype).reshape(-1) for x in xs]
    step = 0.0
    if len(xs) == 1:
        return xs[0], step
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(nm) == 0.0 else x / nm for x, nm in zip(xs, norms, strict=True)]
    valid = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not valid:
        return sum(x * 0 for x in xs), step
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us, strict=True))
    mean = us[0].clone() if float(torch.linalg.vector_norm(mean)) < tol else mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us, strict=True):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        step = float(tn)
        if step < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(al * nm for al, nm in zip(alphas, norms, strict=True)) * mean, step


def family(n: int, size: int, dtype: torch.dtype, seed: int, spread: float = 1.0) -> list[torch.Tensor]:
    """n models around a shared tensor, `spread` of their size apart (1.0: angles of ~45 degrees)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(size, generator=g) * 0.02
    return [(common * (1 + 0.3 * i) + spread * 0.02 * torch.randn(size, generator=g)).to(dtype) for i in range(n)]


def weights(stats: str, xs: list[torch.Tensor], chunk: int | None = None, split: int | None = None,
            **kw) -> tuple[float, ...]:
    """karcher_weights of `xs` by backend `stats`'s statistics functions (on its device), as one segment or two."""
    backend, device = BACKENDS[stats]
    xs = [x.reshape(-1).to(device) for x in xs]
    total = xs[0].numel()
    cuts = [0, total] if split is None else [0, split, total]
    segments = [Segment(hi - lo, lambda s, c, lo=lo: (None, [x[lo + s:lo + s + c] for x in xs]))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
    return karcher_weights(backend, segments, chunk or max(1, total), len(xs), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "spread", "max_iter"), [(2, 1.0, 10), (3, 0.3, 10), (5, 2.0, 10), (4, 1.0, 1),
                                                       (8, 2.0, 2)])
def test_within_a_rounding_of_mergekits_iteration_in_float64(dtype: torch.dtype, n: int, spread: float,
                                                             max_iter: int) -> None:
    """Fresh data: the weighted sum of the models with the weights found from the sums is within a few float32
    ulps (of the result's scale) of mergekit's iteration run in float64 on the whole tensors; the result is not
    the plain mean (the iteration moved it), and `max_iter` matters where it stops early."""
    xs = family(n, 3001 + n, dtype, seed=n + 10 * DTYPES.index(dtype), spread=spread)
    w = weights("torch", xs, max_iter=max_iter)
    got = sum(wi * x.double() for wi, x in zip(w, xs, strict=True))
    want = mergekits(xs, max_iter=max_iter)
    scale = sum(x.double().abs() for x in xs)
    assert bool(((got - want).abs() <= 4 * ulp(scale, torch.float32)).all())
    mean = sum(x.double() for x in xs) / n
    assert float((want - mean).abs().max()) > 100 * float(ulp(scale, torch.float32).max())
    if max_iter < 10:
        assert weights("torch", xs) != w


def test_backends_and_chunkings_give_the_same_weights(stats: str) -> None:
    xs = family(3, 4099, torch.bfloat16, seed=5)
    want = weights("torch", xs)
    assert weights(stats, xs) == want
    assert weights(stats, xs, chunk=500, split=1234) == want


def test_edges() -> None:
    ones = torch.ones(16)
    assert weights_from_gram([[4.0]]) == (1.0,)  # one model: itself
    assert weights("torch", [ones * 3]) == (1.0,)
    assert weights("torch", [torch.zeros(16), torch.zeros(16)]) == (0.0, 0.0)  # mergekit: sum(x * 0)
    # a zero model is left out of the mean, but counts in the scale (the mean norm of all models)
    w = weights("torch", [torch.zeros(16), ones * 2])
    assert w == (0.0, 0.5)
    # the same direction twice: the mean is that direction, at the models' mean norm
    w = weights("torch", [ones, ones * 3])
    assert torch.allclose(w[0] * ones + w[1] * ones * 3, ones * 2)
    # antiparallel models: their plain mean is 0, so mergekit starts from the first one; the Karcher mean of two
    # opposite points is then the first (the tangent vanishes: theta = pi, sin(pi) ~ 0 gives a huge factor times a
    # zero vector); what matters is that both tools take the same start
    want = mergekits([ones, -ones])
    got = sum(wi * x for wi, x in zip(weights("torch", [ones, -ones]), [ones, -ones], strict=True))
    assert torch.allclose(got.double(), want, atol=1e-6)
    # a NaN or an infinity: the plain mean's weights, so only those entries are non-finite
    bad = ones.clone()
    bad[3] = float("nan")
    assert weights("torch", [bad, ones * 2, ones]) == (pytest.approx(1 / 3),) * 3


def test_merge_tensors_through_the_kernels(stats: str) -> None:
    xs = family(3, 37 * 11, torch.bfloat16, seed=8)
    xs = [x.reshape(37, 11) for x in xs]
    backend, device = ("torch", "cpu") if stats == "torch" else ("triton", BACKENDS[stats][1])
    xs = [x.to(device) for x in xs]
    got = merge_tensors(None, xs, "karcher", backend=backend, chunk=100).cpu()
    assert got.shape == (37, 11) and got.dtype == torch.bfloat16
    want = mergekits(xs).reshape(37, 11)
    assert bool(((got.double() - want).abs() <= ulp(want, torch.bfloat16)).all())
    # a base is averaged in as one more model, as linear does (mergekit: the base is one of the entries)
    base = family(1, 37 * 11, torch.bfloat16, seed=9)[0].reshape(37, 11).to(device)
    with_base = merge_tensors(base, xs, "karcher", backend=backend)
    assert torch.equal(with_base.view(torch.int16), merge_tensors(None, [base, *xs], "karcher",
                                                                   backend=backend).view(torch.int16))


def test_settings_are_checked() -> None:
    xs = family(2, 64, torch.float32, seed=1)
    with pytest.raises(InputError, match="max_iter: must be a whole number, not 2.5"):
        merge_tensors(None, xs, "karcher", max_iter=2.5)
    with pytest.raises(InputError, match=r"max_iter: -1 is outside \[0, 10000\]"):
        merge_tensors(None, xs, "karcher", max_iter=-1)
    with pytest.raises(InputError, match="expected one value"):
        merge_tensors(None, xs, "karcher", max_iter=[1, 5])
    with pytest.raises(InputError, match=r"tol: -1e-05 is outside \[0, inf\)"):
        merge_tensors(None, xs, "karcher", tol=-1e-5)
    cfg = {"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(InputError, match="parameters.max_iter: max_iter is a whole number: give one value"):
        load_config({**cfg, "parameters": {"max_iter": [1, 5]}})
    with pytest.raises(InputError, match=r"parameters.max_iter\[0\].value: max_iter is a whole number"):
        load_config({**cfg, "parameters": {"max_iter": [{"filter": "mlp", "value": [1, 4]}, {"value": 3}]}})
    with pytest.raises(InputError, match=r"models\[0\].parameters.max_iter: max_iter applies to the whole merge"):
        load_config({**cfg, "models": [{"model": "a", "parameters": {"max_iter": 3}}, {"model": "b"}]})
    rules = load_config({**cfg, "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 7}]}})
    assert rules.param("max_iter", "model.layers.0.mlp.up_proj.weight") == 2
    assert rules.param("max_iter", "model.layers.0.self_attn.q_proj.weight") == 7
    assert torch.equal(merge_tensors(None, xs, "karcher", max_iter=2.0), merge_tensors(None, xs, "karcher", max_iter=2))
