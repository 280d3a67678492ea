"""The merge loop: for each tensor, statistics (if the method needs them), then chunks -> kernel -> disk.

    for tensor in plan:                       (workers run different tensors at once)
        params = statistics(tensor)           thresholds / DARE rescale, streamed over chunks
        for chunk in tensor:
            read N+1 chunks (mmap)  ->  merge_chunk  ->  pwrite at the chunk's offset in its shard

Chunks are bounded by the memory budget, never whole tensors, and the output bytes do not depend on
the chunk size: statistics are integers and every element's math is the same in every chunk.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fusemerge.errors import InputError
from fusemerge.kernels import load_backend, on_device, philox_native
from fusemerge.kernels.dare_masks import WORKER_BYTES, WORKER_MIN_DRAWS, KeepMasks, MaskWorkers
from fusemerge.kernels.params import EMPTY_C, ChunkParams
from fusemerge.kernels.select import Segment, run_threads, tensor_params, top_cuts, trim_counts
from fusemerge.options import opt
from fusemerge.planner import FLOAT_CODES, MergePlan, TensorPlan
from fusemerge.streaming.global_cuts import Cuts, CutsFile
from fusemerge.streaming.processes import fork_map, run_processes, use_processes
from fusemerge.streaming.reader import ChunkReader
from fusemerge.streaming.writer import ShardedWriter

T = TypeVar("T")

F32 = torch.float32


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over workers (so they can exceed the wall time)."""

    read: float = 0.0
    h2d: float = 0.0  # host-to-device copies (CUDA pipeline only), measured by CUDA events
    stats: float = 0.0
    merge: float = 0.0
    write: float = 0.0
    flush: float = 0.0  # wall seconds: fsync of the output shards
    manifest: float = 0.0  # wall seconds: SHA-256 of the written shards
    # DARE on CPU (kernels/dare_masks.py): mask runs drawn, runs the merge pass reused from the statistics
    # pass, and the worker processes that drew them
    masks_drawn: int = 0
    masks_reused: int = 0
    mask_workers: int = 0
    mask_code: str = ""  # how the keep test ran: philox_native.describe()
    worker_processes: int = 0  # the merge workers were forked processes (streaming/processes.py)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    started: float = field(default_factory=time.perf_counter, repr=False)
    # stage -> wall seconds from `started` to the end of its first timed piece of work: what start-up costs
    # (on CUDA, the first kernel's entry includes loading the Triton kernels)
    firsts: dict[str, float] = field(default_factory=dict, repr=False)

    def add(self, **kw: float) -> None:
        with self.lock:
            now = time.perf_counter() - self.started
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)
                self.firsts.setdefault(k, now)

    def count_masks(self, drawn: int, reused: int) -> None:
        with self.lock:
            self.masks_drawn += drawn
            self.masks_reused += reused

    def masks_line(self) -> str:
        """'DARE masks: 2,636 chunk runs drawn (in the merge threads) by the compiled keep test, 2,636 reused by
        the merge pass from the statistics pass'."""
        where = (f" (by {self.mask_workers} worker processes)" if self.mask_workers
                 else f" (in the {self.worker_processes} merge worker processes)" if self.worker_processes
                 else " (in the merge threads)")
        if self.mask_code == "della":
            return (f"DELLA masks: {self.masks_drawn:,} chunk runs ranked and drawn{where}, {self.masks_reused:,} "
                    "reused by the merge pass from the statistics pass")
        how = {"compiled": " by the compiled keep test", "numpy": " by numpy"}.get(self.mask_code.split(" (")[0], "")
        return (f"DARE masks: {self.masks_drawn:,} chunk runs drawn{where}{how}, {self.masks_reused:,} reused by "
                "the merge pass from the statistics pass")

    def startup_line(self) -> str:
        """'first read done after 0.12 s, statistics after ...', in the order the stages first finished."""
        names = {"read": "read", "h2d": "H2D", "stats": "statistics", "merge": "merge", "write": "write"}
        done = sorted((at, names[k]) for k, at in self.firsts.items() if k in names)
        return ", ".join(f"{name} after {at:.2f} s" for at, name in done)


