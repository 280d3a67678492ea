"""The fused Triton merge kernel against the contract (a numpy float32 oracle) and the torch backend.

The oracle below is docs/architecture.md's per-chunk math written out with numpy float32 operations,
one IEEE operation at a time (numpy never fuses), independent of fusemerge.kernels.reference. The
kernel must match it and the reference bit for bit: same kept sets, same elected signs, same output bits.
Runs on CUDA when present, else through TRITON_INTERPRET=1 (tests/kernels/conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fusemerge.kernels import reference
from fusemerge.kernels import triton_merge as tm
from fusemerge.kernels import triton_nearswap as tn
from fusemerge.kernels.layout import expert_rows
from fusemerge.kernels.params import EMPTY_C, EMPTY_T, ChunkParams
from fusemerge.kernels.philox import dare_key, philox_rand

F32 = np.float32
METHODS = [  # (sparsifier, consensus, linear)
    ("none", "none", True),
    ("none", "none", False),
    ("none", "sign", False),
    ("magnitude", "none", False),
    ("magnitude", "sign", False),
    ("dare", "none", False),
    ("dare", "sign", False),
    ("breadcrumbs", "none", False),
    ("breadcrumbs", "sign", False),
]
METHOD_IDS = ["linear" if lin else f"{s}-{c}" for s, c, lin in METHODS]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
START = 2**32 + 5  # global index of element 0: offsets and cuts above 2^32 exercise the int64 paths
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ------------------------------------------------------------------------------------------------
# The oracle: docs/architecture.md, "Exact per-chunk math", in numpy float32.
# ------------------------------------------------------------------------------------------------


def _in_top(a: np.ndarray, j: np.ndarray, t: int, c: int) -> np.ndarray:
    return (a > t) | ((a == t) & (j < c))


def oracle_merge(base, experts, start: int, p: ChunkParams, out_dtype: torch.dtype) -> torch.Tensor:
    xs = [e.cpu().float().numpy() for e in experts]
    n = xs[0].size
    w = [F32(v) for v in p.weights]
    if p.linear:
        num = xs[0] * w[0]
        for i in range(1, p.n):
            num = num + xs[i] * w[i]
        if p.normalize:
            den = F32(0.0)
            for v in w:
                den = den + v
            if den != 0:
                num = num / den
        return torch.from_numpy(num).to(out_dtype)
    b = base.cpu().float().numpy()
    j = start + np.arange(n, dtype=np.int64)
    s = p.scales()
    prods = []
    for i, x in enumerate(xs):
        d = x - b
        dh = d * F32(s[i])
        if p.sparsifier == "dare":
            u = philox_rand(p.keys[i], torch.from_numpy(j)).numpy()
            dh = np.where(u < F32(p.density[i]), dh, F32(0.0))
        elif p.sparsifier != "none":
            a = np.abs(d).view(np.int32)
            keep = _in_top(a, j, p.t_keep[i], p.c_keep[i])
            if p.sparsifier == "breadcrumbs":
                keep &= ~_in_top(a, j, p.t_drop[i], p.c_drop[i])
            dh = np.where(keep, dh, F32(0.0))
        prods.append(w[i] * dh)
    if p.consensus == "sign":
        total = prods[0]
        for q in prods[1:]:
            total = total + q
        positive = total >= 0
        num = np.zeros(n, dtype=F32)
        den = np.zeros(n, dtype=F32)
        for i, q in enumerate(prods):
            agree = np.where(positive, q > 0, q < 0)
            num = num + np.where(agree, q, F32(0.0))
            den = den + np.where(agree, w[i], F32(0.0))
        if p.normalize:
            num = num / np.where(den == 0, F32(1.0), den)
    else:
        num = prods[0]
        for q in prods[1:]:
            num = num + q
        if p.normalize:
            den = F32(0.0)
            for v in w:
                den = den + v
            num = num / (den if den != 0 else F32(1.0))
    out = b + F32(p.lam) * num
    return torch.from_numpy(out).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Inputs: fresh random chunks, never zeros; thresholds and cuts from the data so ties get split.
# ------------------------------------------------------------------------------------------------


def make_inputs(n: int, n_experts: int, dtype: torch.dtype, seed: int, device: str, scale: float = 0.02):
    """(base, expert rows of one staging buffer). Some entries of expert 1 mirror expert 0 around the
    base with every other expert equal to the base there, so the election sum is exactly 0 (g = +1)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) + 0.5).to(dtype)
    rows = []
    for _ in range(n_experts):
        rows.append((base.float() + scale * torch.randn(n, generator=g)).to(dtype))
    if n_experts >= 2 and n >= 4:
        idx = torch.randperm(n, generator=g)[: n // 4]
        mirrored = (2 * base.float()[idx] - rows[0].float()[idx]).to(dtype)
        rows[1][idx] = mirrored
        for r in rows[2:]:
            r[idx] = base[idx]
    stride = ((n + 63) // 64) * 64 + 64  # a staging buffer wider than the chunk, as the executor's
    buf = torch.full((n_experts, stride), float("nan"), dtype=dtype)
    for i, r in enumerate(rows):
        buf[i, :n] = r
    buf = buf.to(device)
    return base.to(device), [buf[i, :n] for i in range(n_experts)]


def _abs_bits(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return (expert.cpu().float() - base.cpu().float()).abs().view(torch.int32)


def _cut_for_rank(a: torch.Tensor, start: int, k: int) -> tuple[int, int]:
    """(t, c) with exactly the k largest (ties by index) in in_top(t, c), computed by a stable sort."""
    if k == 0:
        return EMPTY_T, EMPTY_C
    order = torch.sort(-a.to(torch.int64), stable=True).indices
    t = int(a[order[k - 1]])
    tied_kept = order[:k][a[order[:k]] == t]
    ties_total = int((a == t).sum())
    c = start + a.numel() if tied_kept.numel() == ties_total else start + int(tied_kept.max()) + 1
    return t, c


def make_params(sparsifier: str, consensus: str, linear: bool, base, experts, start: int, seed: int) -> ChunkParams:
    rng = np.random.default_rng(seed)
    n_exp = len(experts)
    n = experts[0].numel()
    weights = tuple(float(F32(x)) for x in rng.uniform(-0.6, 1.4, n_exp))
    if n_exp >= 2:  # experts 0 and 1 equal weights: the mirrored entries cancel exactly
        weights = (weights[0], weights[0], *weights[2:])
    lam = float(F32(rng.uniform(0.5, 1.5)))
    normalize = bool(rng.integers(0, 2)) if not linear else True
    kw: dict = {}
    if sparsifier in ("magnitude", "breadcrumbs"):
        t_keep, c_keep, t_drop, c_drop = [], [], [], []
        for e in experts:
            a = _abs_bits(base, e)
            k = max(1, int(rng.uniform(0.2, 0.8) * n))
            g = int(rng.uniform(0.0, 0.1) * n) if sparsifier == "breadcrumbs" else 0
            tk, ck = _cut_for_rank(a, start, min(n, k + g))
            t_keep.append(tk)
            c_keep.append(ck)
            td, cd = _cut_for_rank(a, start, g)
            t_drop.append(td)
            c_drop.append(cd)
        kw = {"t_keep": tuple(t_keep), "c_keep": tuple(c_keep)}
        if sparsifier == "breadcrumbs":
            kw.update(t_drop=tuple(t_drop), c_drop=tuple(c_drop))
    if sparsifier == "dare":
        density = tuple(float(F32(x)) for x in rng.uniform(0.2, 0.9, n_exp))
        kw = {
            "keys": tuple(dare_key(seed, "model.layers.3.mlp.down_proj.weight", i) for i in range(n_exp)),
            "density": density,
            "scale": tuple(float(F32(1.0 / d)) for d in density),
        }
    return ChunkParams(sparsifier, consensus, linear, weights, lam=lam, normalize=normalize, **kw)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.cpu(), want.cpu()
    same = (g.view(INT_VIEW[g.dtype]) == w.view(INT_VIEW[w.dtype])) | (g.isnan() & w.isnan())
    if not bool(same.all()):
        bad = (~same).nonzero().view(-1)[:5].tolist()
        pytest.fail(f"{what}: {int((~same).sum())} of {same.numel()} differ, e.g. at {bad}: "
                    f"{g[bad].tolist()} vs {w[bad].tolist()}")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


# N x size x dtype: every combination at 1, 7 and 1000 elements (one block); the 5-block size 4099 for bf16
# with N in {3, 8} only, to keep the interpreter run short (block boundaries are covered by it and by the
# chunking tests).
CASES = [
    pytest.param(n_exp, n, dtype, id=f"N{n_exp}-n{n}-{str(dtype)[6:]}")
    for n_exp in (1, 2, 3, 8)
    for n in (1, 7, 1000, 4099)
    for dtype in DTYPES
    if n != 4099 or (dtype == torch.bfloat16 and n_exp in (3, 8))
]


@pytest.mark.parametrize(("n_experts", "n", "dtype"), CASES)
@pytest.mark.parametrize(("sparsifier", "consensus", "linear"), METHODS, ids=METHOD_IDS)
def test_merge_matches_oracle_and_reference(sparsifier, consensus, linear, n_experts, n, dtype, device):
    seed = zlib.crc32(f"{sparsifier}{consensus}{linear}{n_experts}{n}{dtype}".encode())
    base, experts = make_inputs(n, n_experts, dtype, seed, device)
    params = make_params(sparsifier, consensus, linear, base, experts, START, seed)
    got = tm.merge_chunk(base, experts, START, params, dtype)
    assert got.device == experts[0].device
    want = oracle_merge(base, experts, START, params, dtype)
    assert_same_bits(got, want, "triton vs oracle")
    ref = reference.merge_chunk(base.cpu(), [e.cpu() for e in experts], START, params, dtype)
    assert_same_bits(got, ref, "triton vs reference")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(("block", "warps", "unroll", "late"),
                         [(256, 2, 1, False), (2048, 8, 1, False), (4096, 8, 1, False), (1024, 4, 2, False),
                          (1024, 4, 1, True), (512, 2, 2, True), (1024, 4, 3, True)])
def test_launch_choices_do_not_change_the_result(block, warps, unroll, late, device, monkeypatch):
    """bench/kernels.py's launch choices (--block, --num-warps, --unroll, --late-count) time the same bits and
    the same NaN / Inf counts: the block-local index cut, the DARE offsets, the sums' order and the counts do
    not depend on them. Inputs hold NaN / Inf in some blocks (and only some inputs) so the counts are tested."""
    n = 5000
    for sparsifier, consensus, linear in (("magnitude", "sign", False), ("dare", "sign", False),
                                          ("breadcrumbs", "none", False), ("none", "none", True),
                                          ("none", "none", False)):
        base, experts = make_inputs(n, 3, torch.bfloat16, 9, device)
        experts[1][[7, 4100]] = float("nan")
        experts[2][4101] = float("inf")
        base[[3, 2500]] = float("-inf")
        p = make_params(sparsifier, consensus, linear, base, experts, START, 9)
        # linear averages models (the base among them) and counts no base slot
        inputs = [base, experts[1], experts[2]] if linear else experts
        want = reference.merge_chunk(None if linear else base.cpu(), [x.cpu() for x in inputs], START, p,
                                     torch.bfloat16)
        want_nf = [2, 2, 1] if linear else [0, 2, 1, 2]
        monkeypatch.setattr(tm, "BLOCK", block)
        monkeypatch.setattr(tm, "NUM_WARPS", warps)
        monkeypatch.setattr(tm, "UNROLL", unroll)
        monkeypatch.setattr(tm, "LATE_COUNT", late)
        monkeypatch.setattr(tm, "SUM_UNROLL", unroll)  # the plain sum's own choice
        monkeypatch.setattr(tm, "SUM_LATE_COUNT", late)
        nf = torch.zeros(4, dtype=torch.int64, device=device)
        got = tm.merge_chunk(base, inputs, START, p, torch.bfloat16, nonfinite=nf)
        monkeypatch.undo()
        what = f"{sparsifier}/{consensus} BLOCK={block} num_warps={warps} unroll={unroll} late={late}"
        assert_same_bits(got, want, what)
        assert nf.tolist()[:len(want_nf)] == want_nf, what


def test_ties_are_split_by_index(device):
    """The cut keeps exactly the tied entries with global index < c, across block boundaries."""
    n = 3000
    base, experts = make_inputs(n, 1, torch.bfloat16, 11, device)
    a = _abs_bits(base, experts[0])
    values, counts = torch.unique(a, return_counts=True)
    t = int(values[counts.argmax()])  # the most common magnitude: many ties
    tied = (a == t).nonzero().view(-1)
    assert tied.numel() > 20
    c = START + int(tied[tied.numel() // 2]) + 1
    p = ChunkParams("magnitude", "none", False, (1.0,), t_keep=(t,), c_keep=(c,))
    out = tm.merge_chunk(base, experts, START, p, torch.float32).cpu()
    d = experts[0].cpu().float() - base.cpu().float()
    j = START + torch.arange(n)
    keep = (a > t) | ((a == t) & (j < c))
    assert 0 < int(((a == t) & keep).sum()) < tied.numel()
    assert torch.equal(out, base.cpu().float() + torch.where(keep, d, torch.zeros(())))


def test_chunking_does_not_change_the_result(device):
    """Merging a tensor in uneven chunks (global starts) gives the bits of merging it whole."""
    n = 2500
    for sparsifier, consensus in (("dare", "sign"), ("magnitude", "sign"), ("breadcrumbs", "none")):
        base, experts = make_inputs(n, 3, torch.bfloat16, 5, device)
        p = make_params(sparsifier, consensus, False, base, experts, 0, 5)
        whole = tm.merge_chunk(base, experts, 0, p, torch.bfloat16)
        parts = []
        for lo, hi in ((0, 1), (1, 1030), (1030, 2047), (2047, n)):
            parts.append(tm.merge_chunk(base[lo:hi], [e[lo:hi] for e in experts], lo, p, torch.bfloat16))
        assert_same_bits(torch.cat(parts), whole, f"{sparsifier}/{consensus} chunked")


@pytest.mark.parametrize("start", [2**31 - 700, 2**32 - 700, 2**40 + 3])
def test_global_offsets_crossing_word_boundaries(start, device):
    """DARE draws and index cuts when the chunk's global indices cross 2^31 / 2^32 (counter word c1)."""
    base, experts = make_inputs(1500, 2, torch.bfloat16, 4, device)
    for sparsifier in ("dare", "magnitude"):
        p = make_params(sparsifier, "sign", False, base, experts, start, 4)
        got = tm.merge_chunk(base, experts, start, p, torch.bfloat16)
        assert_same_bits(got, oracle_merge(base, experts, start, p, torch.bfloat16), f"{sparsifier} at {start}")


def test_input_layouts_agree(device):
    """Rows of a staging buffer (zero-copy), separate tensors (stacked) and an [N, n] tensor agree."""
    n = 777
    base, rows = make_inputs(n, 3, torch.bfloat16, 3, device)
    p = make_params("dare", "sign", False, base, rows, START, 3)
    from_rows = tm.merge_chunk(base, rows, START, p, torch.bfloat16)
    separate = [r.clone() for r in rows]
    assert_same_bits(tm.merge_chunk(base, separate, START, p, torch.bfloat16), from_rows, "separate")
    assert_same_bits(tm.merge_chunk(base, torch.stack(separate), START, p, torch.bfloat16), from_rows, "2-D")
    x, stride = expert_rows(rows)
    assert x.data_ptr() == rows[0].data_ptr() and stride == rows[1].data_ptr() // 2 - rows[0].data_ptr() // 2


def test_many_experts(device):
    """N = 16 (int32 agree bits) and N = 40 (int64 agree bits), sign consensus."""
    for n_experts in (16, 40):
        base, experts = make_inputs(300, n_experts, torch.bfloat16, n_experts, device)
        for sparsifier in ("magnitude", "dare"):
            p = make_params(sparsifier, "sign", False, base, experts, START, n_experts)
            got = tm.merge_chunk(base, experts, START, p, torch.bfloat16)
            assert_same_bits(got, oracle_merge(base, experts, START, p, torch.bfloat16), f"N={n_experts}")


@pytest.mark.parametrize(("in_dtype", "base_dtype", "out_dtype"), [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float16),
    (torch.float16, torch.bfloat16, torch.bfloat16),
])
def test_dtype_combinations(in_dtype, base_dtype, out_dtype, device):
    base, experts = make_inputs(1000, 3, in_dtype, 8, device, scale=0.3)
    base = base.to(base_dtype)
    p = make_params("magnitude", "sign", False, base, experts, START, 8)
    got = tm.merge_chunk(base, experts, START, p, out_dtype)
    assert_same_bits(got, oracle_merge(base, experts, START, p, out_dtype), "mixed dtypes")


def test_rounding_ties_and_specials(device):
    """Outputs exactly halfway between two bf16 / fp16 values round to even; subnormals survive."""
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 2**15, 4096, dtype=np.int64)
    halfway = torch.from_numpy(((hi << 16) | 0x8000).astype(np.int32)).view(torch.float32)
    halfway = halfway[halfway.isfinite()]
    tiny = torch.tensor([1e-39, -1e-39, 1.4e-45, -3e-41, 6e-8, 3e-8, 65519.0, -65520.0], dtype=torch.float32)
    theta = torch.cat([halfway, tiny]).to(device)
    base = torch.zeros_like(theta)
    p = ChunkParams("none", "none", False, (1.0,))
    for out_dtype in (torch.bfloat16, torch.float16):
        with np.errstate(over="ignore"):
            got = tm.merge_chunk(base, [theta], 0, p, out_dtype)
        assert_same_bits(got, theta.cpu().to(out_dtype), f"rounding to {out_dtype}")
    got = tm.merge_chunk(base, [theta], 0, p, torch.float32)
    assert_same_bits(got, theta.cpu(), "float32 passthrough (subnormals kept)")


def test_nan_and_inf_follow_the_contract(device):
    """A NaN election sum elects -1 (S >= 0 is false) and a NaN p_i never agrees; inf propagates."""
    base, experts = make_inputs(64, 3, torch.float32, 9, device)
    experts[0][3] = float("nan")
    experts[1][5] = float("inf")
    experts[0][7] = float("-inf")
    experts[1][7] = float("inf")  # S = -inf + inf = NaN
    for consensus in ("sign", "none"):
        p = ChunkParams("none", consensus, False, (1.0, 0.5, 0.25), normalize=True)
        with np.errstate(invalid="ignore"):
            got = tm.merge_chunk(base, experts, 0, p, torch.bfloat16)
            want = oracle_merge(base, experts, 0, p, torch.bfloat16)
            ref = reference.merge_chunk(base.cpu(), [e.cpu() for e in experts], 0, p, torch.bfloat16)
        assert_same_bits(got, want, f"nan/inf, {consensus}")
        assert_same_bits(ref, want, f"nan/inf, {consensus}, torch backend")


@pytest.mark.parametrize("method", [("magnitude", "sign", False), ("dare", "none", False), ("none", "none", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_counts_per_input(method, dtype, device):
    """The merge counts NaN / Inf per expert and in the base, in the same pass; both backends, exactly."""
    sparsifier, consensus, linear = method
    n, n_exp = 3000, 3
    gen = torch.Generator().manual_seed(zlib.crc32(repr((method, dtype)).encode()))
    base, experts = make_inputs(n, n_exp, dtype, 17, device)
    expect = [0] * (n_exp + 1)
    for slot, count in ((0, 5), (2, 1), (n_exp, 3)):  # expert 1 stays clean
        target = base if slot == n_exp else experts[slot]
        where = torch.randperm(n, generator=gen)[:count]
        for k, idx in enumerate(where.tolist()):
            target[idx] = (float("nan"), float("inf"), float("-inf"))[k % 3]
        expect[slot] = count
    if linear:
        expect[n_exp] = 0  # linear reads no base
    p = ChunkParams(sparsifier, consensus, linear, (1.0, 0.5, 0.25), t_keep=(2**31 - 1,) * n_exp,
                    c_keep=(n // 2,) * n_exp, keys=(1, 2, 3), density=(0.5,) * n_exp)
    got = torch.zeros(n_exp + 1, dtype=torch.int64, device=device)
    tm.merge_chunk(base, experts, 0, p, torch.bfloat16, nonfinite=got)
    tm.merge_chunk(base, experts, 0, p, torch.bfloat16, nonfinite=got)  # counters accumulate
    ref = torch.zeros(n_exp + 1, dtype=torch.int64)
    with np.errstate(invalid="ignore"):
        reference.merge_chunk(base.cpu(), [e.cpu() for e in experts], 0, p, torch.bfloat16, nonfinite=ref)
    assert got.cpu().tolist() == [2 * c for c in expect]
    assert ref.tolist() == expect


def test_nonfinite_counter_is_checked(device):
    base, experts = make_inputs(10, 2, torch.bfloat16, 1, device)
    p = ChunkParams("none", "none", False, (0.5, 0.5))
    with pytest.raises(ValueError, match="int64 tensor of 3 counters"):
        tm.merge_chunk(base, experts, 0, p, torch.float32, nonfinite=torch.zeros(2, dtype=torch.int64, device=device))


def test_out_argument_and_empty_chunk(device):
    base, experts = make_inputs(100, 2, torch.bfloat16, 1, device)
    p = ChunkParams("none", "none", False, (0.5, 0.5))
    out = torch.empty(100, dtype=torch.float32, device=device)
    got = tm.merge_chunk(base, experts, 0, p, torch.float32, out=out)
    assert got is out
    assert_same_bits(out, oracle_merge(base, experts, 0, p, torch.float32), "out=")
    empty = torch.empty(0, dtype=torch.bfloat16, device=device)
    assert tm.merge_chunk(empty, [empty, empty], 0, p, torch.bfloat16).numel() == 0


def test_experts_of_different_dtypes_merge_as_float32_copies(device):
    base, experts = make_inputs(300, 3, torch.bfloat16, 4, device)
    mixed = [experts[0], experts[1].float(), experts[2].half()]
    p = ChunkParams("magnitude", "sign", False, (1.0, 0.5, 2.0), normalize=True, t_keep=(0x3C000000,) * 3,
                    c_keep=(300,) * 3)
    got = tm.merge_chunk(base, mixed, 0, p, torch.bfloat16)
    want = reference.merge_chunk(base.cpu(), [x.float().cpu() for x in mixed], 0, p, torch.bfloat16)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


def test_rejects_bad_inputs(device):
    base, experts = make_inputs(10, 2, torch.bfloat16, 1, device)
    p = ChunkParams("none", "none", False, (1.0, 1.0))
    with pytest.raises(ValueError, match="expert chunks"):
        tm.merge_chunk(base, experts[:1], 0, p, torch.bfloat16)
    with pytest.raises(ValueError, match="shape"):
        tm.merge_chunk(base[:5], experts, 0, p, torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        tm.merge_chunk(base.to(torch.float64), experts, 0, p, torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):  # a float64 expert is refused even beside others
        tm.merge_chunk(base, [experts[0], experts[1].double()], 0, p, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        tm.merge_chunk(base, [experts[0], torch.stack([experts[1], experts[1]], 1).view(-1)[::2]], 0, p,
                       torch.bfloat16)
    with pytest.raises(ValueError, match="base"):
        tm.merge_chunk(None, experts, 0, p, torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        tm.merge_chunk(base, experts, 0, p, torch.int8)
    with pytest.raises(ValueError, match="t_keep"):
        tm.merge_chunk(base, experts, 0, ChunkParams("magnitude", "sign", False, (1.0, 1.0)), torch.bfloat16)
    too_many = ChunkParams("none", "none", False, (1.0,) * (tm.MAX_EXPERTS + 1))
    with pytest.raises(ValueError, match="experts"):
        tm.merge_chunk(base, [experts[0]] * (tm.MAX_EXPERTS + 1), 0, too_many, torch.bfloat16)


def test_concurrent_launches_from_threads(device):
    """The executor merges tensors on worker threads; launches from several threads give the same bits
    (under the interpreter they are serialized: it is not thread-safe)."""
    from concurrent.futures import ThreadPoolExecutor

    from fusemerge.kernels import triton_select as ts

    base, experts = make_inputs(2100, 3, torch.bfloat16, 12, device)
    params = [make_params(s, "sign", False, base, experts, 0, 12) for s in ("dare", "magnitude", "breadcrumbs")]
    want = [tm.merge_chunk(base, experts, 0, p, torch.bfloat16) for p in params]
    want_hist = ts.abs_hist_hi(base, experts[0])
    with ThreadPoolExecutor(4) as pool:
        merges = [pool.submit(tm.merge_chunk, base, experts, 0, p, torch.bfloat16) for p in params * 2]
        hists = [pool.submit(ts.abs_hist_hi, base, experts[0]) for _ in range(2)]
        for k, fut in enumerate(merges):
            assert_same_bits(fut.result(), want[k % len(params)], "threaded merge")
        for fut in hists:
            assert torch.equal(fut.result(), want_hist)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.ones(4)
    with pytest.raises(ValueError, match="CUDA"):
        tm.merge_chunk(x, [x], 0, ChunkParams("none", "none", False, (1.0,)), torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_merge_tensors_on_a_second_gpu(method):
    """Triton launches on the current device: tensors on cuda:1 are merged with cuda:1 made current
    (kernels.on_device), to the bits the CPU backend gives."""
    from fusemerge import merge_tensors

    g = torch.Generator().manual_seed(4)
    base = (torch.randn(5000, generator=g) * 0.02).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(5000, generator=g) * 0.003).to(torch.bfloat16) for _ in range(3)]
    want = merge_tensors(base, experts, method, density=0.3, seed=1)
    got = merge_tensors(base.to("cuda:1"), [x.to("cuda:1") for x in experts], method, density=0.3, seed=1)
    assert torch.cuda.current_device() == 0
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_has_no_fma_and_precise_division():
    """enable_fp_fusion=False: no fma/mad in the PTX of the merge kernel and nearswap's; the division is div.rn
    (not div.full)."""
    base, experts = make_inputs(4096, 3, torch.bfloat16, 2, "cuda")
    p = make_params("magnitude", "sign", False, base, experts, 0, 2)
    p = ChunkParams(p.sparsifier, p.consensus, p.linear, p.weights, lam=p.lam, normalize=True,
                    t_keep=p.t_keep, c_keep=p.c_keep)
    tm.merge_chunk(base, experts, 0, p, torch.bfloat16)
    tm.merge_chunk(base, experts[:1], 0, ChunkParams("none", "none", False, (1.0,), nearswap=0.001), torch.bfloat16)
    kernels = [k for fn in (tm._merge_kernel, tn._nearswap_kernel) for cache in fn.device_caches.values()
               for k in cache[0].values()]
    assert len(kernels) >= 2
    for k in kernels:
        ptx = k.asm["ptx"]
        assert not re.search(r"\b(fma|mad)\.[a-z.]*f32", ptx), "FMA contraction in the merge kernel"
        assert "div.full.f32" not in ptx


_OFFLINE_COMPILE = textwrap.dedent("""
    import re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusemerge.kernels import triton_merge as tm, triton_nearswap as tn, triton_select as ts

    target = GPUTarget("cuda", 90, 32)
    sig = {"out_ptr": "*bf16", "base_ptr": "*bf16", "x_ptr": "*bf16", "f_ptr": "*fp32", "i_ptr": "*i64",
           "nf_ptr": "*i64", "row_stride": "i32", "n": "i32", "start": "i64"}
    names = ["N", "SPARSIFIER", "SIGN", "LINEAR", "NORMALIZE", "COUNT", "BLOCK", "UNROLL", "LATE_COUNT"]
    sig.update(dict.fromkeys(names, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    launch = [(tm.UNROLL, tm.LATE_COUNT)] * 4 + [(2, True)]  # the defaults, then bench's launch choices
    for (sp, sign, linear, norm, n), (unroll, late) in zip(
            [(0, 0, 1, 1, 3), (1, 1, 0, 1, 3), (2, 1, 0, 1, 8), (3, 1, 0, 1, 40), (1, 1, 0, 1, 8)], launch):
        const = dict(zip(names, [n, sp, bool(sign), bool(linear), bool(norm), n != 3, tm.BLOCK, unroll, late]))
        for fusion in (False, True) if sp == 1 else (False,):
            k = triton.compile(ASTSource(tm._merge_kernel, sig, const, attrs), target=target,
                               options={"num_warps": tm.NUM_WARPS, "enable_fp_fusion": fusion})
            ptx = k.asm["ptx"]
            fma = len(re.findall(r"\\b(?:fma|mad)\\.[a-z.]*f32", ptx))
            print(sp, sign, linear, norm, n, fusion, fma, "div.full.f32" in ptx, ptx.count("div.rn.f32"))
    sig = {"out_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "nf_ptr": "*i64", "t": "fp32", "n": "i32",
           "COUNT": "constexpr", "BLOCK": "constexpr"}
    ns_attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5)}  # the pointers and n
    for fusion in (False, True):  # nearswap's kernel (kernels/triton_nearswap.py), as a variant named "ns"
        k = triton.compile(ASTSource(tn._nearswap_kernel, sig, {"COUNT": True, "BLOCK": tm.BLOCK}, ns_attrs),
                           target=target, options={"num_warps": tm.NUM_WARPS, "enable_fp_fusion": fusion})
        ptx = k.asm["ptx"]
        fma = len(re.findall(r"\\b(?:fma|mad)\\.[a-z.]*f32", ptx))
        print("ns - - - -", fusion, fma, "div.full.f32" in ptx, ptx.count("div.rn.f32"))
""")


def test_kernels_compile_for_sm90_without_fma(tmp_path):
    """Offline (no GPU needed): the merge kernel and nearswap's compile to PTX for sm_90 with no fma/mad.f32
    and div.rn.

    The same variants compiled with enable_fp_fusion=True do contain FMAs, so the check has teeth.
    """
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tm.__file__).parents[2]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _OFFLINE_COMPILE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.strip().splitlines()]
    assert len(lines) == 9 and [line[0] for line in lines[-2:]] == ["ns", "ns"]
    for sp, sign, linear, norm, n, fusion, fma, div_full, div_rn in lines:
        if fusion == "False":
            assert fma == "0", f"FMA in variant {(sp, sign, linear, norm, n)}"
        else:
            assert int(fma) > 0  # the flag is what keeps them out
        assert div_full == "False" and int(div_rn) > 0
