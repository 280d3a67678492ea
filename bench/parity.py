"""Compare a fusemerge output with a mergekit output of the same config, and explain the differences.

An element *differs* when the two outputs are more than 1 ulp of the output dtype apart (the ulp of the
larger magnitude of the two). Each differing element is then put in the first class that explains it:

- `tie`: for trimming methods (ties, breadcrumbs, breadcrumbs_ties), some expert's |delta| there equals
  one of that expert's cut values (the k-th largest |delta|; for breadcrumbs also the largest dropped
  outlier's magnitude). fusemerge keeps the lowest indices among tied entries, mergekit keeps argsort's
  pick, so the kept sets differ on those entries only (a documented difference).
  For sce, the entries whose variance over the experts equals the k-th largest (its selection's cut); the
  weights it finds from the kept entries then differ too, which `rounding` allows for.
- `dare`: for DARE methods every differing element, and for DELLA's (della, della_linear) those of a tensor
  with a density below 1; the masks differ by design (fusemerge's Philox stream keyed by seed, tensor and
  expert vs mergekit's global torch RNG), so no element-wise agreement is expected.
- `rounding`: the difference is within float32 rounding of the terms that were summed: at most
  `2 (n + 3) 2^-24 S`, S = the sum of the magnitudes of the weighted terms (n inputs). This only
  exceeds 1 output ulp where the terms cancel to far below their size (e.g. a result of 3e-10 from
  terms of 0.01), where mergekit's fused multiply-adds (torch.addcmul) or summation order give other
  low bits than fusemerge's separate multiply-then-add in input order.
  For slerp, model_stock and karcher the weighted terms are the models' with fusemerge's weights, and the bound adds
  2^-12 (sum |w_i|)(sum |x_i|): mergekit finds the angles between the tensors in float32 (norms of chunk
  norms, float32 dot products), fusemerge from exact sums (kernels/slerp.py, kernels/model_stock.py), and on
  the 168M model of bench/compare_mergekit.py the two tools' slerp weights differ by up to 1.05e-5 of their
  sum. An element where the terms do not cancel is within 2^-12 of its size of both tools' values, less than
  a bf16 ulp (2^-8). For sce with a selection the bound adds 4 r sum |d_i|, r the largest share of an expert's
  sum of squares that sits on the selection's tied entries (which the two tools may keep differently).
- `unexplained`: everything else.

The explanations need each output tensor's inputs and resolved parameters; they come from fusemerge's
own plan of the config (`fusemerge.planner.build_plan`, headers only), so slices configs are explained too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from fusemerge.planner import FLOAT_CODES, TensorPlan, build_plan  # noqa: E402
from fusemerge.streaming.reader import ChunkReader  # noqa: E402

EPS32 = 2.0**-24  # float32 unit roundoff
ANGLE_WEIGHTS = 2.0**-12  # how far mergekit's float32 slerp / model_stock weights may be from fusemerge's, of their sum


@dataclass
class Parity:
    """Element counts over a whole model; `per_tensor` lists (name, differing, unexplained) for differing tensors."""

    elements: int = 0
    identical_bytes: bool = True
    differ: int = 0  # > 1 ulp of the output dtype
    tie: int = 0
    dare: int = 0
    rounding: int = 0
    unexplained: int = 0
    max_abs: float = 0.0
    problems: list[str] = field(default_factory=list)  # names / shapes / dtypes that do not match
    per_tensor: list[tuple[str, int, int]] = field(default_factory=list)

    def summary(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        if self.identical_bytes:
            return f"byte-identical ({self.elements} elements)"
        return (f"{self.differ} of {self.elements} elements differ by > 1 ulp ({self.differ / self.elements:.3e}; "
                f"max |diff| {self.max_abs:.3g}): {self.tie} at trim-threshold ties, {self.dare} DARE (masks differ by "
                f"design), {self.rounding} float32 rounding where the sum cancels, {self.unexplained} unexplained")


def model_tensors(d: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of model directory `d` holding it."""
    return {name: f for f in sorted(Path(d).glob("*.safetensors")) for name in safe_open(f, "pt").keys()}


