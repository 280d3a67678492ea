"""End-to-end merge benchmark: fusemerge side by side with mergekit 0.1.5.

The one question: how long does a whole merge of a synthetic Llama-shaped model take (wall
time of the whole process, imports included), how much anonymous memory does it need at peak,
and at what rate does it consume its inputs (input GB/s = bytes of all input safetensors /
wall time), compared with mergekit on the same machine and the same YAML?

Both tools run as subprocesses on the same config, after the page cache has been warmed the
same way (every input file read once). A monitor thread samples RssAnon and VmRSS from
/proc/<pid>/status every ~5 ms over the child and all its descendants (summed over the tree; the
copy-on-write pages forked processes share counted once, bench/common.py);
ru_maxrss comes from os.wait4 on the child (it counts file-backed mmap pages too). Outputs of
the two tools are compared tensor by tensor (fraction of elements more than 1 ulp apart in the
output dtype). Rows are appended to a CSV so the history stays. GB = 10^9 bytes.

Setup (mergekit lives in its own venv; always pin torch first so pip does not pull another one):

    python3 -m venv mk-venv
    mk-venv/bin/pip install torch==2.13.0
    mk-venv/bin/pip install mergekit==0.1.5

Run (from the repository root; models are generated once under --workdir and reused):

    python bench/e2e.py --method ties --density 0.2 --experts 4
    python bench/e2e.py --hidden 256 --intermediate 688 --layers 2 --vocab 4000   # a quick check
    python bench/e2e.py --tools mergekit                                            # mergekit only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import GB, append_csv, machine, read_all, timed_run, version_of  # noqa: E402
from bench.parity import compare_outputs  # noqa: E402
from fusemerge.synthetic import make_llama_family, save_as_bin, write_config_yaml  # noqa: E402

DENSITY_METHODS = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The method and the synthetic family's shape: what `ensure_models` and the config need."""
    p.add_argument("--method", default="ties")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--trim-scope", choices=["tensor", "global"], default="tensor",
                   help="trim_scope of the TIES-family methods (global: one threshold per expert over the whole model; "
                        "mergekit has no such scope)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", help="dtype of the synthetic models and of the merge output")
    p.add_argument("--input-shard-size", type=int, default=None, help="shard the input models (bytes)")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                   help="file format of the inputs: bin saves each model with torch.save (pytorch_model.bin, or "
                        "pytorch_model-*-of-*.bin shards and their index with --input-shard-size)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--merge-dtype", default=None, help="config `dtype:` (mergekit computes in it); default --dtype")
    p.add_argument("--out-shard-size", type=int, default=5_000_000_000, help="bytes, passed to both tools")
    p.add_argument("--seed", type=int, default=0, help="DARE seed, passed to both tools")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench-e2e")
    p.add_argument("--mergekit-venv", type=Path, default=REPO / "mk-venv",
                   help="the venv holding mergekit 0.1.5 (default: mk-venv/ in the repository, as README.md makes it)")
    p.add_argument("--fusemerge-args", default="", help="extra arguments for `fusemerge run`, e.g. '--max-memory 2GiB'")
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml, e.g. '--lazy-unpickle'")
    p.add_argument("--tools", default="fusemerge,mergekit", help="comma-separated subset of fusemerge,mergekit")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mergekit-cmd", default=None,
                   help="command running mergekit-yaml instead of the venv's: 'python3 -m mergekit.scripts.run_yaml'")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before every run (root only) instead of warming it; implies --drop-caches")
    p.add_argument("--drop-caches", action="store_true",
                   help="also time a cold read of the inputs (writes /proc/sys/vm/drop_caches: needs root)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "e2e.csv")
    return p.parse_args(argv)


def ensure_models(args: argparse.Namespace) -> dict:
    """Generate the synthetic family once per shape; reuse it when family.json matches."""
    dtype = getattr(torch, args.dtype)
    key = f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-e{args.experts}-{args.dtype}"
    root = args.workdir / (key + (f"-s{args.input_shard_size}" if args.input_shard_size else "")
                           + ("-bin" if args.format == "bin" else ""))
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab)
    meta = root / "family.json"
    if meta.exists():
        spec = json.loads(meta.read_text())["spec"]
        if all(spec[k] == v for k, v in shape.items()) and spec["n_experts"] == args.experts:
            print(f"models: reusing {root}")
            experts = [root / f"expert_{i}" for i in range(1, args.experts + 1)]
            return {"base": root / "base", "experts": experts}
    print(f"models: generating {root} ...", flush=True)
    t0 = time.perf_counter()
    fam = make_llama_family(root, n_experts=args.experts, dtype=dtype, shard_bytes=args.input_shard_size, **shape)
    if args.format == "bin":
        meta.rename(meta.with_suffix(".converting"))  # not reused until every model is converted
        for model in [fam["base"], *fam["experts"]]:
            save_as_bin(model)
        meta.with_suffix(".converting").rename(meta)
    print(f"models: {fam['total_bytes'] / GB:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return fam


def input_files(fam: dict) -> list[Path]:
    """The tensor files (safetensors or .bin) of the family's base and experts."""
    return sorted(f for d in [fam["base"], *fam["experts"]] for pattern in ("*.safetensors", "pytorch_model*.bin")
                  for f in Path(d).glob(pattern))


def method_params(args: argparse.Namespace) -> dict:
    """The config parameters `add_model_args` set: the density where the method takes one, the trim scope."""
    params = {"density": args.density} if args.method in DENSITY_METHODS else {}
    if args.trim_scope == "global":
        params["trim_scope"] = "global"
    return params

def drop_caches() -> bool:
    """Drop the page cache (root only); False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def cold_read(files: list[Path], rounds: int) -> dict[str, float] | None:
    """Median seconds, over `rounds`, to read every file from a dropped page cache (None when not permitted).

    Two ways: "sequential" (one file after another, one stream) and "concurrent" (one thread per file, at
    most 8, as fusemerge's readers overlap). The I/O floor is the faster of the two medians.
    """
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for _ in range(rounds):
        for way, threads in (("sequential", 1), ("concurrent", min(8, len(files)))):
            if not drop_caches():
                return None
            times[way].append(read_all(files, threads=threads))
    return {way: statistics.median(ts) for way, ts in times.items()}


def pinned_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Median host-to-device bandwidth (GB/s) of one pinned buffer of `nbytes`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / GB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    notes: list[str] = []
    mk_yaml = args.mergekit_venv / "bin" / "mergekit-yaml"
    mk_cmd = shlex.split(args.mergekit_cmd) if args.mergekit_cmd else [str(mk_yaml)]
    if "mergekit" in tools and not args.mergekit_cmd and not mk_yaml.exists():
        notes.append(f"mergekit skipped: {mk_yaml} does not exist (see the module docstring for its venv)")
        tools.remove("mergekit")
    if "fusemerge" in tools and not (REPO / "fusemerge" / "cli.py").exists():
        notes.append("fusemerge skipped: fusemerge/cli.py does not exist yet")
        tools.remove("fusemerge")
    args.workdir.mkdir(parents=True, exist_ok=True)
    fam = ensure_models(args)
    inputs = input_files(fam)
    input_bytes = sum(f.stat().st_size for f in inputs)
    params = method_params(args)
    if args.trim_scope == "global":
        if "mergekit" in tools:
            notes.append("mergekit skipped: it has no trim_scope: global")
            tools.remove("mergekit")
    merge_dtype = args.merge_dtype or args.dtype
    params["dtype"] = merge_dtype
    if merge_dtype != args.dtype:
        params["out_dtype"] = args.dtype
    config = args.workdir / (f"{args.method}.yml" if args.trim_scope == "tensor" else f"{args.method}-global.yml")
    write_config_yaml(config, args.method, fam["base"], fam["experts"], **params)
    cold = cold_read(inputs, rounds=max(1, args.repeats)) if args.drop_caches or args.cold else None
    if args.cold and cold is None:
        notes.append("--cold: the page cache could not be dropped (not root?); runs are warm")
        args.cold = False
    read_all(inputs)
    warm_read_s = read_all(inputs)
    ceiling = input_bytes / warm_read_s / GB  # warm page-cache read rate: the end-to-end ceiling
    h2d = pinned_h2d_gbps() if args.device == "cuda" else None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmds = {
        "fusemerge": [
            sys.executable,
            "-m",
            "fusemerge",
            "run",
            str(config),
            str(args.workdir / "out-fusemerge"),
            "--overwrite",
            "--device",
            args.device,
            "--out-shard-size",
            str(args.out_shard_size),
            "--seed",
            str(args.seed),
            *shlex.split(args.fusemerge_args),
        ],
        "mergekit": [
            *mk_cmd,
            str(config),
            str(args.workdir / "out-mergekit"),
            "--quiet",
            "--out-shard-size",
            str(args.out_shard_size),
            "--random-seed",
            str(args.seed),
            *(["--cuda"] if args.device == "cuda" else []),
            *shlex.split(args.mergekit_args),
        ],
    }
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        for tool in tools:
            shutil.rmtree(args.workdir / f"out-{tool}", ignore_errors=True)
            if args.cold:
                drop_caches()  # page cache: cold, the same for every tool and repeat
            else:
                read_all(inputs)  # page cache: warm, the same for every tool and repeat
            load = os.getloadavg()[0]
            r = timed_run(cmds[tool], args.workdir / f"{tool}.log", env)
            r["load"] = load
            print(
                f"{tool} run {rep + 1}/{args.repeats}: rc {r['rc']}, {r['wall']:.2f} s, "
                f"peak anon {r['anon'] / GB:.2f} GB, load {load:.2f}",
                flush=True,
            )
            if r["rc"] != 0:
                tail = (args.workdir / f"{tool}.log").read_text()[-3000:]
                notes.append(f"{tool} failed (exit {r['rc']}); log tail:\n{tail}")
                break
            if tool == "fusemerge":
                found = re.search(r"\) in ([0-9.]+) s \(", (args.workdir / "fusemerge.log").read_text())
                r["merge_s"] = float(found.group(1)) if found else float("nan")
            runs[tool].append(r)
    summary = {}
    for tool, rs in runs.items():
        if rs:
            wall = statistics.median(r["wall"] for r in rs)
            summary[tool] = {
                "wall": wall,
                "cpu": statistics.median(r["cpu"] for r in rs),
                **{key: max(r[key] for r in rs) for key in ("anon", "rss", "maxrss", "load")},
                "gbps": input_bytes / wall / GB,
            }
    parity = ""
    if not args.no_compare and len(summary) == 2:
        parity = compare_outputs(args.workdir / "out-fusemerge", args.workdir / "out-mergekit", config)
    mk_python = Path(mk_cmd[0]) if args.mergekit_cmd else args.mergekit_venv / "bin" / "python"
    have_mk = bool(args.mergekit_cmd) or mk_yaml.exists()
    versions = {
        "fusemerge": version_of(sys.executable, "fusemerge"),
        "torch": torch.__version__,
        "mergekit": version_of(mk_python, "mergekit") if have_mk else "n/a",
        "mergekit_torch": version_of(mk_python, "torch") if have_mk else "n/a",
    }
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n## e2e: {args.method} (density {args.density}"
        + (", trim_scope: global" if args.trim_scope == "global" else "")
        + f"), {args.experts} experts, Llama h{args.hidden} "
        f"i{args.intermediate} L{args.layers} V{args.vocab} {args.dtype} (merge dtype {merge_dtype})\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; device {args.device}; load avg (1 min) "
        "before the runs: " + ", ".join(f"{t} {s['load']:.2f}" for t, s in summary.items()) + "\n"
        f"- versions: fusemerge {versions['fusemerge']}, mergekit {versions['mergekit']}, torch {versions['torch']} "
        f"(mergekit venv: torch {versions['mergekit_torch']}); date {date}\n"
        f"- command: `{command}`"
    )
    for tool in runs:
        print(f"- {tool}: `{shlex.join(cmds[tool])}`")
    print(
        f"- inputs: {len(inputs)} files, {input_bytes / GB:.3f} GB; page cache: "
        + ("cold (dropped before each run)" if args.cold else "warm (inputs read once before each run)")
        + f"; warm read ceiling {ceiling:.2f} GB/s\n\n"
        f"| tool | wall s (median of {args.repeats}) | CPU s | peak anon GB | peak RSS GB | ru_maxrss GB | input GB/s "
        "| of read ceiling |\n|---|---|---|---|---|---|---|---|"
    )
    for tool, s in summary.items():
        print(
            f"| {tool} | {s['wall']:.2f} | {s['cpu']:.1f} | {s['anon'] / GB:.3f} | {s['rss'] / GB:.3f} "
            f"| {s['maxrss'] / GB:.3f} | {s['gbps']:.3f} | {s['gbps'] / ceiling:.1%} |"
        )
    if len(summary) == 2:
        f, k = summary["fusemerge"], summary["mergekit"]
        ratios = [f[key] / k[key] for key in ("wall", "cpu", "anon", "rss", "maxrss", "gbps")]
        print("| fusemerge / mergekit | " + " | ".join(f"{r:.3f}x" for r in ratios) + " | |")
    print(
        "\nwall: whole process (imports included). peak anon / RSS: max over time of the sum over the process "
        "tree, sampled every ~5 ms; ru_maxrss from wait4 (includes file-backed mmap pages). GB = 10^9 bytes."
    )
    if "fusemerge" in summary:
        merge_s = statistics.median(r["merge_s"] for r in runs["fusemerge"])
        floor_terms = {"warm read": warm_read_s}
        if cold is not None:
            way = min(cold, key=cold.get)
            floor_terms[f"cold read ({way})"] = cold[way]
        if h2d is not None:
            floor_terms["input / pinned H2D"] = input_bytes / GB / h2d
        floor_name, floor = max(floor_terms.items(), key=lambda kv: kv[1])
        print("\nI/O floor: " + ", ".join(f"{k} {v:.2f} s" for k, v in floor_terms.items())
              + (f" (pinned H2D {h2d:.1f} GB/s)" if h2d is not None else "")
              + f"; fusemerge merge time (its own summary line, after imports and device start-up) {merge_s:.2f} s"
              f" = {merge_s / floor:.2f}x the floor ({floor_name}); whole process {summary['fusemerge']['wall']:.2f} s"
              f" = {summary['fusemerge']['wall'] / floor:.2f}x")
        if cold is not None:
            print(f"cold reads of the inputs, median of {max(1, args.repeats)}: "
                  + ", ".join(f"{way} {t:.2f} s ({input_bytes / t / GB:.2f} GB/s)" for way, t in cold.items()))
    if parity:
        print(f"\noutputs, fusemerge vs mergekit: {parity}")
        if merge_dtype != "float32":
            print(f"(mergekit does its arithmetic in the config's dtype, {merge_dtype}; fusemerge always in float32, "
                  "so 'unexplained' here includes mergekit's own rounding. `--merge-dtype float32` compares the "
                  "methods alone; bench/compare_mergekit.py does that by default.)")
    for note in notes:
        print(f"\nnote: {note}")
    shape = {k: getattr(args, k) for k in ("method", "density", "experts", "hidden", "intermediate", "layers", "vocab")}
    if args.trim_scope == "global":
        shape["method"] = f"{args.method} (trim_scope global)"
    rows = [
        {
            "date": date,
            **m,
            "device": args.device,
            "tool": tool,
            "version": versions[tool],
            "torch": versions["torch" if tool == "fusemerge" else "mergekit_torch"],
            **shape,
            "dtype": args.dtype,
            "format": args.format,
            "merge_dtype": merge_dtype,
            "repeats": args.repeats,
            "wall_s": f"{s['wall']:.3f}",
            "cpu_s": f"{s['cpu']:.2f}",
            "peak_anon_gb": f"{s['anon'] / GB:.4f}",
            "peak_rss_gb": f"{s['rss'] / GB:.4f}",
            "ru_maxrss_gb": f"{s['maxrss'] / GB:.4f}",
            "input_gb": f"{input_bytes / GB:.4f}",
            "input_gbps": f"{s['gbps']:.4f}",
            "read_ceiling_gbps": f"{ceiling:.3f}",
            "load1": f"{s['load']:.2f}",
            "page_cache": "cold" if args.cold else "warm",
            "parity": parity,
            "tool_command": shlex.join(cmds[tool]),
            "command": command,
        }
        for tool, s in summary.items()
    ]
    if rows:
        append_csv(args.results, rows)
    return 1 if any("failed" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
