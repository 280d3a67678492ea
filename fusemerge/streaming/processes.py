"""CPU workers as forked processes: tensors merged at once without sharing one interpreter lock.

The threads of one CPU merge hold the GIL between torch ops (Python between the ops of each chunk: about 17% of
each worker's time, `py-spy --gil`, 2026-12-01), and they lose more than that: two threads burned 1.1 s more CPU
than two processes doing the same work. So on Linux, where `fork` is cheap (the child starts with torch imported,
the plan built, the input maps open and the output shards' descriptors), `--workers N` on the CPU are N forked
processes (`use_processes`). Same merge code, same bytes: each child takes the next tensor (largest first, a
shared counter), merges it with `Executor.merge_tensor`, and writes it with `pwrite` at its precomputed offsets
through the inherited descriptors, so the children need no coordination. Measured on a 2-core Xeon VM
(`python bench/e2e.py --method ties --tools fusemerge`, alternating with FUSEMERGE_CPU_WORKERS=threads, medians
of 3): 5.68 -> 4.94 s wall; peak anonymous memory 0.35 GB with threads and with processes (copy-on-write pages
counted once), once each child freezes its collector: without `gc.freeze()` the children's collections touched
every inherited object and copied the interpreter's pages, 0.43 GB. `bench/memory.py`'s bound under a 64 MiB
budget holds (1.05-1.31x over six runs, 2026-12-01, bench/README.md).

A child reports through its pipe, one JSON object per line: input bytes merged (progress), each finished tensor
(the parent journals it: `Executor.on_tensor_done`), and at the end its stage times and non-finite notes, or the
error it stopped on (InputError, OSError such as a full disk, or anything else), which the parent raises as the
same kind of error after killing the other children. The children ignore SIGINT and SIGTERM (the parent handles
Ctrl-C and SIGTERM, sent to it alone or to its whole process group, and kills them) and die with the parent
(PR_SET_PDEATHSIG), so a killed run leaves no process writing into the temporary directory a `--resume` reuses.

`fork_map(k, body)` runs the other CPU work that parallelizes the same way: `trim_scope: global`'s threshold
passes over the whole model, split by chunk (`Executor._run_stat_workers`, kernels/select.py): 2.88 s in one
worker, 2.11 s in two threads, 1.56 s in two processes (`python bench/global_cuts.py`, medians of 3, 2-core Xeon
VM, 2026-12-01); each child sends back its histograms and kept entries, pickled.

For DARE each worker process draws its own masks (the mask worker processes that serve the threads,
kernels/dare_masks.py, are not started): DARE-TIES e2e 13.0-13.5 -> 12.2-12.8 s on the same machine. Not used for the
Triton backend, the GPU pipeline, one worker, or off Linux (threads then, as before), nor with
FUSEMERGE_CPU_WORKERS=threads in the environment (an application that must not be forked).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import multiprocessing
import os
import pickle
import selectors
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from fusemerge.errors import FusemergeError, InputError
from fusemerge.options import opt_name

if TYPE_CHECKING:
    from fusemerge.planner import MergePlan, TensorPlan
    from fusemerge.streaming.executor import Executor

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1
WORKERS_ENV = "FUSEMERGE_CPU_WORKERS"  # "threads": never fork (use_processes)
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})  # what the children ignore, left to the parent


def use_processes(plan: MergePlan, pipeline: bool) -> bool:
    """Whether the CPU workers of `plan` run as forked processes (see the module docstring). The environment
    variable FUSEMERGE_CPU_WORKERS=threads keeps them threads (an application that embeds fusemerge and must not
    be forked)."""
    return (plan.device.type == "cpu" and not pipeline and plan.workers > 1 and plan.backend == "torch"
            and sys.platform.startswith("linux") and hasattr(os, "fork")
            and os.environ.get(WORKERS_ENV, "auto") != "threads")


def run_processes(ex: Executor, order: list[TensorPlan]) -> None:
    """Merge the tensors `order` (largest first) with `ex.plan.workers` forked processes; returns when every
    tensor is written, or raises the first child's error once every child is gone."""
    counter = multiprocessing.get_context("fork").Value("q", 0)  # the next tensor of `order` to take
    pending: dict[int, bytes] = {}  # pid -> the start of a line not yet complete
    ended: set[int] = set()  # children that reported their end
    parent = os.getpid()
    ex.times.worker_processes = min(ex.plan.workers, len(order))

    def on_data(pid: int, data: bytes) -> BaseException | None:
        # every complete line now, so a finished tensor is journaled at once
        *lines, pending[pid] = (pending.get(pid, b"") + data).split(b"\n")
        error = None
        for line in lines:
            msg = json.loads(line)
            if "end" in msg:
                ended.add(pid)
            error = error or _message(ex, msg)
        return error

    def on_exit(pid: int, status: int) -> BaseException | None:
        return None if pid in ended else _death(status)

    _run_children(ex.times.worker_processes, lambda w, fd: _child(ex, order, counter, fd, parent), on_data, on_exit)


