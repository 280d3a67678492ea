"""Kernel benchmark: how close does the fused merge kernel get to the GPU's memory bandwidth?

The one question: for each merge method and N experts, how fast does one chunk merge run, as GB/s of
its compulsory traffic ((N + 1) input reads + 1 output write, bf16 unless --dtype) and as a fraction of the
device-to-device copy bandwidth measured in the same run (a torch copy moving the same byte count)?
Providers side by side:

- fusemerge-triton   fusemerge.kernels.triton_merge.merge_chunk (experts as rows of one staging buffer)
- fusemerge-torch    fusemerge.kernels.reference.merge_chunk on the same CUDA tensors
- mergekit-eager     mergekit-style torch eager code (below): float32 copies of every delta, a
                     torch.stack of all of them, argsort over the whole tensor for the trim,
                     torch.bernoulli for DARE, full-size masks and temporaries

The selection of TIES / breadcrumbs (every expert's exact k-th largest |d| and index cut, select.top_cuts on
a tensor held whole on the GPU, as the pipeline holds it) is reported separately, as GB/s over the (N + 1)
reads of one pass:
- select / fusemerge-triton        what a merge runs: the one-pass bracket select (select.bracket_cuts)
- select / fusemerge-triton-radix  the radix select it replaces (2 histogram passes x 2 reads per expert)
- select / fusemerge-torch         the torch backend's radix select on the same CUDA tensors
- select-pass / fusemerge-triton   the bracket kernel alone (bounds given): the pass's share of the select

The statistics of slerp and model_stock (fixed_dots.gram_sums on a tensor held whole on the GPU: the largest
magnitudes, then every pair's exact dot product), as GB/s over the reads of its two passes (2 x 2 inputs for
slerp, 2 x (N + 1) for model_stock); their merge is the linear kernel's, timed above:
- angles / fusemerge-triton        triton_select.max_abs + the gram kernel (all pairs in one read)
- angles / fusemerge-torch         the torch backend's float64 operations on the same CUDA tensors, pair by pair

nearswap's merge rows (the base and one other model, whatever N: one row set, at the first --experts, as
GB/s over 2 reads + 1 write, N shown as 1): fusemerge-triton is kernels/triton_nearswap.py, fusemerge-torch the
torch backend's operations, mergekit-eager mergekit's code as it reads.

DARE's L1 rescale statistics (select.dare_scales on a tensor held whole: max |d| of every expert, then the
fixed-point L1 sums over all and over the kept entries), as GB/s over the 2 x (N + 1) reads of its two passes
(with --methods dare_ties or dare_linear; one row set for both):
- rescale / fusemerge-triton       triton_select.max_abs + l1_fixed (every expert in one launch per pass)
- rescale / fusemerge-torch        the torch backend's operations on the same CUDA tensors, expert by expert

Times come from triton.testing.do_bench (median, 0.2 and 0.8 quantiles, in ms). GB = 10^9 bytes.
A markdown table goes to stdout; rows are appended to bench/results/kernels.csv.

Run (from the repository root, on a machine with a CUDA GPU):

    python bench/kernels.py                                  # every method, N in 2 4 8, 2^26 elements
    python bench/kernels.py --methods ties dare_ties --experts 8 --log2-numel 24
    python bench/kernels.py --methods ties dare_ties --block 512 --num-warps 4  # tune the merge launch
    python bench/kernels.py --methods ties --experts 8 --unroll 2 --late-count  # the launch choices
    python bench/kernels.py --only-select --experts 2 4 8     # the selection rows only
    python bench/kernels.py --methods nearswap --experts 2                # nearswap's rows only
    python bench/kernels.py --only-select --dtype float32     # fp32 inputs (few ties: more candidates)
    python bench/kernels.py --only-select --methods model_stock slerp   # the angle methods' statistics only
    python bench/kernels.py --only-select --methods dare_ties           # DARE's L1 rescale statistics only
    TRITON_INTERPRET=1 python bench/kernels.py --smoke     # CPU check of the script itself, measures nothing
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHOD_NAMES = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"]
ANGLE_NAMES = ["slerp", "model_stock"]  # statistics rows only: their merge is the linear kernel
PAIR_NAMES = ["nearswap"]  # the base and one other model, whatever N: one row set, at the first --experts
NEARSWAP_T = 0.005  # the other model's entries are ~0.01 from the base's: some swapped, most mixed
PROVIDERS = ["fusemerge-triton", "fusemerge-torch", "mergekit-eager"]
CSV_FIELDS = [
    "date", "device", "torch", "triton", "fusemerge", "kind", "method", "provider", "experts", "numel", "dtype",
    "median_ms", "p20_ms", "p80_ms", "gbps", "copy_gbps", "frac_copy", "command",
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DENSITY = 0.5  # ties / DARE keep half of each delta
BREADCRUMBS_DENSITY, GAMMA = 0.9, 0.01
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHOD_NAMES + PAIR_NAMES + ANGLE_NAMES,
                   choices=METHOD_NAMES + PAIR_NAMES + ANGLE_NAMES)
    p.add_argument("--experts", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--log2-numel", type=int, default=26, help="elements per expert: 2^this (default 2^26)")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="input and output dtype (fp32 deltas tie less: more candidates inside the bracket)")
    p.add_argument("--no-select", action="store_true", help="skip the selection and angle (statistics) rows")
    p.add_argument("--only-select", action="store_true", help="only the selection rows (no merge rows)")
    p.add_argument("--block", type=int, default=None, help="override triton_merge.BLOCK (elements per program)")
    p.add_argument("--num-warps", type=int, default=None, help="override triton_merge.NUM_WARPS")
    p.add_argument("--unroll", type=int, default=None,
                   help="override triton_merge.UNROLL and SUM_UNROLL (experts whose loads are issued together)")
    p.add_argument("--late-count", action=argparse.BooleanOptionalAction, default=None,
                   help="override triton_merge.LATE_COUNT and SUM_LATE_COUNT (one NaN / Inf reduction per block, "
                        "not per input)")
    p.add_argument("--count", action=argparse.BooleanOptionalAction, default=True,
                   help="merge rows count NaN / Inf as a merge does (nonfinite=; default); --no-count times the "
                        "kernel without it (how the 2026-11-24 table was measured)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "kernels.csv")
    p.add_argument("--smoke", action="store_true",
                   help="run every code path on CPU through TRITON_INTERPRET=1 at 2^10 elements, wall-clock timed;\n"
                        "prints the table, appends nothing (checks the script, not the kernels' speed)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# mergekit-style eager implementation (the way generalized task arithmetic is usually written in
# torch: whole-tensor temporaries, a stack of all deltas, sorts for the trim).
# ------------------------------------------------------------------------------------------------


def _eager_sparsify(delta: torch.Tensor, sparsifier: str) -> torch.Tensor:
    if sparsifier == "magnitude":
        k = max(1, int(DENSITY * delta.numel()))
        mask = torch.zeros_like(delta)
        mask[torch.argsort(delta.abs(), descending=True)[:k]] = 1
        return delta * mask
    if sparsifier == "breadcrumbs":
        n = delta.numel()
        keep, top = int(BREADCRUMBS_DENSITY * n), int(GAMMA * n)
        bottom = max(0, n - keep - top)
        mask = torch.zeros_like(delta)
        mask[torch.sort(delta.abs()).indices[bottom:bottom + keep]] = 1
        return delta * mask
    if sparsifier == "dare":
        mask = torch.bernoulli(torch.full_like(delta, DENSITY))
        kept = delta * mask
        return kept * (delta.abs().sum() / kept.abs().sum())  # L1 rescale
    return delta


def eager_merge(base: torch.Tensor, experts: list[torch.Tensor], method, weights: list[float], lam: float,
                normalize: bool) -> torch.Tensor:
    if method.is_linear:
        models = torch.stack([x.float() for x in [*experts, base]])
        w = torch.tensor([*weights, 1.0], device=base.device).view(-1, 1)
        out = (models * w).sum(0)
        return (out / w.sum() if normalize else out).to(base.dtype)
    deltas = torch.stack([_eager_sparsify(x.float() - base.float(), method.sparsifier) for x in experts])
    w = torch.tensor(weights, device=base.device).view(-1, 1)
    weighted = deltas * w
    if method.consensus == "sign":
        sign = weighted.sum(0).sign()
        sign[sign == 0] = 1
        mask = weighted.sign() == sign
        mixed = (weighted * mask).sum(0)
        if normalize:
            divisor = (w * mask).sum(0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed = mixed / divisor
    else:
        mixed = weighted.sum(0)
        if normalize:
            mixed = mixed / w.sum()
    return (base.float() + lam * mixed).to(base.dtype)


# ------------------------------------------------------------------------------------------------
# fusemerge parameters: thresholds by the real selection path, DARE keys by the documented hash.
# ------------------------------------------------------------------------------------------------


def chunk_params(method, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], lam: float,
                 normalize: bool):
    """The merge's ChunkParams by the real statistics path (select.tensor_params on the Triton backend)."""
    from fusemerge.kernels import select, triton_select
    from fusemerge.kernels.params import ChunkParams

    n, n_exp = base.numel(), len(experts)
    if method.is_linear:  # the N experts and the base, averaged
        return ChunkParams("none", "none", True, (*weights, 1.0), normalize=normalize)
    density = BREADCRUMBS_DENSITY if method.sparsifier == "breadcrumbs" else DENSITY
    segment = select.Segment(n, lambda lo, cnt: (base[lo:lo + cnt], [x[lo:lo + cnt] for x in experts]))
    return select.tensor_params(
        method, name="bench.weight", numel=n, segments=[segment], weights=list(weights), density=[density] * n_exp,
        gamma=[GAMMA] * n_exp, lam=lam, normalize=normalize, rescale=True, seed=0, chunk=n, backend=triton_select,
    )


