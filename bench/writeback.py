"""Early writeback benchmark: how long does the final fsync of a merge's output take, with and without it?

A merge writes its output while it reads; `ShardedWriter.close` then fsyncs every shard, and that fsync waits for
every page still dirty. With early writeback (`writer.WRITEBACK_BYTES`, Linux sync_file_range) the kernel is asked
to start writing each shard out every 64 MiB, so the fsync has only the last window left. This writes `--gib` of
chunks through `ShardedWriter` from one thread (as the GPU pipeline's writer thread does), paced at `--rate` GB/s
(the rate a merge produces output; 0 = as fast as the page cache takes it), then times `close()`. Runs alternate
off / on in one process; medians of --repeats each. `os.sync()` before every run, so none inherits dirty pages.

    python bench/writeback.py                    # 2 GiB at 0.26 GB/s (the H100 e2e merge's output rate)
    python bench/writeback.py --rate 0 --gib 4   # as fast as possible
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import GB, append_csv, machine  # noqa: E402


def one_run(directory: Path, total: int, chunk: int, rate: float, writeback: int) -> dict[str, float]:
    """Write `total` bytes in `chunk`-byte pieces at `rate` bytes/s (0: unpaced), then close: seconds of each."""
    from fusemerge.streaming import writer as w

    w.WRITEBACK_BYTES = writeback
    layout = w.plan_layout([w.OutputTensor("weight", "U8", (total,))], max_shard_bytes=total)
    data = memoryview(os.urandom(chunk))
    os.sync()
    t0 = time.perf_counter()
    out = w.ShardedWriter(directory, layout)
    requests = 0
    try:
        for k, offset in enumerate(range(0, total, chunk)):
            if rate:
                lag = t0 + k * chunk / rate - time.perf_counter()
                if lag > 0:
                    time.sleep(lag)
            out.write("weight", offset, data[:min(chunk, total - offset)])
        t1 = time.perf_counter()
        requests = out._writeback.requests
    finally:
        out.close()
    t2 = time.perf_counter()
    (directory / layout.shards[0].filename).unlink()
    return {"write_s": t1 - t0, "fsync_s": t2 - t1, "total_s": t2 - t0, "requests": requests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="bytes written per run, GiB")
    p.add_argument("--chunk-mib", type=float, default=8.0, help="bytes per write, MiB (a pipeline chunk of bf16)")
    p.add_argument("--rate", type=float, default=0.26, help="GB/s the writes are paced at; 0: unpaced")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the file goes (a real disk, not tmpfs)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "writeback.csv")
    args = p.parse_args(argv)

    from fusemerge.streaming import writer as w

    if w._sync_file_range is None:
        print("no sync_file_range on this platform: early writeback is off here, nothing to compare")
        return 1
    default = w.WRITEBACK_BYTES
    total, chunk = int(args.gib * 2**30), int(args.chunk_mib * 2**20)
    directory = Path(tempfile.mkdtemp(prefix="fusemerge-writeback-", dir=args.dir))
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        for _ in range(args.repeats):
            for mode, every in (("off", 0), ("on", default)):
                runs[mode].append(one_run(directory, total, chunk, args.rate * GB, every))
    finally:
        w.WRITEBACK_BYTES = default
        directory.rmdir()

    info = machine()
    command = " ".join(["python bench/writeback.py", *(argv if argv is not None else sys.argv[1:])])
    pace = f"paced at {args.rate} GB/s" if args.rate else "unpaced"
    print(f"# Early writeback: {args.gib} GiB in {args.chunk_mib} MiB writes, {pace}, into {args.dir}\n\n"
          f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM\n- command: `{command}`\n\n"
          "| writeback | write s | fsync s | write + fsync s | requests |\n|---|---:|---:|---:|---:|")
    rows = []
    med = {}
    for mode in ("off", "on"):
        med[mode] = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        m = med[mode]
        label = "off" if mode == "off" else f"every {default >> 20} MiB"
        print(f"| {label} | {m['write_s']:.2f} | {m['fsync_s']:.2f} | {m['total_s']:.2f} | {m['requests']:.0f} |")
        rows.append({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": info["cpu"],
                     "cores": info["cores"], "gib": args.gib, "chunk_mib": args.chunk_mib, "rate_gbps": args.rate,
                     "writeback": label, "repeats": args.repeats, "write_s": f"{m['write_s']:.4g}",
                     "fsync_s": f"{m['fsync_s']:.4g}", "total_s": f"{m['total_s']:.4g}", "command": command})
    on, off = med["on"], med["off"]
    print(f"\nmedians of {args.repeats}; fsync on / off: {on['fsync_s'] / max(off['fsync_s'], 1e-9):.3f}x, "
          f"write + fsync on / off: {on['total_s'] / off['total_s']:.3f}x")
    append_csv(args.results, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
