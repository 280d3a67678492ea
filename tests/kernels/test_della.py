"""DELLA (kernels/della.py): its keep masks and merges against the float64 oracle (mergekit's della_magprune with
DARE's stream as its draws), on fresh random data, every backend and chunking; the rank rule's edges; what the
drop does on average; and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.errors import InputError
from fusemerge.kernels.della import aligned_chunk, della_keep, rank_layout
from fusemerge.kernels.philox import dare_key, philox_rand
from tests import oracle
from tests.kernels.conftest import on_kernels
from tests.kernels.test_reference import ulp

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(33, 40), (7,), (5, 6, 7), (1,), (9, 1)]


def fresh(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_merge_matches_float64_oracle(method: str, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Each expert's own density and epsilon, weights that do not add to 1: within one ulp of the output dtype (for
    float32 outputs, 2^-20 of the magnitudes summed: the float32 rescale and products round, as for the trim's
    rescale in test_reference)."""
    base, experts = fresh(shape, n, dtype, seed=hash((method, n, shape, str(dtype))) % 2**31)
    weight, density, epsilon = [0.7, 1.3, 0.4][:n], [0.5, 0.3, 0.8][:n], [0.2, 0.1, 0.15][:n]
    got = merge_tensors(base, experts, method, weight=weight, density=density, epsilon=epsilon, name="w", seed=3)
    want = torch.from_numpy(oracle.merge(base, experts, method, weight=weight, density=density, epsilon=epsilon,
                                         name="w", seed=3)).reshape(shape)
    assert got.dtype == dtype
    b64 = base.double()
    mag = b64.abs() + sum((x.double() - b64).abs() * w / d for x, w, d in zip(experts, weight, density, strict=True))
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(want, dtype), 2.0**-20 * mag)
    assert bool(((got.double() - want).abs() <= tol).all())
    if base.numel() > 10:  # something kept (the assertion above is not met by returning the base)
        assert not torch.equal(got, base)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_backends_and_chunkings_give_the_same_bits(method: str) -> None:
    """The Triton backend (the torch merge on its device) and every chunk of whole rows: the same bytes."""
    base, experts = fresh((24, 50), 3, torch.bfloat16, seed=11)
    kw = dict(density=[0.4, 0.6, 0.5], epsilon=0.2, name="model.layers.0.mlp.up_proj.weight")
    first = merge_tensors(base, experts, method, **kw)
    for backend, chunk in (("torch", 50), ("torch", 175), ("triton", 100), ("triton", 1 << 20)):
        on = on_kernels if backend == "triton" else (lambda x: x)
        got = merge_tensors(on(base), on(experts), method, backend=backend, chunk=chunk, **kw).cpu()
        assert torch.equal(got.view(torch.int16), first.view(torch.int16)), (backend, chunk)


def test_ties_in_magnitude_rank_by_index() -> None:
    """A row of equal |d| ranks in index order (a stable sort), so its keep probabilities rise along the row,
    whatever the signs."""
    m, density, epsilon = 200, 0.5, 0.3
    d = torch.full((m,), 0.25).mul_(torch.tensor([(-1.0) ** j for j in range(m)]))
    key = dare_key(0, "row", 0)
    got = della_keep(d, 0, key, density, epsilon, (m, 1))
    u = philox_rand(key, torch.arange(m)).numpy()
    f = np.float32
    p = (f(density - epsilon) + (np.arange(m, dtype=f) / f(m - 1) * f(2)) * f(epsilon)).astype(f)
    assert torch.equal(got, torch.from_numpy(u < p))


