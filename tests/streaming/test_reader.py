"""ChunkReader: chunks at odd starts / counts equal slices of load_file; unaligned data; madvise; threads."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusemerge.errors import InputError
from fusemerge.streaming.reader import ChunkReader
from fusemerge.streaming.safetensors_header import DTYPES, read_header
from tests.streaming.helpers import as_bytes, assert_same, random_tensor, write_raw

SHAPE = (37, 11)  # 407 elements: prime factors, no power of two
CHUNKS = [(0, 407), (0, 1), (406, 1), (5, 97), (13, 0), (100, 250), (407, 0), (1, 405)]


@pytest.mark.parametrize("code", list(DTYPES))
def test_chunks_equal_slices_of_load_file(tmp_path: Path, gen: torch.Generator, code: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": random_tensor(code, (3,), gen), "w": random_tensor(code, SHAPE, gen)}, path)
    entry = read_header(path).tensors["w"]
    flat = load_file(path)["w"].reshape(-1)
    with ChunkReader() as reader:
        for start, count in CHUNKS:
            chunk = reader.read(entry, start, count)
            assert_same(chunk, flat[start : start + count])


@pytest.mark.parametrize("chunk", [1, 7, 64, 406, 1000])
def test_consecutive_chunks_rebuild_the_tensor(tmp_path: Path, gen: torch.Generator, chunk: int) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("BF16", SHAPE, gen)}, path)
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        parts = []
        for start in range(0, entry.numel, chunk):
            count = min(chunk, entry.numel - start)
            reader.prefetch(entry, start, count)
            parts.append(reader.read(entry, start, count).clone())
            reader.release(entry, start, count)
    assert_same(torch.cat(parts).reshape(SHAPE), load_file(path)["w"])


@pytest.mark.parametrize("shape", [(), (1,), (0,), (3, 0), (5, 7, 3)])
def test_read_tensor(tmp_path: Path, gen: torch.Generator, shape: tuple[int, ...]) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"t": random_tensor("F16", shape, gen), "u": random_tensor("I32", (2,), gen)}, path)
    header = read_header(path)
    loaded = load_file(path)
    with ChunkReader() as reader:
        for name, entry in header.tensors.items():
            assert_same(reader.read_tensor(entry), loaded[name])


@pytest.mark.parametrize("code", ["F32", "BF16", "F64", "I16", "U8"])
def test_unaligned_offsets(tmp_path: Path, gen: torch.Generator, code: str) -> None:
    """A 3-byte tensor first puts the next one at an odd offset; reads still give aligned, right values."""
    dtype, size = DTYPES[code]
    values = random_tensor(code, (23,), gen)
    data = b"\x01\x02\x03" + as_bytes(values)
    header = {
        "pad": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "w": {"dtype": code, "shape": [23], "data_offsets": [3, 3 + 23 * size]},
    }
    path = write_raw(tmp_path / "odd.safetensors", header, data)
    entry = read_header(path).tensors["w"]
    assert entry.start % 2 == 1
    with ChunkReader() as reader:
        for start, count in [(0, 23), (1, 5), (22, 1), (7, 0)]:
            chunk = reader.read(entry, start, count)
            assert chunk.data_ptr() % size == 0
            assert_same(chunk, values[start : start + count])
        assert_same(reader.read_tensor(read_header(path).tensors["pad"]), torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_aligned_reads_are_views_of_the_map(tmp_path: Path, gen: torch.Generator) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("F32", SHAPE, gen)}, path)
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        a = reader.read(entry, 10, 5)
        b = reader.read(entry, 12, 5)
        assert b.data_ptr() - a.data_ptr() == 2 * 4  # same mapping, no copies


def test_out_of_range(tmp_path: Path, gen: torch.Generator) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("F32", (10,), gen)}, path)
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        for start, count in [(-1, 2), (5, 6), (0, 11), (3, -1)]:
            with pytest.raises(ValueError, match="outside tensor 'w'"):
                reader.read(entry, start, count)


def test_file_truncated_after_its_header_was_read(tmp_path: Path, gen: torch.Generator) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("F32", (1000,), gen)}, path)
    entry = read_header(path).tensors["w"]
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with ChunkReader() as reader, pytest.raises(InputError, match=f"{re.escape(str(path))}: truncated: tensor 'w'"):
        reader.read(entry, 0, 10)


def test_file_truncated_after_its_first_read(tmp_path: Path, gen: torch.Generator) -> None:
    """Once mapped, the map's length is not the file's size: a file that shrinks mid-merge is still caught
    (touching its missing pages would kill the process with SIGBUS)."""
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("F32", (100_000,), gen)}, path)
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        reader.read(entry, 0, 10).clone()
        os.truncate(path, 4096)
        with pytest.raises(InputError, match=f"{re.escape(str(path))}: truncated: tensor 'w' .* 4096 bytes"):
            reader.read(entry, 99_000, 1000)


def test_views_outlive_close(tmp_path: Path, gen: torch.Generator) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("F32", (100,), gen)}, path)
    entry = read_header(path).tensors["w"]
    reader = ChunkReader()
    view = reader.read(entry, 10, 50)
    reader.release(entry, 0, 100)
    reader.close()
    assert_same(view, load_file(path)["w"][10:60])


def test_many_threads_many_files(tmp_path: Path, gen: torch.Generator) -> None:
    entries, expected = [], {}
    for i in range(4):
        path = tmp_path / f"shard{i}.safetensors"
        tensors = {f"t{i}.{j}": random_tensor(["BF16", "F32"][j % 2], (61, 17), gen) for j in range(3)}
        save_file(tensors, path)
        entries += read_header(path).tensors.values()
        expected.update({k: v.reshape(-1) for k, v in tensors.items()})
    jobs = [(e, start, 53) for e in entries for start in range(0, e.numel - 53, 29)]

    with ChunkReader() as reader:

        def job(args) -> bool:
            entry, start, count = args
            reader.prefetch(entry, start, count)
            ok = as_bytes(reader.read(entry, start, count)) == as_bytes(expected[entry.name][start : start + count])
            reader.release(entry, start, count)
            return ok

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(job, jobs * 3))


def _rss_file_kib() -> int:
    match = re.search(r"^RssFile:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match
    return int(match.group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_release_drops_pages_from_rss(tmp_path: Path, gen: torch.Generator) -> None:
    n = 8 << 20  # 32 MiB of F32
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.rand(n, generator=gen) + 0.5}, path)
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        chunk = reader.read(entry, 0, n)
        before = _rss_file_kib()
        total = float(chunk.double().sum())  # touches every page
        touched = _rss_file_kib()
        reader.release(entry, 0, n)
        released = _rss_file_kib()
        assert touched - before > 24 << 10
        assert touched - released > 24 << 10
        assert float(chunk.double().sum()) == total  # still readable: pages come back from the page cache
    del chunk


def test_reads_leave_the_file_unchanged(tmp_path: Path, gen: torch.Generator) -> None:
    """Reads only map the file read-only: nothing changes on disk."""
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor("BF16", SHAPE, gen)}, path)
    before = path.read_bytes()
    entry = read_header(path).tensors["w"]
    with ChunkReader() as reader:
        reader.prefetch(entry, 0, entry.numel)
        assert_same(reader.read_tensor(entry), load_file(path)["w"])
        reader.release(entry, 0, entry.numel)
    assert path.read_bytes() == before
