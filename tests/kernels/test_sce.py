"""SCE (kernels/sce.py): against the float64 oracle on fresh data, the same bits for every backend and chunking,
ties in the variance kept by index, the weights' rule, and the parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels import reference
from fusemerge.kernels.sce import sce_params, sce_weights, variance
from fusemerge.kernels.select import Segment
from tests import oracle
from tests.kernels.conftest import on_kernels
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def fresh(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n experts whose deltas differ in scale (so the weights differ) and in sign."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [(base + (0.004 * (i + 1)) * torch.randn(shape, generator=g)).to(dtype) for i in range(n)]
    return base.to(dtype), experts


def within_ulp(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, scale: torch.Tensor) -> bool:
    """Within an ulp of the output dtype, plus float32's rounding at `scale`, the magnitude of the terms summed
    (the base, for sce: the result is base + q in float32, where the two cancel a float32 output's ulp is far
    below that rounding)."""
    w = torch.from_numpy(want).reshape(got.shape)
    tol = ulp(w, dtype) + 4 * ulp(scale.double().reshape(got.shape), torch.float32)
    return bool(((got.double() - w).abs() <= tol).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_within_an_ulp_of_the_oracle(dtype, n, select_topk):
    base, experts = fresh((37, 29), n, dtype, seed=n * 10 + int(select_topk * 10))
    got = merge_tensors(base, experts, "sce", select_topk=select_topk, chunk=256)
    assert got.dtype == dtype and got.shape == base.shape
    want = oracle.sce(base, experts, select_topk)
    assert within_ulp(got, want, dtype, base)
    if select_topk == 0.0:  # nothing selected: the base itself
        assert torch.equal(got, base)
    elif n > 1:
        assert not torch.equal(got, base)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_backends_and_chunkings_give_the_same_bits(select_topk):
    base, experts = fresh((24, 50), 4, torch.bfloat16, seed=3)
    first = merge_tensors(base, experts, "sce", select_topk=select_topk)
    for backend, chunk in (("torch", 7), ("torch", 300), ("triton", 100), ("triton", 1 << 20)):
        on = on_kernels if backend == "triton" else (lambda x: x)
        got = merge_tensors(on(base), on(experts), "sce", select_topk=select_topk, backend=backend,
                            chunk=chunk).cpu()
        assert torch.equal(got.view(torch.int16), first.view(torch.int16)), (backend, chunk)


def test_ties_in_the_variance_are_kept_by_index():
    """Deltas of a few values: many entries share the k-th largest variance, and those kept are the first ones."""
    g = torch.Generator().manual_seed(5)
    n = 3000
    base = torch.zeros(n)
    experts = [torch.randint(-2, 3, (n,), generator=g).float() * 0.125 for _ in range(3)]
    v = variance(reference_deltas(base, experts)).numpy()
    k = int(np.float32(np.float32(np.count_nonzero(v)) * np.float32(0.4)))
    kth = np.sort(v)[::-1][k - 1]
    assert (v == kth).sum() > 50  # the cut falls inside a large tie
    got = merge_tensors(base, experts, "sce", select_topk=0.4, chunk=512)
    want = oracle.sce(base, experts, 0.4)
    assert within_ulp(got, want, torch.float32, base)
    kept = got != 0
    tied = np.flatnonzero(v == kth)
    kept_tied = tied[kept.numpy()[tied]]
    assert kept_tied.size and (kept_tied == tied[:kept_tied.size]).all()  # the lowest indices among the ties


def reference_deltas(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.float() - base.float() for x in experts]


def test_weights_follow_the_mean_squares():
    """w_i = m_i / sum m (float32), the kept entries' mean squares; 1 / N each where that sum is below 1e-6."""
    assert sce_weights([1.0, 3.0]) == (0.25, 0.75)
    assert sce_weights([1e-8, 3e-8, 0.0]) == tuple(float(np.float32(1) / np.float32(3)) for _ in range(3))
    base, experts = fresh((64, 16), 3, torch.float32, seed=9)
    seg = Segment(base.numel(), lambda s, c: (base.reshape(-1)[s:s + c], [x.reshape(-1)[s:s + c] for x in experts]))
    p = sce_params(reference, [seg], 100, 1.0)
    d = [(x - base).double().reshape(-1) for x in experts]
    m = [float((e * e).mean()) for e in d]
    want = [x / sum(m) for x in m]
    assert p.sce_cut is None and np.allclose(p.weights, want, rtol=1e-6, atol=0)
    assert p.weights[2] > p.weights[1] > p.weights[0]  # the experts' deltas grow with i


def test_parameters_are_checked():
    base, experts = fresh((8, 8), 2, torch.float32, seed=0)
    with pytest.raises(InputError, match="select_topk"):
        merge_tensors(base, experts, "sce", select_topk=1.5)
    with pytest.raises(InputError, match="weight: unknown parameter for sce"):
        merge_tensors(base, experts, "sce", weight=0.5)
    with pytest.raises(InputError):
        merge_tensors(None, experts, "sce")
