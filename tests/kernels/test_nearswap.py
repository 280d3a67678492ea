"""nearswap (reference.nearswap_torch): against float64 on fresh random data, against mergekit's operations bit for
bit, its edges, and the Triton kernel (kernels/triton_nearswap.py) giving the torch backend's bytes."""

from __future__ import annotations

import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels import reference, triton_merge, triton_nearswap
from fusemerge.kernels.params import ChunkParams
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.kernels.test_slerp import pair  # b = a + spread * 0.02 noise: 0.05 puts entries ~0.001 apart

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def mergekits(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit 0.1.5's nearswap_merge (merge_methods/nearswap.py) as it reads, on float32 copies."""
    a, b = a.float(), b.float()
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def params(t: float) -> ChunkParams:
    return ChunkParams("none", "none", False, (1.0,), nearswap=t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0001, 0.0005, 0.0015])
def test_within_a_rounding_of_float64(dtype: torch.dtype, t: float) -> None:
    """Fresh data where some entries are swapped whole (w = 1), some mixed and some kept: the float32 result is
    within 3 float32 ulps (of the larger input) of float64's, and the rounded output within 1 ulp of its dtype
    or that float32 error, where a and b have opposite signs and the result is far smaller than either."""
    a, b = pair(20011, 0.05, dtype, seed=int(t * 1e4) + 7 * DTYPES.index(dtype))
    w = (t / (a.double() - b.double()).abs().clamp_min(1e-6)).clamp(0, 1)
    assert bool((w == 1).any()) and bool(((w > 0.01) & (w < 0.99)).any())  # the data reaches every branch
    f64 = torch.from_numpy(oracle.nearswap(a, b, t))
    f32 = reference.nearswap_torch(a, b, t, torch.float32)
    scale = torch.maximum(a.double().abs(), b.double().abs())
    f32_error = 3 * ulp(scale, torch.float32)
    assert bool(((f32.double() - f64).abs() <= f32_error).all())
    out = reference.nearswap_torch(a, b, t, dtype)
    assert out.dtype == dtype
    assert bool(((out.double() - f64).abs() <= torch.maximum(ulp(f64, dtype), f32_error)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_mergekits_operations_bit_for_bit(dtype: torch.dtype) -> None:
    """mergekit's `t / x` is torch's reciprocal-then-multiply: its bits, not a true division's."""
    a, b = pair(4099, 0.1, dtype, seed=3)
    t = 0.0013
    got = reference.nearswap_torch(a, b, t, torch.float32)
    assert torch.equal(got.view(torch.int32), mergekits(a, b, t).view(torch.int32))
    # and on this data a true division gives other bits, so the equality above tells the two apart
    true_division = (torch.full_like(a, t, dtype=torch.float32) / (a.float() - b.float()).abs().clamp(min=1e-6))
    assert not torch.equal(true_division.clamp(0, 1), (t / (a.float() - b.float()).abs().clamp(min=1e-6)).clamp(0, 1))


def test_edges() -> None:
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, float("nan"), 1.0, float("inf"), -0.0])
    b = torch.tensor([1.0, 1.5, 1.0001, 3.0, float("nan"), 0.5, float("inf"), 1.0, 0.0])
    out = reference.nearswap_torch(a, b, 0.01, torch.float32)
    assert out[0] == 1.0  # equal entries: |a - b| clamped to 1e-6, w = 1
    assert float(out[1]) == pytest.approx(1.01, rel=1e-6)  # 0.5 apart, t = 0.01: w = 0.02, the base nearly kept
    assert out[2] == b[2]  # within t: the other model's entry
    assert float(out[3]) == pytest.approx(1.0 + 0.005 * 2.0, rel=1e-6)  # w = 0.01 / 2
    assert out[4:6].isnan().all()  # a NaN in either model
    assert out[6].isnan()  # an infinite other model: w = 0, 0 * inf is NaN (as in mergekit)
    assert out[7].isinf()  # an infinite base: w = 0, the base stays
    assert out[8].view(torch.int32) == 0  # -0 and +0: w = 1, and 1 * +0 + 0 * -0 is +0
    kept = reference.nearswap_torch(a[:4], b[:4], 0.0, torch.float32)
    assert torch.equal(kept, a[:4])  # t = 0: the base
    assert torch.equal(reference.nearswap_torch(a[:4], b[:4], -1.0, torch.float32), a[:4])  # w clamped to 0
    assert torch.equal(reference.nearswap_torch(a[:4], b[:4], 1e30, torch.float32), b[:4])  # w clamped to 1
    nf = torch.zeros(2, dtype=torch.int64)
    reference.nearswap_torch(a, b, 0.01, torch.float32, nf)
    assert nf.tolist() == [2, 2]  # slot 0 the other model's NaN / Inf, slot 1 the base's


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_chunk_of_both_backends_gives_the_same_bytes(dtype: torch.dtype, device: str) -> None:
    a, b = pair(5003, 0.05, dtype, seed=11)
    expect = reference.merge_chunk(a, [b], 0, params(0.0007), torch.bfloat16)
    direct = reference.nearswap_torch(a, b, 0.0007, torch.bfloat16)
    assert torch.equal(expect.view(torch.int16), direct.view(torch.int16))
    out = torch.empty(5003, dtype=torch.bfloat16, device=device)
    nf = torch.zeros(2, dtype=torch.int64, device=device)
    got = triton_merge.merge_chunk(a.to(device), [b.to(device)], 123, params(0.0007), torch.bfloat16, out=out,
                                   nonfinite=nf)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.cpu().view(torch.int16), expect.view(torch.int16))
    assert nf.tolist() == [0, 0]


INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
EDGE_A = [1.0, 1.0, 1.0, 1.0, 0.5, float("nan"), 1.0, float("inf"), -0.0, -0.0, 0.0, 3e38, -3e38, 1e-40]
EDGE_B = [1.0, 1.5, 1.0001, 3.0, float("nan"), 0.5, float("inf"), 1.0, 0.0, -0.0, -0.0, -3e38, 3e38, -1e-40]


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.cpu().view(INT_VIEW[x.dtype]), y.cpu().view(INT_VIEW[y.dtype]))


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0013, 0.0005, 0.0, -0.0, -1.0, 1e30, 1e39])
def test_kernel_gives_the_torch_backends_bits(in_dtype: torch.dtype, out_dtype: torch.dtype, t: float,
                                              device: str) -> None:
    """Fresh data of an odd length (a partial last block) with the edges in front: NaN, Inf, signed zeros,
    subnormals, overflowing differences; every t, including -0.0 (w = -0.0, kept by the clamps) and 1e39
    (an infinite float32 t). 0.0013 is not a float32: a kernel that took t as float64 would differ."""
    a, b = pair(9001, 0.05, in_dtype, seed=17 + DTYPES.index(in_dtype))
    a[:len(EDGE_A)] = torch.tensor(EDGE_A).to(in_dtype)
    b[:len(EDGE_B)] = torch.tensor(EDGE_B).to(in_dtype)
    expect = reference.nearswap_torch(a, b, t, out_dtype)
    out = torch.full((a.numel(),), 7.0, dtype=out_dtype, device=device)
    got = triton_nearswap.nearswap_chunk(a.to(device), b.to(device), t, out)
    assert got.data_ptr() == out.data_ptr()
    assert _same_bits(got, expect)


def test_kernel_mixes_the_input_dtypes_and_counts_nonfinite(device: str) -> None:
    """A bf16 base and a float32 other model (merge_chunk passes them as they are); the counts as the torch
    backend's, slot 0 the other model's, slot 1 the base's, added to what the counters held."""
    a, b = pair(3001, 0.05, torch.float32, seed=23)
    a, b = a.to(torch.bfloat16), b
    a[:len(EDGE_A)] = torch.tensor(EDGE_A).to(torch.bfloat16)
    b[:len(EDGE_B)] = torch.tensor(EDGE_B)
    a[2000], a[2001], b[2999] = float("-inf"), float("nan"), float("nan")  # beyond the first block of 1024
    expect_nf = torch.tensor([5, 7], dtype=torch.int64)
    reference.nearswap_torch(a, b, 0.001, torch.bfloat16, expect_nf)
    nf = torch.tensor([5, 7], dtype=torch.int64, device=device)
    out = torch.empty(a.numel(), dtype=torch.bfloat16, device=device)
    got = triton_nearswap.nearswap_chunk(a.to(device), b.to(device), 0.001, out, nf)
    assert _same_bits(got, reference.nearswap_torch(a, b, 0.001, torch.bfloat16))
    assert nf.tolist() == expect_nf.tolist() == [5 + 3, 7 + 4]  # NaN, Inf, and those beyond the first block


def test_kernel_refuses_what_it_cannot_read(device: str) -> None:
    a = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="one length"):
        triton_nearswap.nearswap_chunk(a, torch.zeros(9, device=device), 0.1, torch.empty(8, device=device))
    with pytest.raises(ValueError, match="one length"):
        triton_nearswap.nearswap_chunk(a, a.to(torch.int32), 0.1, torch.empty(8, device=device))
    with pytest.raises(ValueError, match="not contiguous"):
        triton_nearswap.nearswap_chunk(torch.zeros(16, device=device)[::2], a, 0.1, torch.empty(8, device=device))
    with pytest.raises(ValueError, match="2 counters"):
        triton_nearswap.nearswap_chunk(a, a, 0.1, torch.empty(8, device=device),
                                       torch.zeros(3, dtype=torch.int64, device=device))
    empty = torch.empty(0, device=device)
    assert triton_nearswap.nearswap_chunk(empty, empty, 0.1, torch.empty(0, device=device)).numel() == 0


def test_merge_tensors_chunks_and_shapes() -> None:
    a, b = pair(37 * 11, 0.05, torch.bfloat16, seed=5)
    a, b = a.reshape(37, 11), b.reshape(37, 11)
    whole = merge_tensors(a, [b], "nearswap", t=0.001)
    assert whole.shape == (37, 11) and whole.dtype == torch.bfloat16
    assert torch.equal(whole.view(torch.int16), merge_tensors(a, [b], "nearswap", t=0.001, chunk=50).view(torch.int16))
    f64 = torch.from_numpy(oracle.nearswap(a, b, 0.001)).reshape(37, 11)
    assert bool(((whole.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all())
    with pytest.raises(InputError, match="t: missing; nearswap needs t"):
        merge_tensors(a, [b], "nearswap")
    with pytest.raises(InputError, match="one other model"):
        merge_tensors(a, [b, b.clone()], "nearswap", t=0.001)
