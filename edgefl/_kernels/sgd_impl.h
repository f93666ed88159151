/*
 * Hot loops of edgefl's fused SGD step (see sgd.pyx for the algorithm and its contract).
 *
 * Everything here works on small, L1-resident float32 matrices (a 64-32-10 MLP and a batch of 32
 * take ~30 KB), where a call into a BLAS costs more than the arithmetic. The one product routine
 * keeps a 4-row x 16-column block of the result in registers (GCC vector extensions, so the same
 * source becomes SSE2, AVX2+FMA or NEON code), and the step's row-major buffers are padded to
 * multiples of 8 columns so every tile is a full vector. The softmax uses a vectorised exp.
 *
 * Portability: on x86-64 with GCC and glibc each entry point is compiled twice with
 * target_clones, for x86-64-v3 (AVX2 + FMA) and for the baseline, and the loader picks one at
 * run time; elsewhere the baseline build is the only one (NEON is baseline on aarch64).
 *
 * Nothing here allocates, raises or touches Python: the caller validates and holds no GIL.
 */
#ifndef EDGEFL_SGD_IMPL_H
#define EDGEFL_SGD_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__GNUC__)
#error "edgefl's SGD kernel uses GCC/Clang vector extensions: build it with GCC or Clang"
#endif

/* Defining EDGEFL_CLONES empty (-DEDGEFL_CLONES=) builds the baseline code only, to test it. */
#ifndef EDGEFL_CLONES
#if defined(__x86_64__) && !defined(__clang__) && defined(__GLIBC__) && __GNUC__ >= 11
#define EDGEFL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EDGEFL_CLONES
#endif
#endif

#define EDGEFL_INLINE static inline __attribute__((always_inline))

/* Width of one register tile, in floats; buffers are padded to a multiple of it. (The vector
 * constants below spell out its 8 lanes.) */
#define EDGEFL_TILE 8

typedef float edgefl_v8 __attribute__((vector_size(EDGEFL_TILE * sizeof(float))));
typedef int32_t edgefl_v8i __attribute__((vector_size(EDGEFL_TILE * sizeof(int32_t))));
/* The same vector at a float's alignment: rows of the caller's arrays are only 4-byte aligned. */
typedef float edgefl_v8u __attribute__((vector_size(EDGEFL_TILE * sizeof(float)), aligned(4),
                                        may_alias));

#define EDGEFL_LOAD(p) (*(const edgefl_v8u *)(p))
#define EDGEFL_STORE(p, v) (*(edgefl_v8u *)(p) = (v))

/* Row length of a buffer that holds n columns as whole tiles. */
static inline ptrdiff_t edgefl_padded(ptrdiff_t n)
{
    return (n + EDGEFL_TILE - 1) / EDGEFL_TILE * EDGEFL_TILE;
}

/*
 * R rows x T tiles of C = act(init + A B), accumulated in R * T vector registers.
 *
 * Called with constant R and T only, so the loops unroll and `acc` lives in registers. Eight
 * independent accumulators (R = 4, T = 2) hide the latency of a fused multiply-add: with four,
 * every iteration waits for the previous one and the FMA units idle half the time.
 */
EDGEFL_INLINE void edgefl_block(const int R, const int T, ptrdiff_t K, const float *a,
                                ptrdiff_t a_rs, ptrdiff_t a_cs, const float *const *Bt,
                                const ptrdiff_t *ldbt, const edgefl_v8 *init, int relu,
                                float *C, ptrdiff_t ldc)
{
    edgefl_v8 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = init[t];
    for (ptrdiff_t k = 0; k < K; k++) {
        edgefl_v8 bk[2];
        for (int t = 0; t < T; t++)
            bk[t] = EDGEFL_LOAD(Bt[t] + k * ldbt[t]);
        for (int r = 0; r < R; r++) {
            float ark = a[r * a_rs + k * a_cs];
            for (int t = 0; t < T; t++)
                acc[r][t] += ark * bk[t];
        }
    }
    const edgefl_v8 zero = {0};
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            /* max(acc, 0) that keeps NaN (like np.maximum), so a NaN reaches the loss. */
            if (relu)
                acc[r][t] = (edgefl_v8)((edgefl_v8i)acc[r][t] & ~(edgefl_v8i)(acc[r][t] < zero));
            EDGEFL_STORE(C + r * ldc + t * EDGEFL_TILE, acc[r][t]);
        }
}