def ulp_over(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|a - b| in float32, mask of elements more than 1 ulp of the inputs' dtype apart)."""
    mant = round(-torch.log2(torch.tensor(torch.finfo(xa.dtype).eps)).item())  # stored mantissa bits
    a, b = xa.float(), xb.float()
    diff = (a - b).abs()
    _, exp = torch.frexp(torch.maximum(a.abs(), b.abs()))
    ulp = torch.ldexp(torch.ones(()), (exp - 1 - mant).clamp(min=-149).float())
    return diff, diff > ulp


def _cut_values(mag: torch.Tensor, sparsifier: str, density: float, gamma: float) -> list[float]:
    """The |delta| values at which mergekit's and fusemerge's kept sets may differ for one expert."""
    n = mag.numel()
    if density >= 1 or n == 0:
        return []
    if sparsifier == "magnitude":
        k = max(1, int(density * n))
        return [mag.kthvalue(n - k + 1).values.item()] if k < n else []
    # breadcrumbs (mergekit sparsify.magnitude_outliers): keep ascending ranks [n_bot, n_bot + target)
    target = int(density * n)
    top = int(gamma * n)
    bot = max(0, n - target - top)
    cuts = []
    if 0 < bot < n:
        cuts += [mag.kthvalue(bot).values.item(), mag.kthvalue(bot + 1).values.item()]
    if 0 < bot + target < n:
        cuts += [mag.kthvalue(bot + target).values.item(), mag.kthvalue(bot + target + 1).values.item()]
    return cuts


def explain(t: TensorPlan, method, reader: ChunkReader, diff: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """Classify the differing elements `mask` (flat) of output tensor `t` (see the module docstring)."""
    left = mask.clone()
    counts = {"tie": 0, "dare": 0, "rounding": 0}
    if method.sparsifier == "dare" or (method.sparsifier == "della" and min(t.density, default=1.0) < 1.0):
        counts["dare"] = int(left.sum())
        return counts
    xs = [reader.read_tensor(e).float().reshape(-1) for e in t.inputs]
    base = reader.read_tensor(t.base).float().reshape(-1) if t.base is not None else None
    if method.needs_thresholds and base is not None:
        tie = torch.zeros_like(left)
        gamma = t.gamma or [0.0] * len(xs)
        for i, x in enumerate(xs):
            mag = (x - base).abs()
            for c in _cut_values(mag, method.sparsifier, t.density[i], gamma[i]):
                tie |= mag == c
        counts["tie"] = int((left & tie).sum())
        left &= ~tie
    sce_extra = 0.0
    if method.is_sce and base is not None and (t.select_topk if t.select_topk is not None else 1.0) < 1.0:
        tie = _sce_ties(xs, base, t.select_topk)
        counts["tie"] = int((left & tie).sum())
        left &= ~tie
        # The tied entries the two tools keep differ, and so do the sums of squares the weights come from: each
        # expert's by at most its tied entries' share r_i, each weight w_i = m_i / sum m by at most 2 max r
        # (relative), and each entry's weighted mean of the agreeing deltas by at most twice that.
        ds = [x - base for x in xs]
        share = [float((d[tie] ** 2).sum()) / max(float((d ** 2).sum()), 1e-300) for d in ds]
        sce_extra = 4 * max(share) * sum(d.abs() for d in ds)
    stat_weights = method.tensor_weights or method.is_sce  # from a statistics pass, not the config
    if bool(left.any()):
        w = [abs(v) for v in (_angle_weights(method, t, xs, base) if stat_weights else t.weights)]
        extra = 0.0
        if method.combines_models:
            s = sum(wi * x.abs() for wi, x in zip(w, xs, strict=True))
            den = abs(sum(t.weights)) if t.normalize else 1.0
            if method.tensor_weights:
                extra = ANGLE_WEIGHTS * sum(w) * sum(x.abs() for x in xs)
        else:
            if stat_weights:  # nuslerp with a base, sce: the weights of the deltas
                extra = ANGLE_WEIGHTS * sum(w) * sum((x - base).abs() for x in xs)
            s = sum(wi * (x.abs() + base.abs()) for wi, x in zip(w, xs, strict=True)) * abs(t.lam)
            # sce divides by its agreeing weights' sum as a normalized sign consensus does
            den = (min(w) if method.consensus == "sign" else abs(sum(t.weights))) if t.normalize or method.is_sce \
                else 1.0
            s = s / (den or 1.0) + base.abs()
            den = 1.0
        bound = 2 * (len(xs) + 3) * EPS32 * s / (den or 1.0) + extra + sce_extra
        rounding = left & (diff <= bound)
        counts["rounding"] = int(rounding.sum())
        left &= ~rounding
    return counts


def _angle_weights(method, t: TensorPlan, xs: list[torch.Tensor], base: torch.Tensor | None
                   ) -> tuple[float, ...]:
    """fusemerge's slerp, model_stock, nuslerp or karcher weights for tensor t's models (for slerp and model_stock the
    base's first; a nuslerp with a base weighs the deltas from `base`); model_stock with filter_wise: one tensor per
    model, each entry its row's weight."""
    from fusemerge.kernels import reference
    from fusemerge.kernels.select import Segment, tensor_params

    if method.is_model_stock and t.filter_wise:
        from fusemerge.kernels.model_stock import row_weights

        cols = t.row_length
        a, b = row_weights(xs, cols)
        return (a.double().repeat_interleave(cols), *(b.double().repeat_interleave(cols),) * (len(xs) - 1))
    if method.is_nuslerp and t.nuslerp_cols:  # per column: (a, b) from each column's sums over the tensor
        from fusemerge.kernels.nuslerp import column_weights, t_from_weights

        cols, n = t.columns, xs[0].numel()
        seg = Segment(n, lambda s, c: (base[s:s + c] if base is not None else None, [x[s:s + c] for x in xs]))
        a, b = column_weights([seg], n, t_from_weights(*t.weights), cols)
        rows = n // cols
        return (torch.tensor(a, dtype=torch.float64).repeat(rows), torch.tensor(b, dtype=torch.float64).repeat(rows))
    if method.is_nuslerp and t.nuslerp_rows:  # per row: (a, b) of the two models or their deltas
        from fusemerge.kernels import nuslerp

        cols = t.row_length
        vs = [(x - base if base is not None else x).reshape(-1, cols) for x in xs]
        a, b = nuslerp.row_weights(vs[0], vs[1], nuslerp.t_from_weights(*t.weights))
        return a.double().repeat_interleave(cols), b.double().repeat_interleave(cols)

    n = xs[0].numel()
    segment = Segment(n, lambda s, c: (base[s:s + c] if base is not None else None, [x[s:s + c] for x in xs]),
                      whole=True)
    return tensor_params(method, name=t.name, numel=n, segments=[segment], weights=t.weights, density=[], gamma=[],
                         lam=1.0, normalize=t.normalize, rescale=False, seed=0, chunk=max(1, n), backend=reference,
                         t=t.t, models=len(xs), karcher=t.karcher, eps=t.eps, select_topk=t.select_topk).weights


def _sce_ties(xs: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries whose variance over the experts equals the k-th largest, where sce's selection cuts (fusemerge
    keeps the lowest indices among them, mergekit torch.topk's pick)."""
    import numpy as np

    from fusemerge.kernels.sce import deltas, variance

    v = variance(deltas(base, xs))
    n = v.numel()
    k = int(np.float32(np.float32(int(torch.count_nonzero(v))) * np.float32(select_topk))) if select_topk > 0 else 0
    if not 0 < k < n:
        return torch.zeros(n, dtype=torch.bool)
    return v == v.kthvalue(n - k + 1).values


def compare_dirs(fusemerge_dir: Path, mergekit_dir: Path, config: Path | dict) -> Parity:
    """Compare two merged model directories of `config` tensor by tensor and explain every difference."""
    plan = build_plan(config, device="cpu", max_memory="1GiB")
    by_name = {t.name: t for t in plan.tensors}
    ta, tb = model_tensors(fusemerge_dir), model_tensors(mergekit_dir)
    out = Parity()
    if ta.keys() != tb.keys():
        only_a, only_b = sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys())
        out.problems.append(f"tensor names differ: only in fusemerge: {only_a[:5]}, only in mergekit: {only_b[:5]}")
        out.identical_bytes = False
        return out
    with ChunkReader() as reader:
        for name in sorted(ta):
            with safe_open(ta[name], "pt") as fa, safe_open(tb[name], "pt") as fb:
                xa, xb = fa.get_tensor(name), fb.get_tensor(name)
            if xa.shape != xb.shape or xa.dtype != xb.dtype:
                out.problems.append(f"{name}: {tuple(xa.shape)} {xa.dtype} vs {tuple(xb.shape)} {xb.dtype}")
                out.identical_bytes = False
                continue
            out.elements += xa.numel()
            same = torch.equal(xa.reshape(-1).view(torch.uint8), xb.reshape(-1).view(torch.uint8))
            if same:
                continue
            out.identical_bytes = False
            if xa.dtype not in FLOAT_CODES.values():
                out.problems.append(f"{name}: non-float tensor differs")
                continue
            diff, over = ulp_over(xa.reshape(-1), xb.reshape(-1))
            out.max_abs = max(out.max_abs, float(diff.max()))
            n_over = int(over.sum())
            if not n_over:
                continue
            out.differ += n_over
            counts = explain(by_name[name], plan.method, reader, diff, over)
            unexplained = n_over - sum(counts.values())
            out.tie, out.dare, out.rounding = out.tie + counts["tie"], out.dare + counts["dare"], \
                out.rounding + counts["rounding"]
            out.unexplained += unexplained
            out.per_tensor.append((name, n_over, unexplained))
    return out


def compare_outputs(fusemerge_dir: Path, mergekit_dir: Path, config: Path | dict) -> str:
    """`compare_dirs(...).summary()`: one line for a benchmark table."""
    return compare_dirs(fusemerge_dir, mergekit_dir, config).summary()
