"""How the N expert chunks of one call are laid out: rows of one buffer, one pointer and a row stride.

The streaming pipeline reads each expert's chunk into its own row of one staging (or resident) buffer, so
the kernels take the experts as `x_ptr + i * row_stride`: any N with one compiled kernel and no table of
pointers to copy to the device per chunk. Chunks handed over separately are stacked (one copy of N chunks).
"""

from __future__ import annotations

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

