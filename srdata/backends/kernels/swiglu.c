/* The SwiGLU activation of a Llama/Qwen2 MLP, silu(g) * u, forward and backward, on bfloat16 tensors.
 *
 * Why: under CPU bf16 autocast the MLP's gate/up outputs are bf16, and torch runs silu (one
 * pass), the product (another) and back silu_backward plus two products, each reading and
 * writing a (tokens, intermediate) bf16 tensor. Here forward is one pass and backward one.
 *
 * One entry point, op selects; g, u, dh, a, b: n bf16 values each, contiguous (any n >= 0: the
 * last partial vector is masked). Math in float32, each output rounded to bf16 once (nearest even):
 *   0 forward:  a = silu(g) * u                      (silu(g) = g * sigmoid(g))
 *   1 backward: a = dg = dh * u * s * (1 + g * (1 - s)),  b = du = dh * silu(g),   s = sigmoid(g)
 * sigmoid from e = exp(-|g|) (never overflows): s = 1 / (1 + e) for g >= 0, e / (1 + e) below.
 * Returns 0.
 *
 * Built on first use by srdata/backends/native.py: cc -O3 -mavx512f -mavx512bw -mavx512bf16 -fopenmp
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "simd.h"

static inline __m512 sigmoid(__m512 g) {
    __m512 absg = _mm512_abs_ps(g);
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), absg));
    __m512 denom = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
    __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 num = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), neg, e);
    return _mm512_div_ps(num, denom);
}

static void block(int op, const uint16_t *g, const uint16_t *u, const uint16_t *dh, uint16_t *a, uint16_t *b, __mmask16 m) {
    __m512 gv = load_bf16_masked(g, m), uv = load_bf16_masked(u, m);
    __m512 s = sigmoid(gv);
    __m512 silu = _mm512_mul_ps(gv, s);
    if (op == 0) {
        store_bf16_masked(a, m, _mm512_mul_ps(silu, uv));
        return;
    }
    __m512 d = load_bf16_masked(dh, m);
    /* 1 + g (1 - s) = 1 + g - g s */
    __m512 slope = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_sub_ps(gv, silu));
    __m512 dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, uv), s), slope);
    store_bf16_masked(a, m, dg);
    store_bf16_masked(b, m, _mm512_mul_ps(d, silu));
}

int srdata_swiglu(int op, const uint16_t *g, const uint16_t *u, const uint16_t *dh, uint16_t *a, uint16_t *b,
                  int64_t n, int threads) {
    if (threads < 1) threads = 1;
    int64_t vectors = (n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t v = 0; v < vectors; v++) {
        int64_t i = v * 16;
        block(op, g + i, u + i, dh ? dh + i : 0, a + i, b ? b + i : 0, tail_mask(n, i));
    }
    return 0;
}
