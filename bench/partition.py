"""What does splitting one merge with `--partition` cost, and what does it buy on one machine?

Side by side, on one synthetic Llama-shaped merge: one `fusemerge run` (its default workers), against N parts
started at once as N processes (`fusemerge run ... --partition i/N --workers W`) followed by `fusemerge finalize`.
Reported per repeat, alternating the order: the whole run's wall time, the parts' wall time (from the first start
to the last exit), finalize's wall time, the sum, and the ratio to the whole run; peak anonymous memory summed over
every process; and whether the joined output is byte-identical to the whole run's (every file). Whole-process wall
times, imports included, page cache warmed the same way before each run. Rows are appended to
bench/results/partition.csv. GB = 10^9 bytes.

On a CPU machine the parts are processes, so they are not bound by one interpreter's GIL as the threads of one
run are; across machines the same parts run on several hosts that share a file system.

    python bench/partition.py --method ties --parts 2                   # the e2e.py model, 2 parts
    python bench/partition.py --method dare_ties --parts 2 --repeats 3
    python bench/partition.py --hidden 256 --intermediate 688 --layers 2 --vocab 4000 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import GB, append_csv, machine, read_all, timed_run, version_of  # noqa: E402
from bench.e2e import add_model_args, ensure_models, input_files, method_params  # noqa: E402
from fusemerge.sizes import parse_size  # noqa: E402
from fusemerge.synthetic import write_config_yaml  # noqa: E402

# Runs the N part commands given as JSON at once and exits non-zero if any fails: one process tree for timed_run,
# so the wall time spans the first start to the last exit and the memory peak sums every part.
PARTS_DRIVER = """
import json, subprocess, sys
procs = [subprocess.Popen(cmd) for cmd in json.loads(sys.argv[1])]
sys.exit(max(p.wait() for p in procs))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--parts", type=int, default=2, help="N: processes started at once")
    p.add_argument("--part-workers", type=int, default=1, help="--workers of each part")
    p.add_argument("--max-memory", default="2GiB",
                   help="--max-memory of the whole run; each part gets 1/N of it (the same memory in all)")
    p.add_argument("--out-shard-size", default="50MB", help="bytes per output shard (parts are whole shards)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench-e2e")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "partition.csv")
    return p.parse_args(argv)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    fam = ensure_models(args)
    inputs = input_files(fam)
    input_bytes = sum(f.stat().st_size for f in inputs)
    params = method_params(args)
    config = args.workdir / f"partition-{args.method}-{args.trim_scope}.yml"
    write_config_yaml(config, args.method, fam["base"], fam["experts"], dtype=args.dtype, **params)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    fm = [sys.executable, "-m", "fusemerge"]
    common = ["--device", args.device, "--out-shard-size", args.out_shard_size, "-q"]
    whole_out, parts_out = args.workdir / "out-whole", args.workdir / "out-parts"
    budget = parse_size(args.max_memory)
    cmds = {
        "whole": [*fm, "run", str(config), str(whole_out), "--overwrite", *common, "--max-memory", str(budget)],
        "parts": [sys.executable, "-c", PARTS_DRIVER, json.dumps(
            [[*fm, "run", str(config), str(parts_out), "--overwrite", *common, "--partition", f"{i}/{args.parts}",
              "--workers", str(args.part_workers), "--max-memory", str(budget // args.parts)]
             for i in range(args.parts)])],
        "finalize": [*fm, "finalize", str(parts_out), "--overwrite"],  # not -q: its line has the join's own time
    }
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    identical = []
    for rep in range(args.repeats):
        order = ["whole", "parts", "finalize"] if rep % 2 == 0 else ["parts", "finalize", "whole"]
        for what in order:
            if what != "finalize":
                read_all(inputs)  # page cache: warm, the same before every run
            r = timed_run(cmds[what], args.workdir / f"partition-{what}.log", env)
            print(f"{what} {rep + 1}/{args.repeats}: rc {r['rc']}, {r['wall']:.2f} s, CPU {r['cpu']:.2f} s, peak anon "
                  f"{r['anon'] / GB:.2f} GB", flush=True)
            if r["rc"] != 0:
                print((args.workdir / f"partition-{what}.log").read_text()[-3000:])
                return 1
            if what == "finalize":  # "joined ... in X s": the join itself, without start-up and imports
                found = re.search(r" in ([0-9.]+) s -> ", (args.workdir / "partition-finalize.log").read_text())
                r["join_s"] = float(found.group(1)) if found else float("nan")
            runs[what].append(r)
        identical.append(same_files(whole_out, parts_out))
    med = {k: statistics.median(r["wall"] for r in rs) for k, rs in runs.items()}
    cpu = {k: statistics.median(r["cpu"] for r in rs) for k, rs in runs.items()}
    joined = statistics.median(p["wall"] + f["wall"] for p, f in zip(runs["parts"], runs["finalize"], strict=True))
    n_shards = len(list(whole_out.glob("*.safetensors")))
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    scope = ", trim_scope: global" if args.trim_scope == "global" else ""
    print(f"\n## partition: {args.method}{scope}, {args.experts} experts, Llama h{args.hidden} i{args.intermediate} "
          f"L{args.layers} V{args.vocab} {args.dtype}; {input_bytes / GB:.2f} GB in, {n_shards} output shards\n\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; device {args.device}; {date}\n"
          f"- fusemerge {version_of(sys.executable, 'fusemerge')}; command: `{command}`\n"
          f"- page cache warm (inputs read once before each run); medians of {args.repeats}, order alternating; "
          f"--max-memory {args.max_memory} for the whole run, 1/{args.parts} of it for each part\n\n"
          "| run | wall s | CPU s (user + sys) | peak anon GB | vs whole |\n|---|---:|---:|---:|---:|")
    print(f"| whole (`run`, default workers) | {med['whole']:.2f} | {cpu['whole']:.2f} | "
          f"{max(r['anon'] for r in runs['whole']) / GB:.2f} | 1.00 |")
    print(f"| {args.parts} parts at once (`--workers {args.part_workers}` each) | {med['parts']:.2f} | "
          f"{cpu['parts']:.2f} | {max(r['anon'] for r in runs['parts']) / GB:.2f} | "
          f"{med['parts'] / med['whole']:.2f} |")
    join_s = statistics.median(r["join_s"] for r in runs["finalize"])
    print(f"| `finalize` (the join itself: {join_s:.2f} s; the rest is start-up) | {med['finalize']:.2f} | "
          f"{cpu['finalize']:.2f} | {max(r['anon'] for r in runs['finalize']) / GB:.2f} | "
          f"{med['finalize'] / med['whole']:.2f} |")
    print(f"| parts + finalize | {joined:.2f} | | | **{joined / med['whole']:.2f}** |")
    print(f"\njoined output byte-identical to the whole run's: {all(identical)} ({sum(identical)}/{len(identical)})")
    append_csv(args.results, [{
        "date": date, "cpu": m["cpu"], "cores": m["cores"], "device": args.device, "method": args.method,
        "trim_scope": args.trim_scope, "experts": args.experts,
        "shape": f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}",
        "input_gb": f"{input_bytes / GB:.3f}", "shards": n_shards, "parts": args.parts,
        "part_workers": args.part_workers, "repeats": args.repeats, "whole_s": f"{med['whole']:.3f}",
        "max_memory": args.max_memory, "parts_s": f"{med['parts']:.3f}", "finalize_s": f"{med['finalize']:.3f}",
        "join_s": f"{join_s:.3f}", "joined_s": f"{joined:.3f}", "whole_cpu_s": f"{cpu['whole']:.3f}",
        "parts_cpu_s": f"{cpu['parts']:.3f}",
        "ratio": f"{joined / med['whole']:.3f}", "identical": all(identical), "command": command,
    }])
    shutil.rmtree(parts_out, ignore_errors=True)
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
