"""nuslerp (kernels/nuslerp.py): its weights from exact sums, against float64, and its merge against the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.nuslerp import lerp_weights, nuslerp_weights, t_from_weights, weights_from_sums
from fusemerge.kernels.select import Segment
from tests import oracle
from tests.kernels.conftest import BACKENDS, on_kernels
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def family(size: int, spread: float, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base-like tensor and two fine-tunes of it (base + spread * 0.02 noise), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    x0, x1 = ((base.float() + torch.randn(size, generator=g) * 0.02 * spread).to(dtype) for _ in range(2))
    return base, x0, x1


def weights(stats: str, base: torch.Tensor | None, x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float],
            chunk: int | None = None, split: int | None = None) -> tuple[float, float]:
    """nuslerp_weights of (x0, x1) (their deltas from `base` if given) flat, `chunk` entries at a time, as one
    segment or two (split at `split`), by backend `stats`'s statistics functions (on its device)."""
    backend, device = BACKENDS[stats]
    x0, x1 = x0.reshape(-1).to(device), x1.reshape(-1).to(device)
    b = base.reshape(-1).to(device) if base is not None else None
    cuts = [0, x0.numel()] if split is None else [0, split, x0.numel()]

    def segment(lo: int, hi: int) -> Segment:
        return Segment(hi - lo, lambda s, c: (b[lo + s:lo + s + c] if b is not None else None,
                                              [x0[lo + s:lo + s + c], x1[lo + s:lo + s + c]]))

    return nuslerp_weights(backend, [segment(lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False)],
                           chunk or max(1, x0.numel()), list(w))


def exact_sums(base: torch.Tensor | None, x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, float, float]:
    """||v0||^2, ||v1||^2, <v0, v1> of the float32 vectors (deltas if `base`), each correctly rounded (fsum)."""
    def vec(x: torch.Tensor) -> list[float]:
        v = x.reshape(-1).float() - base.reshape(-1).float() if base is not None else x.reshape(-1).float()
        return v.double().tolist()

    u, v = vec(x0), vec(x1)
    return (math.fsum(a * a for a in u), math.fsum(b * b for b in v),
            math.fsum(a * b for a, b in zip(u, v, strict=True)))


