"""The CPU merge as compiled code: reference.py's merge, selection histograms and DARE statistics, a C loop each.

The torch backend spends one pass over memory per torch call: a TIES merge of N experts makes ~8 N passes
over float32 chunks (delta, mask, weight, sum, sign, clamp, count, sum) and its threshold search 4 more per
expert and pass (delta, abs, shift, bincount). Here each is one loop over the chunk that reads the base and
the experts once and writes the result once, with the same IEEE operations in the same order as
reference.py, so the bytes are the same (the torch path stays: where this library cannot be built or
disagrees with it, and as the reference the tests compare it with, bit for bit).

What keeps the bits the same: every float32 operation is one IEEE operation (``-ffp-contract=off``: no fused
multiply-add; no ``-ffast-math``: no reassociation, so sums run left to right in expert order); a sum starts
from its first term, not from 0.0 (``-0.0 + 0.0`` is ``+0.0``); a zero's sign is kept wherever reference.py's
output depends on it; the output is rounded once, to nearest even, and a NaN is written as
``reference.CANONICAL_NAN``. Built and loaded as ``native_build`` says; checked against the torch path on
a sample of every kind of merge before it is used.
"""

from __future__ import annotations

import ctypes
import math
import threading

import numpy as np
import torch

from fusemerge.kernels import native_build
from fusemerge.kernels.params import EMPTY_T, ChunkParams

# Input codes: how an element is read as float32 (exactly: every bf16 and fp16 value is a float32 value).
IN_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Output codes: float32 and bf16 are rounded here; fp16 is written as float32 and rounded by torch.
OUT_CODES = {torch.float32: 0, torch.bfloat16: 1}
# DELLA's masks are drawn by the caller (kernels/della.py), as DARE's: the loop takes both as code 2
SPARSIFIERS = {"none": 0, "magnitude": 1, "dare": 2, "breadcrumbs": 3, "della": 2}
# Elements per block of the merge loop: each expert's products for a block are kept (N x 2 KiB of float32)
# between the sign election and the disjoint mean, so the chunk is read once; 512 keeps them in L1/L2.
BLOCK = 512

