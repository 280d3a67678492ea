"""CPU selection benchmark: on the CPU, is the one-pass bracket select faster than the radix select?

The one question behind `reference.ONE_PASS_SELECT`: for N experts of n elements held whole in memory as
float32 (as the CPU executor keeps a resident tensor), how long does each exact threshold selection take
(select.bracket_cuts with the torch backend, against select.top_cuts' radix select over the executor's
2^18-element chunks)? Both give the same cuts (checked before timing). One torch thread, like the CPU
executor's workers; medians of --repeats wall-clock runs. Rows are appended to bench/results/select_cpu.csv.

    python bench/select_cpu.py                       # 4 bf16-valued experts of 2^22 elements, density 0.2
    python bench/select_cpu.py --experts 8 --log2-numel 20 --density 0.5
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 1 << 18  # the CPU executor's chunk cap (planner.CPU_CHUNK_CAP)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--log2-numel", type=int, default=22)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "select_cpu.csv")
    args = p.parse_args(argv)

    from fusemerge.kernels import reference, select

    torch.set_num_threads(1)
    n = 1 << args.log2_numel
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16).float()  # bf16 values: deltas tie as in real merges
    experts = list(torch.stack([(base + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16).float()
                                for _ in range(args.experts)]))
    ranks = [list(select.trim_counts("magnitude", n, args.density))] * args.experts
    chunked = select.Segment(n, lambda s, c: (base[s:s + c], [x[s:s + c] for x in experts]))

    def bracket():
        return select.bracket_cuts(reference, base, experts, ranks)

    def radix():
        return select.top_cuts(reference, [chunked], CHUNK, ranks)

    if bracket() != radix():
        raise AssertionError("the bracket and radix selects disagree")
    rows = []
    for name, fn in (("bracket", bracket), ("radix", radix)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append({"select": name, "median_s": statistics.median(times)})
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"
    command = " ".join(["python bench/select_cpu.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# CPU selection: {args.experts} experts x {n:,} elements, density {args.density}\n\n- machine: "
          f"{machine}\n- command: `{command}`\n\n| select | median s |\n|---|---:|")
    for r in rows:
        print(f"| {r['select']} | {r['median_s']:.3f} |")
    print(f"\nbracket / radix: {rows[0]['median_s'] / rows[1]['median_s']:.2f}x")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    new = not args.results.exists()
    with args.results.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "experts", "numel", "density", "select", "median_s", "command"])
        for r in rows:
            w.writerow([dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine, args.experts, n,
                        args.density, r["select"], f"{r['median_s']:.6g}", command])
    return 0


if __name__ == "__main__":
    sys.exit(main())
