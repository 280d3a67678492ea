"""DARE's keep masks on the CPU path: drawn in worker processes, kept from the statistics pass for the merge.

Drawing Philox is most of a CPU DARE merge (62% of a one-worker DARE-TIES merge, profiled 2026-12-01). Two
things make it cheaper without changing a bit:

- `KeepMasks`: a tensor's L1 rescale (statistics pass) and its merge pass need the same masks; the first
  pass keeps them, bit-packed (1 bit per entry and expert, 1/16 of bf16 inputs), for the second.
- `MaskWorkers`: the numpy rounds are short calls that threads of one process serialize on the GIL, so
  the masks are drawn by small worker processes (``philox_numpy.py`` run as a script, numpy only) while
  the merge's threads wait on a pipe with the GIL released.

Both give exactly ``philox.dare_keep_run``'s bits (tests/kernels/test_dare_masks.py); a worker that fails
is dropped and its masks are drawn in the thread instead.
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from fusemerge.kernels import philox_numpy
from fusemerge.kernels.philox import _split_key, dare_keep_run, keep_below

# Below this many draws (entries x experts) a merge draws its masks in its threads: starting a worker
# (~0.05 s) would cost more than it saves (2^24 draws take ~0.3 s at 18 ns).
WORKER_MIN_DRAWS = 1 << 24
# Anonymous memory of one worker (numpy, its buffers, a chunk's answer): 14 MB measured (RssAnon, 2^18-entry
# runs, 2026-12-01), counted as 16 MiB. Workers start only where they take at most 1/8 of --max-memory.
WORKER_BYTES = 16 << 20
# A worker says READY after importing numpy (~0.05 s here); one that has not after this long is not used.
READY_TIMEOUT_S = 20.0


class MaskWorkers:
    """`processes` worker processes drawing DARE keep masks for the calling threads.

    `draw_packed` blocks the calling thread on a pipe (the GIL released) while a free worker draws; a worker
    that fails (it died, or answered short) is dropped and that run drawn in the calling thread. `close`
    ends the workers (end of input), as does the interpreter's exit.

    >>> with MaskWorkers(1) as w:
    ...     bits = w.draw_packed(123, 0, 16, 0.5)
    >>> bits.dtype, bits.size
    (dtype('uint8'), 2)
    """

    def __init__(self, processes: int) -> None:
        self._idle: queue.Queue[subprocess.Popen | None] = queue.Queue()  # None: no worker, draw in place
        self._all: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self.served = 0  # runs the workers drew
        self.failed = 0  # workers dropped
        started = []
        if getattr(sys, "frozen", False):  # a frozen application: sys.executable is the application itself
            processes = 0
            self.failed += 1
        # -P / -I: the script's directory (fusemerge/kernels, whose select.py would shadow the standard
        # library's) is not put on sys.path; one BLAS / OpenMP thread, as the worker does no linear algebra
        isolate = "-P" if sys.version_info >= (3, 11) else "-I"
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for _ in range(max(processes, 0)):
            try:
                started.append(subprocess.Popen([sys.executable, isolate, philox_numpy.__file__], env=env,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL))
            except OSError:  # no usable interpreter (sys.executable empty, or not Python when embedded)
                self.failed += 1
        deadline = time.monotonic() + READY_TIMEOUT_S  # one wait for all of them
        for proc in started:
            if _ready(proc, max(deadline - time.monotonic(), 0.0)):
                self._all.append(proc)
                self._idle.put(proc)
            else:
                self.failed += 1
                proc.kill()
                proc.wait()
        if not self._all:
            self._idle.put(None)

    @property
    def alive(self) -> int:
        """Worker processes running (not dropped, not closed)."""
        with self._lock:
            return len(self._all)

    def __enter__(self) -> MaskWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def draw_packed(self, key: int, start: int, n: int, density: float) -> np.ndarray:
        """The keep bits of dare_keep_run(key, start, n, density), ``np.packbits(bitorder="little")``."""
        k0, k1 = _split_key(key)
        below = keep_below(density)
        size = -(-n // 8)
        proc = self._idle.get() if n else None
        if proc is not None:
            try:
                proc.stdin.write(philox_numpy.REQUEST.pack(k0, k1, start, n, below))
                proc.stdin.flush()
                answer = proc.stdout.read(size)
            except (OSError, ValueError):
                answer = b""
            except BaseException:  # e.g. MemoryError, KeyboardInterrupt: the pipe's state is unknown
                self._drop(proc)
                raise
            if len(answer) == size:
                self._idle.put(proc)
                with self._lock:
                    self.served += 1
                return np.frombuffer(answer, dtype=np.uint8)
            self._drop(proc)
        elif n:
            self._idle.put(None)  # no worker left: pass the word on to the next waiting thread
        out = np.empty(n, dtype=np.bool_)
        philox_numpy.keep_run(k0, k1, start, n, below, out)
        return np.packbits(out, bitorder="little")

    def _drop(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc not in self._all:  # closed meanwhile
                return
            self._all.remove(proc)
            self.failed += 1
            if not self._all:
                self._idle.put(None)  # threads waiting for a worker draw in place instead
        proc.kill()
        proc.wait()

    def close(self) -> None:
        with self._lock:
            procs, self._all = self._all, []
        while True:  # later draws happen in place
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        self._idle.put(None)
        for proc in procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether `proc` said READY within `timeout` seconds (a worker that cannot import numpy, or a program
    that is not Python, does not)."""
    try:
        readable, _, _ = select.select([proc.stdout], [], [], timeout)
        return bool(readable) and proc.stdout.read(len(philox_numpy.READY)) == philox_numpy.READY
    except (OSError, ValueError):  # no select() on pipes (Windows): no workers
        return False


