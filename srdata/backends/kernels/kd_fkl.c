/* srd-distill's forward-KL + cross-entropy terms of one chunk of bfloat16 logits, on AVX-512 CPUs.
 *
 * Why: with bfloat16 matmuls the LM head's (tokens, vocab) elementwise work became a sixth of a
 * bf16 srd-distill step: torch upcasts both models' logits to float32 and makes ~20 passes over
 * them (max, shift, exp, sum, divide, log, the products, the gradient). This kernel reads each
 * row's bf16 logits twice and writes the gradient once, all arithmetic in float32:
 *   s = (z_s - max z_s) / T, t = (z_t - max z_t) / T, q = softmax(s), p = softmax(t)
 *   kd  = -sum p log q = log Z_s - sum p s            (the fkl value, no T^2 factor)
 *   H   = -sum p log p = log Z_t - sum p t            (teacher entropy, for the true-KL log)
 *   ce  = log Z_1 - (z_s[y] - max z_s)                 (at T = 1; Z_1 = Z_s when T = 1)
 *   grad = kd_scale (q - p) + ce_scale (q_1 - onehot(y))
 * which is srd_distill.kd_chunks.chunk_terms for fkl (tests compare the two in float64).
 *
 * Layouts: zs, zt [rows, vocab] bf16 (as uint16), rows `zs_stride` / `zt_stride` elements apart;
 * targets [rows] int64 or NULL (no CE); grad_bf16 / grad_f32 [rows, vocab] contiguous or NULL
 * (no gradient); values [rows, 3] float64: kd, ce, H per row.
 * Returns 0, or (the caller then uses torch's ops, which floor -inf logits): 1 a row with a non-finite logit, 2 a target
 * outside [0, vocab), 3 a thread could not allocate its row buffers (3 x vocab floats).
 *
 * Built on first use by srdata/backends/native.py (AVX512-BF16 flags, OpenMP).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

/* One row; e_s, e_t, e_1 are this thread's vocab-float buffers (NULL when no gradient is written). */
static int kd_row(const uint16_t *zs, const uint16_t *zt, int64_t vocab, int64_t y, float inv_t, int separate_ce,
                  float kd_scale, float ce_scale, uint16_t *g16, float *g32, double *values,
                  float *e_s, float *e_t, float *e_1) {
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    __m512 max_s = neg_inf, max_t = neg_inf, nonfinite = _mm512_setzero_ps();
    for (int64_t i = 0; i < vocab; i += 16) {
        __mmask16 m = tail_mask(vocab, i);
        __m512 a = load_bf16_masked(zs + i, m), b = load_bf16_masked(zt + i, m);
        max_s = _mm512_mask_max_ps(max_s, m, max_s, a);
        max_t = _mm512_mask_max_ps(max_t, m, max_t, b);
        nonfinite = _mm512_add_ps(nonfinite, _mm512_add_ps(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b)));  /* NaN once any is inf/NaN */
    }
    float ms = _mm512_reduce_max_ps(max_s), mt = _mm512_reduce_max_ps(max_t);
    if (_mm512_reduce_add_ps(nonfinite) != 0.0f || !isfinite(ms) || !isfinite(mt)) return 1;  /* NaN != 0 */
    /* Sums in float32 lanes, two accumulators each (the load check and tests bound the error against float64). */
    __m512 zsum_s = _mm512_setzero_ps(), zsum_t = _mm512_setzero_ps(), zsum_1 = _mm512_setzero_ps();
    __m512 ps_sum = _mm512_setzero_ps(), pt_sum = _mm512_setzero_ps();
    const __m512 vms = _mm512_set1_ps(ms), vmt = _mm512_set1_ps(mt), vinv = _mm512_set1_ps(inv_t);
    for (int64_t i = 0; i < vocab; i += 16) {
        __mmask16 m = tail_mask(vocab, i);
        __m512 zs1 = _mm512_sub_ps(load_bf16_masked(zs + i, m), vms);  /* <= 0 on the row's lanes */
        __m512 s = _mm512_mul_ps(zs1, vinv);
        __m512 t = _mm512_mul_ps(_mm512_sub_ps(load_bf16_masked(zt + i, m), vmt), vinv);
        s = _mm512_maskz_mov_ps(m, s);
        t = _mm512_maskz_mov_ps(m, t);
        __m512 es = _mm512_maskz_mov_ps(m, exp_nonpositive(s));
        __m512 et = _mm512_maskz_mov_ps(m, exp_nonpositive(t));
        zsum_s = _mm512_add_ps(zsum_s, es);
        zsum_t = _mm512_add_ps(zsum_t, et);
        ps_sum = _mm512_fmadd_ps(et, s, ps_sum);
        pt_sum = _mm512_fmadd_ps(et, t, pt_sum);
        __m512 e1 = es;
        if (separate_ce == 2) {  /* T = 2: exp(z - max) = exp(s)^2, one exp fewer (s = (z - max) / 2 exactly) */
            e1 = _mm512_mul_ps(es, es);
            zsum_1 = _mm512_add_ps(zsum_1, e1);
        } else if (separate_ce) {
            e1 = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_maskz_mov_ps(m, zs1)));
            zsum_1 = _mm512_add_ps(zsum_1, e1);
        }
        if (e_s) {
            _mm512_mask_storeu_ps(e_s + i, m, es);
            _mm512_mask_storeu_ps(e_t + i, m, et);
            if (separate_ce) _mm512_mask_storeu_ps(e_1 + i, m, e1);
        }
    }
    double z_s = _mm512_reduce_add_ps(zsum_s), z_t = _mm512_reduce_add_ps(zsum_t);
    double z_1 = separate_ce ? (double)_mm512_reduce_add_ps(zsum_1) : z_s;
    values[0] = log(z_s) - _mm512_reduce_add_ps(ps_sum) / z_t;
    values[2] = log(z_t) - _mm512_reduce_add_ps(pt_sum) / z_t;
    values[1] = 0.0;
    if (y >= 0) {
        uint32_t bits = (uint32_t)zs[y] << 16;
        float zy;
        __builtin_memcpy(&zy, &bits, 4);
        values[1] = log(z_1) - ((double)zy - ms);
    }
    if (!e_s) return 0;
    const __m512 a = _mm512_set1_ps((float)(kd_scale / z_s)), b = _mm512_set1_ps((float)(kd_scale / z_t));
    const __m512 c = _mm512_set1_ps((float)(ce_scale / z_1));
    const float *e1_row = separate_ce ? e_1 : e_s;
    for (int64_t i = 0; i < vocab; i += 16) {
        __mmask16 m = tail_mask(vocab, i);
        __m512 g = _mm512_fmsub_ps(a, _mm512_maskz_loadu_ps(m, e_s + i), _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, e_t + i)));
        if (ce_scale != 0.0f) g = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, e1_row + i), g);
        if (y >= i && y < i + 16 && ce_scale != 0.0f) {  /* - ce_scale at the target */
            __mmask16 at = (__mmask16)(1u << (y - i));
            g = _mm512_mask_sub_ps(g, at, g, _mm512_set1_ps(ce_scale));
        }
        if (g32) _mm512_mask_storeu_ps(g32 + i, m, g);
        if (g16) store_bf16_masked(g16 + i, m, g);
    }
    return 0;
}

