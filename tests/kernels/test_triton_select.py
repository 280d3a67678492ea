"""Triton statistics kernels against a numpy oracle and the torch backend: exact integers only.

The oracle computes from a = bits(|d|) with numpy (bincount, nonzero) and the fixed-point L1 sums in
float64 (|d| * 2^shift is exact in float64 for any float32 |d|), independent of the kernels' integer
shift arithmetic. Runs on CUDA when present, else through TRITON_INTERPRET=1 (tests/kernels/conftest.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusemerge.kernels import reference
from fusemerge.kernels import triton_select as ts
from fusemerge.kernels.philox import dare_key, philox_rand
from fusemerge.kernels.select import fixed_point_shift

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 7, 1000, 4099]
START = 2**32 + 5


def make_pair(n: int, dtype: torch.dtype, seed: int, device: str, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) + 0.5).to(dtype)
    expert = (base.float() + scale * torch.randn(n, generator=g)).to(dtype)
    return base.to(device), expert.to(device)


def abs_bits(base: torch.Tensor, expert: torch.Tensor) -> np.ndarray:
    d = expert.cpu().float().numpy() - base.cpu().float().numpy()
    return np.abs(d).view(np.int32).astype(np.int64)


def oracle_l1(base, expert, shift: int, keep) -> tuple[int, int]:
    d = np.abs(expert.cpu().float().numpy() - base.cpu().float().numpy()).astype(np.float64)
    q = np.trunc(d * 2.0**shift).astype(np.int64)
    if keep is None:
        return int(q.sum()), int(q.sum())
    key, density, start = keep
    u = philox_rand(key, start + torch.arange(q.size, dtype=torch.int64)).numpy()
    return int(q.sum()), int(q[u < np.float32(density)].sum())


def l1_one(backend, base, expert, shift: int, keep=None) -> tuple[int, int]:
    """backend.l1_fixed of one expert."""
    [got] = backend.l1_fixed(base, [expert], [shift], [keep] if keep is not None else None)
    return got


def _contract_shift(base, expert) -> int:
    top = float(np.abs(expert.cpu().float().numpy() - base.cpu().float().numpy()).max())
    return fixed_point_shift(top, expert.numel()) if top > 0 else 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", SIZES)
def test_histograms(n, dtype, device):
    base, expert = make_pair(n, dtype, n, device)
    a = abs_bits(base, expert)
    hi = ts.abs_hist_hi(base, expert)
    assert hi.dtype == torch.int64 and hi.shape == (ts.HI_BINS,) and hi.device == expert.device
    assert np.array_equal(hi.cpu().numpy(), np.bincount(a >> 16, minlength=ts.HI_BINS))
    assert torch.equal(hi.cpu(), reference.abs_hist_hi(base.cpu(), expert.cpu()))
    bins = np.unique(a >> 16)
    for b in {int(bins[0]), int(bins[len(bins) // 2]), int(bins[-1]), 0, ts.HI_BINS - 1}:
        lo = ts.abs_hist_lo(base, expert, b)
        want = np.bincount(a[(a >> 16) == b] & 0xFFFF, minlength=ts.LO_BINS)
        assert lo.dtype == torch.int64 and lo.shape == (ts.LO_BINS,)
        assert np.array_equal(lo.cpu().numpy(), want)
        assert torch.equal(lo.cpu(), reference.abs_hist_lo(base.cpu(), expert.cpu(), b))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", SIZES)
def test_count_and_nth_equal(n, dtype, device):
    base, expert = make_pair(n, dtype, 100 + n, device)
    a = abs_bits(base, expert)
    values, counts = np.unique(a, return_counts=True)
    for t in {int(values[counts.argmax()]), int(values[0]), int(values[-1]), 2**31 - 1}:
        where = np.nonzero(a == t)[0]
        assert ts.count_equal(base, expert, t) == where.size == reference.count_equal(base.cpu(), expert.cpu(), t)
        for q in sorted({0, 1, 2, where.size // 2, where.size, where.size + 1} - {-1}):
            want = int(where[q - 1]) if 1 <= q <= where.size else -1
            got = ts.nth_equal(base, expert, t, q)
            assert got == want == reference.nth_equal(base.cpu(), expert.cpu(), t, q), (t, q)
    if dtype == torch.bfloat16 and n >= 1000:
        assert counts.max() > 10  # bf16 deltas do tie: the cut paths above were exercised


def test_nth_equal_finds_ties_in_later_blocks(device):
    """The q-th tie sits past several blocks: the prefix sum over per-block counts picks the block."""
    n = 5 * ts.BLOCK + 17
    base = torch.ones(n, dtype=torch.bfloat16, device=device)
    expert = base.clone()
    expert[::3] = 1.5  # |d| = 0.5 at every third entry, 1.0 ... elsewhere d = 0
    t = int(torch.tensor(0.5).view(torch.int32))
    where = np.arange(0, n, 3)
    for q in (1, 400, 1000, where.size):
        assert ts.nth_equal(base, expert, t, q) == int(where[q - 1])
    assert ts.nth_equal(base, expert, t, where.size + 1) == -1
    assert ts.count_equal(base, expert, 0) == n - where.size  # d = 0 entries: a == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", SIZES)
def test_max_abs(n, dtype, device):
    base, expert = make_pair(n, dtype, 200 + n, device)
    d = expert.cpu().float() - base.cpu().float()
    [got] = ts.max_abs(base, [expert])
    assert got == float(d.abs().max()) == reference.max_abs(base.cpu(), [expert.cpu()])[0]


@pytest.mark.parametrize("n", [1, 1000, 3 * 1024 + 5])
def test_max_abs_of_many_inputs_in_one_launch(n, device):
    """Every input's max in one launch: of separate chunks, of a staging buffer's rows (read in place), of
    mixed dtypes, and without a base; each the single input's value."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=g) * s).to(torch.bfloat16) for s in (0.1, 3.0, 1e-3, 0.0)]
    want = [reference.max_abs_torch(base, x) for x in xs]
    buf = torch.stack([base, *xs]).to(device)
    assert ts.max_abs(buf[0], [buf[i] for i in range(1, 5)]) == want
    assert ts.max_abs(base.to(device), [x.to(device) for x in xs]) == want
    mixed = [xs[0].float(), *xs[1:]]
    assert ts.max_abs(base.to(device), [x.to(device) for x in mixed]) == want
    assert ts.max_abs(None, [x.to(device) for x in xs]) == [reference.max_abs_torch(None, x) for x in xs]
    assert ts.max_abs(base.to(device), []) == []


