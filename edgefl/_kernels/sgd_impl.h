/*
 * Hot loops of edgefl's fused SGD step (see sgd.pyx for the algorithm and its contract).
 *
 * Everything here works on small, L1-resident float32 matrices (a 64-32-10 MLP and a batch of 32
 * take ~30 KB), where a call into a BLAS costs more than the arithmetic. The one product routine
 * keeps a block of the result in eight vector registers (GCC vector extensions, so the same
 * source becomes SSE2, AVX2 + FMA or NEON code), and the step's row-major buffers are padded to
 * multiples of 8 columns so every tile is whole vectors. The softmax uses a vectorised exp.
 *
 * Portability: on x86-64 with GCC and glibc the product routine exists for 8-float AVX2 + FMA
 * registers and for 4-float baseline ones, picked at run time, and the other entry points are
 * compiled twice with target_clones (x86-64-v3 and the baseline); elsewhere the 4-float
 * baseline build is the only one (NEON is baseline on aarch64).
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

/*
 * EDGEFL_WIDE: whether this build carries an AVX2 + FMA variant chosen at run time (x86-64 with
 * GCC and glibc). Defining EDGEFL_BASELINE_ONLY builds the baseline code alone, to test it.
 */
#if !defined(EDGEFL_BASELINE_ONLY) && defined(__x86_64__) && !defined(__clang__) \
    && defined(__GLIBC__) && __GNUC__ >= 11
#define EDGEFL_WIDE 1
#define EDGEFL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define EDGEFL_TARGET_WIDE __attribute__((target("arch=x86-64-v3")))
#else
#define EDGEFL_WIDE 0
#define EDGEFL_CLONES
#endif

#define EDGEFL_INLINE static inline __attribute__((always_inline))

/* Width of one register tile, in floats; buffers are padded to a multiple of it. */
#define EDGEFL_TILE 8

/*
 * Vectors of 4 floats (SSE2, NEON: every target has them) and of 8 (AVX2). Each must only be
 * used where the machine has registers that wide: GCC keeps a wider vector in memory, which
 * costs ~20x. The `u` types are the same vectors at a float's alignment, for loads and stores
 * from rows of the caller's arrays, which are only 4-byte aligned.
 */
typedef float edgefl_v4 __attribute__((vector_size(16)));
typedef int32_t edgefl_v4i __attribute__((vector_size(16)));
typedef float edgefl_v4u __attribute__((vector_size(16), aligned(4), may_alias));
typedef float edgefl_v8 __attribute__((vector_size(32)));
typedef int32_t edgefl_v8i __attribute__((vector_size(32)));
typedef float edgefl_v8u __attribute__((vector_size(32), aligned(4), may_alias));

/* Row length of a buffer that holds n columns as whole tiles. */
static inline ptrdiff_t edgefl_padded(ptrdiff_t n)
{
    return (n + EDGEFL_TILE - 1) / EDGEFL_TILE * EDGEFL_TILE;
}

/*
 * R rows x T tiles of C = act(init + A B), accumulated in registers of LANES floats: R * T *
 * (EDGEFL_TILE / LANES) of them. Defined once per vector width (the macro only spares writing
 * the same loops twice).
 *
 * Called with constant R and T only, so the loops unroll and `acc` lives in registers. Eight
 * independent accumulators hide the latency of a fused multiply-add: with four, every iteration
 * waits for the previous one and the FMA units idle half the time.
 */
