"""The overlapped pipeline (streaming/pipeline.py) writes the executor's bytes, whatever its chunking.

On CPU the pipeline runs with synchronous stand-ins for CUDA streams, so these tests check its ordering,
slot bookkeeping, resident/streamed/too-large paths and failures in CI; on a GPU machine the same tests
run it on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.errors import InputError
from fusemerge.streaming.digest import PrefixDigest, file_digest
from fusemerge.streaming.executor import Executor
from fusemerge.streaming.writer import ShardedWriter
from fusemerge.synthetic import make_llama_family, write_config_yaml
from tests.kernels.test_reference import PARAMS

SHAPE = dict(hidden=36, intermediate=100, layers=2, vocab=301)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=8, shard_bytes=9000, **SHAPE)


def config(tmp_path: Path, fam: dict, method: str) -> Path:
    path = tmp_path / f"{method}.yml"
    write_config_yaml(path, method, fam["base"], fam["experts"], weight=(1.0, 0.6, 1.3), **PARAMS[method])
    return path


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def pipeline_run(cfg: Path, out: Path, *, max_memory=None, pinned="64KiB", readers=2, backend="auto"):
    plan = fusemerge.build_plan(cfg, device=DEVICE, backend=backend, max_memory=max_memory, workers=1,
                                max_pinned_memory=pinned)
    out.mkdir()
    ex = Executor(plan, None, pipeline=True, readers=readers)
    with ShardedWriter(out, plan.layout) as writer:
        ex.writer = writer
        ex.run()
    return plan, ex, writer


@pytest.mark.parametrize("method", list(PARAMS))
def test_pipeline_bytes_equal_the_executor(tmp_path, fam, method) -> None:
    cfg = config(tmp_path, fam, method)
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    # statistics on resident tensors; chunks of ~200 elements (every tensor is many chunks)
    _, _, writer = pipeline_run(cfg, tmp_path / "resident", pinned="64KiB")
    assert shards(tmp_path / "resident") == shards(tmp_path / "ref")
    for name, digest in writer.digests.items():  # written in file order: hashed as written, nothing read back
        path = tmp_path / "resident" / name
        assert digest.upto == path.stat().st_size
        assert digest.finish(path) == file_digest(path)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_resident_thresholds_come_from_the_one_pass_select(tmp_path, fam, method, monkeypatch) -> None:
    """With the Triton backend (the interpreter on CPU), resident tensors' thresholds come from the bracket
    select, and the bytes are the torch executor's."""
    from fusemerge.kernels import select

    used: list[bool] = []
    real = select.bracket_cuts

    def spy(*args, **kw):
        found = real(*args, **kw)
        used.append(found is not None)
        return found

    monkeypatch.setattr(select, "bracket_cuts", spy)
    cfg = config(tmp_path, fam, method)
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    assert not used  # the torch backend keeps the radix select
    pipeline_run(cfg, tmp_path / "triton", pinned="64KiB", backend="triton")
    assert used and all(used)
    assert shards(tmp_path / "triton") == shards(tmp_path / "ref")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_tensors_too_large_to_keep_take_the_two_read_path(tmp_path, fam, method) -> None:
    cfg = config(tmp_path, fam, method)
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    plan, ex, _ = pipeline_run(cfg, tmp_path / "small", max_memory="96KiB", pinned="32KiB", readers=3)
    assert any(t.input_bytes > plan.resident_bytes for t in plan.tensors)  # the embedding does not fit
    assert shards(tmp_path / "small") == shards(tmp_path / "ref")
    assert ex.times.read > 0 and ex.times.write > 0


def test_a_read_failure_stops_the_pipeline(tmp_path, fam, monkeypatch) -> None:
    cfg = config(tmp_path, fam, "ties")
    calls = {"n": 0}
    from fusemerge.streaming.reader import ChunkReader

    real = ChunkReader.read_into

    def flaky(self, entry, start, count, out):
        calls["n"] += 1
        if calls["n"] == 7:
            raise InputError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
        return real(self, entry, start, count, out)

    monkeypatch.setattr(ChunkReader, "read_into", flaky)
    with pytest.raises(InputError, match="truncated while reading"):
        pipeline_run(cfg, tmp_path / "out")


