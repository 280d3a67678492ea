"""SHA-256 of output files: whole files, or fed as they are written (`PrefixDigest`)."""

from __future__ import annotations

import hashlib
import os
import threading

CHUNK_BYTES = 4 * 1024 * 1024  # read buffer: bounded memory whatever the shard size


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of the file at `path`, read in `CHUNK_BYTES` chunks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


class PrefixDigest:
    """SHA-256 of a file as it is written: `feed(offset, data)` hashes `data` when it continues the bytes hashed
    so far (offset == the hashed prefix's end) and ignores it otherwise; `finish(path)` hashes the file's bytes
    from the end of that prefix on, read back from disk. Each byte of the file is hashed once, in order,
    whatever order the writes came in (a byte written out of order is read back), so the digest is the file's.
    Thread-safe."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.upto = 0
        self._lock = threading.Lock()

    def feed(self, offset: int, data: memoryview) -> None:
        if offset != self.upto:  # cheap, racy pre-check; decided again under the lock
            return
        with self._lock:
            if offset == self.upto:
                self._h.update(data)
                self.upto += data.nbytes

    def finish(self, path: str | os.PathLike) -> tuple[str, int]:
        """(hex digest, size) of the file at `path`, reading only what was not fed in order."""
        with self._lock:
            size = self.upto
            buf = bytearray(CHUNK_BYTES)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as f:
                f.seek(self.upto)
                while n := f.readinto(buf):
                    self._h.update(view[:n])
                    size += n
            return self._h.hexdigest(), size