/*
 * C = act(bias + A B) for an (M x K) left factor A read through strides, B (K x N) row-major.
 *
 * A(i, k) is A[i * a_rs + k * a_cs], so passing a_rs = 1, a_cs = lda multiplies by the transpose
 * of a row-major matrix without copying it. C has row stride ldc >= edgefl_padded(N); its
 * columns N .. padded(N) - 1 are written as zeros (for act = ReLU too), which keeps the padding
 * of the step's buffers zero. B's last, partial tile is copied into `pack` (K x 8 floats) so no
 * load reads past the end of a row of B. bias (length N) may be NULL.
 */
EDGEFL_CLONES static void edgefl_matmul(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                                        const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs,
                                        const float *B, ptrdiff_t ldb, const float *bias,
                                        int relu, float *C, ptrdiff_t ldc, float *pack)
{
    for (ptrdiff_t j0 = 0; j0 < N; j0 += 2 * EDGEFL_TILE) {
        const int T = N - j0 > EDGEFL_TILE ? 2 : 1;
        const float *Bt[2];
        ptrdiff_t ldbt[2];
        edgefl_v8 init[2] = {{0}, {0}};
        for (int t = 0; t < T; t++) {
            ptrdiff_t jt = j0 + t * EDGEFL_TILE;
            ptrdiff_t width = N - jt < EDGEFL_TILE ? N - jt : EDGEFL_TILE;
            if (width < EDGEFL_TILE) {
                for (ptrdiff_t k = 0; k < K; k++)
                    for (ptrdiff_t j = 0; j < EDGEFL_TILE; j++)
                        pack[k * EDGEFL_TILE + j] = j < width ? B[k * ldb + jt + j] : 0.0f;
                Bt[t] = pack;
                ldbt[t] = EDGEFL_TILE;
                if (bias)
                    for (ptrdiff_t j = 0; j < width; j++)
                        init[t][j] = bias[jt + j];
            } else {
                Bt[t] = B + jt;
                ldbt[t] = ldb;
                if (bias)
                    init[t] = EDGEFL_LOAD(bias + jt);
            }
        }
        ptrdiff_t i = 0;
        if (T == 2) {
            for (; i + 4 <= M; i += 4)
                edgefl_block(4, 2, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt, init, relu,
                             C + i * ldc + j0, ldc);
            for (; i < M; i++)
                edgefl_block(1, 2, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt, init, relu,
                             C + i * ldc + j0, ldc);
        } else {
            for (; i + 4 <= M; i += 4)
                edgefl_block(4, 1, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt, init, relu,
                             C + i * ldc + j0, ldc);
            for (; i < M; i++)
                edgefl_block(1, 1, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt, init, relu,
                             C + i * ldc + j0, ldc);
        }
    }
}

/*
 * z[j] = e^(z[j] - shift) for one tile, shift >= every z[j], in vector registers where a call
 * to expf per element would cost more than the rest of the softmax. Cephes' expf: x = n ln2 + r
 * with |r| <= ln2 / 2, a degree-5 polynomial for e^r, 2^n from the exponent bits; about 1 ulp
 * from the exact value (at most 1.02 ulp over every float in [-87, 0], measured with FMA).
 *
 * The softmax only exponentiates logits minus their row maximum, so x > 0 never occurs; below
 * -87.3 the result would leave the normal range and is returned as ~1e-38 instead, which does
 * not move a sum that contains e^0 = 1. NaN stays NaN, so a bad logit still reaches the loss.
 */