SOURCE = "#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n" + native_build.CLONES + """
#define BLOCK @BLOCK@

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* An fp16 value as float32, exactly: a normal one by moving its fields, infinity and NaN (payload kept) by
   the all-ones exponent, a subnormal as man * 2^-24 (an int -> float conversion and a product by a power of
   two, normal in float32: no flush-to-zero mode can change it). All three are computed and one is selected by
   masks, without branches, so gcc vectorizes the loads (with the branches it did not: an fp16 input took
   1.21 ns per entry and expert in max_abs, a bf16 input 0.08, on the 2-core AMD EPYC). */
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t sub = -(uint32_t)(e == 0), special = -(uint32_t)(e == 0x1Fu);
    uint32_t normal = ((e + 112u) << 23) | (man << 13);
    uint32_t tiny = f2u((float)(int32_t)man * 5.9604644775390625e-08f);
    return u2f(sign | (normal & ~(sub | special)) | ((0x7F800000u | (man << 13)) & special) | (tiny & sub));
}

/* The same widening by F16C's vcvtph2ps (8 halves an instruction, exact, MXCSR's DAZ not consulted), where the
   CPU has it and AVX2 (every x86-64-v3 and v4 CPU): the builds with clones test the CPU once, when loaded, and
   every clone, "default" too, calls it for a block (a function of another target is not inlined into the
   clones; gcc's _Float16 conversions were scalar in the v3 / v4 clones and a libgcc call, __extendhfsf2, in
   "default"). Its floats differ from h2f's only for the 1022 signaling NaNs, which come out quiet (payload
   kept); every loop here subtracts, multiplies or converts a loaded float before it writes or compares it,
   which quiets a signaling NaN either way, so the outputs' bits are h2f's. fp16 inputs, ns per entry and
   expert, h2f -> F16C (2-core AMD EPYC, v3 clone, one thread, 4 experts of 2^18): max |d| 0.63 -> 0.22,
   low-bin select 1.28 -> 0.55, high histogram 1.60 -> 0.91, linear 0.68 -> 0.24, task arithmetic 1.22 ->
   0.74, DARE-TIES 1.54 -> 1.07, TIES 3.46 -> 3.25. FM_NO_F16C: h2f only. */
#if defined(__x86_64__) && defined(__ELF__) && !defined(FM_NO_CLONES) && !defined(FM_NO_F16C)
#include <immintrin.h>
#define FM_F16C 1
static int fm_has_f16c;
__attribute__((constructor)) static void fm_detect(void) {
    __builtin_cpu_init();
    fm_has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

/* Elements [0, m) of src widened into dst (m <= BLOCK); returns how many are not finite (exponent all ones). */
__attribute__((target("avx2,f16c"), noinline)) static int32_t h2f_block_f16c(const uint16_t *src, int m,
                                                                            float *dst) {
    const __m256i expo = _mm256_set1_epi16(0x7C00);
    __m256i bad = _mm256_setzero_si256();  /* 16 counts of at most BLOCK / 16 each */
    uint16_t rest[16] = {0};
    int k = 0;
    for (; k + 16 <= m; k += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + k));
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_storeu_ps(dst + k + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
        bad = _mm256_sub_epi16(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, expo), expo));
    }
    if (k < m) {  /* the last < 16: through a zeroed copy (zeros are finite), so no read past src + m */
        float wide[16];
        memcpy(rest, src + k, sizeof(uint16_t) * (size_t)(m - k));
        __m256i h = _mm256_loadu_si256((const __m256i *)rest);
        _mm256_storeu_ps(wide, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_storeu_ps(wide + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
        bad = _mm256_sub_epi16(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, expo), expo));
        memcpy(dst + k, wide, sizeof(float) * (size_t)(m - k));
    }
    __m256i sums = _mm256_madd_epi16(bad, _mm256_set1_epi16(1));  /* 8 x int32 */
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
}
#endif

static inline float load(const void *p, int code, int64_t j) {
    if (code == 0) return ((const float *)p)[j];
    if (code == 1) return u2f((uint32_t)((const uint16_t *)p)[j] << 16);
    return h2f(((const uint16_t *)p)[j]);
}

static inline int nonfinite(float x) { return (f2u(x) & 0x7F800000u) == 0x7F800000u; }

/* in_top(t, c) as a mask for the entries k < m of a block: all ones where bits(|d|) = a > t, or a == t at a
   block index below `cut` (the index cut c made local and clamped to [0, m]); the empty set (EMPTY_T, 0)
   needs no case of its own. Bitwise, without branches, so the loop vectorizes. */
static inline uint32_t top_bits(uint32_t a, int k, uint32_t t, int cut) {
    return -(uint32_t)((a > t) | ((a == t) & (k < cut)));
}

static inline void local_cut(int32_t t, int64_t c, int64_t first, int m, uint32_t *tt, int *cut) {
    *tt = (uint32_t)t;  /* compared before subtracting: c - first cannot overflow then (first >= 0) */
    *cut = c <= first ? 0 : (c - first > m ? m : (int)(c - first));
}

static inline void store(void *out, int code, int64_t j, float y) {
    uint32_t u = f2u(y);
    int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    if (code == 1) {
        ((uint16_t *)out)[j] = nan ? 0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else {
        ((float *)out)[j] = nan ? u2f(0x7FC00000u) : y;
    }
}

/* Elements [lo, lo + m) of p (input code `code`) as float32 into dst; returns how many are not finite. */
__attribute__((always_inline)) static inline int32_t load_block(const void *p, int code, int64_t lo, int m,
                                                                float *dst) {
    int32_t bad = 0;
    if (code == 0) {
        const float *src = (const float *)p + lo;
        for (int k = 0; k < m; k++) { dst[k] = src[k]; bad += nonfinite(dst[k]); }
    } else if (code == 1) {
        const uint16_t *src = (const uint16_t *)p + lo;
        for (int k = 0; k < m; k++) { dst[k] = u2f((uint32_t)src[k] << 16); bad += nonfinite(dst[k]); }
    } else {
        const uint16_t *src = (const uint16_t *)p + lo;
#ifdef FM_F16C
        if (fm_has_f16c) return h2f_block_f16c(src, m, dst);
#endif
        for (int k = 0; k < m; k++) { dst[k] = h2f(src[k]); bad += nonfinite(dst[k]); }
    }
    return bad;
}

/* reference.merge_torch for one chunk of n elements from global index `start`, a block of BLOCK at a time.
   q: scratch of nexp * BLOCK floats. counts[i] += the non-finite entries of expert i, [nexp] of the base (not
   for linear). Every sparsifier is one test, keep = in_top(keep cut) & ~in_top(drop cut) & DARE's mask, with
   the parts a sparsifier does not have made to keep everything: all is in_top(0, m), none in_top(EMPTY_T, 0),
   and the mask is all ones. Always inlined: fm_merge's three shapes (linear, sign, no sign), in each of its
   clones, get their own copy for their instruction set (one per input code and sparsifier too compiled for
   21 s; this is 3 x 3 copies). */
__attribute__((always_inline)) static inline void merge_body(int64_t n, int nexp, int in_code, const void *base,
        const void *const *experts, int64_t start, int linear, int sparsifier, int sign, int normalize,
        const int32_t *t_keep, const int64_t *c_keep, const int32_t *t_drop, const int64_t *c_drop,
        const uint8_t *const *masks, const float *scales, const float *weights, float wsum, float wmin, float lam,
        int out_code, void *out, int64_t *counts, float *q) {
    float b[BLOCK], xb[BLOCK], s[BLOCK], num[BLOCK], den[BLOCK];
    uint8_t ones[BLOCK];
    memset(ones, 1, BLOCK);
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        if (linear) {
            for (int i = 0; i < nexp; i++) {
                counts[i] += load_block(experts[i], in_code, lo, m, xb);
                const float w = weights[i];
                if (i == 0) for (int k = 0; k < m; k++) num[k] = xb[k] * w;  /* a sum starts from its first term */
                else for (int k = 0; k < m; k++) num[k] = num[k] + xb[k] * w;
            }
            for (int k = 0; k < m; k++) store(out, out_code, lo + k, normalize ? num[k] / wsum : num[k]);
            continue;
        }
        counts[nexp] += load_block(base, in_code, lo, m, b);
        float *acc = sign ? s : num;
        for (int i = 0; i < nexp; i++) {
            float *qi = q + (int64_t)i * BLOCK;
            const float sc = scales[i], w = weights[i];
            uint32_t tk = 0, td = 0x7FFFFFFFu;
            int ck = m, cd = 0;
            if (sparsifier == 1 || sparsifier == 3) local_cut(t_keep[i], c_keep[i], start + lo, m, &tk, &ck);
            if (sparsifier == 3) local_cut(t_drop[i], c_drop[i], start + lo, m, &td, &cd);
            const uint8_t *mk = sparsifier == 2 ? masks[i] + lo : ones;
            counts[i] += load_block(experts[i], in_code, lo, m, xb);
            for (int k = 0; k < m; k++) {
                float d = xb[k] - b[k];
                uint32_t a = f2u(d) & 0x7FFFFFFFu;
                uint32_t keep = top_bits(a, k, tk, ck) & ~top_bits(a, k, td, cd) & -(uint32_t)mk[k];
                qi[k] = u2f(f2u(d * sc) & keep) * w;  /* a dropped entry is +0.0 */
            }
            if (i == 0) for (int k = 0; k < m; k++) acc[k] = qi[k];
            else for (int k = 0; k < m; k++) acc[k] = acc[k] + qi[k];
        }
        if (sign) {
            for (int k = 0; k < m; k++) {  /* g = copysign(1, s + 0.0), and -1 where s is NaN (NaN >= 0 is false) */
                float sk = s[k] + 0.0f;
                s[k] = u2f(0x3F800000u | (f2u(sk) & 0x80000000u) | ((uint32_t)(sk != sk) << 31));
            }
            for (int k = 0; k < m; k++) den[k] = 0.0f;  /* 0 + the first term is that term: zeros' signs aside */
            for (int i = 0; i < nexp; i++) {
                float *qi = q + (int64_t)i * BLOCK;
                const float w = weights[i];
                for (int k = 0; k < m; k++) {
                    float c = qi[k] * s[k];
                    c = c > 0.0f ? c : 0.0f;  /* max(g p_i, 0); a NaN agrees with neither sign */
                    qi[k] = c;
                    den[k] = den[k] + (c > 0.0f ? w : 0.0f);  /* which den's zero sign fixing makes moot */
                }
                if (i == 0) for (int k = 0; k < m; k++) num[k] = qi[k];
                else for (int k = 0; k < m; k++) num[k] = num[k] + qi[k];
            }
            for (int k = 0; k < m; k++) {
                float y = num[k] * s[k] + 0.0f;
                if (normalize) {
                    float dk = den[k];
                    dk = wmin >= 0.0f ? (dk > wmin ? dk : wmin) : (dk == 0.0f ? 1.0f : dk);
                    y = y / dk;
                }
                store(out, out_code, lo + k, y * lam + b[k]);
            }
        } else {
            for (int k = 0; k < m; k++) {
                float y = normalize ? num[k] / wsum : num[k];
                store(out, out_code, lo + k, y * lam + b[k]);
            }
        }
    }
}

FM_CLONES int fm_merge(int64_t n, int nexp, int in_code, const void *base, const void *const *experts,
        int64_t start, int linear, int sparsifier, int sign, int normalize, const int32_t *t_keep,
        const int64_t *c_keep, const int32_t *t_drop, const int64_t *c_drop, const uint8_t *const *masks,
        const float *scales, const float *weights, float wsum, float wmin, float lam, int out_code, void *out,
        int64_t *counts) {
    float *q = (float *)malloc(sizeof(float) * BLOCK * (size_t)(nexp > 0 ? nexp : 1));
    if (q == NULL) return -1;
#define FM_CASE(LIN, SG) merge_body(n, nexp, in_code, base, experts, start, LIN, sparsifier, SG, normalize, t_keep, \
        c_keep, t_drop, c_drop, masks, scales, weights, wsum, wmin, lam, out_code, out, counts, q)
    if (linear) FM_CASE(1, 0); else if (sign) FM_CASE(0, 1); else FM_CASE(0, 0);
#undef FM_CASE
    free(q);
    return 0;
}

/* hist[bits(|x - base|) >> 16] += 1 over n elements (reference.abs_hist_hi): a block's bins by vectorized
   loops, then the increments (one loop of both ran 1.23 ns per entry, this 0.55: bench/cpu_merge.py, 2-core
   Xeon VM; four tables, one per position mod 4, to keep increments of one counter apart, gained nothing). */
FM_CLONES void fm_hist_hi(int64_t n, int in_code, const void *base, const void *x, int64_t *hist) {
    float b[BLOCK], xb[BLOCK];
    uint32_t bin[BLOCK];
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        load_block(base, in_code, lo, m, b);
        load_block(x, in_code, lo, m, xb);
        for (int k = 0; k < m; k++) bin[k] = (f2u(xb[k] - b[k]) & 0x7FFFFFFFu) >> 16;
        for (int k = 0; k < m; k++) hist[bin[k]] += 1;
    }
}

/* For each of nv inputs xs[i], the largest bits(|xs[i] - base|) over n elements, as a bit pattern, into
   out[i] (a NaN's exceed infinity's, so a NaN delta gives a NaN, as reference.max_abs's torch max does; 0 for
   n = 0); each block of the base is read once for all inputs (nv + 1 reads, not 2 nv). base NULL: of
   |xs[i]| (x - 0 is x). Blocks interleaved input by input, the order bench/stat_reads.py found fastest on
   the CPU merge's chunks (planner.CPU_CHUNK_CAP entries). */
FM_CLONES void fm_max_abs(int64_t n, int in_code, int nv, const void *base, const void *const *xs,
                          uint32_t *out) {
    float b[BLOCK], xb[BLOCK];
    if (base == 0) memset(b, 0, sizeof b);
    for (int i = 0; i < nv; i++) out[i] = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        if (base != 0) load_block(base, in_code, lo, m, b);
        for (int i = 0; i < nv; i++) {
            uint32_t top = out[i];
            load_block(xs[i], in_code, lo, m, xb);
            for (int k = 0; k < m; k++) {
                uint32_t a = f2u(xb[k] - b[k]) & 0x7FFFFFFFu;
                top = a > top ? a : top;
            }
            out[i] = top;
        }
    }
}

/* reference.l1_fixed's sums for each of nv experts xs[i]: out[2 i] = sum of trunc(|d_i| * 2^shift[i]),
   out[2 i + 1] the same over the entries whose keep[i][j] is nonzero (keep NULL or keep[i] NULL:
   out[2 i + 1] = out[2 i]; xs[i] NULL: skipped, both 0); each block of the base is read once for all
   experts. Every |d| * 2^shift is below 2^62 / n (select.fixed_point_shift, and only for tensors whose
   deltas are all finite).
   trunc(|d| * 2^shift) from the float's bits by integer shifts: the torch operations' value, since the
   product is exact whenever it is 1 or more. Written branch-free in unsigned 64-bit lanes (both shifts
   clamped, one of them 0) so that gcc 12 vectorizes it; it did not vectorize the earlier form, a conditional
   choice of shift (4.4 -> 0.55 ns per entry and expert, bench/stat_reads.py). A float -> int64 conversion
   does not vectorize on x86-64-v3. */
FM_CLONES void fm_l1_fixed(int64_t n, int in_code, int nv, const void *base, const void *const *xs,
                           const int32_t *shift, const uint8_t *const *keep, int64_t *out) {
    float b[BLOCK], xb[BLOCK];
    uint8_t ones[BLOCK];
    memset(ones, 1, BLOCK);
    for (int i = 0; i < 2 * nv; i++) out[i] = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        load_block(base, in_code, lo, m, b);
        for (int i = 0; i < nv; i++) {
            if (xs[i] == 0) continue;
            load_block(xs[i], in_code, lo, m, xb);
            const uint8_t *mk = keep != 0 && keep[i] != 0 ? keep[i] + lo : ones;
            int32_t sh = shift[i];
            uint64_t total = 0, kept = 0;
            for (int k = 0; k < m; k++) {
                uint32_t a = f2u(xb[k] - b[k]) & 0x7FFFFFFFu;
                uint32_t e = a >> 23;  /* |d| = mant * 2^(max(e, 1) - 150) */
                uint64_t mant = (a & 0x7FFFFFu) | (e ? 0x800000u : 0u);
                /* q = trunc(mant * 2^s): one of the two shifts is 0; mant < 2^24, so >> 63 gives 0 */
                int32_t s = (int32_t)(e ? e : 1u) - 150 + sh;
                uint64_t up = (uint64_t)(s < 0 ? 0 : (s > 40 ? 40 : s));
                uint64_t down = (uint64_t)(s > 0 ? 0 : (s < -63 ? 63 : -s));
                uint64_t q = (mant << up) >> down;
                total += q;
                kept += q & (0 - (uint64_t)mk[k]);
            }
            out[2 * i] += (int64_t)total;  /* below 2^62: the caller's shifts */
            out[2 * i + 1] += (int64_t)kept;
        }
    }
}

/* whole += trunc(p), part += trunc((p - trunc(p)) * 2^32) for p = x[k] * y[k] * scale, k < m: the terms of
   fixed_dots.py's sums (every |p| below 2^32; conversions truncate toward zero, as torch's trunc does). */
static inline void fixed_add(const float *x, const float *y, int m, double scale, int64_t *whole, int64_t *part) {
    int64_t w_sum = 0, p_sum = 0;
    for (int k = 0; k < m; k++) {
        double p = (double)x[k] * (double)y[k] * scale;
        int64_t w = (int64_t)p;
        w_sum += w;
        p_sum += (int64_t)((p - (double)w) * 4294967296.0);
    }
    *whole += w_sum;
    *part += p_sum;
}

#if defined(__x86_64__) && defined(__ELF__) && !defined(FM_NO_CLONES)
#include <immintrin.h>
#define FM_AVX2_GRAM 1
/* fixed_add's sums with AVX2, for machines without AVX-512: there x86 has no vector double -> int64
   conversion, so gcc's fixed_add converts one entry at a time (bench/gram_loops.py times both). Here trunc(p)
   and trunc(frac(p) 2^32) stay doubles (vroundpd, exact) and are summed as doubles, which is exact: each is
   an integer below 2^32 in magnitude, so a lane's sum over m <= 2^20 entries stays an integer below 2^52,
   whatever the order; each lane's sums are then converted once. The same integers as fixed_add, 4 entries
   per instruction. */
__attribute__((target("avx2"))) static void fixed_add_avx2(const float *x, const float *y, int m, double scale,
                                                             int64_t *whole, int64_t *part) {
    const __m256d sc = _mm256_set1_pd(scale), two32 = _mm256_set1_pd(4294967296.0);
    __m256d w0 = _mm256_setzero_pd(), w1 = w0, f0 = w0, f1 = w0;
    int k = 0;
    for (; k + 8 <= m; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k), yv = _mm256_loadu_ps(y + k);
        __m256d pa = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)),
                                                 _mm256_cvtps_pd(_mm256_castps256_ps128(yv))), sc);
        __m256d pb = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)),
                                                 _mm256_cvtps_pd(_mm256_extractf128_ps(yv, 1))), sc);
        __m256d ta = _mm256_round_pd(pa, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256d tb = _mm256_round_pd(pb, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        w0 = _mm256_add_pd(w0, ta);
        w1 = _mm256_add_pd(w1, tb);
        f0 = _mm256_add_pd(f0, _mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(pa, ta), two32),
                                               _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
        f1 = _mm256_add_pd(f1, _mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(pb, tb), two32),
                                               _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
    }
    double lanes[16];
    _mm256_storeu_pd(lanes, w0);
    _mm256_storeu_pd(lanes + 4, w1);
    _mm256_storeu_pd(lanes + 8, f0);
    _mm256_storeu_pd(lanes + 12, f1);
    int64_t w_sum = 0, p_sum = 0;
    for (int j = 0; j < 8; j++) {
        w_sum += (int64_t)lanes[j];
        p_sum += (int64_t)lanes[8 + j];
    }
    for (; k < m; k++) {
        double p = (double)x[k] * (double)y[k] * scale;
        int64_t w = (int64_t)p;
        w_sum += w;
        p_sum += (int64_t)((p - (double)w) * 4294967296.0);
    }
    *whole += w_sum;
    *part += p_sum;
}
#endif

/* Which fixed_add loop fm_gram_fixed runs: 0 gcc's (with AVX-512 it converts 8 entries per instruction, 0.18 ns
   per entry and pair; elsewhere it is the portable one), 1 fixed_add_avx2 (AVX2 without AVX-512). */
int fm_gram_loop(void) {
#ifdef FM_AVX2_GRAM
    return __builtin_cpu_supports("avx2") && !__builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

/* fixed_dots.py's sums over n elements (below 2^31, so no sum overflows) of the vectors v_i = x_i - base
   (float32, as reference.delta; base NULL: v_i = x_i): for every pair i <= j with scale[i * nv + j] != 0, the
   sums of trunc(p) and of trunc((p - trunc(p)) * 2^32), p = v_i * v_j * scale (exact: a product of two floats
   and a power of two), into out[2 (i * nv + j)] and out[2 (i * nv + j) + 1]; one read of the chunk for all
   pairs. `loop`: fm_gram_loop's choice (-1), or 0 / 1 to run that loop (1 only where fm_gram_loop can give it:
   the tests compare the two). Returns 0, or -1 where its scratch cannot be allocated or the loop is not here
   (the caller then takes the torch path). */
FM_CLONES int fm_gram_fixed(int64_t n, int in_code, int nv, const void *base, const void *const *xs,
                             const double *scale, int64_t *out, int loop) {
    float b[BLOCK];
    if (loop < 0) loop = fm_gram_loop();
#ifdef FM_AVX2_GRAM
    if (loop == 1 && !__builtin_cpu_supports("avx2")) return -1;
#else
    if (loop == 1) return -1;
#endif
    float *v = (float *)malloc(sizeof(float) * BLOCK * (size_t)nv);
    if (v == 0) return -1;
    for (int q = 0; q < 2 * nv * nv; q++) out[q] = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        if (base != 0) load_block(base, in_code, lo, m, b);
        for (int i = 0; i < nv; i++) {
            float *vi = v + (size_t)i * BLOCK;
            load_block(xs[i], in_code, lo, m, vi);
            if (base != 0) for (int k = 0; k < m; k++) vi[k] = vi[k] - b[k];
        }
        for (int i = 0; i < nv; i++)
            for (int j = i; j < nv; j++) {
                double s = scale[i * nv + j];
                if (s == 0.0) continue;
#ifdef FM_AVX2_GRAM
                if (loop == 1) {
                    fixed_add_avx2(v + (size_t)i * BLOCK, v + (size_t)j * BLOCK, m, s, &out[2 * (i * nv + j)],
                                   &out[2 * (i * nv + j) + 1]);
                    continue;
                }
#endif
                fixed_add(v + (size_t)i * BLOCK, v + (size_t)j * BLOCK, m, s, &out[2 * (i * nv + j)],
                          &out[2 * (i * nv + j) + 1]);
            }
    }
    free(v);
    return 0;
}

/* The set bits of hit[0..m) (flags 0 / 1, zero up to a multiple of 64) as 64-bit masks, 8 flags -> 8 bits
   by one multiplication each: mask[g] holds entries 64 g .. 64 g + 63. */
static inline void flag_masks(const uint8_t *hit, int m, uint64_t *mask) {
    for (int g = 0; g < m; g += 64) {
        uint64_t bits = 0;
        for (int j = 0; j < 8; j++) {
            uint64_t flags;
            memcpy(&flags, hit + g + 8 * j, 8);
            bits |= ((flags * 0x0102040810204080ull) >> 56) << (8 * j);
        }
        mask[g / 64] = bits;
    }
}

/* The low 16 bits of bits(|x - base|), in index order, of the entries whose high 16 bits are hi_bin, into
   out; returns how many (reference.abs_select_lo). Few entries are in the bin (it holds the k-th largest, ~1%
   of a tensor): a block's bits and matches are found by vectorized loops, and the matches' set bits are walked
   to store them, one store per match (storing at every entry of a block that holds one took 0.70 ns per entry,
   bench/cpu_merge.py). */
FM_CLONES int64_t fm_select_lo(int64_t n, int in_code, const void *base, const void *x, uint32_t hi_bin,
                               int32_t *out) {
    float b[BLOCK], xb[BLOCK];
    uint32_t a[BLOCK];
    uint8_t hit[BLOCK];
    uint64_t mask[BLOCK / 64];
    int64_t found = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK), any = 0;
        load_block(base, in_code, lo, m, b);
        load_block(x, in_code, lo, m, xb);
        for (int k = 0; k < m; k++) {
            a[k] = f2u(xb[k] - b[k]) & 0x7FFFFFFFu;
            hit[k] = (uint8_t)((a[k] >> 16) == hi_bin);
            any |= hit[k];
        }
        if (!any) continue;
        for (int k = m; k < ((m + 63) & ~63); k++) hit[k] = 0;
        flag_masks(hit, m, mask);
        for (int g = 0; g < m; g += 64)
            for (uint64_t bits = mask[g / 64]; bits; bits &= bits - 1)
                out[found++] = (int32_t)(a[g + __builtin_ctzll(bits)] & 0xFFFFu);
    }
    return found;
}

/* The tie cut's search (reference.count_equal / nth_equal): with q < 1, how many entries have bits(|x - base|)
   == t; else the local index of the q-th (1-based) such entry, -1 if there are fewer. The bits are the
   histograms' (a NaN delta's payload is the expert's, an fp16 NaN converted as load_block does), so the cut
   falls on the entries the threshold counted: the torch operations' bits of a NaN can differ. */
FM_CLONES int64_t fm_find_equal(int64_t n, int in_code, const void *base, const void *x, uint32_t t, int64_t q) {
    float b[BLOCK], xb[BLOCK];
    uint32_t a[BLOCK];
    int64_t seen = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        int64_t here = 0;
        load_block(base, in_code, lo, m, b);
        load_block(x, in_code, lo, m, xb);
        for (int k = 0; k < m; k++) {
            a[k] = f2u(xb[k] - b[k]) & 0x7FFFFFFFu;
            here += a[k] == t;
        }
        if (q >= 1 && seen + here >= q) {
            for (int k = 0; k < m; k++)
                if (a[k] == t && ++seen == q) return lo + k;
        }
        seen += here;
    }
    return q >= 1 ? -1 : seen;
}

/* The radix select's first pass that also collects the second's entries (reference.abs_hist_collect): the
   histogram of fm_hist_hi, added into hist, and the bits(|x - base|) of the entries whose high 16 bits lie in
   [win[0], win[1]] or [win[2], win[3]], in index order, into out while there is room for them (cap); returns
   how many there are (more than cap: out holds the first cap). The matches are stored as fm_select_lo's. */
FM_CLONES int64_t fm_hist_collect(int64_t n, int in_code, const void *base, const void *x, int64_t *hist,
                                  const uint32_t *win, int32_t *out, int64_t cap) {
    float b[BLOCK], xb[BLOCK];
    uint32_t a[BLOCK];
    uint8_t hit[BLOCK];
    uint64_t mask[BLOCK / 64];
    const uint32_t l0 = win[0], w0 = win[1] - win[0], l1 = win[2], w1 = win[3] - win[2];
    int64_t found = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int m = (int)(n - lo < BLOCK ? n - lo : BLOCK), any = 0;
        load_block(base, in_code, lo, m, b);
        load_block(x, in_code, lo, m, xb);
        for (int k = 0; k < m; k++) a[k] = f2u(xb[k] - b[k]) & 0x7FFFFFFFu;
        for (int k = 0; k < m; k++) hist[a[k] >> 16] += 1;
        for (int k = 0; k < m; k++) {
            uint32_t bin = a[k] >> 16;
            hit[k] = (uint8_t)((bin - l0 <= w0) | (bin - l1 <= w1));
            any |= hit[k];
        }
        if (!any) continue;
        for (int k = m; k < ((m + 63) & ~63); k++) hit[k] = 0;  /* a short last block: whole groups of 64 */
        flag_masks(hit, m, mask);
        for (int g = 0; g < m; g += 64) {
            uint64_t bits = mask[g / 64];
            if (found + 64 <= cap) {
                for (; bits; bits &= bits - 1) out[found++] = (int32_t)a[g + __builtin_ctzll(bits)];
            } else {
                for (; bits; bits &= bits - 1, found++)
                    if (found < cap) out[found] = (int32_t)a[g + __builtin_ctzll(bits)];
            }
        }
    }
    return found;
}
""".replace("@BLOCK@", str(BLOCK))
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-fast-math"]

