/* The value loops of edgefl's codec, and the bit tricks its index coders need.
 *
 * float32 <-> IEEE half conversions for the "f16" quantizer are bit-identical to NumPy's
 * astype(np.float16) / astype(np.float32): round to nearest, ties to even, subnormals kept (after
 * F. Giesen's branch-light converters; checked against NumPy on all 2**32 float32 inputs). Where the
 * CPU has F16C, the same conversions run eight at a time in hardware.
 */
#ifndef EDGEFL_CODEC_IMPL_H
#define EDGEFL_CODEC_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "clip_impl.h"  /* EDGEFL_DISPATCH: AVX-512 / AVX2 / baseline clones on x86-64 GCC */

static inline uint32_t edgefl_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float edgefl_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> half bits; |f| >= 65520 gives infinity (0x7c00 with the sign), NaN gives 0x7e00. */
static inline uint16_t edgefl_float_to_half(float f)
{
    uint32_t u = edgefl_f32_bits(f);
    uint32_t sign = u & 0x80000000u;
    uint16_t out;
    u ^= sign;
    if (u >= (uint32_t)(127 + 16) << 23) {          /* >= 65536, Inf or NaN */
        out = u > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (u < (uint32_t)113 << 23) {           /* below 2**-14: a half subnormal or zero */
        /* Adding 0.5 lines the 10 kept mantissa bits up at the bottom of a float; the FPU's
         * round-to-nearest-even does the rounding. */
        const float magic = edgefl_bits_f32((uint32_t)((127 - 15) + (23 - 10) + 1) << 23);
        out = (uint16_t)(edgefl_f32_bits(edgefl_bits_f32(u) + magic) - edgefl_f32_bits(magic));
    } else {
        uint32_t mant_odd = (u >> 13) & 1u;          /* ties to even */
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += mant_odd;
        out = (uint16_t)(u >> 13);                   /* a carry into exponent 31 gives Inf */
    }
    return (uint16_t)(out | (sign >> 16));
}

/* half bits -> float32, exact. */
static inline float edgefl_half_to_float(uint16_t h)
{
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t u = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & u;
    u += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        u += (uint32_t)(128 - 16) << 23;             /* Inf or NaN */
    } else if (exp == 0) {                            /* zero or subnormal: renormalise exactly */
        u += 1u << 23;
        u = edgefl_f32_bits(edgefl_bits_f32(u) - edgefl_bits_f32(113u << 23));
    }
    return edgefl_bits_f32(u | ((uint32_t)h & 0x8000u) << 16);
}

/* The value loops below check with an OR-accumulated flag instead of an early exit, so that they
 * vectorise; the caller looks for the first offending element only when the flag is set. */

/* Nonzero when some x[i] is NaN or Inf. */
EDGEFL_DISPATCH static int edgefl_any_non_finite(const float *x, size_t n)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (edgefl_f32_bits(x[i]) & 0x7f800000u) == 0x7f800000u;
    return bad != 0;
}

/* max |x[i]| of finite values (0 for n = 0). The bit patterns of non-negative finite floats order
 * like the floats, and an integer max reduction vectorises where a float one (NaN and signed-zero
 * rules) does not. */
