"""triton_rand.uniform_run == philox.philox_rand over the same run of indices, bit for bit, on the kernels'
device (CUDA, or CPU through the interpreter); and the CUDA paths of philox_rand_run / dare_keep_run."""

from __future__ import annotations

import pytest
import torch

from fusemerge.kernels import triton_rand
from fusemerge.kernels.philox import dare_keep, dare_keep_run, dare_key, philox_rand, philox_rand_run

from .conftest import DEVICE

KEYS = [0, -1, 7, 2**31 + 5, -(2**31) - 9, 2**63 - 1, 2**64 - 2, dare_key(3, "model.embed_tokens.weight", 5)]
# (start, n): a partial block, block multiples +- 1, runs across 2^31 and 2^32, a large start, up to 2^63 - 2
RUNS = [(0, 1), (0, triton_rand.BLOCK), (5, 3 * triton_rand.BLOCK + 1), (2**31 - 700, 1500), (2**32 - 3, 9),
        (2**40 + 17, 2049), (2**63 - 101, 100)]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("start", "n"), RUNS)
def test_uniforms_are_the_stream_of_philox_rand(key, start, n):
    got = triton_rand.uniform_run(key, start, n, DEVICE)
    want = philox_rand(key, torch.arange(start, start + n, dtype=torch.int64))
    assert got.dtype == torch.float32 and got.device.type == torch.device(DEVICE).type
    assert torch.equal(got.cpu(), want)


def test_uniforms_are_fresh_numbers_in_the_unit_interval():
    # a poisoned buffer cannot pass: every entry is written, and differs between keys
    n = 5 * triton_rand.BLOCK + 3
    a = triton_rand.uniform_run(11, 0, n, DEVICE).cpu()
    b = triton_rand.uniform_run(12, 0, n, DEVICE).cpu()
    assert bool(((a >= 0) & (a < 1)).all()) and not torch.equal(a, b)
    assert 0.45 < float(a.mean()) < 0.55


def test_empty_run_and_refusals():
    assert triton_rand.uniform_run(1, 10, 0, DEVICE).numel() == 0
    with pytest.raises(ValueError, match="outside"):
        triton_rand.uniform_run(1, -1, 4, DEVICE)
    with pytest.raises(ValueError, match="outside"):
        triton_rand.uniform_run(1, 2**63 - 2, 4, DEVICE)
    with pytest.raises(ValueError, match="64 bits"):
        triton_rand.uniform_run(2**64, 0, 4, DEVICE)


@pytest.mark.skipif(DEVICE != "cuda", reason="philox_rand_run's CUDA branch (on CPU it takes the compiled loop)")
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_cuda_runs_and_masks_match_the_cpu(density):
    key, start, n = dare_key(9, "w", 1), 2**32 - 5000, 10_000
    u = philox_rand_run(key, start, n, "cuda")
    assert u.device.type == "cuda" and torch.equal(u.cpu(), philox_rand_run(key, start, n))
    keep = dare_keep_run(key, start, n, density, "cuda")
    want = dare_keep(key, torch.arange(start, start + n), density)
    assert keep.device.type == "cuda" and torch.equal(keep.cpu(), want)
