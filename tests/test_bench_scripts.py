"""Every benchmark script under bench/ starts and parses its options (`--help`): the GPU ones are run by hand on
a lent machine, where a script that no longer starts (an option defined twice, an import gone) costs minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if p.name != "common.py" and "__main__" in p.read_text())


def test_every_bench_script_parses_its_options() -> None:
    assert len(SCRIPTS) >= 10
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for p in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = out[-2000:]
    assert not failed, failed