_P = ctypes.c_void_p
_I64, _I32, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "fm_merge": ([_I64, _I32, _I32, _P, _P, _I64, _I32, _I32, _I32, _I32, _P, _P, _P, _P, _P, _P, _P, _F32, _F32,
                  _F32, _I32, _P, _P], ctypes.c_int),
    "fm_hist_hi": ([_I64, _I32, _P, _P, _P], None),
    "fm_select_lo": ([_I64, _I32, _P, _P, ctypes.c_uint32, _P], ctypes.c_int64),
    "fm_max_abs": ([_I64, _I32, _I32, _P, _P, _P], None),
    "fm_hist_collect": ([_I64, _I32, _P, _P, _P, _P, _P, _I64], ctypes.c_int64),
    "fm_find_equal": ([_I64, _I32, _P, _P, ctypes.c_uint32, _I64], ctypes.c_int64),
    "fm_l1_fixed": ([_I64, _I32, _I32, _P, _P, _P, _P, _P], None),
    "fm_gram_fixed": ([_I64, _I32, _I32, _P, _P, _P, _P, _I32], ctypes.c_int),
    "fm_gram_loop": ([], ctypes.c_int),
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "obj": the loaded library or None (torch path); "how": what was loaded


def _load() -> tuple[object | None, str]:
    if native_build.disabled():
        return None, "torch (FUSEMERGE_NATIVE=0)"
    lib, where = native_build.load("cpu_fused", SOURCE, FLAGS)
    if lib is None:
        return None, f"torch ({where})"
    try:
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
    except AttributeError as e:
        return None, f"torch ({where}: {e})"
    wrong = _disagreement(lib)
    if wrong:
        return None, f"torch ({where} disagreed with the torch path: {wrong})"
    return lib, f"compiled ({where})"


