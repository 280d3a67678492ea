"""The torch backend: the CPU merge path, and the reference the Triton kernels are tested against.

Every function follows docs/architecture.md to the operation: float32 math, one IEEE operation per
torch call (no `alpha=`, `addcmul` or `lerp`, which may fuse a multiply and an add), sums left to
right in expert order. That is what makes this backend, the Triton kernels and every chunking give
the same bits.

Inputs are 1-D chunks of one tensor (any float dtype; all inputs of a call share it); `start` is the
global flat index of element 0 of the chunk, so index cuts and DARE's random stream do not depend
on how a tensor is chunked. Works on any torch device (the GPU path uses Triton by default).

On CPU, merge_chunk, the radix select's histograms and DARE's statistics hand CPU chunks to the compiled
loops of cpu_fused.py, which give these functions' bytes (the `*_torch` functions here, which they are
tested and checked against), and fall back to the torch operations for anything those do not take.
"""

from __future__ import annotations

import numpy as np
import torch

from fusemerge.kernels import cpu_fused, fixed_dots
from fusemerge.kernels.dare_masks import KeepMasks
from fusemerge.kernels.della import della_keep
from fusemerge.kernels.params import EMPTY_C, EMPTY_T, ChunkParams
from fusemerge.kernels.philox import dare_keep_run

F32 = torch.float32
HI_BINS = 1 << 15  # bits(|d|) >> 16: the sign bit is clear, so 15 significant bits remain
LO_BINS = 1 << 16
BRACKET_BLOCK = 1 << 16  # elements per block of bracket_pass's counts (any size gives the same cuts)
# select.top_cuts keeps the radix select on this backend: on CPU the bracket select's torch ops took 0.293 s
# where the radix select took 0.057 s (4 experts of 2^22 bf16 values, one thread, Xeon 2 cores, 2026-12-01:
# `python bench/select_cpu.py`).
ONE_PASS_SELECT = False


