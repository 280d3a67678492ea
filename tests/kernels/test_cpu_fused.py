"""The compiled CPU merge (kernels/cpu_fused.py): the torch path's bits for every method, dtype and edge value,
and the torch path whenever it cannot be built or gives other bits."""

from __future__ import annotations

import pytest
import torch

from fusemerge.kernels import cpu_fused, native_build, reference
from fusemerge.kernels.params import EMPTY_T, ChunkParams
from fusemerge.kernels.philox import dare_keep_run, dare_key

needs_compiled = pytest.mark.skipif(not cpu_fused.available(),
                                    reason=f"CPU merge not compiled here: {cpu_fused.describe()}")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 7, 511, 513, 4099]  # around the C loop's 512-element blocks
NS = [1, 2, 3, 8]


def family(n: int, size: int, dtype: torch.dtype, seed: int, edges: bool) -> tuple[torch.Tensor, list]:
    """A base and n experts 1/64-spaced around it (exact ties and cancellations), with `edges`: zeros of both
    signs, NaN, infinities and subnormals scattered in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g)
    experts = [base + torch.randint(-3, 4, (size,), generator=g).float() / 64 for _ in range(n)]
    if edges and size:
        for x in [base, *experts]:
            where = torch.randint(0, size, (max(1, size // 50),), generator=g)
            x[where] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39])[
                torch.randint(0, 7, (where.numel(),), generator=g)]
    return base.to(dtype), [x.to(dtype) for x in experts]


def params(kind: str, base: torch.Tensor, experts: list, seed: int) -> ChunkParams:
    """ChunkParams of one kind of merge, with thresholds inside the data (so ties at t are split by c)."""
    n = len(experts)
    g = torch.Generator().manual_seed(seed)
    w = tuple(float(v) for v in (torch.rand(n, generator=g) * 3 - 1))  # some negative
    size = base.numel()
    a = [(x.float() - base.float()).abs().nan_to_num(posinf=3e38).view(torch.int32) for x in experts]
    t = tuple(int(v.kthvalue(max(1, size * 2 // 3)).values) for v in a)
    c = tuple(int(v) for v in torch.randint(0, size + 1, (n,), generator=g))
    if kind == "linear":
        return ChunkParams("none", "none", True, w, normalize=True)
    if kind == "task_arithmetic":
        return ChunkParams("none", "none", False, w, lam=0.6)
    if kind == "ties":
        return ChunkParams("magnitude", "sign", False, w, normalize=True, t_keep=t, c_keep=c)
    if kind == "ties_positive":
        return ChunkParams("magnitude", "sign", False, tuple(abs(v) + 0.1 for v in w), normalize=True,
                           t_keep=t, c_keep=c, lam=1.5)
    if kind == "breadcrumbs_ties":
        top = tuple(int(v.max()) if v.numel() else EMPTY_T for v in a)
        return ChunkParams("breadcrumbs", "sign", False, w, normalize=True, t_keep=t, c_keep=c,
                           t_drop=(top[0], *([EMPTY_T] * (n - 1))), c_drop=(size // 2, *([0] * (n - 1))))
    if kind == "dare_ties":
        return ChunkParams("dare", "sign", False, w, keys=tuple(dare_key(7, "x", i) for i in range(n)),
                           density=(0.3,) * n, scale=tuple(1.0 + i / 3 for i in range(n)))
    if kind == "dare_linear":
        return ChunkParams("dare", "none", False, w, keys=tuple(dare_key(7, "y", i) for i in range(n)),
                           density=(0.6,) * n, scale=(1.0 / 0.6,) * n, normalize=True)
    raise ValueError(kind)


KINDS = ["linear", "task_arithmetic", "ties", "ties_positive", "breadcrumbs_ties", "dare_ties", "dare_linear"]


def assert_same(base, experts, start: int, p: ChunkParams, out_dtype) -> None:
    keeps = ([dare_keep_run(p.keys[i], start, base.numel(), p.density[i]) for i in range(p.n)]
             if p.sparsifier == "dare" else None)
    counts = [torch.zeros(p.n + 1, dtype=torch.int64) for _ in range(2)]
    want = reference.merge_torch(base, experts, start, p, out_dtype, nonfinite=counts[0], keeps=keeps)
    got = cpu_fused.merge(base, experts, start, p, out_dtype, counts[1], keeps)
    assert got is not None and got.dtype == out_dtype
    bad = (got.view(torch.uint8) != want.view(torch.uint8)).nonzero()
    assert bad.numel() == 0, (bad[:5], got[:8], want[:8])
    assert torch.equal(counts[1], counts[0])


@needs_compiled
@pytest.mark.parametrize("edges", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_gives_the_torch_paths_bits(kind: str, n: int, size: int, dtype, edges: bool) -> None:
    seed = hash((kind, n, size, str(dtype), edges)) % 2**31
    base, experts = family(n, size, dtype, seed, edges)
    p = params(kind, base, experts, seed)
    for out_dtype in OUT_DTYPES:
        assert_same(base, experts, 12345, p, out_dtype)


@needs_compiled
def test_chunks_give_the_whole_tensors_bits() -> None:
    """Index cuts and DARE draws are global: merging chunk by chunk is merging the whole."""
    base, experts = family(3, 3000, torch.bfloat16, 1, edges=False)
    for kind in ("ties", "dare_ties"):
        p = params(kind, base, experts, 2)
        keeps = [dare_keep_run(p.keys[i], 0, 3000, p.density[i]) for i in range(3)] if kind == "dare_ties" else None
        whole = cpu_fused.merge(base, experts, 0, p, torch.bfloat16, None, keeps)
        parts = [cpu_fused.merge(base[s:s + 700], [x[s:s + 700] for x in experts], s, p, torch.bfloat16, None,
                                 [k[s:s + 700] for k in keeps] if keeps else None) for s in range(0, 3000, 700)]
        assert torch.equal(whole.view(torch.int16), torch.cat(parts).view(torch.int16))


@needs_compiled
def test_many_experts() -> None:
    base, experts = family(70, 600, torch.float32, 3, edges=True)
    for kind in ("ties", "task_arithmetic", "linear"):
        assert_same(base, experts, 0, params(kind, base, experts, 4), torch.bfloat16)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("edges", [False, True])
def test_selection_histograms(dtype, edges: bool) -> None:
    base, experts = family(2, 5000, dtype, 9, edges)
    for x in experts:
        assert torch.equal(cpu_fused.hist_hi(base, x), reference.hist_hi_torch(base, x))
        for hi in {int(v) for v in reference.hist_hi_torch(base, x).nonzero()[:, 0][:4]}:
            assert torch.equal(cpu_fused.select_lo(base, x, hi), reference.select_lo_torch(base, x, hi))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [0, 1, 513, 5000])
def test_dare_statistics(dtype, size: int) -> None:
    """max |d| (NaN where a delta is) and the fixed-point L1 sums, with and without a keep mask."""
    import math

    base, experts = family(3, size, dtype, 11, edges=True)
    for b in (base, None):  # all inputs in one call, of deltas and of the inputs themselves
        got, want = cpu_fused.max_abs(b, experts), [reference.max_abs_torch(b, x) for x in experts]
        assert len(got) == 3
        assert all(u == v or (math.isnan(u) and math.isnan(v)) for u, v in zip(got, want, strict=True)), (got, want)
    base, experts = family(2, size, dtype, 12, edges=False)  # the sums take tensors of finite deltas
    keep = torch.rand(size, generator=torch.Generator().manual_seed(1)) < 0.3
    every = []  # (expert, shift, mask) of every case, then all of them in one call
    for x in experts:
        top = reference.max_abs_torch(base, x)
        for shift in {0, 30, 62 - size.bit_length() - math.frexp(top)[1] if top else 1, -126, 127 - 30}:
            if top and top * 2.0**shift * max(size, 1) >= 2**62:
                continue
            for k in (None, keep):
                want = reference.l1_fixed_torch(base, x, shift, k)
                assert cpu_fused.l1_fixed(base, [x], [shift], [k]) == [want], shift
                every.append((x, shift, k, want))
        every.append((x, None, keep, (0, 0)))  # skipped: not read
    got = cpu_fused.l1_fixed(base, [e[0] for e in every], [e[1] for e in every], [e[2] for e in every])
    assert got == [e[3] for e in every]


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_exactly(dtype) -> None:
    """All 65536 bit patterns of fp16 / bf16 (zeros, subnormals, infinities, NaNs with payloads) read by the
    compiled loops: max |x| of each pattern alone, and a linear merge with weight 1 to float32, which is the
    widened value (NaN: any NaN, as the product quiets a signaling one) and the torch path's bytes."""
    import math

    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    wide = x.float()
    p = ChunkParams("none", "none", True, (1.0,), normalize=False)
    got = cpu_fused.merge(None, [x], 0, p, torch.float32, None, None)
    assert got is not None
    finite = ~wide.isnan()
    assert torch.equal(got[finite].view(torch.int32), wide[finite].view(torch.int32))
    assert bool(got[~finite].isnan().all())
    want = reference.merge_torch(None, [x], 0, p, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    singles = cpu_fused.max_abs(None, [x[k:k + 1] for k in range(0, x.numel(), 997)])
    for k, v in zip(range(0, x.numel(), 997), singles, strict=True):
        w = abs(float(wide[k]))
        assert v == w or (math.isnan(v) and math.isnan(w)), (k, v, w)


@needs_compiled
def test_inputs_it_does_not_take_go_the_torch_way() -> None:
    base, experts = family(2, 100, torch.float32, 5, edges=False)
    p = params("ties", base, experts, 6)
    assert cpu_fused.merge(base, [experts[0], experts[1].double()], 0, p, torch.float32, None, None) is None
    assert cpu_fused.hist_hi(base, experts[0].to(torch.float64)) is None
    strided = torch.stack([experts[0], experts[1]], 1)[:, 0]
    assert not strided.is_contiguous()
    assert cpu_fused.merge(base, [strided, experts[1]], 0, p, torch.float32, None, None) is None
    # merge_chunk still merges them, by the torch path
    out = reference.merge_chunk(base, [strided, experts[1]], 0, p, torch.float32)
    assert torch.equal(out, reference.merge_torch(base, [strided.contiguous(), experts[1]], 0, p, torch.float32))


@needs_compiled
def test_2d_inputs_other_masks_and_far_cuts() -> None:
    """Only what merge_chunk hands over is taken (1-D chunks, bool DARE masks); an index cut far from the chunk
    (either side, beyond int64 differences) is clamped as the torch path clamps it."""
    base, experts = family(2, 600, torch.float32, 13, edges=False)
    p = params("ties", base, experts, 14)
    assert cpu_fused.merge(base.view(4, 150), [x.view(4, 150) for x in experts], 0, p, torch.float32, None,
                           None) is None
    d = params("dare_ties", base, experts, 15)
    ints = [dare_keep_run(k, 0, 600, 0.3).to(torch.int32) for k in d.keys]
    assert cpu_fused.merge(base, experts, 0, d, torch.float32, None, ints) is None
    t = params("ties", base, experts, 16)
    for c in (-(2**62) - 1, 2**63 - 1):
        far = ChunkParams("magnitude", "sign", False, t.weights, normalize=True, t_keep=t.t_keep, c_keep=(c, c))
        assert_same(base, experts, 2**62, far, torch.bfloat16)


def _has_f16c() -> bool:
    """Whether this CPU has AVX2 and F16C, where the compiled loops widen fp16 by vcvtph2ps (Linux x86-64)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "f16c" in flags


PORTABLE = "#define FM_NO_F16C 1\n"  # the portable fp16 widening (h2f), where F16C would widen instead
F16C = pytest.mark.skipif(not _has_f16c(), reason="no F16C here: the compiled loops widen fp16 by h2f")


@pytest.fixture
def fresh(monkeypatch, native_cache):
    """A process that has not yet built the CPU merge, with its own cache."""
    monkeypatch.setattr(cpu_fused, "_state", {})
    return native_cache


@pytest.fixture
def quick_build(monkeypatch) -> None:
    """The library built at -O1 rather than -O3: 1.8 s rather than 8.5 s here (2-core EPYC, gcc). The flags that
    keep its float results C's (-ffp-contract=off -fno-fast-math) stay, so a wrong source gives the same wrong bits
    at either level; test_the_compiled_loops_are_used_where_a_compiler_is_found builds the -O3 library."""
    assert "-O3" in cpu_fused.FLAGS
    monkeypatch.setattr(cpu_fused, "FLAGS", ["-O1" if f == "-O3" else f for f in cpu_fused.FLAGS])


def test_the_quick_build_of_the_true_source_is_used(fresh, quick_build) -> None:
    """The control of the two tests below: at -O1, the source as it is passes the load-time check."""
    if native_build.compiler() is None or native_build.disabled():
        pytest.skip("no C compiler here, or FUSEMERGE_NATIVE=0")
    assert cpu_fused.available(), cpu_fused.describe()
    assert "-O1" in cpu_fused.FLAGS


@pytest.mark.parametrize("wrong", [
    ("c = c > 0.0f ? c : 0.0f;", "c = c > 0.0f ? c : -c;"),  # a NaN agreeing
    ("y * lam + b[k]", "(y + b[k]) * lam"),  # another order of operations
    ("(u + 0x7FFFu + ((u >> 16) & 1u)) >> 16", "u >> 16"),  # truncation, as the Triton interpreter's cast
    ("acc[k] = qi[k];", "acc[k] = 0.0f + qi[k];"),  # a sum from 0.0: -0.0 becomes +0.0
    ("top = a > top ? a : top;", "top = a > top && a < 0x7F800000u ? a : top;"),  # a NaN lost
    ("kept += q & (0 - (uint64_t)mk[k]);", "kept += q;"),
    ("uint64_t q = (mant << up) >> down;", "uint64_t q = ((mant << up) + (down != 0)) >> down;"),  # rounding up
    ("(s < -63 ? 63 : -s)", "(s < -63 ? 0 : -s)"),  # a shift past the significand keeps it
    ("hist[bin[k]] += 1;", "hist[bin[k] & 0x7FFE] += 1;"),
    ("(float)(int32_t)man * 5.9604644775390625e-08f", "(float)(int32_t)man * 1.1920928955078125e-07f",
     PORTABLE),  # an fp16 subnormal
    ("((0x7F800000u | (man << 13)) & special)", "(0x7F800000u & special)", PORTABLE),  # fp16 NaN read as infinity
    pytest.param(("_mm256_storeu_ps(dst + k + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));",
                  "_mm256_storeu_ps(dst + k + 8, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));"),
                 marks=F16C),  # by F16C, the second 8 of 16 halves read as the first 8
    pytest.param(("memcpy(dst + k, wide, sizeof(float) * (size_t)(m - k));",
                  "memcpy(dst + k, wide, sizeof(float) * (size_t)(m - k - 1));"), marks=F16C),  # a short block's last
    pytest.param(("bad = _mm256_sub_epi16(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, expo), expo));",
                  "bad = _mm256_sub_epi16(bad, _mm256_cmpeq_epi16(h, expo));"), marks=F16C),  # NaNs not counted
    ("(int32_t)(a[g + __builtin_ctzll(bits)] & 0xFFFFu)", "(int32_t)(a[g + __builtin_ctzll(bits)] & 0xFFFEu)"),
    ("bits |= ((flags * 0x0102040810204080ull) >> 56) << (8 * j);",  # the matches of a block's first 8 entries only
     "bits |= j ? 0 : ((flags * 0x0102040810204080ull) >> 56);"),
    ("(bin - l1 <= w1)", "(bin - l1 < w1)"),  # the second window without its last bin
    ("if (a[k] == t && ++seen == q) return lo + k;", "if (a[k] == t && ++seen == q) return lo + k + 1;"),
    ("for (; bits; bits &= bits - 1) out[found++] = (int32_t)a[g + __builtin_ctzll(bits)];",
     "for (; bits; bits &= bits - 1) out[found++] = (int32_t)(a[g + __builtin_ctzll(bits)] | 1u);"),
])
def test_a_library_that_disagrees_is_not_used(fresh, quick_build, monkeypatch, wrong) -> None:
    """A change of the source that gives other bits (`wrong`: the text, its replacement and what to put before
    the source, if anything) makes the load-time check fall back to torch."""
    text, replacement, *before = wrong
    assert text in cpu_fused.SOURCE
    monkeypatch.setattr(cpu_fused, "SOURCE", "".join(before) + cpu_fused.SOURCE.replace(text, replacement))
    assert not cpu_fused.available()
    assert "disagreed with the torch path" in cpu_fused.describe()
    base, experts = family(2, 100, torch.bfloat16, 5, edges=False)
    p = params("ties", base, experts, 6)
    assert cpu_fused.merge(base, experts, 0, p, torch.bfloat16, None, None) is None


def test_an_avx2_gram_loop_that_disagrees_is_not_used(fresh, quick_build, monkeypatch) -> None:
    """The AVX2 loop rounding frac(p) 2^32 to nearest instead of toward zero: the load-time check refuses it on
    a machine that runs it (AVX2 without AVX-512)."""
    if not cpu_fused.available() or cpu_fused.gram_loop() != 1:
        pytest.skip("this machine does not run the AVX2 gram loop")
    monkeypatch.setattr(cpu_fused, "_state", {})
    old = "f1 = _mm256_add_pd(f1, _mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(pb, tb), two32),\n" \
          "                                               _MM_FROUND_TO_ZERO"
    assert old in cpu_fused.SOURCE
    monkeypatch.setattr(cpu_fused, "SOURCE", cpu_fused.SOURCE.replace(old, old.replace("TO_ZERO", "TO_NEAREST_INT")))
    assert not cpu_fused.available()
    assert "disagreed with the torch path" in cpu_fused.describe() and "gram_fixed" in cpu_fused.describe()


@pytest.mark.skipif(native_build.compiler() is None or native_build.disabled(),
                    reason="no C compiler here, or FUSEMERGE_NATIVE=0")
def test_the_compiled_loops_are_used_where_a_compiler_is_found(fresh) -> None:
    """A library that fails its load-time check falls back to torch, and the tests above that need it then
    skip: so where a compiler is found (CI), the library must build and agree, or this test fails."""
    assert cpu_fused.available(), cpu_fused.describe()


def test_fusemerge_native_0_asks_for_torch(fresh, monkeypatch) -> None:
    monkeypatch.setenv("FUSEMERGE_NATIVE", "0")
    assert cpu_fused.describe() == "torch (FUSEMERGE_NATIVE=0)"
    base, experts = family(2, 100, torch.bfloat16, 5, edges=False)
    p = params("ties", base, experts, 6)
    assert torch.equal(reference.merge_chunk(base, experts, 0, p, torch.bfloat16),
                       reference.merge_torch(base, experts, 0, p, torch.bfloat16))


def test_without_a_compiler_torch_merges(fresh, monkeypatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not cpu_fused.available()
    assert cpu_fused.describe().startswith("torch (")