def _library():
    return native_build.loaded(_state, _lock, _load, "CPU merge")


def available() -> bool:
    """Whether the compiled CPU merge is in use (builds and checks it on the first call)."""
    return _library() is not None


def describe() -> str:
    """How this process merges on CPU: 'compiled (path)' or 'torch (why)'."""
    _library()
    return str(_state["how"])


def _takes(tensors: list[torch.Tensor]) -> int | None:
    """The input code of these chunks if the compiled loops take them (CPU, 1-D, contiguous, one float dtype and
    length)."""
    first = tensors[0]
    code = IN_CODES.get(first.dtype)
    if code is None or any(t.device.type != "cpu" or t.dim() != 1 or not t.is_contiguous() or t.dtype != first.dtype
                           or t.numel() != first.numel() for t in tensors):
        return None
    return code


def merge(base: torch.Tensor | None, experts: list[torch.Tensor], start: int, p: ChunkParams,
          out_dtype: torch.dtype, nonfinite: torch.Tensor | None, keeps: list[torch.Tensor] | None
          ) -> torch.Tensor | None:
    """reference.merge_torch's result for this chunk, or None where the compiled loop does not take it (then
    the torch path runs). `keeps`: DARE's or DELLA's keep masks (bool, one per expert), drawn by the caller."""
    return _merge(_library(), base, experts, start, p, out_dtype, nonfinite, keeps)