def test_max_abs_empty_and_nan(device):
    empty = torch.empty(0, dtype=torch.bfloat16, device=device)
    assert ts.max_abs(empty, [empty, empty]) == [0.0, 0.0]
    base, expert = make_pair(100, torch.float32, 1, device)
    other = expert.clone()
    expert[17] = float("nan")
    with np.errstate(invalid="ignore"):
        got = ts.max_abs(base, [other, expert])
    assert math.isnan(got[1]) and got[0] == reference.max_abs_torch(base, other)  # one NaN spoils only its own


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", SIZES)
def test_l1_fixed(n, dtype, device):
    base, expert = make_pair(n, dtype, 300 + n, device)
    shift = _contract_shift(base, expert)
    key = dare_key(0, "model.layers.1.self_attn.o_proj.weight", 2)
    for keep in (None, (key, 0.3, START), (key, 0.9, 7), (-key, 1.0, 0)):
        got = l1_one(ts, base, expert, shift, keep)
        assert got == oracle_l1(base, expert, shift, keep)
        assert got == l1_one(reference, base.cpu(), expert.cpu(), shift, keep)
    total, _ = l1_one(ts, base, expert, shift)
    assert 0 <= total < 2**62


@pytest.mark.parametrize("shift", [-126, -20, -1, 0, 1, 23, 60, 100, 127])
def test_l1_fixed_shift_extremes_and_subnormals(shift, device):
    """Every shift the driver can pick, with normal and subnormal deltas (results kept inside int64)."""
    g = torch.Generator().manual_seed(shift + 1000)
    k = 2.0 ** min(0, 30 - shift)  # scale the data down (exactly) so that the sums stay inside int64
    base = torch.randn(999, generator=g) * k
    expert = base.clone()
    expert[:300] += torch.randn(300, generator=g) * 1e-3 * k
    expert[300:600] = base[300:600] * (1 + 2**-20)
    tiny = torch.randint(1, 2**23, (300,), generator=g, dtype=torch.int32).view(torch.float32)  # subnormals
    base[600:900] = 0.0
    expert[600:900] = tiny
    top = float((expert - base).abs().max())
    assert math.ldexp(top, shift) * expert.numel() < 2**62
    base, expert = base.to(device), expert.to(device)
    keep = (dare_key(1, "x", 0), 0.5, START)
    got = l1_one(ts, base, expert, shift, keep)
    assert got == oracle_l1(base, expert, shift, keep)
    assert got == l1_one(reference, base.cpu(), expert.cpu(), shift, keep)


