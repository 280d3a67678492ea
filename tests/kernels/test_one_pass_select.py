"""The one-pass radix select (select._collecting_histograms, the CPU path's): its first pass also collects the
entries of the high bins near each rank's place, estimated from the chunks before, so the second pass reads only
the chunks the estimate missed. The estimate decides the speed, never the cuts: these must equal the two-pass
select's bit for bit (and the sort's), whatever the layout of the data, the room, the ranks and the chunking."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from fusemerge.kernels import cpu_fused, reference, select
from fusemerge.kernels.select import Segment, top_cuts, trim_counts
from tests import oracle


class TwoPass:
    """The torch backend without abs_hist_collect: top_cuts then runs both radix passes over every chunk."""

    def __getattr__(self, name: str):
        if name == "abs_hist_collect":
            raise AttributeError(name)
        return getattr(reference, name)


class Loads:
    """A segment over (base, experts) that counts how often each chunk is read."""

    def __init__(self, base: torch.Tensor, experts: list[torch.Tensor]):
        self.base, self.experts, self.reads = base, experts, []

    def load(self, start: int, count: int):
        self.reads.append(start)
        return self.base[start:start + count], [x[start:start + count] for x in self.experts]

    def segment(self) -> Segment:
        return Segment(self.base.numel(), self.load)


def scale(layout: str, n: int, g: torch.Generator) -> torch.Tensor:
    """How the deltas' size varies with the index: what the estimate from the chunks before has to survive."""
    i = torch.arange(n, dtype=torch.float32)
    return {
        "even": torch.ones(n),
        "rising": torch.linspace(0.1, 3.0, n),
        "falling": torch.linspace(3.0, 0.1, n),
        "blocks": (i // 3000 % 3 + 1),
        "sparse": (torch.rand(n, generator=g) < 0.1).float(),  # 90% of the deltas exactly 0
        "spike": torch.where(i > n - 50, 1e4, 1.0),  # the largest all at the end
    }[layout]


def family(n: int, n_exp: int, layout: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    s = scale("even" if layout == "nonfinite" else layout, n, g)
    experts = [(base.float() + torch.randn(n, generator=g) * 0.002 * (i + 1) * s).to(dtype) for i in range(n_exp)]
    if layout == "nonfinite":  # --allow-nonfinite: NaN and infinite deltas rank above every finite one
        for i, x in enumerate(experts):
            at = torch.randint(0, n, (max(1, n // 50),), generator=g)
            x[at[::2]] = float("nan")
            x[at[1::2]] = float("inf") if i % 2 else float("-inf")
    return base, experts


LAYOUTS = ["even", "rising", "falling", "blocks", "sparse", "spike", "nonfinite"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [512, 1000, 4096])
def test_the_same_cuts_as_the_two_pass_select(layout: str, dtype: torch.dtype, chunk: int) -> None:
    base, experts = family(20_011, 3, layout, dtype, seed=len(layout) + chunk)
    seg = [Segment(base.numel(), lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]))]
    n = base.numel()
    for ranks in ([[1], [n], [n // 2]],  # one rank: the largest, all, half
                  [list(trim_counts("magnitude", n, d)) for d in (0.1, 0.2, 0.5)],
                  [list(trim_counts("breadcrumbs", n, d, 0.01)) for d in (0.1, 0.2, 0.5)],  # two ranks
                  [[0], [7, 3], [n - 1, 1]]):
        for keep_bytes in (None, 256):  # room for the collection, and for almost nothing
            got = top_cuts(reference, seg, chunk, ranks, keep_bytes=keep_bytes)
            assert got == top_cuts(TwoPass(), seg, chunk, ranks, keep_bytes=keep_bytes), (ranks, keep_bytes)


def test_random_cases_against_the_sort() -> None:
    """The cuts give exactly the r largest |d|, ties by lowest index (the sort's order), for random shapes. Sorted
    as float32 bit patterns, the order METHODS.md gives: a NaN's above infinity's (numpy's sort puts NaN last)."""
    rng = random.Random(20261201)
    for case in range(40):
        n = rng.choice([1, 2, 63, 64, 65, 511, 3000, 9000])
        layout = rng.choice(LAYOUTS)
        base, (x,) = family(n, 1, layout, rng.choice([torch.bfloat16, torch.float32]), seed=case)
        chunk = rng.choice([1, 7, 64, 1000, 1 << 14])
        r = rng.randint(1, n)
        seg = Segment(n, lambda s, c, base=base, x=x: (base[s:s + c], [x[s:s + c]]))
        [[(t, c)]] = top_cuts(reference, [seg], chunk, [[r]])
        d = x.float() - base.float()
        bits = reference.abs_bits(d)
        kept = reference.in_top(bits, 0, t, c)
        assert np.array_equal(kept.numpy(), oracle.topk_mask(bits.numpy().astype(np.float64), r)), (case, n, chunk, r)


def test_several_segments_are_one_sequence() -> None:
    """`trim_scope: global` in one worker: the tensors of a model as one run of entries."""
    parts = [family(n, 2, layout, torch.bfloat16, seed=n) for n, layout in ((5000, "even"), (7000, "rising"),
                                                                             (3, "even"), (9000, "sparse"))]
    segs = [Segment(b.numel(), lambda s, c, b=b, xs=xs: (b[s:s + c], [x[s:s + c] for x in xs])) for b, xs in parts]
    total = sum(s.numel for s in segs)
    ranks = [list(trim_counts("breadcrumbs", total, 0.3, 0.02)), list(trim_counts("magnitude", total, 0.1))]
    for chunk in (500, 4096):
        assert top_cuts(reference, segs, chunk, ranks) == top_cuts(TwoPass(), segs, chunk, ranks)


@pytest.mark.skipif(not cpu_fused.available(), reason="the compiled CPU loops are not available")
def test_a_chunk_is_read_again_only_where_the_estimate_missed() -> None:
    """Deltas alike along the tensor: the second pass reads the first chunk (which had no estimate) only, then
    each expert's tie cut its chunk; the two-pass select reads every chunk twice."""
    base, experts = family(64 * 1024, 4, "even", torch.bfloat16, seed=3)
    chunk = 4096
    ranks = [list(trim_counts("magnitude", base.numel(), 0.2)) for _ in experts]
    one, two = Loads(base, experts), Loads(base, experts)
    assert top_cuts(reference, [one.segment()], chunk, ranks) == top_cuts(TwoPass(), [two.segment()], chunk, ranks)
    chunks = base.numel() // chunk
    assert len(two.reads) >= 2 * chunks
    assert one.reads[:chunks + 1] == [*range(0, base.numel(), chunk), 0]
    assert len(one.reads) <= chunks + 1 + len(experts)  # then one chunk per tie cut


def test_collecting_stops_where_the_estimate_moves(monkeypatch) -> None:
    """Deltas growing along the tensor: the window estimated from the first chunks moves at each renewal, so the
    collecting stops (its cost would be wasted: the second pass reads those chunks anyway)."""
    base, experts = family(64 * 1024, 2, "rising", torch.bfloat16, seed=4)
    seen = []
    real = select._collecting_histograms

    def spy(*args, **kwargs):
        hist, collected = real(*args, **kwargs)
        seen.append(collected)
        return hist, collected

    monkeypatch.setattr(select, "_collecting_histograms", spy)
    seg = Segment(base.numel(), lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]))
    ranks = [list(trim_counts("magnitude", base.numel(), 0.2)) for _ in experts]
    assert top_cuts(reference, [seg], 1024, ranks) == top_cuts(TwoPass(), [seg], 1024, ranks)
    [collected] = seen
    per_expert = [sum(w[i] is not None for _, w in collected.chunks) for i in range(2)]
    assert len(collected.chunks) == 64 and max(per_expert) <= 4, per_expert


def test_windows_hold_the_estimated_ranks() -> None:
    """_windows: the bin of rank r * seen / total lies in the window, and so do the bins a margin either side."""
    g = torch.Generator().manual_seed(5)
    bits = (torch.randn(50_000, generator=g).abs() * 0.01).view(torch.int32).numpy()
    hist = np.bincount(bits >> 16, minlength=1 << 15).astype(np.int64)
    order = np.sort(bits)[::-1]
    for r, total in ((1, 100_000), (10_000, 100_000), (99_999, 100_000), (70, 70)):
        lo0, hi0, lo1, hi1 = select._windows(hist, 50_000, total, [r])
        assert (lo0, hi0) == (lo1, hi1) and lo0 <= hi0
        q = min(50_000, max(1, round(r * 50_000 / total)))
        assert lo0 <= order[q - 1] >> 16 <= hi0
        margin = math.floor(select.WINDOW_SHARE * 50_000)
        assert order[min(50_000, q + margin) - 1] >> 16 >= lo0 and order[max(1, q - margin) - 1] >> 16 <= hi0
    two = select._windows(hist, 50_000, 100_000, [30_000, 1_000])
    assert two[:2] == select._windows(hist, 50_000, 100_000, [30_000])[:2]
    assert two[2:] == select._windows(hist, 50_000, 100_000, [1_000])[:2]


@pytest.mark.skipif(not cpu_fused.available(), reason="the compiled CPU loops are not available")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 513, 5000])
def test_compiled_hist_collect_is_the_torch_one(dtype, n: int) -> None:
    base, experts = family(max(n, 1), 2, "sparse", dtype, seed=n)
    base, x = base[:n], experts[0][:n]
    nonzero = [int(b) for b in reference.hist_hi_torch(base, x).nonzero()[:, 0]] or [0]
    rng = random.Random(n)
    for _ in range(12):
        lo0, hi0 = sorted(rng.choice(nonzero + [0, 0x7FFF]) for _ in range(2))
        lo1, hi1 = sorted(rng.choice(nonzero + [0, 0x7FFF]) for _ in range(2))
        for cap in (0, 3, max(n, 1)):
            got = [np.arange(1 << 15, dtype=np.int64), np.full(cap, -7, np.int32)]
            want = [got[0].copy(), got[1].copy()]
            found = cpu_fused.hist_collect(base, x, got[0], (lo0, hi0, lo1, hi1), got[1])
            assert found == reference.hist_collect_torch(base, x, want[0], (lo0, hi0, lo1, hi1), want[1])
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.skipif(not cpu_fused.available(), reason="the compiled CPU loops are not available")
def test_hist_collect_refuses_a_wrong_histogram_or_window() -> None:
    base, (x,) = family(100, 1, "even", torch.bfloat16, seed=1)
    out = np.empty(100, np.int32)
    good = np.zeros(1 << 15, np.int64)
    for hist, windows in ((np.zeros(1 << 14, np.int64), (0, 1, 0, 1)), (np.zeros(1 << 15, np.int32), (0, 1, 0, 1)),
                          (good, (5, 1, 0, 1)), (good, (0, 1 << 15, 0, 1))):
        with pytest.raises(ValueError, match="hist_collect"):
            cpu_fused.hist_collect(base, x, hist, windows, out)


@pytest.mark.parametrize("case", ["nan minus nan", "fp16 nan"])
@pytest.mark.parametrize("keep_bytes", [None, 4])
def test_a_tie_cut_among_nan_deltas_keeps_exactly_r(case: str, keep_bytes) -> None:
    """Found by a fuzzer: the tie cut's search read torch's bits of a NaN delta, the histograms the compiled
    loop's, which differ (NaN - NaN keeps the base's payload in torch, the expert's there; torch turns an fp16 NaN
    into 0x7FFFFFFF in its scalar path). The cut fell before every tie (nothing kept instead of 1), or, with the
    kept entries over their room, the counting pass never found it (KeyError)."""
    if not cpu_fused.available():
        pytest.skip("the compiled CPU loops are not available")
    if case == "nan minus nan":
        nb = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
        nx = torch.tensor([0x7FE00001], dtype=torch.int32).view(torch.float32)
        base, x = torch.cat([nb, nb, torch.zeros(2)]), torch.cat([nx, nx, torch.ones(2)])
    else:
        base = torch.zeros(4, dtype=torch.float16)
        x = torch.tensor([float("nan"), float("nan"), 1.0, 1.0], dtype=torch.float16)
    seg = [Segment(4, lambda s, c: (base[s:s + c], [x[s:s + c]]))]
    for backend in (reference, TwoPass()):
        [[(t, c)]] = top_cuts(backend, seg, 4, [[1]], keep_bytes=keep_bytes)
        assert t >= 0x7F800001 and c == 1, (backend, t, c)  # a NaN's bits, and the first of the two NaN ties
