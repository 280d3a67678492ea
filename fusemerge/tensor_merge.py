"""`merge_tensors`: the same merge on in-memory tensors, for tools that embed fusemerge."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from fusemerge.config import DTYPE_ALIASES, MergeConfig, did_you_mean, validate_mapping
from fusemerge.errors import InputError
from fusemerge.kernels import load_backend, on_device
from fusemerge.kernels.dare_masks import KeepMasks
from fusemerge.kernels.della import aligned_chunk, rank_layout
from fusemerge.kernels.layout import dim0_columns, row_length, whole_units
from fusemerge.kernels.params import MAX_EXPERTS
from fusemerge.kernels.select import Segment, tensor_params
from fusemerge.methods import METHODS
from fusemerge.planner import tensor_parameters

DEFAULT_CHUNK = 1 << 22
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The config validator's key for an expert's parameter, as merge_tensors' caller spells it.
_MODEL_KEY = re.compile(r"models\[(\d+)\]\.parameters\.(\w+)")
_ALL_MODELS_KEY = re.compile(r"models\[\]\.parameters\.(\w+)")
_TOP_KEY = re.compile(r"(?<![\w\].])parameters\.(\w+)")


def _as_value(value: object) -> object:
    """A number as the YAML path would hold it: numpy and 0-d torch scalars as Python numbers; anything else
    unchanged, for the validator to judge."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _per_expert(value: object) -> list[object] | None:
    """The values of a per-expert sequence (list, tuple, 1-D array or tensor), or None for a single value."""
    if isinstance(value, (list, tuple)):
        return [_as_value(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return [_as_value(v) for v in value.tolist()]
    return None


def _config(method: str, base: torch.Tensor | None, experts: list[torch.Tensor], given: dict[str, object]
            ) -> MergeConfig:
    """The merge as a config of models "base" and "experts[i]", validated as the files path validates its YAML (the
    same defaults, checks and messages, with merge_tensors' names for the keys). An expert that is the base
    tensor itself is the base listed under models:, as in a config."""
    n = len(experts)
    models: list[dict[str, object]] = [{"model": "base" if base is not None and e is base else f"experts[{i}]",
                                        "parameters": {}} for i, e in enumerate(experts)]
    top: dict[str, object] = {}
    problems = []
    for pname, value in given.items():
        per_expert = pname in ("weight", "density", "gamma", "epsilon")
        values = _per_expert(value)
        if values is not None and not per_expert:
            problems.append(f"merge_tensors: {pname}: {value!r}; expected one value for the whole merge")
            pdef = METHODS[method].params.get(pname) if method in METHODS else None
            if pdef is not None and pdef.default is None:  # a required one (slerp's t) was given: not "missing"
                top[pname] = 0.0
        elif values is None:
            top[pname] = _as_flag(pname, _as_value(value))
        elif len(values) != n:
            problems.append(f"merge_tensors: {pname}: {len(values)} values for {n} experts")
        elif any(isinstance(v, (list, tuple, dict)) for v in values):  # a gradient needs a layer: files only
            problems.append(f"merge_tensors: {pname}: {value!r}; expected one number per expert")
        else:
            for model, v in zip(models, values, strict=True):
                model["parameters"][pname] = v
    data: dict[str, object] = {"merge_method": method, "models": models, "parameters": top}
    if base is not None:
        data["base_model"] = "base"
    try:
        cfg = validate_mapping(data, "merge_tensors")
    except InputError as e:
        problems += [_api_words(line) for line in e.problems]
    if problems:
        raise InputError(problems)
    return cfg


def _api_words(line: str) -> str:
    """A config validator's line in merge_tensors' words: weight[1] for models[1].parameters.weight, etc."""
    line = _TOP_KEY.sub(r"\1", _ALL_MODELS_KEY.sub(r"\1", _MODEL_KEY.sub(r"\2[\1]", line)))
    line = _MODEL_REF.sub(r"experts[\1]", line)
    return line.replace("merge_method", "method").replace("base_model:", "a base tensor").replace("base_model",
                                                                                                   "base")


_MODEL_REF = re.compile(r"models\[(\d+)\](?:\.model)?")


def _as_flag(pname: str, value: object) -> object:
    """normalize / rescale given as 0 or 1 (Python callers' habit) as the booleans a config holds."""
    if pname in ("normalize", "rescale") and not isinstance(value, bool) and isinstance(value, int) and \
            value in (0, 1):
        return bool(value)
    return value


def _check_tensors(base: torch.Tensor | None, experts: list[torch.Tensor]) -> None:
    """Every input a float32 / float16 / bfloat16 torch tensor, all of one shape and device, as the files path
    requires of a tensor's copies (their dtypes may differ, as models saved in different dtypes do)."""
    named = [("base", base)] if base is not None else []
    named += [(f"experts[{i}]", x) for i, x in enumerate(experts)]
    problems = [f"merge_tensors: {label}: expected a torch.Tensor, not {type(x).__name__}"
                for label, x in named if not isinstance(x, torch.Tensor)]
    if problems:
        raise InputError(problems)
    first_label, first = named[0]
    for label, x in named:
        if x.dtype not in FLOAT_DTYPES.values():
            problems.append(f"merge_tensors: {label}: dtype {x.dtype}; merged tensors are float32, float16 or "
                            "bfloat16 (convert with .to())")
        if x.shape != first.shape:
            problems.append(f"merge_tensors: {label}: shape {list(x.shape)} differs from {first_label}'s "
                            f"{list(first.shape)}")
        if x.device != first.device:
            problems.append(f"merge_tensors: {label}: on {x.device}, {first_label} on {first.device}")
    if problems:
        raise InputError(problems)


def _out_dtype(out_dtype: object, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if isinstance(out_dtype, str):  # the config's spellings: bf16, torch.bfloat16, half, ...
        name = out_dtype[len("torch."):] if out_dtype.startswith("torch.") else out_dtype
        if name.lower() in DTYPE_ALIASES:
            return FLOAT_DTYPES[DTYPE_ALIASES[name.lower()]]
    if out_dtype in FLOAT_DTYPES.values():
        return out_dtype
    raise InputError(f"merge_tensors: out_dtype: {out_dtype!r}; expected torch.float32, torch.float16 or "
                     "torch.bfloat16 (or their names)")


# The settings of single methods that merge_tensors takes as keywords, as a config's parameters: give them.
METHOD_FLAGS = ("filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "normalize_weights", "eps",
                "select_topk", "r", "alpha")


def merge_tensors(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    method: str = "ties",
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    normalize: bool | None = None,
    rescale: bool | str | None = None,
    t: float | None = None,
    seed: int = 0,
    name: str = "",
    out_dtype: torch.dtype | str | None = None,
    backend: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    **params: float,
) -> torch.Tensor:
    """Merge one tensor's copies with the semantics of the files path (docs/methods.md).

    `weight`, `density`, `gamma`, `epsilon` (della's): one value for every expert, or a sequence of one per
    expert; unset ones take the method's defaults, as in a config. `t`: slerp's interpolation factor (0 is
    `base`, 1 the one expert); `filter_wise`: model_stock's (true: weights per row), whose experts are the two or
    more models merged onto `base`; `nuslerp_flatten` (false: one arc per row), `nuslerp_row_wise` (with
    flatten false: one arc per column): nuslerp's, whose experts are its two models (interpolated themselves, or
    with `base` their deltas from it) and `weight` their two weights;
    `select_topk`: sce's (default 1: every entry; its weights come from the deltas, so it takes no `weight`);
    `epsilon` (one value), `r`, `alpha`: ram's and ramplus_tl's (defaults 1e-5, 0.1, 0.2; no `weight` either);
    `max_iter`, `tol`: karcher's (defaults 10 and 1e-5), whose experts are the models averaged (with `base`, if
    given, as for `linear`). DELLA's chunks are whole rows of the shape (`chunk` rounded down to them).
    `lambda` is passed as `lambda_=0.5` or `**{"lambda": 0.5}`. They are
    checked as a config's `parameters:` are (InputError, one line per problem). `name` keys DARE's and DELLA's
    random stream (the same name and seed give the same mask as a file merge of a tensor of that name). For
    `linear`, `experts` are the averaged models and `base`, if given, is averaged in as mergekit does. An
    expert that *is* `base` (the same tensor object) is the base listed under `models:`: not an expert, and
    for `linear` averaged once, with its weight. Inputs: float32, float16 or bfloat16 tensors of one shape and
    device, of one dtype or several (then merged from float32 copies, which are exact: the result of float32
    inputs); the result has `out_dtype` (default: the base's dtype, else the first model's). CUDA
    tensors use the Triton kernels (backend "auto"; the torch operations for more than MAX_EXPERTS = 64
    experts, which they do not take).

    >>> b = torch.randn(64, 64); es = [b + 0.01 * torch.randn(64, 64) for _ in range(3)]
    >>> merge_tensors(b, es, "ties", density=0.2).shape
    torch.Size([64, 64])
    """
    if method in METHODS and METHODS[method].is_passthrough:
        raise InputError("merge_tensors: method: passthrough copies one model's tensors (slices: configs); there "
                         "is nothing to merge in memory")
    if "lambda_" in params and "lambda" in params:
        raise InputError("merge_tensors: lambda given twice (lambda_= and lambda=); give one")
    lam = params.pop("lambda_", params.pop("lambda", None))
    flags = {k: params.pop(k) for k in METHOD_FLAGS if k in params}
    if params:  # as a config's unknown parameters are reported: one line each, with the nearest known name
        known = ["weight", "density", "gamma", "epsilon", "normalize", "rescale", "t", "lambda_", *METHOD_FLAGS,
                 "seed", "name", "out_dtype", "backend", "chunk"]
        raise InputError([f"merge_tensors: {name}: unknown parameter{did_you_mean(name, known)}; it takes "
                          f"{', '.join(known)}" for name in params])
    if isinstance(experts, torch.Tensor):  # a stacked tensor: its rows are the experts (as list() of it was)
        experts = list(experts.unbind(0)) if experts.dim() > 0 else [experts]
    try:
        experts = list(experts)
    except TypeError:
        raise InputError("merge_tensors: experts: expected a list of tensors") from None
    if not experts:
        raise InputError("merge_tensors: experts: at least one tensor is needed")
    _check_tensors(base, experts)
    if method in METHODS and METHODS[method].tensor_weights:  # a config refuses a model listed twice; here the same
        others = [e for e in experts if e is not base]  # tensor twice would weigh it twice in the angles
        twice = [i for i, e in enumerate(experts) if e is not base and sum(x is e for x in others) > 1]
        if twice:
            raise InputError(f"merge_tensors: experts: experts{twice} are the same tensor; {method} takes each "
                             "model once (as a config refuses a model listed twice)")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"merge_tensors: chunk: {chunk!r}; expected a positive number of elements")
    chunk = int(chunk)
    seed = _as_value(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):  # 0.0 would key other DARE masks than 0
        raise InputError(f"merge_tensors: seed: {seed!r}; expected an integer")
    seed = int(seed)
    given = {k: v for k, v in (("weight", weight), ("density", density), ("gamma", gamma), ("epsilon", epsilon),
                               ("normalize", normalize),
                               ("rescale", rescale), ("t", t), ("lambda", lam), *flags.items())
             if v is not None}
    cfg = _config(method, base, experts, given)
    m = cfg.method
    tensors = {f"experts[{i}]": e for i, e in enumerate(experts)} | ({"base": base} if base is not None else {})
    models = [tensors[ref.model] for ref in cfg.models]  # the experts; for linear every averaged model
    default_dtype = (base if base is not None else models[0]).dtype  # the base's, as for files (also for linear)
    if m.combines_models:
        base = None
    p_args = tensor_parameters(m, name, lambda pname: [float(cfg.param(pname, name, j)) for j in range(len(models))],
                               lambda pname, default: cfg.param(pname, name) if pname in m.params else default)
    n = len(models)
    rescale = p_args["rescale"]
    out_dtype = _out_dtype(out_dtype, default_dtype)
    shape = models[0].shape
    device = models[0].device
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"merge_tensors: backend: expected auto, torch or triton, not {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and n <= MAX_EXPERTS else "torch"
    elif backend == "triton" and n > MAX_EXPERTS:
        raise InputError(f"merge_tensors: {n} experts; the Triton kernels merge at most {MAX_EXPERTS} "
                         "(backend='torch' merges any number)")
    kmerge, kstats = load_backend(backend, device.type)

    flat = [x.reshape(-1).contiguous() for x in models]
    fbase = base.reshape(-1).contiguous() if base is not None else None
    if len({x.dtype for x in [*flat, *([fbase] if fbase is not None else [])]}) > 1:
        flat = [x.float() for x in flat]  # the kernels read one dtype; float32 holds every input exactly
        fbase = fbase.float() if fbase is not None else None
    numel = flat[0].numel()
    rows = None  # model_stock filter_wise's row length: its chunks are whole rows, each weighted by its own cosines
    if m.sparsifier == "della":  # its chunks are whole rows, which it ranks together (kernels/della.py)
        chunk = aligned_chunk(rank_layout(shape), chunk)
    elif (m.is_model_stock and p_args.get("filter_wise")) or p_args.get("nuslerp_rows"):
        rows = row_length(shape)
        chunk = whole_units(rows, chunk)
    columns = dim0_columns(shape) if p_args.get("nuslerp_cols") else None  # per-column nuslerp
    if columns is not None:
        chunk = whole_units(columns, chunk)
    # CPU DARE (or DELLA) with the L1 rescale: the statistics pass keeps its keep masks for the merge (1 bit per
    # entry and expert, 1/16 of bf16 inputs) instead of drawing Philox (and sorting) twice
    masks = (KeepMasks(KeepMasks.bytes_for(numel, chunk, n))
             if device.type == "cpu" and m.sparsifier in ("dare", "della") and rescale is True else None)
    out = torch.empty(numel, dtype=out_dtype, device=device)
    with on_device(device):  # tensors on cuda:1 are merged by kernels launched on cuda:1
        def load(s: int, c: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            return fbase[s:s + c] if fbase is not None else None, [x[s:s + c] for x in flat]

        p = tensor_params(m, name=name, numel=numel, segments=[Segment(numel, load, whole=True)],
                          weights=p_args["weights"], density=p_args["density"], gamma=p_args["gamma"],
                          lam=p_args["lam"], normalize=p_args["normalize"], rescale=rescale, seed=seed, chunk=chunk,
                          backend=kstats, masks=masks, t=p_args.get("t"), models=n,
                          karcher=p_args.get("karcher"), eps=p_args.get("eps"), epsilon=p_args.get("epsilon"),
                          shape=tuple(shape), select_topk=p_args.get("select_topk"), ram=p_args.get("ram"),
                          filter_rows=rows, columns=columns)
        for s in range(0, numel, chunk):
            c = min(chunk, numel - s)
            out[s:s + c] = kmerge.merge_chunk(fbase[s:s + c] if fbase is not None else None,
                                              [x[s:s + c] for x in flat], s, p, out_dtype, masks=masks)
    return out.view(shape)