int srdata_kd_fkl_bf16(const uint16_t *zs, const uint16_t *zt, int64_t rows, int64_t vocab, int64_t zs_stride,
                       int64_t zt_stride, const int64_t *targets, float temperature, float kd_scale, float ce_scale,
                       uint16_t *grad_bf16, float *grad_f32, double *values, int threads) {
    if (targets)
        for (int64_t r = 0; r < rows; r++)
            if (targets[r] < 0 || targets[r] >= vocab) return 2;
    const int need_grad = grad_bf16 != NULL || grad_f32 != NULL;
    /* CE needs softmax at T = 1 besides softmax(z / T): 0 when they are one (T = 1), 2 when T = 2 (a square), else 1. */
    const int separate_ce = temperature == 1.0f || targets == NULL ? 0 : temperature == 2.0f ? 2 : 1;
    const float inv_t = 1.0f / temperature;
    int status = 0;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
#pragma omp parallel num_threads(threads) reduction(max : status)
    {
        int64_t padded = (vocab + 15) / 16 * 16;
        float *buffers = need_grad ? (float *)aligned_alloc(64, (size_t)(3 * padded) * sizeof(float)) : NULL;
        float *e_s = buffers, *e_t = buffers ? buffers + padded : NULL, *e_1 = buffers ? buffers + 2 * padded : NULL;
        const int ready = !need_grad || buffers != NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {  /* every thread reaches this loop (OpenMP), ready or not */
            int row_status = !ready ? 3 : kd_row(zs + r * zs_stride, zt + r * zt_stride, vocab, targets ? targets[r] : -1, inv_t,
                                                  separate_ce, kd_scale, ce_scale, grad_bf16 ? grad_bf16 + r * vocab : NULL,
                                                  grad_f32 ? grad_f32 + r * vocab : NULL, values + 3 * r, e_s, e_t, e_1);
            if (row_status > status) status = row_status;
        }
        free(buffers);
    }
    return status;
}
