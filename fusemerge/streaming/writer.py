"""Output layout, sharded writer and the atomic move into place: where bytes reach the disk.

The whole output is laid out before the first byte is written: every shard's header and every tensor's byte
offset are known up front, so chunks can be written in any order, from any thread, with `os.pwrite`.
The merge writes into a temporary sibling of OUT_DIR and `move_into_place` renames it into place, so OUT_DIR never holds
something that looks like a finished model unless the merge finished.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fusemerge.errors import InputError
from fusemerge.options import opt, opt_name
from fusemerge.streaming.digest import PrefixDigest
from fusemerge.streaming.model_index import INDEX_NAME, SINGLE_FILE_NAME
from fusemerge.streaming.safetensors_header import DTYPES

log = logging.getLogger("fusemerge")

# Early writeback: once this many bytes have been written to a shard since its last writeback request, a
# background thread asks the kernel to start writing them to disk (Linux sync_file_range, SYNC_FILE_RANGE_WRITE:
# it starts the I/O and returns; it neither waits for it nor guarantees anything). The fsync at the end then
# waits only for what was written last, instead of for every dirty page of the output (that fsync was 1.33 s of
# an 11.8 s merge on the H100 machine, 2026-11-24). 0 turns it off; it is off where the call does not exist.
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's `sync_file_range(fd, offset, nbytes, flags)` (Linux), or None. ctypes drops the GIL around it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of data."""
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class OutputShard:
    """One output file: `header` is every byte before the data (8-byte length + padded JSON), so
    `data_start == len(header)`; `size` is the final file size."""

    filename: str
    header: bytes
    data_start: int
    size: int
    tensor_names: tuple[str, ...]


class OutputLayout:
    """Where every output tensor goes: shards with their headers, and each tensor's absolute byte offset."""

    def __init__(self, shards: list[OutputShard], locations: dict[str, tuple[str, int, int]], total_size: int):
        self.shards = shards
        self._locations = locations
        self.total_size = total_size  # bytes of tensor data over all shards, as in the index's metadata

    def locate(self, name: str) -> tuple[str, int, int]:
        """(shard file name, absolute byte offset of the tensor in that file, nbytes) of tensor `name`."""
        return self._locations[name]

    def subset(self, filenames: list[str]) -> OutputLayout:
        """The layout of the shards `filenames` only, unchanged (names, headers, offsets): a part of a merge split
        by output shard (`MergePlan.part`). Its `total_size` counts those shards' tensors."""
        wanted = set(filenames)
        shards = [s for s in self.shards if s.filename in wanted]
        if len(shards) != len(wanted):
            raise ValueError(f"not shards of this layout: {sorted(wanted - {s.filename for s in shards})}")
        locations = {name: loc for name, loc in self._locations.items() if loc[0] in wanted}
        return OutputLayout(shards, locations, sum(nbytes for _, _, nbytes in locations.values()))

    def index_json(self) -> dict:
        """The Hugging Face `model.safetensors.index.json` content: `metadata.total_size` and `weight_map`."""
        weight_map = {name: shard for name, (shard, _, _) in self._locations.items()}
        return {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}


