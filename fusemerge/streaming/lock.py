"""One merge at a time per output directory: an `fcntl.flock` on `.{name}.fusemerge.lock` next to OUT_DIR.

The kernel releases a flock when its process dies, so a lock file left behind by a killed run never blocks the
next one: whether a run holds the lock is asked with a non-blocking flock, never from the file's existence.

Some file systems refuse file locks: Lustre mounted without `-o flock`, some FUSE and SMB mounts (flock fails
with ENOSYS, EOPNOTSUPP, ENOLCK or EINVAL). There the run goes on without the lock, after one warning: nothing
then stops two runs into one OUT_DIR (mergekit never locks), so the user must not start them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fusemerge.errors import InputError


def lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock file of `out_dir`: `.{name}.fusemerge.lock` in its parent."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f".{out_dir.name}.fusemerge.lock"


# flock's errors where the file system has no locks (not "held by another process")
NO_LOCKS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})


def no_locks_warning(path: Path, e: OSError, what: str) -> str:
    """The one warning for a file system that refuses flock on `path`: what goes on unprotected."""
    return (f"{path}: this file system does not support file locks (flock: {e.strerror}); going on without the "
            f"lock, so nothing stops {what}")


@contextmanager
def out_dir_lock(out_dir: str | os.PathLike, notify: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the lock of `out_dir` for the `with` block (creating its parent if needed), then remove the lock file.

    Raises `InputError` at once if another process holds it. On a file system without file locks, says so
    through `notify` (default: the "fusemerge" logger's warning) and runs the block unlocked.

    >>> with out_dir_lock("out/"):  # doctest: +SKIP
    ...     ...  # make the temporary directory, merge, finalize
    """
    path = lock_path(out_dir)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a parent that cannot hold files (/proc, /sys), or turned read-only: before any work
            raise InputError(f"{out_dir}: cannot be created: cannot write {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{out_dir}: another fusemerge run is writing it (lock file {path} is held); "
                "wait for it to finish or choose another output directory"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise
            (notify or logging.getLogger("fusemerge").warning)(
                no_locks_warning(path, e, f"another fusemerge run from writing {out_dir} at the same time"))
            try:
                yield path
            finally:
                _unlink(path)
            return
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
        _unlink(path)  # while still holding the lock, so no one can lock this inode afterwards
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