WEIGHTS = [(1.0, 1.0), (0.3, 0.9), (2.0, -0.5), (1.0, 0.0), (0.0, 4.0)]


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("spread", [1e-3, 0.3, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w", WEIGHTS)
def test_weights_are_those_of_the_exact_sums(stats: str, with_base: bool, spread: float, dtype: torch.dtype,
                                             w: tuple[float, float]) -> None:
    base, x0, x1 = family(5003, spread, dtype, seed=int(spread * 1000) + DTYPES.index(dtype))
    base = base if with_base else None
    t = t_from_weights(*w)
    assert weights(stats, base, x0, x1, w) == weights_from_sums(t, *exact_sums(base, x0, x1))


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("spread", [1e-3, 0.05, 1.0, 3.0])
@pytest.mark.parametrize("w", WEIGHTS)
def test_weights_match_mergekit_formula_in_float64(stats: str, with_base: bool, spread: float,
                                                   w: tuple[float, float]) -> None:
    base, x0, x1 = family(4099, spread, torch.float32, seed=7 + int(spread * 100))
    base = base if with_base else None
    got, expect = weights(stats, base, x0, x1, w), oracle.nuslerp_weights(x0, x1, w, base)
    for g, e in zip(got, expect, strict=True):  # float64 weights rounded once to float32
        assert abs(g - e) <= 2.0**-23 * abs(e), (got, expect)


def test_t_is_the_second_models_share_of_the_weights() -> None:
    assert t_from_weights(1.0, 3.0) == 0.75
    assert t_from_weights(2.0, -0.5) == -0.5 / 1.5
    assert t_from_weights(0.5, -0.5) == t_from_weights(1e-7, 0.0) == 0.5  # |w_0 + w_1| < 1e-6: the midpoint
    assert t_from_weights(1e-6, 0.0) == 0.0


def test_the_branches_are_those_of_mergekit(stats: str) -> None:
    base, x0, _ = family(2000, 0.5, torch.float32, seed=3)
    d0 = x0 - base
    for other in (2.5 * d0, -d0, -3 * d0):  # parallel and antiparallel deltas: 1 - cos^2 = 0, linear
        x1 = base + other
        d1 = x1 - base  # the float32 deltas the kernels see
        aa, bb, ab = exact_sums(None, d0, d1)
        assert 1 - (ab / math.sqrt(aa * bb)) ** 2 <= 1e-12  # as colinear as float32 rounding of x1 leaves them
        assert weights(stats, None, d0, d1, (1.0, 3.0)) == lerp_weights(0.75) == (0.25, 0.75)
    # orthogonal: the quarter arc; t = 0.5 gives sin(pi / 4) / 1 for both, with and without a base
    x = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    quarter = (float(np.float32(math.sin(math.pi / 4))),) * 2
    assert weights(stats, None, *x, (1.0, 1.0)) == quarter
    assert weights(stats, torch.full((3,), 5.0), x[0] + 5.0, x[1] + 5.0, (2.0, 2.0)) == quarter


def test_a_nearly_parallel_pair_takes_the_arc_as_mergekit_does(stats: str) -> None:
    """Unlike slerp (linear above |cos| 0.9995), nuslerp interpolates along the arc until cos rounds to 1 in
    float32 (1 - cos^2 <= 1e-16 there)."""
    base, x0, _ = family(2000, 0.5, torch.float32, seed=5)
    x1 = base + 1.5 * (x0 - base) + 1e-2 * torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 0.02
    sums = exact_sums(base, x0, x1)
    assert 0.9995 < sums[2] / math.sqrt(sums[0] * sums[1]) < 1.0 - 1e-6
    got = weights(stats, base, x0, x1, (1.0, 1.0))
    assert got == weights_from_sums(0.5, *sums) != lerp_weights(0.5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_colinear_test_is_mergekits_in_float32(sign: float) -> None:
    """cos within 2^-25 of +-1 rounds to +-1 in float32: linear (near -1 the arc's weights would be ~1e7); the
    next float32 inwards takes the arc, with weights that stay near mergekit's."""
    def sums(cos: float) -> tuple[float, float, float]:
        return 1.0, 1.0, cos

    assert weights_from_sums(0.3, *sums(sign * (1 - 2.0**-26))) == lerp_weights(0.3)
    a, b = weights_from_sums(0.3, *sums(sign * (1 - 2.0**-23)))
    theta = math.acos(sign * (1 - 2.0**-23))
    assert (a, b) == (float(np.float32(math.sin(0.7 * theta) / math.sin(theta))),
                      float(np.float32(math.sin(0.3 * theta) / math.sin(theta))))
    if sign < 0:  # the arc near antiparallel vectors: large weights, but not 1e7
        assert (a, b) != lerp_weights(0.3) and 100 < max(abs(a), abs(b)) < 1e4


def test_a_zero_vector_counts_as_orthogonal(stats: str) -> None:
    """mergekit divides by a norm of at least 1e-7: a zero vector's cosine is 0, its angle pi / 2."""
    base, x0, x1 = family(100, 0.5, torch.float32, seed=1)
    expect = (float(np.float32(math.sin(0.25 * math.pi / 2))), float(np.float32(math.sin(0.75 * math.pi / 2))))
    for a, b in ((base, x1), (x0, base), (base, base)):  # an expert equal to the base has a zero delta
        assert weights(stats, base, a, b, (1.0, 3.0)) == expect
    assert weights(stats, None, torch.zeros(100), x1, (1.0, 3.0)) == expect
    assert weights(stats, None, torch.zeros(0), torch.zeros(0), (1.0, 3.0)) == expect


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["base", "x1"])
def test_a_nonfinite_entry_gives_the_linear_weights(stats: str, bad: float, where: str) -> None:
    base, x0, x1 = family(1000, 1.0, torch.float32, seed=2)
    (base if where == "base" else x1)[517] = bad
    assert weights(stats, base, x0, x1, (1.0, 0.6)) == lerp_weights(0.375)
    assert weights(stats, base, x1, x0, (1.0, 0.6), chunk=100) == lerp_weights(0.375)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunking_and_segments_do_not_change_the_weights(stats: str, with_base: bool, dtype: torch.dtype) -> None:
    base, x0, x1 = family(10_007, 0.4, dtype, seed=5)
    base = base if with_base else None
    whole = weights(stats, base, x0, x1, (0.7, 0.4))
    tiny = ((1, None), (7, None)) if stats == "torch" else ((997, None),)  # the interpreter: a launch per chunk
    for chunk, split in (*tiny, (4099, None), (97, 5000), (10_007, 1)):
        assert weights(stats, base, x0, x1, (0.7, 0.4), chunk, split) == whole


def _close(out: torch.Tensor, expect: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(expect, dtype), 2.0**-20 * mag)
    return bool(((out.double() - expect).abs() <= tol).all())


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 1000, 4099])
@pytest.mark.parametrize("w", [(1.0, 1.0), (0.3, 0.9), (1.0, 0.0)])
def test_merge_matches_float64_oracle(with_base: bool, dtype: torch.dtype, size: int, w: tuple[float, float]
                                      ) -> None:
    base, x0, x1 = family(size, 0.8, dtype, seed=size + DTYPES.index(dtype))
    base = base if with_base else None
    out = merge_tensors(base, [x0, x1], "nuslerp", weight=list(w), chunk=97)
    assert out.dtype == dtype and out.shape == x0.shape
    expect = torch.from_numpy(oracle.nuslerp(x0, x1, w, base))
    a, b = (abs(v) for v in oracle.nuslerp_weights(x0, x1, w, base))
    if base is None:
        mag = a * x0.double().abs() + b * x1.double().abs()
    else:
        mag = base.double().abs() + a * (x0.float() - base.float()).double().abs() \
            + b * (x1.float() - base.float()).double().abs()
    assert _close(out, expect, mag, dtype)


