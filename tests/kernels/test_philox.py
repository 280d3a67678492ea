"""philox_rand == triton.language.rand, bit for bit, and == Philox 4x32-10 from the algorithm."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fusemerge.kernels import philox
from fusemerge.kernels.philox import dare_keep, dare_key, philox_rand

KEYS = [0, 1, -1, 7, 2**31 - 1, 2**31 + 5, 2**32 + 3, -(2**31) - 9, 2**62 + 11, -(2**63), 2**63 - 1,
        dare_key(0, "model.layers.0.self_attn.q_proj.weight", 0),
        dare_key(1234, "lm_head.weight", 7)]


def _offsets(count: int, seed: int) -> torch.Tensor:
    """A mix of small, around-2^32 and large offsets, `count` of them (odd counts included)."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.arange(0, 37),
        torch.arange(2**31 - 5, 2**31 + 5),
        torch.arange(2**32 - 7, 2**32 + 8),
        torch.randint(0, 2**62, (max(0, count - 72),), generator=g),
        torch.tensor([2**63 - 1, 2**40 + 1, 2**33]),
    ]
    return torch.cat(parts)[:count].to(torch.int64)


@triton.jit
def _rand_kernel(key_ptr, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = tl.load(key_ptr)
    j = tl.load(off_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.rand(key, j), mask=mask)


@triton.jit
def _rand_scalar_seed_kernel(seed, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = tl.load(off_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.rand(seed, j), mask=mask)


def _triton_rand(key: int, offsets: torch.Tensor, scalar_seed: bool = False) -> torch.Tensor:
    out = torch.empty(offsets.numel(), dtype=torch.float32, device=offsets.device)
    block = 256
    grid = (triton.cdiv(offsets.numel(), block),)
    if scalar_seed:
        _rand_scalar_seed_kernel[grid](key, offsets, out, offsets.numel(), BLOCK=block, enable_fp_fusion=False)
    else:
        keys = torch.tensor([key], dtype=torch.int64, device=offsets.device)
        _rand_kernel[grid](keys, offsets, out, offsets.numel(), BLOCK=block, enable_fp_fusion=False)
    return out


def _philox_reference(key: int, counter: int) -> float:
    """Philox 4x32-10 (Salmon et al. 2011; Random123 philox4x32) for one counter, then tl.rand's mapping."""
    m32 = 0xFFFFFFFF
    key &= (1 << 64) - 1
    k = [key & m32, key >> 32]
    c = [counter & m32, (counter >> 32) & m32, 0, 0]
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & m32, (k[1] + 0xBB67AE85) & m32]
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & m32, (p0 >> 32) ^ c[3] ^ k[1], p0 & m32]
    x = c[0] - (1 << 32) if c[0] >= (1 << 31) else c[0]  # the word as int32
    if x < 0:
        x = ~x
    return float(np.float32(x) * np.float32(4.6566127342e-10))


