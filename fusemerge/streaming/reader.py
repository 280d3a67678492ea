"""Memory-mapped chunk reads: where bytes leave the disk.

One read-only `mmap` per file, opened on first use. A chunk is a run of flat (row-major) element indices of one
tensor; reading it touches only the pages that hold it. `release` hands those pages back (they leave this
process's RSS but stay in the page cache), which is what keeps a merge of a 100 GB model in bounded memory.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
from pathlib import Path

import torch

from fusemerge.errors import InputError
from fusemerge.streaming.safetensors_header import TensorEntry

# torch.frombuffer warns (once per process) that a read-only buffer gives a writable tensor. Views returned by
# `ChunkReader.read` are documented as read-only, so trigger that one warning here, silenced, instead of
# letting it reach the user mid-merge.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)

_HAS_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_WILLNEED") and hasattr(mmap, "MADV_DONTNEED")


class ChunkReader:
    """Reads chunks of tensors through one read-only memory map per file. Thread-safe; a context manager.

    >>> with ChunkReader() as reader:  # doctest: +SKIP
    ...     chunk = reader.read(entry, start=0, count=1 << 20).to(torch.float32, copy=True)
    ...     reader.release(entry, 0, 1 << 20)
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, entry: TensorEntry, start: int, count: int) -> torch.Tensor:
        """Elements `[start, start + count)` (flat row-major indices) of `entry`, as a 1-D tensor of its dtype.

        Reads nothing else of the tensor. The result is usually a zero-copy view of the mapped file: never write
        into it (its pages are read-only; a write crashes the process), and convert or copy it (`.to(device)`,
        `.to(torch.float32)` of a non-float32 chunk, `.clone()`) before `release`. The view stays valid after
        `release` and `close`, but touching it again brings its pages back into this process's RSS.
        When the chunk's byte offset is not a multiple of the item size, the result is an aligned copy instead.
        """
        first, nbytes = self._byte_range(entry, start, count)
        if count == 0:
            return torch.empty(0, dtype=entry.torch_dtype)
        mm = self._map(entry)
        if first % entry.itemsize == 0:  # the map starts on a page, so file offsets give the address alignment
            return torch.frombuffer(mm, dtype=entry.torch_dtype, count=count, offset=first)
        out = torch.empty(count, dtype=entry.torch_dtype)
        out.view(torch.uint8).copy_(torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=first))
        return out

    def read_into(self, entry: TensorEntry, start: int, count: int, out: torch.Tensor) -> None:
        """Copy elements `[start, start + count)` of `entry` into the first bytes of `out` (a contiguous uint8
        CPU tensor, e.g. pinned) with `pread`: no page faults on a map, and the GIL is released meanwhile."""
        first, nbytes = self._byte_range(entry, start, count)
        if nbytes == 0:
            return
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < nbytes or out.device.type != "cpu":
            raise ValueError(f"read_into needs a contiguous uint8 CPU tensor of at least {nbytes} bytes")
        self._map(entry)  # checks the file still holds the tensor
        view = memoryview(out.numpy()).cast("B")[:nbytes]
        fd = self._fd(entry)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], first + done)
            if n <= 0:
                raise InputError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
            done += n

    def read_tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The whole tensor, with its shape, as a copy that stays valid after `release` / `close`. For small
        tensors and tests; large tensors are read in chunks."""
        return self.read(entry, 0, entry.numel).reshape(entry.shape).clone()

    def prefetch(self, entry: TensorEntry, start: int, count: int) -> None:
        """Ask the kernel to start reading the pages of elements `[start, start + count)` (MADV_WILLNEED)."""
        self._advise(entry, start, count, mmap.MADV_WILLNEED if _HAS_MADVISE else None)

    def release(self, entry: TensorEntry, start: int, count: int) -> None:
        """Drop the pages of elements `[start, start + count)` from this process's RSS (MADV_DONTNEED).

        Whole pages are dropped, so bytes of neighbouring chunks sharing the first or last page go too; they
        are read again from the page cache when next touched. Views returned by `read` stay valid (same bytes).
        """
        self._advise(entry, start, count, mmap.MADV_DONTNEED if _HAS_MADVISE else None)

    def close(self) -> None:
        """Forget every map. A map is unmapped once no tensor returned by `read` refers to it any more."""
        with self._lock:
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, entry: TensorEntry) -> int:
        """A read-only descriptor of `entry.file` for `read_into`, opened once."""
        with self._lock:
            fd = self._fds.get(entry.file)
            if fd is None:
                try:
                    fd = os.open(entry.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise InputError(f"{entry.file}: cannot open for reading: {e.strerror}") from e
                self._fds[entry.file] = fd
            return fd

    def _advise(self, entry: TensorEntry, start: int, count: int, option: int | None) -> None:
        first, nbytes = self._byte_range(entry, start, count)
        if option is None or nbytes == 0:
            return
        mm = self._map(entry)
        page_start = first - first % mmap.PAGESIZE
        mm.madvise(option, page_start, first + nbytes - page_start)

    @staticmethod
    def _byte_range(entry: TensorEntry, start: int, count: int) -> tuple[int, int]:
        """Absolute file offset and length in bytes of elements `[start, start + count)` of `entry`."""
        if start < 0 or count < 0 or start + count > entry.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside tensor {entry.name!r} of {entry.numel}")
        return entry.start + start * entry.itemsize, count * entry.itemsize

    def _map(self, entry: TensorEntry) -> mmap.mmap:
        """The map of `entry.file`, opened on first use; checks, at every read, that the file still holds the
        tensor (its size now, one fstat: a file truncated during the merge is an input error here, where
        touching its missing pages would kill the process with SIGBUS; one truncated between this check and
        the read still can)."""
        with self._lock:
            mm = self._maps.get(entry.file)
            if mm is None:
                try:
                    with open(entry.file, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
                    raise InputError(f"{entry.file}: cannot map for reading: {e}") from e
                self._maps[entry.file] = mm
        size = mm.size()  # the file's size now (len(mm) is its size when it was mapped)
        if entry.end > size:  # shrunk since its header was read
            raise InputError(
                f"{entry.file}: truncated: tensor {entry.name!r} ends at byte {entry.end} "
                f"but the file has {size} bytes"
            )
        return mm
