"""CPU workers as forked processes (streaming/processes.py): the bytes, reports and errors of the threads they
replace; a failing, dying or interrupted worker stops the run with its own error and leaves no process behind."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import fusemerge
from fusemerge.errors import FusemergeError, InputError
from fusemerge.streaming.executor import Executor
from fusemerge.streaming.processes import use_processes
from fusemerge.streaming.writer import ShardedWriter
from fusemerge.synthetic import make_llama_family, write_config_yaml
from tests.kernels.test_reference import PARAMS

SHAPE = dict(hidden=36, intermediate=100, layers=2, vocab=301)
METHODS = list(PARAMS)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not os.uname().sysname == "Linux",
                                reason="worker processes are forked, on Linux only")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=4, **SHAPE)


def config(tmp_path: Path, fam: dict, method: str) -> Path:
    path = tmp_path / f"{method}.yml"
    write_config_yaml(path, method, fam["base"], fam["experts"], weight=(1.0, 0.6, 1.3), **PARAMS[method])
    return path


def execute(cfg: Path, out: Path, processes: bool, workers: int = 3, **kwargs) -> tuple[Executor, list[str], list]:
    """Run the executor alone into `out`; (executor, tensors reported done in order, progress calls)."""
    plan = fusemerge.build_plan(cfg, device="cpu", max_memory="256KiB", workers=workers, out_shard_size="40KB")
    out.mkdir()
    done: list[str] = []
    progress: list[int] = []
    with ShardedWriter(out, plan.layout) as writer:
        ex = Executor(plan, writer, progress.append, on_tensor_done=done.append, processes=processes, **kwargs)
        ex.run()
    return ex, done, progress


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("method", METHODS)
def test_processes_write_the_bytes_of_threads(tmp_path: Path, fam: dict, method: str) -> None:
    cfg = config(tmp_path, fam, method)
    threads, t_done, t_progress = execute(cfg, tmp_path / "threads", processes=False)
    procs, p_done, p_progress = execute(cfg, tmp_path / "processes", processes=True)
    assert len(shards(tmp_path / "threads")) > 1
    assert shards(tmp_path / "processes") == shards(tmp_path / "threads")
    names = sorted(t.name for t in procs.plan.tensors)
    assert sorted(p_done) == sorted(t_done) == names  # each tensor reported once, by the parent
    assert sum(p_progress) == sum(t_progress) == procs.plan.input_bytes
    assert procs.times.merge > 0 and procs.times.write > 0 and "merge" in procs.times.firsts
    assert "h2d" not in procs.times.firsts  # the children report the stages they ran, no others
    assert (procs.times.masks_drawn, procs.times.masks_reused) == (threads.times.masks_drawn,
                                                                   threads.times.masks_reused)
    assert (procs.times.masks_drawn > 0) == method.startswith(("dare", "della"))  # their L1 rescale keeps masks
    assert no_children_left()


def test_use_processes_where_it_helps(tmp_path: Path, fam: dict, monkeypatch) -> None:
    ties = config(tmp_path, fam, "ties")
    dare = config(tmp_path, fam, "dare_ties")
    assert use_processes(fusemerge.build_plan(ties, device="cpu", workers=2), pipeline=False)
    assert not use_processes(fusemerge.build_plan(ties, device="cpu", workers=1), pipeline=False)
    assert not use_processes(fusemerge.build_plan(ties, device="cpu", workers=2), pipeline=True)
    assert use_processes(fusemerge.build_plan(dare, device="cpu", workers=2), pipeline=False)
    assert not use_processes(fusemerge.build_plan(ties, device="cpu", workers=2, backend="triton"), pipeline=False)
    assert "2 worker processes" in fusemerge.build_plan(ties, device="cpu", workers=2).summary()
    monkeypatch.setenv("FUSEMERGE_CPU_WORKERS", "threads")
    assert not use_processes(fusemerge.build_plan(ties, device="cpu", workers=2), pipeline=False)
    assert "1 worker(s)" in fusemerge.build_plan(ties, device="cpu", workers=1).summary()


def fail_on(monkeypatch, tensor: str, action) -> None:
    """Make merging `tensor` do `action()` (in whichever worker process takes it; set before the fork)."""
    real = Executor.merge_tensor

    def merge_tensor(self, t):
        if t.name == tensor:
            action()
        return real(self, t)

    monkeypatch.setattr(Executor, "merge_tensor", merge_tensor)


def _raise(e: BaseException):
    def action():
        raise e
    return action


LAST = "model.norm.weight"


@pytest.mark.parametrize("raised, caught, match", [
    (InputError(["x.weight: NaN/Inf values in the inputs"]), InputError, "NaN/Inf values"),
    (OSError(errno.ENOSPC, "No space left on device", "model.safetensors"), OSError, "No space left"),
    (FusemergeError("a clear message"), FusemergeError, "a clear message"),
    (ValueError("a bug"), RuntimeError, r"ValueError: a bug \(in a merge worker process\)"),
])
def test_a_worker_error_is_raised_as_itself(tmp_path: Path, fam: dict, monkeypatch, raised, caught, match) -> None:
    fail_on(monkeypatch, LAST, _raise(raised))
    with pytest.raises(caught, match=match) as e:
        execute(config(tmp_path, fam, "ties"), tmp_path / "out", processes=True)
    if isinstance(raised, OSError):
        assert e.value.errno == errno.ENOSPC and e.value.filename == "model.safetensors"
    if isinstance(raised, ValueError):  # one line; the child's traceback kept apart, for -v
        assert "\n" not in str(e.value) and "raise e" in e.value.worker_traceback
    assert no_children_left()


def test_a_full_disk_in_a_worker_is_the_runs_disk_full_message(tmp_path: Path, fam: dict, monkeypatch) -> None:
    fail_on(monkeypatch, LAST, _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(FusemergeError, match="the disk is full"):
        fusemerge.run(config(tmp_path, fam, "ties"), tmp_path / "out", device="cpu", workers=2)
    assert not (tmp_path / "out").exists() and no_children_left()


def test_a_worker_that_dies_stops_the_run(tmp_path: Path, fam: dict, monkeypatch) -> None:
    fail_on(monkeypatch, LAST, lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(FusemergeError, match="a merge worker process was killed by signal 9"):
        execute(config(tmp_path, fam, "ties"), tmp_path / "out", processes=True)
    assert no_children_left()


def test_ctrl_c_in_the_parent_stops_every_worker(tmp_path: Path, fam: dict) -> None:
    cfg = config(tmp_path, fam, "ties")
    plan = fusemerge.build_plan(cfg, device="cpu", max_memory="256KiB", workers=3)
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] > plan.input_bytes // 4:
            raise KeyboardInterrupt

    (tmp_path / "out").mkdir()
    with ShardedWriter(tmp_path / "out", plan.layout) as writer:
        with pytest.raises(KeyboardInterrupt):
            Executor(plan, writer, progress, processes=True).run()
    assert no_children_left()


def test_allowed_nonfinite_notes_come_back_from_the_workers(tmp_path: Path, monkeypatch) -> None:
    from tests.test_nonfinite import TENSOR, poison

    fam = make_llama_family(tmp_path / "family", n_experts=3, seed=5, **SHAPE)
    poison(fam["experts"][1], TENSOR, [float("nan"), float("inf")])
    cfg = config(tmp_path, fam, "ties")
    ex, _, _ = execute(cfg, tmp_path / "out", processes=True, allow_nonfinite=True)
    (note,) = ex.nonfinite
    assert TENSOR in note and f"2 in {fam['experts'][1]}" in note
    with pytest.raises(InputError, match=f"{TENSOR}: NaN/Inf values in the inputs"):
        execute(cfg, tmp_path / "out2", processes=True)


# -- a real run: Ctrl-C and SIGKILL reach the workers ------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> dict:
    """A merge that runs for a few seconds on a CI machine, with a reference output."""
    root = tmp_path_factory.mktemp("slow")
    fam = make_llama_family(root / "models", n_experts=3, seed=6, hidden=256, intermediate=688, layers=6, vocab=3000)
    fam["config"] = root / "ties.yml"
    write_config_yaml(fam["config"], "ties", fam["base"], fam["experts"], density=0.3)
    fam["reference"] = root / "reference"
    fusemerge.run(fam["config"], fam["reference"], device="cpu", workers=1, out_shard_size="2MB")
    return fam


def start_run(slow: dict, out: Path, *extra: str):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "fusemerge", "run", str(slow["config"]), str(out), "--device", "cpu", "--workers",
           "2", "--max-memory", "1MiB", "--out-shard-size", "2MB", "-q", *extra]
    return subprocess.Popen(cmd, cwd=repo, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_journal(out: Path, proc, entries: int = 2) -> None:
    """Until the run has journaled `entries` tensors (it is mid-merge, its workers busy)."""
    import time

    from fusemerge.streaming.journal import JOURNAL_NAME
    from fusemerge.streaming.writer import temp_dir_path

    journal = temp_dir_path(out) / JOURNAL_NAME
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_bytes().count(b"\n") > entries):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


def group_gone(pgid: int, seconds: float = 10) -> bool:
    """Whether every process of group `pgid` has exited within `seconds` (zombies count as exited: the dead run's
    children are reaped by whoever adopts them, maybe late)."""
    import time

    def alive() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    deadline = time.monotonic() + seconds
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_ctrl_c_stops_the_workers_and_the_merge_resumes(tmp_path: Path, slow: dict) -> None:
    out = tmp_path / "out"
    proc = start_run(slow, out)
    wait_for_journal(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and group_gone(proc.pid)
    resumed = start_run(slow, out, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert shards(out) == shards(slow["reference"])


@pytest.mark.parametrize("group", [False, True])
def test_sigterm_stops_the_run_as_ctrl_c_does_and_the_merge_resumes(tmp_path: Path, slow: dict, group: bool) -> None:
    """A scheduler's preemption (Slurm, Kubernetes) sends SIGTERM, to the job's processes or to its main one."""
    out = tmp_path / "out"
    proc = start_run(slow, out)
    wait_for_journal(out, proc)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    (line,) = stderr.strip().splitlines()  # the parent's line alone: nothing from the workers
    assert line.startswith("fusemerge: error: terminated (SIGTERM)") and "--resume" in line, stderr
    assert group_gone(proc.pid)
    resumed = start_run(slow, out, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert shards(out) == shards(slow["reference"])


def workers_of(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def test_sigterm_to_the_workers_alone_is_left_to_the_parent(tmp_path: Path, slow: dict) -> None:
    """The workers ignore SIGTERM, as they ignore SIGINT: the parent's handler, inherited through the fork,
    raised KeyboardInterrupt inside a worker, which reported it as a bug of the merge (exit 1, "internal error:
    WorkerError: Terminated", the partial merge deleted) whenever a worker's SIGTERM was handled before the
    parent's. A SIGTERM to the run is the parent's to handle (the test above)."""
    out = tmp_path / "out"
    proc = start_run(slow, out)
    wait_for_journal(out, proc)
    workers = workers_of(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert shards(out) == shards(slow["reference"]) and group_gone(proc.pid)


def test_killing_the_run_kills_its_workers(tmp_path: Path, slow: dict) -> None:
    out = tmp_path / "out"
    proc = start_run(slow, out)
    wait_for_journal(out, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the run's process only: its workers must not go on writing
    proc.communicate(timeout=60)
    assert group_gone(proc.pid, seconds=0.5)  # at once (PR_SET_PDEATHSIG; or a broken pipe at their next report)
    resumed = start_run(slow, out, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert shards(out) == shards(slow["reference"])


def test_a_bug_in_a_worker_is_one_line_and_its_traceback_with_v(tmp_path: Path, fam: dict, monkeypatch) -> None:
    from click.testing import CliRunner

    from fusemerge.cli import main

    fail_on(monkeypatch, LAST, _raise(ValueError("a bug")))
    cfg = config(tmp_path, fam, "ties")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "--device", "cpu", "-q"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == ["fusemerge: error: internal error: WorkerError: ValueError: a bug (in a "
                                             "merge worker process) (run with -v for the traceback; please report it)"]
    r = CliRunner().invoke(main, ["-v", "run", str(cfg), str(tmp_path / "out2"), "--device", "cpu", "-q"])
    assert r.exit_code == 1 and "in the worker process:" in r.stderr and "in merge_tensor" in r.stderr


def test_a_failed_fork_leaks_no_pipe_and_leaves_no_child(monkeypatch) -> None:
    """fork can fail (EAGAIN at a process limit, ENOMEM): the error is raised, the children already forked are
    killed and reaped, and no pipe end is left open."""
    from fusemerge.streaming import processes

    real_fork = os.fork
    forks = [0]

    def fork() -> int:
        forks[0] += 1
        if forks[0] == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    monkeypatch.setattr(processes.os, "fork", fork)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        processes.fork_map(3, lambda w: w)
    monkeypatch.setattr(processes.os, "fork", real_fork)
    assert fds() == before
    assert no_children_left()


def test_ctrl_c_taken_by_another_thread_during_a_fork_leaves_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C that another thread of the parent takes right after a fork (the main thread has it blocked there):
    CPython runs the handler in the main thread at once, which raised KeyboardInterrupt before the parent had
    recorded the child's pid, so that child was never killed and ran on. The handler now waits until the pid is
    recorded: KeyboardInterrupt, and every child killed and reaped."""
    from fusemerge.streaming import processes

    real_fork = os.fork
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)  # a thread with the signals unblocked
    other.start()

    def fork() -> int:
        pid = real_fork()
        if pid:  # the parent, with the child's pid not recorded yet
            os.kill(os.getpid(), signal.SIGINT)  # to the process: the other thread takes it
            time.sleep(0.2)  # and the main thread would run the handler here
        return pid

    monkeypatch.setattr(processes.os, "fork", fork)
    try:
        with pytest.raises(KeyboardInterrupt):
            processes.fork_map(2, lambda w: time.sleep(30))
    finally:
        idle.set()
        other.join()
    assert no_children_left()
