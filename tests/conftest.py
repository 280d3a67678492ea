"""Test-wide set-up: without a GPU, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before triton (and so fusemerge's kernels) is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from tests import interpreter_patch

    interpreter_patch.install()  # helpers inside a launch not patched twice: see tests/interpreter_patch.py


def pytest_terminal_summary(terminalreporter) -> None:
    """Show how many fuzz cases tests/test_fuzz.py tried, so CI output records it."""
    from tests import fuzz_count

    if fuzz_count.COUNTS:
        terminalreporter.write_line(fuzz_count.summary())
