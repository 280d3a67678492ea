"""plan_layout, ShardedWriter, make_temp_dir / move_into_place / check_out_dir."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fusemerge.errors import InputError
from fusemerge.streaming import writer as writer_module
from fusemerge.streaming.model_index import open_model
from fusemerge.streaming.safetensors_header import read_header
from fusemerge.streaming.writer import (
    OutputTensor,
    ShardedWriter,
    check_out_dir,
    make_temp_dir,
    move_into_place,
    plan_layout,
    temp_dir_path,
)
from tests.streaming.helpers import as_bytes, assert_same, random_tensor


def out_tensors(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    codes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}
    return [OutputTensor(name, codes[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def mixed(gen: torch.Generator, n: int = 9) -> dict[str, torch.Tensor]:
    codes = ["BF16", "F32", "F16", "BF16", "I64", "BOOL"]
    shapes = [(13, 7), (5,), (), (0, 3), (3, 3, 3), (11,)]
    return {f"layer.{i}": random_tensor(codes[i % 6], shapes[i % 6], gen) for i in range(n)}


def shard_sizes(layout) -> list[list[str]]:
    return [list(s.tensor_names) for s in layout.shards]


# -- plan_layout ------------------------------------------------------------------------------------------------


def test_output_tensor_nbytes() -> None:
    assert OutputTensor("a", "BF16", (3, 5)).nbytes == 30
    assert OutputTensor("a", "F64", ()).nbytes == 8
    assert OutputTensor("a", "F32", (4, 0)).nbytes == 0


def test_one_shard_header_is_what_safetensors_writes(gen: torch.Generator) -> None:
    """Same dtype, names in order: the library's layout is ours, so the headers must be byte-identical."""
    tensors = {name: random_tensor("F32", shape, gen) for name, shape in [("a", (3,)), ("b", (2, 5)), ("c", ())]}
    layout = plan_layout(out_tensors(tensors), max_shard_bytes=10**9)
    [shard] = layout.shards
    library = save(tensors, metadata={"format": "pt"})
    assert shard.filename == "model.safetensors"
    assert shard.header == library[: shard.data_start]
    assert shard.data_start == len(shard.header) and shard.data_start % 8 == 0
    assert shard.size == len(library)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (120, [["a", "b", "c"]]),
        (80, [["a", "b"], ["c"]]),  # exactly at the limit stays in
        (79, [["a"], ["b"], ["c"]]),
        (1, [["a"], ["b"], ["c"]]),  # larger than the limit: a shard each
    ],
)
def test_shard_boundaries(limit: int, expected: list[list[str]]) -> None:
    tensors = [OutputTensor(name, "F32", (10,)) for name in "abc"]
    assert shard_sizes(plan_layout(tensors, limit)) == expected


