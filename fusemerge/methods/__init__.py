"""The method registry: every merge method is a sparsifier, a consensus rule and its defaults.

This is mergekit's "generalized task arithmetic" idea without its task graph:

    sparsifier   none | magnitude (TIES trim) | dare (random drop) | breadcrumbs (drop both tails)
                 | della (random drop, each delta's keep probability from its rank in its row)
                 | sce (keep the entries whose deltas vary most across the experts; weights from the deltas)
                 | ram (an entry one expert changed keeps its delta, one several changed their mean)
    consensus    none (weighted sum) | sign (TIES election + disjoint mean)

`linear` averages the models themselves rather than their deltas; `slerp` interpolates a base and one other
model along the arc between them, and `model_stock` moves the base toward the models' average by an amount
the angles between their deltas decide: both are a weighted sum of the models whose weights come from a
statistics pass over the tensor (kernels/slerp.py, kernels/model_stock.py). `nuslerp` interpolates two models
along their arc (no base) or, with a base, their two deltas from it (kernels/nuslerp.py): a weighted sum of
the models, or task arithmetic with two weights, found the same way. `nearswap` mixes the base and one other
model entry by entry, toward the other where the two are within `t` of each other. `karcher` takes the models'
Karcher mean on the unit sphere, scaled by their mean norm: a weighted sum of the models whose weights come from
their angles too (kernels/karcher.py). `multislerp` interpolates N models (or, with a base, their deltas) on the
sphere at their weights, as nuslerp does two (kernels/multislerp.py). `passthrough` copies one model's
tensors (optionally scaled), the building block of `slices:` layer stacking ("frankenmerges").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

SPARSIFIERS = ("none", "magnitude", "dare", "breadcrumbs", "della", "sce", "ram")
CONSENSUS = ("none", "sign")


@dataclass(frozen=True)
class ParamDef:
    """A parameter a method accepts: where it may be set and its default (None = required)."""

    name: str
    default: Any
    per_model: bool  # True: may differ per model (weight, density); False: one value per tensor (lambda)
    kind: str  # "float", "int" (a whole number: no gradient), "bool" or "rescale"
    low: float | None = None  # inclusive lower bound for floats
    high: float | None = None  # inclusive upper bound for floats
    low_open: bool = False  # True: the lower bound is exclusive (density in (0, 1])


@dataclass(frozen=True)
class Method:
    name: str
    sparsifier: str
    consensus: str
    needs_base: bool
    params: dict[str, ParamDef] = field(default_factory=dict)
    paper: str = ""
    others: tuple[int, int | None] = (1, None)  # how many models besides the base it takes (min, max or None)

    @property
    def is_linear(self) -> bool:
        return self.name == "linear"

    @property
    def is_passthrough(self) -> bool:
        return self.name == "passthrough"

    @property
    def is_slerp(self) -> bool:
        return self.name == "slerp"

    @property
    def is_model_stock(self) -> bool:
        return self.name == "model_stock"

    @property
    def is_nuslerp(self) -> bool:
        return self.name == "nuslerp"

    @property
    def is_nearswap(self) -> bool:
        return self.name == "nearswap"

    @property
    def is_multislerp(self) -> bool:
        return self.name == "multislerp"

    @property
    def base_optional(self) -> bool:
        """True for the methods that take a base_model or not, and then work on the deltas from it (nuslerp,
        multislerp: `with_base`)."""
        return self.name in ("nuslerp", "multislerp")

    @property
    def is_karcher(self) -> bool:
        return self.name == "karcher"

    @property
    def tensor_weights(self) -> bool:
        """True when each tensor's weights come from a statistics pass over its models (the angles of slerp,
        model_stock, nuslerp, multislerp and karcher), not from the config alone."""
        return self.angle_weights or self.base_optional or self.is_karcher

    def with_base(self) -> Method:
        """nuslerp or multislerp given a base_model: it interpolates the deltas from the base (mergekit's task
        vectors), so the kernels take the base as a base (task arithmetic with the weights of the arc)."""
        assert self.base_optional
        return replace(self, needs_base=True)

    @property
    def angle_weights(self) -> bool:
        """True when each tensor's weights come from the angles between its models (slerp, model_stock): the
        base's tensor is then the first of the models the kernel sums, not a base to subtract."""
        return self.name in ("slerp", "model_stock")

    @property
    def combines_models(self) -> bool:
        """True when the kernel combines the models themselves (a weighted sum), not deltas from a base. For
        slerp and model_stock the models are the base, then the others."""
        return (self.name in ("linear", "passthrough", "karcher") or self.angle_weights
                or (self.base_optional and not self.needs_base))

    @property
    def is_sce(self) -> bool:
        """SCE: its weights, and with select_topk < 1 its kept entries, come from a statistics pass (kernels/sce.py)."""
        return self.sparsifier == "sce"

    @property
    def is_ram(self) -> bool:
        """ram and ramplus_tl (kernels/ram.py); ramplus_tl's scales come from a counting pass over each tensor."""
        return self.sparsifier == "ram"

    @property
    def needs_thresholds(self) -> bool:
        """True when each tensor needs a selection pass (k-th largest |delta|) before merging."""
        return self.sparsifier in ("magnitude", "breadcrumbs")