def test_larger_deltas_are_kept_more_often_and_the_density_holds() -> None:
    """Over 2^18 entries of rows of 512: kept fraction density overall, density - 0.9 epsilon among each row's
    smallest tenth and density + 0.9 epsilon among its largest (within 5 binomial sigmas)."""
    rows, m, density, epsilon = 512, 512, 0.3, 0.2
    d = torch.randn(rows * m, generator=torch.Generator().manual_seed(5))
    keep = della_keep(d, 0, dare_key(1, "t", 2), density, epsilon, (m, 1)).view(rows, m)
    order = d.abs().view(rows, m).argsort(dim=1)
    tenth = m // 10
    small = keep.gather(1, order[:, :tenth]).float().mean().item()
    large = keep.gather(1, order[:, -tenth:]).float().mean().item()

    def close(x: float, p: float, count: int) -> bool:
        return abs(x - p) <= 5 * (p * (1 - p) / count) ** 0.5

    assert close(keep.float().mean().item(), density, rows * m)
    assert close(small, density - 0.9 * epsilon, rows * tenth), small
    assert close(large, density + 0.9 * epsilon, rows * tenth), large


def test_rank_groups_follow_dimension_one() -> None:
    """A 3-D tensor ranks along its dimension 1 (mergekit's argsort(dim=1)): permuting dimension 0 or 2 does not
    change which entries of a group are kept relative to each other (the same draws follow them)."""
    assert rank_layout((4, 5, 6)) == (5, 6)
    assert rank_layout((8, 3)) == (3, 1)
    assert rank_layout((10,)) == (10, 1)
    assert rank_layout(()) == (1, 1)
    d = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    key = dare_key(0, "x", 0)
    got = della_keep(d.reshape(-1), 0, key, 0.5, 0.4, (5, 6))
    u = philox_rand(key, torch.arange(d.numel())).numpy()
    want = oracle.della_keep(d.abs().reshape(-1).numpy(), (4, 5, 6), 0.5, 0.4, u)
    assert torch.equal(got, torch.from_numpy(want))
    # ranking along dimension 2 instead would differ
    wrong = oracle.della_keep(d.transpose(1, 2).abs().reshape(-1).numpy(), (4, 6, 5), 0.5, 0.4, u)
    assert not np.array_equal(want, wrong)


def test_edges() -> None:
    """density 1 keeps every entry (no draw, no rescale: the plain sum); an entry ranked alone has p = density;
    a chunk that is not whole rows is refused."""
    base, experts = fresh((6, 8), 2, torch.float32, seed=4)
    got = merge_tensors(base, experts, "della_linear", density=1.0, epsilon=0.6)
    want = merge_tensors(base, experts, "task_arithmetic")
    assert torch.equal(got, want)
    key = dare_key(0, "a", 0)
    alone = della_keep(torch.randn(1000), 0, key, 0.35, 0.3, (1, 1))
    assert torch.equal(alone, philox_rand(key, torch.arange(1000)) < torch.tensor(0.35))
    with pytest.raises(ValueError, match="whole units of 8"):
        della_keep(torch.randn(12), 0, key, 0.5, 0.1, (8, 1))
    with pytest.raises(ValueError, match="whole units"):
        della_keep(torch.randn(16), 4, key, 0.5, 0.1, (8, 1))
    assert aligned_chunk((8, 1), 20) == 16
    assert aligned_chunk((8, 1), 5) == 8
    assert aligned_chunk((5, 6), 100) == 90


@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_probabilities_outside_zero_one_are_refused(density: float, epsilon: float) -> None:
    """As mergekit refuses them (its ValueError): named with the values and the largest epsilon that works."""
    base, experts = fresh((4, 4), 1, torch.float32, seed=0)
    with pytest.raises(InputError, match=r"DELLA needs both inside \(0, 1\)") as err:
        merge_tensors(base, experts, "della", density=density, epsilon=epsilon)
    assert f"below {min(density, 1 - density):.6g}" in str(err.value)


def test_zero_epsilon_is_dare_with_density_as_keep_probability() -> None:
    """epsilon 0: every entry's p is density, so the mask is DARE's, bit for bit (the same stream and key)."""
    base, experts = fresh((16, 32), 2, torch.bfloat16, seed=9)
    kw = dict(density=[0.3, 0.7], name="model.embed_tokens.weight", seed=5)
    got = merge_tensors(base, experts, "della", epsilon=0.0, **kw)
    want = merge_tensors(base, experts, "dare_ties", normalize=True, **kw)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
