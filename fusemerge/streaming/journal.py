"""The resume journal: which output tensors are durably written, so `run --resume` redoes only the rest.

A merge writes into the temporary directory of OUT_DIR (`.{name}.fusemerge-tmp`, see `writer.temp_dir_path`).
Next to the shards it keeps `.fusemerge-journal`, one JSON object per line:

    {"format": "fusemerge-journal/1", "fingerprint": {...}}     the first line, written atomically (rename)
    {"tensor": "model.layers.0.mlp.up_proj.weight", "sha256": "5f1c..."}
    ...                                                         one line per finished tensor, appended

The fingerprint is what fixes the output bytes: the fusemerge version, the config in canonical form, the seed
(DARE methods), the output layout (shard names, sizes, header hashes: it changes with --out-shard-size and the
output dtype), and every input file (safetensors: path, size, mtime, SHA-256 of its header and sampled data,
`sampled_digest`; config.json and the index: the same, hashed whole). `--max-memory`, `--workers`, `--device`
and `--backend` do not change the bytes, so they may change between a run and its resume.

A tensor is journaled only once its bytes are on disk: when the executor reports a tensor finished, a background
thread hashes its bytes as they are in the shard, fsyncs the shards, then appends the tensor's line and fsyncs
the journal. The workers never wait for a disk flush; what a kill loses is the tensors in flight and those
finished but not yet synced (a batch at most as long as one fsync). On resume every journaled tensor's bytes are
hashed again and compared with its line, so a torn or corrupted tensor, or a torn last line, is redone.

Test hook, not for users: `FUSEMERGE_TEST_KILL_AT` makes the process SIGKILL itself at a fixed point, so tests
can interrupt a real merge deterministically: `chunk:K` right after the K-th chunk is written, `tensor:K` right
after the K-th journal line is durable, `stage:NAME` at a named point of `merge.run` (`started`: shards and
journal created, nothing merged; `merged`: every tensor written and journaled; `extras`: manifest, config and
model card written, just before the journal is removed and the directory renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fusemerge import __version__
from fusemerge.errors import InputError
from fusemerge.options import opt, opt_name
from fusemerge.streaming.model_index import CONFIG_NAME
from fusemerge.streaming.torch_bin import ZIP_MAGIC
from fusemerge.streaming.writer import OutputLayout
from fusemerge.verify import file_digest

if TYPE_CHECKING:
    from fusemerge.planner import MergePlan

JOURNAL_NAME = ".fusemerge-journal"
FORMAT = "fusemerge-journal/1"
KILL_ENV = "FUSEMERGE_TEST_KILL_AT"
READ_BYTES = 4 * 1024 * 1024  # hashing buffer: bounded memory whatever the tensor size


# -- fingerprint ---------------------------------------------------------------------------------------------


def fingerprint(plan: MergePlan) -> dict:
    """Everything that fixes the output bytes of `plan` (see the module docstring), as JSON data. A part of a
    partitioned merge (`MergePlan.part`) also records which part it is; its layout is its own shards'."""
    return {
        "fusemerge_version": __version__,
        "config": plan.config.to_yaml(),
        "seed": plan.seed if plan.method.sparsifier in ("dare", "della") else None,  # only their masks use it
        "layout": layout_entries(plan.layout),
        "inputs": input_files(plan),
        "partition": list(plan.partition) if plan.partition is not None else None,
    }


def layout_entries(layout: OutputLayout) -> list[dict]:
    """Each shard's file name, size and header SHA-256: the header fixes every tensor's name, dtype, shape and
    offset, so equal entries mean the same output layout."""
    return [{"file": s.filename, "bytes": s.size, "header_sha256": hashlib.sha256(s.header).hexdigest()}
            for s in layout.shards]


def _input_paths(plan: MergePlan) -> dict[Path, str]:
    """Every input file of `plan` (shards, config.json, index) -> what of it is hashed ("sampled": a shard's header
    and samples of its data, `sampled_digest`; "file": all of it)."""
    files: dict[Path, str] = {}
    for model in ([plan.base] if plan.base is not None else []) + plan.models:
        for f in model.files:
            files.setdefault(Path(os.path.abspath(f)), "sampled")
        directory = model.path if Path(model.path).is_dir() else Path(model.path).parent
        # config.json, and the index the shards were found through (not one beside it that was not read)
        for path in (directory / CONFIG_NAME, model.index):
            if path is not None and path.is_file():
                files.setdefault(Path(os.path.abspath(path)), "file")
    return files