def _p(name: str, default: Any, per_model: bool, kind: str = "float", **kw: Any) -> ParamDef:
    return ParamDef(name=name, default=default, per_model=per_model, kind=kind, **kw)


WEIGHT = _p("weight", 1.0, True)
LAMBDA = _p("lambda", 1.0, False)
DENSITY = _p("density", 1.0, True, low=0.0, high=1.0, low_open=True)
GAMMA = _p("gamma", 0.01, True, low=0.0, high=1.0)


def _normalize(default: bool) -> ParamDef:
    return _p("normalize", default, False, kind="bool")


RESCALE = _p("rescale", True, False, kind="rescale")
# mergekit's rescale of a magnitude trim (its generalized task arithmetic: `rescale`, default false for ties
# and breadcrumbs): true multiplies the kept entries by ||d||_1 / ||kept d||_1, as DARE's L1 rescale does.
TRIM_RESCALE = _p("rescale", False, False, kind="bool")
# DELLA's (mergekit/merge_methods/generalized_task_arithmetic.py: `epsilon`, per model, default 0.15): the keep
# probabilities run from density - epsilon (smallest |d| of a row) to density + epsilon (largest); and its
# rescale, mergekit's L1 rescale as DARE's (default true; DARE's `inverse` has no per-entry counterpart here).
EPSILON = _p("epsilon", 0.15, True, low=0.0, high=1.0)
DELLA_RESCALE = _p("rescale", True, False, kind="bool")
# SCE's selection (mergekit/merge_methods/sce.py: `select_topk`, default 1.0): the fraction of the entries, those
# whose deltas vary most across the experts, that are kept (1: all of them; 0: none).
SELECT_TOPK = _p("select_topk", 1.0, False, low=0.0, high=1.0)
# RAM's and RAM+'s (mergekit/merge_methods/ram.py: `epsilon` 1e-5, `r` 0.1, `alpha` 0.2; one value per tensor): an
# entry counts as changed by an expert where |delta| > epsilon; RAM+ scales an expert's own entries by
# 1 + r * clamp(shared / own, 0, alpha).
RAM_EPSILON = _p("epsilon", 1e-5, False, low=0.0)
RAM_R = _p("r", 0.1, False)
RAM_ALPHA = _p("alpha", 0.2, False, low=0.0)
# slerp's interpolation factor (mergekit/merge_methods/slerp.py: `t`, required): 0 is the base, 1 the other model.
T = _p("t", None, False)
# model_stock's per-row variant (mergekit: `filter_wise`, default false); only false is supported.
FILTER_WISE = _p("filter_wise", False, False, kind="bool")
# nuslerp's variants (mergekit/merge_methods/nuslerp.py): the whole tensor as one vector (flatten, the default) is
# supported; false (one arc per row, or per column with nuslerp_row_wise) is not. row_wise only acts when
# flatten is false, as in mergekit.
NUSLERP_FLATTEN = _p("nuslerp_flatten", True, False, kind="bool")
NUSLERP_ROW_WISE = _p("nuslerp_row_wise", False, False, kind="bool")
# karcher's iteration (mergekit/merge_methods/karcher.py: `max_iter`, `tol`, its defaults).
MAX_ITER = _p("max_iter", 10, False, kind="int", low=0, high=10000)
TOL = _p("tol", 1e-5, False, low=0.0)
# multislerp's (mergekit/merge_methods/multislerp.py): divide the weights by their sum; the norms' guard.
NORMALIZE_WEIGHTS = _p("normalize_weights", True, False, kind="bool")
EPS = _p("eps", 1e-8, False, low=0.0)
# passthrough's optional per-model factor (mergekit/merge_methods/passthrough.py: `scale`).
SCALE = _p("scale", 1.0, True)