def test_large_tensor_gets_its_own_shard() -> None:
    tensors = [OutputTensor("a", "U8", (10,)), OutputTensor("big", "U8", (100,)), OutputTensor("b", "U8", (10,)),
               OutputTensor("c", "U8", (10,))]
    layout = plan_layout(tensors, 50)
    assert shard_sizes(layout) == [["a"], ["big"], ["b", "c"]]
    assert [s.filename for s in layout.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_layout_offsets_and_index(gen: torch.Generator) -> None:
    tensors = out_tensors(mixed(gen))
    layout = plan_layout(tensors, max_shard_bytes=400, metadata={"merged_by": "fusemerge"})
    assert len(layout.shards) > 1
    assert layout.total_size == sum(t.nbytes for t in tensors)
    assert [n for s in layout.shards for n in s.tensor_names] == [t.name for t in tensors]  # order kept
    for shard in layout.shards:
        n = int.from_bytes(shard.header[:8], "little")
        header = json.loads(shard.header[8:])
        assert n == len(shard.header) - 8 and n % 8 == 0
        assert header["__metadata__"] == {"merged_by": "fusemerge"}
        offset = shard.data_start
        for name in shard.tensor_names:  # contiguous, in order
            filename, start, nbytes = layout.locate(name)
            assert (filename, start) == (shard.filename, offset)
            assert header[name]["data_offsets"] == [start - shard.data_start, start - shard.data_start + nbytes]
            offset += nbytes
        assert offset == shard.size
    index = layout.index_json()
    assert index["metadata"] == {"total_size": layout.total_size}
    assert index["weight_map"] == {t.name: layout.locate(t.name)[0] for t in tensors}


def test_layout_is_deterministic(gen: torch.Generator) -> None:
    tensors = out_tensors(mixed(gen))
    a, b = plan_layout(tensors, 300), plan_layout(list(tensors), 300)
    assert [(s.filename, s.header, s.size) for s in a.shards] == [(s.filename, s.header, s.size) for s in b.shards]


def test_layout_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_layout([OutputTensor("a", "F32", (1,))], 0)
    with pytest.raises(ValueError):
        plan_layout([OutputTensor("a", "F32", (1,)), OutputTensor("a", "F16", (1,))], 100)


# -- ShardedWriter ------------------------------------------------------------------------------------------------


def write_all(directory: Path, tensors: dict[str, torch.Tensor], limit: int, chunk_bytes: int = 10) -> None:
    """Write every tensor in chunks of `chunk_bytes`, in shuffled order, from 4 threads."""
    layout = plan_layout(out_tensors(tensors), limit)
    jobs = []
    for name, t in tensors.items():
        data = as_bytes(t)
        jobs += [(name, off, data[off : off + chunk_bytes]) for off in range(0, len(data), chunk_bytes)]
    random.Random(0).shuffle(jobs)
    with ShardedWriter(directory, layout) as writer, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: writer.write(*job), jobs))


@pytest.mark.parametrize(("limit", "shards"), [(10**9, 1), (200, 4), (1, 6)])
def test_written_files_load_back_identically(tmp_path: Path, gen: torch.Generator, limit: int, shards: int) -> None:
    tensors = mixed(gen, n=6)
    write_all(tmp_path, tensors, limit)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == shards
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    model = open_model(tmp_path)  # our own reader agrees (index.json included)
    assert list(model.tensors) == list(tensors)
    if shards == 1:
        assert [f.name for f in files] == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index == plan_layout(out_tensors(tensors), limit).index_json()
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(index["weight_map"].values()) == {f.name for f in files}


def test_files_have_their_final_size_before_any_write(tmp_path: Path, gen: torch.Generator) -> None:
    layout = plan_layout(out_tensors(mixed(gen)), 300)
    writer = ShardedWriter(tmp_path, layout)
    try:
        for shard in layout.shards:
            assert (tmp_path / shard.filename).stat().st_size == shard.size
            assert (tmp_path / shard.filename).read_bytes()[: shard.data_start] == shard.header
    finally:
        writer.close()


def test_write_accepts_bytes_memoryview_and_tensors(tmp_path: Path, gen: torch.Generator) -> None:
    a = random_tensor("BF16", (4, 6), gen)
    b = random_tensor("F32", (10,), gen)
    c = random_tensor("F16", (), gen)
    layout = plan_layout(out_tensors({"a": a, "b": b, "c": c}), 10**9, metadata={"k": "v"})
    with ShardedWriter(tmp_path, layout) as writer:
        writer.write("a", 0, a[:2].contiguous())  # a tensor (bfloat16: no numpy equivalent)
        writer.write("a", 24, memoryview(as_bytes(a[2:])))
        writer.write("b", 0, b.numpy().view("u1")[:20])  # a numpy byte array, via the buffer protocol
        writer.write("b", 20, memoryview(b.numpy()[5:]))  # a float memoryview: cast to bytes
        writer.write("c", 0, c)
    loaded = load_file(tmp_path / "model.safetensors")
    for name, t in {"a": a, "b": b, "c": c}.items():
        assert_same(loaded[name], t)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_write_rejects_bad_chunks(tmp_path: Path, gen: torch.Generator) -> None:
    a = random_tensor("F32", (4, 6), gen)
    with ShardedWriter(tmp_path, plan_layout(out_tensors({"a": a}), 10**9)) as writer:
        with pytest.raises(ValueError):
            writer.write("a", 90, a.reshape(-1)[:2])  # past the end of the tensor
        with pytest.raises(ValueError):
            writer.write("a", -4, b"abcd")
        with pytest.raises(ValueError):
            writer.write("a", 0, a.t())  # not contiguous
        with pytest.raises(KeyError):
            writer.write("nope", 0, b"abcd")
        writer.write("a", 0, a)
    with pytest.raises(ValueError, match="closed"):
        writer.write("a", 0, a)
    assert_same(load_file(tmp_path / "model.safetensors")["a"], a)


