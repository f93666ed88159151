/* The passes over the data of edgefl's top-k kernels (topk.pyx drives them).
 *
 * A magnitude key is the float's bit pattern with the sign bit cleared: for non-negative IEEE-754
 * floats, unsigned integer order of the bits is value order (subnormals included; -0.0 -> 0), and
 * NaN/Inf map to keys >= 0x7f800000.
 *
 * The collecting passes work in blocks of EDGEFL_TOPK_BLOCK elements: a vectorisable loop finds
 * the block's largest key, and only a block holding a candidate is looked at element by element.
 * With about 1% of entries selected, most blocks are skipped, so the pass runs near memory speed.
 *
 * NumPy picks AVX2/AVX-512 loops at run time; a portable -O3 build is SSE2 only on x86-64. GCC's
 * target_clones compiles the vectorisable helpers for AVX2 and the baseline and picks one at load
 * time, so one binary stays portable (aarch64 has NEON as baseline).
 */
#ifndef EDGEFL_TOPK_IMPL_H
#define EDGEFL_TOPK_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define EDGEFL_TOPK_DISPATCH __attribute__((target_clones("avx2", "default")))
#else
#define EDGEFL_TOPK_DISPATCH
#endif

/* Elements per block of the collecting passes; a block's selection fits one 32-bit mask. */
#define EDGEFL_TOPK_BLOCK 32
/* Level-1 histogram: the top 12 of the key's 31 bits (8 exponent + 4 mantissa bits). */
#define EDGEFL_TOPK_SHIFT 19
#define EDGEFL_TOPK_BINS (1u << 12)
/* Interleaved copies of the level-1 counters: consecutive elements of smooth data fall in the same
 * bin, and a single set of counters would serialise on store-to-load forwarding. */
#define EDGEFL_TOPK_COPIES 4

static inline uint32_t edgefl_magnitude_key(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits & 0x7fffffffu;
}

/* Index of the lowest set bit of a non-zero word. */
static inline int edgefl_lowest_bit(uint64_t word)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(word);
#else
    int bit = 0;
    while (!(word & 1)) {
        word >>= 1;
        bit++;
    }
    return bit;
#endif
}

/* Number of set bits of a word. */
static inline int edgefl_bit_count(uint32_t word)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcount(word);
#else
    int bits = 0;
    for (; word; word &= word - 1) bits++;
    return bits;
#endif
}

/* Largest key of block[0:EDGEFL_TOPK_BLOCK]. */
static inline uint32_t edgefl_block_max_key(const float *block)
{
    uint32_t largest = 0;
    for (int j = 0; j < EDGEFL_TOPK_BLOCK; j++) {
        uint32_t key = edgefl_magnitude_key(block[j]);
        largest = key > largest ? key : largest;
    }
    return largest;
}

/* Bit j set when key(block[j]) >= lowest, for the keys of a block. */
static inline uint32_t edgefl_block_mask_from(const float *block, uint32_t lowest)
{
    uint32_t mask = 0;
    for (int j = 0; j < EDGEFL_TOPK_BLOCK; j++)
        mask |= (uint32_t)(edgefl_magnitude_key(block[j]) >= lowest) << j;
    return mask;
}

/* Below this many elements one set of counters is used: zeroing and merging the interleaved copies
 * would cost more than the stalls they avoid. */
#define EDGEFL_TOPK_SMALL 65536

/* counts[b] += the interleaved copies of bin b. */
static inline void edgefl_topk_merge(const uint32_t *copies, ptrdiff_t *counts)
{
    for (int c = 0; c < EDGEFL_TOPK_COPIES; c++) {
        for (uint32_t b = 0; b < EDGEFL_TOPK_BINS; b++) counts[b] += copies[c * EDGEFL_TOPK_BINS + b];
    }
}

/* Level-1 counts of the keys of x (of x + u when u is not NULL, computed on the fly and not stored)
 * into counts[EDGEFL_TOPK_BINS]. Returns 0, or -1 when out of memory. */