def plan_layout(
    tensors: list[OutputTensor], max_shard_bytes: int, metadata: dict[str, str] | None = None
) -> OutputLayout:
    """Lay `tensors` out in shards of at most `max_shard_bytes` of tensor data, keeping their order.

    A new shard starts when adding a tensor would exceed the limit; a tensor larger than the limit gets a shard of
    its own. One shard is named `model.safetensors`, several `model-00001-of-00003.safetensors` and so on.
    Each header carries `metadata` (default `{"format": "pt"}`) and is padded with spaces to a multiple of 8
    bytes, as the safetensors library does. Deterministic.

    >>> layout = plan_layout([OutputTensor("w", "BF16", (4, 4))], max_shard_bytes=5 * 10**9)
    >>> layout.locate("w")
    ('model.safetensors', 104, 32)
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("output tensor names are not unique")
    groups: list[list[OutputTensor]] = [[]]
    group_bytes = 0
    for t in tensors:
        if groups[-1] and group_bytes + t.nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(t)
        group_bytes += t.nbytes

    metadata = {"format": "pt"} if metadata is None else metadata
    shards: list[OutputShard] = []
    locations: dict[str, tuple[str, int, int]] = {}
    for i, group in enumerate(groups, start=1):
        filename = SINGLE_FILE_NAME if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header = _header_bytes(group, metadata)
        offset = len(header)
        for t in group:
            locations[t.name] = (filename, offset, t.nbytes)
            offset += t.nbytes
        shards.append(OutputShard(filename, header, len(header), offset, tuple(t.name for t in group)))
    return OutputLayout(shards, locations, sum(t.nbytes for t in tensors))


def _header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """8-byte little-endian length + header JSON padded with spaces to a multiple of 8, tensors contiguous."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class ShardedWriter:
    """Writes the shards of `layout` into `directory`: every file is created at its final size up front, then
    chunks land at their offsets with `os.pwrite`. `write` is thread-safe. A context manager: a clean exit calls
    `close`; an exception closes the files without writing the index. With `resume`, existing shard files are
    not truncated: their data stays, their headers and sizes are set again (see `streaming/journal.py`).

    >>> with ShardedWriter(tmp, layout) as writer:  # doctest: +SKIP
    ...     writer.write("w", 0, chunk)  # chunk: bytes, memoryview or contiguous CPU tensor
    """

    def __init__(self, directory: Path, layout: OutputLayout, *, resume: bool = False, index: bool = True):
        self.directory = Path(directory)
        self.layout = layout
        self._index = index
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        # resume: keep the bytes already in the shards (tensors a journal says are done); headers are rewritten
        flags = os.O_WRONLY | os.O_CREAT | (0 if resume else os.O_TRUNC)
        # each shard's SHA-256, fed with the bytes written in file order (fusemerge.verify.PrefixDigest)
        self.digests = {shard.filename: PrefixDigest() for shard in layout.shards}
        try:
            for shard in layout.shards:
                fd = os.open(self.directory / shard.filename, flags, 0o644)
                self._fds[shard.filename] = fd
                _pwrite_all(fd, memoryview(shard.header), 0)
                self.digests[shard.filename].feed(0, memoryview(shard.header))
                os.ftruncate(fd, shard.size)
        except BaseException:
            self._close_files(sync=False)
            raise
        self._writeback = _Writeback(dict(self._fds), WRITEBACK_BYTES)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files(sync=False)

    def write(self, name: str, byte_offset: int, data: bytes | bytearray | memoryview | torch.Tensor) -> None:
        """Write `data` at byte `byte_offset` of tensor `name`. A tensor must be contiguous and on the CPU; its
        bytes are written as they are in memory (little-endian on every platform torch supports)."""
        buf = _as_bytes(data)
        filename, start, nbytes = self.layout.locate(name)
        if byte_offset < 0 or byte_offset + buf.nbytes > nbytes:
            raise ValueError(
                f"writing bytes [{byte_offset}, {byte_offset + buf.nbytes}) of tensor {name!r} of {nbytes} bytes"
            )
        fd = self._fds.get(filename)
        if fd is None:
            raise ValueError(f"writing tensor {name!r}: the writer is closed")
        _pwrite_all(fd, buf, start + byte_offset)
        self.digests[filename].feed(start + byte_offset, buf)
        self._writeback.wrote(filename, buf.nbytes)

    def detach(self) -> None:
        """In a forked worker process (streaming/processes.py), when it has written its last byte: stop this
        copy's writeback thread. The descriptors stay open: the parent, which shares them, closes them."""
        self._writeback.stop()

    def close(self) -> None:
        """Flush every shard to disk, close it, and write `model.safetensors.index.json` if there are several
        (unless made with `index=False`: a part of a partitioned merge, whose index `fusemerge finalize` writes)."""
        self._close_files(sync=True)
        if self._index and len(self.layout.shards) > 1:
            write_index(self.directory, self.layout.index_json())

    def _close_files(self, sync: bool) -> None:
        writeback = getattr(self, "_writeback", None)  # absent when __init__ failed before it
        if writeback is not None:
            writeback.stop()  # before the descriptors it uses are closed
        with self._lock:
            fds, self._fds = self._fds, {}
        error: OSError | None = None
        for fd in fds.values():  # every descriptor is closed; the first failure is raised after
            try:
                if sync and error is None:
                    os.fsync(fd)
            except OSError as e:
                error = e
            finally:
                os.close(fd)
        if error is not None:
            raise error