def test_nonfinite_inputs_stop_the_pipeline(tmp_path) -> None:
    fam = make_llama_family(tmp_path / "family", n_experts=2, seed=3, **SHAPE)
    from safetensors.torch import load_file, save_file

    path = fam["experts"][0] / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.down_proj.weight"].view(-1)[5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    cfg = tmp_path / "c.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.5)
    with pytest.raises(InputError, match=r"down_proj.weight: NaN/Inf values in the inputs \(1 in"):
        pipeline_run(cfg, tmp_path / "out")


def test_prefix_digest_reads_back_what_was_written_out_of_order(tmp_path) -> None:
    data = bytes(range(256)) * 40
    path = tmp_path / "f"
    path.write_bytes(data)
    d = PrefixDigest()
    for lo, hi in [(0, 1000), (3000, 5000), (1000, 2000), (5000, 6000), (2000, 3000)]:
        d.feed(lo, memoryview(data)[lo:hi])
    assert d.upto == 3000  # 3000-5000 came early: from there on, the file is read back
    assert d.finish(path) == file_digest(path)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_global_trim_scope_through_the_pipeline(tmp_path, fam, method) -> None:
    """trim_scope: global keeps nothing resident: every tensor's statistics stream through their own buffers."""
    cfg = tmp_path / "g.yml"
    write_config_yaml(cfg, method, fam["base"], fam["experts"], weight=(1.0, 0.6, 1.3), trim_scope="global",
                      **PARAMS[method])
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    from fusemerge.streaming.pipeline import Pipeline

    real, passes = Pipeline.read_ahead, []

    def counted(self, tensors):
        passes.append(len(tensors))
        return real(self, tensors)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, "read_ahead", counted)
        plan, _, _ = pipeline_run(cfg, tmp_path / "pipe", pinned="32KiB")
    assert shards(tmp_path / "pipe") == shards(tmp_path / "ref")
    # the thresholds' passes read the whole model ahead, through the pipeline's pinned buffers, once
    assert passes == [sum(not t.copy_only for t in plan.tensors)]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_rescaled_trim_through_the_pipeline(tmp_path, fam, scope) -> None:
    """rescale: true of a trim reads each tensor for its L1 sums, also when the global thresholds are known
    (the pipeline gave those tensors no data: an internal error)."""
    cfg = tmp_path / "r.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], weight=(1.0, 0.6, 1.3), trim_scope=scope,
                      rescale=True, **PARAMS["ties"])
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    pipeline_run(cfg, tmp_path / "pipe", pinned="32KiB")
    assert shards(tmp_path / "pipe") == shards(tmp_path / "ref")


def test_a_read_failure_in_the_global_thresholds_is_raised(tmp_path, fam, monkeypatch) -> None:
    cfg = tmp_path / "g.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], trim_scope="global", **PARAMS["ties"])
    from fusemerge.streaming.reader import ChunkReader

    real, calls = ChunkReader.read_into, [0]

    def flaky(self, entry, start, count, out):
        calls[0] += 1
        if calls[0] == 5:
            raise InputError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
        return real(self, entry, start, count, out)

    monkeypatch.setattr(ChunkReader, "read_into", flaky)
    with pytest.raises(InputError, match="truncated while reading"):
        pipeline_run(cfg, tmp_path / "out", pinned="32KiB")


# -- several devices --------------------------------------------------------------------------------------


def several(plan, k: int):
    """The plan on k devices: k GPUs on a GPU machine with that many, else k CPU stand-ins (the same code, with
    synchronous streams: how CI checks the split, the shared writer and the failure handling)."""
    import dataclasses

    if DEVICE == "cuda" and torch.cuda.device_count() >= k:
        devices = tuple(torch.device("cuda", i) for i in range(k))
    else:
        devices = (torch.device("cpu"),) * k
        if torch.cuda.is_available() and plan.backend == "triton":
            # a GPU machine with fewer GPUs: CPU stand-ins with the torch backend (Triton on CPU would need
            # the interpreter, and switching it on in a process that compiled kernels for the GPU breaks them)
            plan = dataclasses.replace(plan, backend="torch")
    return dataclasses.replace(plan, device=devices[0], devices=devices)


