"""The torch backend (CPU path) against the float64 oracle, on fresh random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusemerge import merge_tensors
from fusemerge.kernels import reference
from fusemerge.kernels.select import Segment, top_cuts, trim_counts
from fusemerge.methods import METHODS
from tests import oracle

MERGE_METHODS = [name for name, m in METHODS.items()  # passthrough copies; slerp, model_stock, nuslerp, nearswap,
                 if not m.is_passthrough and not m.tensor_weights and not m.is_nearswap  # sce, ram: their own files
                 and not m.is_sce and not m.is_ram]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 7, 1000, 4099]
NS = [1, 2, 3, 8]
PARAMS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.4},
    "dare_linear": {"density": 0.6},
    "breadcrumbs": {"density": 0.3, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.3, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.4, "epsilon": 0.1},
}


def family(n: int, size: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n experts = base + small deltas (rounded to dtype, so bf16 gives many ties)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    experts = [(base.float() + torch.randn(size, generator=g) * 0.004).to(dtype) for _ in range(n)]
    return base, experts


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x|."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(1e-300)))
    return torch.clamp(torch.exp2(e - mant), min=tiny)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [7, 4099])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_trim_rescale_matches_float64_oracle(method: str, n: int, size: int, dtype: torch.dtype) -> None:
    """mergekit's `rescale: true` of a magnitude trim: the kept deltas times ||d||_1 / ||kept d||_1."""
    base, experts = family(n, size, dtype, seed=hash((method, n, size, str(dtype), "rescale")) % 2**31)
    weights = [1.0, 0.5, 2.0][:n]
    kw = {k: v for k, v in PARAMS[method].items() if k != "lambda"}
    out = merge_tensors(base, experts, method, weight=weights, name="t.weight", chunk=97, rescale=True, **kw)
    plain = merge_tensors(base, experts, method, weight=weights, name="t.weight", chunk=97, **kw)
    expect = torch.from_numpy(oracle.merge(base, experts, method, weight=weights, rescale=True, **kw))
    err = (out.double() - expect).abs()
    b64 = base.double()
    mag = b64.abs() + sum((x.double() - b64).abs() * abs(wi) for x, wi in zip(experts, weights, strict=True)) / kw[
        "density"]
    tol = 2.0**-20 * mag if dtype == torch.float32 else torch.maximum(ulp(expect, dtype), 2.0**-20 * mag)
    assert bool((err <= tol).all()), f"max error {float(err.max())}"
    if size > 100:  # the factor is well above 1: the rescaled merge is not the plain one
        assert not torch.equal(out, plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_matches_float64_oracle(method: str, n: int, size: int, dtype: torch.dtype) -> None:
    base, experts = family(n, size, dtype, seed=hash((method, n, size, str(dtype))) % 2**31)
    weights = [1.0, 0.5, 2.0, 0.75, 1.25, 0.3, 1.0, 0.9][:n]
    params = PARAMS[method]
    lam = params.get("lambda", 1.0)
    kw = {k: v for k, v in params.items() if k != "lambda"}
    out = merge_tensors(base, experts, method, weight=weights, name="t.weight", seed=3, chunk=97, **params)
    models = experts + [base] if method == "linear" else experts
    w = weights + [1.0] if method == "linear" else weights
    expect = oracle.merge(None if method == "linear" else base, models, method, weight=w, lam=lam, seed=3,
                          name="t.weight", **kw)
    expect = torch.from_numpy(expect)
    assert out.dtype == dtype and out.shape == base.shape
    err = (out.double() - expect).abs()
    # The contract is float32 math. Its error at an element is a few float32 ulps of the terms summed there,
    # mag = |theta_b| + lam * sum_i |w_i * delta_i| / density (DARE's rescale is about 1 / density).
    b64 = base.double()
    ref = 0 if method == "linear" else b64
    deltas = [(x.double() - ref).abs() * abs(wi) for x, wi in zip(models, w, strict=True)]
    mag = (0 if method == "linear" else b64.abs()) + abs(lam) * sum(deltas) / kw.get("density", 1.0)
    f32 = 2.0**-20 * mag
    if dtype == torch.float32:
        tol = f32
    else:  # within one ulp of the output dtype, except where the sum cancels to far below its terms
        tol = torch.maximum(ulp(expect, dtype), f32)
    assert bool((err <= tol).all()), f"max error {float(err.max())}"


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_chunking_does_not_change_a_bit(method: str) -> None:
    base, experts = family(3, 5003, torch.bfloat16, seed=11)
    outs = [merge_tensors(base, experts, method, weight=[1.0, 0.6, 1.4], chunk=c, **{**PARAMS[method]})
            for c in (7, 13, 512, 5003)]
    for o in outs[1:]:
        assert torch.equal(o.view(torch.int16), outs[0].view(torch.int16))


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("chunk", [7, 1000, 10_000])
def test_trim_keeps_exactly_k_lowest_index_ties(density: float, chunk: int) -> None:
    base, (expert,) = family(1, 10_000, torch.bfloat16, seed=5)
    d = expert.float() - base.float()
    k = max(1, math.floor(density * d.numel()))
    seg = Segment(d.numel(), lambda s, c: (base[s:s + c], [expert[s:s + c]]))
    [[(t, c)]] = top_cuts(reference, [seg], chunk, [[k]])
    kept = reference.in_top(reference.abs_bits(d), 0, t, c)
    assert int(kept.sum()) == k
    expect = oracle.topk_mask(d.abs().double().numpy(), k)
    assert np.array_equal(kept.numpy(), expect)


def test_ties_at_the_threshold_are_kept_by_index_order() -> None:
    base = torch.zeros(12)
    expert = torch.tensor([1.0, 3.0, 2.0, 2.0, -2.0, 2.0, 0.5, -3.0, 2.0, 1.0, 2.0, 0.1])
    seg = Segment(12, lambda s, c: (base[s:s + c], [expert[s:s + c]]))
    [[(t, c)]] = top_cuts(reference, [seg], 5, [[5]])  # 3, -3, then three of the six 2s: indices 2, 3, 4
    kept = reference.in_top(reference.abs_bits(expert), 0, t, c)
    assert kept.nonzero().view(-1).tolist() == [1, 2, 3, 4, 7]


def test_breadcrumbs_counts_follow_mergekit() -> None:
    assert trim_counts("breadcrumbs", 1000, 0.3, 0.05) == (350, 50)
    assert trim_counts("breadcrumbs", 1000, 0.98, 0.05) == (1000, 20)  # fewer outliers dropped when both don't fit
    assert trim_counts("breadcrumbs", 1000, 1.0, 0.05) == (1000, 0)
    assert trim_counts("magnitude", 10, 0.01) == (1, 0)


def test_dare_keeps_about_density_and_rescale_matches_l1() -> None:
    base, (expert,) = family(1, 200_000, torch.float32, seed=9)
    out = merge_tensors(base, [expert], "dare_linear", density=0.3, name="w", seed=1)
    dh = out.double() - base.double()
    kept = (dh != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005  # a fixed key: this is a property of one deterministic stream
    d = expert.double() - base.double()
    assert dh.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)


def test_dare_mask_depends_on_seed_and_name_only() -> None:
    base, experts = family(2, 3001, torch.bfloat16, seed=2)
    a = merge_tensors(base, experts, "dare_ties", density=0.5, name="x", seed=7, chunk=100)
    b = merge_tensors(base, experts, "dare_ties", density=0.5, name="x", seed=7, chunk=3001)
    c = merge_tensors(base, experts, "dare_ties", density=0.5, name="x", seed=8, chunk=100)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a, c)


def test_sign_election_ties_elect_plus() -> None:
    base = torch.zeros(3, dtype=torch.bfloat16)
    e1 = torch.tensor([0.5, -0.5, 0.25], dtype=torch.bfloat16)
    e2 = torch.tensor([-0.5, 0.5, -0.25], dtype=torch.bfloat16)
    out = merge_tensors(base, [e1, e2], "ties", density=1.0)
    assert out.tolist() == [0.5, 0.5, 0.25]  # S == 0 elects +1: the positive expert wins alone
