"""What one merge kernel launch needs to know: the method's shape and every per-expert number.

A `ChunkParams` is built once per tensor (after its statistics pass) and used for every chunk of
that tensor, by every backend. All floats are rounded to float32 by the backends; thresholds are
int32 bit patterns of |delta| and index cuts are global flat indices (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Experts one Triton merge call takes: the kernel loops over them (not unrolled), so N only costs time; 64
# bounds its parameter tables and the tests. The torch backend takes any number.
MAX_EXPERTS = 64

# The "empty set" for in_top(): no |delta| bit pattern exceeds 2^31 - 1 and no index is below 0.
EMPTY_T = 2**31 - 1
EMPTY_C = 0


@dataclass(frozen=True)
class ChunkParams:
    """Per-tensor merge parameters shared by all chunks of the tensor.

    sparsifier: "none" | "magnitude" | "dare" | "breadcrumbs" | "della" | "sce" | "ram"
    consensus:  "none" | "sign"
    linear:     True for `linear` (average the models, not deltas; `base` is not used)
    weights:    one per expert (for linear: one per averaged model)
    lam:        lambda, the scale of the merged delta
    normalize:  divide by the (agreeing) weight sum
    t_keep, c_keep: per expert, the kept set is in_top(t_keep, c_keep) (magnitude, breadcrumbs)
    t_drop, c_drop: per expert, breadcrumbs' dropped top outliers in_top(t_drop, c_drop)
    keys, density:  per expert, DARE's Philox key (signed int64) and keep probability (DELLA's: its key and mean
                keep probability)
    epsilon, ranks: DELLA's, per expert its epsilon, and the tensor's rank groups (m, inner) (kernels/della.py)
    scale:      per expert, rescale factor for kept entries (1.0 = none)
    nearswap:   nearswap's t (None for every other method): the base and the one expert, mixed per entry
                (reference.nearswap_torch, triton_nearswap.nearswap_chunk; the other fields are then unused)
    sce_cut:    SCE's (sparsifier "sce"): the entries kept, in_top(t, c) of the float32 bits of the variance over
                the experts, or None (select_topk >= 1: every entry); `weights` are its computed weights
                (kernels/sce.py)
    ram:        RAM's (sparsifier "ram"): (epsilon, RAM+'s per-expert scales of its own entries or None for ram)
                (kernels/ram.py)
    filter_rows: model_stock's with filter_wise: true, or a per-row nuslerp's (nuslerp_t its t): the row length;
                each row's weights come from the row itself (kernels/model_stock.py, kernels/nuslerp.py: merge_rows;
                `weights` are then unused)
    nuslerp_cols: a per-column nuslerp's (nuslerp_row_wise with flatten false): each column's weights (a, b)
                (kernels/nuslerp.py: merge_columns; chunks are whole rows of len(a))
    """

    sparsifier: str
    consensus: str
    linear: bool
    weights: tuple[float, ...]
    lam: float = 1.0
    normalize: bool = False
    t_keep: tuple[int, ...] = ()
    c_keep: tuple[int, ...] = ()
    t_drop: tuple[int, ...] = ()
    c_drop: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()
    density: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    epsilon: tuple[float, ...] = ()
    ranks: tuple[int, int] = (1, 1)
    nearswap: float | None = None
    sce_cut: tuple[int, int] | None = None
    ram: tuple[float, tuple[float, ...] | None] | None = None
    filter_rows: int | None = None
    nuslerp_t: float | None = None
    nuslerp_cols: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def n(self) -> int:
        return len(self.weights)

    def scales(self) -> tuple[float, ...]:
        return self.scale if self.scale else (1.0,) * self.n

    def weight_sum(self) -> float:
        """sum w_i as the kernels add it: float32, left to right; a sum of 0 is 1 (the plain mean's divisor)."""
        total = np.float32(0.0)
        for w in self.weights:
            total = np.float32(total + np.float32(w))
        return float(total) if total != 0 else 1.0

    def smallest_weight(self) -> float:
        """min w_i as float32 (1e-46 is 0): the disjoint mean's divisor is at least it when it is positive."""
        return float(np.float32(min(self.weights)))