def test_failed_write_leaves_no_index(tmp_path: Path, gen: torch.Generator) -> None:
    layout = plan_layout(out_tensors(mixed(gen)), 300)
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, layout):
        raise RuntimeError("merge failed")
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_written_header_reads_back(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = mixed(gen)
    layout = plan_layout(out_tensors(tensors), 300)
    write_all(tmp_path, tensors, 300)
    for shard in layout.shards:
        header = read_header(tmp_path / shard.filename)
        for name, entry in header.tensors.items():
            assert layout.locate(name) == (shard.filename, entry.start, entry.nbytes)


# -- early writeback -------------------------------------------------------------------------------------------


class RecordingSyncFileRange:
    """Stands in for libc's sync_file_range: records (fd, offset, nbytes, flags) and whether the descriptor
    was still open, then calls the real one where it exists (its result is ignored either way)."""

    def __init__(self, result: int = 0):
        self.calls: list[tuple[int, int, int, int]] = []
        self.closed_fds = 0
        self.result = result
        self.real = writer_module._load_sync_file_range()
        self.lock = threading.Lock()

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        try:
            os.fstat(fd)
        except OSError:
            with self.lock:
                self.closed_fds += 1
            return -1
        with self.lock:
            self.calls.append((fd, offset, nbytes, flags))
        if self.real is not None:
            self.real(fd, offset, nbytes, flags)
        return self.result


@pytest.mark.parametrize("result", [0, -1])  # a failing request (e.g. a filesystem without it) changes nothing
def test_writeback_is_requested_per_shard_as_bytes_are_written(
    tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, result: int
) -> None:
    fake = RecordingSyncFileRange(result)
    monkeypatch.setattr(writer_module, "_sync_file_range", fake)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 64)
    tensors = {f"t{i}": random_tensor("F32", (40 + i,), gen) for i in range(6)}  # 160-180 bytes each
    layout = plan_layout(out_tensors(tensors), 400)
    assert len(layout.shards) == 3
    jobs = [(name, off, as_bytes(t)[off:off + 10]) for name, t in tensors.items()
            for off in range(0, t.numel() * 4, 10)]
    random.Random(0).shuffle(jobs)
    with ShardedWriter(tmp_path, layout) as writer:
        shard_of = {fd: name for name, fd in writer._fds.items()}  # the descriptors are open until close()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda job: writer.write(*job), jobs))
        for _ in range(500):  # the last requests are asynchronous: let them run before close() drops them
            if {shard_of.get(fd) for fd, *_ in fake.calls} == {s.filename for s in layout.shards}:
                break
            threading.Event().wait(0.01)
    loaded = {}
    for shard in layout.shards:
        loaded.update(load_file(tmp_path / shard.filename))
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    # every request asks for the whole file (offset 0, length 0 = to the end), SYNC_FILE_RANGE_WRITE only (no
    # waiting flags), on an open descriptor of a shard; each shard got some, at most one per 64 bytes written
    assert fake.closed_fds == 0
    assert fake.calls and {(off, n, flags) for _, off, n, flags in fake.calls} == {(0, 0, 2)}
    for shard in layout.shards:
        written = sum(layout.locate(name)[2] for name in shard.tensor_names)
        requests = sum(1 for fd, *_ in fake.calls if shard_of.get(fd) == shard.filename)
        assert 1 <= requests <= written // 64


