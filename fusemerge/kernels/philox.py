"""DARE's random stream: Philox 4x32-10 on CPU (numpy) and any torch device, bit-identical to ``tl.rand``.

The draw for entry ``j`` (global flat index inside the tensor) of expert ``i`` in tensor ``T`` is

    u = rand(dare_key(seed, T, i), j)        kept iff u < float32(density_i)

where ``rand`` is ``tl.rand(key, j)`` with ``j`` an int64 offset and the default 10 rounds. Because the
stream is counter based, the mask depends on nothing but (seed, tensor name, expert index, j): not on
the chunking, the block size, the device, the thread count or the backend. The CPU path below reproduces
the GPU kernels' stream bit for bit (tests/kernels/test_philox.py checks it against Triton itself and
against a pure-Python Philox written from the algorithm).

What ``tl.rand(key, offset)`` computes (triton/language/random.py, Triton 3.x):

- the key is reinterpreted as uint64 and split into two 32-bit key words ``k0 = key & 0xFFFFFFFF``,
  ``k1 = key >> 32``;
- the counter is ``(c0, c1, c2, c3) = (offset & 0xFFFFFFFF, offset >> 32, 0, 0)``;
- 10 Philox rounds: ``c0' = hi(B*c2) ^ c1 ^ k0``, ``c2' = hi(A*c0) ^ c3 ^ k1``, ``c1' = lo(B*c2)``,
  ``c3' = lo(A*c0)``, then ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85`` (mod 2^32), with
  ``A = 0xD2511F53`` and ``B = 0xCD9E8D57``;
- the result word ``c0`` is read as int32 ``x``; ``x < 0 -> ~x``; ``u = float32(x) * float32(4.6566127342e-10)``
  (the int32 -> float32 conversion rounds to nearest even), so ``0 <= u < 1``.

Implementation. On CPU the rounds run in numpy uint64 (one multiply gives the exact 64-bit product
of two uint32 words; logical shifts need no masking), with the two multiplied words (c0, c2) kept in
one [2, n] array so each round is 5 vectorized calls: multiply, shift, 2 xors, and. NumPy's loops are
single-threaded, release the GIL and do not suffer from OpenMP oversubscription the way torch's
intra-op threads do on a busy machine (measured here: 65536-element int64 ops took 12-40 us with one
torch thread, up to 3 ms with two contended ones). On other devices the same algorithm runs in
torch int64 tensors (uint32 values; the int64 product wraps past the sign but its 64 bits are
exact, so ``(p >> 32) & 0xFFFFFFFF`` and ``p & 0xFFFFFFFF`` are the high and low words). Both work
in chunks with preallocated buffers. Measured on a 2-core CPU (idle): about 27 ns per element per
expert, single-threaded; the GPU merge kernel draws its own numbers with tl.rand instead.

The CPU merge does not need the floats, only DARE's keep test, on runs of consecutive entries:
``dare_keep_run`` starts from the counter's constant words (the first two rounds multiply one row, not
two) and tests the drawn word as an integer (``keep_below``), about 19 ns per entry and expert, the same
bits; ``philox_native`` compiles the same test as one C loop (2.31 ns, ``python bench/philox_cpu.py``)
where a C compiler is found.
``dare_masks.KeepMasks`` keeps the masks a tensor's L1 statistics pass draws, bit-packed, for its merge
pass, so a CPU DARE merge with the default rescale draws each mask once instead of twice, and, where the
test is not compiled, ``dare_masks.MaskWorkers`` draws them in worker processes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fusemerge.kernels.philox_native import keep_run, uniform_run
from fusemerge.kernels.philox_numpy import (  # noqa: F401 (constants re-exported)
    _CHUNK_NUMPY,
    _M32,
    N_ROUNDS,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    UNIFORM_SCALE,
    keep_below,
    philox_round,
)

# Elements per pass on other devices (GPUs): large, since every op is a kernel launch (~120 per pass);
# five 2^22 int64 buffers are 160 MiB.
_CHUNK_TORCH = 1 << 22
# Versioned domain string: changing the key derivation must change this prefix (and the docs).
_KEY_DOMAIN = "fusemerge-dare-v1"


def dare_key(seed: int, tensor_name: str, expert_index: int) -> int:
    """The documented 64-bit Philox key of DARE's stream for one (seed, tensor, expert).

    ``key = int.from_bytes(blake2b(f"fusemerge-dare-v1\\0{seed}\\0{tensor_name}\\0{expert_index}".encode(),
    digest_size=8).digest(), "little")``, returned as a signed int64 (``key - 2**64`` when ``key >= 2**63``)
    so it can live in an int64 tensor; Triton reinterprets it as uint64, so both spellings give the same
    stream. ``expert_index`` is 0-based in ``models:`` order, the base model excluded.

    >>> dare_key(0, "model.layers.0.mlp.down_proj.weight", 0) == dare_key(0, "model.layers.0.mlp.down_proj.weight", 0)
    True
    """
    msg = f"{_KEY_DOMAIN}\0{seed}\0{tensor_name}\0{expert_index}".encode()
    key = int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little")
    return key - (1 << 64) if key >= (1 << 63) else key


def _split_key(key: int) -> tuple[int, int]:
    if not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"Philox key {key} does not fit in 64 bits")
    key &= (1 << 64) - 1
    return key & _M32, key >> 32


def _uniform_numpy(k0: int, k1: int, offsets: np.ndarray) -> np.ndarray:
    """tl.rand for int64 offsets: Philox4x32-10((lo, hi, 0, 0), (k0, k1)) word c0 -> float32 in [0, 1)."""
    n = offsets.size
    out = np.empty(n, dtype=np.float32)
    m = min(n, _CHUNK_NUMPY)
    # p = [c0, c2] (the multiplied words), q = [c3, c1]: see philox_numpy.philox_round
    mult = np.array([[PHILOX_ROUND_A], [PHILOX_ROUND_B]], dtype=np.uint64)
    p_buf = np.empty((2, m), dtype=np.uint64)
    q_buf = np.empty((2, m), dtype=np.uint64)
    prod_buf = np.empty((2, m), dtype=np.uint64)
    u64 = offsets.view(np.uint64)
    for lo in range(0, n, m):
        hi = min(n, lo + m)
        w = hi - lo
        p, q, prod = p_buf[:, :w], q_buf[:, :w], prod_buf[:, :w]
        np.bitwise_and(u64[lo:hi], _M32, out=p[0])
        p[1] = 0
        q[0] = 0
        np.right_shift(u64[lo:hi], 32, out=q[1])
        r0, r1 = k0, k1
        for _ in range(N_ROUNDS):
            p = philox_round(p, q, prod, mult, np.array([[r1], [r0]], dtype=np.uint64))
            r0 = (r0 + PHILOX_KEY_A) & _M32
            r1 = (r1 + PHILOX_KEY_B) & _M32
        out[lo:hi] = _to_uniform_numpy(p[0])
    return out


def _to_uniform_numpy(w: np.ndarray) -> np.ndarray:
    # c0 read as int32 x, x < 0 -> ~x: for the uint32 word w that is w if w < 2^31 else w ^ 0xFFFFFFFF.
    x = np.where(w >= (1 << 31), w ^ np.uint64(_M32), w).astype(np.int32)
    return x.astype(np.float32) * np.float32(UNIFORM_SCALE)


def _uniform_torch(k0: int, k1: int, offsets: torch.Tensor, chunk: int = _CHUNK_TORCH) -> torch.Tensor:
    """The same as _uniform_numpy on any torch device (int64 tensors holding uint32 words)."""
    n = offsets.numel()
    out = torch.empty(n, dtype=torch.float32, device=offsets.device)
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=offsets.device)
    m = min(n, chunk)
    bufs = [torch.empty(m, dtype=torch.int64, device=offsets.device) for _ in range(5)]
    for lo in range(0, n, m):
        hi = min(n, lo + m)
        c0, c1, c2, c3, p = (b[: hi - lo] for b in bufs)
        torch.bitwise_and(offsets[lo:hi], _M32, out=c0)
        torch.bitwise_right_shift(offsets[lo:hi], 32, out=c1)
        c1.bitwise_and_(_M32)
        c2.zero_()
        c3.zero_()
        r0, r1 = k0, k1
        for _ in range(N_ROUNDS):
            torch.mul(c0, PHILOX_ROUND_A, out=p)  # A*c0; the old c0 is dead after this
            torch.mul(c2, PHILOX_ROUND_B, out=c0)  # B*c2 parks in c0's buffer
            torch.bitwise_right_shift(p, 32, out=c2)  # c2' = hi(A c0) ^ c3 ^ k1 (c3 read before replaced)
            c2.bitwise_xor_(c3).bitwise_xor_(r1).bitwise_and_(_M32)
            torch.bitwise_and(p, _M32, out=c3)  # c3' = lo(A c0)
            torch.bitwise_right_shift(c0, 32, out=p)  # c0' = hi(B c2) ^ c1 ^ k0 (c1 read before replaced)
            p.bitwise_xor_(c1).bitwise_xor_(r0).bitwise_and_(_M32)
            torch.bitwise_and(c0, _M32, out=c1)  # c1' = lo(B c2)
            c0, p = p, c0
            r0 = (r0 + PHILOX_KEY_A) & _M32
            r1 = (r1 + PHILOX_KEY_B) & _M32
        x = torch.where(c0 >= (1 << 31), c0 ^ _M32, c0).to(torch.int32)
        torch.mul(x.to(torch.float32), scale, out=out[lo:hi])
    return out


def dare_keep_run(key: int, start: int, n: int, density: float, device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """DARE's keep mask for the ``n`` entries starting at global index ``start``: the same bits as
    ``dare_keep(key, torch.arange(start, start + n), density)``, faster on CPU (compiled where a C compiler
    is found, philox_native.keep_run, else philox_numpy.keep_run).

    >>> import torch
    >>> key = dare_key(0, "w", 0)
    >>> torch.equal(dare_keep_run(key, 5, 1000, 0.3), dare_keep(key, torch.arange(5, 1005), 0.3))
    True
    """
    if start < 0 or n < 0 or start + n > (1 << 63):
        raise ValueError(f"entries [{start}, {start + n}) are outside [0, 2^63)")
    if torch.device(device).type != "cpu":
        u = philox_rand_run(key, start, n, device)
        return u < torch.tensor(density, dtype=torch.float32, device=u.device)
    k0, k1 = _split_key(key)
    out = np.empty(n, dtype=np.bool_)
    keep_run(k0, k1, start, n, keep_below(density), out)
    return torch.from_numpy(out)


def philox_rand(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 draws in [0, 1), bit-identical to ``tl.rand(key, offsets)`` with int64 offsets.

    ``key`` is any 64-bit integer (signed or unsigned spelling); ``offsets`` an integer tensor of global
    flat indices (converted to int64; each must be in [0, 2^63)). Returns a float32 tensor of the same
    shape on the same device.

    >>> import torch
    >>> u = philox_rand(dare_key(0, "w", 0), torch.arange(5))
    >>> bool(((u >= 0) & (u < 1)).all())
    True
    """
    k0, k1 = _split_key(key)
    flat = offsets.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() == 0:
        return torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    if flat.device.type == "cpu":
        u = torch.from_numpy(_uniform_numpy(k0, k1, flat.numpy()))
    else:
        u = _uniform_torch(k0, k1, flat)
    return u.reshape(offsets.shape)


