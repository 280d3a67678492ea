"""model_stock (kernels/model_stock.py): its weights from exact sums against float64, and its merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.model_stock import cosine_from_sums, model_stock_weights, weights_from_cosine
from fusemerge.kernels.select import Segment
from tests import oracle
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def family(n: int, size: int, dtype: torch.dtype, seed: int, shared: float = 0.5):
    """A base and n fine-tunes whose deltas share a `shared` part (so the cosines are about shared^2 / (1 + ...))."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    common = torch.randn(size, generator=g) * 0.004
    models = [(base.float() + shared * common + torch.randn(size, generator=g) * 0.004).to(dtype) for _ in range(n)]
    return base, models


def weights(base, models, chunk: int | None = None, split: int | None = None) -> tuple[float, ...]:
    xs = [base.reshape(-1), *(m.reshape(-1) for m in models)]
    total = xs[0].numel()
    cuts = [0, total] if split is None else [0, split, total]
    segments = [Segment(hi - lo, lambda s, c, lo=lo: (None, [x[lo + s:lo + s + c] for x in xs]))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
    return model_stock_weights(segments, chunk or max(1, total), len(models))


def exact_weights(base, models) -> tuple[float, ...]:
    """The weights from correctly rounded sums (math.fsum of the exact float64 products of float32 deltas)."""
    ds = [(m.reshape(-1).float() - base.reshape(-1).float()).double().tolist() for m in models]
    n = len(ds)
    dots = {(i, j): math.fsum(u * v for u, v in zip(ds[i], ds[j], strict=True)) for i in range(n) for j in range(i, n)}
    return weights_from_cosine(cosine_from_sums(dots, n), n)


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [0.0, 0.5, 2.0])
def test_weights_are_those_of_the_exact_sums_and_of_float64(n: int, dtype: torch.dtype, shared: float) -> None:
    base, models = family(n, 3001, dtype, seed=n * 10 + DTYPES.index(dtype), shared=shared)
    got = weights(base, models, chunk=700)
    assert got == exact_weights(base, models)
    for g, e in zip(got, oracle.model_stock_weights(base, models), strict=True):
        assert abs(g - e) <= 2.0**-23 * abs(e) + 1e-12, (got, e)


def test_chunking_and_segments_do_not_change_the_weights() -> None:
    base, models = family(3, 10_007, torch.bfloat16, seed=4)
    whole = weights(base, models)
    for chunk, split in ((1, None), (13, None), (4099, 5000), (10_007, 1)):
        assert weights(base, models, chunk, split) == whole


def test_the_rule_at_its_edges() -> None:
    base, models = family(3, 500, torch.float32, seed=2)
    d = models[0] - base
    parallel = weights(base, [base + d, base + 2 * d, base + 0.5 * d])  # cos 1 up to float64 rounding: t = 1
    assert parallel[0] < 1e-12 and parallel[1:] == (float(np.float32(1 / 3)),) * 3
    assert weights_from_cosine(1.0, 3) == (0.0, *(float(np.float32(1 / 3)),) * 3)
    assert weights(base, [base.clone(), base.clone()]) == (1.0, 0.0, 0.0)  # no deltas: cos 0, t = 0, the base
    # two opposite deltas: den = 1 + cos = 0, mergekit's singular case keeps the base
    assert weights(base, [base + d, base - d]) == (1.0, 0.0, 0.0)
    assert weights_from_cosine(-0.5, 3) == (1.0, 0.0, 0.0, 0.0)  # den = 1 - 2 * 0.5 = 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_delta_gives_the_average(bad: float) -> None:
    base, models = family(3, 400, torch.float32, seed=3)
    models[1][77] = bad
    assert weights(base, models, chunk=100) == weights_from_cosine(1.0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("size", [1, 7, 1000, 4099])
def test_merge_matches_float64_oracle(dtype: torch.dtype, n: int, size: int) -> None:
    base, models = family(n, size, dtype, seed=size + n)
    out = merge_tensors(base, models, "model_stock", chunk=97)
    assert out.dtype == dtype and out.shape == base.shape
    expect = torch.from_numpy(oracle.model_stock(base, models))
    w = oracle.model_stock_weights(base, models)
    mag = sum(abs(wi) * x.double().abs() for wi, x in zip(w, [base, *models], strict=True))
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(expect, dtype), 2.0**-20 * mag)
    assert bool(((out.double() - expect).abs() <= tol).all())


def test_triton_backend_gives_the_torch_backends_bits() -> None:
    base, models = family(4, 3001, torch.bfloat16, seed=8)
    x = merge_tensors(base, models, "model_stock", chunk=1000, backend="torch")
    y = merge_tensors(base, models, "model_stock", chunk=1000, backend="triton")
    assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_merge_tensors_needs_two_models_besides_the_base() -> None:
    base, models = family(2, 10, torch.float32, seed=0)
    with pytest.raises(InputError, match="model_stock takes at least 2 models besides the base, not 1"):
        merge_tensors(base, models[:1], "model_stock")
    with pytest.raises(InputError, match="weight: unknown parameter for model_stock"):
        merge_tensors(base, models, "model_stock", weight=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_sums_are_the_torch_operations(dtype: torch.dtype) -> None:
    from fusemerge.kernels import cpu_fused
    from fusemerge.kernels.slerp import dot_fixed_torch, shift_for

    if not cpu_fused.available():
        pytest.skip(f"the compiled CPU loops are not in use: {cpu_fused.describe()}")
    base, models = family(5, 3001, dtype, seed=31)
    models[2] = base.clone()  # a zero delta
    ds = [m.float() - base.float() for m in models]
    shifts = {(i, j): shift_for(float(ds[i].abs().max() * ds[j].abs().max()) or 1.0) - (i + j) % 3
              for i in range(5) for j in range(i, 5) if (i, j) != (0, 3)}
    want = {p: dot_fixed_torch(ds[p[0]], ds[p[1]], s) for p, s in shifts.items()}
    assert cpu_fused.gram_fixed(base, models, shifts) == want
