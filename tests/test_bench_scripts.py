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


def test_the_kernel_benchmark_runs_through_the_interpreter(tmp_path) -> None:
    """bench/kernels.py --smoke on CPU (Triton's interpreter, tiny sizes): every row of the GPU run's script is
    reached, and its checks that the Triton kernels and the torch backend give the same bytes, cuts, weights
    and L1 factors pass (an AssertionError exits non-zero)."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--smoke", "--experts", "2", "3",
                           "--results", str(tmp_path / "k.csv")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kind in ("| merge | ties |", "| select | ties |", "| angles | model_stock |", "| rescale | dare |"):
        assert kind in proc.stdout, kind


def test_the_compiled_loop_benchmarks_run_and_check_their_results(tmp_path) -> None:
    """stat_reads.py and gram_loops.py at a tiny size: each exits non-zero where its two ways disagree (or where
    the compiled loops do not load, which the CI machine's C compiler rules out)."""
    tiny = ["--chunks", "1000", "--rounds", "1"]
    runs = {"stat_reads.py": ["--experts", "2"], "gram_loops.py": ["--vectors", "2", "3"]}
    for name, extra in runs.items():
        proc = subprocess.run([sys.executable, str(REPO / "bench" / name), *tiny, *extra], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert "True" in proc.stdout.splitlines()[-1], (name, proc.stdout[-2000:])
