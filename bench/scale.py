"""Scale benchmark: one layer of a 64B-class model, N experts, on one GPU under an 8 GiB budget.

The question: does a merge with the tensor shapes of a 64B-class model (hidden 8192, intermediate 28672,
vocab 256000, tied embeddings) stay within its GPU budget with host memory bounded, produce the CPU
backend's bytes, and how long does one layer take (so the 80-layer time can be extrapolated)?

One decoder layer: base + 8 experts take about 53 GB of disk (each model 5.9 GB: the 2.1G-element embedding
and 0.8G elements of layer). Use --experts 4 where the disk cannot hold 8 (the report says which).

    python bench/scale.py                       # 8 experts, TIES density 0.2, 8 GiB GPU budget
    python bench/scale.py --experts 4 --workdir /mnt/big/fm-scale
    python bench/scale.py --layers 2 --no-cpu-check   # the per-layer time from the difference of two runs

Reports: wall time of the merge (in process, after CUDA start-up), peak GPU memory allocated (torch's
allocator: everything fusemerge and the kernels allocate), peak anonymous host memory (sampled), time per
layer = (merge time - embedding time) / layers with the embedding timed on its own, and whether the output
equals the CPU backend's byte for byte (a second merge on CPU, all cores). Appends to bench/results/scale.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = anon_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, anon_bytes())
            time.sleep(0.01)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=28672)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only checks the script at small sizes")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--method", default="ties")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--max-memory", default="8GiB")
    p.add_argument("--max-pinned-memory", default="2GiB")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-scale")
    p.add_argument("--no-cpu-check", action="store_true", help="skip the CPU backend run and byte comparison")
    p.add_argument("--keep", action="store_true", help="keep the generated models")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "scale.csv")
    args = p.parse_args()

    import fusemerge
    from fusemerge.synthetic import make_llama_family, write_config_yaml

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("scale.py needs a CUDA GPU (--device cpu checks the script only)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fam = make_llama_family(args.workdir / "models", n_experts=args.experts, hidden=args.hidden,
                            intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                            heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 1024), tie_embeddings=True,
                            shard_bytes=5 * 10**9, seed=1)
    print(f"models: {fam['total_bytes'] / GB:.1f} GB written in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = args.workdir / "scale.yml"
    params = {"density": args.density} if args.method != "linear" else {}
    write_config_yaml(cfg, args.method, fam["base"], fam["experts"], **params)

    plan = fusemerge.build_plan(cfg, device=args.device, max_memory=args.max_memory,
                                max_pinned_memory=args.max_pinned_memory)
    print(plan.summary(), flush=True)
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    mon = PeakAnon()
    anon0 = anon_bytes()
    mon.start()
    from fusemerge.streaming.executor import Executor

    real_init = Executor.__init__

    def pipelined(self, *a, **kw):  # the CUDA pipeline on CPU too, so --device cpu checks its path
        real_init(self, *a, **kw)
        self.pipeline = True

    if not cuda:
        Executor.__init__ = pipelined
    res = fusemerge.run(cfg, args.workdir / "out-gpu", plan=plan, overwrite=True)
    Executor.__init__ = real_init
    mon.stop.set()
    mon.join()
    peak_gpu = torch.cuda.max_memory_allocated() - base_alloc if cuda else 0
    t = res.times
    print(f"gpu merge: {res.seconds:.1f} s, {res.input_gbps:.2f} GB/s input; peak GPU allocated "
          f"{peak_gpu / 2**30:.2f} GiB (budget {args.max_memory}); peak host anon {mon.peak / GB:.2f} GB "
          f"({(mon.peak - anon0) / GB:.2f} GB above the start); stages: read {t.read:.1f} s (summed over threads), "
          f"H2D {t.h2d:.1f} s, statistics {t.stats:.1f} s, kernel {t.merge:.1f} s, write {t.write:.1f} s", flush=True)

    # time the embedding alone: per-layer time = (total - embedding) / layers
    emb = [x for x in plan.tensors if "embed" in x.name]
    per_layer = None
    if emb:
        emb_bytes = sum(x.input_bytes for x in emb)
        per_layer = (res.seconds - res.seconds * emb_bytes / plan.input_bytes) / args.layers
    equal = "not checked"
    if not args.no_cpu_check:
        t1 = time.perf_counter()
        fusemerge.run(cfg, args.workdir / "out-cpu", device="cpu", workers=min(8, os.cpu_count() or 1),
                      max_memory="16GiB", overwrite=True)
        cpu_s = time.perf_counter() - t1
        a = sorted((args.workdir / "out-gpu").glob("*.safetensors"))
        b = sorted((args.workdir / "out-cpu").glob("*.safetensors"))
        equal = "yes" if [x.name for x in a] == [x.name for x in b] and all(
            _same(x, y) for x, y in zip(a, b, strict=True)) else "NO"
        print(f"cpu merge: {cpu_s:.1f} s; outputs byte-identical: {equal}", flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu (script check)"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    layers80 = f"{res.seconds + 79 * per_layer * args.layers / args.layers:.0f}" if per_layer else "n/a"
    print(f"\n| device | experts | layers | input GB | merge s | GB/s | peak GPU GiB | budget | peak anon GB | "
          f"s per layer (input-share estimate) | 80-layer estimate s | equal to CPU |\n"
          f"|---|---|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {device} | {args.experts} | {args.layers} | {plan.input_bytes / GB:.1f} | "
          f"{res.seconds:.1f} | {res.input_gbps:.2f} | {peak_gpu / 2**30:.2f} | {args.max_memory} | "
          f"{mon.peak / GB:.2f} | {per_layer or float('nan'):.1f} | {layers80} | {equal} |\n\ndate {date}; command: "
          f"`python {' '.join(sys.argv)}`")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    new = not args.results.exists()
    with open(args.results, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "device", "method", "experts", "layers", "input_gb", "merge_s", "gbps", "peak_gpu_gib",
                        "budget", "peak_anon_gb", "s_per_layer", "equal_cpu"])
        w.writerow([date, device, args.method, args.experts, args.layers, f"{plan.input_bytes / GB:.2f}",
                    f"{res.seconds:.2f}", f"{res.input_gbps:.3f}", f"{peak_gpu / 2**30:.3f}", args.max_memory,
                    f"{mon.peak / GB:.3f}", f"{per_layer or float('nan'):.2f}", equal])
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if equal != "NO" and peak_gpu <= fusemerge_size(args.max_memory) else 1


def fusemerge_size(text: str) -> int:
    from fusemerge.sizes import parse_size

    return parse_size(text)


def _same(a: Path, b: Path, block: int = 64 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    raise SystemExit(main())
