"""`trim_scope: global` thresholds computed once per merge and kept in a file: shared by the parts of a
partitioned merge, kept across `--resume`.

A global threshold is one k-th largest |delta| per expert over every merged tensor of the model, so finding it
reads the whole model (`Executor.find_global_cuts`, which calls `kernels/select.py`). What it finds is a few
integers per expert: for the trim threshold and for breadcrumbs' second one, the float32 bits `t` of |delta|
at the cut and the global index `c` up to which entries tied at `t` are kept. `CutsFile` keeps them in

    OUT_DIR.fusemerge-parts/.fusemerge-global-cuts.json      the parts of `run --partition I/N` (shared)
    .OUT_DIR.fusemerge-tmp/.fusemerge-global-cuts.json       one run (read again by --resume; not in the output)

as `{"format": "fusemerge-global-cuts/2", "merge": SHA-256 of the merge's identity, "cuts": [[t, c, t2, c2], ...
one per expert], "sha256": of the merge and cuts}`: a file whose cuts were changed (a flipped digit is still valid
JSON, and would merge other bytes) does not match its checksum and is found again. The identity is
`partition.merge_identity` (the config, the seed, the layout, every input's size and header hash, the fusemerge
version), so a file left by another merge, or by these inputs before they changed, is not used: the thresholds are
found again and the file replaced.

Shared files are written under an flock (`.fusemerge-global-cuts.lock` beside them): the first part to take it
finds the thresholds and writes them; parts that start meanwhile wait for it, then read them, so the model is read
once for its thresholds however many parts there are (parts started at once on n machines wait instead of each
reading the whole model from the shared file system). A part killed while finding them releases the lock with its
process, and the next waiter finds them itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fusemerge.streaming.lock import NO_LOCKS, no_locks_warning
from fusemerge.verify import write_json

CUTS_NAME = ".fusemerge-global-cuts.json"
LOCK_NAME = ".fusemerge-global-cuts.lock"
FORMAT = "fusemerge-global-cuts/2"

# What Executor.find_global_cuts returns: per expert ((t, c), (t2, c2)), the trim cut and breadcrumbs' second one.
Cuts = list[tuple[tuple[int, int], tuple[int, int]]]


def identity_digest(identity: dict) -> str:
    """The SHA-256 of a merge identity (`partition.merge_identity`), in canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class CutsFile:
    """The global thresholds of one merge in `directory` (see the module docstring). `shared`: other processes
    may find or read them at the same time (the parts of a partitioned merge), so `load_or_find` holds a lock.
    `notify(line)` is told when the thresholds are read from the file, or waited for."""

    def __init__(self, directory: str | os.PathLike, merge: str, experts: int, *, shared: bool,
                 notify: Callable[[str], None] | None = None):
        self.path = Path(directory) / CUTS_NAME
        self.merge = merge
        self.experts = experts
        self.shared = shared
        self.notify = notify or (lambda line: None)

    def load_or_find(self, find: Callable[[], Cuts]) -> Cuts:
        """The thresholds from the file if it holds this merge's, else `find()`'s, then written to the file."""
        with self._lock():
            cuts = self.load()
            if cuts is not None:
                self.notify(f"trim_scope: global thresholds read from {self.path} (another part of this merge, or "
                            "the run this one resumes, found them)")
                return cuts
            cuts = find()
            self._write(cuts)
            return cuts

    def load(self) -> Cuts | None:
        """This merge's thresholds from the file; None when it is missing, unreadable, malformed or of another
        merge (said through `notify` unless missing)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.notify(f"{self.path}: unreadable ({getattr(e, 'strerror', None) or e}); finding the trim_scope: "
                        "global thresholds again")
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not _is_cuts(data.get("cuts"), self.experts):
            self.notify(f"{self.path}: not a fusemerge global-thresholds file of {self.experts} expert(s); finding "
                        "the thresholds again")
            return None
        if data.get("sha256") != _checksum(data.get("merge"), data["cuts"]):
            self.notify(f"{self.path}: does not match its checksum (changed or damaged); finding the trim_scope: "
                        "global thresholds again")
            return None
        if data.get("merge") != self.merge:
            self.notify(f"{self.path}: holds the thresholds of another merge (other config, options or inputs); "
                        "finding them again")
            return None
        return [((t, c), (t2, c2)) for t, c, t2, c2 in data["cuts"]]

    def remove(self) -> None:
        """Remove the file (and the lock file) where they are, before a run's directory becomes its output."""
        for path in (self.path, self.path.with_name(LOCK_NAME)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _write(self, cuts: Cuts) -> None:
        """Write by rename, so a reader sees the old file or the whole new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{CUTS_NAME}.{os.getpid()}.tmp")
        rows = [[t, c, t2, c2] for (t, c), (t2, c2) in cuts]
        write_json(tmp, {"format": FORMAT, "merge": self.merge, "cuts": rows, "sha256": _checksum(self.merge, rows)},
                   indent=None)
        os.replace(tmp, self.path)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the flock beside the file (shared files only); say so when another process holds it."""
        if not self.shared:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(LOCK_NAME)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.notify(f"another part is finding the trim_scope: global thresholds (it holds {lock}); "
                            "waiting to read them")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # no file locks here: parts started together each find them (same values)
                if e.errno not in NO_LOCKS:
                    raise
                self.notify(no_locks_warning(lock, e, "parts started together from each finding the thresholds"))
            yield  # the lock file stays (finalize removes the parts' directory): never unlinked while in use
        finally:
            os.close(fd)


def _checksum(merge: object, rows: list) -> str:
    return hashlib.sha256(json.dumps([merge, rows]).encode()).hexdigest()


def _is_cuts(cuts: object, experts: int) -> bool:
    return (isinstance(cuts, list) and len(cuts) == experts
            and all(isinstance(row, list) and len(row) == 4
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row) for row in cuts))
