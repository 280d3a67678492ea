"""How fast does the CPU merge a chunk: the torch operations against the compiled loops (kernels/cpu_fused.py)?

Times, in one thread, each CPU kernel of a merge on one chunk of `--chunk` entries of `--experts` experts
(bf16 models, or --dtype, loaded as the executor loads them: float32 for the torch operations, the file's
dtype for the compiled loops, which read it as it is): the merge of every kind (linear, task arithmetic, TIES,
breadcrumbs-TIES, DARE-TIES with drawn masks) and the statistics (the radix select's high histogram and
low-bin selection, DARE's max |d| and L1 sums). Alternates the two ways per round; reports nanoseconds per
entry and expert (medians), the speed-up, and checks that both give the same bytes. Rows are appended to
bench/results/cpu_merge.csv.

    python bench/cpu_merge.py                      # 4 experts, chunks of 2^18, 9 rounds
    python bench/cpu_merge.py --experts 8 --chunk 1048576
    python bench/cpu_merge.py --dtype float16
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import append_csv, machine  # noqa: E402
from fusemerge.kernels import cpu_fused, reference  # noqa: E402
from fusemerge.kernels.params import ChunkParams  # noqa: E402
from fusemerge.kernels.philox import dare_keep_run, dare_key  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--chunk", type=int, default=1 << 18, help="entries per chunk (a merge's default on CPU)")
    p.add_argument("--rounds", type=int, default=9, help="each way timed once per round, in turn")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the models' dtype (and the merge's output dtype)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "cpu_merge.csv")
    return p.parse_args(argv)


def cases(n: int, experts: int, dtype: torch.dtype = torch.bfloat16):
    """(name, torch call, compiled call, compare) of every kernel, on `dtype`-rounded data and float32 copies."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(dtype) for _ in range(experts)]
    b32, x32 = base.float(), [x.float() for x in xs]
    a = [(x - b32).abs().view(torch.int32) for x in x32]
    t = tuple(int(v.kthvalue(n * 4 // 5).values) for v in a)
    c = (n,) * experts
    top = tuple(int(v.kthvalue(n - n // 100).values) for v in a)
    w = tuple(1.0 - 0.1 * i for i in range(experts))
    keys = tuple(dare_key(0, "bench", i) for i in range(experts))
    keeps = [dare_keep_run(k, 0, n, 0.3) for k in keys]
    merges = {
        "linear": ChunkParams("none", "none", True, w, normalize=True),
        "task_arithmetic": ChunkParams("none", "none", False, w, lam=0.8),
        "ties": ChunkParams("magnitude", "sign", False, w, normalize=True, t_keep=t, c_keep=c),
        "breadcrumbs_ties": ChunkParams("breadcrumbs", "sign", False, w, normalize=True, t_keep=t, c_keep=c,
                                        t_drop=top, c_drop=c),
        "dare_ties": ChunkParams("dare", "sign", False, w, keys=keys, density=(0.3,) * experts,
                                 scale=(3.1,) * experts),
    }
    out = []
    for name, p in merges.items():
        k = keeps if p.sparsifier == "dare" else None
        out.append((f"merge {name}", lambda p=p, k=k: reference.merge_torch(b32, x32, 0, p, dtype, keeps=k),
                    lambda p=p, k=k: cpu_fused.merge(base, xs, 0, p, dtype, None, k), "bytes"))
    hi = t[0] >> 16
    out += [
        ("histogram (high 16 bits)", lambda: [reference.hist_hi_torch(b32, x) for x in x32],
         lambda: [cpu_fused.hist_hi(base, x) for x in xs], "list"),
        ("select (one high bin)", lambda: [reference.select_lo_torch(b32, x, hi) for x in x32],
         lambda: [cpu_fused.select_lo(base, x, hi) for x in xs], "list"),
        ("DARE max |d|", lambda: [reference.max_abs_torch(b32, x) for x in x32],
         lambda: cpu_fused.max_abs(base, xs), "value"),
        ("DARE L1 sums", lambda: [reference.l1_fixed_torch(b32, x, 40, k) for x, k in zip(x32, keeps, strict=True)],
         lambda: cpu_fused.l1_fixed(base, xs, [40] * len(xs), keeps), "value"),
    ]
    return out


def same(kind: str, a, b) -> bool:
    if kind == "bytes":
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if kind == "list":
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    how = cpu_fused.describe()
    if not cpu_fused.available():
        print(f"the CPU merge is not compiled here: {how}")
        return 1
    torch.set_num_threads(1)  # a merge's worker: one thread each
    rows = []
    all_same = True
    table = []
    for name, torch_call, compiled_call, kind in cases(args.chunk, args.experts, getattr(torch, args.dtype)):
        ok = same(kind, torch_call(), compiled_call())
        all_same &= ok
        times: dict[str, list[float]] = {"torch": [], "compiled": []}
        for _ in range(args.rounds):
            for way, call in (("torch", torch_call), ("compiled", compiled_call)):
                t0 = time.perf_counter()
                call()
                times[way].append(time.perf_counter() - t0)
        ns = {way: statistics.median(v) / (args.chunk * args.experts) * 1e9 for way, v in times.items()}
        table.append((name, ns, ok))
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## CPU merge kernels: {args.experts} experts, chunks of {args.chunk:,} {args.dtype} entries, "
          "one thread\n\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {date}; torch {torch.__version__}\n"
          f"- compiled: {how}\n- command: `{command}`\n- medians of {args.rounds} rounds (each way once per round)\n\n"
          "| kernel | torch ns / entry / expert | compiled | speed-up | same bytes |\n|---|---:|---:|---:|---|")
    for name, ns, ok in table:
        print(f"| {name} | {ns['torch']:.2f} | {ns['compiled']:.2f} | {ns['torch'] / ns['compiled']:.1f}x | {ok} |")
        rows.append({"date": date, "cpu": m["cpu"], "cores": m["cores"], "kernel": name, "dtype": args.dtype,
                     "experts": args.experts, "chunk": args.chunk, "rounds": args.rounds,
                     "torch_ns": f"{ns['torch']:.3f}",
                     "compiled_ns": f"{ns['compiled']:.3f}", "same": ok, "torch_version": torch.__version__,
                     "command": command})
    append_csv(args.results, rows)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