EDGEFL_INLINE void edgefl_exp_shifted(float *z, float shift)
{
    edgefl_v8 x = EDGEFL_LOAD(z) - shift;
    const edgefl_v8 lowest = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    const edgefl_v8i below = x < lowest;
    x = (edgefl_v8)((below & (edgefl_v8i)lowest) | (~below & (edgefl_v8i)x));
    edgefl_v8 t = x * 1.44269504088896341f - 0.5f;
    t = (edgefl_v8)((edgefl_v8i)t & (edgefl_v8i)(t == t)); /* NaN -> 0: a defined conversion */
    edgefl_v8i n = __builtin_convertvector(t, edgefl_v8i); /* toward zero: ceil(t) = round */
    edgefl_v8 fn = __builtin_convertvector(n, edgefl_v8);
    edgefl_v8 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    edgefl_v8 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    EDGEFL_STORE(z, p * (edgefl_v8)((n + 127) << 23));
}

/*
 * Softmax cross-entropy on logits Z (m x c, row stride ldz >= edgefl_padded(c)), labels y in
 * [0, c).
 *
 * Returns the mean loss, each row's log-sum-exp shifted by the row maximum and everything summed
 * in double. Overwrites Z with the gradient of the mean loss with respect to the logits,
 * (softmax(z) - onehot(y)) / m, and zeroes its padding columns.
 */
EDGEFL_CLONES static double edgefl_softmax_xent(ptrdiff_t m, ptrdiff_t c, float *Z,
                                                ptrdiff_t ldz, const int32_t *y)
{
    /* Sum of log(row sum) = log of their product: one log per batch instead of one per row.
     * Each row sum lies in [1, c], so the product is folded into `total` long before it could
     * overflow a double. */
    double total = 0.0, product = 1.0;
    const float inv_m = 1.0f / (float)m;
    const ptrdiff_t padded = edgefl_padded(c);
    const edgefl_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const edgefl_v8 minus_inf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                 -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    /* Eight rows at a time, one stage after the other: each row is a chain of dependent steps
     * (maximum, exponentials, sum, division), and interleaving independent rows keeps the
     * vector units busy where one row at a time would mostly wait. */
    enum { ROWS = 8 };
    for (ptrdiff_t i0 = 0; i0 < m; i0 += ROWS) {
        const ptrdiff_t rows = m - i0 < ROWS ? m - i0 : ROWS;
        float shift[ROWS], scale[ROWS];
        double sum[ROWS];
        /* Row maxima as vectors and a short tree. NaN drops out of the maximum but not out of
         * the exponentials below, so it still reaches the loss. */
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float *z = Z + (i0 + r) * ldz;
            edgefl_v8 top = minus_inf;
            for (ptrdiff_t j = 0; j < padded; j += EDGEFL_TILE) {
                edgefl_v8i valid = lane < (int32_t)(c - j);
                edgefl_v8 v = EDGEFL_LOAD(z + j);
                v = (edgefl_v8)((valid & (edgefl_v8i)v) | (~valid & (edgefl_v8i)minus_inf));
                edgefl_v8i larger = v > top;
                top = (edgefl_v8)((larger & (edgefl_v8i)v) | (~larger & (edgefl_v8i)top));
            }
            float t0 = top[0] > top[4] ? top[0] : top[4], t1 = top[1] > top[5] ? top[1] : top[5];
            float t2 = top[2] > top[6] ? top[2] : top[6], t3 = top[3] > top[7] ? top[3] : top[7];
            t0 = t0 > t1 ? t0 : t1;
            t2 = t2 > t3 ? t2 : t3;
            shift[r] = t0 > t2 ? t0 : t2;
            total -= (double)(z[y[i0 + r]] - shift[r]);
        }
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < padded; j += EDGEFL_TILE)
                edgefl_exp_shifted(Z + (i0 + r) * ldz + j, shift[r]);
        for (ptrdiff_t r = 0; r < rows; r++) {
            float *z = Z + (i0 + r) * ldz;
            for (ptrdiff_t j = c; j < padded; j++)
                z[j] = 0.0f;
            double lanes[EDGEFL_TILE] = {0.0};
            for (ptrdiff_t j = 0; j < padded; j += EDGEFL_TILE)
                for (int k = 0; k < EDGEFL_TILE; k++)
                    lanes[k] += z[j + k];
            sum[r] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                     + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            scale[r] = (float)(1.0 / sum[r]) * inv_m;
        }
        for (ptrdiff_t r = 0; r < rows; r++) {
            product *= sum[r];
            if (product > 1e250) {
                total += log(product);
                product = 1.0;
            }
        }
        for (ptrdiff_t r = 0; r < rows; r++) {
            float *z = Z + (i0 + r) * ldz;
#pragma omp simd
            for (ptrdiff_t j = 0; j < padded; j++)
                z[j] *= scale[r];
            z[y[i0 + r]] -= inv_m;
        }
    }
    return (total + log(product)) / (double)m;
}

