"""One merge at a time per output directory: an `fcntl.flock` on `.{name}.fusemerge.lock` next to OUT_DIR.

The kernel releases a flock when its process dies, so a lock file left behind by a killed run never blocks the
next one: whether a run holds the lock is asked with a non-blocking flock, never from the file's existence.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusemerge.errors import InputError


def lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock file of `out_dir`: `.{name}.fusemerge.lock` in its parent."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f".{out_dir.name}.fusemerge.lock"


@contextmanager
def out_dir_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of `out_dir` for the `with` block (creating its parent if needed), then remove the lock file.

    Raises `InputError` at once if another process holds it.

    >>> with out_dir_lock("out/"):  # doctest: +SKIP
    ...     ...  # make the temporary directory, merge, finalize
    """
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{out_dir}: another fusemerge run is writing it (lock file {path} is held); "
                "wait for it to finish or choose another output directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file between our open and our flock: then we locked an
        # unlinked inode that nobody else will see, so try again on the file now at `path`.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding the lock, so no one can lock this inode afterwards
        except FileNotFoundError:
            pass
        os.close(fd)
