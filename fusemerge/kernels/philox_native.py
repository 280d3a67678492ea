"""DARE's keep test on CPU as compiled code: philox_numpy.keep_run's loop in C, built at first use.

The CPU merge spends most of a DARE merge drawing Philox 4x32-10 (dare_masks.py). In numpy each of the
~50 element-wise steps of the 10 rounds is its own pass over a uint64 array: 19.5 ns per entry and expert
on the 2-core Xeon VM. The same rounds as one C loop, vectorized by the compiler, take 2.31 ns there
(`python bench/philox_cpu.py`, 2026-12-01, one thread; 1.18 ns in aggregate from two), and a ctypes call
releases the GIL, so the merge's threads draw side by side without the mask worker processes.

The C source below is compiled the first time a process needs it, by the system's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``; Triton needs one too), into a cache (``$FUSEMERGE_CACHE_DIR``, else
``$XDG_CACHE_HOME/fusemerge``, else ``~/.cache/fusemerge``) under a name that hashes the source, the flags,
the compiler's version and the machine, so a change of any rebuilds it. On x86-64 the function is built
for three instruction sets (``target_clones``: x86-64-v4, v3, baseline) and the loader picks the CPU's,
so a cache shared by different machines stays correct. The library must reproduce numpy's bits on a
sample (both boundary cases of the counter's high word included) before it is used. Where anything fails
(no compiler, a read-only cache and temp dir, a wrong answer), the numpy path is used, with one note in the
log; ``FUSEMERGE_NATIVE=0`` asks for the numpy path.
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
from pathlib import Path

import numpy as np

from fusemerge.kernels import philox_numpy
from fusemerge.kernels.philox_numpy import (
    _M32,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
)

log = logging.getLogger(__name__)

# The rounds exactly as philox.py's docstring states them, one entry at a time; the compiler vectorizes the
# loop over entries (8 or 16 lanes of 32x32 -> 64-bit multiplies with AVX2 / AVX-512).
SOURCE = f"""
#include <stdint.h>
#if defined(__x86_64__) && defined(__ELF__) && !defined(FM_NO_CLONES)
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CLONES
#endif

/* out[j] = (folded c0 of Philox4x32-10 at counter (first + j, high, 0, 0), key (k0, k1)) < below, for
   j < n; first + n - 1 must not pass 2^32 - 1 (the caller splits runs at multiples of 2^32). */
