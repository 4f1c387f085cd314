/* RMSNorm forward and backward on AVX-512 CPUs, for bfloat16 training and bf16 inference.
 *
 * Why: under CPU bf16 autocast the student's residual stream is float32, and torch runs each
 * norm as 5 ops forward (pow, mean, add+rsqrt, 2 mul), ~8 back, plus autocast's bf16 casts,
 * each a pass over a (tokens, hidden) tensor; the bf16 teacher's LlamaRMSNorm is 7 passes.
 * Here each is one pass per row (the row, <= a few KiB, stays in L1 between its two loops).
 *
 * One entry point, op selects (x, out: [rows, hidden] contiguous, hidden a multiple of 16):
 *   0 forward,  x f32, w f32 -> out f32  = w * (x * rstd),   rstd[row] = 1 / sqrt(mean(x^2) + eps)
 *   1 forward,  x f32, w f32 -> out bf16 = that, rounded to nearest even (what autocast's cast gives)
 *   2 backward, x f32, w f32, g f32  -> out f32 dx, partial[t * hidden + i] += g * x̂ over thread t's rows
 *   3 backward, the same with g bf16
 *        x̂ = x * rstd, dx = rstd * (g w - x̂ mean(g w x̂)), dw = sum over rows of g x̂
 *   4 forward,  x bf16, w bf16 -> out bf16 = bf16(w * bf16(x * rstd))   (transformers' LlamaRMSNorm in bf16:
 *        x.float(), its rstd, .to(bf16), * weight; a product of two bf16 values is exact in float32)
 * The sums are in float32 (16 lanes, then the lanes); rstd as torch computes it (1 / sqrt, each rounded).
 * Returns 0, or 2 when hidden is not a positive multiple of 16 (the caller checks that first).
 * partial: [threads, hidden] floats, zeroed by the caller; rstd: [rows] floats (ops 0-1 write, 2-3 read).
 *
 * Built on first use by srdata/backends/native.py: cc -O3 -mavx512f -mavx512bw -mavx512bf16 -fopenmp
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "simd.h"

static inline __m512 load_f32_or_bf16(const void *p, int64_t i, int bf16) {
    return bf16 ? load_bf16_as_f32((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}

static inline void store_bf16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline float row_rstd(const void *x, int bf16, int64_t hidden, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 16) {
        __m512 v = load_f32_or_bf16(x, i, bf16);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    __m128 v = _mm_set_ss(_mm512_reduce_add_ps(acc) / (float)hidden + eps);
    return _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(1.0f), _mm_sqrt_ss(v)));  /* correctly rounded, as torch's 1 / sqrt */
}

static void forward_row(int op, const void *x, const void *w, void *out, float *rstd_out, int64_t hidden, float eps) {
    int in_bf16 = op == 4;
    float r = row_rstd(x, in_bf16, hidden, eps);
    if (rstd_out) *rstd_out = r;
    __m512 rv = _mm512_set1_ps(r);
    for (int64_t i = 0; i < hidden; i += 16) {
        __m512 normed = _mm512_mul_ps(load_f32_or_bf16(x, i, in_bf16), rv);
        if (op == 0) {
            _mm512_storeu_ps((float *)out + i, _mm512_mul_ps(_mm512_loadu_ps((const float *)w + i), normed));
        } else if (op == 1) {
            store_bf16((uint16_t *)out + i, _mm512_mul_ps(_mm512_loadu_ps((const float *)w + i), normed));
        } else {  /* op 4: normed rounded to bf16 first, as .to(input_dtype) does */
            __m512 rounded = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(normed));
            store_bf16((uint16_t *)out + i, _mm512_mul_ps(load_bf16_as_f32((const uint16_t *)w + i), rounded));
        }
    }
}

static void backward_row(const float *x, const float *w, const void *g, int g_bf16, float r, float *dx, float *dw, int64_t hidden) {
    __m512 rv = _mm512_set1_ps(r), dot = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 16) {
        __m512 xhat = _mm512_mul_ps(_mm512_loadu_ps(x + i), rv);
        __m512 gv = load_f32_or_bf16(g, i, g_bf16);
        _mm512_storeu_ps(dw + i, _mm512_fmadd_ps(gv, xhat, _mm512_loadu_ps(dw + i)));
        dot = _mm512_fmadd_ps(_mm512_mul_ps(gv, _mm512_loadu_ps(w + i)), xhat, dot);
    }
    __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / (float)hidden);
    for (int64_t i = 0; i < hidden; i += 16) {
        __m512 xhat = _mm512_mul_ps(_mm512_loadu_ps(x + i), rv);
        __m512 gw = _mm512_mul_ps(load_f32_or_bf16(g, i, g_bf16), _mm512_loadu_ps(w + i));
        _mm512_storeu_ps(dx + i, _mm512_mul_ps(_mm512_fnmadd_ps(xhat, mean, gw), rv));
    }
}

int srdata_rms_norm(int op, const void *x, const void *w, const void *g, void *out, float *rstd, float *partial,
                    int64_t rows, int64_t hidden, float eps, int threads) {
    if (hidden <= 0 || hidden % 16 != 0) return 2;
    if (threads < 1) threads = 1;
    int in_bytes = op == 4 ? 2 : 4, out_bytes = (op == 1 || op == 4) ? 2 : 4, g_bytes = op == 3 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t lo = rows * t / n, hi = rows * (t + 1) / n;  /* contiguous rows per thread: one dw partial each */
        for (int64_t row = lo; row < hi; row++) {
            const char *xr = (const char *)x + row * hidden * in_bytes;
            char *outr = (char *)out + row * hidden * out_bytes;
            if (op <= 1 || op == 4)
                forward_row(op, xr, w, outr, rstd ? rstd + row : 0, hidden, eps);
            else
                backward_row((const float *)xr, (const float *)w, (const char *)g + row * hidden * g_bytes, op == 3,
                             rstd[row], (float *)outr, partial + (int64_t)t * hidden, hidden);
        }
    }
    return 0;
}
