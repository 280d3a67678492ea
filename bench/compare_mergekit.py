"""Side by side with mergekit 0.1.5: same config, same inputs; parity, wall time and peak memory of both.

The question: on a given mergekit config (or on synthetic Llama-shaped models, one config per method),
does fusemerge write the same model as mergekit, and where it does not, is every difference one of the
documented ones; and how long does each tool take and how much memory does it need?

Per method (row): output elements; elements more than 1 ulp (of the output dtype) apart; of those, how
many sit at a trim-threshold tie (ties / breadcrumbs: index order vs argsort), how many are DARE's (masks
differ by design), how many are float32 rounding where the sum cancels, and how many are unexplained
(see bench/parity.py); whether the outputs are byte-identical; wall time (whole process, imports
included) and peak anonymous memory (over the process tree, bench/common.py) of each tool, run one after the
other on a warm page cache. Prints a markdown table naming the machine and the command; appends rows to
bench/results/compare_mergekit.csv.

Math dtype: mergekit computes in the config's `dtype` (bf16 configs: bf16 arithmetic), fusemerge always in
float32. By default (`--math-dtype float32`) each config is run as `dtype: float32` with `out_dtype` the
original output dtype, so both tools do float32 math and round once; `--math-dtype config` keeps the
config as written (then bf16 arithmetic in mergekit shows up as unexplained differences).

mergekit lives in its own venv (`--mergekit-venv`, default mk-venv/ in the repository):

    python3 -m venv mk-venv
    mk-venv/bin/pip install torch==2.13.0 && mk-venv/bin/pip install mergekit==0.1.5

Run from the repository root:

    python bench/compare_mergekit.py                                  # 168M shape, every method
    python bench/compare_mergekit.py --hidden 256 --intermediate 688 --layers 4 --vocab 4000   # small
    python bench/compare_mergekit.py my-merge.yml                     # your own config
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import GB, append_csv, machine, read_all, timed_run, version_of  # noqa: E402
from bench.parity import compare_dirs  # noqa: E402
from fusemerge.planner import CODE_NAMES, build_plan  # noqa: E402
from fusemerge.synthetic import make_llama_family, write_config_yaml  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "della", "sce", "slerp", "model_stock",
           "nuslerp", "nearswap", "karcher", "multislerp", "ram", "ramplus_tl", "passthrough")
# ram's epsilon: about the synthetic experts' median |delta| (fusemerge.synthetic), so entries are changed by none,
# one or several experts
RAM_EPSILON = 0.0012
# mergekit's examples/gradient-slerp.yml: t by filter rules with gradients over the layers
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]
# Per-expert weights, cycled over the experts: a scalar, a gradient over the layers, filter rules.
WEIGHTS = (0.5, [0.2, 0.9], [{"filter": "mlp", "value": 0.4}, {"value": 0.7}], 0.3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", type=Path, help="a mergekit YAML; without it, synthetic models per method")
    p.add_argument("--methods", default=",".join(METHODS), help="synthetic configs to run (comma-separated)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--density", type=float, default=0.2, help="density of the trimming / DARE configs")
    p.add_argument("--math-dtype", choices=["float32", "config"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="DARE seed, passed to both tools")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-compare-mergekit")
    p.add_argument("--mergekit-venv", type=Path, default=REPO / "mk-venv",
                   help="the venv holding mergekit 0.1.5 (default: mk-venv/ in the repository, as README.md makes it)")
    p.add_argument("--fusemerge-args", default="", help="extra arguments for `fusemerge run`")
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "compare_mergekit.csv")
    return p.parse_args(argv)


def synthetic_config(method: str, fam: dict, path: Path, density: float) -> Path:
    """A config exercising `method` with gradients, filters and lambda; passthrough stacks layer ranges; slerp
    interpolates the base and the first expert over every layer (a `slices:` config, as gradient-slerp.yml);
    model_stock merges every expert onto the base; nuslerp interpolates the first two experts' task vectors (weights
    a gradient and a scalar); nearswap mixes the base and the first expert (t a gradient over the layers, around
    the synthetic experts' distance from the base); karcher averages the base and every expert; multislerp
    interpolates every expert's task vector at the cycled weights; sce keeps the --density entries of most variance."""
    base, experts = str(fam["base"]), [str(e) for e in fam["experts"]]
    if method == "slerp":
        n = fam["layers"]
        cfg = {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16", "parameters": {"t": SLERP_T},
               "slices": [{"sources": [{"model": base, "layer_range": [0, n]},
                                       {"model": experts[0], "layer_range": [0, n]}]}]}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    if method in ("model_stock", "karcher"):  # no per-model parameters
        write_config_yaml(path, method, base, experts, dtype="bfloat16")
        return path
    if method == "nuslerp":
        write_config_yaml(path, method, base, experts[:2], weight=([0.2, 0.9], 0.5), dtype="bfloat16")
        return path
    if method == "nearswap":
        cfg = {"merge_method": "nearswap", "base_model": base, "dtype": "bfloat16",
               "models": [{"model": base}, {"model": experts[0]}], "parameters": {"t": [0.0005, 0.004]}}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    if method in ("ram", "ramplus_tl"):  # no weights; epsilon near the synthetic experts' median |delta|
        cfg = {"merge_method": method, "base_model": base, "dtype": "bfloat16",
               "models": [{"model": e} for e in experts], "parameters": {"epsilon": RAM_EPSILON}}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    if method == "sce":  # no weights (they come from the deltas): select_topk, the selection, from --density
        cfg = {"merge_method": "sce", "base_model": base, "dtype": "bfloat16",
               "models": [{"model": e} for e in experts], "parameters": {"select_topk": density}}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    if method == "multislerp":
        write_config_yaml(path, method, base, experts, dtype="bfloat16",
                          weight=tuple(WEIGHTS[i % len(WEIGHTS)] for i in range(len(experts))))
        return path
    if method == "passthrough":  # a frankenmerge: overlapping halves of three models, 1.5x the layers
        n = fam["layers"]
        ranges = [(fam["base"], [0, n // 2]), (fam["experts"][0], [n // 4, 3 * n // 4]),
                  (fam["experts"][1 % len(experts)], [n // 2, n])]
        slices = [{"sources": [{"model": str(m), "layer_range": r}]} for m, r in ranges]
        cfg = {"merge_method": "passthrough", "base_model": base, "slices": slices, "dtype": "bfloat16"}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    params: dict = {"weight": tuple(WEIGHTS[i % len(WEIGHTS)] for i in range(len(experts))),
                    "dtype": "bfloat16"}
    if method != "linear":
        params["lambda"] = 0.9
    if method in ("ties", "breadcrumbs_ties", "dare_ties", "breadcrumbs", "dare_linear", "della", "della_linear"):
        params["density"] = density
    if method == "ties":
        params["normalize"] = True
    write_config_yaml(path, method, base, experts, **params)
    return path


def float32_math(config: Path, out: Path) -> Path:
    """`config` rewritten to `dtype: float32` with `out_dtype` the output dtype fusemerge's plan finds."""
    raw = yaml.safe_load(config.read_text())
    plan = build_plan(config, device="cpu", max_memory="1GiB")
    out_dtype = raw.get("out_dtype") or raw.get("dtype") or CODE_NAMES.get(plan.tensors[0].out_dtype)
    raw["dtype"] = "float32"
    if out_dtype:
        raw["out_dtype"] = out_dtype
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def input_files(config: Path) -> list[Path]:
    plan = build_plan(config, device="cpu", max_memory="1GiB")
    files = {e.file for t in plan.tensors for e in [*t.inputs, *([t.base] if t.base is not None else [])]}
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    mk_yaml = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not mk_yaml.exists():
        print(f"mergekit-yaml not found at {mk_yaml}; set up the venv (see the module docstring)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab)
    configs: list[tuple[str, Path]] = []
    if args.config is not None:
        method = str(yaml.safe_load(args.config.read_text()).get("merge_method", "?"))
        configs.append((f"{method} ({args.config.name})", args.config.resolve()))
        what = f"config {args.config}"
    else:
        root = args.workdir / "llama-h{hidden}-i{intermediate}-l{layers}-v{vocab}".format(**shape) / f"e{args.experts}"
        if not (root / "family.json").exists():
            print(f"models: generating {root} ...", flush=True)
            make_llama_family(root, n_experts=args.experts, dtype=torch.bfloat16, **shape)
        fam = {"base": root / "base", "experts": [root / f"expert_{i}" for i in range(1, args.experts + 1)],
               "layers": args.layers}
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            configs.append((method, synthetic_config(method, fam, args.workdir / f"{method}.yml", args.density)))
        what = (f"synthetic Llama h{args.hidden} i{args.intermediate} L{args.layers} V{args.vocab}, base + "
                f"{args.experts} experts, bf16 (fusemerge.synthetic.make_llama_family)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    rows, table = [], []
    for label, config in configs:
        run_config = float32_math(config, args.workdir / f"{config.stem}.f32.yml") \
            if args.math_dtype == "float32" else config
        inputs = input_files(run_config)
        input_bytes = sum(f.stat().st_size for f in inputs)
        outs = {tool: args.workdir / f"out-{config.stem}-{tool}" for tool in ("fusemerge", "mergekit")}
        cmds = {
            "fusemerge": [sys.executable, "-m", "fusemerge", "run", str(run_config), str(outs["fusemerge"]), "--quiet",
                          "--overwrite", "--device", "cpu", "--seed", str(args.seed),
                          *shlex.split(args.fusemerge_args)],
            "mergekit": [str(mk_yaml), str(run_config), str(outs["mergekit"]), "--quiet", "--random-seed",
                         str(args.seed), *shlex.split(args.mergekit_args)],
        }
        res = {}
        for tool, cmd in cmds.items():
            shutil.rmtree(outs[tool], ignore_errors=True)
            read_all(inputs)  # page cache warm, the same for both tools
            r = timed_run(cmd, args.workdir / f"{config.stem}-{tool}.log", env, cwd=Path.cwd())
            print(f"{label}: {tool} rc {r['rc']}, {r['wall']:.2f} s, peak anon {r['anon'] / GB:.3f} GB", flush=True)
            if r["rc"] != 0:
                print((args.workdir / f"{config.stem}-{tool}.log").read_text()[-3000:], file=sys.stderr)
            res[tool] = r
        if any(r["rc"] != 0 for r in res.values()):
            table.append(f"| {label} | failed: " + ", ".join(f"{t} exit {r['rc']}" for t, r in res.items()) + " |")
            continue
        par = compare_dirs(outs["fusemerge"], outs["mergekit"], run_config)
        f, k = res["fusemerge"], res["mergekit"]
        identical = "yes" if par.identical_bytes else ("names/shapes differ" if par.problems else "no")
        table.append(
            f"| {label} | {par.elements:,} | {par.differ:,} | {par.tie:,} | {par.dare:,} | {par.rounding:,} "
            f"| **{par.unexplained:,}** | {identical} | {f['wall']:.2f} | {k['wall']:.2f} "
            f"| {f['wall'] / k['wall']:.3f}x "
            f"| {f['anon'] / GB:.3f} | {k['anon'] / GB:.3f} | {f['anon'] / k['anon']:.3f}x |")
        rows.append({"method": label, "input_gb": f"{input_bytes / GB:.4f}", "elements": par.elements,
                     "differ_gt_1ulp": par.differ, "threshold_ties": par.tie, "dare_by_design": par.dare,
                     "f32_rounding": par.rounding, "unexplained": par.unexplained,
                     "byte_identical": par.identical_bytes, "problems": "; ".join(par.problems),
                     **{f"{t}_{key}": f"{res[t][key] / (GB if key in ('anon', 'rss') else 1):.4f}"
                        for t in res for key in ("wall", "cpu", "anon", "rss")},
                     "config": str(config), "math_dtype": args.math_dtype})
    m = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"fusemerge": version_of(sys.executable, "fusemerge"), "torch": torch.__version__,
                "mergekit": version_of(args.mergekit_venv / "bin" / "python", "mergekit"),
                "mergekit_torch": version_of(args.mergekit_venv / "bin" / "python", "torch")}
    print(f"\n## fusemerge vs mergekit {versions['mergekit']}: {what}\n\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; CPU only (device cpu); {date}\n"
          f"- versions: fusemerge {versions['fusemerge']} (torch {versions['torch']}), mergekit "
          f"{versions['mergekit']} (torch {versions['mergekit_torch']})\n"
          f"- command: `{command}`; math dtype: {args.math_dtype}; page cache warm; one run per tool\n\n"
          "| method | elements | > 1 ulp | at threshold ties | DARE (by design) | f32 rounding | unexplained "
          "| byte-identical | fusemerge s | mergekit s | time ratio | fusemerge peak GB | mergekit peak GB "
          "| memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print("\n> 1 ulp: elements more than 1 ulp of the output dtype apart; the next four columns split them "
          "(bench/parity.py). Times: whole process, imports included. Peak: anonymous memory (RssAnon) of the "
          "process tree, sampled every ~5 ms, pages forked processes share counted once. GB = 10^9 bytes.")
    for row in rows:
        row.update(date=date, **m, fusemerge_version=versions["fusemerge"], mergekit_version=versions["mergekit"],
                   torch=versions["torch"], command=command, **shape, experts=args.experts)
    if rows:
        append_csv(args.results, rows)
    return 0 if len(rows) == len(configs) else 1


if __name__ == "__main__":
    sys.exit(main())
