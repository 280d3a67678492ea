"""Where the trim threshold comes from: exact top-k by radix select, and DARE's L1 rescale factor.

Backend-independent drivers. They stream over chunks of one expert's delta (a tensor, or for
`trim_scope: global` every merged tensor of the model in order) and call a backend's statistics
functions (`fusemerge.kernels.reference` on CPU, `fusemerge.kernels.triton_select` on CUDA). Every
quantity is an integer count or an integer sum, so the result does not depend on chunk size,
backend or device.

Top-k of |d| without sorting the tensor (METHODS.md, "Trim"), two ways with the same exact result:

Bracket select (`bracket_cuts`, one pass; a tensor held whole in memory, as the GPU pipeline holds it):
  1. a sample of |d| at s spread-out positions brackets the k-th largest: lo <= t <= hi with high probability
  2. one pass over the base and all N experts counts, per block, a > hi, a == hi and a == lo, and compacts
     the few entries lo < a < hi with their indices
  3. the rank k falls in one of those classes: t and the index cut c follow from the compacted entries or
     from the per-block counts (one block rescanned). If the sample misled (k outside the bracket), the
     radix select below runs instead; the sample only decides the speed, never the result.

Radix select (any chunking, `trim_scope: global`):
  1. histogram of bits(|d|) >> 16 (32768 bins)  -> the bin holding the k-th largest
  2. histogram of the low 16 bits inside that bin -> the exact bit pattern t of the k-th largest
  3. if only some of the entries equal to t fit in k: an in-order count finds the index cut c
     so that exactly k entries satisfy (|d| > t) | (|d| == t & j < c).
  Passes 1 and 2 may be split by chunk among workers (`top_cuts(workers=k)`: threads, or the executor's forked
  processes): histograms are sums and the entries kept in pass 2 are merged back in index order, so the cuts
  do not depend on k.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

from fusemerge.kernels.dare_masks import KeepMasks
from fusemerge.kernels.params import EMPTY_C, EMPTY_T

Loader = Callable[[int, int], tuple[torch.Tensor, list[torch.Tensor]]]
T = TypeVar("T")


@dataclass(frozen=True)
class Segment:
    """A run of elements: `load(start, count)` gives (base chunk, [chunk of each expert]).

    `cache`, when the loader keeps chunks between passes, is where it keeps them (its owner frees it).
    `whole`: the data is in memory, so `load(0, numel)` gives all of it as views (no copy, no read).
    `scratch`: bytes the statistics may allocate beside the data on its device (None: no bound).
    """

    numel: int
    load: Loader
    cache: dict | None = None
    whole: bool = False
    scratch: int | None = None


def _chunks(segments: list[Segment], chunk: int) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """(global start, base chunk, expert chunks) over every segment in order; each chunk is read once."""
    offset = 0
    for seg in segments:
        for local in range(0, seg.numel, chunk):
            base, experts = seg.load(local, min(chunk, seg.numel - local))
            yield offset + local, base, experts
        offset += seg.numel


def _stride(segments: list[Segment], chunk: int, w: int, k: int, stop: threading.Event
            ) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """The chunks of `_chunks` whose position p (in order, from 0) has p % k == w, read as they are reached: worker
    w's share of a pass split among k workers, in increasing order. Ends early once `stop` is set."""
    for start, load in _stride_lazy(segments, chunk, w, k, stop):
        yield start, *load()


def _stride_lazy(segments: list[Segment], chunk: int, w: int, k: int, stop: threading.Event
                 ) -> Iterator[tuple[int, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]]]:
    """`_stride`'s chunks as (global start, a function that reads the chunk): read only where called."""
    p = 0
    offset = 0
    for seg in segments:
        for local in range(0, seg.numel, chunk):
            if p % k == w:
                if stop.is_set():
                    return
                yield offset + local, (lambda seg=seg, local=local: seg.load(local, min(chunk, seg.numel - local)))
            p += 1
        offset += seg.numel


# run_workers(k, body, stop) -> [body(0), ..., body(k - 1)], run side by side; top_cuts sets `stop` when one fails.
RunWorkers = Callable[[int, Callable[[int], T], threading.Event], list[T]]


def run_threads(k: int, body: Callable[[int], T], stop: threading.Event) -> list[T]:
    """body(w) for w < k, from k threads (this one alone when k == 1); the first failure sets `stop`, so the
    others end at their next chunk, and is raised."""
    if k == 1:
        return [body(0)]
    with ThreadPoolExecutor(k, thread_name_prefix="fusemerge-select") as pool:
        futures = [pool.submit(body, w) for w in range(k)]
        try:
            return [fut.result() for fut in futures]
        except BaseException:
            stop.set()  # before the pool's exit waits for the other threads
            raise