class KeepMasks:
    """DARE (or DELLA) keep masks of one tensor, bit-packed: drawn once by its statistics pass (the L1 rescale) and
    used again by its merge pass, instead of drawing the stream twice.

    Stored masks go one after another into one block of ``max_bytes`` (allocated at the first store, freed
    with this object): thousands of chunk-sized packed masks allocated one by one would be interleaved with
    the merge's chunk buffers on the heap and fragment it. Space is not reused, so at most ``max_bytes`` of
    packed bits (1 bit per entry and expert) are ever stored; runs that do not fit are drawn again. A stored
    mask is handed out once and forgotten. ``workers`` (optional): where masks are drawn. Only the CPU path
    uses this (the GPU kernels draw the stream in registers).

    >>> from fusemerge.kernels.philox import dare_key
    >>> masks = KeepMasks(1 << 20)
    >>> m = masks.draw(dare_key(0, "w", 0), 0, 100, 0.5, keep=True)
    >>> torch.equal(masks.draw(dare_key(0, "w", 0), 0, 100, 0.5), m), masks.held_bytes
    (True, 0)
    """

    def __init__(self, max_bytes: int, workers: MaskWorkers | None = None) -> None:
        self.max_bytes = max(max_bytes, 0)
        self.workers = workers
        self.held_bytes = 0  # bytes of stored masks not yet handed out
        self.used_bytes = 0  # bytes of the block written so far
        self.drawn = 0  # runs drawn (in a worker or in place)
        self.reused = 0  # runs handed out from the store instead of drawn again
        self._block: np.ndarray | None = None
        self._held: dict[tuple[int, int, int, int], tuple[int, int]] = {}  # -> (offset, size) in the block

    @staticmethod
    def bytes_for(numel: int, chunk: int, experts: int) -> int:
        """Bytes that keep every mask of a tensor of `numel` entries drawn `chunk` entries at a time (each
        chunk's bits are packed on their own, so padded to whole bytes)."""
        full, rest = divmod(numel, chunk)
        return experts * (full * -(-chunk // 8) + -(-rest // 8))

    def draw(self, key: int, start: int, n: int, density: float, *, keep: bool = False,
             make: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """dare_keep_run(key, start, n, density) on CPU: a stored mask if there is one (then forgotten),
        else drawn, and stored for one later use when `keep` and it fits. `make`: what draws the mask instead
        (DELLA's, kernels/della.py: a bool tensor of n entries, the same for the same key, start and n)."""
        ident = (key, start, n, keep_below(density))
        place = self._held.pop(ident, None)
        if place is not None:
            offset, size = place
            self.held_bytes -= size
            self.reused += 1
            assert self._block is not None
            return _unpack(self._block[offset:offset + size], n)
        self.drawn += 1
        size = -(-n // 8)
        store = keep and self.used_bytes + size <= self.max_bytes
        if make is not None:
            mask = make()
            packed = np.packbits(mask.numpy(), bitorder="little") if store else None
        elif self.workers is not None:
            packed = self.workers.draw_packed(key, start, n, density)
            mask = _unpack(packed, n)
        else:
            mask = dare_keep_run(key, start, n, density)
            packed = np.packbits(mask.numpy(), bitorder="little") if store else None
        if store:
            if self._block is None:
                self._block = np.empty(self.max_bytes, dtype=np.uint8)
            self._block[self.used_bytes:self.used_bytes + size] = packed
            self._held[ident] = (self.used_bytes, size)
            self.used_bytes += size
            self.held_bytes += size
        return mask


def _unpack(packed: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, count=n, bitorder="little").view(np.bool_))
