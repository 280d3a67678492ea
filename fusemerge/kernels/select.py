"""Where the trim threshold comes from: exact top-k by radix select, and DARE's L1 rescale factor.

Backend-independent drivers. They stream over chunks of one expert's delta (a tensor, or for
`trim_scope: global` every merged tensor of the model in order) and call a backend's statistics
functions (`fusemerge.kernels.reference` on CPU, `fusemerge.kernels.triton_select` on CUDA). Every
quantity is an integer count or an integer sum, so the result does not depend on chunk size,
backend or device.

Top-k of |d| without sorting (METHODS.md, "Trim"):
  1. histogram of bits(|d|) >> 16 (32768 bins)  -> the bin holding the k-th largest
  2. histogram of the low 16 bits inside that bin -> the exact bit pattern t of the k-th largest
  3. if only some of the entries equal to t fit in k: an in-order count finds the index cut c
     so that exactly k entries satisfy (|d| > t) | (|d| == t & j < c).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from fusemerge.kernels.params import EMPTY_C, EMPTY_T

Loader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Segment:
    """A run of elements of one expert: `load(start, count)` gives (base chunk, expert chunk)."""

    numel: int
    load: Loader


def _chunks(segments: list[Segment], chunk: int) -> Iterator[tuple[int, Segment, int, int]]:
    """(global start, segment, local start, count) over every segment in order."""
    offset = 0
    for seg in segments:
        for local in range(0, seg.numel, chunk):
            yield offset + local, seg, local, min(chunk, seg.numel - local)
        offset += seg.numel


def _locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the `rank`-th largest entry (1-based) and how many entries lie in higher bins."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # entries in bins strictly above each bin
    b = int(np.nonzero((above < rank) & (above + hist >= rank))[0][-1])
    return b, int(above[b])


def top_cuts(backend: ModuleType, segments: list[Segment], chunk: int, ranks: list[int]) -> list[tuple[int, int]]:
    """For each rank r, the (t, c) whose set in_top(t, c) holds exactly the r largest |d|.

    Ties at the threshold are kept lowest global index first. r = 0 gives the empty set.
    """
    total = sum(s.numel for s in segments)
    if any(r < 0 or r > total for r in ranks):
        raise ValueError(f"ranks {ranks} outside [0, {total}]")
    live = [r for r in ranks if r > 0]
    if not live:
        return [(EMPTY_T, EMPTY_C)] * len(ranks)

    hi = np.zeros(1 << 15, dtype=np.int64)
    for _, seg, local, count in _chunks(segments, chunk):
        hi += backend.abs_hist_hi(*seg.load(local, count)).cpu().numpy()
    located = {r: _locate(hi, r) for r in live}

    bins = sorted({b for b, _ in located.values()})
    lo = {b: np.zeros(1 << 16, dtype=np.int64) for b in bins}
    for _, seg, local, count in _chunks(segments, chunk):
        base, expert = seg.load(local, count)
        for b in bins:
            lo[b] += backend.abs_hist_lo(base, expert, b).cpu().numpy()

    found: dict[int, tuple[int, int, int]] = {}  # rank -> (t, ties to keep, ties in total)
    for r in live:
        b, above = located[r]
        low, above_lo = _locate(lo[b], r - above)
        ties = int(lo[b][low])
        found[r] = ((b << 16) | low, r - above - above_lo, ties)

    cuts = {r: total for r, (_, q, ties) in found.items() if q == ties}
    pending = {r: (t, q) for r, (t, q, ties) in found.items() if q < ties}
    if pending:
        seen = dict.fromkeys(pending, 0)
        for start, seg, local, count in _chunks(segments, chunk):
            base, expert = seg.load(local, count)
            for r, (t, q) in list(pending.items()):
                here = backend.count_equal(base, expert, t)
                if seen[r] + here >= q:
                    cuts[r] = start + backend.nth_equal(base, expert, t, q - seen[r]) + 1
                    del pending[r]
                else:
                    seen[r] += here
            if not pending:
                break
    out = []
    for r in ranks:
        out.append((found[r][0], cuts[r]) if r > 0 else (EMPTY_T, EMPTY_C))
    return out


def trim_counts(sparsifier: str, numel: int, density: float, gamma: float = 0.0) -> tuple[int, int]:
    """(k_keep_rank, k_drop_rank): the kept set is top(k_keep) minus top(k_drop).

    magnitude: k = max(1, floor(density * n)); nothing dropped.
    breadcrumbs: drop the floor(gamma * n) largest, keep the next floor(density * n); when the two do
    not fit in n, fewer large entries are dropped (mergekit's rule), so exactly floor(density * n) survive.
    """
    if sparsifier == "magnitude":
        return max(1, math.floor(density * numel)), 0
    if sparsifier == "breadcrumbs":
        if density >= 1.0:
            return numel, 0
        keep = math.floor(density * numel)
        top = math.floor(gamma * numel)
        top = min(top, numel - keep)
        return top + keep, top
    raise ValueError(f"no trim for sparsifier {sparsifier!r}")


def fixed_point_shift(max_abs: float, numel: int) -> int:
    """The power of two S so that sum over numel entries of trunc(|d| * 2^S) stays below 2^62."""
    _, e = math.frexp(max_abs)  # max_abs < 2^e
    return max(-126, min(127, 62 - numel.bit_length() - e))


def dare_scale(
    backend: ModuleType, segments: list[Segment], chunk: int, key: int, density: float, start_offset: int = 0
) -> float:
    """mergekit's L1 rescale: ||d||_1 / ||kept d||_1 for one expert and tensor (1.0 if nothing is kept).

    Both norms are fixed-point integer sums, so the factor is identical for every chunking.
    """
    total = sum(s.numel for s in segments)
    top = 0.0
    for _, seg, local, count in _chunks(segments, chunk):
        top = max(top, backend.max_abs(*seg.load(local, count)))
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    shift = fixed_point_shift(top, total)
    all_sum = kept_sum = 0
    for start, seg, local, count in _chunks(segments, chunk):
        a, k = backend.l1_fixed(*seg.load(local, count), shift, (key, density, start_offset + start))
        all_sum += a
        kept_sum += k
    if kept_sum == 0:
        return 1.0
    return float(np.float32(all_sum / kept_sum))


def tensor_params(
    method,
    *,
    name: str,
    numel: int,
    segments: Callable[[int], list[Segment]],
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
):
    """Run tensor `name`'s statistics pass and return the ChunkParams every chunk of it uses.

    `segments(i)` gives expert i's data; `cuts` (trim_scope: global) skips the per-tensor selection.
    """
    from fusemerge.kernels.params import ChunkParams

    n = len(weights)
    kw: dict = {}
    if method.needs_thresholds:
        if cuts is None:
            cuts = []
            for i in range(n):
                ranks = trim_counts(method.sparsifier, numel, density[i], gamma[i] if gamma else 0.0)
                (tk, ck), (td, cd) = top_cuts(backend, segments(i), chunk, list(ranks))
                cuts.append((tk, ck, td, cd))
        kw = dict(t_keep=tuple(c[0] for c in cuts), c_keep=tuple(c[1] for c in cuts),
                  t_drop=tuple(c[2] for c in cuts), c_drop=tuple(c[3] for c in cuts))
    elif method.sparsifier == "dare":
        from fusemerge.kernels.philox import dare_key

        keys = tuple(dare_key(seed, name, i) for i in range(n))
        if rescale is True:
            scale = tuple(dare_scale(backend, segments(i), chunk, keys[i], density[i]) for i in range(n))
        elif rescale == "inverse":
            scale = tuple(float(np.float32(1.0) / np.float32(d)) for d in density)
        else:
            scale = (1.0,) * n
        kw = dict(keys=keys, density=tuple(density), scale=scale)
    return ChunkParams(sparsifier=method.sparsifier, consensus=method.consensus, linear=method.is_linear,
                       weights=tuple(weights), lam=lam, normalize=normalize, **kw)
