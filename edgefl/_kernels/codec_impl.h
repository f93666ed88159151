/* float32 <-> IEEE half conversions for edgefl's "f16" quantizer, bit-identical to NumPy's
 * astype(np.float16) / astype(np.float32): round to nearest, ties to even, subnormals kept.
 * (After F. Giesen's branch-light converters; plain C so every compiler and CPU gets the same bits.)
 */
#ifndef EDGEFL_CODEC_IMPL_H
#define EDGEFL_CODEC_IMPL_H

#include <stdint.h>
#include <string.h>

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
