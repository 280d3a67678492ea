"""How the N expert chunks of one call are laid out: rows of one buffer, one pointer and a row stride.

The streaming pipeline reads each expert's chunk into its own row of one staging (or resident) buffer, so
the kernels take the experts as `x_ptr + i * row_stride`: any N with one compiled kernel and no table of
pointers to copy to the device per chunk. Chunks handed over separately are stacked (one copy of N chunks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def expert_rows(experts: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor whose data pointer is row 0, row stride in elements) for the experts' [N, n] layout.

    Zero-copy when `experts` is a 2-D tensor with contiguous rows, or a list of equally spaced rows of
    one storage (what the executor's staging buffer gives); otherwise the chunks are stacked (a copy).
    """
    if isinstance(experts, torch.Tensor):
        if experts.dim() != 2 or (experts.shape[1] > 1 and experts.stride(1) != 1):
            raise ValueError("experts as one tensor must be [N, n] with contiguous rows")
        return experts, experts.stride(0)
    first = experts[0]
    if len(experts) == 1:
        return first, 0
    size = first.element_size()
    gap = experts[1].data_ptr() - first.data_ptr()
    same_storage = all(
        e.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and e.dtype == first.dtype
        for e in experts
    )
    if same_storage and gap > 0 and gap % size == 0:
        if all(e.data_ptr() - first.data_ptr() == i * gap for i, e in enumerate(experts)):
            return first, gap // size
    return torch.stack(list(experts)), first.numel()



# How a tensor's entries group for the methods that weigh or rank them together (DELLA's rank units, model_stock's
# filter_wise and nuslerp's per-row arcs: rows of the last dimension; nuslerp's per-column arcs: the vectors along
# dimension 0, so a chunk holds whole rows of the other dimensions' entries).


def row_length(shape: Sequence[int]) -> int:
    """Entries of one row of the last dimension (a tensor of fewer than two dimensions is one row)."""
    return max(1, shape[-1] if len(shape) >= 2 else math.prod(shape))


def dim0_columns(shape: Sequence[int]) -> int:
    """How many vectors run along dimension 0: the product of the other dimensions (1 for a 1-D tensor)."""
    return max(1, math.prod(shape[1:]))


def whole_units(u: int, chunk: int) -> int:
    """The largest multiple of `u` entries in `chunk`, at least `u`."""
    return max(u, chunk - chunk % u)