def _merge(lib, base, experts, start, p, out_dtype, nonfinite, keeps) -> torch.Tensor | None:
    inputs = experts if p.linear else [base, *experts]
    if lib is None or not experts or (not p.linear and base is None):
        return None
    code = _takes(inputs)
    if code is None or out_dtype not in IN_CODES or start < 0:
        return None
    n, nexp = experts[0].numel(), len(experts)
    out_code = OUT_CODES.get(out_dtype, 0)
    out = torch.empty(n, dtype=out_dtype if out_dtype in OUT_CODES else torch.float32)
    f32 = np.float32
    weights = np.array(p.weights, dtype=f32)
    scales = np.array(p.scales(), dtype=f32)
    # the disjoint mean's divisor: clamped to the smallest weight when it is positive, else 0 -> 1 (wmin < 0)
    wmin = p.smallest_weight() if p.smallest_weight() > 0 else -1.0
    empty_t = (EMPTY_T,) * nexp
    t_keep = np.array(p.t_keep or empty_t, dtype=np.int32)
    c_keep = np.array(p.c_keep or (0,) * nexp, dtype=np.int64)
    t_drop = np.array(p.t_drop or empty_t, dtype=np.int32)
    c_drop = np.array(p.c_drop or (0,) * nexp, dtype=np.int64)
    ptrs = (ctypes.c_void_p * nexp)(*[x.data_ptr() for x in experts])
    if p.sparsifier in ("dare", "della"):
        if keeps is None or len(keeps) != nexp or any(k.dtype != torch.bool or k.numel() != n for k in keeps):
            return None
        keeps = [k.contiguous() for k in keeps]
        masks = (ctypes.c_void_p * nexp)(*[k.data_ptr() for k in keeps])
    else:
        masks = None
    counts = np.zeros(nexp + 1, dtype=np.int64)
    status = lib.fm_merge(n, nexp, code, base.data_ptr() if base is not None else None, ptrs, start,
                          int(p.linear), SPARSIFIERS[p.sparsifier], int(p.consensus == "sign"), int(p.normalize),
                          t_keep.ctypes.data, c_keep.ctypes.data, t_drop.ctypes.data, c_drop.ctypes.data, masks,
                          scales.ctypes.data, weights.ctypes.data, p.weight_sum(), wmin, float(f32(p.lam)), out_code,
                          out.data_ptr(), counts.ctypes.data)
    if status != 0:
        raise MemoryError("cannot allocate the CPU merge's scratch")
    if nonfinite is not None:
        if counts.any():
            nonfinite += torch.from_numpy(counts).to(nonfinite.device)
    if out_dtype not in OUT_CODES:
        from fusemerge.kernels.reference import _rounded

        return _rounded(out, out_dtype)
    return out


