"""The radix select split among workers (select.top_cuts(workers=k), as `trim_scope: global` runs it on CPU): the
same cuts, bit for bit, as one worker, for threads and forked processes, several segments, bf16 ties, the kept
selections overflowing their room (the counting pass then finds the tie cut), and a failing worker."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

from fusemerge.errors import FusemergeError, InputError
from fusemerge.kernels import reference, select
from fusemerge.streaming.processes import fork_map

needs_fork = pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(os, "fork")), reason="Linux fork")


def segments(sizes: list[int], n_exp: int, seed: int, dtype=torch.bfloat16) -> list[select.Segment]:
    """One segment per size (tensors of a model), experts = base + small deltas (bf16: many ties)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        base = (torch.randn(size, generator=g) * 0.02).to(dtype)
        experts = [(base.float() + torch.randn(size, generator=g) * 0.003 * (i + 1)).to(dtype) for i in range(n_exp)]
        out.append(select.Segment(size, lambda s, c, b=base, e=experts: (b[s:s + c].float(),
                                                                          [x[s:s + c].float() for x in e])))
    return out


def ranks_for(total: int, n_exp: int, sparsifier: str = "breadcrumbs") -> list[list[int]]:
    return [list(select.trim_counts(sparsifier, total, 0.2 + 0.1 * i, 0.01)) for i in range(n_exp)]


def sequential(k, body, stop):
    """A runner that runs the k shares one after another: what matters is the split, not the concurrency."""
    return [body(w) for w in range(k)]


def fork_runner(k, body, stop):
    return fork_map(k, body)


RUNNERS = {"threads": select.run_threads, "sequential": sequential,
           "processes": pytest.param(fork_runner, marks=needs_fork)}


@pytest.mark.parametrize("runner", list(RUNNERS.values()), ids=list(RUNNERS))
@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("keep_bytes", [None, 4000, 0])
def test_split_passes_give_the_same_cuts(runner, k: int, keep_bytes: int | None) -> None:
    segs = segments([1000, 37, 4099, 1], n_exp=3, seed=k)
    total = sum(s.numel for s in segs)
    ranks = ranks_for(total, 3)
    want = select.top_cuts(reference, segs, 128, ranks)
    got = select.top_cuts(reference, segs, 128, ranks, workers=k, run_workers=runner, keep_bytes=keep_bytes)
    assert got == want
    # and the cuts keep exactly r entries, lowest index first among ties (the definition)
    a = np.concatenate([np.stack([np.abs((x - b).numpy()).view(np.int32).astype(np.int64) for x in xs])
                        for b, xs in (seg.load(0, seg.numel) for seg in segs)], axis=1)
    j = np.arange(total)
    for i in range(3):
        for r, (t, c) in zip(ranks[i], got[i], strict=True):
            kept = (a[i] > t) | ((a[i] == t) & (j < c))
            assert kept.sum() == r and (a[i][~kept] <= t).all()


def test_more_workers_than_chunks_and_a_bin_no_worker_keeps() -> None:
    segs = segments([300], n_exp=2, seed=1)
    ranks = ranks_for(300, 2, "magnitude")
    want = select.top_cuts(reference, segs, 128, ranks)
    assert select.top_cuts(reference, segs, 128, ranks, workers=16) == want  # 3 chunks: 3 workers


@pytest.mark.parametrize("runner", list(RUNNERS.values()), ids=list(RUNNERS))
def test_a_failing_worker_raises_its_error_and_no_second_pass_starts(runner) -> None:
    segs = segments([4096], n_exp=2, seed=2)
    loads: list[int] = []
    lock = threading.Lock()

    def load(s, c):
        with lock:
            loads.append(s)
        if s == 512:
            raise InputError("chunk 512 unreadable")
        return segs[0].load(s, c)

    bad = [select.Segment(4096, load)]
    with pytest.raises(InputError, match="chunk 512 unreadable"):
        select.top_cuts(reference, bad, 64, ranks_for(4096, 2), workers=2, run_workers=runner)
    # pass 1 visits each chunk once (in this process for threads and the sequential runner): none twice
    assert len(loads) == len(set(loads))


@needs_fork
def test_fork_map_returns_in_order_and_raises_the_childs_error_kind() -> None:
    out = fork_map(3, lambda w: (w, os.getpid(), np.arange(w)))
    assert [w for w, _, _ in out] == [0, 1, 2] and all(pid != os.getpid() for _, pid, _ in out)
    assert out[2][2].tolist() == [0, 1]  # values are pickled back, numpy arrays included

    def fails(w):
        if w == 1:
            raise OSError(28, "No space left on device", "/x")
        return w

    with pytest.raises(OSError) as e:
        fork_map(2, fails)
    assert e.value.errno == 28 and e.value.filename == "/x"

    def dies(w):
        os._exit(3)

    with pytest.raises(FusemergeError, match="exited with status 3 before it finished its share"):
        fork_map(2, dies)



class Counting:
    """The torch backend, counting the counting pass's calls (made only when the kept selections did not fit)."""

    def __init__(self) -> None:
        self.count_equal_calls = 0

    def __getattr__(self, name: str):
        return getattr(reference, name)

    def count_equal(self, *args):
        self.count_equal_calls += 1
        return reference.count_equal(*args)


@pytest.mark.parametrize("k", [1, 3])
def test_keep_bytes_bounds_the_kept_selections(k: int) -> None:
    segs = segments([5000, 3000], n_exp=2, seed=9)
    ranks = ranks_for(8000, 2)
    want = select.top_cuts(reference, segs, 256, ranks)
    roomy, tight = Counting(), Counting()
    assert select.top_cuts(roomy, segs, 256, ranks, workers=k, keep_bytes=1 << 20) == want
    assert select.top_cuts(tight, segs, 256, ranks, workers=k, keep_bytes=64) == want
    assert roomy.count_equal_calls == 0 < tight.count_equal_calls  # bf16 ties: some cut needs the tie count
