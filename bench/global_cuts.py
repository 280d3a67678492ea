"""How long do `trim_scope: global`'s threshold passes take on the CPU: one worker, threads, forked processes?

The passes read every merged tensor of the whole model (two histogram passes, radix select) before any tensor is
merged; with `--workers K` the CPU executor splits them by chunk among K forked processes (`processes.fork_map`),
or threads where processes are not used. This times `Executor.find_global_cuts` alone, in this process, on the
synthetic Llama family of e2e.py (page cache warm: the inputs are read once first), for each way in turn,
alternating, and checks that every way finds the same cuts. One torch thread per worker, as a run sets it.
Rows are appended to bench/results/global_cuts.csv.

    python bench/global_cuts.py                         # the e2e.py model, ties, 2 workers, 3 rounds
    python bench/global_cuts.py --workers 4 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from bench.common import append_csv, machine, read_all  # noqa: E402
from bench.e2e import add_model_args, ensure_models, input_files, method_params  # noqa: E402
from fusemerge.synthetic import write_config_yaml  # noqa: E402

WAYS = ("one worker", "threads", "processes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--workers", type=int, default=2, help="K: threads or processes splitting the passes")
    p.add_argument("--rounds", type=int, default=3, help="each way timed once per round, in turn")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench-e2e")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "global_cuts.csv")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    import fusemerge
    from fusemerge.streaming.executor import Executor

    if args.method not in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        print(f"--method {args.method}: trim_scope: global needs a method that trims by magnitude")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    fam = ensure_models(args)
    inputs = input_files(fam)
    args.trim_scope = "global"
    config = args.workdir / f"global-cuts-{args.method}.yml"
    write_config_yaml(config, args.method, fam["base"], fam["experts"], dtype=args.dtype, **method_params(args))
    plan = fusemerge.build_plan(config, device="cpu", workers=args.workers)
    read_all(inputs)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    cuts: dict[str, object] = {}
    for _ in range(args.rounds):
        for way in WAYS:
            plan.workers = 1 if way == "one worker" else args.workers
            ex = Executor(plan, None, processes=(way == "processes"))
            t0 = time.perf_counter()
            cuts[way] = ex.find_global_cuts()
            times[way].append(time.perf_counter() - t0)
            print(f"{way}: {times[way][-1]:.2f} s", flush=True)
    same = all(c == cuts["one worker"] for c in cuts.values())
    med = {w: statistics.median(v) for w, v in times.items()}
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    elems = sum(t.numel for t in plan.all_tensors if not t.copy_only) * len(plan.models)
    print(f"\n## global thresholds: {args.method}, {args.experts} experts, Llama h{args.hidden} i{args.intermediate} "
          f"L{args.layers} V{args.vocab} {args.dtype}; {elems / 1e6:.0f}M expert entries\n\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {date}\n"
          f"- command: `{command}`\n- medians of {args.rounds} rounds (each way once per round, in turn); "
          "page cache warm\n\n| way | seconds | vs one worker |\n|---|---:|---:|")
    for way in WAYS:
        k = 1 if way == "one worker" else args.workers
        label = way if k == 1 else f"{k} {way}"
        print(f"| {label} | {med[way]:.2f} ({', '.join(f'{t:.2f}' for t in times[way])}) | "
              f"{med['one worker'] / med[way]:.2f}x |")
    print(f"\nthe same cuts every way: {same}")
    append_csv(args.results, [{
        "date": date, "cpu": m["cpu"], "cores": m["cores"], "method": args.method, "experts": args.experts,
        "shape": f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}", "workers": args.workers,
        "rounds": args.rounds, **{f"{w.replace(' ', '_')}_s": f"{med[w]:.3f}" for w in WAYS}, "same": same,
        "command": command,
    }])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
