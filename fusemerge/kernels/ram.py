"""RAM and RAM+ (mergekit's `ram` and `ramplus_tl`, Reinforced Agent Merging, arXiv:2601.13572): each entry keeps
the one expert's delta where only one expert changed it, and the mean of the changed ones where several did.

Per tensor, with d_i = float32(x_i) - float32(base) and N experts (mergekit/merge_methods/ram.py):

- changed: nz_i = |d_i| > float32(epsilon) (default 1e-5); c = nz_0 + nz_1 + ... per entry; z_i = d_i * nz_i;
- ram: out = base + sum_i (z_i * [c == 1] + (z_i * [c > 1]) / max(c, 1)), the sum from +0.0 in expert order,
  each product and quotient one float32 operation, rounded once;
- ramplus_tl: each expert's entries shared with another expert (nz_i and c > 1) and its own (nz_i and c == 1)
  are counted over the tensor (one statistics pass); rho_i = float32(shared_i) / float32(max(own_i, epsilon)),
  lambda_i = 1 + float32(r) * clamp(rho_i, 0, float32(alpha)) (float32 operations; r 0.1, alpha 0.2 by default)
  scales the expert's own entries: out = base + sum_i ((z_i * [c == 1]) * lambda_i + (z_i * [c > 1]) / max(c, 1)).
  ram is lambda_i = 1, which changes no bit.

No sort, no weights from the config (mergekit's have none). The merge runs as torch operations on every backend
(on a GPU on the chunk's device).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusemerge.kernels.params import ChunkParams
from fusemerge.kernels.select import Segment, _chunks

F32 = torch.float32
EPSILON = 1e-5  # mergekit's default
R = 0.1
ALPHA = 0.2


def _changed(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(d_i, nz_i, c): the float32 deltas, where each is above epsilon in magnitude, and how many are per entry."""
    b = base.to(F32)
    ds = [x.to(F32) - b for x in experts]
    eps = torch.tensor(np.float32(epsilon), device=b.device)
    nz = [d.abs() > eps for d in ds]
    count = torch.zeros(b.shape, dtype=torch.int64, device=b.device)
    for m in nz:
        count.add_(m)
    return ds, nz, count


def ram_params(segments: list[Segment], chunk: int, epsilon: float, plus: tuple[float, float] | None,
               experts: int) -> ChunkParams:
    """The ChunkParams of a RAM tensor of `experts` experts; `plus` (r, alpha): RAM+'s per-expert scales from its
    counts (one pass over `segments`; ram reads nothing here: the pipeline gives it segments that cannot load)."""
    lambdas: tuple[float, ...] | None = None
    if plus is not None:
        shared: list[int] | None = None
        own: list[int] = []
        for _, base, xs in _chunks(segments, chunk):
            _, nz, count = _changed(base, xs, epsilon)
            many, one = count > 1, count == 1
            # both counts of every expert in one read back to the host (one wait per chunk on a GPU)
            s, o = torch.stack([torch.stack([(m & many).sum(), (m & one).sum()]) for m in nz]).T.tolist()
            shared = s if shared is None else [a + b for a, b in zip(shared, s, strict=True)]
            own = o if not own else [a + b for a, b in zip(own, o, strict=True)]
        if shared is None:  # an empty tensor: nothing to count
            shared, own = [0] * experts, [0] * experts
        lambdas = plus_scales(shared, own, epsilon, *plus)
    return ChunkParams(sparsifier="ram", consensus="none", linear=False, weights=(1.0,) * experts,
                       ram=(float(epsilon), lambdas))


def plus_scales(shared: Sequence[int], own: Sequence[int], epsilon: float, r: float, alpha: float
                ) -> tuple[float, ...]:
    """RAM+'s lambda_i = 1 + r * clamp(shared_i / max(own_i, epsilon), 0, alpha), in mergekit's float32 operations."""
    f32 = np.float32
    out = []
    for s, o in zip(shared, own, strict=True):
        rho = f32(f32(s) / f32(max(f32(o), f32(epsilon))))
        out.append(float(f32(f32(1.0) + f32(f32(r) * min(max(rho, f32(0.0)), f32(alpha))))))
    return tuple(out)


def merge_ram(base: torch.Tensor, experts: Sequence[torch.Tensor], p: ChunkParams, out_dtype: torch.dtype
              ) -> torch.Tensor:
    """One chunk of a RAM (or RAM+) merge in torch operations: the module docstring's per-entry rule."""
    from fusemerge.kernels.reference import _rounded

    epsilon, lambdas = p.ram
    ds, nz, count = _changed(base, experts, epsilon)
    one = (count == 1).to(F32)
    many = (count > 1).to(F32)
    divisor = count.clamp_min(1).to(F32)
    merged = torch.zeros_like(ds[0])
    for i, (d, m) in enumerate(zip(ds, nz, strict=True)):
        z = d.mul_(m.to(F32))
        own = z * one
        if lambdas is not None:
            own.mul_(float(np.float32(lambdas[i])))
        merged.add_(own.add_(z.mul_(many).div_(divisor)))
    return _rounded(base.to(F32) + merged, out_dtype)
