/* CPU kernels for quantised KV parts (policies/precision.py: Quantized), two entry points:
 *   headpolicy_decode_quantized   one decode step of a quantised KV-head group: each query
 *                                 attends every stored token of its KV head, read from the codes
 *                                 plus an optional full-precision tail, without dequantising the
 *                                 group into a buffer first. No mask: the caller uses it only when
 *                                 every stored token is visible to every row (no padding).
 *   headpolicy_quantize_tokens    one new token per row and head quantised per token into a
 *                                 cache slot (a streaming group's ring), bit for bit as in Python.
 *
 * Built by codegen/cpu.py, once per specialisation (the macros below), with the system C
 * compiler; called through ctypes with raw pointers.
 *
 *   HEAD_DIM  D, channels per head      BITS   8 or 4 (two codes a byte, low nibble first)
 *   GROUP     tokens per key scale (keys per channel) or channels per scale (per token)
 *   QPK       query heads per KV head
 *
 * A dequantised element is code * scale + zero. For keys quantised per channel, the scale and
 * zero of a group of GROUP tokens fold into the query once per group:
 *     q . k_t = sum_d (q_d s_d) c_td + sum_d q_d z_d
 * so the inner loop over tokens converts codes and multiplies, nothing else. For values (per
 * token, groups of GROUP channels) the probability folds into the scale:
 *     sum_t p_t v_td = sum_t (p_t s_tj) c_td + sum_t p_t z_tj,   d in channel group j.
 * Softmax is two passes over the scores in a per-head scratch row (max, then exp and sum).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define D HEAD_DIM
#define CODE_BYTES (D * BITS / 8)
#define G QPK
#define CHANNEL_GROUPS ((D + GROUP - 1) / GROUP)

typedef struct {
    const uint8_t *codes;  /* [B, H, N, CODE_BYTES], rows of one head contiguous */
    const uint16_t *scale; /* float16 bits: [B, H, N / GROUP, D] per channel, [B, H, N, CHANNEL_GROUPS] per token */
    const uint16_t *zero;  /* as scale */
    int64_t codes_batch, codes_head, scale_batch, scale_head; /* element strides */
} quantized;

static inline float half_to_float(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}

/* exp(x) for x <= 0, vectorisable (no libm call): 2^(x log2 e) as 2^n * p(f) with n = t rounded
 * (t = x log2 e <= 0, so n = trunc(t - 1/2)) and f = t - n in [-1/2, 1/2], where the degree-6
 * polynomial p (Cephes' exp2f coefficients) is fitted. Relative error below 6e-7 for x >= -10,
 * 4e-6 down to -87 (t rounded to float32); x below -87 gives exp(-87), so n >= -126 and 2^n
 * stays a normal float. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (float)(int32_t)(t - 0.5f);
    const float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline void unpack_row(const uint8_t *restrict c, float *restrict x) {
#if BITS == 8
    for (int d = 0; d < D; d++) x[d] = (float)c[d];
#else
    for (int i = 0; i < D / 2; i++) {
        x[2 * i] = (float)(c[i] & 15);
        x[2 * i + 1] = (float)(c[i] >> 4);
    }
#endif
}

/* scores s[g][t] of N coded keys quantised per channel; qs: the scaled queries [G][D] */
static void scores_keys_per_channel(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                                    const float *qs, float *s, int64_t T) {
    float x[D], folded[G][D], offset[G];
    for (int64_t first = 0; first < N; first += GROUP) {
        const uint16_t *sc = scale + (first / GROUP) * D, *ze = zero + (first / GROUP) * D;
        for (int g = 0; g < G; g++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) {
                folded[g][d] = qs[g * D + d] * half_to_float(sc[d]);
                acc += qs[g * D + d] * half_to_float(ze[d]);
            }
            offset[g] = acc;
        }
        const int64_t end = first + GROUP < N ? first + GROUP : N;
        for (int64_t t = first; t < end; t++) {
            unpack_row(codes + t * CODE_BYTES, x);
            for (int g = 0; g < G; g++) {
                float acc = 0.f;
                for (int d = 0; d < D; d++) acc += folded[g][d] * x[d];
                s[g * T + t] = acc + offset[g];
            }
        }
    }
}

