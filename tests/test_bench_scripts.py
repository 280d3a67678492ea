"""Every benchmark script under bench/ starts and parses its options (`--help`): the GPU ones are run by hand on
a lent machine, where a script that no longer starts (an option defined twice, an import gone) costs minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if p.name != "common.py" and "__main__" in p.read_text())


# Each script run as __main__ with --help, all in one interpreter (torch imported once: one process per script
# took 30 s on the 2-core CI machine); what each printed and how it exited, as JSON.
HELP_ALL = """
import contextlib, io, json, os, runpy, sys
found = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path[0] = os.path.dirname(path)  # as `python bench/x.py` has it: the scripts import each other
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
        code = "returned without exiting"
    except SystemExit as e:
        code = e.code or 0
    except BaseException as e:
        code = repr(e)
    found[path] = [code, "usage:" in out.getvalue(), out.getvalue()[-2000:]]
print(json.dumps(found))
"""


def test_every_bench_script_parses_its_options() -> None:
    import json

    assert len(SCRIPTS) >= 10
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *map(str, SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(found) == sorted(map(str, SCRIPTS))
    failed = {Path(p).name: r for p, r in found.items() if r[0] != 0 or not r[1]}
    assert not failed, failed


def test_the_kernel_benchmark_runs_through_the_interpreter(tmp_path) -> None:
    """bench/kernels.py --smoke on CPU (Triton's interpreter, tiny sizes): every row of the GPU run's script is
    reached, and its checks that the Triton kernels and the torch backend give the same bytes, cuts, weights
    and L1 factors pass (an AssertionError exits non-zero). Run as `python bench/kernels.py` would run it, with the
    suite's interpreter shortcut (tests/interpreter_patch.py) installed first."""
    import os

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    script = REPO / "bench" / "kernels.py"
    run = ("import runpy, sys; from tests import interpreter_patch; interpreter_patch.install(); "
           f"sys.argv = sys.argv[1:]; sys.path[0] = {str(script.parent)!r}; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", run, str(script), "--smoke", "--experts", "2", "3",
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