def multi_run(cfg: Path, out: Path, k: int, backend="auto", pinned="96KiB"):  # 32 KiB per GPU for 3
    plan = several(fusemerge.build_plan(cfg, device=DEVICE, backend=backend, workers=1, max_pinned_memory=pinned), k)
    out.mkdir()
    ex = Executor(plan, None, pipeline=True, readers=2)
    with ShardedWriter(out, plan.layout) as writer:
        ex.writer = writer
        ex.run()
    return ex


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_several_devices_write_the_bytes_of_one(tmp_path, fam, method, monkeypatch) -> None:
    from fusemerge.streaming import pipeline

    merged: dict[str, list[str]] = {}
    real = pipeline.Pipeline.run

    def record(self, order):
        merged[f"pipeline {len(merged)}"] = [t.name for t in order]
        return real(self, order)

    monkeypatch.setattr(pipeline.Pipeline, "run", record)
    cfg = config(tmp_path, fam, method)
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    merged.clear()
    multi_run(cfg, tmp_path / "three", 3)
    assert shards(tmp_path / "three") == shards(tmp_path / "ref")
    assert len(merged) == 3 and all(merged.values())  # every device merged a part
    names = [n for part in merged.values() for n in part]
    assert sorted(names) == sorted(t.name for t in fusemerge.build_plan(cfg, device="cpu").tensors)


@pytest.mark.parametrize("k", [1, 2])
def test_a_part_of_a_partitioned_merge_through_the_pipeline(tmp_path, fam, k) -> None:
    """`--partition`: the part's plan (its shards, its tensors) through the GPU pipeline, on one device and on two:
    the shards of the whole merge's output, byte for byte, and hashed as written (digests match the files)."""
    cfg = config(tmp_path, fam, "ties")
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch", out_shard_size="20KB")
    plan = fusemerge.build_plan(cfg, device=DEVICE, workers=1, max_pinned_memory="64KiB", out_shard_size="20KB",
                                partition="1/3")
    plan = several(plan, k) if k > 1 else plan
    out = tmp_path / "part"
    out.mkdir()
    ex = Executor(plan, None, pipeline=True, readers=2)
    with ShardedWriter(out, plan.layout, index=False) as writer:
        ex.writer = writer
        ex.run()
    ref = shards(tmp_path / "ref")
    assert len(ref) >= 6 and shards(out) == {s.filename: ref[s.filename] for s in plan.layout.shards}
    for name, digest in writer.digests.items():
        assert digest.finish(out / name) == file_digest(out / name)


def test_a_failure_on_one_device_stops_them_all(tmp_path, fam, monkeypatch) -> None:
    """The pipeline that fails raises its own error (not the peers' 'stopped'), and nothing is left running."""
    import threading

    cfg = config(tmp_path, fam, "ties")
    from fusemerge.streaming.pipeline import file_order
    from fusemerge.streaming.reader import ChunkReader

    real = ChunkReader.read_into
    plan = fusemerge.build_plan(cfg, device="cpu")
    last = file_order(plan, plan.tensors)[-1].name  # merged by the second pipeline

    def flaky(self, entry, start, count, out):
        if entry.name == last:
            raise InputError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
        return real(self, entry, start, count, out)

    monkeypatch.setattr(ChunkReader, "read_into", flaky)
    with pytest.raises(InputError, match="truncated while reading"):
        multi_run(cfg, tmp_path / "out", 2)
    assert not [t for t in threading.enumerate() if t.name.startswith("fusemerge")]