class _KeptByChunk:
    """kept[i, b]: the entries the workers kept for expert i and high bin b, as (chunk start, low bits) in index
    order (each worker's own are in order; this merges them)."""

    def __init__(self, spools: list[dict[tuple[int, int], _Spool]]):
        self.spools = spools

    def __getitem__(self, key: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
        return heapq.merge(*(s[key] for s in self.spools if key in s), key=lambda item: item[0])


class _Spool:
    """Small int32 arrays appended in order, stored in a few large blocks.

    Thousands of small long-lived arrays interleaved with the chunk-sized buffers of the merge fragment
    glibc's heap: keeping a few MB of selections this way made a 0.18 GB merge peak at 0.68 GB.
    """

    BLOCK = 1 << 20
    FIRST = 1 << 15  # the first block's entries; each next one twice the last, up to BLOCK (a spool of a few
    # entries per expert took 4 MiB each: bench/memory.py's 64 MiB TIES merge peaked 0.3x the budget higher)

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.used = self.BLOCK
        self.filled: list[int] = []  # entries used in each block
        self.items: list[tuple[int, int, int, int]] = []  # (chunk start, block, offset, length)

    def append(self, start: int, values: np.ndarray) -> None:
        if not self.blocks or self.used + values.size > len(self.blocks[-1]):
            size = min(self.BLOCK, 2 * len(self.blocks[-1])) if self.blocks else self.FIRST
            self.blocks.append(np.empty(max(size, values.size), dtype=np.int32))
            self.filled.append(0)
            self.used = 0
        self.blocks[-1][self.used:self.used + values.size] = values
        self.items.append((start, len(self.blocks) - 1, self.used, values.size))
        self.used += values.size
        self.filled[-1] = self.used

    def bincount(self, bins: int) -> np.ndarray:
        """int64[bins]: how often each value in [0, bins) occurs among everything appended."""
        counts = np.zeros(bins, dtype=np.int64)
        for block, filled in zip(self.blocks, self.filled, strict=True):
            counts += np.bincount(block[:filled], minlength=bins)
        return counts

    def trim(self) -> None:
        """View the last block up to its end, so that pickling it (to send it to the parent process) sends only
        what is filled; no copy."""
        if self.blocks:
            self.blocks[-1] = self.blocks[-1][:self.filled[-1]]
            self.used = self.BLOCK  # a later append starts a new block

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for start, block, offset, length in self.items:
            yield start, self.blocks[block][offset:offset + length]


def _load_at(segments: list[Segment], chunk: int, start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The chunk `_chunks` yields at global index `start`."""
    offset = 0
    for seg in segments:
        if start < offset + seg.numel:
            local = start - offset
            return seg.load(local, min(chunk, seg.numel - local))
        offset += seg.numel
    raise IndexError(start)


def _locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the `rank`-th largest entry (1-based) and how many entries lie in higher bins."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # entries in bins strictly above each bin
    b = int(np.nonzero((above < rank) & (above + hist >= rank))[0][0])
    return b, int(above[b])


def top_cuts(
    backend: ModuleType, segments: list[Segment], chunk: int, ranks: list[list[int]], *, workers: int = 1,
    run_workers: RunWorkers = run_threads, keep_bytes: int | None = None,
) -> list[list[tuple[int, int]]]:
    """For expert i and each rank r in ranks[i], the (t, c) whose set in_top(t, c) holds exactly the r largest |d|.

    Ties at the threshold are kept lowest global index first; r = 0 gives the empty set. Every pass reads
    each chunk once for all experts. `workers` > 1 splits the two histogram passes by chunk among that many
    workers, run by `run_workers` (threads; the executor's forked processes on CPU, which share no interpreter
    lock): each keeps its own histograms and selections, and the sums, so the result, do not change. For the
    CPU path's `trim_scope: global`, which reads the whole model before any tensor is merged. `keep_bytes`
    bounds the selected entries kept in memory for the tie cut (beyond it, one more counting pass finds it).
    """
    total = sum(s.numel for s in segments)
    n = len(ranks)
    if any(r < 0 or r > total for rs in ranks for r in rs):
        raise ValueError(f"ranks {ranks} outside [0, {total}]")
    if len(segments) == 1 and segments[0].whole and getattr(backend, "ONE_PASS_SELECT", False) and total < 2**32:
        fast = bracket_cuts(backend, *segments[0].load(0, total), ranks, scratch=segments[0].scratch)
        if fast is not None:
            return fast
    live = [sorted({r for r in rs if r > 0}) for rs in ranks]
    found: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(n)]  # rank -> (t, ties kept, ties)
    kept: _KeptByChunk | None = None
    if any(live):
        k = max(1, min(workers, -(-total // chunk)))
        stop = threading.Event()
        room = max(chunk, total // 8) * n  # selected entries all workers together may keep
        if keep_bytes is not None:
            room = min(room, keep_bytes // 4)
        collected: _Collected | None = None
        left = room // k  # each worker's share of the room for the entries the second pass keeps
        if k == 1 and hasattr(backend, "abs_hist_collect") and all(len(rs) <= 2 for rs in live):
            # the collected entries and those the second pass keeps share the room (the collected are freed
            # as the second pass takes them)
            hi, collected = _collecting_histograms(backend, segments, chunk, live, total, room, stop)
        else:
            hi = sum(run_workers(k, lambda w: _high_histograms(backend, segments, chunk, live, w, k, stop), stop))
        located = [{r: _locate(hi[i], r) for r in live[i]} for i in range(n)]
        bins = [sorted({b for b, _ in located[i].values()}) for i in range(n)]
        done = run_workers(k, lambda w: _low_histograms(backend, segments, chunk, bins, left, w, k, stop,
                                                        collected), stop)
        lo = [{b: sum(los[i][b] for los, _ in done) for b in bins[i]} for i in range(n)]
        if all(spools is not None for _, spools in done):
            kept = _KeptByChunk([spools for _, spools in done])
        for i in range(n):
            for r in live[i]:
                b, above = located[i][r]
                low, above_lo = _locate(lo[i][b], r - above)
                found[i][r] = ((b << 16) | low, r - above - above_lo, int(lo[i][b][low]))
    cuts = _index_cuts(backend, segments, chunk, found, kept, total)
    return [[(found[i][r][0], cuts[i][r]) if r > 0 else (EMPTY_T, EMPTY_C) for r in ranks[i]] for i in range(n)]


def _high_histograms(backend: ModuleType, segments: list[Segment], chunk: int, live: list[list[int]], w: int,
                     k: int, stop: threading.Event) -> np.ndarray:
    """The radix select's first pass, worker w of k: per expert with ranks to find, the histogram of
    bits(|d|) >> 16 over its share of the chunks."""
    hi = np.zeros((len(live), 1 << 15), dtype=np.int64)
    for _, base, experts in _stride(segments, chunk, w, k, stop):
        for i in range(len(live)):
            if live[i]:
                hi[i] += backend.abs_hist_hi(base, experts[i]).cpu().numpy()
    return hi


# The one-pass radix select (a single worker, on backends with abs_hist_collect): the first pass also collects
# the entries of the high bins near each rank's place, estimated from the histogram of the chunks before. A
# chunk whose collected bins hold its rank's bin needs no second read; one whose estimate missed it (the first
# chunk, which has none; a tensor whose chunks differ) is read again by the second pass. Either way the bins and
# the cuts come from exact counts: the estimate decides how fast, never what.
WINDOW_SHARE = 0.005  # ranks collected either side of the estimate, as a share of the entries seen so far


def _windows(hist: np.ndarray, seen: int, total: int, ranks: list[int]) -> tuple[int, int, int, int]:
    """The high bins to collect for `ranks` (at most 2) of `total` entries, from the histogram of the `seen` so
    far: those holding ranks r * seen / total -/+ a margin, as (lo, hi) bin ranges, the only one repeated."""
    top = np.cumsum(hist[::-1])  # top[j]: the entries in the j + 1 highest bins
    found = []
    for r in ranks:
        f = r / total
        margin = (WINDOW_SHARE + 3 * math.sqrt(f * (1 - f) / seen)) * seen
        high, low = (min(seen, max(1, round(f * seen + d * margin))) for d in (-1, 1))  # 1-based ranks
        found += [(1 << 15) - 1 - int(np.searchsorted(top, low)), (1 << 15) - 1 - int(np.searchsorted(top, high))]
    return tuple(found * 2)[:4] if len(found) == 2 else tuple(found)


_FREED = np.empty(0, dtype=np.int32)


class _Collected:
    """The entries `_collecting_histograms` kept: per expert, a spool of the bits of the entries in each chunk's
    collected bins, and per chunk, in order, the bin ranges collected per expert (None: not collected)."""

    def __init__(self, n: int):
        self.spools = [_Spool() for _ in range(n)]
        self.chunks: list[tuple[int, list[tuple[int, int, int, int] | None]]] = []
        self._at = 0
        self._item = [0] * n  # per expert: its next item in the spool

    def take(self, start: int, bins: list[list[int]]) -> dict[tuple[int, int], np.ndarray]:
        """The low 16 bits of chunk `start`'s entries, in index order, per (expert, bin in bins[expert]) that the
        collection covered; the chunks are taken in their order, each once. The spools' blocks are freed as they
        are passed, so the second pass's kept entries take their place."""
        at, windows = self.chunks[self._at]
        if at != start:
            raise AssertionError(f"collected chunk {at} taken as {start}")
        self._at += 1
        out = {}
        for i, win in enumerate(windows):
            if win is None:
                continue
            spool = self.spools[i]
            _, block, offset, length = spool.items[self._item[i]]
            self._item[i] += 1
            for passed in range(block):  # before this one: every item in them was taken
                spool.blocks[passed] = _FREED
            bits = spool.blocks[block][offset:offset + length]
            for b in bins[i]:
                if win[0] <= b <= win[1] or win[2] <= b <= win[3]:
                    sel = np.compress((bits >> 16) == b, bits)
                    sel &= 0xFFFF
                    out[i, b] = sel
        return out


def _collecting_histograms(backend: ModuleType, segments: list[Segment], chunk: int, live: list[list[int]],
                           total: int, room: int, stop: threading.Event) -> tuple[np.ndarray, _Collected]:
    """`_high_histograms` of one worker that also collects (module note above), at most `room` entries in all;
    the estimate is renewed after 1, 2, 4, 8, ... chunks, and an expert's collecting stops where it moved."""
    n = len(live)
    hi = np.zeros((n, 1 << 15), dtype=np.int64)
    out = np.empty(min(chunk, total), dtype=np.int32)
    collected = _Collected(n)
    windows: list[tuple[int, int, int, int] | None] = [None] * n
    drifted = [False] * n
    seen = chunks = 0
    for start, base, experts in _stride(segments, chunk, 0, 1, stop):
        used: list[tuple[int, int, int, int] | None] = [None] * n
        for i in range(n):
            if not live[i]:
                continue
            found = None
            if windows[i] is not None and room > 0:
                found = backend.abs_hist_collect(base, experts[i], hi[i], windows[i], out)
            if found is None:
                hi[i] += backend.abs_hist_hi(base, experts[i]).cpu().numpy()
            elif found <= min(room, out.size):
                collected.spools[i].append(start, out[:found])
                used[i] = windows[i]
                room -= found
            else:
                room = 0  # no more room: the second pass reads the chunks left
        collected.chunks.append((start, used))
        seen += experts[0].numel()
        chunks += 1
        if chunks & (chunks - 1) == 0 and seen < total:
            for i in range(n):
                if live[i] and not drifted[i]:
                    new = _windows(hi[i], seen, total, live[i])
                    # a window that moved off its last place: the chunks differ, and the estimate would miss
                    # the rest as well; they are left to the second pass, without collecting's cost
                    drifted[i] = windows[i] is not None and not _overlap(windows[i], new)
                    windows[i] = None if drifted[i] else new
    return hi, collected


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether each bin range of `a` overlaps its counterpart in `b`."""
    return a[0] <= b[1] and b[0] <= a[1] and a[2] <= b[3] and b[2] <= a[3]


def _low_histograms(backend: ModuleType, segments: list[Segment], chunk: int, bins: list[list[int]], left: int,
                    w: int, k: int, stop: threading.Event, collected: _Collected | None = None,
                    ) -> tuple[list[dict[int, np.ndarray]], dict[tuple[int, int], _Spool] | None]:
    """The radix select's second pass, worker w of k: per expert and high bin found by the first, the histogram
    of the low 16 bits of the entries in that bin. Where the backend hands over the selected entries
    themselves (abs_select_lo), they are kept per chunk, in index order, while this worker's share `left` of
    the room lasts: the tie cut then needs no further pass over the data (None once they no longer fit).
    `collected`: the entries the first pass collected (`_collecting_histograms`); a chunk is read again only
    for the bins they do not cover."""
    n = len(bins)
    select = getattr(backend, "abs_select_lo", None)
    lo = [{b: np.zeros(1 << 16, dtype=np.int64) for b in bins[i]} for i in range(n)]
    spools: dict[tuple[int, int], _Spool] | None = {} if select is not None else None
    for start, load in _stride_lazy(segments, chunk, w, k, stop):
        have = collected.take(start, bins) if collected is not None else {}
        data = None
        for i in range(n):
            for b in bins[i]:
                sel = have.get((i, b))
                if sel is None and data is None:
                    data = load()
                if spools is None:
                    lo[i][b] += (np.bincount(sel, minlength=1 << 16) if sel is not None
                                 else backend.abs_hist_lo(data[0], data[1][i], b).cpu().numpy())
                    continue
                if sel is None:
                    sel = select(data[0], data[1][i], b).cpu().numpy()
                left -= sel.size
                if left >= 0:  # counted from the spool at the end: one bincount, not one per chunk
                    spools.setdefault((i, b), _Spool()).append(start, sel)
                    continue
                lo[i][b] += np.bincount(sel, minlength=1 << 16)
                for (si, sb), spool in spools.items():
                    lo[si][sb] += spool.bincount(1 << 16)
                spools = None
    for (i, b), spool in (spools or {}).items():
        lo[i][b] += spool.bincount(1 << 16)
        spool.trim()
    return lo, spools


def _index_cuts(backend: ModuleType, segments: list[Segment], chunk: int,
                found: list[dict[int, tuple[int, int, int]]], kept: _KeptByChunk | None, total: int
                ) -> list[dict[int, int]]:
    """Per expert and rank, the index cut c: `total` where every entry equal to the threshold t is in, else the
    index just after the q-th such entry in index order (found from the kept selections and one read of the
    chunk that holds it, or by a counting pass where they were not kept)."""
    n = len(found)
    cuts = [{r: total for r, (_, q, ties) in found[i].items() if q == ties} for i in range(n)]
    pending = {(i, r): (t, q) for i in range(n) for r, (t, q, ties) in found[i].items() if q < ties}
    where: dict[int, list[tuple[int, int, int, int]]] = {}  # global chunk start -> [(i, r, t, q left)]
    for (i, r), (t, q) in list(pending.items()):
        if kept is None:
            continue
        for start, sel in kept[i, t >> 16]:
            here = int(np.count_nonzero(sel == (t & 0xFFFF)))
            if here >= q:
                where.setdefault(start, []).append((i, r, t, q))
                del pending[i, r]
                break
            q -= here
    for start, hits in where.items():  # one read of the chunk that holds each cut
        base, experts = _load_at(segments, chunk, start)
        for i, r, t, q in hits:
            cuts[i][r] = start + backend.nth_equal(base, experts[i], t, q) + 1
    if pending:
        seen = dict.fromkeys(pending, 0)
        for start, base, experts in _chunks(segments, chunk):
            for (i, r), (t, q) in list(pending.items()):
                here = backend.count_equal(base, experts[i], t)
                if seen[i, r] + here >= q:
                    cuts[i][r] = start + backend.nth_equal(base, experts[i], t, q - seen[i, r]) + 1
                    del pending[i, r]
                else:
                    seen[i, r] += here
            if not pending:
                break
    return cuts


# -- the bracket select -------------------------------------------------------------------------------

# Sampled positions per expert: 1 in SAMPLE_SHARE elements (a gather reads a 32-byte sector per position:
# ~6% of a bf16 tensor's bytes at 1 in 256), at most SAMPLE_MAX; all of a small tensor. The entries left
# inside the bracket grow as n / sqrt(s): at 2^20, a 2^31-element embedding leaves ~0.4% of its entries.
SAMPLE_MAX = 1 << 20
SAMPLE_SHARE = 256
SAMPLE_MIN = 1 << 12
# Bracket half-width in standard deviations of the sample's rank: the k-th largest falls outside with
# probability ~6e-5 per rank (2 P(Z > 4), normal approximation; then the radix select runs). Entries
# inside, to compact: ~2 Z sqrt(p(1-p) / s) n.
BRACKET_Z = 4.0
# Candidate room: this times the expected count, plus a little (a fuller bracket also falls back).
CAP_SLACK = 1.5
_TOP_BITS = 0x7FFFFFFF  # hi when the bracket reaches the largest |d|


def sample_size(n: int) -> int:
    """How many positions of an n-element tensor the bracket select samples."""
    return n if n <= SAMPLE_MIN else max(SAMPLE_MIN, min(SAMPLE_MAX, n // SAMPLE_SHARE))


def weyl_step(n: int) -> int:
    """The sample's stride: positions k * step mod n (a Weyl sequence), step ~ n / golden ratio and coprime with
    n, so the positions are distinct and spread over rows and columns alike (a fixed stride can hit one column)."""
    step = int(n * 0.6180339887498949) | 1
    while math.gcd(step, n) != 1:
        step += 2
    return step


def _bracket_positions(s: int, n: int, r: int) -> tuple[int, int]:
    """(hi, lo): the 1-based positions, largest first, of the sample values that bracket rank r of n (they
    may fall outside the sample: the bracket then reaches the largest or the smallest |d|)."""
    rs = r * s / n
    m = 0 if s == n else math.ceil(BRACKET_Z * math.sqrt(s * (r / n) * (1 - r / n))) + 1
    return math.floor(rs) - m, math.ceil(rs) + m


def bracket_cuts(
    backend: ModuleType, base: torch.Tensor, experts: list[torch.Tensor], ranks: list[list[int]],
    scratch: int | None = None,
) -> list[list[tuple[int, int]]] | None:
    """top_cuts for one tensor held whole in memory, in one pass over its data (see the module docstring).

    The experts must be rows of one buffer (the pipeline's resident tensor), or the kernels would stack whole
    copies of them. `scratch` bounds the bytes it allocates beside the data (the sample and its sort, block
    counts, the candidates' room; None: no bound). Returns None when the experts are not rows of one buffer,
    when the scratch would not fit, or when the sample's bracket missed a rank or overflowed: the caller then
    runs the radix select.
    """
    from fusemerge.kernels.layout import expert_rows

    n = base.numel()
    n_exp = len(experts)
    if expert_rows(experts)[0].dim() == 2:
        return None
    width = max(len(rs) for rs in ranks)
    cols = [c for c in range(width) if any(c < len(rs) and rs[c] > 0 for rs in ranks)]
    if not cols:
        return [[(EMPTY_T, EMPTY_C)] * len(rs) for rs in ranks]
    s = sample_size(n)
    wanted: list[tuple[int, int]] = []  # (expert, rank) per segment, rank 0 = a dead segment
    for i in range(n_exp):
        wanted += [(i, ranks[i][c] if c < len(ranks[i]) else 0) for c in cols]
    positions = {seg: _bracket_positions(s, n, r) for seg, (_, r) in enumerate(wanted) if r}  # (hi, lo)
    # the most candidates a bracket should hold: its width in sample positions x n / s
    room = max(math.ceil((min(lo_pos, s + 1) - max(hi_pos, 0)) * n / s) for hi_pos, lo_pos in positions.values())
    cap = min(n, math.ceil(CAP_SLACK * room) + (1024 if s < n else 0))  # a full sample brackets exactly
    blocks = -(-n // backend.BRACKET_BLOCK)
    # keys, block counts, the sample with its sorted copy and sort indices
    need_bytes = len(wanted) * (8 * cap + 12 * blocks) + 16 * n_exp * s
    if scratch is not None and need_bytes > scratch:
        return None
    sample = backend.sample_abs_bits(base, experts, 1 if s == n else weyl_step(n), s)
    sample = sample.sort(dim=1, descending=True).values
    # the sample values each bracket needs, fetched in one transfer: positions floor/ceil(r s / n) -/+ margin
    need = sorted({p for pair in positions.values() for p in pair if 1 <= p <= s})
    at = torch.tensor(need, dtype=torch.int64, device=base.device) - 1
    values = [dict(zip(need, row, strict=True)) for row in sample[:, at].tolist()] if need else [{}] * n_exp
    del sample
    lo, hi = [EMPTY_T] * len(wanted), [EMPTY_T] * len(wanted)  # a dead segment (rank 0) brackets nothing
    for seg, (hi_pos, lo_pos) in positions.items():
        at_value = values[wanted[seg][0]]  # 1-based sample position -> value; outside the sample: the extremes
        lo[seg] = at_value[lo_pos] if lo_pos <= s else 0
        hi[seg] = at_value[hi_pos] if hi_pos >= 1 else _TOP_BITS
    counts, fill, keys, block = backend.bracket_pass(base, experts, lo, hi, cap)
    totals = torch.cat([counts.sum(dim=2, dtype=torch.int64), fill.to(torch.int64).view(1, -1)]).tolist()

    found: dict[int, tuple[int, int]] = {}  # segment -> (t, c)
    tie_queries: list[tuple[int, int, int, int]] = []  # (segment, class row of counts, t, q)
    for seg, (_, r) in enumerate(wanted):
        if r == 0:
            continue
        above, at_hi, at_lo, inside = (totals[row][seg] for row in range(4))
        if inside > cap or r <= above:
            return None
        if r <= above + at_hi:
            t, q, ties, row = hi[seg], r - above, at_hi, 1
        elif lo[seg] != hi[seg] and r <= above + at_hi + inside:
            found[seg] = _cut_among(keys[seg, :inside], r - above - at_hi, n)
            continue
        elif lo[seg] != hi[seg] and r <= above + at_hi + inside + at_lo:
            t, q, ties, row = lo[seg], r - above - at_hi - inside, at_lo, 2
        else:
            return None
        if q == ties:
            found[seg] = (t, n)
        else:
            tie_queries.append((seg, row, t, q))
    if tie_queries:  # only some of the entries equal to t fit: the q-th in index order, found via its block
        segs = len(wanted)
        queries = [(wanted[seg][0], t, q, row * segs + seg) for seg, row, t, q in tie_queries]
        hits = backend.tie_cuts(base, experts, counts.view(3 * segs, -1), queries, block)
        for (seg, _, t, _), j in zip(tie_queries, hits, strict=True):
            if j < 0:
                raise AssertionError(f"bracket select: tie {t} not found in its block")
            found[seg] = (t, j + 1)
    # segment of (expert i, column c) = i * len(cols) + its place in cols; a rank of 0 is the empty set
    return [[found.get(i * len(cols) + cols.index(c), (EMPTY_T, EMPTY_C)) if c in cols else (EMPTY_T, EMPTY_C)
             for c in range(len(ranks[i]))] for i in range(n_exp)]


def _cut_among(keys: torch.Tensor, r: int, n: int) -> tuple[int, int]:
    """(t, c) of the r-th entry (1-based) of the compacted candidates, ordered by |d| descending, then index."""
    ordered = keys.sort().values
    key = ordered[r - 1]
    same = (ordered >> 32) == (key >> 32)
    key, first, ties = torch.stack([key, same.to(torch.int64).argmax(), same.sum()]).tolist()  # one transfer
    return _TOP_BITS - (key >> 32), (n if r - first == ties else (key & 0xFFFFFFFF) + 1)


def trim_counts(sparsifier: str, numel: int, density: float, gamma: float = 0.0) -> tuple[int, int]:
    """(k_keep_rank, k_drop_rank): the kept set is top(k_keep) minus top(k_drop).

    magnitude: k = max(1, floor(density * n)) (0 for an empty tensor); nothing dropped.
    breadcrumbs: drop the floor(gamma * n) largest, keep the next floor(density * n); when the two do
    not fit in n, fewer large entries are dropped (mergekit's rule), so exactly floor(density * n) survive.
    """
    if sparsifier == "magnitude":
        return min(numel, max(1, math.floor(density * numel))), 0
    if sparsifier == "breadcrumbs":
        if density >= 1.0:
            return numel, 0
        keep = math.floor(density * numel)
        top = math.floor(gamma * numel)
        top = min(top, numel - keep)
        return top + keep, top
    raise ValueError(f"no trim for sparsifier {sparsifier!r}")


def largest(top: float, m: float) -> float:
    """max(top, m) for a running largest magnitude, a NaN counting as infinite (max(x, nan) is x: it would be
    lost, and a tensor with a NaN must be seen as one)."""
    return math.inf if math.isnan(m) else max(top, m)


def fixed_point_shift(max_abs: float, numel: int) -> int:
    """The power of two S so that sum over numel entries of trunc(|d| * 2^S) stays below 2^62."""
    _, e = math.frexp(max_abs)  # max_abs < 2^e
    return max(-126, min(127, 62 - numel.bit_length() - e))


def dare_scales(
    backend: ModuleType, segments: list[Segment], chunk: int, keys: list[int], density: list[float],
    masks: KeepMasks | None = None,
) -> list[float]:
    """mergekit's L1 rescale of DARE per expert (l1_scales, the kept entries drawn as the merge draws them).
    `masks`: where the torch backend keeps the drawn masks for the merge pass."""
    return l1_scales(backend, segments, chunk, len(keys), lambda base, xs, shifts, start: backend.l1_fixed(
        base, xs, shifts, [(keys[i], density[i], start) for i in range(len(keys))], masks=masks))


def trim_scales(backend: ModuleType, segments: list[Segment], chunk: int,
                cuts: list[tuple[int, int, int, int]]) -> list[float]:
    """mergekit's L1 rescale of a magnitude trim per expert (ties, breadcrumbs with `rescale: true`;
    l1_scales, the kept entries those of the cuts (t_keep, c_keep, t_drop, c_drop), as the merge keeps them)."""
    return l1_scales(backend, segments, chunk, len(cuts), lambda base, xs, shifts, start: [
        backend.l1_fixed_top(base, x, h, start, c) if h is not None else (0, 0)
        for x, h, c in zip(xs, shifts, cuts, strict=True)])


def l1_scales(
    backend: ModuleType, segments: list[Segment], chunk: int, n: int,
    sums: Callable[[torch.Tensor, list[torch.Tensor], list[int | None], int], list[tuple[int, int]]],
) -> list[float]:
    """||d||_1 / ||kept d||_1 over the tensor, per expert (1.0 if nothing is kept, and where a delta is NaN or
    infinite, whose norm has no finite ratio). `sums(base, experts, shifts, start)`: the chunk's fixed-point
    sums (all, kept) of every expert; shifts[i] None: expert i's need no sums (give (0, 0)). Every expert is
    passed, so the GPU reads a staging buffer's rows in place (a subset of rows would be a stacked copy).

    Both norms are fixed-point integer sums, so the factor is identical for every chunking.
    """
    total = sum(s.numel for s in segments)
    top = [0.0] * n
    for _, base, experts in _chunks(segments, chunk):
        top = [largest(t, m) for t, m in zip(top, backend.max_abs(base, experts[:n]), strict=True)]
    live = [i for i in range(n) if top[i] != 0.0 and math.isfinite(top[i])]  # a NaN or Inf delta: factor 1
    shift = [fixed_point_shift(top[i], total) if i in live else None for i in range(n)]
    found = {i: [0, 0] for i in live}
    if live:
        for start, base, experts in _chunks(segments, chunk):
            for i, (a, k) in enumerate(sums(base, experts[:n], shift, start)):
                if i in found:
                    found[i][0] += a
                    found[i][1] += k
    return [float(np.float32(found[i][0] / found[i][1])) if i in found and found[i][1] else 1.0 for i in range(n)]


def tensor_params(
    method,
    *,
    name: str,
    numel: int,
    segments: list[Segment],
    weights: list[float],
    density: list[float],
    gamma: list[float],
    lam: float,
    normalize: bool,
    rescale: object,
    seed: int,
    chunk: int,
    backend: ModuleType,
    cuts: list[tuple[int, int, int, int]] | None = None,
    masks: KeepMasks | None = None,
    keep_bytes: int | None = None,
    t: float | None = None,
    models: int = 0,
    karcher: tuple[int, float] | None = None,
    eps: float | None = None,
    epsilon: list[float] | None = None,
    shape: tuple[int, ...] | None = None,
    select_topk: float | None = None,
    ram: tuple[float, tuple[float, float] | None] | None = None,
    filter_rows: int | None = None,
    columns: int | None = None,
):
    """Run tensor `name`'s statistics pass and return the ChunkParams every chunk of it uses.

    `segments` give the tensor's data; `cuts` (trim_scope: global) skips the per-tensor selection; `masks`
    (DARE or DELLA with the L1 rescale): where the keep masks drawn here are kept for the merge pass; `keep_bytes`:
    top_cuts' bound on the selected entries it keeps in host memory (a run passes its per-worker share); `t`:
    slerp's interpolation factor (its two models' weights come from the angle between them, kernels/slerp.py;
    nuslerp's from `weights` and the angle, kernels/nuslerp.py), or nearswap's distance;
    `models`: how many models (the base's tensor first) slerp and model_stock sum, or karcher averages;
    `karcher`: its (max_iter, tol); `eps`: multislerp's (with `normalize`, its normalize_weights); `epsilon`, `shape`:
    DELLA's epsilon per expert and the tensor's shape, whose rank groups the drop ranks in (`chunk`: whole units
    of them, della.aligned_chunk); `select_topk`: SCE's (kernels/sce.py: its cut and weights); `ram`: RAM's
    (epsilon, RAM+'s (r, alpha) or None; kernels/ram.py); `filter_rows`: model_stock filter_wise's row length
    (no statistics: each chunk's rows weigh themselves); `columns`: a per-column nuslerp's (whole rows of them).
    """
    from fusemerge.kernels.params import ChunkParams

    if method.is_slerp:
        from fusemerge.kernels.slerp import slerp_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=True,
                           weights=slerp_weights(backend, segments, chunk, t))
    if method.is_model_stock and filter_rows is not None:
        return ChunkParams(sparsifier="none", consensus="none", linear=True, weights=(1.0,) * models,
                           filter_rows=filter_rows)
    if method.is_model_stock:
        from fusemerge.kernels.model_stock import model_stock_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=True,
                           weights=model_stock_weights(backend, segments, chunk, models - 1))
    if method.is_multislerp:  # as nuslerp: with a base, base + sum w_i d_i; without, sum w_i x_i
        from fusemerge.kernels.multislerp import EPS, multislerp_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=method.combines_models,
                           weights=multislerp_weights(backend, segments, chunk, weights, normalize,
                                                      EPS if eps is None else eps, name))
    if method.is_karcher:
        from fusemerge.kernels.karcher import karcher_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=True,
                           weights=karcher_weights(backend, segments, chunk, models, *(karcher or ())))
    if method.is_ram:
        from fusemerge.kernels.ram import EPSILON, ram_params

        eps, plus = ram if ram is not None else (EPSILON, None)
        return ram_params(segments, chunk, eps, plus, models)  # counts: torch operations, no kernel
    if method.is_sce:
        from fusemerge.kernels.sce import SELECT_TOPK, sce_params

        return sce_params(backend, segments, chunk, SELECT_TOPK if select_topk is None else select_topk,
                          keep_bytes=keep_bytes)
    if method.is_nearswap:  # no statistics: t alone decides each entry (reference.nearswap_torch)
        return ChunkParams(sparsifier="none", consensus="none", linear=False, weights=(1.0,), nearswap=float(t))
    if method.is_nuslerp and columns is not None:  # one arc per column: its sums over every chunk
        from fusemerge.kernels.nuslerp import column_weights, t_from_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=method.combines_models, weights=(1.0, 1.0),
                           nuslerp_cols=column_weights(segments, chunk, t_from_weights(*weights), columns))
    if method.is_nuslerp and filter_rows is not None:  # one arc per row, weighed as its chunk is merged
        from fusemerge.kernels.nuslerp import t_from_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=method.combines_models, weights=(1.0, 1.0),
                           filter_rows=filter_rows, nuslerp_t=t_from_weights(*weights))
    if method.is_nuslerp:  # with a base: base + a d_0 + b d_1, task arithmetic's kernels; without: a x_0 + b x_1
        from fusemerge.kernels.nuslerp import nuslerp_weights

        return ChunkParams(sparsifier="none", consensus="none", linear=method.combines_models,
                           weights=nuslerp_weights(backend, segments, chunk, weights))
    n = len(weights)
    kw: dict = {}
    if method.needs_thresholds:
        if cuts is None:
            ranks = [list(trim_counts(method.sparsifier, numel, density[i], gamma[i] if gamma else 0.0))
                     for i in range(n)]
            cuts = [(tk, ck, td, cd) for (tk, ck), (td, cd) in top_cuts(backend, segments, chunk, ranks,
                                                                         keep_bytes=keep_bytes)]
        kw = dict(t_keep=tuple(c[0] for c in cuts), c_keep=tuple(c[1] for c in cuts),
                  t_drop=tuple(c[2] for c in cuts), c_drop=tuple(c[3] for c in cuts))
        if rescale is True:
            kw["scale"] = tuple(trim_scales(backend, segments, chunk, cuts))
    elif method.sparsifier == "dare":
        from fusemerge.kernels.philox import dare_key

        keys = [dare_key(seed, name, i) for i in range(n)]
        if rescale is True:
            scale = tuple(dare_scales(backend, segments, chunk, keys, density, masks))
        elif rescale == "inverse":
            scale = tuple(float(np.float32(1.0) / np.float32(d)) for d in density)
        else:
            scale = (1.0,) * n
        kw = dict(keys=tuple(keys), density=tuple(density), scale=scale)
    elif method.sparsifier == "della":
        from fusemerge.kernels.della import della_scales, rank_layout
        from fusemerge.kernels.philox import dare_key

        keys = [dare_key(seed, name, i) for i in range(n)]
        layout = rank_layout(shape if shape is not None else (numel,))
        scale = (tuple(della_scales(backend, segments, chunk, keys, density, epsilon, layout, masks))
                 if rescale is True else (1.0,) * n)
        kw = dict(keys=tuple(keys), density=tuple(density), scale=scale, epsilon=tuple(epsilon), ranks=layout)
    return ChunkParams(sparsifier=method.sparsifier, consensus=method.consensus, linear=method.combines_models,
                       weights=tuple(weights), lam=lam, normalize=normalize, **kw)