class _Writeback:
    """Starts the kernel's writeback of a shard's dirty pages each time `every` more bytes have been written to
    it, from a thread of its own, so no writer waits for it (the call can block while the device queue is
    full). Advisory only: its result is ignored; durability still comes from `ShardedWriter.close`'s fsync."""

    def __init__(self, fds: dict[str, int], every: int):
        self._fds = fds
        self._every = every if _sync_file_range is not None else 0
        self._pending: dict[str, int] = {}  # shard -> bytes written since its last request
        self._due: set[str] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.requests = 0  # sync_file_range calls made (for tests and benchmarks)

    def wrote(self, filename: str, nbytes: int) -> None:
        if self._every <= 0:
            return
        with self._cond:
            pending = self._pending.get(filename, 0) + nbytes
            if pending < self._every:
                self._pending[filename] = pending
                return
            self._pending[filename] = 0
            if self._stopped:
                return
            self._due.add(filename)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fusemerge-writeback", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._due and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return  # close() fsyncs every shard anyway
                due, self._due = self._due, set()
            for filename in sorted(due):
                # the whole file (offset 0, length 0: to its end): pages already under writeback are skipped
                _sync_file_range(self._fds[filename], 0, 0, _SYNC_FILE_RANGE_WRITE)
                self.requests += 1

    def stop(self) -> None:
        """No more requests; returns once the thread has finished its current one."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


def write_index(directory: Path, index: dict) -> None:
    """Write `model.safetensors.index.json` (`OutputLayout.index_json()`) into `directory`, flushed to disk."""
    with open(Path(directory) / INDEX_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _as_bytes(data: bytes | bytearray | memoryview | torch.Tensor) -> memoryview:
    """A flat byte view of `data`, without copying."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError(f"can only write contiguous CPU tensors, got one on {data.device}, or not contiguous")
        # via uint8, as numpy has no bfloat16 / float8
        return memoryview(data.detach().reshape(-1).view(torch.uint8).numpy())
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """`os.pwrite` until every byte of `buf` is written (it may write fewer)."""
    while buf.nbytes:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def temp_dir_path(out_dir: str | os.PathLike) -> Path:
    """The temporary directory of `out_dir`: `.{name}.fusemerge-tmp` in its parent (same filesystem, so
    `move_into_place` is a rename). A fixed name, so the partial merge a killed run leaves behind is found again, to be
    resumed (`--resume`) or removed by the next run; only the holder of `out_dir`'s lock may touch it."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f".{out_dir.name}.fusemerge-tmp"


def make_temp_dir(out_dir: Path) -> Path:
    """Create and return the empty temporary directory of `out_dir` (`temp_dir_path`), first removing what an
    interrupted run left there. Creates `out_dir`'s parent if needed. Hold `out_dir`'s lock while calling it."""
    temp_dir = temp_dir_path(out_dir)
    temp_dir.parent.mkdir(parents=True, exist_ok=True)
    if temp_dir.is_symlink() or temp_dir.is_file():
        temp_dir.unlink()
    elif temp_dir.exists():
        shutil.rmtree(temp_dir)
    temp_dir.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0o700
    return temp_dir


REPLACED_PREFIX = ".{name}.fusemerge-old-"  # + 8 hex digits: an output --overwrite replaced, being deleted


def move_into_place(temp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Put the finished `temp_dir` in place of `out_dir` by renaming it.

    `out_dir` missing or empty: it becomes `temp_dir`. Not empty: without `overwrite`, `InputError` and nothing is
    touched (`temp_dir` stays for the caller to remove); with `overwrite`, the old directory is renamed aside, the
    new one renamed in, then the old one deleted. Call `check_out_dir` first: this does not check the inputs.
    """
    temp_dir, out_dir = Path(temp_dir), Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(temp_dir, out_dir)
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise InputError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(temp_dir, out_dir)
        return
    if not overwrite:
        raise InputError(f"{out_dir}: exists and is not empty; pass {opt('overwrite')} to replace it")
    if _exchange(temp_dir, out_dir):  # one atomic step: no moment without out_dir
        # temp_dir now holds the old output: renamed away at once (a caller undoing its failed work must never
        # find the old output's files under the temporary name), then deleted, quietly (out_dir is in place)
        old_dir = _replaced_name(out_dir)
        os.rename(temp_dir, old_dir)
        _remove_replaced(old_dir)
        return
    old_dir = _replaced_name(out_dir)
    os.rename(out_dir, old_dir)
    try:
        os.rename(temp_dir, out_dir)
    except BaseException:
        os.rename(old_dir, out_dir)
        raise
    _remove_replaced(old_dir)


def _replaced_name(out_dir: Path) -> Path:
    return out_dir.parent / f"{REPLACED_PREFIX.format(name=out_dir.name)}{secrets.token_hex(4)}"


def _remove_replaced(old_dir: Path) -> None:
    """Delete the output --overwrite replaced; the new one is in place, so a failure is a warning naming what is
    left (removed by the next run into the same OUT_DIR, `remove_replaced`, or by hand)."""
    try:
        shutil.rmtree(old_dir)
    except OSError as e:
        log.warning("%s: the output %s replaced could not be removed (%s); the next run into this "
                    "directory removes it, or remove it by hand", old_dir, opt_name("overwrite"), e.strerror or e)


