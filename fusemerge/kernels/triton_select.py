"""Triton statistics kernels: where the trim threshold and DARE's L1 come from (select.py drives them).

Each function has the signature and the result of its namesake in `fusemerge.kernels.reference`, and
every result is an integer (a count, an index, an integer sum or a float's bit pattern), so the two
backends agree exactly by construction, whatever the block size or the order of atomic updates:

- `bracket_pass`: the one-pass bracket select over the base and all N experts of a whole tensor (rows of
  one buffer): per block and per (expert, bracket) the counts a > hi, a == hi, a == lo, and the entries
  lo < a < hi compacted as keys (0x7FFFFFFF - a) << 32 | j (order free: the driver sorts them);
- `sample_abs_bits`: a = bits(|d|) of every expert at the bracket's sample positions, one launch;
- `tie_cuts`: per query, the block holding the q-th entry a == t (a prefix sum over per-block counts, in the
  kernel) and its index in that block; one launch for all queries;
- `abs_hist_hi`, `abs_hist_lo`: the two levels of the radix select over a = bits(|d|) (int32,
  sign cleared; non-negative floats order like their bits), histograms by integer atomics;
- `count_equal`, `nth_equal`: per-block counts of a == t, then `tie_cuts` (the index cut of exact top-k);
- `max_abs`: the maximum of a as a bit pattern (NaN, whose bits exceed inf's, propagates), of every expert
  in one launch that reads the base once (N + 1 reads, not 2 N);
- `l1_fixed`: sum trunc(|d| * 2^shift) computed from the float's bits with integer shifts (exact: the
  same integers as the reference's float32 product, which is exact whenever the result is >= 1), of every
  expert in one launch that reads the base once.

Bytes moved per element: the bracket pass reads the base and each expert once, (N + 1) reads of the input
dtype for all N experts, and writes 12 bytes per 1024 elements per (expert, bracket) plus 8 per candidate; the
radix select (abs_hist_hi + abs_hist_lo) is two passes of two reads (base and expert), 2 x 2 per expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusemerge.kernels.layout import expert_rows
from fusemerge.kernels.triton_merge import SUPPORTED_DTYPES, _load_f32, check_device, launch_guard

# Elements per program: 8 per thread at 4 warps (16-byte bf16 loads). Not tuned on a GPU yet; every kernel
# here compiles for sm_90 in 23-64 registers without spills. Launched with enable_fp_fusion=False like the
# merge (no float math to fuse here; it only silences Triton 3.9's FP-fusion default warning).
BLOCK = 1024
NUM_WARPS = 4
HI_BINS = 1 << 15  # bits(|d|) >> 16: the sign bit is clear, 15 significant bits remain
LO_BINS = 1 << 16
# Privatized histogram copies: program pid adds into copy pid % copies, so the few hot bins (deltas share a
# handful of exponents, and bf16-derived deltas share their low bits) take 1/copies of the same-address
# atomics each. int32 counts (a chunk has < 2^31 elements); HIST_BYTES of copies stay in an H100's 50 MB L2
# (256 copies of the 32768 high bins, 128 of the 65536 low bins). The copies are summed by torch afterwards
# (integers: order does not matter). On an H100, 32 int64 copies ran the selection pass at 2-3% of the copy
# bandwidth (bench/results/gpu-h100-2026-11-24): same-address atomics, not bytes, bound it.
HIST_BYTES = 32 << 20
# Elements per program of the bracket pass (one read of the base and all N experts): its per-block counts
# are 3 int32 per (expert, bracket) per block, 0.6% of its bf16 row's bytes at 1024; the tie cut rescans one
# block. Below 2^21: the kernel sums the counts in packed 21-bit fields. Not yet timed on a GPU.
BRACKET_BLOCK = 1024
# Elements per launch of the gram kernel: its int64 sums of up to 2^30 terms below 2^32 cannot overflow.
GRAM_PIECE = 1 << 30
# Block counts the tie cut adds up per step (one program reads a whole row of them).
TIE_SCAN = 4096
# select.top_cuts runs the one-pass bracket select (select.bracket_cuts) on tensors held whole on the device.
ONE_PASS_SELECT = True
# "No q-th tie in this block": larger than any chunk index, so tl.min picks a real hit when there is one.
_NOT_FOUND = tl.constexpr(2**62)


@triton.jit
def _bits_of_abs(d, mask):
    """bits(|d|) as int32 (sign cleared), 0 on masked lanes."""
    return tl.where(mask, d.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)


@triton.jit
def _abs_bits(base_ptr, x_ptr, offs, mask):
    """a = bits(|float32(x) - float32(base)|) as int32, 0 on masked lanes."""
    return _bits_of_abs(_load_f32(x_ptr + offs, mask) - _load_f32(base_ptr + offs, mask), mask)


@triton.jit(do_not_specialize=["hi_bin"])
def _hist_kernel(
    base_ptr,
    x_ptr,
    hist_ptr,  # int32 [COPIES, NBINS], zeroed
    n,
    hi_bin,  # LOW only: count entries whose a >> 16 == hi_bin, by a & 0xFFFF
    LOW: tl.constexpr,
    NBINS: tl.constexpr,
    COPIES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _abs_bits(base_ptr, x_ptr, offs, mask)
    if LOW:
        bins = a & 0xFFFF
        mask = mask & ((a >> 16) == hi_bin)
    else:
        bins = a >> 16
    row = (pid % COPIES) * NBINS
    ones = tl.full([BLOCK], 1, dtype=tl.int32)
    tl.atomic_add(hist_ptr + row + bins, ones, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["t"])
def _count_kernel(base_ptr, x_ptr, counts_ptr, n, t, BLOCK: tl.constexpr):
    """counts[pid] = #{a == t} in block pid (int32)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _abs_bits(base_ptr, x_ptr, offs, mask)
    hit = mask & (a == t)
    tl.store(counts_ptr + pid, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _tie_cut_kernel(
    base_ptr,
    x_ptr,  # expert i, element k at x_ptr + i * row_stride + k
    counts_ptr,  # int32 [rows, blocks]: entries a == t of each block of BLOCK elements, one row per query's t
    query_ptr,  # int64 [4, Q]: expert row, t, q, counts row
    out_ptr,  # int64 [Q]: the index of the q-th entry with a == t, or _NOT_FOUND
    row_stride,
    n,
    blocks,
    Q,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    """One program per query: find the block holding the q-th tie from the per-block counts, then its index.

    The prefix sum over the counts row runs here, SCAN counts at a time (no loop exit in Triton: every tile is
    read, 256 KB for 2^26 elements), so a tie cut is one launch and one transfer back."""
    k = tl.program_id(0)
    row = tl.load(query_ptr + k)
    t = tl.load(query_ptr + Q + k).to(tl.int32)
    q = tl.load(query_ptr + 2 * Q + k)
    crow = tl.load(query_ptr + 3 * Q + k) * blocks
    seen = tl.zeros([], dtype=tl.int64)
    block = tl.zeros([], dtype=tl.int64)
    before = tl.zeros([], dtype=tl.int64)
    for first in range(0, blocks, SCAN):
        offs = first + tl.arange(0, SCAN)
        c = tl.load(counts_ptr + crow + offs, mask=offs < blocks, other=0).to(tl.int64)
        cum = seen + tl.cumsum(c, axis=0)
        cross = (cum >= q) & (cum - c < q) & (offs < blocks)  # true at one block of one tile at most
        block += tl.sum(tl.where(cross, offs, 0), axis=0)
        before += tl.sum(tl.where(cross, cum - c, 0), axis=0)
        seen += tl.sum(c, axis=0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _abs_bits(base_ptr, x_ptr + row * tl.cast(row_stride, tl.int64), offs, mask)
    hit = mask & (a == t)
    rank = tl.cumsum(hit.to(tl.int64), axis=0)
    idx = tl.min(tl.where(hit & (rank == q - before), offs, _NOT_FOUND), axis=0)
    tl.store(out_ptr + k, tl.where((q >= 1) & (q <= seen), idx, _NOT_FOUND))


@triton.jit
def _sample_kernel(base_ptr, x_ptr, out_ptr, row_stride, n, s, step, N: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, k] = bits(|d_i|) at position (k * step) mod n, for k < s (the bracket select's sample)."""
    pid = tl.program_id(0).to(tl.int64)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    mask = k < s
    pos = (k * step) % n
    b = _load_f32(base_ptr + pos, mask)
    stride = tl.cast(row_stride, tl.int64)
    for i in range(N):
        d = _load_f32(x_ptr + i * stride + pos, mask) - b
        tl.store(out_ptr + i * s + k, d.to(tl.int32, bitcast=True) & 0x7FFFFFFF, mask=mask)


@triton.jit
def _bracket_kernel(
    base_ptr,
    x_ptr,  # expert i, element k at x_ptr + i * row_stride + k
    bounds_ptr,  # int32 [2, N * R]: lo, then hi, of each (expert, rank) bracket
    counts_ptr,  # int32 [3, N * R, programs]: #(a > hi), #(a == hi), #(a == lo) in each block
    fill_ptr,  # int32 [N * R], zeroed: candidates found so far (lo < a < hi)
    keys_ptr,  # int64 [N * R, cap]: candidate keys (0x7FFFFFFF - a) << 32 | j, in no particular order
    row_stride,
    n,
    cap,
    N: tl.constexpr,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = tl.cast(row_stride, tl.int64)
    b = _load_f32(base_ptr + offs, mask)
    for i in range(N):  # a loop, not unrolled (as the merge kernel: unrolled, the loads are hoisted and spill)
        d = _load_f32(x_ptr + i * stride + offs, mask) - b
        a = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        for r in tl.static_range(R):
            seg = i * R + r
            lo = tl.load(bounds_ptr + seg)
            hi = tl.load(bounds_ptr + N * R + seg)
            inside = mask & (a > lo) & (a < hi)
            # the block's three counts in one reduction: 21-bit fields of an int64 (a count <= BLOCK < 2^21)
            packed = tl.sum((mask & (a > hi)).to(tl.int64) | ((mask & (a == hi)).to(tl.int64) << 21)
                            | ((mask & (a == lo)).to(tl.int64) << 42), axis=0)
            tl.store(counts_ptr + seg * blocks + pid, (packed & 0x1FFFFF).to(tl.int32))
            tl.store(counts_ptr + (N * R + seg) * blocks + pid, ((packed >> 21) & 0x1FFFFF).to(tl.int32))
            tl.store(counts_ptr + (2 * N * R + seg) * blocks + pid, (packed >> 42).to(tl.int32))
            found = tl.sum(inside.to(tl.int32), axis=0)
            if found > 0:  # few blocks hold candidates (none when ties collapse the bracket to lo == hi)
                # one atomic per block reserves its candidates' slots
                first = tl.atomic_add(fill_ptr + seg, found, sem="relaxed")
                pos = first + tl.cumsum(inside.to(tl.int32), axis=0) - 1
                key = ((0x7FFFFFFF - a).to(tl.int64) << 32) | offs
                tl.store(keys_ptr + seg.to(tl.int64) * cap + pos, key, mask=inside & (pos < cap))


@triton.jit
def _max_kernel(
    base_ptr,  # [n] (HAS_BASE only)
    x_ptr,  # input i's element k at x_ptr + i * row_stride + k
    block_max_ptr,  # int32 [M, programs]: per block, the largest bits(|d_i|)
    row_stride,
    n,
    M: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = tl.cast(row_stride, tl.int64)  # int64 before any i * stride (see the merge kernel)
    if HAS_BASE:
        b = _load_f32(base_ptr + offs, mask)  # once for all M inputs
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(M):
        a = _bits_of_abs(_load_f32(x_ptr + i * stride + offs, mask) - b, mask)  # x - 0.0: x (|d| is kept)
        tl.store(block_max_ptr + i * programs + pid, tl.max(a, axis=0))


@triton.jit
def _nonfinite_kernel(base_ptr, x_ptr, block_count_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _abs_bits(base_ptr, x_ptr, offs, mask)  # 0 on masked lanes: never counted
    tl.store(block_count_ptr + pid, tl.sum((a >= 0x7F800000).to(tl.int32), axis=0))


@triton.jit
def _l1_kernel(
    base_ptr,
    x_ptr,  # expert i's element k at x_ptr + i * row_stride + k
    sums_ptr,  # int64 [M, 2, programs]: per block, expert i's sum over all entries, then over the DARE-kept ones
    table_ptr,  # int64 [4, M]: each expert's power of two; DARE key, density (float32 bits), and the global flat
    # index of element 0 in its stream (KEEP only); one table, so one host-to-device copy per call
    row_stride,
    n,
    M: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = tl.cast(row_stride, tl.int64)  # int64 before any i * stride (see the merge kernel)
    b = _load_f32(base_ptr + offs, mask)  # once for all M experts
    for i in range(M):
        a = _bits_of_abs(_load_f32(x_ptr + i * stride + offs, mask) - b, mask)
        # |d| = m * 2^(e - 150) with m the 24-bit significand (implicit bit unless subnormal, e = max(E, 1));
        # trunc(|d| * 2^shift) = m << s or m >> -s for s = e - 150 + shift. Shift amounts are clamped to
        # [0, 63]: m < 2^24, so m >> 63 = 0 is the right answer, and m << 63 only happens outside the contract.
        expo = a >> 23
        frac = a & 0x7FFFFF
        m = tl.where(expo == 0, frac, frac | 0x800000).to(tl.int64)
        s = tl.maximum(expo, 1) - 150 + tl.load(table_ptr + i).to(tl.int32)
        up = tl.minimum(tl.maximum(s, 0), 63).to(tl.int64)
        down = tl.minimum(tl.maximum(-s, 0), 63).to(tl.int64)
        q = tl.where(s >= 0, m << up, m >> down)
        q = tl.where(mask, q, 0)
        tl.store(sums_ptr + (2 * i) * programs + pid, tl.sum(q, axis=0))
        if KEEP:
            u = tl.rand(tl.load(table_ptr + M + i), tl.load(table_ptr + 3 * M + i) + offs)
            density = tl.load(table_ptr + 2 * M + i).to(tl.int32).to(tl.float32, bitcast=True)
            kept = tl.where(u < density, q, 0)
            tl.store(sums_ptr + (2 * i + 1) * programs + pid, tl.sum(kept, axis=0))


@triton.jit
def _gram_kernel(
    base_ptr,  # [n] (DELTAS only)
    x_ptr,  # the input of vector i, element k at x_ptr + i * row_stride + k
    scale_ptr,  # float64 [M * M]: 2^shift of pair (i, j), i <= j; 0.0 for a pair not summed (its sums are 0)
    sums_ptr,  # int64 [M (M + 1) / 2, 2, programs]: per block, the sums of trunc(p) and of trunc(frac(p) 2^32)
    row_stride,
    n,
    M: tl.constexpr,
    DELTAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = tl.cast(row_stride, tl.int64)  # int64 before any i * stride (see the merge kernel)
    if DELTAS:
        b = _load_f32(base_ptr + offs, mask)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    # v_i = float32(x_i) - float32(base) (DELTAS) or float32(x_i); pair (i, j) is row
    # k = i M - i (i - 1) / 2 + (j - i) of the sums. Loops, not unrolled: M (M + 1) / 2 bodies otherwise.
    for i in range(M):
        u = _load_f32(x_ptr + i * stride + offs, mask)
        if DELTAS:
            u = u - b
        for j in range(i, M):
            v = _load_f32(x_ptr + j * stride + offs, mask)  # a second read of row j: from L1 / L2, not DRAM
            if DELTAS:
                v = v - b
            # exact: a float32 product has 48 bits, float64 53, and the scale is a power of two; |p| < 2^32
            p = u.to(tl.float64) * v.to(tl.float64) * tl.load(scale_ptr + i * M + j)
            w = p.to(tl.int64)  # truncates toward zero, as torch's trunc
            f = ((p - w.to(tl.float64)) * 4294967296.0).to(tl.int64)  # 32 bits of the fraction, the same sign
            k = i * M - (i * (i - 1)) // 2 + (j - i)
            tl.store(sums_ptr + (2 * k) * programs + pid, tl.sum(w, axis=0))  # |sum| < 2^42: exact in int64
            tl.store(sums_ptr + (2 * k + 1) * programs + pid, tl.sum(f, axis=0))


def _check_pair(base: torch.Tensor | None, expert: torch.Tensor) -> int:
    """The chunks' length, after checking that they are 1-D contiguous chunks of one length on one GPU (or the
    interpreter's CPU); base None: the expert alone."""
    for what, t in (("base", base), ("expert", expert)):
        if t is None:
            continue
        check_device(t, what)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what} has dtype {t.dtype}; supported: bfloat16, float16, float32")
        if t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
            raise ValueError(f"{what} must be a 1-D contiguous chunk, got shape {tuple(t.shape)}")
    if base is not None and (base.numel() != expert.numel() or base.device != expert.device):
        raise ValueError(f"base ({base.numel()} on {base.device}) and expert ({expert.numel()} on "
                         f"{expert.device}) chunks differ")
    return expert.numel()


def _rows(xs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """expert_rows of `xs`, read as float32 copies (exact) where they were saved in different dtypes: a kernel
    reads one."""
    return expert_rows([x.float() for x in xs] if len({x.dtype for x in xs}) > 1 else xs)


def _same_chunks(base: torch.Tensor | None, xs: list[torch.Tensor]) -> int:
    """_check_pair for every input of `xs`, which must also share one length and device."""
    n = _check_pair(base, xs[0])
    for x in xs[1:]:
        if _check_pair(base, x) != n or x.device != xs[0].device:
            raise ValueError(f"vector chunks of {[x.numel() for x in xs]} elements on {[str(x.device) for x in xs]}")
    return n


def _hist(base: torch.Tensor, expert: torch.Tensor, low: bool, hi_bin: int) -> torch.Tensor:
    n = _check_pair(base, expert)
    nbins = LO_BINS if low else HI_BINS
    grid_n = triton.cdiv(n, BLOCK)
    copies = max(1, min(HIST_BYTES // (4 * nbins), grid_n))
    hist = torch.zeros((copies, nbins), dtype=torch.int32, device=expert.device)
    if n:
        with launch_guard():
            _hist_kernel[(grid_n,)](base, expert, hist, n, hi_bin, LOW=low, NBINS=nbins, COPIES=copies, BLOCK=BLOCK,
                                    num_warps=NUM_WARPS, enable_fp_fusion=False)
    return hist.sum(dim=0, dtype=torch.int64)


def abs_hist_hi(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """int64[32768]: histogram of bits(|d|) >> 16, d = float32(expert) - float32(base).

    >>> abs_hist_hi(base, expert).sum() == expert.numel()  # doctest: +SKIP
    """
    return _hist(base, expert, False, 0)


def abs_hist_lo(base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """int64[65536]: histogram of bits(|d|) & 0xFFFF over the entries whose bits(|d|) >> 16 == hi_bin."""
    if not 0 <= hi_bin < HI_BINS:
        raise ValueError(f"hi_bin {hi_bin} outside [0, {HI_BINS})")
    return _hist(base, expert, True, hi_bin)


def _block_counts(base: torch.Tensor, expert: torch.Tensor, t: int) -> torch.Tensor:
    n = _check_pair(base, expert)
    grid_n = triton.cdiv(n, BLOCK)
    counts = torch.empty(grid_n, dtype=torch.int32, device=expert.device)
    if n:
        with launch_guard():
            _count_kernel[(grid_n,)](base, expert, counts, n, t, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                     enable_fp_fusion=False)
    return counts


def count_equal(base: torch.Tensor, expert: torch.Tensor, t: int) -> int:
    """How many entries have bits(|d|) == t."""
    return int(_block_counts(base, expert, t).sum(dtype=torch.int64))


def nth_equal(base: torch.Tensor, expert: torch.Tensor, t: int, q: int) -> int:
    """Local index of the q-th (1-based) entry with bits(|d|) == t, or -1 if there are fewer than q."""
    counts = _block_counts(base, expert, t)
    if counts.numel() == 0:
        return -1
    return tie_cuts(base, [expert], counts.view(1, -1), [(0, t, q, 0)], BLOCK)[0]


def tie_cuts(
    base: torch.Tensor, experts: list[torch.Tensor], counts: torch.Tensor, queries: list[tuple[int, int, int, int]],
    block: int,
) -> list[int]:
    """For each query (expert i, t, q, row): the index of the q-th entry with bits(|d_i|) == t, or -1 if there
    are fewer; `counts[row]` holds that t's count in each block of `block` elements. One launch for all."""
    n = _check_pair(base, experts[0])
    if not queries:
        return []
    if counts.dtype != torch.int32 or counts.dim() != 2 or not counts.is_contiguous():
        raise ValueError("counts must be a contiguous int32 [rows, blocks] tensor")
    rows, stride = expert_rows(experts)
    table = torch.tensor(queries, dtype=torch.int64).t().contiguous().to(base.device)
    out = torch.empty(len(queries), dtype=torch.int64, device=base.device)
    with launch_guard():
        _tie_cut_kernel[(len(queries),)](base, rows, counts, table, out, stride, n, counts.shape[1], len(queries),
                                         BLOCK=block, SCAN=TIE_SCAN, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return [-1 if v >= 2**62 else v for v in out.tolist()]


def sample_abs_bits(base: torch.Tensor, experts: list[torch.Tensor], step: int, s: int) -> torch.Tensor:
    """int32 [N, s]: bits(|d_i|) at positions (k * step) mod n, k < s, in one launch (see select.py)."""
    n = _check_pair(base, experts[0])
    rows, stride = expert_rows(experts)
    out = torch.empty((len(experts), s), dtype=torch.int32, device=base.device)
    if s:
        with launch_guard():
            _sample_kernel[(triton.cdiv(s, BLOCK),)](base, rows, out, stride, n, s, step, N=len(experts), BLOCK=BLOCK,
                                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def max_abs(base: torch.Tensor | None, xs: list[torch.Tensor]) -> list[float]:
    """max |d| over the chunk for each input of `xs` (0.0 for an empty chunk; NaN if any |d| is NaN); base
    None: max |x|. One launch and one read of the base for all of them, and one host sync."""
    if not xs:
        return []
    n = _same_chunks(base, xs)
    if n == 0:
        return [0.0] * len(xs)
    rows, stride = _rows(xs)
    grid_n = triton.cdiv(n, BLOCK)
    block_max = torch.empty((len(xs), grid_n), dtype=torch.int32, device=xs[0].device)
    with launch_guard():
        _max_kernel[(grid_n,)](rows if base is None else base, rows, block_max, stride, n, M=len(xs),
                               HAS_BASE=base is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return block_max.max(dim=1).values.view(torch.float32).tolist()


def count_nonfinite(base: torch.Tensor, expert: torch.Tensor) -> int:
    """How many entries have a non-finite d (inf or NaN): bits(|d|) >= 0x7F800000."""
    n = _check_pair(base, expert)
    if n == 0:
        return 0
    grid_n = triton.cdiv(n, BLOCK)
    counts = torch.empty(grid_n, dtype=torch.int32, device=expert.device)
    with launch_guard():
        _nonfinite_kernel[(grid_n,)](base, expert, counts, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return int(counts.sum(dtype=torch.int64))


def gram_fixed(base: torch.Tensor | None, xs: list[torch.Tensor], shifts: dict[tuple[int, int], int]
               ) -> dict[tuple[int, int], tuple[int, int]]:
    """reference.gram_fixed's integers (v_i = float32(xs[i]) - float32(base), or float32(xs[i]) when base is
    None), every pair i <= j in one read of the chunk: one launch per GRAM_PIECE elements, whose per-block
    sums torch adds (integers: the order does not matter)."""
    if not xs or not shifts:
        return {}
    n = _same_chunks(base, xs)
    m = len(xs)
    if any(not 0 <= i <= j < m for i, j in shifts):
        raise ValueError(f"pairs {sorted(shifts)} outside 0 <= i <= j < {m}")
    rows, stride = _rows(xs)
    scale = torch.zeros(m * m, dtype=torch.float64)
    for (i, j), s in shifts.items():
        scale[i * m + j] = 2.0**s
    scale = scale.to(xs[0].device)
    pairs = m * (m + 1) // 2
    table = [[0, 0] for _ in range(pairs)]
    for lo in range(0, n, GRAM_PIECE):  # a piece's sums stay below 2^63: GRAM_PIECE * 2^32 terms at most
        count = min(GRAM_PIECE, n - lo)
        grid_n = triton.cdiv(count, BLOCK)
        sums = torch.empty((pairs, 2, grid_n), dtype=torch.int64, device=xs[0].device)
        with launch_guard():
            _gram_kernel[(grid_n,)](rows if base is None else base[lo:], rows[lo:] if rows.dim() == 1 else rows[:, lo:],
                                    scale, sums, stride, count, M=m, DELTAS=base is not None, BLOCK=BLOCK,
                                    num_warps=NUM_WARPS, enable_fp_fusion=False)
        for row, (w, f) in zip(table, sums.sum(dim=2).tolist(), strict=True):  # the pieces: Python integers
            row[0], row[1] = row[0] + w, row[1] + f
    return {(i, j): tuple(table[i * m - i * (i - 1) // 2 + (j - i)]) for i, j in shifts}


SKIP_SHIFT = -(1 << 20)  # every |d| * 2^SKIP_SHIFT truncates to 0 (infinity's and NaN's bits too)


def l1_fixed(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    shifts: list[int | None],
    keeps: list[tuple[int, float, int] | None] | None = None,
    *,
    masks: object = None,
) -> list[tuple[int, int]]:
    """Fixed-point L1 sums per expert: (sum trunc(|d_i| * 2^shifts[i]), the same over the DARE-kept entries);
    shifts[i] None: (0, 0) (its row is still read, with SKIP_SHIFT: the rows of a staging buffer stay in place).

    `keeps[i]` = (key, density, start) keeps entry j where `tl.rand(key, start + j) < float32(density)`, as
    the merge does; None: every entry is kept (both sums equal). The caller picks each shift so the sums fit
    in int64 (select.fixed_point_shift); non-finite |d| are outside the contract. One launch and one read of
    the base for all experts, one host sync. `masks` is accepted for the torch backend's signature and not
    used (the kernel draws the stream).
    """
    if len(shifts) != len(xs) or (keeps is not None and len(keeps) != len(xs)):
        raise ValueError(f"{len(xs)} experts, {len(shifts)} shifts and {len(keeps or [])} keeps")
    if not xs:
        return []
    n = _same_chunks(base, xs)
    if n == 0:
        return [(0, 0)] * len(xs)
    rows, stride = _rows(xs)
    m = len(xs)
    grid_n = triton.cdiv(n, BLOCK)
    sums = torch.zeros((m, 2, grid_n), dtype=torch.int64, device=base.device)
    rows_keep = [k if k is not None and h is not None else (0, 1.0, 0)  # density 1: all kept
                 for k, h in zip(keeps if keeps is not None else [None] * m, shifts, strict=True)]
    keys, density, starts = zip(*rows_keep, strict=True)
    density_bits = torch.tensor(density, dtype=torch.float32).view(torch.int32).tolist()  # float32(density)
    table = torch.tensor([*(h if h is not None else SKIP_SHIFT for h in shifts), *keys, *density_bits, *starts],
                         dtype=torch.int64).to(base.device)
    with launch_guard():
        _l1_kernel[(grid_n,)](base, rows, sums, table, stride, n, M=m,
                              KEEP=keeps is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    found = sums.sum(dim=2).tolist()
    return [(total, kept if keeps is not None else total) for total, kept in found]


def l1_fixed_top(base: torch.Tensor, expert: torch.Tensor, shift: int, start: int,
                 cut: tuple[int, int, int, int]) -> tuple[int, int]:
    """Fixed-point L1 sums over all and over the trim-kept entries (reference.l1_fixed_top, whose torch
    operations run on the GPU too: the same integers; used once per tensor, by `rescale: true` of a trim)."""
    from fusemerge.kernels import reference

    return reference.l1_fixed_top(base, expert, shift, start, cut)


def bracket_pass(
    base: torch.Tensor, experts: list[torch.Tensor], lo: list[int], hi: list[int], cap: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One pass over the base and all N experts, for R = len(lo) // N brackets per expert (expert i's are
    entries i * R ... i * R + R - 1 of `lo` and `hi`, bit patterns of |d| with lo <= hi).

    Returns (counts, fill, keys, block): counts int32 [3, N * R, blocks] holds, per block of `block` elements,
    #(a > hi), #(a == hi) and #(a == lo); fill int32 [N * R] the number of candidates lo < a < hi; keys int64
    [N * R, cap] their keys (0x7FFFFFFF - a) << 32 | j, the first min(fill, cap) valid, in no particular
    order (a fill above cap means some were not stored). The chunk's indices j must be below 2^32.
    """
    n = _check_pair(base, experts[0])
    for e in experts[1:]:
        _check_pair(base, e)
    segs = len(lo)
    if segs != len(hi) or segs % len(experts):
        raise ValueError(f"{len(lo)} / {len(hi)} bracket bounds for {len(experts)} experts")
    if n >= 2**32:
        raise ValueError(f"{n} elements: bracket keys hold indices below 2^32")
    if not 0 < BRACKET_BLOCK < 2**21:
        raise ValueError(f"BRACKET_BLOCK {BRACKET_BLOCK}: the packed counts need fewer than 2^21 elements per block")
    rows, stride = expert_rows(experts)
    blocks = triton.cdiv(n, BRACKET_BLOCK)
    device = base.device
    bounds = torch.tensor([lo, hi], dtype=torch.int32).to(device)
    counts = torch.empty((3, segs, blocks), dtype=torch.int32, device=device)
    fill = torch.zeros(segs, dtype=torch.int32, device=device)
    keys = torch.empty((segs, max(cap, 1)), dtype=torch.int64, device=device)
    if n:
        with launch_guard():
            _bracket_kernel[(blocks,)](base, rows, bounds, counts, fill, keys, stride, n, cap, N=len(experts),
                                       R=segs // len(experts), BLOCK=BRACKET_BLOCK, num_warps=NUM_WARPS,
                                       enable_fp_fusion=False)
    return counts, fill, keys, BRACKET_BLOCK