def test_split_by_bytes_keeps_runs_contiguous_and_balanced(fam, tmp_path) -> None:
    from fusemerge.streaming.pipeline import file_order, split_by_bytes

    plan = fusemerge.build_plan(config(tmp_path, fam, "ties"), device="cpu")
    ordered = file_order(plan, plan.tensors)
    total = sum(t.input_bytes for t in ordered)
    biggest = max(t.input_bytes for t in ordered)
    for k in (1, 2, 3, 5, len(ordered) + 3):
        runs = split_by_bytes(ordered, k)
        assert len(runs) == k and [t for r in runs for t in r] == ordered
        assert all(sum(t.input_bytes for t in r) <= total / k + biggest for r in runs)
    assert split_by_bytes([], 2) == [[], []]


def test_plan_summary_names_every_gpu(fam, tmp_path) -> None:
    import dataclasses

    plan = fusemerge.build_plan(config(tmp_path, fam, "ties"), device="cpu")
    gpus = (torch.device("cuda", 0), torch.device("cuda", 1))
    text = dataclasses.replace(plan, device=gpus[0], devices=gpus).summary()
    assert "device        cuda:0, cuda:1 (backend torch, 2 GPUs, one pipeline each)" in text
    assert "per GPU" in text and "pinned host memory 1.00 GiB shared by 2 GPUs" in text


@pytest.mark.parametrize("budget", [64 << 10, 1 << 20, 3 << 20, 5 << 20, 1 << 30])
def test_pinned_buffers_fit_the_budget_as_the_allocator_rounds_them(tmp_path, fam, budget) -> None:
    """torch's pinned allocator rounds each block up to a power of two; the chunk is sized so that the rounded
    blocks fit --max-pinned-memory (they took up to 1.7x of it)."""
    import dataclasses

    from fusemerge.streaming.pipeline import MIN_PIPE_CHUNK, Pipeline, _pow2

    plan = fusemerge.build_plan(config(tmp_path, fam, "ties"), device=DEVICE)
    plan = dataclasses.replace(plan, chunk_elems=1 << 22)  # as a GPU plan's: the pinned budget decides
    pipe = Pipeline(Executor(plan, None, pipeline=True), readers=8, pinned_bytes=budget)
    rounded = (pipe.slots + 2) * _pow2(pipe.rows * pipe.chunk * 4) + pipe.n_out * _pow2(pipe.chunk * 4)
    assert rounded <= budget or pipe.chunk == MIN_PIPE_CHUNK
    assert rounded > budget // 4 or pipe.chunk == 1 << 22  # and not much smaller than it needs to be


def test_ctrl_c_during_several_pipelines_stops_them_before_it_returns(tmp_path, fam, monkeypatch) -> None:
    """A KeyboardInterrupt in the thread waiting for the pipelines stops them all before it propagates, so none
    writes after the caller has closed the writer and journal (they went on writing)."""
    import os
    import signal
    import threading
    import time

    from fusemerge.streaming.reader import ChunkReader

    real = ChunkReader.read_into

    def slow(self, *a):
        time.sleep(0.02)
        return real(self, *a)

    monkeypatch.setattr(ChunkReader, "read_into", slow)
    cfg = config(tmp_path, fam, "task_arithmetic")
    plan = several(fusemerge.build_plan(cfg, device="cpu", workers=1, max_pinned_memory="64KiB"), 2)
    (tmp_path / "out").mkdir()
    ex = Executor(plan, None, pipeline=True, readers=1)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))  # a real one: it wakes join()
    timer.start()
    with pytest.raises(KeyboardInterrupt), ShardedWriter(tmp_path / "out", plan.layout) as writer:
        ex.writer = writer
        ex.run()
        time.sleep(5)  # the merge finished before the interrupt: still raise it here, in the with block
    timer.cancel()
    t0 = time.perf_counter()
    for th in [t for t in threading.enumerate() if t.name.startswith("fusemerge")]:
        th.join(timeout=2)  # ending: their pipelines have stopped (before the fix they merged on for seconds)
    assert time.perf_counter() - t0 < 1.0
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fusemerge")]