static int edgefl_topk_histogram(const float *x, const float *u, size_t n, ptrdiff_t *counts)
{
    memset(counts, 0, EDGEFL_TOPK_BINS * sizeof *counts);
    if (n < EDGEFL_TOPK_SMALL) {
        for (size_t i = 0; i < n; i++)
            counts[edgefl_magnitude_key(u ? x[i] + u[i] : x[i]) >> EDGEFL_TOPK_SHIFT]++;
        return 0;
    }
    uint32_t *copies = calloc(EDGEFL_TOPK_COPIES * EDGEFL_TOPK_BINS, sizeof *copies);
    if (copies == NULL) return -1;
    size_t body = n - n % EDGEFL_TOPK_COPIES;
    if (u == NULL) {
        for (size_t i = 0; i < body; i += EDGEFL_TOPK_COPIES) {
            for (int c = 0; c < EDGEFL_TOPK_COPIES; c++)
                copies[c * EDGEFL_TOPK_BINS
                       + (edgefl_magnitude_key(x[i + c]) >> EDGEFL_TOPK_SHIFT)]++;
        }
    } else {
        for (size_t i = 0; i < body; i += EDGEFL_TOPK_COPIES) {
            for (int c = 0; c < EDGEFL_TOPK_COPIES; c++)
                copies[c * EDGEFL_TOPK_BINS
                       + (edgefl_magnitude_key(x[i + c] + u[i + c]) >> EDGEFL_TOPK_SHIFT)]++;
        }
    }
    for (size_t i = body; i < n; i++)
        copies[edgefl_magnitude_key(u ? x[i] + u[i] : x[i]) >> EDGEFL_TOPK_SHIFT]++;
    edgefl_topk_merge(copies, counts);
    free(copies);
    return 0;
}

/* Returned by the collecting passes when more than `capacity` entries qualify. */
#define EDGEFL_TOPK_OVERFLOW ((size_t)-1)

/* Indices i (ascending) with key(x[i]) >= lowest into candidates[0:capacity]; returns how many, or
 * EDGEFL_TOPK_OVERFLOW. Inside a block that holds one, the loop visits only the set bits of the
 * block's mask. *largest gets the largest key of x (NaN/Inf detection when no histogram ran). */
EDGEFL_TOPK_DISPATCH static size_t edgefl_topk_collect(const float *x, size_t n, uint32_t lowest,
                                                       uint32_t *candidates, size_t capacity,
                                                       uint32_t *largest)
{
    size_t m = 0, i = 0;
    uint32_t top = 0;
    for (; i + EDGEFL_TOPK_BLOCK <= n; i += EDGEFL_TOPK_BLOCK) {
        uint32_t block_top = edgefl_block_max_key(x + i);
        top = block_top > top ? block_top : top;
        if (block_top < lowest || m == EDGEFL_TOPK_OVERFLOW) continue;
        uint32_t mask = edgefl_block_mask_from(x + i, lowest);
        if (m + (size_t)edgefl_bit_count(mask) > capacity) {
            m = EDGEFL_TOPK_OVERFLOW;
            continue;
        }
        for (; mask; mask &= mask - 1)
            candidates[m++] = (uint32_t)(i + (size_t)edgefl_lowest_bit(mask));
    }
    for (; i < n; i++) {
        uint32_t key = edgefl_magnitude_key(x[i]);
        top = key > top ? key : top;
        if (key < lowest || m == EDGEFL_TOPK_OVERFLOW) continue;
        if (m == capacity) m = EDGEFL_TOPK_OVERFLOW;
        else candidates[m++] = (uint32_t)i;
    }
    *largest = top;
    return m;
}

/* r += u, fused with edgefl_topk_collect on the new r. The whole of r is accumulated even when the
 * candidates overflow. */
