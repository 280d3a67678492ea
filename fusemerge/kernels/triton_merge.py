"""The fused merge kernel: one pass over a chunk of the base and the N experts, one write of the result.

Every method is one launch of one kernel, `_merge_kernel`; its variants (sparsifier, consensus,
linear, normalize) are `tl.constexpr` flags. The math is docs/architecture.md's per-chunk contract,
operation for operation, so the result is bit-identical to `fusemerge.kernels.reference.merge_chunk`:

- inputs widen to float32 exactly (bf16 by an integer shift, see `_load_f32`);
- every sum runs left to right in expert order; no multiply is fused into an add: the launch passes
  `enable_fp_fusion=False`, which makes Triton compile LLVM without fp contraction and run ptxas with
  `--fmad=false` (without it, `S + w * dh` and `base + lam * q` become FMAs on the GPU and the elected
  sign and the last bit of the output change). Checked offline on PTX for sm_90: every variant has
  0 `fma.rn.f32` with the flag, 16 to 136 without it (tests/kernels: test_compiled_kernel_has_no_fma_...);
- the division is `tl.math.div_rn` (IEEE `div.rn.f32`): Triton's `/` is `div.full.f32` on NVIDIA
  (up to 2 ulp off, triton-lang/triton#10661);
- the result is rounded once, to nearest even, at the store (bf16 by integer ops, see `_store_rounded`).

Bytes moved per output element: (N + 1) reads of the input dtype + 1 write, for every method (sign
consensus keeps the two candidate disjoint sums in registers instead of re-reading the agreeing experts).

Non-finite inputs are counted in the same pass (`nonfinite=`): an int64 counter per expert and one for the
base, updated by an atomic only in blocks that hold a NaN or an Inf.

Input layout: the experts are the rows of one [N, row_stride] buffer (one pointer + one row stride),
not N separate pointer arguments. Why:
- any N (up to MAX_EXPERTS) with one kernel signature and one loop, instead of a fixed maximum of
  pointer arguments and N copies of the load code, or a device table of pointers that must be
  rebuilt (a host-to-device copy) for every chunk;
- the streaming executor reads each expert's chunk into its own row of one preallocated staging
  buffer, so the layout costs no copy: `merge_chunk` detects that the chunks it is given are rows of
  one buffer (equal spacing in one storage) and passes them as they are. Only separately allocated
  chunks are stacked (one extra copy of N chunks; correct, but the executor should use rows);
- rows whose stride is a multiple of 16 elements keep every row 16-byte aligned, so Triton emits
  vectorized loads for all of them (choose a staging chunk that is a multiple of 64 elements).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fusemerge.kernels.layout import expert_rows
from fusemerge.kernels.params import MAX_EXPERTS, ChunkParams

# Elements per program: 8 per thread at 4 warps, i.e. one 16-byte load per thread per bf16 input (when the
# chunk length and row stride are multiples of 16, which Triton specializes on). Compiled offline for sm_90
# (Triton 3.9): 32-40 registers for linear / task arithmetic, 63-96 for ties / dare_ties / breadcrumbs_ties
# at N = 8, 127 for dare_ties at N = 40, no spills. An H200 sweep (2026-12-04, bench/RESULTS.md: 512, 1024 and
# 2048 at 4 warps, 2048 at 8) found 1024 / 4 fastest for ties and dare_ties. The block size changes no result.
BLOCK = 1024
NUM_WARPS = 4
# Two launch choices bench/kernels.py compares on a GPU (--unroll, --late-count); any value gives the same bits
# (tests/kernels). An H200 sweep (2026-12-04) kept 1 / False for every variant but the plain sum (below): the
# offline model's prediction for ties (75-90% of copy with both) was wrong, 35% -> 32%. Offline model (sm_90,
# Triton 3.9, ties N = 8, bf16): only ~24 warps of 80 registers fit an SM, each with one 16-byte load in
# flight per thread, ~12 KB per SM where ~3 TB/s x ~700 ns of latency needs ~16 KB: ties ran at 63-68% of
# copy. UNROLL = 2 issues two experts' loads before either is used; LATE_COUNT replaces the per-input NaN /
# Inf reduction (a barrier after every expert's load, which also keeps the loads apart: what a merge runs,
# nonfinite= given) by one per block. Both: 106 registers, 16 warps, two loads each, no barrier in the loop
# (`python bench/kernel_resources.py`).
UNROLL = 1
LATE_COUNT = False
# The plain weighted sum of deltas (task arithmetic: no sparsifier, no sign consensus, not linear) takes both.
# Measured side by side on an H200 (2026-12-04, bf16, N = 8, 2^26 elements, gpu_checks.sh's sweep, bench/RESULTS.md):
# task arithmetic 0.414 ms (77% of copy) -> 0.335 ms (95%) with UNROLL = 2 and LATE_COUNT; in the same run TIES went
# 0.915 -> 0.999 ms and DARE-TIES 1.990 -> 2.009 ms with them, so the other variants keep UNROLL / LATE_COUNT.
SUM_UNROLL = 2
SUM_LATE_COUNT = True
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Sparsifier codes, as tl.constexpr flag values.
SPARSIFIERS = {"none": 0, "magnitude": 1, "dare": 2, "breadcrumbs": 3}
_NONE = tl.constexpr(0)
_MAGNITUDE = tl.constexpr(1)
_DARE = tl.constexpr(2)
_BREADCRUMBS = tl.constexpr(3)


@triton.jit
def _load_f32(ptrs, mask):
    """Load bf16 / fp16 / fp32 and widen to float32 exactly.

    bf16 widens by `bits << 16`: the interpreter's bf16 -> fp32 cast mangles subnormals, the shift is
    exact everywhere and costs the GPU the same as its own conversion.
    """
    raw = tl.load(ptrs, mask=mask, other=0)
    if ptrs.dtype.element_ty == tl.bfloat16:
        x = (raw.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x


@triton.jit
def _store_rounded(ptrs, y, mask):
    """Round float32 `y` once, to nearest even, to the pointer's dtype and store it.

    bf16 rounds with integer ops, (bits + 0x7FFF + lsb) >> 16: the interpreter's fp32 -> bf16 cast
    truncates. No overflow: for finite and infinite y the int32 sum stays in range. fp16 uses the cast
    (cvt.rn.f16.f32 on the GPU, numpy's correctly rounded cast in the interpreter). A NaN is stored as the
    positive quiet NaN of the dtype (0x7FC0, 0x7E00, 0x7FC00000), as the torch backend stores it
    (reference.CANONICAL_NAN): the GPU's cvt and the interpreter's numpy give other NaN bits.
    """
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        r = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptrs, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif ptrs.dtype.element_ty == tl.float16:
        h = y.to(tl.float16).to(tl.int16, bitcast=True)
        h = tl.where(y != y, 0x7E00, h).to(tl.int16)
        tl.store(ptrs, h.to(tl.float16, bitcast=True), mask=mask)
    else:
        bits = tl.where(y != y, 0x7FC00000, y.to(tl.int32, bitcast=True))
        tl.store(ptrs, bits.to(tl.float32, bitcast=True), mask=mask)


_EXP_ONES = tl.constexpr(0x7F800000)  # float32 exponent bits: all ones exactly for NaN and +-Inf


@triton.jit
def _count_input(nf_ptr, x, mask, slot):
    """nf[slot] += the number of NaN / Inf entries of x in this block (an atomic only if there are any)."""
    bad = ((x.to(tl.int32, bitcast=True) & _EXP_ONES) == _EXP_ONES) & mask
    cnt = tl.sum(bad.to(tl.int32), axis=0)
    tl.atomic_add(nf_ptr + slot, cnt.to(tl.int64), mask=cnt > 0, sem="relaxed")


@triton.jit
def _note_nonfinite(seen, x, nf_ptr, mask, slot, COUNT: tl.constexpr, LATE_COUNT: tl.constexpr):
    """The inputs' NaN check (METHODS.md) for input `slot`'s loaded values x; returns `seen`.

    Not LATE_COUNT: count x's NaN / Inf now (`_count_input`): a block-wide reduction, so a barrier, per input.
    LATE_COUNT: only OR into `seen` (per element: some value loaded so far was NaN / Inf); the block is
    reduced once, at its end (`_count_late`). Which is faster is bench/kernels.py's question (--late-count)."""
    if COUNT:
        if LATE_COUNT:
            seen = seen | ((x.to(tl.int32, bitcast=True) & _EXP_ONES) == _EXP_ONES)
        else:
            _count_input(nf_ptr, x, mask, slot)
    return seen


@triton.jit
def _count_late(nf_ptr, seen, x_ptr, stride, base_ptr, offs, mask, N: tl.constexpr, BASE: tl.constexpr,
                COUNT: tl.constexpr, LATE_COUNT: tl.constexpr):
    """LATE_COUNT: one reduction of `seen` per block; only a block that holds a NaN / Inf loads its inputs
    again (from L2, just read) to count them per input: experts 0..N-1, then the base (BASE) in slot N."""
    if COUNT and LATE_COUNT:
        if tl.max(seen.to(tl.int32), axis=0) != 0:
            for i in range(0, N):
                _count_input(nf_ptr, _load_f32(x_ptr + i * stride + offs, mask), mask, i)
            if BASE:
                _count_input(nf_ptr, _load_f32(base_ptr + offs, mask), mask, N)


@triton.jit
def _in_top(a, j, t, c, lo, local, BLOCK: tl.constexpr):
    """in_top(a, j, t, c) = (a > t) | ((a == t) & (j < c)): the top set with index-order ties.

    With j = lo + local (lo the block's first global index), j < c is local < clamp(c - lo, 0, BLOCK): one
    int32 compare per element instead of int64 arithmetic."""
    cut = tl.minimum(tl.maximum(c - lo, 0), BLOCK).to(tl.int32)
    return (a > t) | ((a == t) & (local < cut))


@triton.jit
def _weight_sum(f_ptr, N: tl.constexpr):
    """den = w_0 + w_1 + ... in float32, left to right (as 0.0 + w_0 + ...: same bits); 0 -> 1."""
    den = tl.load(f_ptr) + 0.0
    for i in tl.static_range(1, N):
        den = den + tl.load(f_ptr + i)
    return tl.where(den == 0.0, 1.0, den)


@triton.jit
def _product(x_ptrs, b, mask, j, lo, local, f_ptr, i_ptr, i, N: tl.constexpr, SPARSIFIER: tl.constexpr, seen,
             nf_ptr, COUNT: tl.constexpr, LATE_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """(p_i, seen): p_i = w_i * dh_i for expert i: d = x - b, dh = keep ? d * s_i : 0 (docs/architecture.md);
    x's NaN check by `_note_nonfinite`."""
    x = _load_f32(x_ptrs, mask)
    seen = _note_nonfinite(seen, x, nf_ptr, mask, i, COUNT, LATE_COUNT)
    d = x - b
    dh = d * tl.load(f_ptr + N + i)  # d * s_i, the rescale factor
    if SPARSIFIER == _DARE:
        u = tl.rand(tl.load(i_ptr + i), j)
        dh = tl.where(u < tl.load(f_ptr + 2 * N + i), dh, 0.0)
    elif SPARSIFIER != _NONE:
        a = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        keep = _in_top(a, j, tl.load(i_ptr + N + i).to(tl.int32), tl.load(i_ptr + 2 * N + i), lo, local, BLOCK)
        if SPARSIFIER == _BREADCRUMBS:
            top = _in_top(a, j, tl.load(i_ptr + 3 * N + i).to(tl.int32), tl.load(i_ptr + 4 * N + i), lo, local,
                          BLOCK)
            keep = keep & ~top
        dh = tl.where(keep, dh, 0.0)
    return tl.load(f_ptr + i) * dh, seen


@triton.jit(do_not_specialize=["start"])
def _merge_kernel(
    out_ptr,  # [n] out dtype
    base_ptr,  # [n] base chunk (unused for LINEAR)
    x_ptr,  # expert i, element k at x_ptr + i * row_stride + k
    f_ptr,  # float32 [3N + 1]: weights, scales, densities, lambda
    i_ptr,  # int64 [5N]: keys, t_keep, c_keep, t_drop, c_drop
    nf_ptr,  # int64 [N + 1] (COUNT only): non-finite entries seen, experts 0..N-1 then the base
    row_stride,
    n,
    start,  # global flat index of element 0 (DARE offsets and index cuts are global)
    N: tl.constexpr,
    SPARSIFIER: tl.constexpr,
    SIGN: tl.constexpr,
    LINEAR: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    LATE_COUNT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # int64 before any i * stride: rows of a 2^26-element staging buffer pass 2^31 elements at i = 32.
    # tl.cast, not .to(): a stride equal to 1 arrives as a constexpr (Triton specializes on it).
    stride = tl.cast(row_stride, tl.int64)
    # The expert loops are scf.for loops, not unrolled: unrolled, the compiler hoists all N experts' loads
    # and Philox states and spills (sm_90, 1024 elements x 4 warps: dare_ties N=8 used 255 registers + 168 B
    # of stack, N=16 3.3 KB). Expert 0 is peeled so sums start from p_0 exactly as the contract writes them.

    if LINEAR:
        # num = w_0 * theta_0 + w_1 * theta_1 + ... (left to right), out = num / sum(w) if normalize
        x = _load_f32(x_ptr + offs, mask)
        seen = _note_nonfinite(tl.zeros([BLOCK], dtype=tl.int1), x, nf_ptr, mask, 0, COUNT, LATE_COUNT)
        num = x * tl.load(f_ptr)
        for i in range(1, N):
            x = _load_f32(x_ptr + i * stride + offs, mask)
            seen = _note_nonfinite(seen, x, nf_ptr, mask, i, COUNT, LATE_COUNT)
            num = num + x * tl.load(f_ptr + i)
        if NORMALIZE:
            num = tl.math.div_rn(num, _weight_sum(f_ptr, N))
        _store_rounded(out_ptr + offs, num, mask)
        _count_late(nf_ptr, seen, x_ptr, stride, base_ptr, offs, mask, N, False, COUNT, LATE_COUNT)
    else:
        j = start + offs
        lo = start + pid * BLOCK  # global index of the block's first element (int64)
        local = tl.arange(0, BLOCK)
        b = _load_f32(base_ptr + offs, mask)
        seen = _note_nonfinite(tl.zeros([BLOCK], dtype=tl.int1), b, nf_ptr, mask, N, COUNT, LATE_COUNT)
        # consensus none: acc = num. sign: acc = the election sum S = p_0 + p_1 + ..., and alongside it the
        # two candidate disjoint sums, pos = sum of the p_i > 0 and neg = sum of the p_i < 0 (and their
        # weights), each accumulated in expert order from +0.0 with +0.0 for every other expert. Once S
        # elects g, num = pos or neg: the same operations, in the same order, as summing
        # where(agree_i, p_i, 0.0) over i after the election, so one pass over the inputs suffices.
        # max(p, 0) / min(p, 0) stand for where(p > 0, p, 0) / where(p < 0, p, 0): they differ only in the sign
        # of a zero and in NaN (tl.maximum returns the other operand), and a sum that starts at +0.0 and gains
        # only same-signed terms is unchanged by adding -0.0 or +0.0.
        p, seen = _product(x_ptr + offs, b, mask, j, lo, local, f_ptr, i_ptr, 0, N, SPARSIFIER, seen, nf_ptr, COUNT,
                           LATE_COUNT, BLOCK)
        acc = p
        if SIGN:
            zero = tl.zeros([BLOCK], dtype=tl.float32)
            w = tl.load(f_ptr)
            pos = zero + tl.maximum(p, 0.0)
            neg = zero + tl.minimum(p, 0.0)
            pos_w = zero + tl.where(p > 0.0, w, 0.0)
            neg_w = zero + tl.where(p < 0.0, w, 0.0)
        for i in tl.range(1, N, loop_unroll_factor=UNROLL):
            p, seen = _product(x_ptr + i * stride + offs, b, mask, j, lo, local, f_ptr, i_ptr, i, N, SPARSIFIER,
                               seen, nf_ptr, COUNT, LATE_COUNT, BLOCK)
            acc = acc + p
            if SIGN:
                w = tl.load(f_ptr + i)
                pos = pos + tl.maximum(p, 0.0)
                neg = neg + tl.minimum(p, 0.0)
                pos_w = pos_w + tl.where(p > 0.0, w, 0.0)
                neg_w = neg_w + tl.where(p < 0.0, w, 0.0)

        if SIGN:
            # g = +1 where S >= 0 (a NaN S elects -1); p_i = 0 and NaN p_i agree with neither sign.
            elect_pos = acc >= 0.0
            num = tl.where(elect_pos, pos, neg)
            if NORMALIZE:
                den = tl.where(elect_pos, pos_w, neg_w)
                den = tl.where(den == 0.0, 1.0, den)
                num = tl.math.div_rn(num, den)
        else:
            num = acc
            if NORMALIZE:
                num = tl.math.div_rn(num, _weight_sum(f_ptr, N))
        r = tl.load(f_ptr + 3 * N) * num  # lam * (num / den), then base + that: two roundings
        _store_rounded(out_ptr + offs, b + r, mask)
        _count_late(nf_ptr, seen, x_ptr, stride, base_ptr, offs, mask, N, True, COUNT, LATE_COUNT)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Launches from several threads are serialized. Triton's interpreter is not thread-safe: each launch patches
# triton.language's globals and keeps the grid index in one global builder, so two threads launching at once
# fail ("Did you forget to add @triton.jit"), as the executor's CPU workers would. On GPUs, one pipeline
# thread per GPU compiles the same kernels at once on its first launches, which Triton 3.x does not guard
# (triton-lang/triton#5933, open: random compile failures with threads on several GPUs). A compiled launch
# holds the GIL for most of its ~10-20 us anyway, so the lock costs the threads little.
_LAUNCH_LOCK = threading.Lock()


def launch_guard() -> contextlib.AbstractContextManager:
    """Hold this around a kernel launch: one thread launches (or compiles) at a time."""
    return _LAUNCH_LOCK


def check_device(t: torch.Tensor, what: str) -> None:
    """Kernels run on CUDA (or ROCm) tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return
    hint = " (set TRITON_INTERPRET=1 to run the kernels on CPU)" if t.device.type == "cpu" else ""
    raise ValueError(f"{what} is on {t.device}: Triton kernels need a CUDA device{hint}")


def _check_chunk(t: torch.Tensor, what: str, n: int, device: torch.device) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; supported: bfloat16, float16, float32")
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected a 1-D chunk of {n} elements")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{what} is not contiguous")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the other inputs on {device}")


@functools.lru_cache(maxsize=64)
def _device_params(params: ChunkParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-expert numbers as two small device tensors, built once per tensor (ChunkParams is per tensor).

    Device tensors, not kernel scalars: the values change with every tensor, and scalars would be
    specialized on (recompiling) and would need an argument list that grows with N.
    """
    n = params.n
    zeros = (0,) * n
    empty_t = (2**31 - 1,) * n
    floats = (*params.weights, *params.scales(), *(params.density or (1.0,) * n), params.lam)
    ints = (
        *(params.keys or zeros),
        *(params.t_keep or empty_t),
        *(params.c_keep or zeros),
        *(params.t_drop or empty_t),
        *(params.c_drop or zeros),
    )
    f = torch.tensor(floats, dtype=torch.float32).to(device)
    i = torch.tensor(ints, dtype=torch.int64).to(device)
    return f, i


def _check_params(params: ChunkParams) -> None:
    n = params.n
    if not 1 <= n <= MAX_EXPERTS:
        raise ValueError(f"{n} experts; the merge kernel takes 1 to {MAX_EXPERTS}")
    if params.sparsifier not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {params.sparsifier!r}")
    if params.consensus not in ("none", "sign"):
        raise ValueError(f"unknown consensus {params.consensus!r}")
    needed = {"magnitude": ("t_keep", "c_keep"), "breadcrumbs": ("t_keep", "c_keep", "t_drop", "c_drop"),
              "dare": ("keys", "density")}.get(params.sparsifier, ())
    if params.linear:
        needed = ()
    for name in (*needed, "scale"):
        value = getattr(params, name)
        if (value or name != "scale") and len(value) != n:
            raise ValueError(f"ChunkParams.{name} has {len(value)} values for {n} experts")


def merge_chunk(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor] | torch.Tensor,
    start: int,
    params: ChunkParams,
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    masks: object = None,
) -> torch.Tensor:
    """Merge one chunk on the GPU: bit-identical to `fusemerge.kernels.reference.merge_chunk`.

    `base` and each of `experts` are 1-D contiguous chunks of the same `n` elements of one tensor
    (bfloat16, float16 or float32; experts of different dtypes are merged from float32 copies, which are
    exact, since the kernel reads one dtype for every expert; the base may differ); `start` is the
    global flat index of element 0. `experts` may also be one [N, n] tensor with contiguous rows; rows of
    one staging buffer are used without a copy (see the module docstring). For `linear`, `experts` are
    the averaged models and `base` is ignored. `out` (optional, 1-D, `out_dtype`, n elements) receives
    the result; otherwise it is allocated. `nonfinite` (optional, int64 [N + 1] on the same device): entry
    i += the number of NaN / Inf values in expert i's chunk, entry N in the base's (not for linear). `masks` is
    accepted for the torch backend's signature and not used: the kernel draws DARE's stream in registers.
    DELLA's chunks (whole rank units) and SCE's merge by the torch backend's operations on their device.

    >>> from fusemerge.kernels.params import ChunkParams
    >>> staging = torch.stack([torch.ones(4), -3 * torch.ones(4)]).cuda()  # doctest: +SKIP
    >>> merge_chunk(torch.zeros(4, device="cuda"), staging, 0,  # doctest: +SKIP
    ...             ChunkParams("none", "none", False, (1.0, 1.0)), torch.float32)
    tensor([-2., -2., -2., -2.], device='cuda:0')
    """
    # a sort per row, a variance's top set, RAM's counts, model_stock's weights per row: torch operations
    if params.sparsifier in ("della", "sce", "ram") or params.filter_rows is not None \
            or params.nuslerp_cols is not None:
        return _torch_chunk(base, experts, start, params, out_dtype, out, nonfinite)
    _check_params(params)
    rows = [experts[i] for i in range(len(experts))]
    if len(rows) != params.n:
        raise ValueError(f"{len(rows)} expert chunks but {params.n} weights")
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype {out_dtype}; supported: bfloat16, float16, float32")
    first = rows[0]
    n = first.numel()
    device = first.device
    check_device(first, "experts[0]")
    for i, e in enumerate(rows):
        _check_chunk(e, f"experts[{i}]", n, device)
    if any(e.dtype != first.dtype for e in rows):  # models saved in different dtypes: the kernel reads one
        rows = [e.float() for e in rows]
        first = rows[0]
    if not params.linear:
        if base is None:
            raise ValueError(f"{params.sparsifier}/{params.consensus} merges need a base chunk")
        _check_chunk(base, "base", n, device)
    if start < 0 or start + n > 2**63 - 1:
        raise ValueError(f"start {start} out of range")
    if out is None:
        out = torch.empty(n, dtype=out_dtype, device=device)
    else:
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}, expected {out_dtype}")
        _check_chunk(out, "out", n, device)
    if nonfinite is not None and (nonfinite.dtype != torch.int64 or nonfinite.shape != (params.n + 1,)
                                  or nonfinite.device != device):
        raise ValueError(f"nonfinite must be an int64 tensor of {params.n + 1} counters on {device}")
    if n == 0:
        return out
    if params.nearswap is not None:  # its own kernel (kernels/triton_nearswap.py): the base and one other model
        from fusemerge.kernels.triton_nearswap import nearswap_chunk

        return nearswap_chunk(base, rows[0], params.nearswap, out, nonfinite)

    x, row_stride = expert_rows(experts if isinstance(experts, torch.Tensor) else rows)
    f, i = _device_params(params, device)
    plain_sum = not params.linear and params.sparsifier == "none" and params.consensus == "none"
    unroll, late_count = (SUM_UNROLL, SUM_LATE_COUNT) if plain_sum else (UNROLL, LATE_COUNT)
    grid = (triton.cdiv(n, BLOCK),)
    with launch_guard():
        _merge_kernel[grid](
            out,
            base if base is not None and not params.linear else x,
            x,
            f,
            i,
            nonfinite if nonfinite is not None else i,
            row_stride,
            n,
            start,
            N=params.n,
            SPARSIFIER=0 if params.linear else SPARSIFIERS[params.sparsifier],
            SIGN=(params.consensus == "sign") and not params.linear,
            LINEAR=params.linear,
            NORMALIZE=params.normalize,
            COUNT=nonfinite is not None,
            BLOCK=BLOCK,
            UNROLL=unroll,
            LATE_COUNT=late_count,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def _torch_chunk(base, experts, start, params, out_dtype, out, nonfinite) -> torch.Tensor:
    """DELLA's, SCE's and RAM's chunks: DELLA's keep masks come from a sort of each rank group (kernels/della.py),
    SCE's from the top set of the variance over the experts (kernels/sce.py), RAM's from how many experts changed
    each entry (kernels/ram.py), which this kernel does not do, so the torch backend's operations merge them on the
    chunk's device: the same bits as the torch backend on CPU."""
    from fusemerge.kernels import reference

    rows = [experts[i] for i in range(len(experts))]
    if len(rows) != params.n:
        raise ValueError(f"{len(rows)} expert chunks but {params.n} weights")
    if base is None and not params.linear:
        raise ValueError(f"{params.sparsifier} merges need a base chunk")
    return reference.merge_chunk(base, rows, start, params, out_dtype, out=out, nonfinite=nonfinite)