#define EDGEFL_DEFINE_BLOCK(NAME, VEC, VECI, VECU, LANES)                                      \
    EDGEFL_INLINE void NAME(const int R, const int T, ptrdiff_t K, const float *a,              \
                            ptrdiff_t a_rs, ptrdiff_t a_cs, const float *const *Bt,             \
                            const ptrdiff_t *ldbt, const float (*init)[EDGEFL_TILE], int relu,  \
                            float *C, ptrdiff_t ldc)                                            \
    {                                                                                           \
        enum { P = EDGEFL_TILE / (LANES) }; /* vectors per tile */                              \
        VEC acc[4][2 * P];                                                                      \
        for (int r = 0; r < R; r++)                                                             \
            for (int v = 0; v < T * P; v++)                                                     \
                acc[r][v] = *(const VECU *)(init[v / P] + v % P * (LANES));                     \
        for (ptrdiff_t k = 0; k < K; k++) {                                                     \
            VEC bk[2 * P];                                                                      \
            for (int v = 0; v < T * P; v++)                                                     \
                bk[v] = *(const VECU *)(Bt[v / P] + k * ldbt[v / P] + v % P * (LANES));         \
            for (int r = 0; r < R; r++) {                                                       \
                float ark = a[r * a_rs + k * a_cs];                                             \
                for (int v = 0; v < T * P; v++)                                                 \
                    acc[r][v] += ark * bk[v];                                                   \
            }                                                                                   \
        }                                                                                       \
        const VEC zero = {0};                                                                   \
        for (int r = 0; r < R; r++)                                                             \
            for (int v = 0; v < T * P; v++) {                                                   \
                /* max(acc, 0) that keeps NaN (like np.maximum), so a NaN reaches the loss. */  \
                if (relu)                                                                       \
                    acc[r][v] = (VEC)((VECI)acc[r][v] & ~(VECI)(acc[r][v] < zero));             \
                *(VECU *)(C + r * ldc + v / P * EDGEFL_TILE + v % P * (LANES)) = acc[r][v];     \
            }                                                                                   \
    }

EDGEFL_DEFINE_BLOCK(edgefl_block8, edgefl_v8, edgefl_v8i, edgefl_v8u, 8)
EDGEFL_DEFINE_BLOCK(edgefl_block4, edgefl_v4, edgefl_v4i, edgefl_v4u, 4)

/* R rows x T tiles: both tiles at once in 8-lane registers, one after the other in 4-lane ones
 * (eight accumulators again; sixteen would not fit SSE2's sixteen registers). */
EDGEFL_INLINE void edgefl_rows(const int wide, const int R, const int T, ptrdiff_t K,
                               const float *a, ptrdiff_t a_rs, ptrdiff_t a_cs,
                               const float *const *Bt, const ptrdiff_t *ldbt,
                               const float (*init)[EDGEFL_TILE], int relu, float *C,
                               ptrdiff_t ldc)
{
    if (wide) {
        edgefl_block8(R, T, K, a, a_rs, a_cs, Bt, ldbt, init, relu, C, ldc);
    } else {
        for (int t = 0; t < T; t++)
            edgefl_block4(R, 1, K, a, a_rs, a_cs, Bt + t, ldbt + t, init + t, relu,
                          C + t * EDGEFL_TILE, ldc);
    }
}

/* The body of edgefl_matmul, for one vector width (a constant after inlining). */
EDGEFL_INLINE void edgefl_matmul_body(const int wide, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                                      const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs,
                                      const float *B, ptrdiff_t ldb, const float *bias,
                                      int relu, float *C, ptrdiff_t ldc, float *pack)
{
    for (ptrdiff_t j0 = 0; j0 < N; j0 += 2 * EDGEFL_TILE) {
        const int T = N - j0 > EDGEFL_TILE ? 2 : 1;
        const float *Bt[2];
        ptrdiff_t ldbt[2];
        float init[2][EDGEFL_TILE] = {{0.0f}};
        for (int t = 0; t < T; t++) {
            ptrdiff_t jt = j0 + t * EDGEFL_TILE;
            ptrdiff_t width = N - jt < EDGEFL_TILE ? N - jt : EDGEFL_TILE;
            if (width < EDGEFL_TILE) {
                for (ptrdiff_t k = 0; k < K; k++)
                    for (ptrdiff_t j = 0; j < EDGEFL_TILE; j++)
                        pack[k * EDGEFL_TILE + j] = j < width ? B[k * ldb + jt + j] : 0.0f;
                Bt[t] = pack;
                ldbt[t] = EDGEFL_TILE;
            } else {
                Bt[t] = B + jt;
                ldbt[t] = ldb;
            }
            if (bias)
                for (ptrdiff_t j = 0; j < width; j++)
                    init[t][j] = bias[jt + j];
        }
        ptrdiff_t i = 0;
        if (T == 2) {
            for (; i + 4 <= M; i += 4)
                edgefl_rows(wide, 4, 2, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt,
                            (const float (*)[EDGEFL_TILE])init, relu, C + i * ldc + j0, ldc);
            for (; i < M; i++)
                edgefl_rows(wide, 1, 2, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt,
                            (const float (*)[EDGEFL_TILE])init, relu, C + i * ldc + j0, ldc);
        } else {
            for (; i + 4 <= M; i += 4)
                edgefl_rows(wide, 4, 1, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt,
                            (const float (*)[EDGEFL_TILE])init, relu, C + i * ldc + j0, ldc);
            for (; i < M; i++)
                edgefl_rows(wide, 1, 1, K, A + i * a_rs, a_rs, a_cs, Bt, ldbt,
                            (const float (*)[EDGEFL_TILE])init, relu, C + i * ldc + j0, ldc);
        }
    }
}