@pytest.mark.parametrize("count", [1, 7, 101, 1000])
@pytest.mark.parametrize("key", KEYS)
def test_matches_triton_rand(key: int, count: int, device: str) -> None:
    offsets = _offsets(count, seed=count).to(device)
    got = philox_rand(key, offsets)
    want = _triton_rand(key, offsets)
    assert got.dtype == torch.float32 and got.shape == offsets.shape and got.device == offsets.device
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("key", [0, -5, 2**31 + 5, -(2**40), 2**62 + 11])
def test_matches_triton_rand_with_scalar_seed(key: int, device: str) -> None:
    """A key passed as a kernel scalar (i32 or i64 argument) gives the same stream as an int64 load."""
    offsets = _offsets(301, seed=1).to(device)
    want = _triton_rand(key, offsets, scalar_seed=True)
    assert torch.equal(philox_rand(key, offsets).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("key", [0, -1, 2**31 + 5, -(2**63), dare_key(3, "w", 2)])
def test_matches_pure_python_philox(key: int) -> None:
    offsets = _offsets(97, seed=5)
    got = philox_rand(key, offsets)
    want = torch.tensor([_philox_reference(key, int(j)) for j in offsets], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_known_values() -> None:
    """Pinned draws: a change here changes every DARE merge ever made (bump the key domain instead)."""
    key = dare_key(0, "model.embed_tokens.weight", 0)
    u = philox_rand(key, torch.tensor([0, 1, 2**32 + 1]))
    want = [_philox_reference(key, j) for j in (0, 1, 2**32 + 1)]
    assert u.tolist() == want


def test_numpy_and_torch_paths_agree() -> None:
    """The CPU (numpy) and the other-device (torch) implementations give the same bits, across chunks."""
    offsets = torch.cat([torch.arange(0, 3000), torch.arange(2**32 - 100, 2**32 + 100)])
    for key in (0, -1, 2**63 - 1, dare_key(9, "x", 1)):
        k0, k1 = philox._split_key(key)
        a = torch.from_numpy(philox._uniform_numpy(k0, k1, offsets.numpy()))
        b = philox._uniform_torch(k0, k1, offsets, chunk=1000)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_chunking_and_shape_do_not_matter() -> None:
    key = dare_key(7, "t", 3)
    offsets = torch.arange(5, 5 + 3 * 40000, dtype=torch.int64)
    whole = philox_rand(key, offsets)
    parts = torch.cat([philox_rand(key, offsets[i:i + 777]) for i in range(0, offsets.numel(), 777)])
    assert torch.equal(whole, parts)
    assert torch.equal(philox_rand(key, offsets.view(3, -1)).view(-1), whole)
    assert philox_rand(key, torch.empty(0, dtype=torch.int64)).numel() == 0


def test_uniform_range_and_mean() -> None:
    u = philox_rand(dare_key(0, "w", 0), torch.arange(200_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.double().mean()) - 0.5) < 0.005


def test_dare_keep() -> None:
    key = dare_key(0, "w", 1)
    offsets = torch.arange(10_000, 60_000)
    u = philox_rand(key, offsets)
    for density in (0.1, 0.5, 0.9, 1.0):
        keep = dare_keep(key, offsets, density)
        assert keep.dtype == torch.bool
        assert torch.equal(keep, u < torch.tensor(density, dtype=torch.float32))
        assert abs(float(keep.double().mean()) - density) < 0.01
    assert bool(dare_keep(key, offsets, 1.0).all())
    # the compare is in float32: a density that rounds up in float32 keeps what float32(density) keeps
    d = float(np.nextafter(np.float32(0.3), np.float32(1.0))) - 1e-12
    assert torch.equal(dare_keep(key, offsets, d), u < torch.tensor(d, dtype=torch.float32))


def test_dare_key_is_the_documented_hash() -> None:
    for seed, name, i in [(0, "model.layers.0.mlp.up_proj.weight", 0), (2**40, "lm_head.weight", 15), (-3, "", 2)]:
        msg = f"fusemerge-dare-v1\0{seed}\0{name}\0{i}".encode()
        raw = int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little")
        key = dare_key(seed, name, i)
        assert -(2**63) <= key < 2**63
        assert key % 2**64 == raw
    assert dare_key(0, "a", 0) != dare_key(0, "a", 1) != dare_key(1, "a", 1)
    assert dare_key(0, "a.b", 0) != dare_key(0, "a", 0)


def test_rejects_keys_wider_than_64_bits() -> None:
    with pytest.raises(ValueError):
        philox_rand(2**64, torch.arange(3))
    with pytest.raises(ValueError):
        philox_rand(-(2**63) - 1, torch.arange(3))


def _u(x: np.ndarray) -> np.ndarray:
    """tl.rand's mapping of folded words x in [0, 2^31) to float32 in [0, 1)."""
    return x.astype(np.int32).astype(np.float32) * np.float32(philox.UNIFORM_SCALE)


@pytest.mark.parametrize("density", [1e-9, 0.1, 0.2, 1 / 3, 0.5, 0.9, 0.999999, float(np.float32(0.7))])
def test_keep_below_is_the_exact_integer_form_of_the_float_test(density: float) -> None:
    below = philox.keep_below(density)
    d = np.float32(density)
    near = np.arange(max(0, below - 600), min(2**31, below + 600), dtype=np.int64)
    assert np.array_equal(_u(near) < d, near < below)
    g = np.random.default_rng(int(below))
    anywhere = g.integers(0, 2**31, 100_000)
    assert np.array_equal(_u(anywhere) < d, anywhere < below)
    # a density equal to one of the draws: that draw itself is not kept
    exact = float(_u(np.array([below]))[0])
    assert philox.keep_below(exact) == int(np.flatnonzero(_u(near) >= np.float32(exact))[0] + near[0])


def test_keep_below_extremes() -> None:
    assert philox.keep_below(1.0) == 2**31 and philox.keep_below(2.0) == 2**31
    for nothing in (0.0, -0.5, float("nan")):
        assert philox.keep_below(nothing) == 0


@pytest.mark.parametrize("start,n", [(0, 1), (0, 40_000), (12_345, 777), (2**32 - 5_000, 10_000),
                                     (3 * 2**32 - 1, 2), (2**45 + 3, 33_333), (2**63 - 100, 100)])
@pytest.mark.parametrize("key", [0, -1, 2**63 - 1, dare_key(5, "model.embed_tokens.weight", 3)])
def test_dare_keep_run_equals_dare_keep(key: int, start: int, n: int) -> None:
    offsets = torch.tensor([start + j for j in range(n)], dtype=torch.int64)  # no arange overflow near 2^63
    u = philox_rand(key, offsets)
    for density in (0.0, 1e-6, 0.2, 0.55, 1.0, float("nan")):
        got = philox.dare_keep_run(key, start, n, density)
        assert got.dtype == torch.bool and got.shape == (n,)
        assert torch.equal(got, dare_keep(key, offsets, density)), density
        assert torch.equal(got, u < torch.tensor(density, dtype=torch.float32))


def test_dare_keep_run_rejects_entries_outside_the_stream() -> None:
    for start, n in [(-1, 3), (2**63 - 2, 3), (0, -1)]:
        with pytest.raises(ValueError, match="outside"):
            philox.dare_keep_run(1, start, n, 0.5)
    assert philox.dare_keep_run(1, 7, 0, 0.5).numel() == 0
