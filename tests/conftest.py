"""Test-wide set-up: without a GPU, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before triton (and so fusemerge's kernels) is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
