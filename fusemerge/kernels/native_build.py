"""Compiled CPU code, built at first use: where it is built, how, and the checks before it is loaded.

Two modules embed C source that the CPU path runs through ctypes (a call releases the GIL, so the merge's
threads run it side by side): ``philox_native`` (DARE's keep test) and ``cpu_fused`` (the fused merge and the
selection histograms). Each source is compiled the first time a process needs it, by the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; Triton needs one too), into a cache (``$FUSEMERGE_CACHE_DIR``, else
``$XDG_CACHE_HOME/fusemerge``, else ``~/.cache/fusemerge``; where that fails, a private directory in the temp
dir) under a name that hashes the source, the flags, the compiler's version and the machine, so a change of any
rebuilds it. On x86-64 the functions are built for three instruction sets (``target_clones``: x86-64-v4, v3,
baseline) and the loader picks the CPU's, so a cache shared by different machines stays correct.

A library is loaded only from a file and directory of this user that no one else may write, opened without
following links and loaded through its descriptor. Each module checks its library's answers against its
Python path before using it, and falls back to that path when anything fails; ``FUSEMERGE_NATIVE=0`` asks for
the Python paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fusemerge")

# Put before a function definition in a source: build it for three x86-64 levels where the compiler can.
CLONES = """
#if defined(__x86_64__) && defined(__ELF__) && !defined(FM_NO_CLONES)
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CLONES
#endif
"""


def loaded(state: dict, lock: threading.Lock, load: Callable[[], tuple[object, str]], what: str) -> object:
    """What `load()` gives (the compiled code, or None for the Python path), loaded once per process and thread-
    safely: kept in state["obj"], its description in state["how"], logged once as `what: how`."""
    obj = state.get("obj", False)
    if obj is False:
        with lock:
            if "how" not in state:
                obj, how = load()
                state["how"] = how  # before "obj": a thread that sees "obj" finds "how" too
                state["obj"] = obj
                log.info("%s: %s", what, how)
            obj = state["obj"]
    return obj


def disabled() -> bool:
    """Whether FUSEMERGE_NATIVE=0 asks for the Python paths."""
    return os.environ.get("FUSEMERGE_NATIVE", "1") == "0"


def compiler() -> list[str] | None:
    """The C compiler command: $CC, else the first of cc, gcc, clang on PATH; None without one."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: $FUSEMERGE_CACHE_DIR, $XDG_CACHE_HOME/fusemerge or ~/.cache/fusemerge."""
    if os.environ.get("FUSEMERGE_CACHE_DIR"):
        return Path(os.environ["FUSEMERGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusemerge"


def load(stem: str, source: str, flags: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """(the library, its path) built from `source` with `flags` (in the cache, else in a private temp dir), or
    (None, why it could not be built or loaded)."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler found; set CC"
    errors = []
    user = os.getuid() if hasattr(os, "getuid") else 0
    for where in (cache_dir(), Path(tempfile.gettempdir()) / f"fusemerge-{user}"):
        try:
            lib = _build(cc, where, stem, source, flags)
            return _open_private(lib), str(lib)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{where}: {e}")
    return None, "; ".join(errors)


def _build(cc: list[str], where: Path, stem: str, source: str, flags: list[str]) -> Path:
    """The library for this source, flags, compiler and machine under `where`, compiled unless already there
    (by a temporary name, then renamed: processes building at once each get a whole file)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(where)
    for extra in ([], ["-DFM_NO_CLONES"]):  # a compiler without target_clones builds the plain loops
        all_flags = flags + extra
        key = "\0".join([source, *all_flags, version, platform.machine(), platform.system()])
        lib = where / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if lib.exists() or lib.is_symlink():
            return lib  # checked when it is opened (_open_private)
        with tempfile.TemporaryDirectory(dir=where, prefix=".build-") as tmp:
            src, out = Path(tmp) / f"{stem}.c", Path(tmp) / lib.name
            src.write_text(source)
            done = subprocess.run([*cc, *all_flags, "-o", str(out), str(src)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                os.chmod(out, 0o755)  # not group-writable whatever the umask (check_private)
                os.replace(out, lib)
                return lib
            error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    raise OSError(f"{' '.join(cc)} failed: {error[0]}")


def check_private(path: Path, st: os.stat_result | None = None) -> None:
    """Code is loaded only from a directory and file of this user that no one else may write, and not through
    a symbolic link (a shared temporary directory is where another user could leave a library, or a link to
    one, to be loaded). `st`: the file's stat, when the caller has it from an open descriptor."""
    if not hasattr(os, "getuid"):
        return
    st = st or os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{path} is a symbolic link; fusemerge loads its compiled code only from its own files")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not this user's alone (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})")


def _open_private(lib: Path) -> ctypes.CDLL:
    """dlopen `lib` after checking the very file that is loaded: opened without following links, checked by
    its descriptor, loaded through /proc/self/fd (where there is one), so it cannot be swapped in between."""
    if not hasattr(os, "O_NOFOLLOW") or not os.path.isdir("/proc/self/fd"):
        check_private(lib)
        return ctypes.CDLL(str(lib))
    fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        check_private(lib, os.fstat(fd))
        # the descriptor stays open: the dynamic loader knows a library by its name, and a later load through a
        # reused /proc/self/fd/N would be handed the library loaded first under that name
        return ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
