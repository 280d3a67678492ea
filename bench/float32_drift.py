"""How far are mergekit's float32 karcher and multislerp from their float64 values, and how far is fusemerge?

The one question: where fusemerge and mergekit 0.1.5 disagree on a karcher or multislerp merge
(bench/compare_mergekit.py counts those elements as "unexplained"), which tool is off? For each tensor of a
config, three results against mergekit's own code run in float64 on the same inputs (the reference):
- fusemerge: `merge_tensors` with the tensor's resolved parameters (what `fusemerge run` writes);
- mergekit in float32: its code as it reads (merge_methods/karcher.py, multislerp.py; written out in
  tests/kernels/test_karcher.py and test_multislerp.py), as a `dtype: float32` config runs it, in this
  process's torch;
then the elements of each, rounded to bf16, more than one bf16 ulp (of the float64 value) from the reference.
For karcher it also prints mergekit's last step norm: its float32 iteration stops only once a step is below
`tol`, which float32 noise in the angles of nearly parallel models can keep it from reaching.

Run (from the repository root; the config's models must exist, e.g. after bench/compare_mergekit.py):

    python bench/float32_drift.py /tmp/fusemerge-compare-mergekit/karcher.f32.yml
    python bench/float32_drift.py /tmp/fusemerge-compare-mergekit/multislerp.f32.yml --tensors 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine  # noqa: E402
from fusemerge import merge_tensors  # noqa: E402
from fusemerge.planner import build_plan  # noqa: E402
from fusemerge.streaming.reader import ChunkReader  # noqa: E402
from tests.kernels.test_karcher import mergekits_steps as karcher_mergekit  # noqa: E402
from tests.kernels.test_multislerp import mergekits as multislerp_mergekit  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", type=Path, help="a karcher or multislerp config (mergekit YAML)")
    p.add_argument("--tensors", type=int, default=0, help="only the first N tensors, largest first (0: all)")
    return p.parse_args(argv)


def over_one_ulp(y: torch.Tensor, ref: torch.Tensor) -> int:
    """Elements of y, rounded to bf16, more than one bf16 ulp of the float64 `ref` away from it."""
    ulp = (ref.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
    return int(((y.reshape(-1).to(torch.bfloat16).double() - ref).abs() > ulp).sum())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args.config, device="cpu", max_memory="1GiB")
    method = plan.method
    if not (method.is_karcher or method.is_multislerp):
        print(f"{args.config}: merge_method {method.name}; this script compares karcher and multislerp",
              file=sys.stderr)
        return 2
    tensors = sorted(plan.tensors, key=lambda t: -t.numel)
    tensors = tensors[:args.tensors] if args.tensors else tensors
    m = machine()
    print(f"# float32 drift of {method.name}\n\n- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; "
          f"torch {torch.__version__}\n- command: `python bench/float32_drift.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| tensor | elements | fusemerge > 1 ulp | mergekit float32 > 1 ulp |"
          + (" mergekit's last step |" if method.is_karcher else ""))
    print("|---|---:|---:|---:|" + ("---:|" if method.is_karcher else ""))
    totals = [0, 0, 0]
    with ChunkReader() as reader:
        for t in tensors:
            xs = [reader.read_tensor(e).float() for e in t.inputs]
            base = reader.read_tensor(t.base).float() if t.base is not None else None
            extra = ""
            if method.is_karcher:
                max_iter, tol = t.karcher
                ref = karcher_mergekit(xs, max_iter, tol)[0]
                ours = merge_tensors(None, xs, "karcher", max_iter=max_iter, tol=tol)
                theirs, step = karcher_mergekit(xs, max_iter, tol, torch.float32)
                extra = f" {step:.3g} |"
            else:
                ref = multislerp_mergekit(xs, t.weights, base, t.normalize, t.eps)
                ours = merge_tensors(base, xs, "multislerp", weight=t.weights, normalize_weights=t.normalize,
                                     eps=t.eps)
                theirs = multislerp_mergekit(xs, t.weights, base, t.normalize, t.eps, torch.float32)
            a, b = over_one_ulp(ours.to(torch.bfloat16), ref), over_one_ulp(theirs, ref)
            totals = [totals[0] + ref.numel(), totals[1] + a, totals[2] + b]
            print(f"| {t.name} | {ref.numel():,} | {a:,} | {b:,} |{extra}")
    print(f"| all | {totals[0]:,} | {totals[1]:,} | {totals[2]:,} |" + (" |" if method.is_karcher else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
