/* The arithmetic of edgefl's noise kernels, kept in C so its float32 rounding is pinned down.
 *
 * The NumPy twin computes noise = scale * draw (one float32 multiply), flips its sign where a sign
 * bit is set (exact) and adds it to x (one float32 add). A compiler allowed to contract
 * x + scale * draw into a fused multiply-add (GCC does by default wherever FMA is available:
 * aarch64, or x86-64 built with -march=native) would round once instead of twice and break the
 * bit-identity with the twin, so contraction is switched off for these functions.
 */
#ifndef EDGEFL_NOISE_IMPL_H
#define EDGEFL_NOISE_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#define EDGEFL_NO_CONTRACT
#elif defined(__GNUC__)
#define EDGEFL_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define EDGEFL_NO_CONTRACT
#endif

/* x[i] += (bit i of signs set ? -(scale * draws[i]) : scale * draws[i]), for i < n, where bit i
 * is bit i % 32 of signs[i / 32]. The sign is applied by flipping the product's sign bit (exact),
 * never by a branch on a random bit, which would be mispredicted half the time. With GCC/clang
 * vector extensions (SSE2 on x86-64, NEON on aarch64) four elements go at a time: each lane tests
 * its own constant bit of the sign word. */
EDGEFL_NO_CONTRACT static void edgefl_add_signed_scaled(float *x, const float *draws,
                                                        const uint32_t *signs, size_t n,
                                                        float scale)
{
    size_t done = 0;
#if defined(__GNUC__)
    typedef uint32_t u32x4 __attribute__((vector_size(16)));
    typedef float f32x4 __attribute__((vector_size(16)));
    const u32x4 sign_bit = {0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u};
    const f32x4 factor = {scale, scale, scale, scale};
    size_t words = n / 32;
    for (size_t w = 0; w < words; w++) {
        u32x4 word = {signs[w], signs[w], signs[w], signs[w]};
        u32x4 lane_bit = {1u, 2u, 4u, 8u};
        for (size_t g = 0; g < 8; g++, lane_bit <<= 4) {
            size_t i = 32 * w + 4 * g;
            f32x4 d, v;
            memcpy(&d, draws + i, sizeof d);
            memcpy(&v, x + i, sizeof v);
            f32x4 noise = factor * d;
            u32x4 flip = (u32x4)((word & lane_bit) != 0) & sign_bit;
            noise = (f32x4)((u32x4)noise ^ flip);
            v += noise;
            memcpy(x + i, &v, sizeof v);
        }
    }
    done = 32 * words;
#endif
    for (size_t i = done; i < n; i++) {
        float noise = scale * draws[i];
        uint32_t bits;
        memcpy(&bits, &noise, sizeof bits);
        bits ^= ((signs[i >> 5] >> (i & 31)) & 1u) << 31;
        memcpy(&noise, &bits, sizeof bits);
        x[i] += noise;
    }
}

/* x[i] += scale * draws[i], for i < n. */
EDGEFL_NO_CONTRACT static void edgefl_add_scaled(float *x, const float *draws, size_t n,
                                                 float scale)
{
    for (size_t i = 0; i < n; i++) {
        float noise = scale * draws[i];
        x[i] += noise;
    }
}

#endif