def selection_ranks(method, n: int, n_exp: int) -> list[list[int]]:
    from fusemerge.kernels import select

    if method.sparsifier == "breadcrumbs":
        return [list(select.trim_counts("breadcrumbs", n, BREADCRUMBS_DENSITY, GAMMA))] * n_exp
    return [list(select.trim_counts("magnitude", n, DENSITY))] * n_exp


def selection(backend, base: torch.Tensor, experts: list[torch.Tensor], ranks, whole: bool):
    """Every expert's (t, c) by select.top_cuts: whole=True takes the bracket select (on the Triton backend)."""
    from fusemerge.kernels import select

    n = base.numel()
    seg = select.Segment(n, lambda lo, cnt: (base[lo:lo + cnt], [x[lo:lo + cnt] for x in experts]), whole=whole)
    return select.top_cuts(backend, [seg], n, ranks)


def bracket_bounds(base: torch.Tensor, experts: list[torch.Tensor], ranks) -> tuple[list[int], list[int], int]:
    """The bounds and room bracket_cuts would give the pass, for timing the kernel alone."""
    from fusemerge.kernels import select, triton_select

    calls = {}
    real = triton_select.bracket_pass

    def capture(b, e, lo, hi, cap):
        calls.update(lo=lo, hi=hi, cap=cap)
        return real(b, e, lo, hi, cap)

    triton_select.bracket_pass = capture
    try:
        select.bracket_cuts(triton_select, base, experts, ranks)
    finally:
        triton_select.bracket_pass = real
    return calls["lo"], calls["hi"], calls["cap"]