def test_writeback_stops_before_the_files_close(tmp_path: Path, gen: torch.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests racing with close(): none may reach a closed (or reused) descriptor."""
    entered, release = threading.Event(), threading.Event()
    fake = RecordingSyncFileRange()

    def slow(fd: int, offset: int, nbytes: int, flags: int) -> int:
        entered.set()
        release.wait(5)
        return fake(fd, offset, nbytes, flags)

    monkeypatch.setattr(writer_module, "_sync_file_range", slow)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 8)
    a = random_tensor("F32", (64,), gen)
    writer = ShardedWriter(tmp_path, plan_layout(out_tensors({"a": a}), 10**9))
    data = as_bytes(a)
    writer.write("a", 0, data[:128])
    assert entered.wait(5)  # the writeback thread is inside a request
    writer.write("a", 128, data[128:])  # more requests become due meanwhile
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close waits for the request in flight
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert fake.closed_fds == 0 and len(fake.calls) == 1  # the due ones were dropped: fsync covers them
    assert_same(load_file(tmp_path / "model.safetensors")["a"], a)


def test_writeback_off(tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """WRITEBACK_BYTES = 0, or no sync_file_range (not Linux): no thread, no request, the same bytes."""
    fake = RecordingSyncFileRange()
    tensors = mixed(gen)
    threads = threading.enumerate()
    monkeypatch.setattr(writer_module, "_sync_file_range", fake)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 0)
    (tmp_path / "zero").mkdir()
    (tmp_path / "none").mkdir()
    write_all(tmp_path / "zero", tensors, 300)
    monkeypatch.setattr(writer_module, "_sync_file_range", None)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 1)
    write_all(tmp_path / "none", tensors, 300)
    assert fake.calls == []
    assert not [t for t in threading.enumerate() if t.name == "fusemerge-writeback" and t not in threads]
    for f in sorted((tmp_path / "zero").iterdir()):
        assert f.read_bytes() == (tmp_path / "none" / f.name).read_bytes()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_and_callable_on_linux(tmp_path: Path) -> None:
    func = writer_module._load_sync_file_range()
    assert func is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 10000)
        assert func(fd, 0, 0, 2) == 0  # argument types right: a 64-bit offset and length, flags WRITE
        assert func(-1, 0, 0, 2) == -1  # a bad descriptor fails cleanly
    finally:
        os.close(fd)


# -- temp dir, move_into_place, check_out_dir ---------------------------------------------------------------


def fill(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_make_temp_dir(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    temp = make_temp_dir(out)
    assert temp == temp_dir_path(out) == out.parent / ".out.fusemerge-tmp"  # fixed: found again by --resume
    assert temp.is_dir() and not any(temp.iterdir()) and not out.exists()
    fill(temp / "sub", {"model.safetensors": "left by a killed run"})
    (temp / "x").write_text("stale")
    assert make_temp_dir(out) == temp and not any(temp.iterdir())  # what a killed run left is removed


def test_writer_resume_keeps_written_data(tmp_path: Path) -> None:
    layout = plan_layout([OutputTensor("a", "F32", (3,)), OutputTensor("b", "F32", (2,))], max_shard_bytes=10**9)
    with ShardedWriter(tmp_path, layout) as w:
        w.write("a", 0, torch.tensor([1.0, 2.0, 3.0]))
    with ShardedWriter(tmp_path, layout, resume=True) as w:
        w.write("b", 0, torch.tensor([4.0, 5.0]))
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], torch.tensor([1.0, 2.0, 3.0]))
    with ShardedWriter(tmp_path, layout) as w:  # without resume: a fresh, zeroed file
        w.write("b", 0, torch.tensor([4.0, 5.0]))
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], torch.zeros(3))


def test_move_into_place_into_missing_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    move_into_place(temp, out, overwrite=False)
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_move_into_place_into_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    move_into_place(temp, out, overwrite=False)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_move_into_place_never_touches_a_non_empty_dir_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fill(out, {"precious.txt": "keep me", "model.safetensors": "old"})
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    with pytest.raises(InputError) as info:
        move_into_place(temp, out, overwrite=False)
    assert info.value.problems == [f"{out}: exists and is not empty; pass overwrite=True to replace it"]
    assert (out / "precious.txt").read_text() == "keep me" and (out / "model.safetensors").read_text() == "old"
    assert (temp / "model.safetensors").read_text() == "new"


def test_move_into_place_with_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fill(out, {"stale.txt": "old", "model.safetensors": "old"})
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    move_into_place(temp, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, no old copy left


def test_a_replaced_output_that_cannot_be_deleted_is_a_warning_and_removed_later(tmp_path: Path, monkeypatch,
                                                                                 caplog) -> None:
    """--overwrite deletes the old output after the new one is in place: a failure there is a warning naming what
    is left (it was silent), and the next run into the same OUT_DIR removes it (so does one after a kill between
    the swap and the delete)."""
    from fusemerge.streaming import writer

    out = tmp_path / "out"
    fill(out, {"model.safetensors": "old"})
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    real = shutil.rmtree

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer.shutil, "rmtree", refuse)
    with caplog.at_level("WARNING", logger="fusemerge"):
        move_into_place(temp, out, overwrite=True)
    (left,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert left.name.startswith(".out.fusemerge-old-") and (left / "model.safetensors").read_text() == "old"
    assert f"{left}: the output overwrite replaced could not be removed (Permission denied)" in caplog.text
    monkeypatch.setattr(writer.shutil, "rmtree", real)
    notes: list[str] = []
    writer.remove_replaced(out, notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert notes == [f"removed {left}, the output an earlier overwrite of {out} replaced"]
    (tmp_path / ".out.fusemerge-old-notours").mkdir()  # not a name fusemerge makes: left alone
    writer.remove_replaced(out, notes.append)
    assert (tmp_path / ".out.fusemerge-old-notours").is_dir()


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_is_one_atomic_swap_where_the_file_system_can(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """With renameat2's RENAME_EXCHANGE there is no moment without OUT_DIR (a kill between two renames left it
    missing and the old output under a hidden name); without it, the two renames, undone on failure."""
    from fusemerge.streaming import writer

    probe = tmp_path / "probe"
    fill(probe / "a", {"x": "a"})
    fill(probe / "b", {"x": "b"})
    if exchange and not writer._exchange(probe / "a", probe / "b"):
        pytest.skip("this file system cannot exchange directories")
    out = tmp_path / "out"
    fill(out, {"model.safetensors": "old"})
    temp = make_temp_dir(out)
    fill(temp, {"model.safetensors": "new"})
    if not exchange:
        monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    renames: list[tuple[str, str]] = []
    real = os.rename

    def rename(a, b):
        renames.append((Path(a).name, Path(b).name))
        if len(renames) == 2:
            raise KeyboardInterrupt  # a kill after the first of two renames
        return real(a, b)

    monkeypatch.setattr(writer.os, "rename", rename)
    if exchange:
        move_into_place(temp, out, overwrite=True)
        # one exchange, then the old output (under the temporary name now) renamed away before it is deleted
        assert [a for a, _ in renames] == [temp.name] and (out / "model.safetensors").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "probe"]
    else:
        with pytest.raises(KeyboardInterrupt):
            move_into_place(temp, out, overwrite=True)
        assert (out / "model.safetensors").read_text() == "old"  # the first rename undone


def test_move_into_place_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    temp = make_temp_dir(out)
    with pytest.raises(InputError, match="exists and is not a directory"):
        move_into_place(temp, out, overwrite=True)
    assert out.read_text() == "a file"


def test_check_out_dir_accepts_new_and_empty(tmp_path: Path) -> None:
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    assert check_out_dir(tmp_path / "out", False, [model]) == []
    assert check_out_dir(tmp_path / "a" / "b" / "out", False, [model]) == []
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty", False, [model]) == []


def test_check_out_dir_non_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fill(out, {"x": "y"})
    assert check_out_dir(out, False, []) == [f"{out}: exists and is not empty; pass overwrite=True to replace it"]
    assert check_out_dir(out, True, []) == []


def test_overwrite_never_replaces_the_current_or_home_directory_or_the_config(tmp_path: Path, monkeypatch) -> None:
    """Found by a new user's walk-through: `fusemerge run ties.yml . --overwrite` in a directory holding the config
    and notes deleted them all. A replaced directory must not be or hold these; an empty current directory (a
    `mkdir out && cd out`) is still merged into."""
    home, project = tmp_path / "home", tmp_path / "home" / "project"
    fill(project, {"ties.yml": "x", "notes.txt": "keep"})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    why = "which overwrite=True would delete with the rest; choose a new output directory"  # the API's spelling
    assert check_out_dir(Path("."), True, [], project / "ties.yml") == [
        f"{Path('.')}: is the current directory, {why}", f"{Path('.')}: holds the config {project / 'ties.yml'}, {why}"]
    assert check_out_dir(home, True, []) == [f"{home}: holds the current directory, {why}",
                                             f"{home}: is your home directory, {why}"]
    elsewhere = tmp_path / "elsewhere"
    fill(elsewhere, {"a.yml": "x"})
    assert check_out_dir(elsewhere, True, [], elsewhere / "a.yml") == [
        f"{elsewhere}: holds the config {elsewhere / 'a.yml'}, {why}"]
    assert check_out_dir(elsewhere, True, [], project / "ties.yml") == []  # an old output: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert check_out_dir(Path("."), False, []) == []


def test_check_out_dir_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    [problem] = check_out_dir(tmp_path / "out", True, [])
    assert problem == f"{tmp_path / 'out'}: exists and is not a directory"


def test_check_out_dir_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    [problem] = check_out_dir(tmp_path / "link", True, [])
    assert problem.startswith(f"{tmp_path / 'link'}: is a symbolic link")


@pytest.mark.parametrize("overwrite", [False, True])
def test_check_out_dir_never_replaces_inputs(tmp_path: Path, overwrite: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    base = models / "base"
    fill(base, {"model.safetensors": "weights"})
    single = models / "ft.safetensors"
    single.write_text("weights")

    def problems(out: Path) -> list[str]:
        found = check_out_dir(out, overwrite, [base, single])
        assert all(p.startswith(f"{out}: ") for p in found)
        return [p for p in found if "input model" in p]

    assert len(problems(base)) == 1  # the input itself
    assert len(problems(models)) == 2  # holds both inputs
    assert len(problems(tmp_path)) == 2
    assert len(problems(base / "merged")) == 1  # inside an input
    assert problems(tmp_path / "elsewhere") == []
    monkeypatch.chdir(models)
    assert len(problems(Path("."))) == 2  # relative paths are resolved
    assert len(problems(Path("base"))) == 1
    (tmp_path / "alias").symlink_to(models)
    assert len(problems(tmp_path / "alias" / "base")) == 1  # symlinks are resolved


@pytest.mark.parametrize("overwrite", [False, True])
def test_check_out_dir_never_replaces_files_an_input_links_to(tmp_path: Path, overwrite: bool) -> None:
    """An input model made of links to another merge's files: replacing that merge would replace the input."""
    prev = tmp_path / "prev"
    fill(prev, {"model.safetensors": "weights", "config.json": "{}"})
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("model.safetensors", "config.json"):
        (linked / name).symlink_to(prev / name)
    (found,) = check_out_dir(prev, overwrite, [linked])[-1:]
    assert found.startswith(f"{prev}: holds {prev}/") and f"the input model {linked} reads through the link" in found
    assert check_out_dir(tmp_path / "elsewhere", overwrite, [linked]) == []


def test_check_out_dir_parent_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    for out in (locked / "out", locked / "a" / "out"):  # the nearest existing ancestor is the one checked
        assert check_out_dir(out, False, []) == [f"{out}: cannot be created: {locked} is not writable"]
    (tmp_path / "file").write_text("x")
    [problem] = check_out_dir(tmp_path / "file" / "out", False, [])
    assert problem.endswith(f"{tmp_path / 'file'} is not a directory")


def test_a_failed_fsync_still_closes_every_shard(tmp_path, monkeypatch) -> None:
    """fsync reports the disk's errors (EIO, a quota on NFS): the error is raised and no descriptor is left open."""
    from fusemerge.streaming import writer as writer_module

    layout = writer_module.plan_layout([writer_module.OutputTensor(f"t{i}", "F32", (4,)) for i in range(4)],
                                       max_shard_bytes=16)
    w = writer_module.ShardedWriter(tmp_path, layout)
    fds = list(w._fds.values())
    assert len(fds) == 4

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer_module.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        w.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