def fork_map(k: int, body: Callable[[int], T]) -> list[T]:
    """[body(0), ..., body(k - 1)], each run in its own forked child (the statistics passes of `trim_scope:
    global`, split by chunk: kernels/select.py). A child sends its return value back pickled through a pipe;
    the first child's error is raised in the parent, as the same kind of error, once every child is gone (the
    others are killed)."""
    parent = os.getpid()
    received: dict[int, list[bytes]] = {}
    values: dict[int, T] = {}

    def on_data(pid: int, data: bytes) -> None:
        received.setdefault(pid, []).append(data)

    def on_exit(pid: int, status: int) -> BaseException | None:
        reply = b"".join(received.pop(pid, []))
        if not reply:
            return _death(status, "before it finished its share of the statistics")
        kind, value = pickle.loads(reply)
        if kind == "error":
            return _error(value)
        values[pid] = value
        return None

    pids = _run_children(k, lambda w, fd: _map_child(body, w, fd, parent), on_data, on_exit)
    return [values[pid] for pid in pids]


@contextlib.contextmanager
def _stop_signals_deferred():
    """Ctrl-C and SIGTERM wait, from before a fork until the child ignores them (_start_child) and the parent
    knows the child's pid: in between, the parent's handler would run in the child, or the parent would stop
    with a child it does not know of, left running. The mask keeps them from this thread and from the child (it
    inherits it); another thread of this process (the journal's) may still take one, and CPython then runs the
    Python handler in the main thread at once, so the main thread's handlers are swapped for one that notes the
    signal, which is raised again once the parent is done. (Not the main thread: its handlers do not run here.)"""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    noted: list[int] = []
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not None:  # None: not set from Python, so not restorable
                saved[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:  # the parent's (a child never returns from the body)
        # the mask first, the noting handlers still in place (one sent to this thread meanwhile is noted), then
        # each handler back, each restore done even if a signal's handler raises during another
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _restore(list(saved.items()))
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


def _restore(handlers: list) -> None:
    """signal.signal(sig, handler) for each (sig, handler), all of them whatever a handler raises meanwhile."""
    if handlers:
        try:
            signal.signal(*handlers[0])
        finally:
            _restore(handlers[1:])


def _run_children(k: int, child: Callable[[int, int], None], on_data: Callable[[int, bytes], BaseException | None],
                  on_exit: Callable[[int, int], BaseException | None]) -> list[int]:
    """Fork k children, child w running `child(w, write_fd)` (which never returns), and read their pipes until
    every one has closed: `on_data(pid, bytes)` for what arrives, `on_exit(pid, wait status)` once a child's
    pipe has closed and it is reaped. The first error either returns ends the loop; then the children still
    running are killed (on any failure, Ctrl-C included) and reaped, and the error is raised. Returns the pids
    in the order of w."""
    pipes: dict[int, int] = {}  # pid -> the read end of its pipe
    statuses: dict[int, int] = {}  # pid -> wait status, once reaped
    selector = selectors.DefaultSelector()
    error: BaseException | None = None
    try:
        for w in range(k):
            read_fd, write_fd = os.pipe()
            with _stop_signals_deferred():
                try:
                    pid = os.fork()
                except BaseException:  # EAGAIN / ENOMEM: this pipe has no child; the ones before are killed below
                    os.close(read_fd)
                    os.close(write_fd)
                    raise
                if pid == 0:  # the child: never returns
                    os.close(read_fd)
                    child(w, write_fd)
                os.close(write_fd)
                pipes[pid] = read_fd
                selector.register(read_fd, selectors.EVENT_READ, pid)
        while len(statuses) < len(pipes) and error is None:
            for key, _ in selector.select():
                pid = key.data
                data = os.read(key.fd, 1 << 16)
                if data:
                    error = error or on_data(pid, data)
                    continue
                selector.unregister(key.fd)  # its pipe closed: the child has exited, or died
                statuses[pid] = os.waitpid(pid, 0)[1]
                error = error or on_exit(pid, statuses[pid])
    finally:
        failed = error is not None or sys.exc_info()[0] is not None
        for pid, fd in pipes.items():
            if pid not in statuses:
                if failed:
                    os.kill(pid, signal.SIGKILL)
                statuses[pid] = os.waitpid(pid, 0)[1]
            os.close(fd)
        selector.close()
    if error is not None:
        raise error
    return list(pipes)


def _map_child(body: Callable[[int], object], w: int, write_fd: int, parent: int) -> None:
    """The body of a fork_map child: body(w), its value (or its error) pickled into the pipe, then `os._exit`."""
    code = 1
    try:
        _start_child(parent)
        try:
            reply = pickle.dumps(("ok", body(w)), protocol=pickle.HIGHEST_PROTOCOL)
            code = 0
        except BaseException as e:  # noqa: BLE001 - every error goes to the parent, which raises it
            reply = pickle.dumps(("error", _describe(e)))
        with os.fdopen(write_fd, "wb") as out:
            out.write(reply)
    finally:
        os._exit(code)


def _message(ex: Executor, msg: dict) -> BaseException | None:
    """Act on one line of a child; the error it reports, if any."""
    if "p" in msg:
        ex.progress(msg["p"])
    elif "d" in msg:
        ex.on_tensor_done(msg["d"])
    elif "end" in msg:
        end = msg["end"]
        ex.times.add(**end["times"])
        with ex.times.lock:
            for stage, at in end["firsts"].items():
                ex.times.firsts[stage] = min(at, ex.times.firsts.get(stage, at))
            ex.nonfinite += end["nonfinite"]
        ex.times.count_masks(*end["masks"])
    elif "error" in msg:
        return _error(msg["error"])
    return None


def _error(e: dict) -> BaseException:
    """The exception a child reported, as the same kind of error in the parent."""
    if e["kind"] == "input":
        return InputError(e["problems"])
    if e["kind"] == "fusemerge":
        return FusemergeError(e["message"])
    if e["kind"] == "memory":
        return MemoryError(e["message"])
    if e["kind"] == "os":
        return OSError(e["errno"], e["strerror"], e["filename"])
    return WorkerError(f"{e['type']}: {e['message']} (in a merge worker process)", e["traceback"])


class WorkerError(RuntimeError):
    """A bug met in a worker process: its one-line message, and the child's traceback (`fusemerge -v` prints it)."""

    def __init__(self, message: str, worker_traceback: str):
        super().__init__(message)
        self.worker_traceback = worker_traceback


def _death(status: int, before: str = "before its tensors were written") -> BaseException:
    """The error for a child that exited (wait status `status`) without saying how it ended."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = f" (out of memory? lower {opt_name('max_memory')})" if sig == signal.SIGKILL else ""
        return FusemergeError(f"a merge worker process was killed by signal {sig}{why}")
    return FusemergeError(f"a merge worker process exited with status {os.waitstatus_to_exitcode(status)} {before}")


def _child(ex: Executor, order: list[TensorPlan], counter, write_fd: int, parent: int) -> None:
    """The body of a forked worker: merge tensors until none is left, report, and `os._exit` (never return into
    the parent's code: no atexit handlers, no finally blocks of the parent's stack)."""
    code = 1
    try:
        _start_child(parent)
        out = os.fdopen(write_fd, "w", encoding="utf-8", buffering=1)

        def send(**msg: object) -> None:
            out.write(json.dumps(msg) + "\n")

        try:
            ex.times = type(ex.times)(started=ex.times.started)  # this child's own times: the parent adds them
            ex.progress = lambda n: send(p=n)
            ex.on_tensor_done = lambda name: send(d=name)
            while True:
                with counter.get_lock():
                    i = counter.value
                    counter.value += 1
                if i >= len(order):
                    break
                ex._merge_and_report(order[i])
            ex.writer.detach()
            t = ex.times
            times = {k: getattr(t, k) for k in ("read", "h2d", "stats", "merge", "write") if k in t.firsts}
            send(end={"times": times, "firsts": dict(t.firsts), "nonfinite": ex.nonfinite,
                      "masks": [t.masks_drawn, t.masks_reused]})
            code = 0
        except BaseException as e:  # noqa: BLE001 - every error goes to the parent, which raises it
            send(error=_describe(e))
        out.flush()
    finally:
        os._exit(code)


def _start_child(parent: int) -> None:
    """What every forked child does first."""
    # The collector of this copy leaves the objects inherited from the parent alone: without it, it touches
    # every object's header and so copies most of the interpreter's pages (0.43 -> 0.35 GB peak, e2e TIES).
    # Freezing moves whole generation lists; it changes nothing in the parent.
    gc.freeze()
    # Ctrl-C and SIGTERM (a scheduler's preemption, often sent to every process of the job) are the parent's: it
    # stops the run, keeps what was written for --resume and kills the children. The handler inherited from it
    # (cli._on_sigterm raises KeyboardInterrupt) would make a child report a worker error instead.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since before the fork (_run_children)
    _die_with(parent)
    # No OpenMP parallel region in a forked child: GNU libgomp's threads do not survive fork, and a child that
    # enters one waits for them forever (a test hung so once its process had used torch's intra-op threads
    # before forking). With one thread torch runs every op inline. (Executor.run sets it before forking too.)
    import torch

    torch.set_num_threads(1)


def _describe(e: BaseException) -> dict:
    if isinstance(e, InputError):
        return {"kind": "input", "problems": e.problems}
    if isinstance(e, FusemergeError):
        return {"kind": "fusemerge", "message": str(e)}
    if isinstance(e, MemoryError):
        return {"kind": "memory", "message": str(e)}
    if isinstance(e, OSError):
        return {"kind": "os", "errno": e.errno, "strerror": e.strerror, "filename": e.filename}
    return {"kind": "other", "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when the parent dies (Linux prctl); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)
