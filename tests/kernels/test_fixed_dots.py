"""The angle methods' exact dot products (kernels/fixed_dots.py) on every backend: the same integers, and the
exact sum to within one unit per term.

`gram_fixed` is the statistics function slerp and model_stock read their sums from: the torch backend's (on
CPU the compiled loop `fm_gram_fixed`, else `gram_fixed_torch`) and the Triton kernel's (`_gram_kernel`, on the
GPU or through the interpreter). The oracle is independent of all three: each product as a Fraction, the
fixed-point terms from it by integer arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from fusemerge.kernels import fixed_dots, reference
from fusemerge.kernels import triton_select as ts
from tests.kernels.conftest import BACKENDS

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def vectors(m: int, n: int, dtype: torch.dtype, seed: int, spread: float = 0.1):
    """A base and m models near it (their deltas of every sign), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    return base, [(base.float() + torch.randn(n, generator=g) * spread * (i + 1)).to(dtype) for i in range(m)]


def as_vectors(base, xs):
    """The vectors the sums are over, in float64: float32 deltas (rounded as the backends round them) or models."""
    return [(x.float() - base.float()).double() if base is not None else x.double() for x in xs]


def shifts_for(vs, drop=()) -> dict[tuple[int, int], int]:
    """Each pair's contract shift (fixed_dots.gram_sums' rule), some made smaller (coarser units) for variety."""
    top = [float(v.abs().max()) for v in vs]
    return {(i, j): fixed_dots.shift_for(top[i] * top[j]) - (i + j) % 3 for i in range(len(vs))
            for j in range(i, len(vs)) if top[i] * top[j] > 0 and (i, j) not in drop}


def oracle(vs, shifts) -> dict[tuple[int, int], tuple[int, int]]:
    """(sum of trunc(p), sum of trunc((p - trunc(p)) 2^32)) from exact Fractions of p = v_i v_j 2^shift (the
    vectors are float32 deltas or models: exact in float64, and so each product in Fraction)."""
    out = {}
    for (i, j), s in shifts.items():
        whole = part = 0
        for u, v in zip(vs[i].tolist(), vs[j].tolist(), strict=True):
            p = Fraction(u) * Fraction(v) * Fraction(2) ** s
            w = math.trunc(p)
            whole += w
            part += math.trunc((p - w) * 2**32)
        out[(i, j)] = (whole, part)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("deltas", [False, True], ids=["models", "deltas"])
def test_every_backend_gives_the_exact_terms(stats: str, dtype: torch.dtype, m: int, n: int, deltas: bool) -> None:
    backend, device = BACKENDS[stats]
    base, xs = vectors(m, n, dtype, seed=n * 31 + m + DTYPES.index(dtype))
    vs = as_vectors(base if deltas else None, xs)
    shifts = shifts_for(vs, drop={(0, m - 1)} if m > 2 else ())  # a pair not asked for is not returned
    b = base.to(device) if deltas else None
    got = backend.gram_fixed(b, [x.to(device) for x in xs], shifts)
    assert got == fixed_dots.gram_fixed_torch(b, [x.to(device) for x in xs], shifts)
    if n <= 1000 and m <= 3:  # the Fraction oracle is slow
        assert got == oracle(vs, shifts)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_the_fixed_point_sum_is_the_exact_sum_within_a_unit_per_term(stats: str, dtype: torch.dtype) -> None:
    backend, device = BACKENDS[stats]
    base, xs = vectors(3, 2001, dtype, seed=3)
    xs[1][:5] = torch.tensor([30.0, -1e-6, 0.0, -0.0, 2.0**-14]).to(dtype)  # an outlier sets the unit
    vs = as_vectors(base, xs)
    shifts = shifts_for(vs)
    got = backend.gram_fixed(base.to(device), [x.to(device) for x in xs], shifts)
    for (i, j), s in shifts.items():
        whole, part = got[(i, j)]
        fixed = Fraction((whole << fixed_dots.FRACTION_BITS) + part, 2 ** (s + fixed_dots.FRACTION_BITS))
        exact = sum(Fraction(u) * Fraction(v) for u, v in zip(vs[i].tolist(), vs[j].tolist(),
                                                               strict=True))
        assert abs(fixed - exact) <= Fraction(vs[i].numel(), 2 ** (s + fixed_dots.FRACTION_BITS))


def test_inputs_of_different_dtypes_are_read_as_float32(stats: str) -> None:
    backend, device = BACKENDS[stats]
    base, xs = vectors(2, 3001, torch.bfloat16, seed=5)
    mixed = [xs[0], (xs[1].float() + 1e-4).to(torch.float32)]
    shifts = shifts_for(as_vectors(None, mixed))
    want = fixed_dots.gram_fixed_torch(None, mixed, shifts)
    assert backend.gram_fixed(None, [x.to(device) for x in mixed], shifts) == want
    assert backend.gram_fixed(None, [x.float().to(device) for x in mixed], shifts) == want