/* the same for keys quantised per token (a streaming group's ring): each row dequantised, then dotted */
static void scores_keys_per_token(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                                  const float *qs, float *s, int64_t T) {
    float x[D];
    for (int64_t t = 0; t < N; t++) {
        unpack_row(codes + t * CODE_BYTES, x);
        for (int j = 0; j < CHANNEL_GROUPS; j++) {
            const float sj = half_to_float(scale[t * CHANNEL_GROUPS + j]), zj = half_to_float(zero[t * CHANNEL_GROUPS + j]);
            for (int d = j * GROUP; d < (j + 1) * GROUP && d < D; d++) x[d] = x[d] * sj + zj;
        }
        for (int g = 0; g < G; g++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += qs[g * D + d] * x[d];
            s[g * T + t] = acc;
        }
    }
}

/* q [B, H, G, D] float32 (contiguous); k, v: N coded tokens per head; tail_k, tail_v: NT more at
 * full precision, strides tail_batch, tail_head (rows of D contiguous), may be NULL when NT == 0;
 * out [B, H, G, D] float32. Returns 0, or -1 if scratch memory could not be allocated. */
int headpolicy_decode_quantized(int B, int H, int64_t N, int64_t NT, const float *q, quantized k,
                                int keys_per_channel, quantized v, const float *tail_k, const float *tail_v,
                                int64_t tail_batch, int64_t tail_head, float scale, float *out, int threads) {
    const int64_t T = N + NT;
    int failed = 0;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static) reduction(| : failed)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float *s = malloc(sizeof(float) * G * (T > 0 ? T : 1));
            if (!s) {
                failed = 1;
                continue;
            }
            float qs[G * D], x[D], acc[G][D], zero_acc[G][CHANNEL_GROUPS], inv_sum[G];
            const float *qh = q + ((int64_t)b * H + h) * G * D;
            for (int i = 0; i < G * D; i++) qs[i] = qh[i] * scale;

            const uint8_t *kc = k.codes + b * k.codes_batch + h * k.codes_head;
            const int64_t ko = b * k.scale_batch + h * k.scale_head;
            if (keys_per_channel)
                scores_keys_per_channel(kc, k.scale + ko, k.zero + ko, N, qs, s, T);
            else
                scores_keys_per_token(kc, k.scale + ko, k.zero + ko, N, qs, s, T);
            const float *tk = NT ? tail_k + b * tail_batch + h * tail_head : NULL;
            const float *tv = NT ? tail_v + b * tail_batch + h * tail_head : NULL;
            for (int64_t t = 0; t < NT; t++)
                for (int g = 0; g < G; g++) {
                    float dot = 0.f;
                    for (int d = 0; d < D; d++) dot += qs[g * D + d] * tk[t * D + d];
                    s[g * T + N + t] = dot;
                }

            for (int g = 0; g < G; g++) {
                float *sg = s + g * T, m = sg[0], sum = 0.f;
                for (int64_t t = 1; t < T; t++) m = sg[t] > m ? sg[t] : m;
                for (int64_t t = 0; t < T; t++) {
                    sg[t] = exp_nonpositive(sg[t] - m);
                    sum += sg[t];
                }
                inv_sum[g] = 1.f / sum;
            }

            memset(acc, 0, sizeof acc);
            memset(zero_acc, 0, sizeof zero_acc);
            const uint8_t *vc = v.codes + b * v.codes_batch + h * v.codes_head;
            const uint16_t *vs = v.scale + b * v.scale_batch + h * v.scale_head;
            const uint16_t *vz = v.zero + b * v.scale_batch + h * v.scale_head;
            for (int64_t t = 0; t < N; t++) {
                float sj[CHANNEL_GROUPS], zj[CHANNEL_GROUPS];
                unpack_row(vc + t * CODE_BYTES, x);
                for (int j = 0; j < CHANNEL_GROUPS; j++) {
                    sj[j] = half_to_float(vs[t * CHANNEL_GROUPS + j]);
                    zj[j] = half_to_float(vz[t * CHANNEL_GROUPS + j]);
                }
                for (int g = 0; g < G; g++) {
                    const float p = s[g * T + t];
                    for (int j = 0; j < CHANNEL_GROUPS; j++) {
                        const float a = p * sj[j];
                        zero_acc[g][j] += p * zj[j];
                        for (int d = j * GROUP; d < (j + 1) * GROUP && d < D; d++) acc[g][d] += a * x[d];
                    }
                }
            }
            for (int64_t t = 0; t < NT; t++)
                for (int g = 0; g < G; g++) {
                    const float p = s[g * T + N + t];
                    for (int d = 0; d < D; d++) acc[g][d] += p * tv[t * D + d];
                }

            float *oh = out + ((int64_t)b * H + h) * G * D;
            for (int g = 0; g < G; g++)
                for (int d = 0; d < D; d++) oh[g * D + d] = (acc[g][d] + zero_acc[g][d / GROUP]) * inv_sum[g];
            free(s);
        }
    return failed ? -1 : 0;
}