FM_CLONES void fm_keep_run(uint32_t k0, uint32_t k1, uint32_t high, uint32_t first, int64_t n,
                           uint32_t below, uint8_t *out) {{
    uint32_t ks0[{philox_numpy.N_ROUNDS}], ks1[{philox_numpy.N_ROUNDS}];
    for (int r = 0; r < {philox_numpy.N_ROUNDS}; r++) {{
        ks0[r] = k0; ks1[r] = k1;
        k0 += {PHILOX_KEY_A}u; k1 += {PHILOX_KEY_B}u;
    }}
    for (int64_t j = 0; j < n; j++) {{
        uint32_t c0 = first + (uint32_t)j, c1 = high, c2 = 0, c3 = 0;
        for (int r = 0; r < {philox_numpy.N_ROUNDS}; r++) {{
            uint64_t pa = (uint64_t){PHILOX_ROUND_A}u * c0, pb = (uint64_t){PHILOX_ROUND_B}u * c2;
            uint32_t d0 = (uint32_t)(pb >> 32) ^ c1 ^ ks0[r];
            uint32_t d2 = (uint32_t)(pa >> 32) ^ c3 ^ ks1[r];
            c1 = (uint32_t)pb; c3 = (uint32_t)pa; c0 = d0; c2 = d2;
        }}
        uint32_t folded = c0 >= 0x80000000u ? ~c0 : c0;  /* c0 read as int32 x; x < 0 -> ~x */
        out[j] = folded < below;
    }}
}}
"""
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
_NAME = "fm_keep_run"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the loaded function or None (numpy path); "how": what was loaded


def _compiler() -> list[str] | None:
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


def _build(cc: list[str], where: Path) -> Path:
    """The library for this source, flags, compiler and machine under `where`, compiled unless already there
    (by a temporary name, then renamed: processes building at once each get a whole file)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(where)
    for extra in ([], ["-DFM_NO_CLONES"]):  # a compiler without target_clones builds the plain loop
        flags = FLAGS + extra
        key = "\0".join([SOURCE, *flags, version, platform.machine(), platform.system()])
        lib = where / f"philox-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if lib.exists() or lib.is_symlink():
            return lib  # checked when it is opened (_open_private)
        with tempfile.TemporaryDirectory(dir=where, prefix=".build-") as tmp:
            src, out = Path(tmp) / "philox.c", Path(tmp) / lib.name
            src.write_text(SOURCE)
            done = subprocess.run([*cc, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                os.chmod(out, 0o755)  # not group-writable whatever the umask (_check_private)
                os.replace(out, lib)
                return lib
            error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    raise OSError(f"{' '.join(cc)} failed: {error[0]}")


def _check_private(path: Path, st: os.stat_result | None = None) -> None:
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
        _check_private(lib)
        return ctypes.CDLL(str(lib))
    fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        _check_private(lib, os.fstat(fd))
        # the descriptor stays open: the dynamic loader knows a library by its name, and a later load through a
        # reused /proc/self/fd/N would be handed the library loaded first under that name
        return ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise


def _load() -> tuple[object | None, str]:
    if os.environ.get("FUSEMERGE_NATIVE", "1") == "0":
        return None, "numpy (FUSEMERGE_NATIVE=0)"
    cc = _compiler()
    if cc is None:
        return None, "numpy (no C compiler found; set CC)"
    errors = []
    user = os.getuid() if hasattr(os, "getuid") else 0
    for where in (cache_dir(), Path(tempfile.gettempdir()) / f"fusemerge-{user}"):  # else a private temp dir
        try:
            lib = _build(cc, where)
            fn = getattr(_open_private(lib), _NAME)
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            errors.append(f"{where}: {e}")
            continue
        fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64,
                       ctypes.c_uint32, ctypes.c_void_p]
        fn.restype = None
        if not _agrees(fn):
            return None, f"numpy ({lib} disagreed with numpy's draws)"
        return fn, f"compiled ({lib})"
    return None, "numpy (" + "; ".join(errors) + ")"


def _agrees(fn: object) -> bool:
    """Whether `fn` gives numpy's bits on runs that end just below and start at a multiple of 2^32."""
    for k0, k1, start, n, below in ((0x12345678, 0x9ABCDEF0, (1 << 32) - 700, 700, 1 << 30),
                                    (0xFFFFFFFF, 0, 3 << 32, 999, 123456789), (7, 7, 5, 64, 1 << 31)):
        want = np.empty(n, dtype=np.bool_)
        philox_numpy.keep_run(k0, k1, start, n, below, want)
        got = np.empty(n, dtype=np.bool_)
        _call(fn, k0, k1, start, n, below, got)
        if not np.array_equal(got, want):
            return False
    return True


def _call(fn, k0: int, k1: int, start: int, n: int, below: int, out: np.ndarray) -> None:
    for lo, hi in philox_numpy.same_high_runs(start, n):  # fm_keep_run takes one high word per call
        fn(k0, k1, lo >> 32, lo & _M32, hi - lo, below, out[lo - start:].ctypes.data)


def _function():
    fn = _state.get("fn", False)
    if fn is False:
        with _lock:
            if "fn" not in _state:
                fn, how = _load()
                _state["how"] = how  # before "fn": a thread that sees "fn" finds "how" too
                _state["fn"] = fn
                log.info("DARE keep masks on CPU: %s", _state["how"])
            fn = _state["fn"]
    return fn


def available() -> bool:
    """Whether the compiled keep test is in use (builds and checks it on the first call)."""
    return _function() is not None


def describe() -> str:
    """How this process draws DARE masks on CPU: 'compiled (path)' or 'numpy (why)'."""
    _function()
    return str(_state["how"])


def keep_run(k0: int, k1: int, start: int, n: int, below: int, out: np.ndarray) -> None:
    """philox_numpy.keep_run's bits (DARE's keep test for n consecutive entries from `start`, key words
    (k0, k1), ``below = keep_below(density)``, into the bool array `out`), compiled where available.

    >>> import numpy as np
    >>> a, b = np.empty(100, dtype=np.bool_), np.empty(100, dtype=np.bool_)
    >>> keep_run(1, 2, 2**32 - 50, 100, 2**30, a); philox_numpy.keep_run(1, 2, 2**32 - 50, 100, 2**30, b)
    >>> bool((a == b).all())
    True
    """
    if out.dtype != np.bool_ or out.size < n or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous bool array of at least n entries")
    fn = _function()
    if fn is None or n == 0:
        philox_numpy.keep_run(k0, k1, start, n, below, out)
        return
    _call(fn, k0, k1, start, n, below, out)