_ALL = [
    Method("linear", "none", "none", needs_base=False,
           params={"weight": WEIGHT, "normalize": _normalize(True)},
           paper="https://arxiv.org/abs/2203.05482"),
    Method("task_arithmetic", "none", "none", needs_base=True,
           params={"weight": WEIGHT, "lambda": LAMBDA, "normalize": _normalize(False)},
           paper="https://arxiv.org/abs/2212.04089"),
    Method("ties", "magnitude", "sign", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "lambda": LAMBDA, "normalize": _normalize(True),
                   "rescale": TRIM_RESCALE},
           paper="https://arxiv.org/abs/2306.01708"),
    Method("dare_ties", "dare", "sign", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "lambda": LAMBDA, "normalize": _normalize(False),
                   "rescale": RESCALE},
           paper="https://arxiv.org/abs/2311.03099"),
    Method("dare_linear", "dare", "none", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "lambda": LAMBDA, "normalize": _normalize(False),
                   "rescale": RESCALE},
           paper="https://arxiv.org/abs/2311.03099"),
    Method("breadcrumbs", "breadcrumbs", "none", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA, "lambda": LAMBDA,
                   "normalize": _normalize(False), "rescale": TRIM_RESCALE},
           paper="https://arxiv.org/abs/2312.06795"),
    Method("breadcrumbs_ties", "breadcrumbs", "sign", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA, "lambda": LAMBDA,
                   "normalize": _normalize(False), "rescale": TRIM_RESCALE},
           paper="https://arxiv.org/abs/2312.06795"),
    Method("della", "della", "sign", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "epsilon": EPSILON, "lambda": LAMBDA,
                   "normalize": _normalize(True), "rescale": DELLA_RESCALE},
           paper="https://arxiv.org/abs/2406.11617"),
    Method("della_linear", "della", "none", needs_base=True,
           params={"weight": WEIGHT, "density": DENSITY, "epsilon": EPSILON, "lambda": LAMBDA,
                   "normalize": _normalize(False), "rescale": DELLA_RESCALE},
           paper="https://arxiv.org/abs/2406.11617"),
    # sce: no per-model weight (mergekit's has none): each expert's weight comes from its own deltas
    Method("sce", "sce", "sign", needs_base=True, params={"select_topk": SELECT_TOPK},
           paper="https://arxiv.org/abs/2408.07990"),
    # ram, ramplus_tl: no per-model weight (mergekit's have none)
    Method("ram", "ram", "none", needs_base=True, params={"epsilon": RAM_EPSILON},
           paper="https://arxiv.org/abs/2601.13572"),
    Method("ramplus_tl", "ram", "none", needs_base=True,
           params={"epsilon": RAM_EPSILON, "r": RAM_R, "alpha": RAM_ALPHA},
           paper="https://arxiv.org/abs/2601.13572"),
    Method("slerp", "none", "none", needs_base=True, params={"t": T},
           paper="https://en.wikipedia.org/wiki/Slerp", others=(1, 1)),
    Method("model_stock", "none", "none", needs_base=True, params={"filter_wise": FILTER_WISE},
           paper="https://arxiv.org/abs/2403.19522", others=(2, None)),
    # nuslerp: exactly two models besides the base, which is optional; weights default to 1 (mergekit requires them)
    Method("nuslerp", "none", "none", needs_base=False,
           params={"weight": WEIGHT, "nuslerp_flatten": NUSLERP_FLATTEN, "nuslerp_row_wise": NUSLERP_ROW_WISE},
           paper="mergekit's nuslerp: the arc between two models or two task vectors", others=(2, 2)),
    # nearswap: the base and exactly one other model, mixed per entry by how close they are (t required, as slerp's)
    Method("nearswap", "none", "none", needs_base=True, params={"t": T},
           paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", others=(1, 1)),
    # karcher: every model, the base too when given (as linear averages it), one weight each from the angles
    Method("karcher", "none", "none", needs_base=False, params={"max_iter": MAX_ITER, "tol": TOL},
           paper="https://arxiv.org/abs/2603.04972"),
    # multislerp: one or more models besides the base, which is optional; weights default to 1 (mergekit requires them)
    Method("multislerp", "none", "none", needs_base=False,
           params={"weight": WEIGHT, "normalize_weights": NORMALIZE_WEIGHTS, "eps": EPS},
           paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    Method("passthrough", "none", "none", needs_base=False,
           params={"scale": SCALE},
           paper="mergekit's passthrough: one model's tensors, copied"),
]

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
