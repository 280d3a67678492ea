"""RAM and RAM+ (kernels/ram.py): against the float64 oracle on fresh data, the same bits for every backend and
chunking, RAM+'s scales from its counts, and the parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.ram import plus_scales
from tests import oracle
from tests.kernels.conftest import on_kernels
from tests.kernels.test_sce import within_ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def sparse_family(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int, changed: float = 0.4
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n experts that each change a random `changed` fraction of the entries (the rest equal the base),
    so entries are changed by none, one or several experts."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = []
    for i in range(n):
        where = torch.rand(shape, generator=g) < changed
        step = (0.01 * (i + 1)) * torch.randn(shape, generator=g)
        experts.append(torch.where(where, base.float() + step, base.float()).to(dtype))
    return base, experts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_within_an_ulp_of_the_oracle(dtype, n, method):
    base, experts = sparse_family((41, 23), n, dtype, seed=n + (50 if method == "ram" else 0))
    got = merge_tensors(base, experts, method, chunk=200)
    assert got.dtype == dtype and got.shape == base.shape
    plus = (0.1, 0.2) if method == "ramplus_tl" else None
    terms = base.double().abs() + sum((x.double() - base.double()).abs() for x in experts)  # float32's scale
    assert within_ulp(got, oracle.ram(base, experts, plus=plus), dtype, terms)
    if n > 1:  # entries several experts changed take their mean: neither expert's value
        assert not torch.equal(got, experts[0])


def test_ram_keeps_a_lone_change_and_averages_shared_ones():
    base = torch.zeros(7)
    a = torch.tensor([0.5, 0.0, 0.25, 0.0, 1e-6, -1.0, 1e-5])
    b = torch.tensor([0.0, 0.0, 0.75, -0.5, 0.0, 3.0, 0.0])
    got = merge_tensors(base, [a, b], "ram")
    # a lone change, none, the mean of two, b's lone change, below epsilon (none), the mean of two, at epsilon
    # (float32(1e-5) is not above it: none)
    assert got.tolist() == [0.5, 0.0, 0.5, -0.5, 0.0, 1.0, 0.0]
    # RAM+: a and b each have 1 own and 2 shared entries (rho 2, clamped to alpha 0.2): own entries times 1.1
    plus = merge_tensors(base, [a, b], "ramplus_tl", r=0.5, alpha=0.2)
    lam = np.float32(1) + np.float32(0.5) * np.float32(0.2)
    want = np.array([np.float32(0.5) * lam, 0.0, 0.5, np.float32(-0.5) * lam, 0.0, 1.0, 0.0], dtype=np.float32)
    assert torch.equal(plus, torch.from_numpy(want))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_backends_and_chunkings_give_the_same_bits(method):
    base, experts = sparse_family((24, 50), 4, torch.bfloat16, seed=7)
    kw = {"epsilon": 0.003} if method == "ram" else {"r": 0.3, "alpha": 0.5}
    first = merge_tensors(base, experts, method, **kw)
    for backend, chunk in (("torch", 7), ("torch", 300), ("triton", 100), ("triton", 1 << 20)):
        on = on_kernels if backend == "triton" else (lambda x: x)
        got = merge_tensors(on(base), on(experts), method, backend=backend, chunk=chunk, **kw).cpu()
        assert torch.equal(got.view(torch.int16), first.view(torch.int16)), (backend, chunk)


def test_plus_scales_are_mergekits_float32_operations():
    f32 = np.float32
    got = plus_scales([1, 0, 7], [40, 0, 1], 1e-5, 0.1, 0.2)  # rho 0.025; 0 (0 / 1e-5); 7, clamped to alpha
    want = [f32(1) + f32(0.1) * (f32(1) / f32(40)), 1.0, f32(1) + f32(0.1) * f32(0.2)]
    assert got == tuple(float(f32(w)) for w in want)
    assert plus_scales([3], [0], 1e-5, 0.1, 0.2) == (float(f32(1) + f32(0.1) * f32(0.2)),)  # 3 / 1e-5 clamps


def test_parameters_are_checked():
    base, experts = sparse_family((8, 8), 2, torch.float32, seed=0)
    with pytest.raises(InputError, match="weight: unknown parameter for ram"):
        merge_tensors(base, experts, "ram", weight=0.5)
    with pytest.raises(InputError, match="r: unknown parameter for ram"):
        merge_tensors(base, experts, "ram", r=0.5)
    with pytest.raises(InputError, match="epsilon"):
        merge_tensors(base, experts, "ramplus_tl", epsilon=-1.0)
    with pytest.raises(InputError):
        merge_tensors(None, experts, "ram")


def test_ram_reads_nothing_for_its_parameters():
    """ram has no statistics pass: its parameters come without loading a chunk (the GPU pipeline hands such methods
    a segment that cannot load); RAM+'s counts read the segments."""
    from fusemerge.kernels.ram import ram_params
    from fusemerge.kernels.select import Segment

    def no_load(start: int, count: int):
        raise AssertionError("read")

    p = ram_params([Segment(100, no_load)], 64, 1e-5, None, 3)
    assert p.weights == (1.0, 1.0, 1.0) and p.ram == (1e-5, None)
    with pytest.raises(AssertionError, match="read"):
        ram_params([Segment(100, no_load)], 64, 1e-5, (0.1, 0.2), 3)