def philox_rand_run(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``philox_rand(key, torch.arange(start, start + n))``: on CPU by the compiled loop where a C compiler is
    found (philox_native.uniform_run, about 10x numpy's speed), on CUDA by one Triton launch
    (triton_rand.uniform_run), else as philox_rand.

    >>> import torch
    >>> key = dare_key(0, "w", 0)
    >>> torch.equal(philox_rand_run(key, 2**32 - 3, 9), philox_rand(key, torch.arange(2**32 - 3, 2**32 + 6)))
    True
    """
    if start < 0 or n < 0 or start + n > (1 << 63):
        raise ValueError(f"entries [{start}, {start + n}) are outside [0, 2^63)")
    if torch.device(device).type == "cpu":
        k0, k1 = _split_key(key)
        u = uniform_run(k0, k1, start, n)
        if u is not None:
            return torch.from_numpy(u)
    elif torch.device(device).type == "cuda":
        from fusemerge.kernels.triton_rand import uniform_run as uniform_run_cuda

        return uniform_run_cuda(key, start, n, device)
    return philox_rand(key, torch.arange(start, start + n, dtype=torch.int64, device=device))


def dare_keep(key: int, offsets: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's keep mask: ``philox_rand(key, offsets) < float32(density)`` (bool, same shape as offsets).

    >>> import torch
    >>> bool(dare_keep(dare_key(0, "w", 0), torch.arange(10), 1.0).all())
    True
    """
    u = philox_rand(key, offsets)
    return u < torch.tensor(density, dtype=torch.float32, device=u.device)
