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
from tests.kernels.conftest import BACKENDS, on_kernels
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def family(n: int, size: int, dtype: torch.dtype, seed: int, shared: float = 0.5):
    """A base and n fine-tunes whose deltas share a `shared` part (so the cosines are about shared^2 / (1 + ...))."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    common = torch.randn(size, generator=g) * 0.004
    models = [(base.float() + shared * common + torch.randn(size, generator=g) * 0.004).to(dtype) for _ in range(n)]
    return base, models


def weights(stats: str, base, models, chunk: int | None = None, split: int | None = None) -> tuple[float, ...]:
    """model_stock_weights by backend `stats`'s statistics functions (on its device), as slerp's `weights`."""
    backend, device = BACKENDS[stats]
    xs = [base.reshape(-1).to(device), *(m.reshape(-1).to(device) for m in models)]
    total = xs[0].numel()
    cuts = [0, total] if split is None else [0, split, total]
    segments = [Segment(hi - lo, lambda s, c, lo=lo: (None, [x[lo + s:lo + s + c] for x in xs]))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
    return model_stock_weights(backend, segments, chunk or max(1, total), len(models))


def exact_weights(base, models) -> tuple[float, ...]:
    """The weights from correctly rounded sums (math.fsum of the exact float64 products of float32 deltas)."""
    ds = [(m.reshape(-1).float() - base.reshape(-1).float()).double().tolist() for m in models]
    n = len(ds)
    dots = {(i, j): math.fsum(u * v for u, v in zip(ds[i], ds[j], strict=True)) for i in range(n) for j in range(i, n)}
    return weights_from_cosine(cosine_from_sums(dots, n), n)


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [0.0, 0.5, 2.0])
def test_weights_are_those_of_the_exact_sums_and_of_float64(stats: str, n: int, dtype: torch.dtype,
                                                            shared: float) -> None:
    base, models = family(n, 3001, dtype, seed=n * 10 + DTYPES.index(dtype), shared=shared)
    got = weights(stats, base, models, chunk=700)
    assert got == exact_weights(base, models)
    for g, e in zip(got, oracle.model_stock_weights(base, models), strict=True):
        assert abs(g - e) <= 2.0**-23 * abs(e) + 1e-12, (got, e)


def test_chunking_and_segments_do_not_change_the_weights(stats: str) -> None:
    base, models = family(3, 10_007, torch.bfloat16, seed=4)
    whole = weights(stats, base, models)
    tiny = ((1, None), (13, None)) if stats == "torch" else ((997, None),)  # the interpreter: a launch per chunk
    for chunk, split in (*tiny, (4099, 5000), (10_007, 1)):
        assert weights(stats, base, models, chunk, split) == whole


def test_the_rule_at_its_edges(stats: str) -> None:
    base, models = family(3, 500, torch.float32, seed=2)
    d = models[0] - base
    parallel = weights(stats, base, [base + d, base + 2 * d, base + 0.5 * d])  # cos 1 up to float64 rounding: t = 1
    assert parallel[0] < 1e-12 and parallel[1:] == (float(np.float32(1 / 3)),) * 3
    assert weights_from_cosine(1.0, 3) == (0.0, *(float(np.float32(1 / 3)),) * 3)
    assert weights(stats, base, [base.clone(), base.clone()]) == (1.0, 0.0, 0.0)  # no deltas: cos 0, t = 0, the base
    # two opposite deltas: den = 1 + cos = 0, mergekit's singular case keeps the base
    assert weights(stats, base, [base + d, base - d]) == (1.0, 0.0, 0.0)
    assert weights_from_cosine(-0.5, 3) == (1.0, 0.0, 0.0, 0.0)  # den = 1 - 2 * 0.5 = 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_delta_gives_the_average(stats: str, bad: float) -> None:
    base, models = family(3, 400, torch.float32, seed=3)
    models[1][77] = bad
    assert weights(stats, base, models, chunk=100) == weights_from_cosine(1.0, 3)


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
    y = merge_tensors(on_kernels(base), on_kernels(models), "model_stock", chunk=1000, backend="triton").cpu()
    assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_merge_tensors_needs_two_models_besides_the_base() -> None:
    base, models = family(2, 10, torch.float32, seed=0)
    with pytest.raises(InputError, match="model_stock takes at least 2 models besides the base, not 1"):
        merge_tensors(base, models[:1], "model_stock")
    with pytest.raises(InputError, match="weight: unknown parameter for model_stock"):
        merge_tensors(base, models, "model_stock", weight=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_filter_wise_weighs_each_row_by_its_own_cosines(dtype: torch.dtype, n: int) -> None:
    """filter_wise: true (mergekit's per-row rule along the last dimension): within an ulp of the float64 oracle row
    by row, on rows whose deltas share more or less (so their weights differ); the same bits in any chunking of
    whole rows and on the Triton backend (the torch operations on its device)."""
    g = torch.Generator().manual_seed(n)
    rows, cols = 23, 37
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    share = torch.linspace(0.0, 1.0, rows).unsqueeze(1)  # row r's deltas share `share[r]` of a common part
    common = torch.randn(rows, cols, generator=g) * 0.004
    models = [(base.float() + share * common + torch.randn(rows, cols, generator=g) * 0.004).to(dtype)
              for _ in range(n)]
    got = merge_tensors(base, models, "model_stock", filter_wise=True, chunk=3 * cols)
    f64 = torch.from_numpy(oracle.model_stock_rows(base, models)).reshape(rows, cols)
    # as test_merge_matches_float64_oracle: float32 weights and sums, at the scale of the weighted terms (|t| <~ 1)
    mag = base.double().abs() + sum(m.double().abs() for m in models)
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(f64, dtype), 2.0**-20 * mag)
    assert bool(((got.double() - f64).abs() <= tol).all())
    for chunk in (cols, 10 * cols + 5, 1 << 20):
        assert torch.equal(merge_tensors(base, models, "model_stock", filter_wise=True, chunk=chunk).view(-1),
                           got.view(-1)), chunk
    tri = merge_tensors(on_kernels(base), on_kernels(models), "model_stock", filter_wise=True, backend="triton",
                        chunk=4 * cols).cpu()
    assert torch.equal(tri.view(-1), got.view(-1))
    assert not torch.equal(got, merge_tensors(base, models, "model_stock"))


def test_filter_wise_gives_a_row_with_a_nan_the_average() -> None:
    """A row whose deltas hold a NaN takes t = 1 (the models' average, as a whole tensor with one does); the other
    rows keep their own weights."""
    base, models = family(3, 64, torch.float32, seed=2)
    base, models = base.reshape(4, 16), [m.reshape(4, 16).clone() for m in models]
    models[1][2, 5] = float("nan")
    got = _rows(base, models)
    want_avg = (sum(m[2].double() for m in models) / 3)
    finite = torch.isfinite(want_avg)
    assert torch.allclose(got[2][finite].double(), want_avg[finite], rtol=0, atol=1e-6)
    clean = merge_tensors(base[[0, 1, 3]], [m[[0, 1, 3]] for m in models], "model_stock", filter_wise=True)
    assert torch.equal(got[[0, 1, 3]], clean)


def _rows(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    from fusemerge.kernels.model_stock import merge_rows

    return merge_rows([base.reshape(-1), *[m.reshape(-1) for m in models]], base.shape[-1],
                      torch.float32).reshape(base.shape)
