"""The one-pass bracket select: its kernels against a numpy oracle, its cuts against the radix select.

The radix select (select.top_cuts over chunks) is the reference for the cuts: both are exact, so every (t, c)
must be equal, for every dtype, size, N, rank, and for brackets that miss or overflow (then the radix select
runs). Runs on CUDA when present, else through TRITON_INTERPRET=1 (tests/kernels/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusemerge.kernels import reference, select
from fusemerge.kernels import triton_select as ts
from fusemerge.kernels.params import EMPTY_C, EMPTY_T

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BACKENDS = {"triton": ts, "torch": reference}


def make_inputs(n: int, n_exp: int, dtype: torch.dtype, seed: int, device: str, scale: float = 0.01):
    """Base + N experts as rows of one staging buffer (the pipeline's layout); bf16 deltas tie a lot."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    staging = torch.empty((n_exp, n), dtype=dtype)
    for i in range(n_exp):
        staging[i] = (base.float() + scale * (i + 1) * torch.randn(n, generator=g)).to(dtype)
    staging = staging.to(device)
    return base.to(device), [staging[i] for i in range(n_exp)]


def bits(base: torch.Tensor, expert: torch.Tensor) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        d = expert.cpu().float().numpy() - base.cpu().float().numpy()
    return np.abs(d).view(np.int32).astype(np.int64)


def radix_cuts(base, experts, ranks, chunk: int = 1000):
    seg = select.Segment(base.numel(), lambda s, c: (base[s:s + c].cpu(), [x[s:s + c].cpu() for x in experts]))
    return select.top_cuts(reference, [seg], chunk, ranks)


def check_cuts(base, experts, ranks, cuts):
    """Each (t, c) keeps exactly r entries, ties lowest index first: the definition, not another algorithm."""
    for i, x in enumerate(experts):
        a = bits(base, x)
        j = np.arange(a.size)
        for r, (t, c) in zip(ranks[i], cuts[i], strict=True):
            if r == 0:
                assert (t, c) == (EMPTY_T, EMPTY_C)
                continue
            kept = (a > t) | ((a == t) & (j < c))
            assert kept.sum() == r and (a[kept] >= t).all() and (a[~kept] <= t).all()
            assert not ((a == t) & ~kept)[: c].any()


def magnitude_ranks(n, n_exp, density):
    return [list(select.trim_counts("magnitude", n, density)) for _ in range(n_exp)]


def breadcrumbs_ranks(n, n_exp, density, gamma):
    return [list(select.trim_counts("breadcrumbs", n, density, gamma)) for _ in range(n_exp)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("n_exp", [1, 3])
def test_bracket_pass_counts_and_candidates(n, n_exp, dtype, device):
    base, experts = make_inputs(n, n_exp, dtype, 10 * n + n_exp, device)
    lo, hi = [], []
    for x in experts:
        a = np.sort(bits(base, x))
        for q_lo, q_hi in ((0.3, 0.6), (0.5, 0.5)):  # a wide bracket, and lo == hi
            lo.append(int(a[int(q_lo * (n - 1))]))
            hi.append(int(a[int(q_hi * (n - 1))]))
    cap = n + 5
    counts, fill, keys, block = ts.bracket_pass(base, experts, lo, hi, cap)
    ref = reference.bracket_pass(base.cpu(), [x.cpu() for x in experts], lo, hi, cap, block=block)
    blocks = -(-n // block)
    assert counts.shape == (3, 2 * n_exp, blocks) and counts.dtype == torch.int32
    assert torch.equal(counts.cpu(), ref[0]) and torch.equal(fill.cpu(), ref[1])
    for seg in range(2 * n_exp):
        a = bits(base, experts[seg // 2])
        pad = np.zeros(blocks * block, dtype=np.int64)
        for row, m in enumerate((a > hi[seg], a == hi[seg], a == lo[seg])):
            pad[:n] = m
            assert np.array_equal(counts[row, seg].cpu().numpy(), pad.reshape(blocks, block).sum(1))
        j = np.nonzero((a > lo[seg]) & (a < hi[seg]))[0]
        want = ((0x7FFFFFFF - a[j]) << 32) | j
        assert int(fill[seg]) == j.size
        got = np.sort(keys[seg, : j.size].cpu().numpy())
        assert np.array_equal(got, np.sort(want)) and np.array_equal(ref[2][seg, : j.size].numpy(), want)


def test_bracket_pass_full_blocks_of_one_value(device):
    """Whole blocks equal to lo, equal to hi, above hi, inside: every count reaches BLOCK (no field overflows)."""
    block = ts.BRACKET_BLOCK
    n = 5 * block + 3
    base = torch.zeros(n, device=device)
    expert = torch.empty(n)
    for k, v in enumerate((0.5, 1.0, 2.0, 0.75, 0.25)):
        expert[k * block:(k + 1) * block] = v
    expert[5 * block:] = 0.5
    lo, hi = (int(torch.tensor(v).view(torch.int32)) for v in (0.5, 1.0))
    counts, fill, keys, _ = ts.bracket_pass(base, [expert.to(device)], [lo], [hi], n)
    assert counts[:, 0].tolist() == [[0, 0, block, 0, 0, 0], [0, block, 0, 0, 0, 0], [block, 0, 0, 0, 0, 3]]
    assert int(fill[0]) == block
    assert sorted(keys[0, :block].tolist()) == [((0x7FFFFFFF - int(torch.tensor(0.75).view(torch.int32))) << 32) | j
                                                 for j in range(3 * block, 4 * block)]


def test_bracket_pass_overflow_counts_everything(device):
    """More candidates than room: fill still counts them all (the driver then falls back); the room holds
    candidates only."""
    base, experts = make_inputs(3000, 2, torch.float32, 5, device)
    _, fill, keys, _ = ts.bracket_pass(base, experts, [0, 0], [2**31 - 1] * 2, 10)
    for i, x in enumerate(experts):
        a = bits(base, x)
        j = np.nonzero((a > 0) & (a < 2**31 - 1))[0]
        assert int(fill[i]) == j.size > 10
        assert keys.shape == (2, 10) and set(keys[i].tolist()) <= set((((0x7FFFFFFF - a[j]) << 32) | j).tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_sample_abs_bits(dtype, device):
    n = 4099
    base, experts = make_inputs(n, 3, dtype, 77, device)
    step = select.weyl_step(n)
    got = ts.sample_abs_bits(base, experts, step, 500)
    pos = (np.arange(500) * step) % n
    want = np.stack([bits(base, x)[pos] for x in experts])
    assert np.array_equal(got.cpu().numpy(), want)
    assert torch.equal(reference.sample_abs_bits(base.cpu(), [x.cpu() for x in experts], step, 500), got.cpu())


@pytest.mark.parametrize("n", [2, 64, 1000, 4096, 5 * 2**16, 2**20 + 1])
def test_weyl_positions_are_distinct(n):
    step = select.weyl_step(n)
    s = min(n, 5000)
    assert np.unique((np.arange(s, dtype=np.int64) * step) % n).size == s


@pytest.mark.parametrize("backend", BACKENDS, ids=list(BACKENDS))
def test_tie_cuts_find_the_qth_tie(backend, device):
    """The q-th entry equal to t, several blocks in; q past the last tie gives -1."""
    b = BACKENDS[backend]
    dev = device if backend == "triton" else "cpu"
    n = 5 * ts.BLOCK + 17
    base = torch.ones(n, dtype=torch.bfloat16, device=dev)
    expert = base.clone()
    expert[::3] = 1.5
    t = int(torch.tensor(0.5).view(torch.int32))
    eq = torch.from_numpy((bits(base, expert) == t).astype(np.int32))
    blocks = -(-n // ts.BLOCK)
    counts = torch.nn.functional.pad(eq, (0, blocks * ts.BLOCK - n)).view(blocks, ts.BLOCK).sum(1, dtype=torch.int32)
    counts = torch.stack([torch.zeros_like(counts), counts]).to(dev)
    where = np.arange(0, n, 3)
    queries = [(0, t, q, 1) for q in (1, 400, 1000, where.size, where.size + 1)]
    want = [int(where[q - 1]) for q in (1, 400, 1000, where.size)] + [-1]
    assert b.tie_cuts(base, [expert], counts, queries, ts.BLOCK) == want


@pytest.mark.parametrize("backend", BACKENDS, ids=list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099, 20011])
@pytest.mark.parametrize("n_exp", [1, 2, 3, 8])
def test_bracket_cuts_equal_radix(backend, n_exp, n, dtype, device):
    b = BACKENDS[backend]
    dev = device if backend == "triton" else "cpu"
    base, experts = make_inputs(n, n_exp, dtype, n * 7 + n_exp, dev)
    for ranks in (magnitude_ranks(n, n_exp, 0.2), magnitude_ranks(n, n_exp, 1.0),
                  breadcrumbs_ranks(n, n_exp, 0.5, 0.05), [[1, 0], [n, max(1, n // 3)]] * (n_exp // 2 + 1)):
        ranks = ranks[:n_exp]
        got = select.bracket_cuts(b, base, experts, ranks)
        assert got is not None  # a miss at these sizes would mean a bracket far too narrow
        assert got == radix_cuts(base, experts, ranks), ranks
        check_cuts(base, experts, ranks, got)


@pytest.mark.parametrize("backend", BACKENDS, ids=list(BACKENDS))
def test_bracket_cuts_on_sampled_tensors(backend, device):
    """Tensors larger than SAMPLE_MIN, so the bracket comes from a sample and not from every element; many
    fresh seeds, both resolutions (a tie class at a bound, or the compacted candidates) and every dtype."""
    b = BACKENDS[backend]
    dev = device if backend == "triton" else "cpu"
    n = 3 * select.SAMPLE_MIN + 11
    seen = {"tie": 0, "inside": 0}
    for seed in range(6):
        for dtype in DTYPES:
            base, experts = make_inputs(n, 2, dtype, 1000 + seed, dev)
            ranks = magnitude_ranks(n, 2, (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)[seed])
            got = select.bracket_cuts(b, base, experts, ranks)
            assert got is not None and got == radix_cuts(base, experts, ranks, chunk=4096)
            for i, x in enumerate(experts):
                t, c = got[i][0]
                seen["tie" if c < n and (bits(base, x) == t).sum() > 1 else "inside"] += 1
    assert seen["tie"] and seen["inside"]


@pytest.mark.parametrize("knob", ["miss", "overflow"])
def test_a_failed_bracket_falls_back_to_radix(knob, device, monkeypatch):
    """A bracket that misses the rank (zero width) or overflows its room gives None, and top_cuts, given the
    whole tensor, still returns the radix select's cuts."""
    n = 5 * select.SAMPLE_MIN
    base, experts = make_inputs(n, 2, torch.float32, 3, device)
    ranks = magnitude_ranks(n, 2, 0.3)
    want = radix_cuts(base, experts, ranks, chunk=4096)
    monkeypatch.setattr(select, "BRACKET_Z", 0.0) if knob == "miss" else monkeypatch.setattr(select, "CAP_SLACK", 0.0)
    if knob == "overflow":
        monkeypatch.setattr(select, "SAMPLE_SHARE", 4096)
    assert select.bracket_cuts(ts, base, experts, ranks) is None
    whole = select.Segment(n, lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]), whole=True)
    assert select.top_cuts(ts, [whole], 4096, ranks) == want


def test_scratch_beyond_the_allowance_falls_back(device):
    """The bytes the bracket select would allocate beside the data are bounded by the segment's allowance."""
    n = 5 * select.SAMPLE_MIN
    base, experts = make_inputs(n, 2, torch.float32, 8, device)
    ranks = magnitude_ranks(n, 2, 0.5)
    want = radix_cuts(base, experts, ranks, chunk=4096)
    assert select.bracket_cuts(ts, base, experts, ranks, scratch=None) == want
    assert select.bracket_cuts(ts, base, experts, ranks, scratch=10_000) is None
    whole = select.Segment(n, lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]), whole=True, scratch=0)
    assert select.top_cuts(ts, [whole], 4096, ranks) == want  # through the radix select


def test_top_cuts_uses_the_bracket_for_whole_tensors(device, monkeypatch):
    """Whole tensors take the one-pass path on the Triton backend; chunked ones, and the torch backend, do not."""
    calls = []
    real = select.bracket_cuts
    monkeypatch.setattr(select, "bracket_cuts", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    n = 5000
    base, experts = make_inputs(n, 2, torch.bfloat16, 9, device)
    ranks = magnitude_ranks(n, 2, 0.4)

    def seg(whole):
        return select.Segment(n, lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]), whole=whole)

    want = radix_cuts(base, experts, ranks)
    assert select.top_cuts(ts, [seg(True)], 1000, ranks) == want and calls == [ts]
    assert select.top_cuts(ts, [seg(False)], 1000, ranks) == want and calls == [ts]
    cpu = select.Segment(n, lambda s, c: (base[s:s + c].cpu(), [x[s:s + c].cpu() for x in experts]), whole=True)
    assert select.top_cuts(reference, [cpu], 1000, ranks) == want and calls == [ts]


def test_separate_expert_tensors_keep_the_radix_select(device):
    """Experts that are not rows of one buffer would be copied whole: the bracket select declines."""
    base, experts = make_inputs(5000, 2, torch.float32, 4, device)
    separate = [x.clone() for x in experts]
    ranks = magnitude_ranks(5000, 2, 0.5)
    assert select.bracket_cuts(ts, base, separate, ranks) is None
    assert select.bracket_cuts(ts, base, experts, ranks) == radix_cuts(base, experts, ranks)


@pytest.mark.parametrize("case", ["all-tied", "zero-deltas", "nonfinite", "two-values"])
def test_bracket_cuts_adversarial(case, device):
    """One tie class for the whole tensor, deltas all zero, NaN / Inf deltas, two values only."""
    n = 3 * select.SAMPLE_MIN + 5
    g = torch.Generator().manual_seed(len(case))
    base = torch.randn(n, generator=g)
    experts = [base.clone(), base.clone()]
    if case == "all-tied":
        base = torch.zeros(n)
        experts = [torch.full((n,), 0.5), torch.full((n,), -0.25)]
    elif case == "nonfinite":
        experts[0] = base + torch.randn(n, generator=g)
        experts[0][::97] = float("nan")
        experts[1][::5] = float("inf")
    elif case == "two-values":
        base = torch.zeros(n)
        experts = [torch.where(torch.rand(n, generator=g) < 0.3, 2.0, 1.0), torch.zeros(n)]
        experts[1][-1] = 1.0
    base, experts = base.to(device), list(torch.stack(experts).to(device))
    for density in (0.01, 0.5, 1.0):
        ranks = magnitude_ranks(n, 2, density)
        got = select.bracket_cuts(ts, base, experts, ranks)
        assert got is not None and got == radix_cuts(base, experts, ranks, chunk=4096)


def test_merge_tensors_takes_the_bracket_for_rows_of_one_tensor(device, monkeypatch):
    """merge_tensors on the Triton backend: experts given as rows of one tensor take the one-pass select, and
    the merge equals the one from separate tensors (radix select)."""
    import fusemerge

    used = []
    real = select.bracket_cuts
    monkeypatch.setattr(select, "bracket_cuts",
                        lambda *a, **kw: (lambda r: used.append(r is not None) or r)(real(*a, **kw)))
    base, experts = make_inputs(3 * 1009, 3, torch.bfloat16, 21, device)
    stacked = torch.stack(experts)
    kw = dict(method="ties", weight=[1.0, 0.5, 0.8], density=0.3, backend="triton")
    rows = fusemerge.merge_tensors(base.view(3, -1), [stacked[i].view(3, -1) for i in range(3)], **kw)
    assert used == [True]
    separate = fusemerge.merge_tensors(base.view(3, -1), [x.clone().view(3, -1) for x in experts], **kw)
    assert used == [True, False] and torch.equal(rows, separate)


@pytest.mark.parametrize(("base_dtype", "dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_bracket_cuts_with_a_base_of_another_dtype(base_dtype, dtype, device):
    n = 2 * select.SAMPLE_MIN + 333
    base, experts = make_inputs(n, 3, dtype, 55, device)
    base = (base.float() + 1e-3 * torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)).to(base_dtype)
    for ranks in (magnitude_ranks(n, 3, 0.3), breadcrumbs_ranks(n, 3, 0.6, 0.02)):
        got = select.bracket_cuts(ts, base, experts, ranks)
        assert got is not None and got == radix_cuts(base, experts, ranks, chunk=4096)