def test_nearly_antiparallel_deltas_keep_their_precision() -> None:
    """With a base the merge is base + a d_0 + b d_1 (task arithmetic's kernel), so weights near 70 (cos
    -0.9999) scale the deltas only: the base is not cancelled out of a sum of models."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g)
    d = torch.randn(4096, generator=g) * 1e-3
    x0, x1 = base + d, base - d + torch.randn(4096, generator=g) * 1.5e-5
    a, b = oracle.nuslerp_weights(x0, x1, (1.0, 1.0), base)
    assert a > 40 and b > 40
    out = merge_tensors(base, [x0, x1], "nuslerp")
    expect = torch.from_numpy(oracle.nuslerp(x0, x1, (1.0, 1.0), base))
    deltas = [(x - base).double().abs() for x in (x0, x1)]
    mag = base.double().abs() + a * deltas[0] + b * deltas[1]
    assert bool(((out.double() - expect).abs() <= 2.0**-21 * mag).all())


@pytest.mark.parametrize("with_base", [True, False])
def test_triton_backend_gives_the_torch_backends_bits(with_base: bool) -> None:
    base, x0, x1 = family(3001, 0.6, torch.bfloat16, seed=8)
    base = base if with_base else None
    x = merge_tensors(base, [x0, x1], "nuslerp", weight=[0.4, 1.1], chunk=1000, backend="torch")
    y = merge_tensors(on_kernels(base), on_kernels([x0, x1]), "nuslerp", weight=[0.4, 1.1], chunk=1000,
                      backend="triton").cpu()
    assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_a_zero_weight_gives_a_model_itself() -> None:
    """t = 0 or 1: sin(0) = 0, so the other model has no part (without a base: the model's own bytes)."""
    base, x0, x1 = family(4099, 0.8, torch.bfloat16, seed=4)
    assert torch.equal(merge_tensors(None, [x0, x1], "nuslerp", weight=[1.0, 0.0]).view(torch.int16),
                       x0.view(torch.int16))
    assert torch.equal(merge_tensors(None, [x0, x1], "nuslerp", weight=[0.0, 2.0]).view(torch.int16),
                       x1.view(torch.int16))


@pytest.mark.parametrize(("args", "kw", "fragment"), [
    ((None, 1), {}, "nuslerp interpolates exactly two models (besides the base, if given), not 1"),
    ((None, 3), {}, "nuslerp interpolates exactly two models (besides the base, if given), not 3"),
    (("base", 3), {}, "not 3"),
    (("base", 2), {"t": 0.5}, "t: unknown parameter for nuslerp"),
    (("base", 2), {"density": 0.5}, "density: unknown parameter for nuslerp"),
    (("base", 2), {"weight": [1.0]}, "weight: 1 values for 2 experts"),
])
def test_merge_tensors_checks_nuslerps_inputs(args: tuple, kw: dict, fragment: str) -> None:
    base, x0, x1 = family(10, 0.5, torch.float32, seed=0)
    given_base, n = args
    with pytest.raises(InputError) as e:
        merge_tensors(base if given_base else None, [x0, x1, x0.clone()][:n], "nuslerp", **kw)
    assert fragment in str(e.value)


def test_the_base_listed_among_the_experts_is_not_one_of_the_two() -> None:
    base, x0, x1 = family(500, 0.5, torch.float32, seed=6)
    listed = merge_tensors(base, [base, x0, x1], "nuslerp", weight=[1.0, 0.3, 0.9])
    assert torch.equal(listed, merge_tensors(base, [x0, x1], "nuslerp", weight=[0.3, 0.9]))


def test_the_modules_examples_hold() -> None:
    import doctest

    import fusemerge.kernels.nuslerp as module

    assert doctest.testmod(module).attempted == 3 and doctest.testmod(module).failed == 0


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_arc_per_row_without_flatten(with_base: bool, dtype: torch.dtype) -> None:
    """nuslerp_flatten: false (mergekit: one arc per row of the last dimension): within the oracle's tolerance row by
    row, on rows whose two vectors are apart by more or less (so their weights differ); the same bits in any chunking
    of whole rows and on the Triton backend; other weights than the whole tensor's."""
    g = torch.Generator().manual_seed(DTYPES.index(dtype) + 10 * with_base)
    rows, cols = 19, 41
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    spread = torch.linspace(0.05, 3.0, rows).unsqueeze(1)
    x0, x1 = ((base.float() + torch.randn(rows, cols, generator=g) * 0.02 * spread).to(dtype) for _ in range(2))
    b = base if with_base else None
    w = (0.3, 0.9)
    got = merge_tensors(b, [x0, x1], "nuslerp", weight=list(w), nuslerp_flatten=False, chunk=2 * cols)
    assert got.dtype == dtype and got.shape == x0.shape
    expect = torch.from_numpy(oracle.nuslerp_rows(x0, x1, w, b)).reshape(rows, cols)
    terms = _terms(x0.reshape(rows, cols), x1.reshape(rows, cols), w, b).reshape(rows, cols)
    assert _close(got, expect, terms, dtype)
    for chunk in (cols, 7 * cols + 3, 1 << 20):
        again = merge_tensors(b, [x0, x1], "nuslerp", weight=list(w), nuslerp_flatten=False, chunk=chunk)
        assert torch.equal(again.view(-1), got.view(-1)), chunk
    tri = merge_tensors(on_kernels(b), on_kernels([x0, x1]), "nuslerp", weight=list(w), nuslerp_flatten=False,
                        backend="triton", chunk=3 * cols).cpu()
    assert torch.equal(tri.view(-1), got.view(-1))
    if with_base:
        assert not torch.equal(got, merge_tensors(b, [x0, x1], "nuslerp", weight=list(w)))


def test_a_row_with_a_nan_takes_the_linear_weights() -> None:
    from fusemerge.kernels.nuslerp import lerp_weights, row_weights

    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    v1[1, 4] = float("nan")
    a, b = row_weights(v0, v1, 0.25)
    assert (float(a[1]), float(b[1])) == lerp_weights(0.25)
    assert float(a[0]) != lerp_weights(0.25)[0] and float(a[2]) != lerp_weights(0.25)[0]


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [(29, 17), (6, 5, 7), (64,)])
def test_one_arc_per_column_with_row_wise(with_base: bool, shape: tuple[int, ...]) -> None:
    """nuslerp_flatten: false with nuslerp_row_wise: true (mergekit: the vectors along dimension 0): within the oracle's
    tolerance column by column; the same bits in any chunking of whole rows (the column sums run over every chunk)
    and on the Triton backend; a 1-D tensor is one column, the whole tensor's arc."""
    g = torch.Generator().manual_seed(len(shape) + 5 * with_base)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    spread = torch.linspace(0.05, 3.0, shape[-1])  # columns apart by more or less
    x0, x1 = ((base.float() + torch.randn(shape, generator=g) * 0.02 * spread).to(torch.bfloat16) for _ in range(2))
    b = base if with_base else None
    w = (0.3, 0.9)
    kw = dict(weight=list(w), nuslerp_flatten=False, nuslerp_row_wise=True)
    cols = max(1, math.prod(shape[1:]))
    got = merge_tensors(b, [x0, x1], "nuslerp", chunk=2 * cols, **kw)
    expect = torch.from_numpy(oracle.nuslerp_cols(x0, x1, w, b)).reshape(shape)
    lead = shape[0]
    terms = _terms(*(x.reshape(lead, -1).T for x in (x0, x1)), w,
                   b.reshape(lead, -1).T if b is not None else None).T.reshape(shape)
    assert _close(got, expect, terms, torch.bfloat16)
    for chunk in (cols, 3 * cols + 1, 1 << 20):
        assert torch.equal(merge_tensors(b, [x0, x1], "nuslerp", chunk=chunk, **kw).view(-1), got.view(-1)), chunk
    tri = merge_tensors(on_kernels(b), on_kernels([x0, x1]), "nuslerp", backend="triton", chunk=5 * cols,
                        **kw).cpu()
    assert torch.equal(tri.view(-1), got.view(-1))
    if len(shape) == 1:
        assert torch.equal(got, merge_tensors(b, [x0, x1], "nuslerp", weight=list(w)))


def _terms(x0: torch.Tensor, x1: torch.Tensor, w: tuple[float, float], base: torch.Tensor | None) -> torch.Tensor:
    """Per row of the 2-D x0, x1 (and base): the magnitude of the weighted terms summed, |a| |v_0| + |b| |v_1|
    (+ |base|), (a, b) the oracle's weights of that row (the scale float32's rounding applies at, as in
    test_merge_matches_float64_oracle)."""
    out = []
    for r in range(x0.shape[0]):
        br = base[r] if base is not None else None
        a, b = (abs(v) for v in oracle.nuslerp_weights(x0[r], x1[r], w, br))
        v0, v1 = ((x[r].float() - br.float()) if br is not None else x[r].float() for x in (x0, x1))
        out.append(a * v0.double().abs() + b * v1.double().abs() + (br.double().abs() if br is not None else 0))
    return torch.stack(out)