def test_l1_fixed_subnormal_scale_up(device):
    """Subnormal deltas with a large shift: the significand has no implicit bit."""
    base = torch.zeros(257, device=device)
    expert = torch.arange(1, 258, dtype=torch.int32).view(torch.float32).to(device)  # 1..257 x 2^-149
    assert l1_one(ts, base, expert, 149) == (sum(range(1, 258)),) * 2
    assert l1_one(ts, base, expert, 127) == oracle_l1(base, expert, 127, None)


@pytest.mark.parametrize("n", [1, 1000, 3 * 1024 + 5])
def test_l1_fixed_of_many_experts_in_one_launch(n, device):
    """Every expert's sums in one launch, each with its own shift and keep stream: of separate chunks, of a
    staging buffer's rows (in place), of mixed dtypes; a skipped expert (shift None, here one whose delta is
    infinite) gives (0, 0); each equal to the oracle and to the torch backend."""
    g = torch.Generator().manual_seed(n + 7)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=g) * s).to(torch.bfloat16) for s in (0.1, 3.0, 1e-3, 0.5)]
    xs[2][n // 2] = float("inf")
    shifts = [_contract_shift(base, x) for x in xs]
    shifts[2] = None
    keeps = [(dare_key(3, "t", i), d, START + 11) for i, d in enumerate((0.3, 0.9, 0.5, 1.0))]
    for k in (keeps, None, [None, *keeps[1:]]):  # an entry None: that expert keeps every entry
        want = [oracle_l1(base, x, h, k[i] if k else None) if h is not None else (0, 0)
                for i, (x, h) in enumerate(zip(xs, shifts, strict=True))]
        assert reference.l1_fixed(base, xs, shifts, k) == want
        buf = torch.stack([base, *xs]).to(device)
        assert ts.l1_fixed(buf[0], [buf[i] for i in range(1, 5)], shifts, k) == want
        assert ts.l1_fixed(base.to(device), [x.to(device) for x in xs], shifts, k) == want
        mixed = [xs[0].float(), *xs[1:]]
        assert ts.l1_fixed(base.to(device), [x.to(device) for x in mixed], shifts, k) == want
    with pytest.raises(ValueError, match="shifts"):
        ts.l1_fixed(base.to(device), [xs[0].to(device)], [1, 2])
    with pytest.raises(ValueError, match="shifts"):
        reference.l1_fixed(base, [xs[0]], [1], [keeps[0], keeps[1]])


def test_rejects_bad_inputs(device):
    base, expert = make_pair(10, torch.bfloat16, 1, device)
    with pytest.raises(ValueError, match="differ"):
        ts.abs_hist_hi(base[:5], expert)
    with pytest.raises(TypeError, match="dtype"):
        ts.count_equal(base.to(torch.float64), expert, 0)
    with pytest.raises(ValueError, match="hi_bin"):
        ts.abs_hist_lo(base, expert, ts.HI_BINS)
    with pytest.raises(ValueError, match="1-D"):
        ts.max_abs(base.view(2, 5), [expert.view(2, 5)])
    with pytest.raises(ValueError, match="vector chunks"):
        ts.max_abs(None, [expert, expert[:5]])


def test_empty_chunk(device):
    empty = torch.empty(0, dtype=torch.float16, device=device)
    assert int(ts.abs_hist_hi(empty, empty).sum()) == 0
    assert int(ts.abs_hist_lo(empty, empty, 5).sum()) == 0
    assert ts.count_equal(empty, empty, 0) == 0
    assert ts.nth_equal(empty, empty, 0, 1) == -1
    assert ts.l1_fixed(empty, [empty, empty], [10, None], [(1, 0.5, 0), (2, 0.5, 0)]) == [(0, 0), (0, 0)]
    assert ts.l1_fixed(empty, [], []) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [7, 1000, 4099])
def test_count_nonfinite(n, dtype, device):
    base, expert = make_pair(n, dtype, 300 + n, device)
    bad = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: max(1, n // 50)]
    values = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    expert[bad.to(device)] = values[torch.arange(bad.numel()) % 3].to(device)
    base[0] = float("inf") if n > 1 and 0 not in bad else base[0]  # inf in the base makes d non-finite too
    a = abs_bits(base, expert)
    want = int((a >= 0x7F800000).sum())
    assert want >= bad.numel()
    with np.errstate(invalid="ignore"):
        assert ts.count_nonfinite(base, expert) == want == reference.count_nonfinite(base.cpu(), expert.cpu())