class Timer:
    """do_bench on the GPU (median, 0.2 and 0.8 quantiles, ms); plain wall clock for --smoke."""

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn) -> tuple[float, float, float]:
        if self.smoke:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            return times[1], times[0], times[2]
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80


def copy_bandwidth(nbytes: int, device: torch.device, timer: Timer) -> float:
    """GB/s of a torch device-to-device copy of nbytes (nbytes read + nbytes written): the ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (med * 1e-3) / GB


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_experts(args: argparse.Namespace, n_exp: int, n: int, device: torch.device, meta: dict,
                  timer: Timer) -> list[dict]:
    """Every requested method and provider for N = n_exp experts of n elements (--dtype)."""
    from fusemerge.kernels import reference, triton_merge, triton_select
    from fusemerge.methods import METHODS

    dtype = DTYPES[args.dtype]
    esize = dtype.itemsize
    traffic = (n_exp + 2) * n * esize  # (N + 1) reads + 1 write
    copy_gbps = copy_bandwidth(traffic // 2, device, timer)

    g = torch.Generator(device=device).manual_seed(n_exp)
    base = torch.randn(n, generator=g, device=device).to(dtype)
    staging = torch.empty((n_exp + 1, n), dtype=dtype, device=device)  # the executor's staging buffer
    for i in range(n_exp):
        staging[i] = (base.float() + 0.01 * torch.randn(n, generator=g, device=device)).to(dtype)
    staging[n_exp] = base  # linear averages the N experts and the base: N + 1 inputs like the others
    experts = [staging[i] for i in range(n_exp)]
    weights = [1.0 / n_exp + 0.1 * i for i in range(n_exp)]
    out = torch.empty(n, dtype=dtype, device=device)
    counts = torch.zeros(n_exp + 2, dtype=torch.int64, device=device) if args.count else None  # as merges run

    rows: list[dict] = []

    def record(kind: str, method: str, provider: str, timing: tuple[float, float, float], nbytes: int) -> None:
        med, p20, p80 = timing
        gbps = nbytes / (med * 1e-3) / GB
        rows.append({**meta, "kind": kind, "method": method, "provider": provider, "experts": n_exp,
                     "median_ms": med, "p20_ms": p20, "p80_ms": p80, "gbps": gbps, "copy_gbps": copy_gbps,
                     "frac_copy": gbps / copy_gbps})

    for mname in [] if args.only_select else [m for m in args.methods if m in METHOD_NAMES]:
        method = METHODS[mname]
        normalize = bool(method.params["normalize"].default)
        params = chunk_params(method, base, experts, weights, 1.0, normalize)
        rows_in = staging if method.is_linear else staging[:n_exp]
        list_in = [staging[i] for i in range(rows_in.shape[0])]
        providers = {
            "fusemerge-triton": lambda p=params, x=rows_in: triton_merge.merge_chunk(
                base, x, 0, p, dtype, out=out, nonfinite=None if counts is None else counts[:p.n + 1]),
            "fusemerge-torch": lambda p=params, x=list_in: reference.merge_chunk(base, x, 0, p, dtype),
            "mergekit-eager": lambda m=method, z=normalize: eager_merge(base, experts, m, weights, 1.0, z),
        }
        if "fusemerge-triton" in args.providers:  # the bits it times are the torch backend's (any --block)
            got = providers["fusemerge-triton"]().view(torch.uint8)
            if not torch.equal(got, reference.merge_chunk(base, list_in, 0, params, dtype).view(torch.uint8)):
                raise AssertionError(f"{mname} N={n_exp}: the Triton kernel and the torch backend disagree")
            _release(device)
        for prov in args.providers:
            try:
                record("merge", mname, prov, timer(providers[prov]), traffic)
            except torch.OutOfMemoryError:
                print(f"{mname} N={n_exp} {prov}: out of GPU memory, row skipped", file=sys.stderr)
            _release(device)

    if "nearswap" in args.methods and not args.only_select and n_exp == args.experts[0]:
        rows += bench_nearswap(args, base, experts[0], out, counts, meta, timer)

    if not args.no_select:
        reads = (n_exp + 1) * n * esize
        for mname in ("ties", "breadcrumbs_ties"):
            if mname not in args.methods:
                continue
            ranks = selection_ranks(METHODS[mname], n, n_exp)
            if "fusemerge-triton" in args.providers:
                want = selection(triton_select, base, experts, ranks, False)
                if selection(triton_select, base, experts, ranks, True) != want:
                    raise AssertionError(f"{mname} N={n_exp}: the bracket and radix selects disagree")
                for prov, whole in (("fusemerge-triton", True), ("fusemerge-triton-radix", False)):
                    record("select", mname, prov,
                           timer(lambda w=whole, r=ranks: selection(triton_select, base, experts, r, w)), reads)
                lo, hi, cap = bracket_bounds(base, experts, ranks)
                record("select-pass", mname, "fusemerge-triton",
                       timer(lambda lo=lo, hi=hi, cap=cap: triton_select.bracket_pass(base, experts, lo, hi, cap)),
                       reads)
            if "fusemerge-torch" in args.providers:
                record("select", mname, "fusemerge-torch",
                       timer(lambda r=ranks: selection(reference, base, experts, r, False)), reads)
        for mname in [m for m in ANGLE_NAMES if m in args.methods]:
            if mname == "slerp" and n_exp != args.experts[0]:
                continue  # two models whatever N: one row set
            # slerp: experts 0 and 1 as (a, b) (rows of the staging buffer, read in place); model_stock: the base
            # and the N experts
            models = [experts[0], staging[1]] if mname == "slerp" else [base, *experts]
            nbytes = 2 * len(models) * n * esize
            found = {}
            for prov, backend in (("fusemerge-triton", triton_select), ("fusemerge-torch", reference)):
                if prov in args.providers:
                    found[prov] = angle_weights(backend, mname, models)
                    record("angles", mname, prov, timer(lambda b=backend, m=mname, x=models: angle_weights(b, m, x)),
                           nbytes)
            if len(set(found.values())) > 1:
                raise AssertionError(f"{mname} N={n_exp}: the backends' weights differ: {found}")
        if {"dare_ties", "dare_linear"} & set(args.methods):  # one statistics pass for both: the L1 rescale
            found = {}
            for prov, backend in (("fusemerge-triton", triton_select), ("fusemerge-torch", reference)):
                if prov in args.providers:
                    found[prov] = tuple(rescale_factors(backend, base, experts))
                    record("rescale", "dare", prov, timer(lambda b=backend: rescale_factors(b, base, experts)),
                           2 * reads)
            if len(set(found.values())) > 1:
                raise AssertionError(f"DARE N={n_exp}: the backends' L1 factors differ: {found}")
    return rows


def bench_nearswap(args: argparse.Namespace, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                   counts: torch.Tensor | None, meta: dict, timer: Timer) -> list[dict]:
    """nearswap's merge rows: the base `a` and one other model `b`, 2 reads + 1 write per entry, against a copy
    of the same byte count (its ceiling, shown as N=1)."""
    from fusemerge.kernels import reference, triton_merge
    from fusemerge.kernels.params import ChunkParams

    dtype, t = a.dtype, NEARSWAP_T
    params = ChunkParams("none", "none", False, (1.0,), nearswap=t)

    def mergekits() -> torch.Tensor:  # mergekit 0.1.5's merge_methods/nearswap.py, on float32 copies
        af, bf = a.float(), b.float()
        weight = (t / torch.abs(af - bf).clamp(min=1e-6)).clamp(min=0, max=1)
        return (weight * bf + (1 - weight) * af).to(dtype)

    providers = {
        "fusemerge-triton": lambda: triton_merge.merge_chunk(a, [b], 0, params, dtype, out=out,
                                                             nonfinite=None if counts is None else counts[:2]),
        "fusemerge-torch": lambda: reference.merge_chunk(a, [b], 0, params, dtype),
        "mergekit-eager": mergekits,
    }
    if "fusemerge-triton" in args.providers:
        if not torch.equal(providers["fusemerge-triton"]().view(torch.uint8),
                           reference.merge_chunk(a, [b], 0, params, dtype).view(torch.uint8)):
            raise AssertionError("nearswap: the Triton kernel and the torch backend disagree")
    rows = []
    nbytes = 3 * a.numel() * dtype.itemsize
    copy_gbps = copy_bandwidth(nbytes // 2, a.device, timer)
    for prov in args.providers:
        med, p20, p80 = timer(providers[prov])
        gbps = nbytes / (med * 1e-3) / GB
        rows.append({**meta, "kind": "merge", "method": "nearswap", "provider": prov, "experts": 1,
                     "median_ms": med, "p20_ms": p20, "p80_ms": p80, "gbps": gbps, "copy_gbps": copy_gbps,
                     "frac_copy": gbps / copy_gbps})
        _release(a.device)
    return rows


def rescale_factors(backend, base: torch.Tensor, experts: list[torch.Tensor]) -> list[float]:
    """DARE's L1 rescale factors (select.dare_scales: max |d| of every expert, then the fixed-point L1 sums over
    all and over the kept entries, density 0.3) of a tensor held whole."""
    from fusemerge.kernels import select
    from fusemerge.kernels.philox import dare_key

    n = base.numel()
    seg = select.Segment(n, lambda lo, cnt: (base[lo:lo + cnt], [x[lo:lo + cnt] for x in experts]), whole=True)
    keys = [dare_key(0, "bench", i) for i in range(len(experts))]
    return select.dare_scales(backend, [seg], n, keys, [0.3] * len(experts))


def angle_weights(backend, mname: str, models: list[torch.Tensor]) -> tuple[float, ...]:
    """slerp's (w_a, w_b) at t = 0.4, or model_stock's N + 1 weights, of `models` (the base's first) held whole."""
    from fusemerge.kernels import select
    from fusemerge.kernels.model_stock import model_stock_weights
    from fusemerge.kernels.slerp import slerp_weights

    n = models[0].numel()
    seg = select.Segment(n, lambda lo, cnt: (None, [x[lo:lo + cnt] for x in models]), whole=True)
    if mname == "slerp":
        return slerp_weights(backend, [seg], n, 0.4)
    return model_stock_weights(backend, [seg], n, len(models) - 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--smoke runs the kernels on CPU: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.\n"
              "Run it on a GPU machine, or check the script itself with: "
              "TRITON_INTERPRET=1 python bench/kernels.py --smoke", file=sys.stderr)
        return 2

    import triton

    import fusemerge

    device = torch.device("cpu" if args.smoke else "cuda")
    n = 1 << (10 if args.smoke else args.log2_numel)
    shown = argv if argv is not None else sys.argv[1:]
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (TRITON_INTERPRET=1 smoke run)" if args.smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "fusemerge": getattr(fusemerge, "__version__", "?"),
        "dtype": args.dtype, "numel": n,
        "command": "python bench/kernels.py " + " ".join(shlex.quote(a) for a in shown),
    }
    from fusemerge.kernels import triton_merge

    if args.block:
        triton_merge.BLOCK = args.block
    if args.num_warps:
        triton_merge.NUM_WARPS = args.num_warps
    if args.unroll:  # for every variant, the plain sum's own choice too
        triton_merge.UNROLL = triton_merge.SUM_UNROLL = args.unroll
    if args.late_count is not None:
        triton_merge.LATE_COUNT = triton_merge.SUM_LATE_COUNT = args.late_count
    meta["command"] += (f"  # merge BLOCK={triton_merge.BLOCK} num_warps={triton_merge.NUM_WARPS} "
                        f"unroll={triton_merge.UNROLL} late_count={triton_merge.LATE_COUNT} (sum: "
                        f"{triton_merge.SUM_UNROLL}, {triton_merge.SUM_LATE_COUNT}) count={args.count}")
    timer = Timer(args.smoke)
    rows: list[dict] = []
    for n_exp in args.experts:
        rows += bench_experts(args, n_exp, n, device, meta, timer)
        _release(device)

    print_table(rows, meta)
    if args.smoke:
        print("\nsmoke run: nothing appended")
        return 0
    write_csv(rows, args.results)
    print(f"\n{len(rows)} rows appended to {args.results}")
    return 0


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"# fusemerge kernel benchmark\n\n- device: {meta['device']}\n- date: {meta['date']}\n"
          f"- torch {meta['torch']}, triton {meta['triton']}, fusemerge {meta['fusemerge']}\n"
          f"- {meta['numel']:,} ({int(math.log2(meta['numel']))} bits) {meta['dtype']} elements per expert\n"
          f"- command: `{meta['command']}`\n")
    print("| kind | method | N | provider | median ms | p20 ms | p80 ms | GB/s | of copy |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['method']} | {r['experts']} | {r['provider']} | {r['median_ms']:.3f} | "
              f"{r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {r['gbps']:.0f} | {r['frac_copy']:.0%} |")
    ceilings = sorted({(r["experts"], r["copy_gbps"]) for r in rows})
    print("\ncopy ceiling (torch device-to-device copy of the same bytes): "
          + ", ".join(f"N={n_exp}: {copy:.0f} GB/s" for n_exp, copy in ceilings))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_FIELDS})


if __name__ == "__main__":
    sys.exit(main())