EDGEFL_TOPK_DISPATCH static size_t edgefl_topk_accumulate_collect(float *r, const float *u,
                                                                  size_t n, uint32_t lowest,
                                                                  uint32_t *candidates,
                                                                  size_t capacity)
{
    size_t m = 0, i = 0;
    for (; i + EDGEFL_TOPK_BLOCK <= n; i += EDGEFL_TOPK_BLOCK) {
        float *block = r + i;
        for (int j = 0; j < EDGEFL_TOPK_BLOCK; j++) block[j] += u[i + j];
        if (edgefl_block_max_key(block) < lowest || m == EDGEFL_TOPK_OVERFLOW) continue;
        uint32_t mask = edgefl_block_mask_from(block, lowest);
        if (m + (size_t)edgefl_bit_count(mask) > capacity) {
            m = EDGEFL_TOPK_OVERFLOW;
            continue;
        }
        for (; mask; mask &= mask - 1)
            candidates[m++] = (uint32_t)(i + (size_t)edgefl_lowest_bit(mask));
    }
    for (; i < n; i++) {
        r[i] += u[i];
        if (edgefl_magnitude_key(r[i]) < lowest || m == EDGEFL_TOPK_OVERFLOW) continue;
        if (m == capacity) m = EDGEFL_TOPK_OVERFLOW;
        else candidates[m++] = (uint32_t)i;
    }
    return m;
}

/* Largest key of r + u: the finiteness check of error feedback, before anything is written. */
EDGEFL_TOPK_DISPATCH static uint32_t edgefl_max_key_sum(const float *r, const float *u, size_t n)
{
    uint32_t top = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t key = edgefl_magnitude_key(r[i] + u[i]);
        top = key > top ? key : top;
    }
    return top;
}

/* Keys of `samples` evenly spaced entries of x (of x + u when u is not NULL); samples <= n. */
static void edgefl_topk_sample_keys(const float *x, const float *u, size_t n, size_t samples,
                                    uint32_t *keys)
{
    size_t stride = n / samples;
    for (size_t j = 0; j < samples; j++) {
        size_t i = j * stride;
        keys[j] = edgefl_magnitude_key(u ? x[i] + u[i] : x[i]);
    }
}

/* How many keys of x exceed threshold; *largest gets the largest key (to detect NaN/Inf). */
EDGEFL_TOPK_DISPATCH static size_t edgefl_count_above(const float *x, size_t n, uint32_t threshold,
                                                      uint32_t *largest)
{
    /* 32-bit counters keep the loop in one vector width; flushed before they could overflow. */
    size_t count = 0, i = 0;
    uint32_t top = 0;
    while (i < n) {
        size_t end = n - i > ((size_t)1 << 30) ? i + ((size_t)1 << 30) : n;
        uint32_t part = 0;
        for (; i < end; i++) {
            uint32_t key = edgefl_magnitude_key(x[i]);
            part += key > threshold;
            top = key > top ? key : top;
        }
        count += part;
    }
    *largest = top;
    return count;
}

/* Every i (ascending) with key(x[i]) > threshold, into idx and vals. */
EDGEFL_TOPK_DISPATCH static void edgefl_collect_above(const float *x, size_t n, uint32_t threshold,
                                                      uint32_t *idx, float *vals)
{
    size_t m = 0, i = 0;
    for (; i + EDGEFL_TOPK_BLOCK <= n; i += EDGEFL_TOPK_BLOCK) {
        if (edgefl_block_max_key(x + i) <= threshold) continue;
        for (uint32_t mask = edgefl_block_mask_from(x + i, threshold + 1); mask; mask &= mask - 1) {
            size_t j = i + (size_t)edgefl_lowest_bit(mask);
            idx[m] = (uint32_t)j;
            vals[m] = x[j];
            m++;
        }
    }
    for (; i < n; i++) {
        if (edgefl_magnitude_key(x[i]) > threshold) {
            idx[m] = (uint32_t)i;
            vals[m] = x[i];
            m++;
        }
    }
}

#endif
