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


def pytest_configure(config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (`pytest -n`)
        # execnet starts its workers with SIGINT ignored, and a process inherits that: the tests that send
        # Ctrl-C to a merge (in this process or a child) need Python's own handler, as under plain pytest.
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_FuzzCountsFromWorkers())


class _FuzzCountsFromWorkers:
    """Under pytest -n the fuzz tests run in the workers: each sends its counts, the controller adds them up."""

    def pytest_sessionfinish(self, session) -> None:
        from tests import fuzz_count

        if hasattr(session.config, "workeroutput"):
            session.config.workeroutput["fusemerge_fuzz_counts"] = dict(fuzz_count.COUNTS)

    def pytest_testnodedown(self, node, error) -> None:
        from tests import fuzz_count

        for kind, n in getattr(node, "workeroutput", {}).get("fusemerge_fuzz_counts", {}).items():
            fuzz_count.COUNTS[kind] = fuzz_count.COUNTS.get(kind, 0) + n


def pytest_terminal_summary(terminalreporter) -> None:
    """Show how many fuzz cases tests/test_fuzz.py tried, so CI output records it."""
    from tests import fuzz_count

    if fuzz_count.COUNTS:
        terminalreporter.write_line(fuzz_count.summary())
