"""`merge_tensors`: the same merge on in-memory tensors, for tools that embed fusemerge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusemerge.errors import InputError
from fusemerge.kernels import load_backend, on_device
from fusemerge.kernels.dare_masks import KeepMasks
from fusemerge.kernels.select import Segment, tensor_params
from fusemerge.methods import METHODS

DEFAULT_CHUNK = 1 << 22


def _per_expert(name: str, value: float | Sequence[float], n: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise InputError(f"{name}: {len(values)} values for {n} experts")
    return values


def merge_tensors(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    method: str = "ties",
    *,
    weight: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    normalize: bool | None = None,
    rescale: bool | str = True,
    seed: int = 0,
    name: str = "",
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    **params: float,
) -> torch.Tensor:
    """Merge one tensor's copies with the semantics of the files path (METHODS.md).

    `lambda` is passed as `lambda_=0.5` or `**{"lambda": 0.5}`. `name` keys DARE's random stream
    (the same name and seed give the same mask as a file merge of a tensor of that name). For
    `linear`, `experts` are the averaged models and `base`, if given, is averaged in as mergekit does.
    CUDA tensors use the Triton kernels (backend "auto").

    >>> b = torch.randn(64, 64); es = [b + 0.01 * torch.randn(64, 64) for _ in range(3)]
    >>> merge_tensors(b, es, "ties", density=0.2).shape
    torch.Size([64, 64])
    """
    if method not in METHODS:
        raise InputError(f"method: unknown merge method '{method}' (known: {', '.join(METHODS)})")
    m = METHODS[method]
    if m.is_passthrough:
        raise InputError("method: passthrough copies one model's tensors (slices: configs); there is nothing to "
                         "merge in memory")
    lam = float(params.pop("lambda_", params.pop("lambda", 1.0)))
    if params:
        raise InputError(f"unknown parameter(s) for merge_tensors: {', '.join(params)}")
    models = list(experts)
    if not models:
        raise InputError("experts: at least one tensor is needed")
    if m.needs_base and base is None:
        raise InputError(f"method {method} needs a base tensor")
    n = len(models)
    weights = _per_expert("weight", weight, n)
    if m.is_linear and base is not None:
        models.append(base)
        weights.append(float(weight) if isinstance(weight, (int, float)) else 1.0)
        base = None
    shape = models[0].shape
    for i, x in enumerate(models + ([base] if base is not None else [])):
        if x.shape != shape:
            raise InputError(f"tensor {i}: shape {list(x.shape)} differs from {list(shape)}")
    dens = _per_expert("density", density, n)
    if any(not 0.0 < d <= 1.0 for d in dens):
        raise InputError(f"density {dens} outside (0, 1]")
    gam = _per_expert("gamma", gamma, n)
    if normalize is None:
        normalize = m.params["normalize"].default
    device = models[0].device
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected auto, torch or triton, not {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    kmerge, kstats = load_backend(backend, device.type)

    flat = [x.reshape(-1).contiguous() for x in models]
    fbase = base.reshape(-1).contiguous() if base is not None else None
    numel = flat[0].numel()
    # CPU DARE with the L1 rescale: the statistics pass keeps its keep masks for the merge (1 bit per entry
    # and expert, 1/16 of bf16 inputs) instead of drawing Philox twice
    masks = (KeepMasks(KeepMasks.bytes_for(numel, chunk, n))
             if device.type == "cpu" and m.sparsifier == "dare" and rescale is True else None)
    out_dtype = out_dtype or models[0].dtype
    out = torch.empty(numel, dtype=out_dtype, device=device)
    with on_device(device):  # tensors on cuda:1 are merged by kernels launched on cuda:1
        p = tensor_params(m, name=name, numel=numel,
                          segments=[Segment(numel, lambda s, c: (fbase[s:s + c], [x[s:s + c] for x in flat]),
                                            whole=True)],
                          weights=weights, density=dens, gamma=gam, lam=lam, normalize=bool(normalize),
                          rescale=rescale, seed=seed, chunk=chunk, backend=kstats, masks=masks)
        for s in range(0, numel, chunk):
            c = min(chunk, numel - s)
            out[s:s + c] = kmerge.merge_chunk(fbase[s:s + c] if fbase is not None else None,
                                              [x[s:s + c] for x in flat], s, p, out_dtype, masks=masks)
    return out.view(shape)
