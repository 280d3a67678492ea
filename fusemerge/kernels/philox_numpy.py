"""DARE's keep test in numpy alone: Philox 4x32-10 (as ``tl.rand``) on runs of consecutive entries.

This module imports nothing but numpy (and the standard library), so it also runs as a script: the CPU
merge starts it as worker processes (``python philox_numpy.py``, about 14 MB and 0.05 s each, against
140 MB and 0.8 s for anything that imports torch) that draw keep masks for the merge's threads. Those
draws are ~50 short numpy calls per 16K entries, and two threads of one process serialize on the GIL
between them: on a 2-core Xeon, 2^22 entries took 18.1 ns per entry in one thread and 16.7 ns per entry
in aggregate from two (2026-12-01). The protocol of `serve`: the worker first writes READY; then a
request is five little-endian int64 (k0, k1, start, n, below), the answer the n keep bits,
``np.packbits(..., bitorder="little")``.
See fusemerge.kernels.philox for the stream itself and how the rounds map onto array operations.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

# Philox 4x32 multipliers and Weyl key increments (Salmon et al., SC'11; Triton's PHILOX_ROUND_A/B, KEY_A/B).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
# tl.rand's default number of rounds: 10 is Random123's recommended (crush-resistant) count.
N_ROUNDS = 10
# tl.rand's int32 -> [0, 1) scale: the largest float32 s with (2^31 - 1) * s < 1 after rounding.
UNIFORM_SCALE = 4.6566127342e-10
_M32 = 0xFFFFFFFF
# Elements per pass on CPU: [2, 2^14] uint64 arrays (256 KiB each, 3 of them) keep the 50 element-wise
# ops of the 10 rounds in a core's L2 instead of streaming every op through DRAM. 2^15 measured 9% slower
# for dare_keep_run and 4% for philox_rand (2^18 entries, Xeon 2 cores with 2 MiB of L2 each, 2026-12-01).
_CHUNK_NUMPY = 1 << 14


def philox_round(p: np.ndarray, q: np.ndarray, prod: np.ndarray, mult: np.ndarray, key: np.ndarray) -> np.ndarray:
    """One Philox round on uint64 [2, m] arrays holding 32-bit words: p = [c0, c2] (the multiplied words),
    q = [c3, c1], mult = [[A], [B]], key = [[k1], [k0]]; `prod` is scratch. The round is

        prod = p * [A, B];  t = hi(prod) ^ q ^ [k1, k0];  q' = lo(prod);  p' = [t[1], t[0]]

    which is c0' = hi(B c2) ^ c1 ^ k0, c2' = hi(A c0) ^ c3 ^ k1, c1' = lo(B c2), c3' = lo(A c0): five
    vectorized calls. q is updated in place; returns p' (a reversed view of p's buffer).
    """
    np.multiply(p, mult, out=prod)
    np.right_shift(prod, 32, out=p)
    np.bitwise_xor(p, q, out=p)
    np.bitwise_xor(p, key, out=p)
    np.bitwise_and(prod, _M32, out=q)
    return p[::-1]


def keep_below(density: float) -> int:
    """The integer form of DARE's test: ``u(x) < float32(density)`` exactly when ``x < keep_below(density)``.

    ``x`` is the folded word (c0 read as int32, ``~x`` when negative, so ``0 <= x < 2^31``) and
    ``u(x) = float32(x) * float32(UNIFORM_SCALE)``. Both roundings are monotone, so ``u`` never decreases
    with ``x`` and the kept words are exactly those below the first ``x`` whose ``u`` reaches the density,
    found here by bisection with the same float32 operations as tl.rand. 0 keeps nothing (also for a NaN
    or non-positive density), 2^31 keeps everything (density > the largest draw, e.g. 1.0).

    >>> keep_below(1.0), keep_below(0.0)
    (2147483648, 0)
    """
    d = np.float32(density)
    if not d > 0:
        return 0
    scale = np.float32(UNIFORM_SCALE)

    def u(x: int) -> np.float32:
        return np.array([x], dtype=np.int32).astype(np.float32)[0] * scale

    lo, hi = 0, 1 << 31  # u(lo - 1) < d (or lo == 0); u(hi) >= d (or hi == 2^31)
    while lo < hi:
        mid = (lo + hi) // 2
        if u(mid) < d:
            lo = mid + 1
        else:
            hi = mid
    return lo


def keep_run(k0: int, k1: int, start: int, n: int, below: int, out: np.ndarray) -> None:
    """out[j] = (folded c0 of counter start + j) < below: DARE's keep test for n consecutive entries, key
    words (k0, k1), ``below = keep_below(density)``; ``out`` a bool array of n entries."""
    for lo, hi in same_high_runs(start, n):
        _keep_run_same_high(k0, k1, lo, hi - lo, below, out[lo - start:hi - start])


def same_high_runs(start: int, n: int):
    """[lo, hi) pieces of [start, start + n) that do not cross a multiple of 2^32: each shares its counters'
    high word (c1)."""
    lo = start
    while lo < start + n:
        hi = min(start + n, ((lo >> 32) + 1) << 32)
        yield lo, hi
        lo = hi


def _keep_run_same_high(k0: int, k1: int, start: int, n: int, below: int, out: np.ndarray) -> None:
    """out[j] = (folded c0 of counter start + j) < below, for a run whose offsets share their high word.

    The counter's high words start as constants (c1 = the offsets' common high word, c2 = c3 = 0), so the
    first two rounds need one multiplied row each instead of two, and the draw is tested as an integer
    (keep_below): 9.6 of the 10 rounds' vector work, no float conversion.
    """
    m = min(n, _CHUNK_NUMPY)
    p_buf = np.empty((2, m), dtype=np.uint64)
    q_buf = np.empty((2, m), dtype=np.uint64)
    prod_buf = np.empty((2, m), dtype=np.uint64)
    mult = np.array([[PHILOX_ROUND_A], [PHILOX_ROUND_B]], dtype=np.uint64)
    h = start >> 32
    k0b, k1b = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    s0 = h ^ k0  # round 1: c0' = hi(B * 0) ^ c1 ^ k0, a constant; c1' = lo(B * 0) = 0
    a_s0 = PHILOX_ROUND_A * s0
    c2_const = (a_s0 >> 32) ^ k1b  # round 2: c2'' = hi(A c0') ^ c3' ^ k1b, c3'' = lo(A c0'): constants
    c3_const = a_s0 & _M32
    keys = []
    r0, r1 = k0b, k1b
    for _ in range(N_ROUNDS - 2):
        r0, r1 = (r0 + PHILOX_KEY_A) & _M32, (r1 + PHILOX_KEY_B) & _M32
        keys.append(np.array([[r1], [r0]], dtype=np.uint64))
    for lo in range(0, n, m):
        w = min(m, n - lo)
        p, q, prod = p_buf[:, :w], q_buf[:, :w], prod_buf[:, :w]
        first = (start + lo) & _M32
        np.multiply(np.arange(first, first + w, dtype=np.uint64), PHILOX_ROUND_A, out=prod[0])  # A * c0
        np.right_shift(prod[0], 32, out=p[1])  # c2' = hi(A c0) ^ c3 ^ k1, c3 = 0
        np.bitwise_xor(p[1], k1, out=p[1])
        np.bitwise_and(prod[0], _M32, out=q[0])  # c3' = lo(A c0)
        np.multiply(p[1], PHILOX_ROUND_B, out=prod[1])  # round 2: B * c2'
        np.right_shift(prod[1], 32, out=p[0])  # c0'' = hi(B c2') ^ c1' ^ k0b, c1' = 0
        np.bitwise_xor(p[0], k0b, out=p[0])
        np.bitwise_and(prod[1], _M32, out=q[1])  # c1'' = lo(B c2')
        np.bitwise_xor(q[0], c2_const, out=p[1])  # c2'' = c3' ^ hi(A c0') ^ k1b
        q[0] = c3_const  # c3''
        for key in keys:  # rounds 3..10
            p = philox_round(p, q, prod, mult, key)
        x = prod[0]  # fold: min(w, ~w) is w below 2^31 and ~w (as 32 bits) above
        np.bitwise_xor(p[0], _M32, out=x)
        np.minimum(p[0], x, out=x)
        np.less(x, below, out=out[lo:lo + w])


# The worker protocol (see the module docstring): one request, then its answer.
REQUEST = struct.Struct("<5q")  # k0, k1, start, n, below
READY = b"R"  # written once at start, after numpy imported


def serve(requests, answers) -> None:
    """Say READY on `answers`, then answer keep-mask requests from the binary stream `requests` until end of
    input."""
    answers.write(READY)
    answers.flush()
    while True:
        head = requests.read(REQUEST.size)
        if len(head) < REQUEST.size:
            return
        k0, k1, start, n, below = REQUEST.unpack(head)
        out = np.empty(n, dtype=np.bool_)
        keep_run(k0, k1, start, n, below, out)
        answers.write(np.packbits(out, bitorder="little").tobytes())
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