def test_the_kernel_adds_pieces_of_a_long_chunk_as_integers(monkeypatch, device: str) -> None:
    """Chunks longer than GRAM_PIECE run as several launches (each piece's int64 sums cannot overflow)."""
    base, xs = vectors(3, 5003, torch.bfloat16, seed=9)
    vs = as_vectors(base, xs)
    shifts = shifts_for(vs)
    args = (base.to(device), [x.to(device) for x in xs], shifts)
    whole = ts.gram_fixed(*args)
    monkeypatch.setattr(ts, "GRAM_PIECE", 1024)
    assert ts.gram_fixed(*args) == whole == fixed_dots.gram_fixed_torch(*args)


def test_rows_of_one_buffer_are_read_in_place(device: str) -> None:
    """The pipeline hands the models over as rows of one staging buffer (layout.expert_rows: no stack)."""
    base, xs = vectors(3, 2000, torch.float16, seed=11)
    buf = torch.stack([base, *xs]).to(device)
    rows = [buf[i] for i in range(1, 4)]
    shifts = shifts_for(as_vectors(base, xs))
    assert ts.gram_fixed(buf[0], rows, shifts) == fixed_dots.gram_fixed_torch(base, xs, shifts)
    assert ts.gram_fixed(buf[0, 10:], [r[10:] for r in rows], shifts) == fixed_dots.gram_fixed_torch(
        base[10:], [x[10:] for x in xs], shifts)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -3.0])
def test_max_abs_of_one_input(stats: str, bad: float) -> None:
    """max |x| (no base) for slerp's first pass: a NaN anywhere gives NaN; every dtype."""
    backend, device = BACKENDS[stats]
    for dtype in DTYPES:
        _, (x,) = vectors(1, 3001, dtype, seed=2)
        x[2999] = bad
        [got] = backend.max_abs(None, [x.to(device)])
        want = float(x.float().abs().max())
        assert got == want or (math.isnan(got) and math.isnan(want))
        assert backend.max_abs(None, [x[:0].to(device)]) == [0.0]


def test_bad_arguments_are_refused(device: str) -> None:
    base, xs = vectors(2, 100, torch.float32, seed=1)
    base, xs = base.to(device), [x.to(device) for x in xs]
    for pairs in ({(1, 0): 3}, {(0, 2): 3}, {(-1, 0): 3}):  # every backend refuses them alike
        with pytest.raises(ValueError, match="outside"):
            ts.gram_fixed(base, xs, pairs)
        with pytest.raises(ValueError, match="outside"):
            reference.gram_fixed(base.cpu(), [x.cpu() for x in xs], pairs)
    with pytest.raises(ValueError, match="elements"):
        ts.gram_fixed(None, [xs[0], xs[1][:50]], {(0, 1): 3})
    assert ts.gram_fixed(base, xs, {}) == {}


def _compiled_loops() -> list[int]:
    """The compiled gram loops this machine can run (0: gcc's; 1: AVX2's), none without the library."""
    from fusemerge.kernels import cpu_fused

    if not cpu_fused.available():
        return []
    lib = cpu_fused._library()
    one = cpu_fused._gram_fixed(lib, None, [torch.ones(8)], {(0, 0): 0}, 1)
    return [0, 1] if one is not None else [0]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 511, 512, 513, 1031])
@pytest.mark.parametrize("deltas", [False, True], ids=["models", "deltas"])
def test_both_compiled_loops_give_the_exact_terms(n: int, deltas: bool) -> None:
    """gcc's loop and the AVX2 one (trunc and sums in doubles), on every sign, zeros of both signs, tiny and
    subnormal products, and products just below the 2^32 the shifts allow: the Fraction oracle's integers."""
    from fusemerge.kernels import cpu_fused

    loops = _compiled_loops()
    if not loops:
        pytest.skip(f"no compiled loops here: {cpu_fused.describe()}")
    base, xs = vectors(3, n, torch.float32, seed=n)
    edge = torch.tensor([0.0, -0.0, 1e-30, -2.0**-140, 65535.996, -65535.996, 3.0, -1.0e-3])
    for x in xs:
        x[: min(n, 8)] = edge[: min(n, 8)]
    b = base if deltas else None
    vs = as_vectors(b, xs)
    shifts = shifts_for(vs, drop={(0, 2)})
    want = oracle(vs, shifts)
    for loop in loops:
        assert cpu_fused._gram_fixed(cpu_fused._library(), b, xs, shifts, loop) == want, f"loop {loop}"


def test_the_machine_runs_the_loop_its_instructions_allow() -> None:
    """AVX2 without AVX-512 runs the AVX2 loop; with AVX-512 (or elsewhere) gcc's (Linux x86-64: /proc/cpuinfo)."""
    from pathlib import Path

    from fusemerge.kernels import cpu_fused

    info = Path("/proc/cpuinfo")
    if cpu_fused.gram_loop() is None or not info.is_file() or "flags" not in info.read_text():
        pytest.skip("no compiled loops, or no /proc/cpuinfo flags here")
    flags = set(next(line for line in info.read_text().splitlines() if line.startswith("flags")).split())
    assert cpu_fused.gram_loop() == int("avx2" in flags and "avx512dq" not in flags)
