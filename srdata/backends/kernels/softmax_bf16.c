/* Softmax over the last dimension of bfloat16 rows, forward and backward, on AVX-512 CPUs (bf16 attention).
 *
 * Why: torch's bf16 softmax on a CPU upcasts and runs several passes per row (~0.68 ms for a
 * [12, 350, 450] block of SmolLM2's attention, 2 threads); here a row (<= a few KiB) stays in L1
 * through its passes. Values as torch's: float32 math on the exact float32 values of the bf16
 * inputs, rounded once to bf16 (nearest even) at the end.
 *
 * One entry point, op selects (rows of `cols` entries; row r of a tensor at ptr + r * stride elements):
 *   0 forward:  x bf16 -> out bf16 = exp(x - max) / sum exp(x - max)      (p unused; out may be x)
 *   1 backward: x bf16 (d_probs), p bf16 (probs) -> out bf16 = p * (x - sum(x * p))   (out may be x)
 * A row holding a NaN, or whose max is not finite (+inf, or all -inf), comes out all NaN (torch: NaN too),
 * never a silent finite row. Large negative entries (the attention mask's bias, half bf16's lowest) give
 * exp = 0, as in torch (exp_nonpositive flushes x - max < -87 to 0, where float32's exp is 0 or subnormal).
 * Returns 0, or 2 when cols < 1 or an op is unknown.
 *
 * Built on first use by srdata/backends/native.py: cc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

static void nan_row(uint16_t *out, int64_t cols) {
    for (int64_t i = 0; i < cols; i++) out[i] = 0x7FC0;  /* bf16 quiet NaN */
}

static void forward_row(const uint16_t *x, uint16_t *out, float *e, int64_t cols) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < cols; i += 16) {
        __mmask16 m = tail_mask(cols, i);
        __m512 v = load_bf16_masked(x + i, m);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        mx = _mm512_mask_max_ps(mx, m, mx, v);
        _mm512_storeu_ps(e + i, v);  /* the next pass reads float32 (no second widening); e: cols rounded up to 16 */
    }
    float row_max = _mm512_reduce_max_ps(mx);
    if (nan || !isfinite(row_max)) {
        nan_row(out, cols);
        return;
    }
    __m512 mv = _mm512_set1_ps(row_max), acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
        __mmask16 m = tail_mask(cols, i);
        __m512 ev = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(e + i), mv)));
        acc = _mm512_add_ps(acc, ev);
        _mm512_storeu_ps(e + i, ev);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));  /* sum >= 1: the max's own term */
    for (int64_t i = 0; i < cols; i += 16)
        store_bf16_masked(out + i, tail_mask(cols, i), _mm512_mul_ps(_mm512_loadu_ps(e + i), inv));
}

static void backward_row(const uint16_t *g, const uint16_t *p, uint16_t *out, int64_t cols) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
        __mmask16 m = tail_mask(cols, i);
        acc = _mm512_fmadd_ps(load_bf16_masked(g + i, m), load_bf16_masked(p + i, m), acc);
    }
    __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for (int64_t i = 0; i < cols; i += 16) {
        __mmask16 m = tail_mask(cols, i);
        __m512 d = _mm512_mul_ps(load_bf16_masked(p + i, m), _mm512_sub_ps(load_bf16_masked(g + i, m), dot));
        store_bf16_masked(out + i, m, d);
    }
}

int srdata_softmax_bf16(int op, const uint16_t *x, const uint16_t *p, uint16_t *out, int64_t rows, int64_t cols,
                        int64_t x_stride, int64_t p_stride, int64_t out_stride, int threads) {
    if (cols < 1 || (op != 0 && op != 1)) return 2;
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *e = op == 0 ? (float *)malloc(sizeof(float) * (size_t)((cols + 15) / 16 * 16)) : 0;
        if (op == 0 && !e) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            if (op == 0) {
                if (e) forward_row(x + row * x_stride, out + row * out_stride, e, cols);
            } else {
                backward_row(x + row * x_stride, p + row * p_stride, out + row * out_stride, cols);
            }
        }
        free(e);
    }
    return failed ? 3 : 0;
}
