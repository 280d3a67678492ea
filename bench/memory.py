"""Does `--max-memory` bound the merge's memory, whatever the size of one tensor?

One question: a model whose embedding alone is 64M elements (vocab 65536 x hidden 1024, bf16, tied),
merged from 4 experts + base under a small `--max-memory`, must stay within about 2x the budget above
the interpreter's own baseline (python + torch + fusemerge imported), and write the same bytes as a run
with the default budget.

    python bench/memory.py                       # ties, 64MiB, 4 experts
    python bench/memory.py --method dare_ties --budget 128MiB

Peak anonymous memory is RssAnon summed over the process tree, sampled every ~5 ms, pages that forked
processes share counted once (bench/common.py's monitor); the baseline is the same measurement of a
process that imports fusemerge and exits.
Rows are appended to bench/results/memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from e2e import REPO, machine, timed_run

sys.path.insert(0, str(REPO))
from fusemerge.sizes import format_size, parse_size  # noqa: E402
from fusemerge.synthetic import make_llama_family, write_config_yaml  # noqa: E402

PARAMS = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.3}, "task_arithmetic": {}, "breadcrumbs": {
    "density": 0.2, "gamma": 0.01}, "linear": {}}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="ties", choices=sorted(PARAMS))
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench-memory")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "memory.csv")
    args = ap.parse_args(argv)

    root = args.workdir / f"v{args.vocab}-h{args.hidden}-e{args.experts}"
    if not (root / "family.json").exists():
        make_llama_family(root, n_experts=args.experts, hidden=args.hidden, intermediate=256, layers=1,
                          vocab=args.vocab, tie_embeddings=True, seed=0)
    base, experts = root / "base", [root / f"expert_{i}" for i in range(1, args.experts + 1)]
    cfg = args.workdir / f"{args.method}.yml"
    write_config_yaml(cfg, args.method, base, experts, **PARAMS[args.method])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    py = sys.executable

    baseline = timed_run([py, "-c", "import time, torch, fusemerge, fusemerge.cli; time.sleep(0.5)"],
                         args.workdir / "baseline.log", env)
    runs = {}
    for label, extra in (("bounded", ["--max-memory", args.budget]), ("default", [])):
        out = args.workdir / f"out-{label}"
        cmd = [py, "-m", "fusemerge", "run", str(cfg), str(out), "--quiet", "--overwrite", "--device", "cpu", *extra]
        r = timed_run(cmd, args.workdir / f"{label}.log", env)
        if r["rc"] != 0:
            print((args.workdir / f"{label}.log").read_text(), file=sys.stderr)
            return 1
        r["digest"] = digest(out)
        runs[label] = r

    budget = parse_size(args.budget)
    above = runs["bounded"]["anon"] - baseline["anon"]
    emb = args.vocab * args.hidden
    m = machine()
    print(f"## memory: {args.method}, {args.experts} experts + base, embedding {emb / 2**20:.0f}M elements "
          f"(bf16, tied)\n")
    print(f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; date "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- command: `python bench/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| run | --max-memory | wall s | peak anon | above baseline | / budget | output sha256 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| baseline (import only) | - | {baseline['wall']:.2f} | {format_size(baseline['anon'])} | - | - | - |")
    for label, r in runs.items():
        b = args.budget if label == "bounded" else "default"
        over = r["anon"] - baseline["anon"]
        ratio = f"{over / budget:.2f}x" if label == "bounded" else "-"
        print(f"| {label} | {b} | {r['wall']:.2f} | {format_size(r['anon'])} | {format_size(over)} | {ratio} "
              f"| {r['digest']} |")
    same = runs["bounded"]["digest"] == runs["default"]["digest"]
    print(f"\nsame bytes: {'yes' if same else 'NO'}; bounded run: {above / budget:.2f}x the budget above baseline")

    args.results.parent.mkdir(parents=True, exist_ok=True)
    new = not args.results.exists()
    with open(args.results, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["date", "cpu", "method", "experts", "embedding_elems", "budget", "baseline_anon",
                        "bounded_anon", "default_anon", "ratio_above_baseline", "same_bytes", "bounded_wall_s"])
        w.writerow([time.strftime("%Y-%m-%d %H:%M"), m["cpu"], args.method, args.experts, emb, budget,
                    baseline["anon"], runs["bounded"]["anon"], runs["default"]["anon"], f"{above / budget:.3f}",
                    same, f"{runs['bounded']['wall']:.2f}"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