/* out[j] = sum_i G[i, j] over m rows of n columns (row stride ldg): the bias gradient. */
EDGEFL_CLONES static void edgefl_column_sums(ptrdiff_t m, ptrdiff_t n, const float *G,
                                             ptrdiff_t ldg, float *out)
{
    for (ptrdiff_t j = 0; j < n; j++)
        out[j] = 0.0f;
    for (ptrdiff_t i = 0; i < m; i++) {
#pragma omp simd
        for (ptrdiff_t j = 0; j < n; j++)
            out[j] += G[i * ldg + j];
    }
}

/* T[j, i] = W[i, j] for W (rows x cols, row-major); T has row stride ldt >= rows. */
EDGEFL_CLONES static void edgefl_transpose(ptrdiff_t rows, ptrdiff_t cols, const float *W,
                                           float *T, ptrdiff_t ldt)
{
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < cols; j++)
            T[j * ldt + i] = W[i * cols + j];
}

/* Back-propagate through ReLU: D[i, k] = 0 where the layer's output H[i, k] was not positive. */
EDGEFL_CLONES static void edgefl_relu_backward(ptrdiff_t m, ptrdiff_t n, float *D, const float *H,
                                               ptrdiff_t ld)
{
    for (ptrdiff_t i = 0; i < m; i++) {
#pragma omp simd
        for (ptrdiff_t k = 0; k < n; k++)
            D[i * ld + k] = H[i * ld + k] > 0.0f ? D[i * ld + k] : 0.0f;
    }
}

/*
 * The update of one parameter block P (rows x cols, row-major), given its loss gradient G
 * (row stride ldg, overwritten):
 *     g = G + decay * P + mu * (P - R);  v = momentum * v + g;  P -= lr * v
 * R (the FedProx reference) is read only when mu > 0, V (velocity, like P) only when
 * momentum > 0; without momentum the step is P -= lr * g.
 */
EDGEFL_CLONES static void edgefl_sgd_update(ptrdiff_t rows, ptrdiff_t cols, float *P, float *G,
                                            ptrdiff_t ldg, const float *R, float *V, float lr,
                                            float momentum, float decay, float mu)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *p = P + r * cols, *g = G + r * ldg;
        if (decay > 0.0f) {
#pragma omp simd
            for (ptrdiff_t j = 0; j < cols; j++)
                g[j] += decay * p[j];
        }
        if (mu > 0.0f) {
            const float *ref = R + r * cols;
#pragma omp simd
            for (ptrdiff_t j = 0; j < cols; j++)
                g[j] += mu * (p[j] - ref[j]);
        }
        if (momentum > 0.0f) {
            float *v = V + r * cols;
#pragma omp simd
            for (ptrdiff_t j = 0; j < cols; j++) {
                v[j] = momentum * v[j] + g[j];
                g[j] = v[j];
            }
        }
#pragma omp simd
        for (ptrdiff_t j = 0; j < cols; j++)
            p[j] -= lr * g[j];
    }
}

#endif /* EDGEFL_SGD_IMPL_H */
