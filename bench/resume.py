"""What does the `--resume` journal cost a merge, and how long does a resume's check of the journal take?

One question, two numbers: the wall time of a whole merge with the journal (hashing each finished tensor's bytes and
fsyncing in a background thread) against the same merge with `Journal.record` made a no-op (median over
`--repeats`, alternating, page cache warm); and the time `Journal.resume` takes to re-hash every journaled tensor
of a merge killed after its last tensor (`FUSEMERGE_TEST_KILL_AT=stage:merged`).

    python bench/resume.py                      # ties, 3 experts, hidden 1024, 4 layers: 935 MB in, 234 MB out

Rows are appended to bench/results/resume.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from e2e import REPO, machine

sys.path.insert(0, str(REPO))
import fusemerge  # noqa: E402
from fusemerge.streaming import journal  # noqa: E402
from fusemerge.streaming.writer import temp_dir_path  # noqa: E402
from fusemerge.synthetic import make_llama_family, write_config_yaml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fusemerge-bench-resume"))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "resume.csv")
    args = ap.parse_args()

    root = args.workdir
    config = root / "ties.yml"
    if not config.exists():
        fam = make_llama_family(root / "models", n_experts=args.experts, hidden=1024, intermediate=2816,
                                layers=args.layers, vocab=32000, seed=0)
        write_config_yaml(config, "ties", fam["base"], fam["experts"], density=0.2)
    out = root / "out"
    record = journal.Journal.record

    def merge(with_journal: bool) -> tuple[float, fusemerge.MergeResult]:
        journal.Journal.record = record if with_journal else (lambda self, name: None)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        result = fusemerge.run(config, out, device="cpu")
        return time.perf_counter() - t0, result

    merge(True)  # warm the page cache
    on, off = [], []
    for _ in range(args.repeats):
        on.append(merge(True)[0])
        off.append(merge(False)[0])
    journal.Journal.record = record
    _, result = merge(True)

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), **{journal.KILL_ENV: "stage:merged"})
    subprocess.run([sys.executable, "-m", "fusemerge", "run", str(config), str(out), "--quiet", "--device", "cpu"],
                   env=env, cwd=REPO, check=False)
    plan = fusemerge.build_plan(config, device="cpu")
    t0 = time.perf_counter()
    resumed = journal.Journal.resume(temp_dir_path(out), plan, out)
    check_s = time.perf_counter() - t0
    assert resumed is not None and len(resumed[0].done) == len(plan.tensors), "the killed run left no full journal"
    resumed[0].close()
    shutil.rmtree(temp_dir_path(out))

    m = machine()
    on_s, off_s = statistics.median(on), statistics.median(off)
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; fusemerge {fusemerge.__version__}")
    print(f"command: python bench/resume.py --experts {args.experts} --layers {args.layers} --repeats {args.repeats}")
    print()
    print("| input | output | tensors | merge, journal on (median, min-max) | journal off | overhead | resume check |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result.input_bytes / 1e6:.0f} MB | {result.output_bytes / 1e6:.0f} MB | {len(plan.tensors)} "
          f"| {on_s:.2f} s ({min(on):.2f}-{max(on):.2f}) | {off_s:.2f} s ({min(off):.2f}-{max(off):.2f}) "
          f"| {100 * (on_s / off_s - 1):+.1f}% | {check_s:.2f} s |")
    new = not args.results.exists()
    with open(args.results, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["date", "cpu", "cores", "input_bytes", "output_bytes", "repeats", "journal_on_s",
                        "journal_off_s", "overhead_pct", "resume_check_s"])
        w.writerow([time.strftime("%Y-%m-%d %H:%M"), m["cpu"], m["cores"], result.input_bytes, result.output_bytes,
                    args.repeats, f"{on_s:.3f}", f"{off_s:.3f}", f"{100 * (on_s / off_s - 1):.1f}", f"{check_s:.3f}"])


if __name__ == "__main__":
    main()