EDGEFL_DISPATCH static float edgefl_max_abs(const float *x, size_t n)
{
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t a = edgefl_f32_bits(x[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return edgefl_bits_f32(m);
}

/* codes[i] = clip(round-half-even(x[i] / scale), -127, 127), the quotient in float32 (as NumPy's
 * np.rint(x / scale) computes it); scale > 0. */
EDGEFL_DISPATCH static void edgefl_quantize_int8(const float *x, size_t n, float scale,
                                                 int8_t *codes)
{
    for (size_t i = 0; i < n; i++) {
        float q = rintf(x[i] / scale);
        q = q > 127.0f ? 127.0f : q;
        q = q < -127.0f ? -127.0f : q;
        codes[i] = (int8_t)q;
    }
}

/* Ternary codes, four per byte from the least significant bits: 00 zero, 01 positive,
 * 11 negative; the padding of the last byte stays zero. */
EDGEFL_DISPATCH static void edgefl_pack_ternary(const float *x, size_t n, uint8_t *out)
{
    size_t full = n / 4;
    for (size_t b = 0; b < full; b++) {
        uint32_t byte = 0;
        for (uint32_t j = 0; j < 4; j++) {
            float v = x[4 * b + j];
            byte |= (uint32_t)((v != 0.0f) | ((v < 0.0f) << 1)) << (2 * j);
        }
        out[b] = (uint8_t)byte;
    }
    if (n % 4) {
        uint32_t byte = 0;
        for (size_t j = 0; j < n % 4; j++) {
            float v = x[4 * full + j];
            byte |= (uint32_t)((v != 0.0f) | ((v < 0.0f) << 1)) << (2 * j);
        }
        out[full] = (uint8_t)byte;
    }
}

/* out[i] = codes[i] * scale in float32; nonzero when some code is -128 (never produced). */
EDGEFL_DISPATCH static int edgefl_dequantize_int8(const int8_t *codes, size_t n, float scale,
                                                  float *out)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        bad |= codes[i] == -128;
        out[i] = (float)codes[i] * scale;
    }
    return bad != 0;
}

/* Conversions through the F16C instructions where the CPU has them (checked at run time):
 * the same rounding as the portable converters, eight values per instruction. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define EDGEFL_HAVE_F16C_PATH 1

__attribute__((target("avx2,f16c"))) static void edgefl_f16c_from_float(const float *x, size_t n,
                                                                       uint16_t *halves)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(halves + i), h);
    }
    for (; i < n; i++) halves[i] = edgefl_float_to_half(x[i]);
}

__attribute__((target("avx2,f16c"))) static void edgefl_f16c_to_float(const uint16_t *halves,
                                                                     size_t n, float *out)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(halves + i));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) out[i] = edgefl_half_to_float(halves[i]);
}

static int edgefl_has_f16c(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
#define EDGEFL_HAVE_F16C_PATH 0
#endif

/* Nonzero when some half is Inf or NaN (exponent all ones). */
EDGEFL_DISPATCH static int edgefl_any_half_non_finite(const uint16_t *halves, size_t n)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (halves[i] & 0x7c00u) == 0x7c00u;
    return bad != 0;
}

/* halves[i] = half(x[i]) for finite x; nonzero when some value rounds to infinity. */
static int edgefl_quantize_f16(const float *x, size_t n, uint16_t *halves)
{
#if EDGEFL_HAVE_F16C_PATH
    if (edgefl_has_f16c()) {
        edgefl_f16c_from_float(x, n, halves);
        return edgefl_any_half_non_finite(halves, n);
    }
#endif
    for (size_t i = 0; i < n; i++) halves[i] = edgefl_float_to_half(x[i]);
    return edgefl_any_half_non_finite(halves, n);
}

/* out[i] = float(halves[i]); nonzero when some half is Inf or NaN. */
static int edgefl_dequantize_f16(const uint16_t *halves, size_t n, float *out)
{
    if (edgefl_any_half_non_finite(halves, n)) return 1;
#if EDGEFL_HAVE_F16C_PATH
    if (edgefl_has_f16c()) {
        edgefl_f16c_to_float(halves, n, out);
        return 0;
    }
#endif
    for (size_t i = 0; i < n; i++) out[i] = edgefl_half_to_float(halves[i]);
    return 0;
}

/* Trailing zero bits of a nonzero byte, and set bits of a byte (builtins where the compiler has
 * them, a portable loop elsewhere). */
static inline int edgefl_ctz8(uint32_t byte)
{
#if defined(__GNUC__)
    return __builtin_ctz(byte);
#else
    int n = 0;
    while (!(byte & 1u)) { byte >>= 1; n++; }
    return n;
#endif
}

static inline int edgefl_popcount8(uint32_t byte)
{
#if defined(__GNUC__)
    return __builtin_popcount(byte);
#else
    int n = 0;
    for (; byte; byte &= byte - 1) n++;
    return n;
#endif
}

#endif