def test_a_gpu_without_an_index_is_the_current_one(monkeypatch) -> None:
    """torch.cuda.set_device and the streams need cuda:N; --device cuda (and auto) gave plain cuda, and every
    one-GPU pipeline failed at its first line (a ValueError from set_device)."""
    from fusemerge.streaming.pipeline import _indexed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert _indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _indexed(torch.device("cpu")) == torch.device("cpu")


def test_copied_tensors_go_through_in_chunks(tmp_path, fam, monkeypatch) -> None:
    """A passthrough copies whole embeddings: the pipeline reads and writes them a chunk at a time (they were
    read whole into host memory, outside both budgets), with the executor's bytes."""
    import yaml

    from fusemerge.streaming.reader import ChunkReader

    cfg = tmp_path / "passthrough.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fam["base"]), "layer_range": [0, 2]}]}]}))
    fusemerge.run(cfg, tmp_path / "ref", device="cpu")
    counts = []
    real = ChunkReader.read

    def read(self, entry, start, count):
        counts.append(count)
        return real(self, entry, start, count)

    monkeypatch.setattr(ChunkReader, "read", read)
    plan, ex, _ = pipeline_run(cfg, tmp_path / "piped", pinned="64KiB")
    assert all(t.copy_only for t in plan.tensors)
    assert shards(tmp_path / "piped") == shards(tmp_path / "ref")
    largest = max(t.numel for t in plan.tensors)
    assert max(counts) * 8 < largest, (max(counts), largest)  # the embedding in many pieces


def test_a_pinned_budget_below_the_smallest_chunk_is_refused(tmp_path, fam) -> None:
    """--max-pinned-memory below what the smallest chunk pins cannot be kept to (the floor went over it): the
    pipeline refuses it, counting its own readers and its GPU's share, before it reads anything."""
    import dataclasses

    from fusemerge.streaming.pipeline import MIN_PIPE_CHUNK, Pipeline

    plan = dataclasses.replace(fusemerge.build_plan(config(tmp_path, fam, "ties"), device=DEVICE), chunk_elems=1 << 22)
    floor = Pipeline(Executor(plan, None, pipeline=True), readers=8, pinned_bytes=1 << 30)._pinned(MIN_PIPE_CHUNK)
    assert Pipeline(Executor(plan, None, pipeline=True), readers=8, pinned_bytes=floor).chunk == MIN_PIPE_CHUNK
    with pytest.raises(InputError, match=r"max_pinned_memory: .* for this GPU's pipeline .* is too small: its "
                                         r"buffers for 4 inputs and 8 readers need at least"):
        Pipeline(Executor(plan, None, pipeline=True), readers=8, pinned_bytes=floor - 1)


@pytest.mark.parametrize("method", ["slerp", "model_stock", "nuslerp", "nuslerp_no_base"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("max_memory", "pinned"), [(None, "64KiB"), ("64KiB", "32KiB")])
def test_angle_weights_through_the_pipeline(tmp_path, fam, method, backend, max_memory, pinned) -> None:
    """The statistics of slerp, model_stock and nuslerp (kernels/fixed_dots.py) on resident tensors, and on
    those too large to keep (read 3x)."""
    cfg = tmp_path / f"{method}.yml"
    if method == "slerp":
        write_config_yaml(cfg, "slerp", fam["base"], [fam["experts"][0]], t=[0.1, 0.8])
    elif method.startswith("nuslerp"):
        write_config_yaml(cfg, "nuslerp", None if method == "nuslerp_no_base" else fam["base"], fam["experts"][:2],
                          weight=([0.2, 1.0], 0.7))
    else:
        write_config_yaml(cfg, "model_stock", fam["base"], fam["experts"])
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", backend="torch")
    plan, _, _ = pipeline_run(cfg, tmp_path / "p", max_memory=max_memory, pinned=pinned, backend=backend)
    assert (max_memory is None) == all(plan.reads(t) == 1 for t in plan.tensors)  # 64 KiB: the embedding is read 3x
    assert shards(tmp_path / "p") == shards(tmp_path / "ref")
