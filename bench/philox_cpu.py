"""How fast does the CPU draw DARE's keep masks: numpy's rounds against the compiled loop, in 1 and K threads?

Times `philox_numpy.keep_run` and `philox_native.keep_run` (kernels/philox_native.py) on runs of `--run`
consecutive entries (a merge's chunk), in one thread and in `--threads` threads at once (each drawing its
own runs), alternating the ways per round; reports nanoseconds per entry (per expert) in aggregate, the
speed-up over numpy in one thread, and checks that both give the same bits. Rows are appended to
bench/results/philox_cpu.csv.

    python bench/philox_cpu.py                       # 2^22 entries per thread, runs of 2^20, 5 rounds
    python bench/philox_cpu.py --threads 4 --entries 8388608
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import append_csv, machine  # noqa: E402
from fusemerge.kernels import philox_native, philox_numpy  # noqa: E402
from fusemerge.kernels.philox import _split_key, dare_key, keep_below  # noqa: E402

DRAWS = {"numpy": philox_numpy.keep_run, "compiled": philox_native.keep_run}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=1 << 22, help="entries each thread draws per round")
    p.add_argument("--run", type=int, default=1 << 20, help="entries per call (a merge draws a chunk per call)")
    p.add_argument("--threads", type=int, default=2, help="K: threads drawing at once")
    p.add_argument("--rounds", type=int, default=5, help="each way timed once per round, in turn")
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "philox_cpu.csv")
    return p.parse_args(argv)


def draw_all(draw, thread: int, entries: int, run: int, below: int, out: np.ndarray) -> None:
    k0, k1 = _split_key(dare_key(0, "bench", thread))
    start = (1 << 32) - entries // 2  # the runs cross a multiple of 2^32, as a 64B model's embedding does
    for lo in range(0, entries, run):
        n = min(run, entries - lo)
        draw(k0, k1, start + lo, n, below, out[lo:lo + n])


def timed(draw, threads: int, entries: int, run: int, below: int, outs: list[np.ndarray]) -> float:
    workers = [threading.Thread(target=draw_all, args=(draw, w, entries, run, below, outs[w])) for w in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    how = philox_native.describe()
    if not philox_native.available():
        print(f"the keep test is not compiled here: {how}")
        return 1
    below = keep_below(args.density)
    ways = [(name, k) for k in sorted({1, args.threads}) for name in DRAWS]
    outs = {way: [np.empty(args.entries, dtype=np.bool_) for _ in range(args.threads)] for way in ways}
    times: dict[tuple[str, int], list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        for name, k in ways:
            times[name, k].append(timed(DRAWS[name], k, args.entries, args.run, below, outs[name, k]))
    ref = outs["numpy", args.threads]  # thread w draws expert w's runs in every way
    same = all(np.array_equal(outs[way][w], ref[w]) for way in ways for w in range(way[1]))
    ns = {way: statistics.median(v) / (args.entries * way[1]) * 1e9 for way, v in times.items()}
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## DARE keep test on CPU: {args.entries:,} entries per thread, runs of {args.run:,}\n\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {date}\n- compiled: {how}\n"
          f"- command: `{command}`\n- medians of {args.rounds} rounds (each way once per round, in turn)\n\n"
          "| way | threads | ns per entry (aggregate) | vs numpy, 1 thread |\n|---|---:|---:|---:|")
    for name, k in ways:
        print(f"| {name} | {k} | {ns[name, k]:.2f} | {ns['numpy', 1] / ns[name, k]:.1f}x |")
    print(f"\nthe same bits every way: {same}")
    append_csv(args.results, [{
        "date": date, "cpu": m["cpu"], "cores": m["cores"], "way": name, "threads": k, "entries": args.entries,
        "run": args.run, "rounds": args.rounds, "ns_per_entry": f"{ns[name, k]:.3f}", "same": same,
        "command": command,
    } for name, k in ways])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