#define EDGEFL_MATMUL_PARAMS                                                                   \
    ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs,     \
        const float *B, ptrdiff_t ldb, const float *bias, int relu, float *C, ptrdiff_t ldc,  \
        float *pack
#define EDGEFL_MATMUL_ARGS M, N, K, A, a_rs, a_cs, B, ldb, bias, relu, C, ldc, pack

static void edgefl_matmul_narrow(EDGEFL_MATMUL_PARAMS)
{
    edgefl_matmul_body(0, EDGEFL_MATMUL_ARGS);
}

#if EDGEFL_WIDE
EDGEFL_TARGET_WIDE static void edgefl_matmul_wide(EDGEFL_MATMUL_PARAMS)
{
    edgefl_matmul_body(1, EDGEFL_MATMUL_ARGS);
}
#endif

/*
 * C = act(bias + A B) for an (M x K) left factor A read through strides, B (K x N) row-major.
 *
 * A(i, k) is A[i * a_rs + k * a_cs], so passing a_rs = 1, a_cs = lda multiplies by the transpose
 * of a row-major matrix without copying it. C has row stride ldc >= edgefl_padded(N); its
 * columns N .. padded(N) - 1 are written as zeros (for act = ReLU too). B's last, partial tile
 * is copied into `pack` (K x 8 floats) so no load reads past the end of a row of B. bias
 * (length N) may be NULL.
 *
 * Dispatched by hand rather than with target_clones: the two variants differ in their vector
 * width, not only in the instructions the compiler may pick.
 */
/* Non-zero: run the baseline product even where AVX2 is available, so that tests cover the code
 * an ARM board runs on any machine. */
static int edgefl_baseline_only = 0;

static void edgefl_matmul(EDGEFL_MATMUL_PARAMS)
{
#if EDGEFL_WIDE
    if (!edgefl_baseline_only && __builtin_cpu_supports("avx2")
            && __builtin_cpu_supports("fma")) {
        edgefl_matmul_wide(EDGEFL_MATMUL_ARGS);
        return;
    }
#endif
    edgefl_matmul_narrow(EDGEFL_MATMUL_ARGS);
}

/*
 * z[j] = e^(z[j] - shift) for 4 floats, shift >= every z[j], in vector registers where a call
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
    edgefl_v4 x = *(const edgefl_v4u *)z - shift;
    const edgefl_v4 lowest = {-87.3f, -87.3f, -87.3f, -87.3f};
    const edgefl_v4i below = x < lowest;
    x = (edgefl_v4)((below & (edgefl_v4i)lowest) | (~below & (edgefl_v4i)x));
    edgefl_v4 t = x * 1.44269504088896341f - 0.5f;
    t = (edgefl_v4)((edgefl_v4i)t & (edgefl_v4i)(t == t)); /* NaN -> 0: a defined conversion */
    edgefl_v4i n = __builtin_convertvector(t, edgefl_v4i); /* toward zero: ceil(t) = round */
    edgefl_v4 fn = __builtin_convertvector(n, edgefl_v4);
    edgefl_v4 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    edgefl_v4 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    *(edgefl_v4u *)z = p * (edgefl_v4)((n + 127) << 23);
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
    const edgefl_v4i lane = {0, 1, 2, 3};
    const edgefl_v4 minus_inf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
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
            edgefl_v4 top = minus_inf;
            for (ptrdiff_t j = 0; j < padded; j += 4) {
                edgefl_v4i valid = lane < (int32_t)(c - j);
                edgefl_v4 v = *(const edgefl_v4u *)(z + j);
                v = (edgefl_v4)((valid & (edgefl_v4i)v) | (~valid & (edgefl_v4i)minus_inf));
                edgefl_v4i larger = v > top;
                top = (edgefl_v4)((larger & (edgefl_v4i)v) | (~larger & (edgefl_v4i)top));
            }
            float t0 = top[0] > top[2] ? top[0] : top[2];
            float t1 = top[1] > top[3] ? top[1] : top[3];
            shift[r] = t0 > t1 ? t0 : t1;
            total -= (double)(z[y[i0 + r]] - shift[r]);
        }
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < padded; j += 4)
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
