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
 * is bit i % 32 of signs[i / 32]. The sign is applied by flipping the float's sign bit: a branch
 * on a random bit would be mispredicted half the time. */
EDGEFL_NO_CONTRACT static void edgefl_add_signed_scaled(float *x, const float *draws,
                                                        const uint32_t *signs, size_t n,
                                                        float scale)
{
    for (size_t i = 0; i < n; i++) {
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