def _scalar(x: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor: torch then multiplies in float32 exactly as a kernel would. Made by a fill on the
    device (torch.tensor(x, device="cuda") copies from the host and waits for the stream)."""
    with np.errstate(over="ignore"):  # float32(x) rounded on the host, an infinity where it overflows
        x = float(np.float32(x))  # (torch.full refuses to overflow)
    return torch.full((), x, dtype=F32, device=device)


def delta(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """d = float32(expert) - float32(base)."""
    return expert.to(F32) - base.to(F32)


def abs_bits(d: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |d|: non-negative, and ordered like the magnitudes."""
    return d.abs().view(torch.int32)


def in_top(a: torch.Tensor, start: int, t: int, c: int) -> torch.Tensor:
    """Entries of the top set described by threshold bits `t` and index cut `c`, as a bool tensor.

    in_top = (a > t) | ((a == t) & (j < c)), j the global index; the chunk covers [start, start + n).
    """
    return top_mask(a, start, t, c) != 0


def top_mask(a: torch.Tensor, start: int, t: int, c: int) -> torch.Tensor:
    """in_top as an int32 mask: -1 (all bits set) inside the set, 0 outside.

    Integer arithmetic instead of comparisons and torch.where, which are several times slower on CPU:
    for non-negative int32 a and t, (t - a) >> 31 is -1 exactly when a > t.
    """
    cut = min(max(c - start, 0), a.numel())
    if t >= EMPTY_T and cut == 0:  # nothing is above EMPTY_T, nor at it before the cut: the empty set here
        return torch.zeros_like(a)
    mask = torch.empty_like(a)
    torch.sub(t - 1, a[:cut], out=mask[:cut])  # ties before the cut are in: a >= t
    torch.sub(t, a[cut:], out=mask[cut:])  # after it only a > t
    return mask.bitwise_right_shift_(31)


def keep_mask(d: torch.Tensor, i: int, start: int, p: ChunkParams, masks: KeepMasks | None = None,
              keep: torch.Tensor | None = None) -> torch.Tensor | None:
    """The sparsifier's keep mask for expert `i` on this chunk as int32 -1/0 (None: keep everything).

    DARE: `keep` is the chunk's drawn mask (bool), else `masks` may hold it from the statistics pass, else it
    is drawn. DELLA: `keep`, else drawn from the chunk's ranks (kernels/della.py)."""
    if p.sparsifier == "none":
        return None
    if p.sparsifier == "dare":
        keep = dare_keep(d, i, start, p, masks) if keep is None else keep
        return keep.to(torch.int32).neg_()
    if p.sparsifier == "della":
        keep = della_keep_of(d, i, start, p, masks) if keep is None else keep
        return keep.to(torch.int32).neg_()
    a = abs_bits(d)
    keep = top_mask(a, start, p.t_keep[i], p.c_keep[i])
    if p.sparsifier == "breadcrumbs" and (p.t_drop[i], p.c_drop[i]) != (EMPTY_T, EMPTY_C):  # else none dropped
        keep.bitwise_and_(top_mask(a, start, p.t_drop[i], p.c_drop[i]).bitwise_not_())
    return keep


def dare_keep(d: torch.Tensor, i: int, start: int, p: ChunkParams, masks: KeepMasks | None) -> torch.Tensor:
    """DARE's keep mask (bool) of expert `i` on the chunk `d` covers: stored by the statistics pass, or drawn."""
    if masks is not None and d.device.type == "cpu":
        return masks.draw(p.keys[i], start, d.numel(), p.density[i])
    return dare_keep_run(p.keys[i], start, d.numel(), p.density[i], d.device)


def della_keep_of(d: torch.Tensor, i: int, start: int, p: ChunkParams, masks: KeepMasks | None = None
                  ) -> torch.Tensor:
    """DELLA's keep mask (bool) of expert `i` on the delta chunk `d` (whole rank units, kernels/della.py): the
    one the statistics pass kept in `masks`, else made."""
    def make() -> torch.Tensor:
        return della_keep(d, start, p.keys[i], p.density[i], p.epsilon[i], p.ranks)

    if masks is not None and d.device.type == "cpu" and p.density[i] < 1.0:
        return masks.draw(p.keys[i], start, d.numel(), p.density[i], make=make)
    return make()


def merge_chunk(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    start: int,
    params: ChunkParams,
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    masks: KeepMasks | None = None,
) -> torch.Tensor:
    """Merge one chunk: `experts[i]` and `base` are 1-D chunks of the same elements of one tensor.

    `out` (optional, `out_dtype`, n elements) receives the result, as in the Triton backend.

    Returns the merged chunk in `out_dtype`. For `linear`, `experts` are the averaged models and
    `base` is ignored. `nonfinite` (optional, int64 [N + 1]): entry i += the number of NaN / Inf values
    in expert i's chunk, entry N in the base's. `masks` (DARE, CPU): keep masks the statistics pass
    stored (l1_fixed), used instead of drawing them again.

    >>> b = torch.zeros(4); e = [torch.ones(4), -torch.ones(4) * 3]
    >>> merge_chunk(b, e, 0, ChunkParams("none", "none", False, (1.0, 1.0)), torch.float32)
    tensor([-2., -2., -2., -2.])
    """
    result = _merge(base, experts, start, params, out_dtype, nonfinite, masks)
    return result if out is None else out.copy_(result)


def _merge(base, experts, start, params, out_dtype, nonfinite, masks) -> torch.Tensor:
    p = params
    if len(experts) != p.n:
        raise ValueError(f"{len(experts)} expert chunks but {p.n} weights")
    if base is None and not p.linear:
        raise ValueError("this method needs a base model chunk")
    if p.nearswap is not None:  # the torch backend: torch operations (the Triton backend: kernels/triton_nearswap.py)
        return nearswap_torch(base, experts[0], p.nearswap, out_dtype, nonfinite)
    if p.sparsifier == "sce":  # torch operations on every backend (kernels/sce.py)
        from fusemerge.kernels.sce import merge_sce

        _count_all(nonfinite, base, experts, p)
        return merge_sce(base, experts, start, p, out_dtype)
    if p.nuslerp_cols is not None:  # nuslerp per column: torch operations (kernels/nuslerp.py)
        from fusemerge.kernels import nuslerp

        _count_all(nonfinite, base, experts, p)
        return nuslerp.merge_columns(None if p.linear else base, experts, *p.nuslerp_cols, out_dtype)
    if p.filter_rows is not None:  # model_stock or nuslerp per row: torch operations
        _count_all(nonfinite, base, experts, p)
        if p.nuslerp_t is not None:
            from fusemerge.kernels import nuslerp

            return nuslerp.merge_rows(None if p.linear else base, experts, p.filter_rows, p.nuslerp_t, out_dtype)
        from fusemerge.kernels.model_stock import merge_rows

        return merge_rows(experts, p.filter_rows, out_dtype)
    if p.sparsifier == "ram":  # likewise (kernels/ram.py)
        from fusemerge.kernels.ram import merge_ram

        _count_all(nonfinite, base, experts, p)
        return merge_ram(base, experts, p, out_dtype)
    keeps = None
    if experts and experts[0].device.type == "cpu" and cpu_fused.available():  # the same bits, in one pass
        if p.sparsifier == "dare":
            keeps = [dare_keep(x, i, start, p, masks) for i, x in enumerate(experts)]
        elif p.sparsifier == "della":
            keeps = [della_keep_of(delta(base, x), i, start, p, masks) for i, x in enumerate(experts)]
        fused = cpu_fused.merge(base, experts, start, p, out_dtype, nonfinite, keeps)
        if fused is not None:
            return fused
    return merge_torch(base, experts, start, p, out_dtype, nonfinite=nonfinite, masks=masks, keeps=keeps)


def merge_torch(base: torch.Tensor | None, experts: list[torch.Tensor], start: int, p: ChunkParams,
                out_dtype: torch.dtype, *, nonfinite: torch.Tensor | None = None, masks: KeepMasks | None = None,
                keeps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """merge_chunk in torch operations, one IEEE operation per call (the reference cpu_fused is checked
    against). `keeps`: DARE's or DELLA's keep masks (bool, one per expert) already drawn for this chunk."""
    device = experts[0].device
    _count_all(nonfinite, base, experts, p)
    if p.linear:
        return _linear(experts, p, out_dtype)
    base32 = base.to(F32)
    scales = p.scales()
    products = []
    for i, x in enumerate(experts):
        d = x.to(F32) - base32
        keep = keep_mask(d, i, start, p, masks, keeps[i] if keeps is not None else None)
        if scales[i] != 1.0:
            d.mul_(_scalar(scales[i], device))
        if keep is not None:  # where(keep, d, +0.0), by masking the bits
            d.view(torch.int32).bitwise_and_(keep)
        if p.weights[i] != 1.0:
            d.mul_(_scalar(p.weights[i], device))
        products.append(d)

    if p.consensus == "sign":
        num, den = _sign_consensus(products, p, device)
    else:
        num = products[0]
        for q in products[1:]:
            num.add_(q)
        den = _scalar(p.weight_sum(), device) if p.normalize else None
    if den is not None:
        num.div_(den)
    if p.lam != 1.0:
        num.mul_(_scalar(p.lam, device))
    return _rounded(num.add_(base32), out_dtype)


# The one NaN a merge writes, per output dtype (as int bits): the positive quiet NaN the Triton kernels store
# too. torch's conversions keep a NaN's sign and payload (x86's default NaN is negative) or, float32 ->
# bfloat16 on CPU, give 0xFFFF; a GPU's give other bits: without this, --allow-nonfinite merges differed by
# device in their NaN bytes.
CANONICAL_NAN = {torch.float32: (torch.int32, 0x7FC00000), torch.float16: (torch.int16, 0x7E00),
                 torch.bfloat16: (torch.int16, 0x7FC0)}


def _rounded(y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """float32 `y` rounded once to `out_dtype` (torch's conversions round to nearest even), NaN as CANONICAL_NAN."""
    out = y.to(out_dtype)
    if out_dtype not in CANONICAL_NAN:
        return out
    # On CPU, first a test: a sum is NaN iff y holds a NaN (or both infinities), 10 us per 2^18 entries, where
    # isnan(y).any() took 280 us and made a CPU linear merge 12% slower (one torch thread, the 2-core Xeon VM).
    # On a GPU no test: reading it on the host would wait for the device once per chunk.
    if y.device.type == "cpu" and not bool(torch.isnan(y.sum())):
        return out
    int_dtype, bits = CANONICAL_NAN[out_dtype]
    out.view(int_dtype).masked_fill_(torch.isnan(y), bits)
    return out


def _count_all(nonfinite: torch.Tensor | None, base: torch.Tensor | None, experts: list[torch.Tensor],
               p: ChunkParams) -> None:
    """The chunk's NaN / Inf counts into `nonfinite` (if given): expert i's at slot i, the base's at slot N."""
    if nonfinite is not None:
        for i, x in enumerate(experts):
            _count_nonfinite_into(nonfinite, i, x)
        if base is not None and not p.linear:
            _count_nonfinite_into(nonfinite, p.n, base)


def _count_nonfinite_into(nonfinite: torch.Tensor, slot: int, x: torch.Tensor) -> None:
    """nonfinite[slot] += the number of NaN / Inf entries of x. A finite float32 sum proves every entry
    finite, so a clean chunk costs one vectorized sum; the exact count runs only when the sum is not."""
    if x.is_floating_point() and not torch.isfinite(x.sum(dtype=F32)):
        nonfinite[slot] += int((~torch.isfinite(x)).sum())


def _sign_consensus(
    products: list[torch.Tensor], p: ChunkParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES election and disjoint mean, without comparisons or torch.where (slow on CPU).

    g = +1 where S = p_0 + p_1 + ... >= 0 (S + 0.0 turns -0 into +0), else -1.
    c_i = max(g * p_i, 0) is |p_i| where p_i agrees with g and +0 or -0 elsewhere, so
    num = g * (c_0 + c_1 + ...) + 0.0 is the sum of the agreeing p_i from +0.0, bit for bit (negation is
    exact and adding a zero changes nothing but the sign of a zero sum, which + 0.0 makes +0), and
    den = sign(c_0) * w_0 + sign(c_1) * w_1 + ... is the sum of their weights (a zero sum becomes 1).
    """
    s = products[0].clone()
    for q in products[1:]:
        s.add_(q)
    g = torch.copysign(_scalar(1.0, device), s.add_(0.0))
    nan = bool(torch.isnan(s.sum()))  # a NaN input: the slow path below keeps the contract exactly
    if nan:
        g[torch.isnan(s)] = -1.0  # NaN >= 0 is false: the election gives -1
    num = den = None
    for i, q in enumerate(products):
        c = q.mul_(g).clamp_min_(0.0)
        if nan:  # a NaN p_i agrees with neither sign
            torch.nan_to_num_(c, nan=0.0, posinf=float("inf"))
        if p.normalize:
            agree = c.sign()
            if p.weights[i] != 1.0:
                agree.mul_(_scalar(p.weights[i], device))
            den = agree if den is None else den.add_(agree)
        num = c if num is None else num.add_(c)
    num.mul_(g).add_(0.0)
    if den is not None:
        smallest = p.smallest_weight()
        if smallest > 0:  # den is 0 or at least the smallest weight; where it is 0, num is +0 too
            den.clamp_min_(smallest)
        else:
            den.masked_fill_(den == 0, 1.0)
    return num, den


def _linear(models: list[torch.Tensor], p: ChunkParams, out_dtype: torch.dtype) -> torch.Tensor:
    """sum w_i theta_i (left to right), divided by sum w_i when normalize."""
    device = models[0].device
    num = None
    for i, x in enumerate(models):
        term = x.to(F32, copy=True)
        if p.weights[i] != 1.0:
            term.mul_(_scalar(p.weights[i], device))
        num = term if num is None else num.add_(term)
    if p.normalize:
        num.div_(_scalar(p.weight_sum(), device))
    return _rounded(num, out_dtype)


# NEARSWAP_MIN: mergekit's clamp of |a - b| (merge_methods/nearswap.py: `absdiff.clamp(min=1e-6)`), as float32.
NEARSWAP_MIN = float(np.float32(1e-6))


def nearswap_torch(base: torch.Tensor, other: torch.Tensor, t: float, out_dtype: torch.dtype,
                   nonfinite: torch.Tensor | None = None) -> torch.Tensor:
    """nearswap of one chunk: `w = clamp(t / max(|a - b|, 1e-6), 0, 1)`, then `w b + (1 - w) a`, in float32
    with mergekit's operations: its `t / x` is torch's `x.reciprocal() * t` (two roundings, which a true
    division would not give), `1 - w`, the two products and their sum, then one rounding to `out_dtype`.
    Where a and b are within t of each other the other model's entry is taken (w = 1); far apart, the base's
    stays, and a NaN in either gives NaN. `nonfinite`: slot 0 the other model's NaN / Inf count, slot 1 the
    base's, as merge_torch counts them."""
    if nonfinite is not None:
        _count_nonfinite_into(nonfinite, 0, other)
        _count_nonfinite_into(nonfinite, 1, base)
    device = other.device
    a, b = base.to(F32), other.to(F32)
    w = (a - b).abs_().clamp_min_(NEARSWAP_MIN).reciprocal_().mul_(_scalar(t, device)).clamp_(0.0, 1.0)
    keep = torch.sub(_scalar(1.0, device), w).mul_(a)
    return _rounded(w.mul_(b).add_(keep), out_dtype)


# ---------------------------------------------------------------------------------------------
# Statistics on one chunk of one expert. Counts and integer sums: exact on every backend.
# ---------------------------------------------------------------------------------------------


def _abs_delta_bits(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """bits(|d|) as int32, made in place in the fresh delta tensor (the statistics do not keep d): a second
    full-size temporary per call cost more on CPU than the subtraction's own data movement."""
    return delta(base, expert).abs_().view(torch.int32)


def abs_hist_hi(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """int64[32768]: histogram of bits(|d|) >> 16."""
    fused = cpu_fused.hist_hi(base, expert) if base.device.type == "cpu" else None
    return fused if fused is not None else hist_hi_torch(base, expert)


def hist_hi_torch(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """abs_hist_hi in torch operations."""
    a = _abs_delta_bits(base, expert).bitwise_right_shift_(16)
    return torch.bincount(a.view(-1), minlength=HI_BINS).to(torch.int64)


def abs_hist_collect(base: torch.Tensor, expert: torch.Tensor, hist: np.ndarray, windows: tuple[int, int, int, int],
                     out: np.ndarray) -> int | None:
    """abs_hist_hi added into `hist` (int64[32768]), and bits(|d|) of the entries whose high half lies in
    [windows[0], windows[1]] or [windows[2], windows[3]], in index order, into `out` (int32) as far as it holds
    them; returns how many there are. None for chunks not on the CPU (the caller runs abs_hist_hi instead)."""
    if base.device.type != "cpu":
        return None
    found = cpu_fused.hist_collect(base, expert, hist, windows, out)
    return found if found is not None else hist_collect_torch(base, expert, hist, windows, out)


def hist_collect_torch(base: torch.Tensor, expert: torch.Tensor, hist: np.ndarray,
                       windows: tuple[int, int, int, int], out: np.ndarray) -> int:
    """abs_hist_collect in torch and numpy operations (CPU)."""
    x = _abs_delta_bits(base, expert).view(-1).numpy()
    hi = x >> 16
    hist += np.bincount(hi, minlength=HI_BINS)
    (l0, h0, l1, h1) = windows
    sel = np.compress(((hi >= l0) & (hi <= h0)) | ((hi >= l1) & (hi <= h1)), x)
    k = min(sel.size, out.size)
    out[:k] = sel[:k]
    return int(sel.size)


def abs_hist_lo(base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """int64[65536]: histogram of bits(|d|) & 0xFFFF over the entries whose high half is `hi_bin`."""
    return torch.bincount(abs_select_lo(base, expert, hi_bin), minlength=LO_BINS).to(torch.int64)


def abs_select_lo(base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """The low 16 bits of bits(|d|), in index order, of the entries whose high half is `hi_bin` (int32)."""
    fused = cpu_fused.select_lo(base, expert, hi_bin) if base.device.type == "cpu" else None
    return fused if fused is not None else select_lo_torch(base, expert, hi_bin)


def select_lo_torch(base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """abs_select_lo in torch and numpy operations."""
    a = _abs_delta_bits(base, expert)
    if a.device.type == "cpu":  # numpy's compare and compress run several times faster than torch's here
        x = a.numpy()
        # np.compress, not x[mask]: boolean indexing took 4.5x longer (2^18 entries, 22% selected)
        sel = np.compress((x >> 16) == hi_bin, x)
        sel &= 0xFFFF
        return torch.from_numpy(sel)
    return a[(a >> 16) == hi_bin] & 0xFFFF


def _equal(base: torch.Tensor, expert: torch.Tensor, t: int):
    a = _abs_delta_bits(base, expert)
    return a.numpy() == t if a.device.type == "cpu" else a == t


def count_equal(base: torch.Tensor, expert: torch.Tensor, t: int) -> int:
    """How many entries have bits(|d|) == t (on CPU the compiled loop's bits, which the histograms counted: the
    torch operations' bits of a NaN delta can differ, and the tie cut then missed its entry)."""
    fused = cpu_fused.find_equal(base, expert, t, 0) if base.device.type == "cpu" else None
    return fused if fused is not None else int(_equal(base, expert, t).sum())


def nth_equal(base: torch.Tensor, expert: torch.Tensor, t: int, q: int) -> int:
    """Local index of the q-th (1-based) entry with bits(|d|) == t, or -1 if there are fewer."""
    if q >= 1 and base.device.type == "cpu" and (fused := cpu_fused.find_equal(base, expert, t, q)) is not None:
        return fused
    eq = _equal(base, expert, t)
    hits = np.flatnonzero(eq) if isinstance(eq, np.ndarray) else torch.nonzero(eq).view(-1)
    return int(hits[q - 1]) if 1 <= q <= len(hits) else -1


def tie_cuts(
    base: torch.Tensor, experts: list[torch.Tensor], counts: torch.Tensor, queries: list[tuple[int, int, int, int]],
    block: int,
) -> list[int]:
    """For each query (expert i, t, q, row): the index of the q-th entry with bits(|d_i|) == t, or -1 if there
    are fewer; `counts[row]` holds that t's count in each block of `block` elements (it picks the block)."""
    out = []
    for i, t, q, row in queries:
        cum = counts[row].to(torch.int64).cumsum(0)
        if q < 1 or cum.numel() == 0 or int(cum[-1]) < q:
            out.append(-1)
            continue
        b = int(torch.searchsorted(cum, torch.tensor([q], device=cum.device)))
        before = int(cum[b - 1]) if b else 0
        lo = b * block
        out.append(lo + nth_equal(base[lo:lo + block], experts[i][lo:lo + block], t, q - before))
    return out


def sample_abs_bits(base: torch.Tensor, experts: list[torch.Tensor], step: int, s: int) -> torch.Tensor:
    """int32 [N, s]: bits(|d_i|) at positions (k * step) mod n, k < s (select.py's sample)."""
    pos = torch.arange(s, dtype=torch.int64, device=base.device).mul_(step).remainder_(max(base.numel(), 1))
    b = base[pos].to(F32)
    return torch.stack([abs_bits(x[pos].to(F32) - b) for x in experts])


def bracket_pass(
    base: torch.Tensor, experts: list[torch.Tensor], lo: list[int], hi: list[int], cap: int,
    block: int = BRACKET_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The bracket select's pass (fusemerge.kernels.triton_select.bracket_pass), with the same results;
    its candidate keys are in index order."""
    n = base.numel()
    segs = len(lo)
    reps = segs // len(experts)
    blocks = -(-n // block)
    counts = torch.zeros((3, segs, blocks), dtype=torch.int32, device=base.device)
    fill = torch.zeros(segs, dtype=torch.int32, device=base.device)
    keys = torch.empty((segs, max(cap, 1)), dtype=torch.int64, device=base.device)
    for i, x in enumerate(experts):
        a = abs_bits(delta(base, x))
        for r in range(reps):
            s = i * reps + r
            for c, m in enumerate((a > hi[s], a == hi[s], a == lo[s])):
                padded = torch.nn.functional.pad(m.to(torch.int32), (0, blocks * block - n))
                counts[c, s] = padded.view(blocks, block).sum(1)
            j = torch.nonzero((a > lo[s]) & (a < hi[s])).view(-1)
            fill[s] = j.numel()
            j = j[:cap]
            keys[s, :j.numel()] = ((0x7FFFFFFF - a[j]).to(torch.int64) << 32) | j
    return counts, fill, keys, block


def max_abs(base: torch.Tensor | None, xs: list[torch.Tensor]) -> list[float]:
    """max |d| over the chunk for each input of `xs` (0.0 for an empty chunk; NaN where a delta is NaN); base
    None: max |x|. On CPU one compiled read of the base for all of them."""
    fused = cpu_fused.max_abs(base, list(xs)) if xs and xs[0].device.type == "cpu" else None
    return fused if fused is not None else [max_abs_torch(base, x) for x in xs]


def max_abs_torch(base: torch.Tensor | None, expert: torch.Tensor) -> float:
    """max_abs in torch operations."""
    d = delta(base, expert) if base is not None else expert.to(F32)
    return float(d.abs().max()) if d.numel() else 0.0


def gram_fixed(base: torch.Tensor | None, xs: list[torch.Tensor], shifts: dict[tuple[int, int], int]
               ) -> dict[tuple[int, int], tuple[int, int]]:
    """For every pair (i, j) of `shifts`: (sum of trunc(p), sum of trunc((p - trunc(p)) * 2^32)) over the chunk,
    p = v_i * v_j * 2^shifts[(i, j)] with v_i = float32(xs[i]) - float32(base) (base None: float32(xs[i])).
    The caller (fixed_dots.gram_sums) picks shifts that keep every |p| below 2^32, on finite vectors. On CPU one
    compiled read of the chunk for all pairs, else torch operations: the same integers. Pairs must have
    0 <= i <= j < len(xs), as the Triton backend requires."""
    if any(not 0 <= i <= j < len(xs) for i, j in shifts):
        raise ValueError(f"pairs {sorted(shifts)} outside 0 <= i <= j < {len(xs)}")
    found = cpu_fused.gram_fixed(base, list(xs), shifts) if xs[0].device.type == "cpu" else None
    return found if found is not None else fixed_dots.gram_fixed_torch(base, list(xs), shifts)


def count_nonfinite(base: torch.Tensor, expert: torch.Tensor) -> int:
    """How many entries have a non-finite d (inf or NaN): bits(|d|) >= 0x7F800000."""
    return int((abs_bits(delta(base, expert)) >= 0x7F800000).sum())


def l1_fixed(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    shifts: list[int | None],
    keeps: list[tuple[int, float, int] | None] | None = None,
    *,
    masks: KeepMasks | None = None,
) -> list[tuple[int, int]]:
    """Fixed-point L1 sums per expert: (sum trunc(|d_i| * 2^shifts[i]), the same over DARE-kept entries);
    shifts[i] None: (0, 0), expert i skipped (no mask drawn).

    `keeps[i]` = (key, density, start) selects expert i's kept entries as in merge_chunk; None: all kept.
    `masks` (CPU): where the drawn keep masks are stored for the merge pass, when they fit. On CPU one
    compiled read of the base for all experts."""
    if len(shifts) != len(xs) or (keeps is not None and len(keeps) != len(xs)):
        raise ValueError(f"{len(xs)} experts, {len(shifts)} shifts and {len(keeps or [])} keeps")
    kept_masks: list[torch.Tensor | None] = [None] * len(xs)
    for i, keep in enumerate(keeps or []):
        if shifts[i] is None or keep is None:
            continue
        key, density, start = keep
        if masks is not None and base.device.type == "cpu":
            kept_masks[i] = masks.draw(key, start, base.numel(), density, keep=True)
        else:
            kept_masks[i] = dare_keep_run(key, start, base.numel(), density, base.device)
    return l1_fixed_masks(base, xs, shifts, kept_masks)


def l1_fixed_masks(base: torch.Tensor, xs: list[torch.Tensor], shifts: list[int | None],
                   kept_masks: list[torch.Tensor | None]) -> list[tuple[int, int]]:
    """l1_fixed's sums with each expert's keep mask given (bool; None: every entry kept), on any torch device;
    on CPU one compiled read of the base for all experts."""
    fused = cpu_fused.l1_fixed(base, list(xs), list(shifts), kept_masks) if base.device.type == "cpu" else None
    return fused if fused is not None else [l1_fixed_torch(base, x, h, k) if h is not None else (0, 0)
                                            for x, h, k in zip(xs, shifts, kept_masks, strict=True)]


def l1_fixed_torch(base: torch.Tensor, expert: torch.Tensor, shift: int, kept_mask: torch.Tensor | None
                   ) -> tuple[int, int]:
    """l1_fixed in torch operations, `kept_mask` the drawn keep mask (bool; None: every entry)."""
    d = delta(base, expert)  # a fresh tensor: |d| * 2^shift in place (0.76 -> 0.65 ms per 2^18 entries)
    q = d.abs_().mul_(_scalar(2.0**shift, d.device)).to(torch.int64)
    total = int(q.sum())
    if kept_mask is None:
        return total, total
    return total, int(q.mul_(kept_mask).sum())


def l1_fixed_top(base: torch.Tensor, expert: torch.Tensor, shift: int, start: int, cut: tuple[int, int, int, int]
                 ) -> tuple[int, int]:
    """Fixed-point L1 sums: (sum trunc(|d| * 2^shift), the same over the entries a magnitude trim keeps: in
    in_top(t_keep, c_keep) and, for breadcrumbs, not in in_top(t_drop, c_drop); `cut` = (t_keep, c_keep,
    t_drop, c_drop), the chunk starting at global index `start`). Any torch device (the Triton backend's too)."""
    d = delta(base, expert)
    a = abs_bits(d)
    keep = top_mask(a, start, cut[0], cut[1])
    if (cut[2], cut[3]) != (EMPTY_T, EMPTY_C):
        keep.bitwise_and_(top_mask(a, start, cut[2], cut[3]).bitwise_not_())
    q = d.abs_().mul_(_scalar(2.0**shift, d.device)).to(torch.int64)
    total, kept = torch.stack([q.sum(), q.bitwise_and_(keep.to(torch.int64)).sum()]).tolist()  # one wait on a GPU
    return total, kept
