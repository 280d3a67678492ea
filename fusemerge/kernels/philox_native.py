"""DARE's keep test on CPU as compiled code: philox_numpy.keep_run's loop in C, built at first use (and the same
rounds giving tl.rand's float32 draws, `uniform_run`, which DELLA's per-entry test needs).

The CPU merge spends most of a DARE merge drawing Philox 4x32-10 (dare_masks.py). In numpy each of the
~50 element-wise steps of the 10 rounds is its own pass over a uint64 array: 19.5 ns per entry and expert
on the 2-core Xeon VM. The same rounds as one C loop, vectorized by the compiler, take 2.31 ns there
(`python bench/philox_cpu.py`, 2026-12-01, one thread; 1.18 ns in aggregate from two), and a ctypes call
releases the GIL, so the merge's threads draw side by side without the mask worker processes.

The C source below is built at first use as ``native_build`` says (the system's C compiler, a private cache,
three x86-64 levels). The library must reproduce numpy's bits on a sample (both boundary cases of the
counter's high word included) before it is used. Where anything fails (no compiler, a read-only cache and
temp dir, a wrong answer), the numpy path is used, with one note in the log; ``FUSEMERGE_NATIVE=0`` asks for
the numpy path.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from fusemerge.kernels import native_build, philox_numpy
from fusemerge.kernels.philox_numpy import (
    _M32,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
)

# The rounds exactly as philox.py's docstring states them, one entry at a time; the compiler vectorizes the
# loop over entries (8 or 16 lanes of 32x32 -> 64-bit multiplies with AVX2 / AVX-512).
SOURCE = "#include <stdint.h>\n" + native_build.CLONES + f"""

/* Philox4x32-10's round keys for the key (k0, k1). */
static inline void fm_round_keys(uint32_t k0, uint32_t k1, uint32_t *ks0, uint32_t *ks1) {{
    for (int r = 0; r < {philox_numpy.N_ROUNDS}; r++) {{
        ks0[r] = k0; ks1[r] = k1;
        k0 += {PHILOX_KEY_A}u; k1 += {PHILOX_KEY_B}u;
    }}
}}

/* Word c0 of Philox4x32-10 at counter (c0, c1, 0, 0) under the round keys, folded as tl.rand folds it: read as
   int32 x, x < 0 -> ~x (below 2^31). Inlined into each caller's clone. */
static inline uint32_t fm_folded(const uint32_t *ks0, const uint32_t *ks1, uint32_t c0, uint32_t c1) {{
    uint32_t c2 = 0, c3 = 0;
    for (int r = 0; r < {philox_numpy.N_ROUNDS}; r++) {{
        uint64_t pa = (uint64_t){PHILOX_ROUND_A}u * c0, pb = (uint64_t){PHILOX_ROUND_B}u * c2;
        uint32_t d0 = (uint32_t)(pb >> 32) ^ c1 ^ ks0[r];
        uint32_t d2 = (uint32_t)(pa >> 32) ^ c3 ^ ks1[r];
        c1 = (uint32_t)pb; c3 = (uint32_t)pa; c0 = d0; c2 = d2;
    }}
    return c0 >= 0x80000000u ? ~c0 : c0;
}}

/* out[j] = (folded c0 of Philox4x32-10 at counter (first + j, high, 0, 0), key (k0, k1)) < below, for
   j < n; first + n - 1 must not pass 2^32 - 1 (the caller splits runs at multiples of 2^32). */
FM_CLONES void fm_keep_run(uint32_t k0, uint32_t k1, uint32_t high, uint32_t first, int64_t n,
                           uint32_t below, uint8_t *out) {{
    uint32_t ks0[{philox_numpy.N_ROUNDS}], ks1[{philox_numpy.N_ROUNDS}];
    fm_round_keys(k0, k1, ks0, ks1);
    for (int64_t j = 0; j < n; j++)
        out[j] = fm_folded(ks0, ks1, first + (uint32_t)j, high) < below;
}}

/* out[j] = tl.rand's float32 draw at counter (first + j, high, 0, 0): the folded word (below 2^31) converted
   to float32 (round to nearest even), times float32({philox_numpy.UNIFORM_SCALE}) (one rounding: no add to fuse
   it with). DELLA tests each entry against its own probability, so it needs the draws themselves. */
FM_CLONES void fm_uniform_run(uint32_t k0, uint32_t k1, uint32_t high, uint32_t first, int64_t n, float *out) {{
    uint32_t ks0[{philox_numpy.N_ROUNDS}], ks1[{philox_numpy.N_ROUNDS}];
    fm_round_keys(k0, k1, ks0, ks1);
    for (int64_t j = 0; j < n; j++)
        out[j] = (float)(int32_t)fm_folded(ks0, ks1, first + (uint32_t)j, high) * {philox_numpy.UNIFORM_SCALE}f;
}}
"""
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
_NAME = "fm_keep_run"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "obj": the loaded function or None (numpy path); "how": what was loaded


def _load() -> tuple[object | None, str]:
    if native_build.disabled():
        return None, "numpy (FUSEMERGE_NATIVE=0)"
    lib, where = native_build.load("philox", SOURCE, FLAGS)
    fn = getattr(lib, _NAME, None) if lib is not None else None
    if fn is None:
        return None, f"numpy ({where})"
    fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64,
                   ctypes.c_uint32, ctypes.c_void_p]
    fn.restype = None
    if not _agrees(fn):
        return None, f"numpy ({where} disagreed with numpy's draws)"
    return fn, f"compiled ({where})"


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
    return native_build.loaded(_state, _lock, _load, "DARE keep masks on CPU")


_ustate: dict[str, object] = {}


def _load_uniform() -> tuple[object | None, str]:
    if native_build.disabled():
        return None, "numpy (FUSEMERGE_NATIVE=0)"
    lib, where = native_build.load("philox", SOURCE, FLAGS)
    fn = getattr(lib, "fm_uniform_run", None) if lib is not None else None
    if fn is None:
        return None, f"numpy ({where})"
    fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = None
    from fusemerge.kernels.philox import _uniform_numpy

    for k0, k1, start, n in ((0x12345678, 0x9ABCDEF0, (1 << 32) - 700, 700), (0xFFFFFFFF, 0, 3 << 32, 999),
                             (7, 7, 5, 4096)):
        got = np.empty(n, dtype=np.float32)
        _call_uniform(fn, k0, k1, start, n, got)
        want = _uniform_numpy(k0, k1, np.arange(start, start + n, dtype=np.int64))
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            return None, f"numpy ({where} disagreed with numpy's draws)"
    return fn, f"compiled ({where})"


def _call_uniform(fn, k0: int, k1: int, start: int, n: int, out: np.ndarray) -> None:
    for lo, hi in philox_numpy.same_high_runs(start, n):
        fn(k0, k1, lo >> 32, lo & _M32, hi - lo, out[lo - start:].ctypes.data)


def uniform_run(k0: int, k1: int, start: int, n: int) -> np.ndarray | None:
    """tl.rand's float32 draws for the n consecutive counters from `start` (key words k0, k1), compiled; None where
    the compiled loop is not in use (the caller takes numpy's, philox._uniform_numpy, the same bits)."""
    fn = native_build.loaded(_ustate, _lock, _load_uniform, "Philox draws on CPU")
    if fn is None:
        return None
    out = np.empty(n, dtype=np.float32)
    if n:
        _call_uniform(fn, k0, k1, start, n, out)
    return out


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