def input_files(plan: MergePlan) -> list[dict]:
    """Every input file of `plan` (shards, config.json, index): path, size, mtime and SHA-256 (of the header and
    samples of the data for shards, of the whole file otherwise)."""
    out = []
    for path, hashed in _input_paths(plan).items():
        st = os.stat(path)
        digest = sampled_digest(path) if hashed == "sampled" else file_digest(path)[0]
        out.append({"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                    "hashed": hashed})
    return out


def input_mtimes(plan: MergePlan) -> dict[str, int]:
    """Every input file's modification time (ns), by absolute path: what a finished merge records, so that a
    `--resume` of it can tell inputs rewritten since (same size and header, other data) from the ones it read."""
    return {str(path): os.stat(path).st_mtime_ns for path in _input_paths(plan)}


def refuse_rewritten_inputs(done: Path, recorded: object, plan: MergePlan) -> None:
    """For a finished merge in `done` whose identity is not `plan`'s: where it read the very files `plan` reads
    (the same paths) and one was modified since, say so (refuse_changed_inputs), rather than leave the caller
    to report a directory that is merely not empty. The identity holds samples of the inputs' data, so a
    rewrite in place changes it."""
    if isinstance(recorded, dict) and set(recorded) == set(map(str, _input_paths(plan))):
        refuse_changed_inputs(done, recorded, plan, what="a finished merge of these input files")


def refuse_changed_inputs(done: Path, recorded: object, plan: MergePlan, what: str = "this merge, finished") -> None:
    """InputError if an input file of `plan` has another modification time than the one `recorded`
    (input_mtimes of the run that wrote the finished merge in `done`), or was not read by it: rewritten since,
    with the same size and header, it may hold other data. Nothing is checked when nothing was recorded (a
    join of parts that read copies on other machines, whose times differ; an older fusemerge)."""
    if not isinstance(recorded, dict):
        return
    changed = [path for path, mtime in input_mtimes(plan).items() if recorded.get(path) != mtime]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise InputError(f"{done} holds {what}, but {changed[0]}{more} was modified after that merge "
                         f"read it (its data may have changed): {opt('overwrite')} merges it again")


def header_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's 8-byte length and header (of what there is, in a file cut short)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        return hashlib.sha256(prefix + f.read(int.from_bytes(prefix, "little"))).hexdigest()


SAMPLES, SAMPLE_BYTES = 16, 4096
ZIP_ENDS = 256 << 10  # of a torch .bin: bytes hashed at its start (its pickle) and at its end (its zip directory)


def sampled_digest(path: Path) -> str:
    """SHA-256 of a safetensors shard's header and of SAMPLES windows of SAMPLE_BYTES spread evenly over its data
    (64 KiB read per shard): the same for the same bytes on any machine, unlike a modification time, so that
    parts merged on several machines (or at several times) can tell they read the same model. Data rewritten
    in place, same size and header, is caught unless it changed only between the windows. A PyTorch `.bin`
    (a zip) has its first and last ZIP_ENDS bytes hashed in place of a header: its pickle, and its zip directory
    with every storage's CRC-32."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        end = os.fstat(f.fileno()).st_size
        if prefix[:4] == ZIP_MAGIC:
            h = hashlib.sha256(prefix + f.read(ZIP_ENDS - 8))
            f.seek(max(f.tell(), end - ZIP_ENDS))
            h.update(f.read())
            data_start = 0
        else:
            h = hashlib.sha256(prefix + f.read(int.from_bytes(prefix, "little")))
            data_start = f.tell()
        span = max(0, end - data_start - SAMPLE_BYTES)
        for k in range(SAMPLES):
            f.seek(data_start + span * k // max(1, SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """Why a journal's fingerprint `old` does not match this run's `new`, one short reason each; [] if it does."""
    reasons = []
    if old.get("fusemerge_version") != new["fusemerge_version"]:
        reasons.append(f"it was started by fusemerge {old.get('fusemerge_version')}, this is {__version__}")
    if old.get("config") != new["config"]:
        reasons.append("the merge config differs from the interrupted run's")
    if old.get("seed") != new["seed"]:
        reasons.append(f"{opt('seed', new['seed'])} differs from the interrupted run's {old.get('seed')}")
    if old.get("partition") != new["partition"]:
        reasons.append(f"the interrupted run merged another {opt_name('partition')}")
    if old.get("layout") != new["layout"]:
        reasons.append(f"the output layout differs from the interrupted run's ({opt_name('out_shard_size')} or output "
                       "dtype)")
    old_inputs = {f.get("path"): f for f in old.get("inputs", []) if isinstance(f, dict)}
    new_inputs = {f["path"]: f for f in new["inputs"]}
    for path, now in new_inputs.items():
        then = old_inputs.get(path)
        if then is None:
            reasons.append(f"input {path} was not an input of the interrupted run")
        elif then.get("bytes") != now["bytes"]:
            reasons.append(f"input {path} changed since the interrupted run (size {then.get('bytes')} -> "
                           f"{now['bytes']} bytes)")
        elif then.get("sha256") != (header_digest(Path(path)) if then.get("hashed") == "header" else now["sha256"]):
            # a journal of a fusemerge that hashed shards' headers only is compared as it hashed them
            what = "header or sampled data" if now["hashed"] == "sampled" else "content"
            reasons.append(f"input {path} changed since the interrupted run (its {what} differs)")
        elif then.get("mtime_ns") != now["mtime_ns"]:
            reasons.append(f"input {path} changed since the interrupted run (modification time differs)")
    reasons += [f"input {path} of the interrupted run is no longer an input" for path in old_inputs
                if path not in new_inputs]
    return reasons


# -- the journal ---------------------------------------------------------------------------------------------


class Journal:
    """The journal of the merge into `directory` (the temporary directory). Make one with `create` (a new merge)
    or `resume`; `record(name)` after tensor `name` is completely written (thread-safe, returns at once);
    `close()` always. `done` is the set of tensors a resumed merge can skip.

    >>> journal = Journal.create(temp, plan)  # doctest: +SKIP
    >>> Executor(plan, writer, skip=journal.done, on_tensor_done=journal.record).run()  # doctest: +SKIP
    >>> journal.close(flush=True)  # doctest: +SKIP
    """

    def __init__(self, directory: Path, layout: OutputLayout, done: dict[str, str], kill: KillSwitch | None = None):
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_NAME
        self.layout = layout
        self.done = frozenset(done)
        self._kill = kill or KillSwitch(None)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._read_fds: dict[str, int] = {}
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._sync_loop, name="fusemerge-journal", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, directory: str | os.PathLike, plan: MergePlan, kill: KillSwitch | None = None) -> Journal:
        """Start the journal of a new merge in `directory`, recording `plan`'s fingerprint."""
        directory = Path(directory)
        _write_atomic(directory, [_line({"format": FORMAT, "fingerprint": fingerprint(plan)})])
        return cls(directory, plan.layout, {}, kill)

    @classmethod
    def resume(
        cls, directory: str | os.PathLike, plan: MergePlan, out_dir: str | os.PathLike, kill: KillSwitch | None = None
    ) -> tuple[Journal, int] | None:
        """Reopen the journal in `directory` to continue `plan`: (journal, number of entries dropped), or None if
        there is no readable journal (nothing to resume). Raises `InputError` (one line) if the journal belongs
        to another merge: another config, options or changed inputs. Every entry's tensor bytes are hashed again;
        entries that do not match (a torn write, a corrupted shard, a torn line) are dropped and redone. The
        journal is rewritten with the entries kept, so a torn last line is never appended to. `out_dir` names
        the merge in messages."""
        directory = Path(directory)
        try:
            data = (directory / JOURNAL_NAME).read_bytes()
        except FileNotFoundError:
            return None
        lines = data.split(b"\n")
        try:
            header = json.loads(lines[0])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(header, dict) or header.get("format") != FORMAT or len(lines) < 2:
            return None
        reasons = differences(header.get("fingerprint") or {}, fingerprint(plan))
        if reasons:
            more = f" (and {len(reasons) - 1} more difference(s))" if len(reasons) > 1 else ""
            raise InputError(f"{out_dir}: cannot resume the interrupted merge: {reasons[0]}{more}; "
                             f"run without {opt('resume')} to start it over")
        claimed: dict[str, str] = {}
        torn = 0
        for raw in lines[1:-1]:  # lines[-1] follows the last newline: empty, or a torn line
            try:
                entry = json.loads(raw)
                claimed[entry["tensor"]] = entry["sha256"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                torn += 1
        torn += bool(lines[-1])
        done = {name: digest for name, digest in claimed.items() if _tensor_matches(directory, plan.layout,
                                                                                    name, digest)}
        _write_atomic(directory, [lines[0] + b"\n"] + [_line({"tensor": n, "sha256": d}) for n, d in done.items()])
        return cls(directory, plan.layout, done, kill), torn + len(claimed) - len(done)

    def record(self, name: str) -> None:
        """Tensor `name` is completely written: journal it once it is on disk (in the background)."""
        with self._cond:
            if self._error is not None:
                raise self._error
            self._pending.append(name)
            self._cond.notify()

    def close(self, flush: bool = False) -> None:
        """Stop the background thread; with `flush`, first journal every tensor recorded so far (after a
        clean finish, or an interruption that keeps the directory for `--resume`). Raises what the thread met.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            if not flush:
                self._pending.clear()
            self._closing = True
            self._cond.notify()
        self._thread.join()
        for fd in [self._fd, *self._read_fds.values()]:
            os.close(fd)
        self._read_fds.clear()
        if flush and self._error is not None:
            raise self._error

    def remove(self) -> None:
        """Delete the journal file (the merge is complete: the directory is about to become OUT_DIR)."""
        self.path.unlink(missing_ok=True)

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closing:
                    return
            try:
                self._sync(batch)
            except BaseException as e:  # reported by the next record() or close(flush=True)
                with self._cond:
                    self._error = e
                    self._pending.clear()
                return

    def _sync(self, batch: list[str]) -> None:
        """Hash `batch`'s bytes, flush the shards, then append and flush the batch's lines."""
        lines = []
        for name in batch:
            filename, offset, nbytes = self.layout.locate(name)
            lines.append(_line({"tensor": name, "sha256": _digest(self._read_fd(filename), offset, nbytes)}))
        for fd in self._read_fds.values():
            os.fsync(fd)  # Linux flushes a file's dirty pages through any descriptor of it
        for line in lines:
            _write_all(self._fd, line)
            os.fsync(self._fd)
            self._kill.tensor_journaled()

    def _read_fd(self, filename: str) -> int:
        fd = self._read_fds.get(filename)
        if fd is None:
            fd = self._read_fds[filename] = os.open(self.directory / filename, os.O_RDONLY)
        return fd


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_atomic(directory: Path, lines: list[bytes]) -> None:
    """Replace the journal in `directory` by `lines`, flushed, by a rename: a reader sees the old or the new."""
    tmp = directory / (JOURNAL_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, b"".join(lines))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / JOURNAL_NAME)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename, and the shard files created in this directory, survive a crash
    finally:
        os.close(dir_fd)


def _digest(fd: int, offset: int, nbytes: int) -> str:
    """SHA-256 of bytes [offset, offset + nbytes) of the open file `fd` (short if the file is shorter)."""
    h = hashlib.sha256()
    end = offset + nbytes
    while offset < end:
        buf = os.pread(fd, min(READ_BYTES, end - offset), offset)
        if not buf:
            break
        h.update(buf)
        offset += len(buf)
    return h.hexdigest()


def _tensor_matches(directory: Path, layout: OutputLayout, name: str, digest: object) -> bool:
    """Whether the journaled tensor `name` is in the layout and its bytes in the shard still hash to `digest`."""
    try:
        filename, offset, nbytes = layout.locate(name)
    except KeyError:
        return False
    try:
        fd = os.open(directory / filename, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return os.fstat(fd).st_size >= offset + nbytes and _digest(fd, offset, nbytes) == digest
    finally:
        os.close(fd)


# -- test hook -----------------------------------------------------------------------------------------------


class KillSwitch:
    """`FUSEMERGE_TEST_KILL_AT` (test hook, see the module docstring): SIGKILL this process at a given point.
    Inert when the variable is unset. `KillSwitch.from_env()`; `wrap_write(writer)` counts chunk writes."""

    def __init__(self, spec: str | None):
        self.kind, self.target = None, None
        self.pid = os.getpid()  # the run's process, also killed from a worker process (streaming/processes.py)
        self._count = 0
        self._lock = threading.Lock()
        if spec:
            kind, _, value = spec.partition(":")
            if kind not in ("chunk", "tensor", "stage") or not value:
                raise ValueError(f"{KILL_ENV}={spec!r}: expected chunk:K, tensor:K or stage:NAME")
            self.kind, self.target = kind, (value if kind == "stage" else int(value))

    @classmethod
    def from_env(cls) -> KillSwitch:
        return cls(os.environ.get(KILL_ENV))

    def wrap_write(self, writer) -> None:
        """Make `writer.write` count chunks (only when the hook is `chunk:K`)."""
        if self.kind != "chunk":
            return
        write: Callable = writer.write

        def counted(*args, **kwargs) -> None:
            write(*args, **kwargs)
            self._tick("chunk")

        writer.write = counted

    def tensor_journaled(self) -> None:
        self._tick("tensor")

    def stage(self, name: str) -> None:
        if self.kind == "stage" and self.target == name:
            self._kill()

    def _tick(self, kind: str) -> None:
        if self.kind != kind:
            return
        with self._lock:
            self._count += 1  # in a worker process: that worker's chunks
            if self._count >= self.target:
                self._kill()

    def _kill(self) -> None:
        """SIGKILL the run's process and, from a worker process, this one too."""
        os.kill(self.pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