class Executor:
    """Runs a MergePlan into a ShardedWriter. `progress(nbytes)` is called as input bytes are merged.

    Hooks for `--resume` (streaming/journal.py): tensors named in `skip` are not merged (they are already in the
    output; statistics over the whole model, as `trim_scope: global`, still read them unless `cuts_file` holds
    them), and `on_tensor_done(name)` is called, from the worker that merged it, once every byte of tensor
    `name` has been written by `writer.write`; never for a tensor cut short by a failure.
    """

    def __init__(self, plan: MergePlan, writer: ShardedWriter, progress: Callable[[int], None] | None = None, *,
                 skip: Collection[str] = (), on_tensor_done: Callable[[str], None] | None = None,
                 allow_nonfinite: bool = False, pipeline: bool | None = None, readers: int | None = None,
                 processes: bool | None = None, cuts_file: CutsFile | None = None):
        self.plan = plan
        self.cuts_file = cuts_file  # trim_scope: global thresholds found by an earlier run of this merge
        # the overlapped disk -> pinned -> GPU -> disk pipeline (streaming/pipeline.py): on CUDA by default;
        # pipeline=True runs it on CPU too (synchronous stand-ins for streams: how CI tests it)
        self.pipeline = plan.device.type == "cuda" if pipeline is None else pipeline
        # CPU workers as forked processes (streaming/processes.py) where that is possible and helps, else threads
        self.processes = use_processes(plan, self.pipeline) if processes is None else processes
        self.readers = readers
        self.allow_nonfinite = allow_nonfinite
        self.nonfinite: list[str] = []  # with allow_nonfinite: one line per tensor whose inputs hold NaN / Inf
        self.writer = writer
        self.progress = progress or (lambda n: None)
        self.skip = frozenset(skip)
        self.on_tensor_done = on_tensor_done or (lambda name: None)
        self.reader = ChunkReader()
        self.merge_kernels, self.stat_kernels = load_backend(plan.backend, plan.device.type)
        # the compiled CPU loops (kernels/cpu_fused.py) read bf16 / fp16 chunks as they are
        self._native = plan.native_cpu
        self.times = StageTimes()
        self.global_cuts: dict[str, list[tuple[int, int, int, int]]] | None = None
        self._stop = threading.Event()  # set on the first failure: the other workers stop at their next chunk
        self.mask_workers: MaskWorkers | None = None  # CPU DARE: processes drawing keep masks (run() starts them)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, entry, start: int, count: int, widen: bool = False) -> torch.Tensor:
        """Elements [start, start + count) of `entry` as a tensor on the compute device.

        On CPU the bytes are copied from the page cache by `pread` (`_read`); the copy is float32 for the torch
        operations (each of which would convert again), in the file's dtype where the compiled loops read it,
        unless `widen` (a tensor whose inputs have different dtypes: the loops read one).
        """
        t0 = time.perf_counter()
        if self.plan.device.type == "cpu":
            out = self._read(entry, start, count)
            if out.dtype != F32 and (widen or not self._native):
                out = out.to(F32)
        else:
            out = self.reader.read(entry, start, count).to(self.plan.device, non_blocking=False)
            self.reader.release(entry, start, count)
        self.times.add(read=time.perf_counter() - t0)
        return out

    def _read(self, entry, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of `entry` in its dtype, in a new CPU tensor, by `pread`: a copy from the
        page cache that takes no page faults (reading through the map and releasing its pages after took twice as
        long: every chunk faulted its pages in again) and holds no mapped pages."""
        out = torch.empty(count * entry.itemsize, dtype=torch.uint8)
        self.reader.read_into(entry, start, count, out)
        return out.view(entry.torch_dtype)

    def _segment(self, t: TensorPlan, keep: bool = False) -> Segment:
        """Tensor `t`'s data. With `keep`, loaded chunks stay in memory for the next pass over `t`
        (statistics passes, then the merge pass): each input byte is then read and converted once."""
        cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] | None = {} if keep else None
        widen = t.mixed_dtypes

        def load(start: int, count: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            if cache is not None and start in cache:
                return cache[start]
            base = self._load(t.base, start, count, widen) if t.base is not None else None
            chunk = base, [self._load(e, start, count, widen) for e in t.inputs]
            if cache is not None:
                cache[start] = chunk
            return chunk

        return Segment(t.numel, load, cache)

    def needs_statistics(self, t: TensorPlan) -> bool:
        """Whether t's parameters come from a statistics pass over its inputs (MergePlan.needs_statistics)."""
        return self.plan.needs_statistics(t)

    def _resident(self, t: TensorPlan) -> bool:
        """Whether t's inputs, as the chunks hold them (`MergePlan.kept_bytes`), fit in this worker's half of the
        budget (the other half is for chunks)."""
        return (self.needs_statistics(t) and self.global_cuts is None
                and self.plan.kept_bytes(t) <= self.plan.resident_bytes)

    # -- statistics ----------------------------------------------------------------------------

    def _cpu_dare(self, sparsifier: str = "dare") -> bool:
        return self.plan.device.type == "cpu" and self.plan.backend == "torch" and not self.pipeline \
            and self.plan.method.sparsifier == sparsifier

    def keep_masks(self, t: TensorPlan) -> KeepMasks | None:
        """How the CPU path draws t's DARE masks (kernels/dare_masks.py): in the mask workers when they run,
        and, with the L1 rescale, drawn once for the statistics pass and kept for the merge pass (DELLA's
        too). The packed bits (1 per entry and expert) live in the part of this worker's resident budget that t's cached
        inputs leave free."""
        free = self.plan.resident_bytes - (self.plan.kept_bytes(t) if self._resident(t) else 0)
        need = KeepMasks.bytes_for(t.numel, t.chunk(self.plan.chunk_elems), len(t.inputs))
        if self._cpu_dare(sparsifier="della"):  # DELLA's masks (a sort per row): made once, for both passes
            return KeepMasks(min(free, need)) if t.rescale is True else None
        if not self._cpu_dare() or (t.rescale is not True and self.mask_workers is None):
            return None
        if t.rescale is not True:
            return KeepMasks(0, self.mask_workers)
        return KeepMasks(min(free, need), self.mask_workers)

    def _start_mask_workers(self, order: list[TensorPlan]) -> None:
        """One mask worker process per merge thread, when the keep test is not compiled (compiled, it releases
        the GIL: the threads draw side by side), the merge draws enough masks to pay for them, the process may
        use 2 CPUs or more, and the workers' memory is a small part of the budget."""
        draws = sum(t.numel * len(t.inputs) for t in order if not t.copy_only)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if (self._cpu_dare() and not philox_native.available() and cpus > 1 and draws >= WORKER_MIN_DRAWS
                and self.plan.workers * WORKER_BYTES <= self.plan.budget // 8):
            self.mask_workers = MaskWorkers(self.plan.workers)
            self.times.mask_workers = self.mask_workers.alive

    def chunk_params(self, t: TensorPlan, segment: Segment, chunk: int | None = None,
                     masks: KeepMasks | None = None) -> ChunkParams:
        """Every per-expert number the kernel needs for tensor `t` (runs its statistics pass over `segment`,
        `chunk` elements at a time: the plan's chunk by default; DARE's masks drawn go to `masks`)."""
        t0 = time.perf_counter()
        params = tensor_params(
            self.plan.method, name=t.name, numel=t.numel, segments=[segment],
            weights=t.weights, density=t.density, gamma=t.gamma, lam=t.lam, normalize=t.normalize,
            rescale=t.rescale, seed=self.plan.seed, chunk=t.chunk(chunk or self.plan.chunk_elems),
            backend=self.stat_kernels,
            cuts=self.global_cuts[t.name] if self.global_cuts is not None else None, masks=masks,
            # the selections kept for the tie cut (~1% of a tensor's entries per expert, more with bf16 ties): at
            # most a worker's resident share, so that a worst case costs a counting pass, not unbounded memory
            # (1/8 of it made bench/memory.py's 64 MiB TIES merge 31% slower, for 4 MiB less)
            keep_bytes=self.plan.resident_bytes, t=t.t, models=len(t.inputs),
            karcher=t.karcher, eps=t.eps, epsilon=t.epsilon, shape=t.shape, select_topk=t.select_topk,
            ram=t.ram, filter_rows=t.row_length if t.filter_wise or t.nuslerp_rows else None,
            columns=t.columns if t.nuslerp_cols else None)
        self.times.add(stats=time.perf_counter() - t0)
        return params

    def compute_global_cuts(self) -> None:
        """trim_scope: global: one threshold per expert over every merged tensor, as each tensor's local cuts; from
        `cuts_file` where an earlier run of this merge (another part, or the run --resume continues) found them."""
        if self.cuts_file is None:
            found = self.find_global_cuts()
        else:
            found = self.cuts_file.load_or_find(self.find_global_cuts)
        merged = [t for t in self.plan.all_tensors if not t.copy_only]
        cuts: dict[str, list[tuple[int, int, int, int]]] = {}
        offset = 0
        for t in merged:  # a global index cut becomes each tensor's local cut
            cuts[t.name] = [(tk, _local_cut(ck, offset, t.numel), td, _local_cut(cd, offset, t.numel))
                            for (tk, ck), (td, cd) in found]
            offset += t.numel
        self.global_cuts = cuts

    def find_global_cuts(self) -> Cuts:
        """Per expert, the global (t, c) cuts of the trim and of breadcrumbs' second threshold over every merged
        tensor in plan order (of the whole merge: a part of a partitioned merge reads the other parts' tensors
        too, so every part finds the same)."""
        plan = self.plan
        merged = [t for t in plan.all_tensors if not t.copy_only]
        total = sum(t.numel for t in merged)
        first = merged[0]
        gamma = first.gamma or [0.0] * len(plan.models)
        ranks = [list(trim_counts(plan.method.sparsifier, total, first.density[i], gamma[i]))
                 for i in range(len(plan.models))]
        t0, read0 = time.perf_counter(), self.times.read
        if self.pipeline:  # on the (first) GPU, each chunk read ahead into pinned memory while the last is used
            from fusemerge.streaming.pipeline import Pipeline

            pipe = Pipeline(self, readers=self.readers, device=plan.compute_devices[0])
            try:
                with on_device(pipe.device):  # on cuda:N, kernels launched on cuda:N
                    segments, drain = pipe.read_ahead(merged)
                    try:
                        found = top_cuts(self.stat_kernels, segments, pipe.chunk, ranks,
                                         keep_bytes=plan.budget // 2)
                    except BaseException:
                        drain(quiet=True)
                        raise
                    drain()
            finally:
                pipe.close_statistics()
            self.times.add(stats=time.perf_counter() - t0)  # the passes' wall time: their reads overlap them
        else:
            workers = plan.global_workers
            found = top_cuts(self.stat_kernels, [self._segment(t) for t in merged], plan.chunk_elems, ranks,
                             workers=workers, run_workers=self._run_stat_workers, keep_bytes=plan.budget // 2)
            # the passes' time in each worker less what reading took (summed over workers, as the other stages)
            self.times.add(stats=max(0.0, workers * (time.perf_counter() - t0) - (self.times.read - read0)))
        return [(tk, td) for tk, td in found]

    def _run_stat_workers(self, k: int, body: Callable[[int], T], stop: threading.Event) -> list[T]:
        """top_cuts' workers: forked processes where the merge workers are (no shared interpreter lock: two threads
        ran the global thresholds' passes 1.36x as fast as one worker, two processes 1.85x, on a 2-core VM,
        `bench/global_cuts.py`), else threads. A child's read time is added to this run's."""
        if not self.processes or k == 1:
            return run_threads(k, body, stop)

        def child(w: int) -> tuple[T, float, dict[str, float]]:
            self.times = type(self.times)(started=self.times.started)  # the same clock: fork keeps it
            value = body(w)
            return value, self.times.read, dict(self.times.firsts)

        done = fork_map(k, child)
        for _, read, firsts in done:
            self.times.add(read=read)
            with self.times.lock:  # when the children first read, not when the parent heard of it
                for stage, at in firsts.items():
                    self.times.firsts[stage] = min(at, self.times.firsts.get(stage, at))
        return [value for value, _, _ in done]

    # -- merging -------------------------------------------------------------------------------

    def merge_tensor(self, t: TensorPlan) -> None:
        chunk = t.chunk(self.plan.chunk_elems)
        in_bytes = sum(e.itemsize for e in t.entries)  # per element, all inputs together
        out_item = torch.empty((), dtype=FLOAT_CODES.get(t.out_dtype, torch.uint8)).element_size()
        if t.copy_only:  # bytes as they are, a chunk at a time (passthrough copies whole embeddings)
            entry = t.inputs[0]
            for start in range(0, t.numel, chunk):
                if self._stop.is_set():
                    return
                count = min(chunk, t.numel - start)
                t0 = time.perf_counter()
                data = self._read(entry, start, count)
                t1 = time.perf_counter()
                self.writer.write(t.name, start * entry.itemsize, data)
                self.times.add(read=t1 - t0, write=time.perf_counter() - t1)
                self.progress(count * entry.itemsize)
            return
        segment = self._segment(t, keep=self._resident(t))
        masks = self.keep_masks(t)
        params = self.chunk_params(t, segment, masks=masks)
        out_dtype = FLOAT_CODES[t.out_dtype]
        # NaN / Inf in any input, counted by merge_chunk on the chunks it is given (no extra read): experts, base
        nonfinite = torch.zeros(len(t.inputs) + 1, dtype=torch.int64, device=self.plan.device)
        for start in range(0, t.numel, chunk):
            if self._stop.is_set():
                return
            count = min(chunk, t.numel - start)
            base, inputs = segment.load(start, count)
            if segment.cache is not None:
                del segment.cache[start]  # the last pass over this chunk: free it as we go
            t0 = time.perf_counter()
            out = self.merge_kernels.merge_chunk(base, inputs, start, params, out_dtype, nonfinite=nonfinite,
                                                 masks=masks)
            t1 = time.perf_counter()
            self.writer.write(t.name, start * out_item, out.cpu())
            self.times.add(merge=t1 - t0, write=time.perf_counter() - t1)
            self.progress(count * in_bytes)
        self._check_finite(t, nonfinite.tolist())
        if masks is not None:
            self.times.count_masks(masks.drawn, masks.reused)

    def _check_finite(self, t: TensorPlan, counts: list[int]) -> None:
        """Stop the merge at the first tensor whose inputs hold NaN / Inf (or note it with allow_nonfinite)."""
        if not any(counts):
            return
        # the files this tensor's inputs come from (a slice's sources are not the config's models, nor in order)
        paths = [e.file for e in t.inputs] + [t.base.file if t.base is not None else "base"]
        found = ", ".join(f"{c:,} in {path}" for c, path in zip(counts, paths, strict=True) if c)
        line = f"{t.name}: NaN/Inf values in the inputs ({found})"
        if not self.allow_nonfinite:
            raise InputError([f"{line}; the merge stopped ({opt('allow_nonfinite')} merges them anyway)"])
        with self.times.lock:
            self.nonfinite.append(line)

    def _merge_and_report(self, t: TensorPlan) -> None:
        if self._stop.is_set():  # another tensor failed: a worker thread takes no more
            return
        try:
            self.merge_tensor(t)
        except BaseException:
            self._stop.set()  # here, not when the main thread hears of it: this thread's next tensor would start
            raise
        if not self._stop.is_set():  # merge_tensor returns early, unfinished, once _stop is set
            self.on_tensor_done(t.name)

    def run(self) -> StageTimes:
        plan = self.plan
        torch_threads = torch.get_num_threads()
        if plan.device.type == "cpu":
            # Parallelism comes from the workers. torch's own intra-op threads on cache-sized chunks gain
            # little and, on a busy machine, stall in OpenMP barriers (a 17 s merge took 8 minutes with
            # one worker and two intra-op threads while another process held one of the two cores).
            torch.set_num_threads(1)
        try:
            if self._cpu_dare():  # built (or found) and checked once, before any worker forks or thread starts
                self.times.mask_code = philox_native.describe()
            elif self._cpu_dare(sparsifier="della"):  # its draws' compiled loop, likewise
                philox_native.uniform_run(0, 0, 0, 0)
                self.times.mask_code = "della"
            if plan.global_trim:
                self.compute_global_cuts()
            order = sorted(plan.tensors, key=lambda t: -t.numel)  # largest first: balanced workers
            order = [t for t in order if t.name not in self.skip]
            if not self.processes:  # a merge worker process draws its own masks, without sharing a GIL
                self._start_mask_workers(order)
            if self.pipeline and len(plan.compute_devices) > 1:
                from fusemerge.streaming.pipeline import run_pipelines

                run_pipelines(self, order, plan.compute_devices, readers=self.readers)
            elif self.pipeline:
                from fusemerge.streaming.pipeline import Pipeline

                Pipeline(self, readers=self.readers).run(order)
            elif self.processes:
                run_processes(self, order)
            elif plan.workers == 1:
                for t in order:
                    self._merge_and_report(t)
            else:
                with ThreadPoolExecutor(plan.workers, thread_name_prefix="fusemerge") as pool:
                    futures = [pool.submit(self._merge_and_report, t) for t in order]
                    try:
                        for fut in as_completed(futures):
                            fut.result()
                    except BaseException:
                        self._stop.set()
                        for fut in futures:
                            fut.cancel()
                        raise
        finally:
            torch.set_num_threads(torch_threads)
            self.reader.close()
            if self.mask_workers is not None:
                self.mask_workers.close()
        return self.times


def _local_cut(c: int, offset: int, numel: int) -> int:
    """A global index cut as a cut inside the tensor that starts at `offset`."""
    if c <= offset:
        return EMPTY_C
    return min(c - offset, numel)