def replaced_outputs(out_dir: Path) -> list[str]:
    """The outputs an earlier --overwrite of `out_dir` replaced and did not delete (a run killed between the swap
    and the delete, a directory it could not empty), beside it."""
    out_dir = Path(os.path.abspath(out_dir))
    prefix = REPLACED_PREFIX.format(name=out_dir.name)
    try:
        return [e.path for e in os.scandir(out_dir.parent) if e.name.startswith(prefix) and e.is_dir()
                and not e.is_symlink() and len(e.name) == len(prefix) + 8]
    except OSError:
        return []


def remove_replaced(out_dir: Path, notify: Callable[[str], None]) -> None:
    """Remove the outputs an earlier --overwrite of `out_dir` replaced but did not delete (`replaced_outputs`);
    call with OUT_DIR's lock held."""
    out_dir = Path(os.path.abspath(out_dir))
    for path in replaced_outputs(out_dir):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            notify(f"{path}: an output an earlier {opt_name('overwrite')} replaced; it could not be removed")
        else:
            notify(f"removed {path}, the output an earlier {opt_name('overwrite')} of {out_dir} replaced")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, the C
    library or the file system cannot, so the caller renames in two steps (a kill between them left out_dir
    missing and the old output under a hidden name)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # not on this kernel / file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def _linked_into(model: Path, out: Path) -> tuple[Path, Path] | None:
    """(target, link) for the first file of the model directory (or the model file) that resolves inside `out`."""
    try:
        entries = [e.path for e in os.scandir(model)] if model.is_dir() else [str(model)]
    except OSError:
        return None
    for entry in entries:
        target = Path(os.path.realpath(entry))
        if target == out or out in target.parents:
            return target, Path(entry)
    return None


def _replaced_by_mistake(out_dir: Path, out: Path, config: Path | None) -> list[str]:
    """Why `--overwrite` must not replace the non-empty directory `out_dir` (resolved: `out`): it is or holds the
    current directory, the home directory, or the config file (a typo or a `.` for a new name would delete them)."""
    problems = []
    for what, where in (("the current directory", Path.cwd), ("your home directory", Path.home),
                        (f"the config {config}", lambda: config)):
        try:
            here = where()
            here = Path(here).resolve() if here is not None else None
        except (OSError, RuntimeError):  # no current directory, no home
            continue
        if here is not None and (here == out or out in here.parents):
            problems.append(f"{out_dir}: {'is' if here == out else 'holds'} {what}, which {opt('overwrite')} "
                            "would delete with the rest; choose a new output directory")
    return problems


def check_out_dir(out_dir: Path, overwrite: bool, inputs: list[Path], config: Path | None = None) -> list[str]:
    """Problems with writing the merge to `out_dir`, found before any work, as one message each.

    `out_dir` must not be a file, must be empty unless `overwrite`, must not be, contain or lie inside any of the
    `inputs` (never delete a user's models, even with --overwrite), and its parent must be writable. `overwrite`
    replaces a directory as a whole, so it may not replace one that is or holds the current directory, the home
    directory or the `config` file (an empty current directory is merged into: it held nothing to lose).
    """
    out_dir = Path(out_dir)
    problems = []
    out = out_dir.resolve()
    if out_dir.is_symlink():
        problems.append(f"{out_dir}: is a symbolic link; give the directory it points to, or another path")
    elif out_dir.exists() and not out_dir.is_dir():
        problems.append(f"{out_dir}: exists and is not a directory")
    elif out_dir.is_dir():
        try:
            non_empty = any(out_dir.iterdir())
        except OSError as e:
            non_empty = True
            problems.append(f"{out_dir}: cannot read directory: {e.strerror or e}")
        if non_empty and not overwrite:
            problems.append(f"{out_dir}: exists and is not empty; pass {opt('overwrite')} to replace it")
        elif non_empty:
            problems += _replaced_by_mistake(out_dir, out, config)

    for model in inputs:
        model_path = Path(model).resolve()
        if model_path == out or out in model_path.parents:
            problems.append(f"{out_dir}: holds the input model {model}; choose another output directory")
        elif model_path in out.parents:
            problems.append(f"{out_dir}: lies inside the input model {model}; choose another output directory")
        elif linked := _linked_into(Path(model), out):  # a model of links to another merge's files
            problems.append(f"{out_dir}: holds {linked[0]}, which the input model {model} reads through the link "
                            f"{linked[1]}; choose another output directory")

    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        problems.append(f"{out_dir}: cannot be created: {ancestor} is not a directory")
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        problems.append(f"{out_dir}: cannot be created: {ancestor} is not writable")
    return problems
