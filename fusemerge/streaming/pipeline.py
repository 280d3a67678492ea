"""The device pipeline: disk -> pinned host memory -> GPU -> pinned host memory -> disk, every stage overlapped.

    reader threads (R)            copy stream               compute stream                   writer thread
    mmap --memcpy--> in-slot  ->  H2D into GPU staging  ->  statistics + merge kernel  ->     wait event,
    (pinned, (N+1) rows)          (rows = experts, base)    D2H into a pinned out-slot        pwrite at offset

This is where bytes enter the GPU (`_h2d`). Reads run ahead of the GPU by up to `slots` chunks; the GPU
copies chunk k+1 while the kernel merges chunk k (two staging buffers, ordered by CUDA events); the writer
writes chunk k-1 meanwhile. Output offsets are known before any data is written (the layout is planned), so
chunks land wherever they belong, in any order.

Tensors whose method needs statistics (thresholds, DARE's L1) and whose inputs fit `resident_bytes` are
gathered on the GPU first: the statistics pass and the merge then run on resident data, so every input byte
crosses the disk and the PCIe bus once. A larger tensor streams twice: its statistics passes read it ahead
through two pinned buffers of their own (`read_ahead`), then it merges as it streams. `trim_scope: global` reads
the whole model that way for its thresholds (`Executor.find_global_cuts`), then merges every tensor as it
streams.

Memory: GPU: the resident tensor (<= resident_bytes) + 2 staging buffers + 2 output buffers of one chunk
each. Host: `slots` pinned in-slots of (N + 1) x chunk x itemsize + `slots // 2 + 1` pinned out-slots,
together <= `pinned_bytes` (the chunk is sized from it). Output bytes are identical to the executor's:
statistics are integers and each element's math does not depend on the chunk.

On a machine without CUDA the same code runs with ordinary host buffers and no streams (events are
complete at once); tests use that to check the pipeline's ordering and bookkeeping in CI.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from fusemerge.errors import InputError
from fusemerge.kernels.select import Segment
from fusemerge.options import opt_name
from fusemerge.planner import FLOAT_CODES, MergePlan, TensorPlan
from fusemerge.sizes import format_size

DEFAULT_PINNED = 1 << 30
MIN_PIPE_CHUNK = 1 << 8
ALIGN = 64  # staging rows stay 128-byte aligned for bf16, so the kernel's loads vectorize


class Pipeline:
    """Runs the merge of a plan through the overlapped pipeline; `Executor.run` uses it on CUDA devices.

    `device` (default: the plan's) is where this pipeline's kernels run; `pinned_bytes` (default: the plan's
    pinned budget) bounds its pinned host buffers. Several pipelines share one merge: `run_pipelines`."""

    def __init__(self, executor, *, readers: int | None = None, device: torch.device | None = None,
                 pinned_bytes: int | None = None):
        self.ex = executor
        self.plan: MergePlan = executor.plan
        self.device = _indexed(device or self.plan.device)
        self.cuda = self.device.type == "cuda"
        self.rows = max(len(t.inputs) + (t.base is not None) for t in self.plan.tensors)
        self.readers, self.slots, self.n_out = _slots(readers)
        budget = pinned_bytes or self.plan.pinned_bytes or DEFAULT_PINNED
        # pinned bytes per element of a chunk: in-slots (and 2 statistics buffers) of (N + 1) rows x 4 (the
        # widest dtype) + out-slots x 4
        per_elem = ((self.slots + 2) * self.rows + self.n_out) * 4
        chunk = min(self.plan.chunk_elems, budget // per_elem)
        chunk -= chunk % ALIGN
        # torch's pinned allocator rounds every block up to a power of two (torch.cuda.host_memory_stats): the
        # chunk shrinks until the rounded blocks fit too (else up to 1.7x the budget was pinned)
        while chunk > MIN_PIPE_CHUNK and self._pinned(chunk) > budget:
            chunk = max(MIN_PIPE_CHUNK, min(chunk - ALIGN, (_pow2(self.rows * chunk * 4) // 2) // (self.rows * 4)))
            chunk -= chunk % ALIGN
        self.chunk = max(MIN_PIPE_CHUNK, chunk)
        if self._pinned(self.chunk) > budget:  # even the smallest chunk pins more: the budget cannot be kept to
            raise InputError(f"{opt_name('max_pinned_memory')}: {format_size(budget)} for this GPU's pipeline (each "
                             f"GPU takes an equal share) is too small: its buffers for {self.rows} inputs and "
                             f"{self.readers} readers need at least {format_size(self._pinned(self.chunk))}")
        wide = [t for t in self.plan.tensors if t.chunk(self.chunk) > self.chunk]
        if wide:  # DELLA ranks a row's entries together: a chunk holds whole rows
            raise InputError(f"{opt_name('max_pinned_memory')}: this GPU's pipeline holds chunks of {self.chunk:,} "
                             f"elements, and {self.plan.method.name} ranks the {wide[0].chunk(self.chunk):,} entries "
                             f"of each row of tensor '{wide[0].name}' together; raise {opt_name('max_pinned_memory')}")
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._jobs: queue.Queue = queue.Queue()
        self._free_in: queue.Queue = queue.Queue()
        self._free_out: queue.Queue = queue.Queue()
        self._stat_bufs: list[torch.Tensor] | None = None
        self._stat_pool: ThreadPoolExecutor | None = None

    def _pinned(self, chunk: int) -> int:
        return _pinned_bytes(self.rows, self.slots, self.n_out, chunk)

    # -- small device abstractions (CUDA, or synchronous host stand-ins) -----------------------------

    def _host(self, rows: int, row_bytes: int) -> torch.Tensor:
        return torch.empty((rows, row_bytes), dtype=torch.uint8, pin_memory=self.cuda)

    def _event(self):
        return torch.cuda.Event(enable_timing=True) if self.cuda else _DoneEvent()

    def _record(self, stream):
        event = self._event()
        if self.cuda:
            event.record(stream)
        return event

    def _on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _keep_alive(self, t: torch.Tensor, *streams) -> None:
        """A buffer allocated here but used on other streams is not reused before their work on it is done."""
        if self.cuda:
            for s in streams:
                t.record_stream(s)

    # -- stage 1: reader threads fill pinned in-slots ------------------------------------------------

    def _fill(self, slot: torch.Tensor, t: TensorPlan, start: int, count: int) -> None:
        """Elements [start, start + count) of every input of `t` into the rows of `slot` (experts, then base)."""
        t0 = time.perf_counter()
        for r, e in enumerate(t.entries):
            self.ex.reader.read_into(e, start, count, slot[r])
        self.ex.times.add(read=time.perf_counter() - t0)

    def _feed(self, units: list, ready: queue.Queue, pool: ThreadPoolExecutor) -> None:
        """Walk the chunks in merge order; each waits for a free in-slot, then its read goes to the pool."""
        try:
            allocated = 0
            for t, start, count in units:
                try:
                    slot = self._free_in.get_nowait()
                except queue.Empty:  # pinned slots are allocated as the read-ahead first needs them
                    if allocated < self.slots:
                        allocated += 1
                        slot = self._host(self.rows, self.chunk * 4)
                    else:
                        slot = self._free_in.get()
                if slot is None or self._stop.is_set():
                    # after a failure: wake the GPU thread, which may be waiting for this chunk (run() raises
                    # the first error, not this one)
                    ready.put(_Stopped("the pipeline stopped after an error"))
                    return
                ready.put((start, count, slot, pool.submit(self._fill, slot, t, start, count)))
        except BaseException as e:  # noqa: BLE001 - handed to the GPU thread, which raises it
            ready.put(e)

    # -- stage 4: the writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        """Each job: wait for its event, run its action (a pwrite, a NaN check), then free its slots."""
        while (job := self._jobs.get()) is not None:
            done, action, in_slot, out_slot, timings = job
            try:
                done.synchronize()
                for field_name, e0, e1 in timings if self.cuda else ():
                    self.ex.times.add(**{field_name: e0.elapsed_time(e1) / 1e3})
                if action is not None and not self._stop.is_set():
                    t0 = time.perf_counter()
                    action()
                    self.ex.times.add(write=time.perf_counter() - t0)
            except BaseException as e:  # noqa: BLE001 - raised by run()
                self._fail(e)
            finally:
                if in_slot is not None:
                    self._free_in.put(in_slot)
                if out_slot is not None:
                    self._free_out.put(out_slot)
                self._jobs.task_done()
        self._jobs.task_done()  # the None that ended the loop

    def _copy_tensor(self, t: TensorPlan) -> None:
        """Copy `t`'s bytes to the output a chunk at a time, in host memory: a chunk is read while the writer
        writes the one before, and no more are held (a passthrough copies whole embeddings)."""
        entry, chunk = t.inputs[0], self.chunk
        item = entry.nbytes // max(t.numel, 1)
        for start in range(0, t.numel, chunk) if t.numel else [0]:
            count = min(chunk, t.numel - start)
            data = self.ex.reader.read(entry, start, count).contiguous().clone()
            self.ex.reader.release(entry, start, count)
            self._jobs.join()  # the chunk before is written
            self._check()
            last = start + count >= t.numel
            self._jobs.put((_DoneEvent(), _write(self.ex, t, start * item, data, count * item, last=last), None, None,
                            ()))

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._stop.set()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # -- stages 2 and 3: the GPU thread (this one) ---------------------------------------------------

    def run(self, order: list[TensorPlan]) -> None:
        if not self.cuda:
            return self._run(order)
        previous = torch.cuda.current_device()
        torch.cuda.set_device(self.device)  # this thread's launches (Triton's included) go to this GPU
        try:
            return self._run(order)
        finally:
            torch.cuda.set_device(previous)  # the caller's thread, when one pipeline runs in it

    def _run(self, order: list[TensorPlan]) -> None:
        order = file_order(self.plan, order)
        streamed = [t for t in order if not t.copy_only]
        units = [(t, s, min(t.chunk(self.chunk), t.numel - s)) for t in streamed
                 for s in range(0, t.numel, t.chunk(self.chunk))]
        for _ in range(self.n_out):
            self._free_out.put(self._host(1, self.chunk * 4)[0])
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.compute = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging = [torch.empty((self.rows, self.chunk * 4), dtype=torch.uint8, device=self.device)
                        for _ in range(2)]
        self.staging_free = [self._event(), self._event()]  # recorded after the kernel that read staging[s]
        self.gpu_out = [torch.empty(self.chunk * 4, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.turn = 0

        ready: queue.Queue = queue.Queue()
        writer = threading.Thread(target=self._write_loop, name="fusemerge-writer")
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="fusemerge-read")
        feeder = threading.Thread(target=self._feed, args=(units, ready, pool), name="fusemerge-feed")
        writer.start()
        feeder.start()
        try:
            # file order: the writer then writes each shard front to back, and its SHA-256 is fed as it goes
            for t in order:
                if t.copy_only:  # non-float tensors are copied as they are
                    self._copy_tensor(t)
                else:
                    chunks = (_ready(ready) for _ in range(-(-t.numel // t.chunk(self.chunk))))  # as they arrive
                    self._merge_tensor(t, chunks)
                self._check()
        except BaseException as e:
            self._fail(e)
        finally:
            self._free_in.put(None)  # wakes the feeder if it waits for a slot (after a failure)
            feeder.join()
            pool.shutdown(wait=True, cancel_futures=True)
            if self._stat_pool is not None:
                self._stat_pool.shutdown(wait=True, cancel_futures=True)
            self._jobs.put(None)
            writer.join()
            if self.cuda:
                torch.cuda.synchronize(self.device)
        self._check()

    def _fits(self, t: TensorPlan) -> bool:
        # the resident copy gives every row the widest input's itemsize (MergePlan.kept_bytes)
        return self.ex.global_cuts is None and self.plan.kept_bytes(t) <= self.plan.resident_bytes

    def _merge_tensor(self, t: TensorPlan, chunks) -> None:
        entries = t.entries
        out_dtype = FLOAT_CODES[t.out_dtype]
        with self._on(self.compute):  # zeroed in the stream whose kernels count into it, so before them
            nonfinite = torch.zeros(len(t.inputs) + 1, dtype=torch.int64, device=self.device)
        needs_stats = self.ex.needs_statistics(t)
        if not needs_stats or not self._fits(t):
            # no statistics, or a tensor too large to keep on the device: its statistics passes stream it
            # through two buffers of their own first (a second read of its inputs), then it merges as it streams
            # (with trim_scope: global the thresholds are known: nothing to read for them, unless the trim is
            # rescaled, whose L1 sums need the data)
            read = needs_stats and (self.ex.global_cuts is None or t.rescale is True)
            params = (self._streamed_statistics(t) if read
                      else self.ex.chunk_params(t, Segment(t.numel, _no_statistics)))
            for start, count, slot, fut in chunks:
                fut.result()
                s = self._next_buffer()
                h = self._h2d(slot, self.staging[s], [(r, 0, count * e.itemsize) for r, e in enumerate(entries)],
                              after=self.staging_free[s])
                base, experts = _views(t, self.staging[s], 0, count)
                self._kernel(t, base, experts, start, count, params, out_dtype, nonfinite, s, h2d=h, in_slot=slot)
        else:
            # the whole tensor on the device: statistics and merge read it there (one read from disk)
            width = max(e.itemsize for e in entries) * t.numel
            resident = torch.empty((len(entries), width), dtype=torch.uint8, device=self.device)
            self._keep_alive(resident, self.copy_stream, self.compute)
            for start, count, slot, fut in chunks:
                fut.result()
                h = self._h2d(slot, resident, [(r, start * e.itemsize, count * e.itemsize)
                                               for r, e in enumerate(entries)], after=None)
                self._jobs.put((h[1], None, slot, None, (("h2d", *h),)))  # the in-slot is free once copied
            copied = self._record(self.copy_stream)
            with self._on(self.compute):
                if self.cuda:
                    self.compute.wait_event(copied)
                # whole: the statistics may read the resident tensor at once (the one-pass bracket select), in
                # what the budget leaves beside it and the chunk buffers
                held = resident.nbytes + sum(b.nbytes for b in (*self.staging, *self.gpu_out))
                if self._stat_bufs is not None:
                    held += self._stat_gpu.nbytes
                segment = Segment(t.numel, lambda a, c: _views(t, resident, a, c), whole=True,
                                  scratch=max(0, self.plan.budget - held))
                params = self.ex.chunk_params(t, segment)
            step = t.chunk(self.chunk)
            for start in range(0, t.numel, step):
                count = min(step, t.numel - start)
                base, experts = _views(t, resident, start, count)
                self._kernel(t, base, experts, start, count, params, out_dtype, nonfinite, self._next_buffer())
        done = self._record(self.compute)  # the tensor's last kernel: its NaN / Inf counts are final

        def finish() -> None:
            self.ex._check_finite(t, nonfinite.tolist())
            self._tensor_done(t)

        self._jobs.put((done, finish, None, None, ()))

    def _tensor_done(self, t: TensorPlan) -> None:
        """Every byte of `t` is written: the executor's resume hook (never after a failure)."""
        if not self._stop.is_set():
            self.ex.on_tensor_done(t.name)

    def _next_buffer(self) -> int:
        """Which of the two staging / output buffers the next chunk uses."""
        s, self.turn = self.turn % 2, self.turn + 1
        return s

    def _streamed_statistics(self, t: TensorPlan):
        """ChunkParams of a tensor whose inputs do not fit the device: its statistics passes read it chunk by
        chunk through `read_ahead`."""
        (segment,), drain = self.read_ahead([t])
        try:
            params = self.ex.chunk_params(t, segment, chunk=self.chunk)
        except BaseException:
            drain(quiet=True)
            raise
        drain()
        return params

    def read_ahead(self, tensors: list[TensorPlan]) -> tuple[list[Segment], Callable[..., None]]:
        """Segments over `tensors` (in order) whose chunks of `self.chunk` elements are read ahead: while a pass
        uses a chunk on the device, the N + 1 inputs of the next one (the next tensor's first after a tensor's
        last; after the last, the first again, for the next pass) are read in parallel threads into the other of
        two pinned buffers. The statistics passes of a tensor too large for the device, and `trim_scope:
        global`'s over the whole model (Executor.find_global_cuts), so their reads overlap the kernels instead
        of waiting for them. Returns the segments and `drain()`, which waits for a read-ahead no pass used
        (`drain(quiet=True)` after a failure: without raising the read's own error)."""
        if self._stat_bufs is None:
            self._stat_bufs = [self._host(self.rows, self.chunk * 4) for _ in range(2)]
            self._stat_gpu = torch.empty((self.rows, self.chunk * 4), dtype=torch.uint8, device=self.device)
            self._stat_pool = ThreadPoolExecutor(min(self.rows, self.readers), thread_name_prefix="fusemerge-stat")
        bufs, copied = self._stat_bufs, [None, None]
        places = [(i, start) for i, t in enumerate(tensors) for start in range(0, t.numel, t.chunk(self.chunk))]
        after = {p: places[(k + 1) % len(places)] for k, p in enumerate(places)}
        pending: dict[tuple[int, int], tuple[int, list]] = {}
        turn = [0]

        def schedule(i: int, start: int) -> None:
            k = turn[0] % 2
            turn[0] += 1
            if copied[k] is not None:
                copied[k].synchronize()  # its last H2D is done: the buffer can be refilled
            t = tensors[i]
            count = min(t.chunk(self.chunk), t.numel - start)
            pending[i, start] = (k, [self._stat_pool.submit(self._timed_read, e, start, count, bufs[k][r])
                                     for r, e in enumerate(t.entries)])

        def drain(quiet: bool = False) -> None:
            for _, futures in pending.values():
                for f in futures:
                    if quiet:  # after a failure: wait, and keep the failure that is being raised
                        f.exception()
                    else:
                        f.result()
            pending.clear()

        def loader(i: int):
            t = tensors[i]

            def load(start: int, count: int):
                if (i, start) not in pending:  # not the chunk read ahead (a tie pass jumps): drop the read-ahead
                    drain()
                    schedule(i, start)
                k, futures = pending.pop((i, start))
                for f in futures:
                    f.result()
                schedule(*after[i, start])
                for r, e in enumerate(t.entries):
                    self._stat_gpu[r, :count * e.itemsize].copy_(bufs[k][r, :count * e.itemsize], non_blocking=True)
                copied[k] = self._record(torch.cuda.current_stream(self.device) if self.cuda else None)
                return _views(t, self._stat_gpu, 0, count)

            return load

        return [Segment(t.numel, loader(i)) for i, t in enumerate(tensors)], drain

    def close_statistics(self) -> None:
        """Release read_ahead's threads and buffers (a pipeline used only for statistics)."""
        if self._stat_pool is not None:
            self._stat_pool.shutdown(wait=True, cancel_futures=True)
        self._stat_pool = self._stat_bufs = self._stat_gpu = None

    def _timed_read(self, e, start: int, count: int, out: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.ex.reader.read_into(e, start, count, out)
        self.ex.times.add(read=time.perf_counter() - t0)

    def _h2d(self, slot: torch.Tensor, dst: torch.Tensor, rows: list[tuple[int, int, int]], after) -> tuple:
        """Copy slot row r's first n bytes to dst row r at byte `at`, for each (r, at, n), on the copy stream,
        once `after` (the kernel last reading dst) has completed. Returns the copy's start and end events."""
        with self._on(self.copy_stream):
            if self.cuda and after is not None:
                self.copy_stream.wait_event(after)
            h0 = self._record(self.copy_stream)
            for r, at, n in rows:
                dst[r, at:at + n].copy_(slot[r, :n], non_blocking=True)
            h1 = self._record(self.copy_stream)
        return h0, h1

    def _kernel(self, t, base, experts, start, count, params, out_dtype, nonfinite, s, h2d=None,
                in_slot=None) -> None:
        """Merge [start, start + count) into output buffer `s` on the compute stream (after `h2d`, the copy
        into staging buffer `s`, whose free event is then recorded), D2H into a pinned out-slot, and queue its
        write, which returns `in_slot`."""
        out_slot = self._free_out.get()
        item = out_dtype.itemsize
        nbytes = count * item
        with self._on(self.compute):
            if self.cuda and h2d is not None:
                self.compute.wait_event(h2d[1])
            k0 = self._record(self.compute)
            out = self.ex.merge_kernels.merge_chunk(base, experts, start, params, out_dtype,
                                                    out=self.gpu_out[s].view(out_dtype)[:count], nonfinite=nonfinite)
            k1 = self._record(self.compute)
            if self.cuda and h2d is not None:
                self.staging_free[s].record(self.compute)
            out_slot[:nbytes].copy_(out.view(torch.uint8), non_blocking=True)
            done = self._record(self.compute)
        timings = (("merge", k0, k1),) + ((("h2d", *h2d),) if h2d is not None else ())
        in_bytes = sum(e.itemsize for e in t.entries) * count
        data = out_slot[:nbytes]
        self._jobs.put((done, _write(self.ex, t, start * item, data, in_bytes), in_slot, out_slot, timings))


def file_order(plan: MergePlan, tensors: list[TensorPlan]) -> list[TensorPlan]:
    """The tensors in the order their bytes lie in the output (shard, offset)."""
    shard_index = {shard.filename: i for i, shard in enumerate(plan.layout.shards)}

    def position(t: TensorPlan) -> tuple[int, int]:
        filename, start, _ = plan.layout.locate(t.name)
        return shard_index[filename], start

    return sorted(tensors, key=position)


def split_by_bytes(tensors: list[TensorPlan], parts: int) -> list[list[TensorPlan]]:
    """`parts` contiguous runs of `tensors` (in their order) with about equal input bytes each (some may be empty
    when there are fewer tensors than parts): each GPU then writes one range of the output front to back."""
    total = sum(t.input_bytes for t in tensors)
    runs: list[list[TensorPlan]] = [[] for _ in range(parts)]
    done = 0
    for t in tensors:
        # the run whose share of the bytes holds this tensor's midpoint
        k = min(parts - 1, int((done + t.input_bytes / 2) * parts // total)) if total else 0
        runs[k].append(t)
        done += t.input_bytes
    return runs


def run_pipelines(executor, order: list[TensorPlan], devices: tuple[torch.device, ...],
                  readers: int | None = None) -> None:
    """Merge `order` on several devices at once: one Pipeline (its own streams, buffers, reader pool and writer
    thread) per device, each on a contiguous run of the output (split_by_bytes). The pinned budget is shared
    evenly; every pipeline writes through the executor's writer. The first failure stops them all and is raised.
    Output bytes do not depend on the split: each tensor's statistics and math run whole on one device."""
    plan = executor.plan
    runs = split_by_bytes(file_order(plan, order), len(devices))
    share = (plan.pinned_bytes or DEFAULT_PINNED) // len(devices)
    pipes = [Pipeline(executor, readers=readers, device=d, pinned_bytes=share) for d in devices]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(pipe: Pipeline, run: list[TensorPlan], done: threading.Event) -> None:
        try:
            pipe.run(run)
        except BaseException as e:  # noqa: BLE001 - the first one is raised below
            with lock:
                errors.append(e)
            for other in pipes:
                other._fail(_Stopped(f"stopped: the pipeline on {pipe.device} failed"))
        finally:
            done.set()

    # each thread's own event says when its pipeline has ended: a join() that Ctrl-C interrupts may mark its
    # thread as ended while it still runs (CPython's Thread._wait_for_tstate_lock; met by the test below)
    threads = []
    for p, r in zip(pipes, runs, strict=True):
        if r:
            done = threading.Event()
            threads.append((threading.Thread(target=work, args=(p, r, done), name=f"fusemerge-gpu-{p.device}"),
                            done))
    started: list[threading.Event] = []
    try:
        for th, done in threads:
            th.start()
            started.append(done)
        for th, _ in threads:
            th.join()
    except BaseException:  # Ctrl-C in this thread: stop every pipeline before the writer closes under them
        for pipe in pipes:
            pipe._fail(_Stopped("stopped: interrupted"))
        for done in started:
            done.wait()
        raise
    if errors:
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])


def _slots(readers: int | None) -> tuple[int, int, int]:
    """(reader threads, pinned in-slots, pinned out-slots) of a pipeline."""
    readers = readers or min(8, os.cpu_count() or 1)
    slots = max(4, readers + 2)
    return readers, slots, slots // 2 + 1


def _pinned_bytes(rows: int, slots: int, n_out: int, chunk: int) -> int:
    """Pinned bytes the in-slots, the 2 statistics buffers and the out-slots of `chunk` elements take, as the
    allocator rounds them."""
    return (slots + 2) * _pow2(rows * chunk * 4) + n_out * _pow2(chunk * 4)


def _pow2(n: int) -> int:
    """The power of two a pinned block of n bytes takes."""
    return 1 << max(0, (n - 1).bit_length())


def _indexed(device: torch.device) -> torch.device:
    """cuda as cuda:N (the current GPU): torch.cuda.set_device and the streams need the index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Stopped(RuntimeError):
    """Handed to the GPU thread by the feeder when it stops early because another stage failed."""


class _DoneEvent:
    """An event on a machine without CUDA: the work it marks was synchronous, so it is complete."""

    def synchronize(self) -> None:
        pass


def _views(t: TensorPlan, rows: torch.Tensor, start: int, count: int):
    """(base, experts) as typed views of elements [start, start + count) of the byte rows of `rows`."""
    entries = t.entries
    typed = [rows[r].view(e.torch_dtype)[start:start + count] for r, e in enumerate(entries)]
    n_exp = len(t.inputs)
    return (typed[n_exp] if t.base is not None else None), typed[:n_exp]


def _no_statistics(start: int, count: int):
    raise AssertionError("this method needs no statistics pass")


def _ready(ready: queue.Queue):
    item = ready.get()
    if isinstance(item, BaseException):
        raise item
    return item


def _write(ex, t: TensorPlan, offset: int, data: torch.Tensor, progress_bytes: int, last: bool = False
           ) -> Callable[[], None]:
    """The writer thread's action for one chunk of `t`; `last`: the chunk completes `t` (the resume hook)."""
    def write() -> None:
        ex.writer.write(t.name, offset, data)
        ex.progress(progress_bytes)
        if last:
            ex.on_tensor_done(t.name)

    return write