def hist_hi(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor | None:
    """reference.abs_hist_hi's histogram, or None where the compiled loop does not take these chunks."""
    return _hist_hi(_library(), base, expert)


def _hist_hi(lib, base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor | None:
    code = _takes([base, expert]) if lib is not None else None
    if code is None:
        return None
    hist = np.zeros(1 << 15, dtype=np.int64)
    lib.fm_hist_hi(base.numel(), code, base.data_ptr(), expert.data_ptr(), hist.ctypes.data)
    return torch.from_numpy(hist)


def select_lo(base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor | None:
    """reference.abs_select_lo's entries, or None where the compiled loop does not take these chunks."""
    return _select_lo(_library(), base, expert, hi_bin)


def _select_lo(lib, base: torch.Tensor, expert: torch.Tensor, hi_bin: int) -> torch.Tensor | None:
    code = _takes([base, expert]) if lib is not None else None
    if code is None:
        return None
    out = np.empty(max(base.numel(), 1), dtype=np.int32)
    found = lib.fm_select_lo(base.numel(), code, base.data_ptr(), expert.data_ptr(), hi_bin, out.ctypes.data)
    return torch.from_numpy(out[:found].copy())


def hist_collect(base: torch.Tensor, expert: torch.Tensor, hist: np.ndarray, windows: tuple[int, int, int, int],
                 out: np.ndarray) -> int | None:
    """reference.abs_hist_collect (hist: int64[32768], added into; out: int32, filled from the start), or None
    where the compiled loop does not take these chunks."""
    return _hist_collect(_library(), base, expert, hist, windows, out)


def _hist_collect(lib, base: torch.Tensor, expert: torch.Tensor, hist: np.ndarray,
                  windows: tuple[int, int, int, int], out: np.ndarray) -> int | None:
    code = _takes([base, expert]) if lib is not None else None
    if code is None:
        return None
    if (hist.dtype != np.int64 or hist.shape != (1 << 15,) or not hist.flags.c_contiguous or out.dtype != np.int32
            or out.ndim != 1 or not out.flags.c_contiguous or not all(0 <= w < 1 << 15 for w in windows)
            or windows[0] > windows[1] or windows[2] > windows[3]):
        raise ValueError("hist_collect: hist must be int64[32768], out int32, windows two bin ranges lo <= hi")
    win = np.array(windows, dtype=np.uint32)
    return int(lib.fm_hist_collect(base.numel(), code, base.data_ptr(), expert.data_ptr(), hist.ctypes.data,
                                   win.ctypes.data, out.ctypes.data, out.size))


def find_equal(base: torch.Tensor, expert: torch.Tensor, t: int, q: int) -> int | None:
    """q >= 1: reference.nth_equal's index; q < 1: reference.count_equal's count; None where the compiled loop
    does not take these chunks."""
    return _find_equal(_library(), base, expert, t, q)


def _find_equal(lib, base: torch.Tensor, expert: torch.Tensor, t: int, q: int) -> int | None:
    code = _takes([base, expert]) if lib is not None else None
    if code is None or not 0 <= t < 1 << 31:
        return None
    return int(lib.fm_find_equal(base.numel(), code, base.data_ptr(), expert.data_ptr(), t, q))


def max_abs(base: torch.Tensor | None, xs: list[torch.Tensor]) -> list[float] | None:
    """reference.max_abs's values, one per input of `xs` (NaN where a delta is NaN; base None: of |x|), in one
    read of the base, or None where the compiled loop does not take these chunks."""
    return _max_abs(_library(), base, xs)


def _max_abs(lib, base: torch.Tensor | None, xs: list[torch.Tensor]) -> list[float] | None:
    code = _takes(xs if base is None else [base, *xs]) if lib is not None and xs else None
    if code is None:
        return None
    bits = np.zeros(len(xs), dtype=np.uint32)
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    lib.fm_max_abs(xs[0].numel(), code, len(xs), None if base is None else base.data_ptr(), ptrs, bits.ctypes.data)
    return [float(v) for v in bits.view(np.float32)]


def l1_fixed(base: torch.Tensor, xs: list[torch.Tensor], shifts: list[int | None],
             keeps: list[torch.Tensor | None] | None) -> list[tuple[int, int]] | None:
    """reference.l1_fixed's sums per expert (`keeps[i]`: expert i's DARE keep mask, bool; None: every entry;
    shifts[i] None: (0, 0), not read), in one read of the base, or None where the compiled loop does not take
    these chunks."""
    return _l1_fixed(_library(), base, xs, shifts, keeps)


def _l1_fixed(lib, base: torch.Tensor, xs: list[torch.Tensor], shifts: list[int | None],
              keeps: list[torch.Tensor | None] | None) -> list[tuple[int, int]] | None:
    code = _takes([base, *xs]) if lib is not None and xs else None
    masks = keeps if keeps is not None else [None] * len(xs)
    if code is None or len(masks) != len(xs) or len(shifts) != len(xs) or any(
            k is not None and (k.dtype != torch.bool or not k.is_contiguous() or k.numel() != base.numel())
            for k in masks):
        return None
    out = np.zeros(2 * len(xs), dtype=np.int64)
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() if h is not None else None
                                         for x, h in zip(xs, shifts, strict=True)])
    keep_ptrs = (ctypes.c_void_p * len(xs))(*[k.data_ptr() if k is not None else None for k in masks])
    shift_arr = np.array([h if h is not None else 0 for h in shifts], dtype=np.int32)
    lib.fm_l1_fixed(base.numel(), code, len(xs), base.data_ptr(), ptrs, shift_arr.ctypes.data, keep_ptrs,
                    out.ctypes.data)
    return [(int(out[2 * i]), int(out[2 * i + 1])) for i in range(len(xs))]


def gram_fixed(base: torch.Tensor | None, xs: list[torch.Tensor], shifts: dict[tuple[int, int], int]
               ) -> dict[tuple[int, int], tuple[int, int]] | None:
    """reference.gram_fixed's sums for every pair (i, j) of `shifts`, in one read of the chunk; None where the
    compiled loop does not take it."""
    return _gram_fixed(_library(), base, xs, shifts)


def gram_loop() -> int | None:
    """Which compiled loop gram_fixed runs: 0 (gcc's, vectorized with AVX-512), 1 (AVX2 without AVX-512: the
    products' integer parts summed as doubles), None without the library."""
    lib = _library()
    return None if lib is None else int(lib.fm_gram_loop())


def _gram_fixed(lib, base: torch.Tensor | None, xs: list[torch.Tensor], shifts: dict[tuple[int, int], int],
                loop: int = -1) -> dict[tuple[int, int], tuple[int, int]] | None:
    code = _takes(xs if base is None else [base, *xs]) if lib is not None and xs else None
    if code is None or xs[0].numel() >= 2**31:
        return None
    nexp = len(xs)
    scale = np.zeros(nexp * nexp, dtype=np.float64)
    for (i, j), s in shifts.items():
        scale[i * nexp + j] = 2.0**s
    out = np.zeros(2 * nexp * nexp, dtype=np.int64)
    ptrs = (ctypes.c_void_p * nexp)(*[x.data_ptr() for x in xs])
    if lib.fm_gram_fixed(xs[0].numel(), code, nexp, None if base is None else base.data_ptr(), ptrs,
                         scale.ctypes.data, out.ctypes.data, loop):
        return None  # no scratch (or that loop is not here): the torch operations
    return {(i, j): (int(out[2 * (i * nexp + j)]), int(out[2 * (i * nexp + j) + 1])) for i, j in shifts}


def _disagreement(lib) -> str:
    """'' if the compiled loops give the torch path's bits on a sample of every kind of merge, else which not."""
    from fusemerge.kernels import fixed_dots, reference

    g = torch.Generator().manual_seed(20261201)
    n = 3 * BLOCK + 77
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    # bf16-spaced deltas (many exact ties and cancellations), zeros, both zero signs, a NaN and an infinity
    experts = [(base.float() + torch.randint(-4, 5, (n,), generator=g).float() / 64).to(torch.bfloat16)
               for _ in range(3)]
    experts[0][5], experts[1][6], experts[2][7] = float("nan"), float("inf"), -0.0
    base[13] = float("-inf")
    base[9:12] = -0.0  # every expert -0.0 too: a sum that must start from its first term keeps the zero's sign
    for x in experts:
        x[9:12] = -0.0
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # all 16-bit patterns
    every = torch.cat([every, every.flip(0)[::851]])  # and a short last block of 78 (F16C: 16 at a time)
    for dtype in (torch.float16, torch.bfloat16):  # the loads' widening of every value (NaNs: the same bytes)
        x, p = every.view(dtype), ChunkParams("none", "none", True, (1.0,), normalize=False)
        counts = [torch.zeros(2, dtype=torch.int64) for _ in range(2)]
        got = _merge(lib, None, [x], 0, p, torch.float32, counts[1], None)
        want = reference.merge_torch(None, [x], 0, p, torch.float32, nonfinite=counts[0])
        if got is None or not torch.equal(got.view(torch.int32), want.view(torch.int32)) or not torch.equal(*counts):
            return f"the widening of every {dtype} value"
    for dtype in (torch.float32, torch.bfloat16):
        b, xs = base.to(dtype), [x.to(dtype) for x in experts]
        t = [int(torch.quantile((x.float() - b.float()).abs(), 0.7).view(torch.int32)) for x in xs]
        for p in (
            ChunkParams("none", "none", True, (1.0, 2.0, 0.5), normalize=True),
            ChunkParams("none", "none", False, (1.0, -1.0, 0.25), lam=0.7),
            ChunkParams("none", "none", False, (-1.0, -0.5, -0.25), normalize=True),  # a sum of -0.0 terms
            ChunkParams("magnitude", "sign", False, (1.0, 1.0, 1.0), normalize=True, t_keep=tuple(t),
                        c_keep=(700, 0, n)),
            ChunkParams("breadcrumbs", "sign", False, (0.5, -1.0, 2.0), normalize=True, t_keep=tuple(t),
                        c_keep=(0, 900, n), t_drop=(t[0] + 99, EMPTY_T, t[2] + 1), c_drop=(n, 0, 1000)),
            ChunkParams("dare", "sign", False, (1.0, 1.0, 1.0), normalize=False, keys=(1, 2, 3),
                        density=(0.3, 0.5, 0.9), scale=(1.25, 3.0, 1.0)),
        ):
            for out_dtype in (torch.bfloat16, torch.float32, torch.float16):
                keeps = ([torch.rand(n, generator=g) < d for d in p.density] if p.sparsifier == "dare" else None)
                counts = [torch.zeros(len(xs) + 1, dtype=torch.int64) for _ in range(2)]
                want = reference.merge_torch(b, xs, 100, p, out_dtype, keeps=keeps, nonfinite=counts[0])
                got = _merge(lib, b, xs, 100, p, out_dtype, counts[1], keeps)
                if (got is None or not torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                        or not torch.equal(*counts)):
                    return f"merge ({p.sparsifier}, {p.consensus}, {dtype} -> {out_dtype})"
        for base_x in (b, None):  # every input in one read of the base; a NaN, an infinity and -0.0 among them
            got, want = _max_abs(lib, base_x, xs), [reference.max_abs_torch(base_x, x) for x in xs]
            if got is None or not all(u == v or (math.isnan(u) and math.isnan(v))
                                      for u, v in zip(got, want, strict=True)):
                return f"max_abs ({dtype}, {'deltas' if base_x is not None else 'of the inputs'})"
        for x in xs:
            noisy = (x.float() + torch.randn(n, generator=g) * 1e-3).to(dtype)  # every bin, not the 1/64 grid's
            for y in (x, noisy):
                if not torch.equal(_hist_hi(lib, b, y), reference.hist_hi_torch(b, y)):
                    return f"hist_hi ({dtype})"
                bins = sorted({int(v) for v in reference.hist_hi_torch(b, y).nonzero()[:, 0][::97]} | {t[0] >> 16})
                for hi in bins:
                    if not torch.equal(_select_lo(lib, b, y, hi), reference.select_lo_torch(b, y, hi)):
                        return f"select_lo ({dtype})"
                # the tie cut's search finds the bits the histograms counted (NaN included): every entry's bits
                # from the collecting pass, whose windows hold every bin, checked above against torch's
                bits = np.empty(n, np.int32)
                _hist_collect(lib, b, y, np.zeros(1 << 15, np.int64), (0, 0x7FFF, 0, 0x7FFF), bits)
                for t_eq in {int(bits[j]) for j in range(0, n, 251)} | {int(bits.max())}:
                    hits = np.flatnonzero(bits == t_eq).tolist()
                    if (_find_equal(lib, b, y, t_eq, 0) != len(hits)
                            or [_find_equal(lib, b, y, t_eq, q) for q in (1, len(hits), len(hits) + 1)]
                            != [hits[0], hits[-1], -1]):
                        return f"find_equal ({dtype})"
                mid = bins[len(bins) // 2]  # two windows, one empty of entries, one up to the largest bin
                for windows in ((bins[0], bins[-1], bins[0], bins[-1]), (t[0] >> 16, t[0] >> 16, 0, 0),
                                (bins[0], mid, bins[-1], 0x7FFF)):
                    for cap in (n, 7):  # room for every entry, and for a few
                        got = [np.full(1 << 15, 5, np.int64), np.full(cap, -1, np.int32)]
                        want = [got[0].copy(), got[1].copy()]
                        found = (_hist_collect(lib, b, y, got[0], windows, got[1]),
                                 reference.hist_collect_torch(b, y, want[0], windows, want[1]))
                        if found[0] != found[1] or not (np.array_equal(got[0], want[0])
                                                        and np.array_equal(got[1], want[1])):
                            return f"hist_collect ({dtype})"
            finite = ~(x.float() - b.float()).isfinite()
            fb, fx = b.masked_fill(finite, 0.0), x.masked_fill(finite, 0.5)  # the sums take finite deltas
            fx = (fx.float() + torch.randn(n, generator=g) * 1e-3).to(dtype)  # float32: every mantissa bit
            bits = 23 if dtype == torch.float32 else 7  # and |d| of all-ones mantissas, which truncation cuts
            fb, fx = fb.clone(), fx.clone()
            fb[:40], fx[:40] = 0.0, torch.tensor([(2 - 2.0**-bits) * 2.0**-j for j in range(40)]).to(dtype)
            keep = torch.rand(n, generator=g) < 0.4
            for shift in (20, 40, -3):
                for k in (None, keep):
                    if _l1_fixed(lib, fb, [fx], [shift], [k]) != [reference.l1_fixed_torch(fb, fx, shift, k)]:
                        return f"l1_fixed ({dtype}, shift {shift})"
            mixed = [(20, None), (40, keep), (None, keep), (-3, keep)]  # several experts in one read, one skipped
            if _l1_fixed(lib, fb, [fx] * 4, [h for h, _ in mixed], [k for _, k in mixed]) != [
                    reference.l1_fixed_torch(fb, fx, h, k) if h is not None else (0, 0) for h, k in mixed]:
                return f"l1_fixed of several experts ({dtype})"
            # the angle methods' sums: of the models (every product sign, a square), and of deltas, one of zeros
            others = [fx, fb, (fb.float() - 0.5 * fx.float()).to(dtype)]
            for base_x in (None, fb):
                vs = [x.float() - (0.0 if base_x is None else base_x.float()) for x in others]
                shifts = {(i, j): fixed_dots.shift_for(max(float(vs[i].abs().max() * vs[j].abs().max()), 2.0**-100))
                          for i in range(3) for j in range(i, 3) if (i, j) != (1, 2)}
                if _gram_fixed(lib, base_x, others, shifts) != fixed_dots.gram_fixed_torch(base_x, others, shifts):
                    return (f"gram_fixed ({dtype}, {'deltas' if base_x is not None else 'models'}, loop "
                            f"{lib.fm_gram_loop()})")
    return ""
