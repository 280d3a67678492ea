"""DELLA's drop (mergekit's `della_magprune`): keep each delta with a probability that grows with its rank.

mergekit (sparsify.py: della_magprune) ranks the magnitudes |d| of each expert's delta along dimension 1 (a
2-D tensor's rows; a 1-D tensor is one row), maps rank r = 0 ... m - 1 of the m entries ranked together to

    p = (density - epsilon) + (r / (m - 1)) * 2 * epsilon        (float32: fl(lo + fl(fl(2 q) * eps)))

and keeps the entry with probability p (torch.bernoulli), so the largest deltas survive more often and the
expected density is `density`. Then, with `rescale` (the default), the kept entries are scaled by
||d||_1 / ||kept d||_1 over the tensor (DARE's L1 rescale), and della merges as dare_ties, della_linear as
dare_linear.

fusemerge keeps the rule and makes it reproducible (docs/methods.md):
- ranks break ties of |d| by index (lowest first, a stable sort on the float32 bits of |d|), where
  mergekit's unstable argsort breaks them in any order;
- the draw is DARE's counter-based stream, kept iff u < p with u = rand(dare_key(seed, T, i), j), j the
  global flat index (kernels/philox.py): so the mask does not depend on chunking or device;
- an entry ranked alone (m = 1) has p = density (mergekit divides 0 by 0 and torch.bernoulli refuses NaN);
- the math is float32 (mergekit's is the tensor's dtype, bfloat16 on CPU too, where ranks past 256 round).

Rank groups. For a tensor of shape (s0, s1, s2, ...), the entries ranked together are those with one index
of every dimension but 1: `rank_layout` gives (m, inner) = (s1, s2 * ...), a 1-D tensor (n,) gives (n, 1). Its
flat index then runs over units of m * inner consecutive entries (one per index of dimension 0), each holding
`inner` groups of m entries spaced `inner` apart. A chunk must be whole units (`aligned_chunk`): every chunk a
DELLA merge passes a kernel starts and ends at a unit's edge.

The ranks need a sort, so this is not a single pass at memory bandwidth: the keep masks are made here by torch
operations on the chunk's device (a stable sort per group, DARE's Philox stream), and the merge kernels take
them as DARE's drawn masks (kernels/reference.py; on the GPU the Triton backend runs the torch merge for
DELLA, kernels/triton_merge.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusemerge.kernels.layout import whole_units
from fusemerge.kernels.philox import philox_rand_run

if TYPE_CHECKING:
    from fusemerge.kernels.dare_masks import KeepMasks
    from fusemerge.kernels.select import Segment

EPSILON = 0.15  # mergekit's default


def rank_layout(shape: Sequence[int]) -> tuple[int, int]:
    """(m, inner): how many entries are ranked together and how far apart they lie in the flat index (see the
    module docstring). A 0-d tensor is one entry ranked alone."""
    if len(shape) <= 1:
        return (math.prod(shape), 1) if shape and shape[0] > 0 else (1, 1)
    return shape[1], math.prod(shape[2:])


def unit(layout: tuple[int, int]) -> int:
    """Entries of one unit (one index of dimension 0): a chunk is a whole number of them."""
    return max(1, layout[0] * layout[1])


def aligned_chunk(layout: tuple[int, int], chunk: int) -> int:
    """The largest whole number of units in `chunk` elements, at least one unit (the caller checks that one
    unit fits its memory: planner.py refuses a merge whose unit exceeds the chunk)."""
    return whole_units(unit(layout), chunk)


def della_keep(d: torch.Tensor, start: int, key: int, density: float, epsilon: float,
               layout: tuple[int, int]) -> torch.Tensor:
    """The keep mask (bool) of one expert's delta chunk `d` (1-D float32, whole units from global index
    `start`): entry j kept iff rand(key, start + j) < p_j (module docstring). density >= 1 keeps all."""
    n = d.numel()
    if density >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=d.device)
    m, inner = layout
    u = unit(layout)
    if start % u or n % u:
        raise ValueError(f"chunk [{start}, {start + n}) is not whole units of {u} entries (DELLA ranks them "
                         "together)")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=d.device)
    # p = fl(lo + fl(fl(2 q) * eps)), q = fl(r / (m - 1)): mergekit's `(density - epsilon) + rank_norm * 2 *
    # epsilon`, its Python difference taken in double, then float32 operations on the tensor. (Tried 2026-12-04: a
    # table of the m probabilities, each draw gathered in sorted order, compared and scattered back: predicted
    # faster, fewer passes; measured slower on CPU, della 0.55 -> 0.65 s in `python bench/della.py`, one thread,
    # side by side: two index passes cost more than the one scatter and four elementwise passes here.)
    lo, eps = np.float32(density - epsilon), np.float32(epsilon)
    f32 = torch.float32
    if m == 1:
        p = torch.full((n,), float(np.float32(density)), dtype=f32, device=d.device)
    else:
        bits = d.abs().view(torch.int32).view(-1, m, inner)  # non-negative: ordered as the magnitudes
        order = torch.sort(bits, dim=1, stable=True).indices  # ascending; equal |d| in index order
        del bits
        ranks = torch.empty_like(order)
        positions = torch.arange(m, dtype=torch.int64, device=d.device).view(1, m, 1).expand_as(order)
        ranks.scatter_(1, order, positions)
        del order
        q = ranks.view(-1).to(f32).div_(torch.full((), float(m - 1), dtype=f32, device=d.device))
        del ranks
        p = q.mul_(2.0).mul_(torch.full((), float(eps), dtype=f32, device=d.device))
        p.add_(torch.full((), float(lo), dtype=f32, device=d.device))
    draws = philox_rand_run(key, start, n, d.device)
    return draws.lt_(p).to(torch.bool)


def della_scales(backend: ModuleType, segments: list[Segment], chunk: int, keys: Sequence[int],
                 density: Sequence[float], epsilon: Sequence[float], layout: tuple[int, int],
                 masks: KeepMasks | None = None) -> list[float]:
    """mergekit's L1 rescale per expert, ||d||_1 / ||kept d||_1 over the tensor (select.l1_scales: exact
    fixed-point sums), the kept entries drawn as the merge draws them. `chunk`: whole units. `masks` (CPU):
    where the masks made here are kept for the merge pass (which then need not sort again)."""
    from fusemerge.kernels import reference
    from fusemerge.kernels.select import l1_scales

    def keep(base: torch.Tensor, x: torch.Tensor, i: int, start: int) -> torch.Tensor:
        def make() -> torch.Tensor:
            return della_keep(reference.delta(base, x), start, keys[i], density[i], epsilon[i], layout)

        if masks is not None and base.device.type == "cpu":
            return masks.draw(keys[i], start, base.numel(), density[i], keep=True, make=make)
        return make()

    def sums(base: torch.Tensor, xs: list[torch.Tensor], shifts: list[int | None], start: int
             ) -> list[tuple[int, int]]:
        kept = [keep(base, x, i, start) if shifts[i] is not None and density[i] < 1.0 else None
                for i, x in enumerate(xs)]
        return reference.l1_fixed_masks(base, xs, shifts, kept)

    return l1_scales(backend, segments, chunk, len(keys), sums)


def check_epsilon(density: float, epsilon: float) -> str | None:
    """mergekit's condition on a model's DELLA parameters (density < 1 only): density - epsilon and
    density + epsilon inside (0, 1). A problem's words, or None."""
    if density >= 1.0 or (0.0 < density - epsilon and density + epsilon < 1.0):
        return None
    return (f"density {density} and epsilon {epsilon} give keep probabilities from {density - epsilon:.6g} to "
            f"{density + epsilon:.6g}; DELLA needs both inside (0, 1): lower epsilon below "
            f"{min(density, 1.0 - density):.6g}")