/* float16 bits of the next representable value above a non-negative finite h */
static inline uint16_t half_next_up(uint16_t bits) { return (uint16_t)(bits + 1); }

static inline uint16_t float_to_half_bits(float x) {
    const _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

/* One token per row and head quantised per token into a cache slot, bit for bit what
 * policies/precision.quantize(x, BITS, GROUP, per_channel=False) gives: each group of GROUP
 * channels (the last may be shorter) gets zero = float16(min), scale = float16((max - zero) /
 * levels), raised by one float16 step if that rounded below the span, and codes
 * round-half-even((x - zero) / scale) clamped to [0, levels] (0 where scale is 0). x is clamped
 * to float16's range first. x [B, H, D] float32 contiguous; out: the slot's codes [B, H,
 * CODE_BYTES] and scales/zeros [B, H, CHANNEL_GROUPS] (the `quantized` strides of those views). */
void headpolicy_quantize_tokens(int B, int H, const float *x, quantized out) {
    const float levels = (float)((1 << BITS) - 1), big = 65504.f;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *xr = x + ((int64_t)b * H + h) * D;
            uint8_t *codes = (uint8_t *)out.codes + b * out.codes_batch + h * out.codes_head;
            uint16_t *scale = (uint16_t *)out.scale + b * out.scale_batch + h * out.scale_head;
            uint16_t *zero = (uint16_t *)out.zero + b * out.scale_batch + h * out.scale_head;
            uint8_t q[D];
            for (int j = 0; j < CHANNEL_GROUPS; j++) {
                const int first = j * GROUP, end = first + GROUP < D ? first + GROUP : D;
                float v[GROUP], lo = 0.f, hi = 0.f;
                int nan = -1; /* a NaN channel: torch's min/max propagate it */
                for (int d = first; d < end; d++) {
                    const float c = xr[d] < -big ? -big : (xr[d] > big ? big : xr[d]);
                    v[d - first] = c;
                    lo = d == first || c < lo ? c : lo;
                    hi = d == first || c > hi ? c : hi;
                    nan = c != c && nan < 0 ? d : nan;
                }
                if (nan >= 0) { /* then Python's scale and zero are that NaN, its codes 0 */
                    scale[j] = zero[j] = float_to_half_bits(xr[nan]);
                    for (int d = first; d < end; d++) q[d] = 0;
                    continue;
                }
                const uint16_t zero_bits = float_to_half_bits(lo);
                const float z = half_to_float(zero_bits);
                float span = hi - z;
                span = span > 0.f ? span : 0.f;
                uint16_t scale_bits = float_to_half_bits(span / levels);
                if (half_to_float(scale_bits) * levels < span) scale_bits = half_next_up(scale_bits);
                const float s = half_to_float(scale_bits);
                for (int d = first; d < end; d++) {
                    float c = s > 0.f ? __builtin_nearbyintf((v[d - first] - z) / s) : 0.f;
                    c = c < 0.f ? 0.f : (c > levels ? levels : c);
                    q[d] = (uint8_t)c;
                }
                scale[j] = scale_bits;
                zero[j] = zero_bits;
            }
#if BITS == 8
            memcpy(codes, q, D);
#else
            for (int i = 0; i < D / 2; i++) codes[i] = (uint8_t)(q[2 * i] | (q[2 * i + 1] << 4));
#endif
        }
}
