"""slerp (kernels/slerp.py): its weights from exact sums, against float64, and its merge against the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.select import Segment
from fusemerge.kernels.slerp import DOT_THRESHOLD, lerp_weights, slerp_weights, weights_from_sums
from tests import oracle
from tests.kernels.conftest import BACKENDS, on_kernels
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def pair(size: int, spread: float, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base-like tensor and a fine-tune of it: b = a + spread * |a| noise, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(size, generator=g) * 0.02).to(dtype)
    b = (a.float() + torch.randn(size, generator=g) * 0.02 * spread).to(dtype)
    return a, b


def weights(stats: str, a: torch.Tensor, b: torch.Tensor, t: float, chunk: int | None = None,
            split: int | None = None) -> tuple[float, float]:
    """slerp_weights over (a, b) flat, `chunk` entries at a time, as one segment or two (split at `split`), by
    backend `stats`'s statistics functions (on its device)."""
    backend, device = BACKENDS[stats]
    a, b = a.reshape(-1).to(device), b.reshape(-1).to(device)
    cuts = [0, a.numel()] if split is None else [0, split, a.numel()]
    segments = [Segment(hi - lo, lambda s, c, lo=lo: (None, [a[lo + s:lo + s + c], b[lo + s:lo + s + c]]))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
    return slerp_weights(backend, segments, chunk or max(1, a.numel()), t)


def exact_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """||a||^2, ||b||^2, <a, b>, each correctly rounded (math.fsum of the exact float64 products)."""
    x, y = a.reshape(-1).double().tolist(), b.reshape(-1).double().tolist()
    return (math.fsum(u * u for u in x), math.fsum(v * v for v in y),
            math.fsum(u * v for u, v in zip(x, y, strict=True)))


@pytest.mark.parametrize("spread", [1e-3, 0.05, 0.3, 1.0, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_weights_are_those_of_the_exact_sums(stats: str, spread: float, dtype: torch.dtype, t: float) -> None:
    a, b = pair(5003, spread, dtype, seed=int(spread * 1000) + DTYPES.index(dtype))
    assert weights(stats, a, b, t) == weights_from_sums(t, *exact_sums(a, b))


@pytest.mark.parametrize("spread", [1e-3, 0.05, 1.0, 3.0])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_weights_match_mergekit_formula_in_float64(stats: str, spread: float, t: float) -> None:
    a, b = pair(4099, spread, torch.float32, seed=7 + int(spread * 100))
    got, expect = weights(stats, a, b, t), oracle.slerp_weights(a, b, t)
    for g, e in zip(got, expect, strict=True):  # float64 weights rounded once to float32
        assert abs(g - e) <= 2.0**-23 * abs(e), (got, expect)


def test_the_branches_are_those_of_mergekit(stats: str) -> None:
    a, b = pair(2000, 1e-3, torch.float32, seed=3)
    aa, bb, ab = exact_sums(a, b)
    assert ab / math.sqrt(aa * bb) > DOT_THRESHOLD  # nearly parallel: linear interpolation
    linear = (float(np.float32(1 - np.float32(0.3))), float(np.float32(0.3)))
    assert weights(stats, a, b, 0.3) == lerp_weights(0.3) == linear
    for other in (2.5 * a, -a, -3 * a):  # parallel and antiparallel: |dot| = 1
        assert weights(stats, a, other, 0.3) == lerp_weights(0.3)
    # orthogonal: the quarter arc; t = 0.5 gives sin(pi / 4) / 1 for both
    x = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert weights(stats, *x, 0.5) == (float(np.float32(math.sin(math.pi / 4))),) * 2


def test_a_zero_tensor_counts_as_orthogonal(stats: str) -> None:
    """mergekit divides by a norm only above 1e-8: a zero tensor's dot product is 0, its angle pi / 2."""
    a, b = pair(100, 0.5, torch.float32, seed=1)
    quarter = (float(np.float32(math.sin(0.7 * math.pi / 2))), float(np.float32(math.sin(0.3 * math.pi / 2))))
    t32 = float(np.float32(0.3))
    expect = (float(np.float32(math.sin((1 - t32) * math.pi / 2))), float(np.float32(math.sin(t32 * math.pi / 2))))
    assert abs(expect[0] - quarter[0]) < 1e-6
    for x, y in ((torch.zeros(100), b), (a, torch.zeros(100)), (torch.zeros(100), torch.zeros(100))):
        assert weights(stats, x, y, 0.3) == expect
    assert weights(stats, torch.zeros(0), torch.zeros(0), 0.3) == expect


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_entry_gives_the_linear_weights(stats: str, bad: float) -> None:
    a, b = pair(1000, 1.0, torch.float32, seed=2)
    b[517] = bad
    assert weights(stats, a, b, 0.4) == lerp_weights(0.4)
    assert weights(stats, b, a, 0.4, chunk=100) == lerp_weights(0.4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunking_and_segments_do_not_change_the_weights(stats: str, dtype: torch.dtype) -> None:
    a, b = pair(10_007, 0.4, dtype, seed=5)
    whole = weights(stats, a, b, 0.37)
    tiny = ((1, None), (7, None)) if stats == "torch" else ((997, None),)  # the interpreter: a launch per chunk
    for chunk, split in (*tiny, (4099, None), (97, 5000), (10_007, 1)):
        assert weights(stats, a, b, 0.37, chunk, split) == whole


def test_large_and_tiny_magnitudes_keep_their_precision(stats: str) -> None:
    """The fixed-point unit follows the tensor's largest product: 1e30 and 1e-30 scales give the weights of 1."""
    a, b = pair(3000, 0.5, torch.float32, seed=9)
    for scale in (1e30, 1e-30, 2.0**-140):
        x, y = a.double() * scale, b.double() * scale
        assert weights(stats, x.float(), y.float(), 0.6) == weights_from_sums(0.6, *exact_sums(x.float(), y.float()))
    assert weights(stats, a * 2.0**40, b * 2.0**40, 0.6) == weights(stats, a, b, 0.6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 1000, 4099])
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_merge_matches_float64_oracle(dtype: torch.dtype, size: int, t: float) -> None:
    a, b = pair(size, 0.8, dtype, seed=size + DTYPES.index(dtype))
    out = merge_tensors(a, [b], "slerp", t=t, chunk=97)
    assert out.dtype == dtype and out.shape == a.shape
    expect = torch.from_numpy(oracle.slerp(a, b, t))
    wa, wb = oracle.slerp_weights(a, b, t)
    mag = abs(wa) * a.double().abs() + abs(wb) * b.double().abs()
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(expect, dtype), 2.0**-20 * mag)
    assert bool(((out.double() - expect).abs() <= tol).all())


def test_t_0_and_1_give_the_models_themselves() -> None:
    a, b = pair(4099, 0.8, torch.bfloat16, seed=4)
    assert torch.equal(merge_tensors(a, [b], "slerp", t=0.0).view(torch.int16), a.view(torch.int16))
    assert torch.equal(merge_tensors(a, [b], "slerp", t=1.0).view(torch.int16), b.view(torch.int16))


def test_triton_backend_gives_the_torch_backends_bits() -> None:
    a, b = pair(3001, 0.6, torch.bfloat16, seed=8)
    x = merge_tensors(a, [b], "slerp", t=0.45, chunk=1000, backend="torch")
    y = merge_tensors(on_kernels(a), on_kernels([b]), "slerp", t=0.45, chunk=1000, backend="triton").cpu()
    assert torch.equal(x.view(torch.int16), y.view(torch.int16))


@pytest.mark.parametrize(("kw", "fragment"), [
    ({}, "t: missing; slerp needs t"),
    ({"t": 0.5, "weight": 1.0}, "weight: unknown parameter for slerp"),
    ({"t": [0.5]}, "t: [0.5]; expected one value for the whole merge"),
])
def test_merge_tensors_checks_slerps_parameters(kw: dict, fragment: str) -> None:
    a, b = pair(10, 0.5, torch.float32, seed=0)
    with pytest.raises(InputError) as e:
        merge_tensors(a, [b], "slerp", **kw)
    assert fragment in str(e.value)


def test_merge_tensors_takes_one_model_besides_the_base() -> None:
    a, b = pair(10, 0.5, torch.float32, seed=0)
    with pytest.raises(InputError) as e:
        merge_tensors(a, [b, b.clone()], "slerp", t=0.5)
    assert "slerp interpolates the base model and one other model, not 2" in str(e.value)
    with pytest.raises(InputError) as e:
        merge_tensors(None, [a, b], "slerp", t=0.5)
    assert "base" in str(e.value)


def test_an_outlier_leaves_the_small_entries_their_precision(stats: str) -> None:
    """The fixed-point unit follows the largest product (here 30 * 30): the small products keep 32 bits below it."""
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(5000, generator=g) * 1e-3, torch.randn(5000, generator=g) * 1e-3
    a[0], b[1] = 30.0, -30.0
    for t in (0.2, 0.5, 0.8):
        assert weights(stats, a, b, t, chunk=1000) == weights_from_sums(t, *exact_sums(a, b))
