/* CPU kernels for quantised KV parts (policies/precision.py: Quantized), entry points:
 *   headpolicy_decode_quantized   one decode step of a quantised KV-head group: each query
 *                                 attends every stored token of its KV head, read from the codes
 *                                 plus an optional full-precision tail, without dequantising the
 *                                 group into a buffer first. No mask: the caller uses it only when
 *                                 every stored token is visible to every row (no padding).
 *   headpolicy_quantize_tokens    one new token per row and head quantised per token into a
 *                                 cache slot (a streaming group's ring), bit for bit as in Python.
 *   headpolicy_put_token          its key and its value into slot `slot` of a K/V buffer pair
 *                                 (one call a decode step and streaming group).
 *   headpolicy_decode_step        a layer's parts of this specialisation in one call: each ring
 *                                 part's new token into its slot, then every part's decode.
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
 *
 * Two implementations of the three steps (head_scores, softmax_rows, head_values): a vector
 * path in GCC/clang vector extensions, sized to the target (16 floats with AVX-512, 8 with AVX,
 * else 4), for head dims and groups that fit it; and a scalar path for any other shape. The
 * vector path on SmolLM2 shapes (3 KV heads x 3 queries, 4K tokens, 1 thread, Zen 4) takes
 * ~0.24 ms int8 / ~0.21 ms int4 where the scalar one takes ~0.36 / ~0.57 (AVX2 build: 0.25 /
 * 0.26 against 0.38 / 0.46).
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

/* the scales and zeros of token t's channel groups (per-token layout) */
static inline void token_scales(const uint16_t *scale, const uint16_t *zero, int64_t t, float sj[CHANNEL_GROUPS],
                                float zj[CHANNEL_GROUPS]) {
    for (int j = 0; j < CHANNEL_GROUPS; j++) {
        sj[j] = half_to_float(scale[t * CHANNEL_GROUPS + j]);
        zj[j] = half_to_float(zero[t * CHANNEL_GROUPS + j]);
    }
}

/* exp(x) for x <= 0, vectorisable (no libm call): 2^(x log2 e) as 2^n * p(f) with n = t rounded
 * (t = x log2 e <= 0, so n = trunc(t - 1/2)) and f = t - n in [-1/2, 1/2], where the degree-6
 * polynomial p (Cephes' exp2f coefficients) is fitted. Relative error below 6e-7 for x >= -10,
 * 4e-6 down to -87 (t rounded to float32); x below -87 gives exp(-87), so n >= -126 and 2^n
 * stays a normal float. */
#define EXP2_FRACTION(f) /* 2^f for f in [-1/2, 1/2] (Horner; a float or a vector of floats) */               \
    ((((((1.535336188319500e-4f * (f) + 1.339887440266574e-3f) * (f) + 9.618437357674640e-3f) * (f) +           \
        5.550332471162809e-2f) * (f) + 2.402264791363012e-1f) * (f) + 6.931472028550421e-1f) * (f) + 1.f)
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (float)(int32_t)(t - 0.5f);
    const float f = t - n;
    const float p = EXP2_FRACTION(f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#if defined(__AVX512F__)
#define VL 16 /* floats a vector: the widest the target has */
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 12) && D % (2 * VL) == 0 && GROUP % (BITS == 8 ? VL : 2 * VL) == 0
/* ---- the vector path: GCC/clang vector extensions (any ISA), VL floats a vector --------------------------
 * A coded row unpacks into NC vectors ("chunks") of VL channels. int8: chunk c holds channels
 * VL c .. VL c + VL - 1. int4: chunk c < NC/2 holds the low nibbles of bytes VL c .. VL c + VL - 1
 * (channels 2 VL c, 2 VL c + 2, ...), chunk NC/2 + c their high nibbles (2 VL c + 1, ...); the
 * query, key scales and output are permuted to match once per head or group, so no nibble is
 * ever interleaved. Each chunk lies in one channel group (GROUP a multiple of VL, 2 VL for int4).
 * Dot products of VL tokens finish together: their VL partial-sum vectors reduce into one
 * vector of VL scores by VL - 1 shuffle-and-add steps (reduce_lanes), not VL horizontal sums. */
#define VECTOR_PATH 1
#define NC (D / VL)
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint8_t vb __attribute__((vector_size(VL)));

static inline vf vload(const float *p) {
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }

static inline vf vmax(vf a, vf b) {
    const vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

static inline float hsum(vf x) {
    float r = 0.f;
    for (int i = 0; i < VL; i++) r += x[i];
    return r;
}

/* exp_nonpositive, VL lanes at once */
static inline vf vexp_nonpositive(vf x) {
    x = vmax(x, (vf){} - 87.f);
    const vf t = x * 1.44269504088896341f;
    const vi n = __builtin_convertvector(t - 0.5f, vi);
    const vf f = t - __builtin_convertvector(n, vf);
    return EXP2_FRACTION(f) * (vf)((n + 127) << 23);
}

/* lane i of the result: the sum of x[i]'s lanes. Each level adds, pairwise, the even- and the
 * odd-numbered blocks of w lanes of two vectors' concatenation (w = VL/2, ..., 1). */
#define EVEN_ODD(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
#if VL == 16
#define W8(a, b) (EVEN_ODD(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) + \
                  EVEN_ODD(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#define W4(a, b) (EVEN_ODD(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) + \
                  EVEN_ODD(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31))
#define W2(a, b) (EVEN_ODD(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) + \
                  EVEN_ODD(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31))
#define W1(a, b) (EVEN_ODD(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) + \
                  EVEN_ODD(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31))
#elif VL == 8
#define W4(a, b) (EVEN_ODD(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + EVEN_ODD(a, b, 4, 5, 6, 7, 12, 13, 14, 15))
#define W2(a, b) (EVEN_ODD(a, b, 0, 1, 4, 5, 8, 9, 12, 13) + EVEN_ODD(a, b, 2, 3, 6, 7, 10, 11, 14, 15))
#define W1(a, b) (EVEN_ODD(a, b, 0, 2, 4, 6, 8, 10, 12, 14) + EVEN_ODD(a, b, 1, 3, 5, 7, 9, 11, 13, 15))
#else
#define W2(a, b) (EVEN_ODD(a, b, 0, 1, 4, 5) + EVEN_ODD(a, b, 2, 3, 6, 7))
#define W1(a, b) (EVEN_ODD(a, b, 0, 2, 4, 6) + EVEN_ODD(a, b, 1, 3, 5, 7))
#endif
static inline vf reduce_lanes(const vf x[VL]) {
    vf y[VL / 2];
#if VL == 16
    vf z[VL / 4];
    for (int i = 0; i < 8; i++) y[i] = W8(x[2 * i], x[2 * i + 1]);
    for (int i = 0; i < 4; i++) z[i] = W4(y[2 * i], y[2 * i + 1]);
    for (int i = 0; i < 2; i++) y[i] = W2(z[2 * i], z[2 * i + 1]);
#elif VL == 8
    vf z[VL / 4];
    for (int i = 0; i < 4; i++) z[i] = W4(x[2 * i], x[2 * i + 1]);
    for (int i = 0; i < 2; i++) y[i] = W2(z[2 * i], z[2 * i + 1]);
#else
    for (int i = 0; i < 2; i++) y[i] = W2(x[2 * i], x[2 * i + 1]);
#endif
    return W1(y[0], y[1]);
}

/* the channel in lane i of chunk c */
static inline int channel_of(int c, int i) {
#if BITS == 8
    return c * VL + i;
#else
    return c < NC / 2 ? 2 * (c * VL + i) : 2 * ((c - NC / 2) * VL + i) + 1;
#endif
}

/* Widening loops the compiler vectorises; GCC 12 scalarises __builtin_convertvector from a loaded
 * byte vector for int8 (and for int4 below 16 lanes), but not the 16-lane int4 form below. */
static inline void unpack_chunks(const uint8_t *restrict row, vf x[NC]) {
#if BITS == 4 && VL == 16
    for (int c = 0; c < NC / 2; c++) {
        vb b;
        memcpy(&b, row + c * VL, VL);
        x[c] = __builtin_convertvector(__builtin_convertvector(b & 15, vi), vf);
        x[c + NC / 2] = __builtin_convertvector(__builtin_convertvector(b >> 4, vi), vf);
    }
#else
    float f[D];
#if BITS == 8
    for (int d = 0; d < D; d++) f[d] = (float)row[d];
#else
    for (int i = 0; i < D / 2; i++) {
        f[i] = (float)(row[i] & 15);
        f[D / 2 + i] = (float)(row[i] >> 4);
    }
#endif
    for (int c = 0; c < NC; c++) x[c] = vload(f + c * VL);
#endif
}

/* a row coded per token, dequantised in registers */
static inline void dequantize_chunks(const uint8_t *row, const uint16_t *scale, const uint16_t *zero, vf x[NC]) {
    unpack_chunks(row, x);
    for (int c = 0; c < NC; c++) {
        const int j = channel_of(c, 0) / GROUP;
        x[c] = x[c] * half_to_float(scale[j]) + half_to_float(zero[j]);
    }
}

static inline vf dot_chunks(const vf f[NC], const vf x[NC]) {
    vf a = f[0] * x[0];
    for (int c = 1; c < NC; c++) a += f[c] * x[c];
    return a;
}

/* s[g][t] = qs[g] . k_t for the N coded keys (per channel in whole groups, or per token) and
 * the NT full-precision ones after them (rows of D floats, natural channel order) */
static void head_scores(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int keys_per_channel,
                        int64_t N, const float *tail, int64_t NT, const float *qs, float *s, int64_t T) {
    vf qp[G][NC], f[G][NC], part[G][VL], x[NC];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++)
            for (int i = 0; i < VL; i++) qp[g][c][i] = qs[g * D + channel_of(c, i)];
    int64_t t = 0;
    if (keys_per_channel)
        for (; t < N; t += GROUP) {
            const uint16_t *sc = scale + (t / GROUP) * D, *ze = zero + (t / GROUP) * D;
            float offset[G] = {0};
            for (int c = 0; c < NC; c++) {
                vf sv, zv;
                for (int i = 0; i < VL; i++) {
                    sv[i] = half_to_float(sc[channel_of(c, i)]);
                    zv[i] = half_to_float(ze[channel_of(c, i)]);
                }
                for (int g = 0; g < G; g++) {
                    f[g][c] = qp[g][c] * sv;
                    offset[g] += hsum(qp[g][c] * zv);
                }
            }
            for (int64_t t0 = t; t0 < t + GROUP; t0 += VL) {
                for (int i = 0; i < VL; i++) {
                    unpack_chunks(codes + (t0 + i) * CODE_BYTES, x);
                    for (int g = 0; g < G; g++) part[g][i] = dot_chunks(f[g], x);
                }
                for (int g = 0; g < G; g++) vstore(s + g * T + t0, reduce_lanes(part[g]) + offset[g]);
            }
        }
    else
        for (; t < N; t += VL) {
            const int n = N - t < VL ? (int)(N - t) : VL;
            for (int i = 0; i < n; i++) {
                dequantize_chunks(codes + (t + i) * CODE_BYTES, scale + (t + i) * CHANNEL_GROUPS,
                                  zero + (t + i) * CHANNEL_GROUPS, x);
                for (int g = 0; g < G; g++) part[g][i] = dot_chunks(qp[g], x);
            }
            for (int g = 0; g < G; g++) {
                if (n == VL)
                    vstore(s + g * T + t, reduce_lanes(part[g]));
                else
                    for (int i = 0; i < n; i++) s[g * T + t + i] = hsum(part[g][i]);
            }
        }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++) qp[g][c] = vload(qs + g * D + c * VL); /* natural order for the tail */
    for (int64_t u = 0; u < NT; u++) {
        for (int c = 0; c < NC; c++) x[c] = vload(tail + u * D + c * VL);
        for (int g = 0; g < G; g++) s[g * T + N + u] = hsum(dot_chunks(qp[g], x));
    }
}

/* each row of s [G][T] exponentiated after subtracting its maximum; returns 1 / its sum in inv_sum */
static void softmax_rows(float *s, int64_t T, float inv_sum[G]) {
    for (int g = 0; g < G; g++) {
        float *sg = s + g * T, m = sg[0], sum = 0.f;
        int64_t t = 0;
        if (T >= VL) {
            vf mv = vload(sg);
            for (t = VL; t + VL <= T; t += VL) mv = vmax(mv, vload(sg + t));
            for (int i = 0; i < VL; i++) m = mv[i] > m ? mv[i] : m;
        }
        for (int64_t u = t; u < T; u++) m = sg[u] > m ? sg[u] : m;
        vf sv = {};
        for (t = 0; t + VL <= T; t += VL) {
            const vf e = vexp_nonpositive(vload(sg + t) - m);
            vstore(sg + t, e);
            sv += e;
        }
        sum = hsum(sv);
        for (; t < T; t++) {
            sg[t] = exp_nonpositive(sg[t] - m);
            sum += sg[t];
        }
        inv_sum[g] = 1.f / sum;
    }
}

/* out[g] = inv_sum[g] * sum_t p[g][t] v_t over the N coded values (per token) and the NT tail rows */
static void head_values(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                        const float *tail, int64_t NT, const float *s, int64_t T, const float inv_sum[G], float *out) {
    vf acc[G][NC] = {}, x[NC];
    float zero_acc[G][CHANNEL_GROUPS] = {};
    for (int64_t t = 0; t < N; t++) {
        float sj[CHANNEL_GROUPS], zj[CHANNEL_GROUPS];
        unpack_chunks(codes + t * CODE_BYTES, x);
        token_scales(scale, zero, t, sj, zj);
        for (int g = 0; g < G; g++) {
            const float p = s[g * T + t];
            for (int j = 0; j < CHANNEL_GROUPS; j++) zero_acc[g][j] += p * zj[j];
            for (int c = 0; c < NC; c++) acc[g][c] += (p * sj[channel_of(c, 0) / GROUP]) * x[c];
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++)
            for (int i = 0; i < VL; i++) {
                const int d = channel_of(c, i);
                out[g * D + d] = (acc[g][c][i] + zero_acc[g][d / GROUP]) * inv_sum[g];
            }
    if (!NT) return;
    vf tail_acc[G][NC] = {};
    for (int64_t u = 0; u < NT; u++) {
        for (int c = 0; c < NC; c++) x[c] = vload(tail + u * D + c * VL);
        for (int g = 0; g < G; g++) {
            const float p = s[g * T + N + u];
            for (int c = 0; c < NC; c++) tail_acc[g][c] += p * x[c];
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++)
            for (int i = 0; i < VL; i++) out[g * D + c * VL + i] += tail_acc[g][c][i] * inv_sum[g];
}
#endif

#ifndef VECTOR_PATH
/* ---- the scalar path: any head dim and group; loops the compiler vectorises as it can ---------------- */
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

static void head_scores(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int keys_per_channel,
                        int64_t N, const float *tail, int64_t NT, const float *qs, float *s, int64_t T) {
    float x[D], folded[G][D], offset[G];
    if (keys_per_channel)
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
            for (int64_t t = first; t < first + GROUP; t++) {
                unpack_row(codes + t * CODE_BYTES, x);
                for (int g = 0; g < G; g++) {
                    float acc = 0.f;
                    for (int d = 0; d < D; d++) acc += folded[g][d] * x[d];
                    s[g * T + t] = acc + offset[g];
                }
            }
        }
    else
        for (int64_t t = 0; t < N; t++) {
            unpack_row(codes + t * CODE_BYTES, x);
            for (int j = 0; j < CHANNEL_GROUPS; j++) {
                const float sj = half_to_float(scale[t * CHANNEL_GROUPS + j]);
                const float zj = half_to_float(zero[t * CHANNEL_GROUPS + j]);
                for (int d = j * GROUP; d < (j + 1) * GROUP && d < D; d++) x[d] = x[d] * sj + zj;
            }
            for (int g = 0; g < G; g++) {
                float acc = 0.f;
                for (int d = 0; d < D; d++) acc += qs[g * D + d] * x[d];
                s[g * T + t] = acc;
            }
        }
    for (int64_t u = 0; u < NT; u++)
        for (int g = 0; g < G; g++) {
            float dot = 0.f;
            for (int d = 0; d < D; d++) dot += qs[g * D + d] * tail[u * D + d];
            s[g * T + N + u] = dot;
        }
}

static void softmax_rows(float *s, int64_t T, float inv_sum[G]) {
    for (int g = 0; g < G; g++) {
        float *sg = s + g * T, m = sg[0], sum = 0.f;
        for (int64_t t = 1; t < T; t++) m = sg[t] > m ? sg[t] : m;
        for (int64_t t = 0; t < T; t++) {
            sg[t] = exp_nonpositive(sg[t] - m);
            sum += sg[t];
        }
        inv_sum[g] = 1.f / sum;
    }
}

static void head_values(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                        const float *tail, int64_t NT, const float *s, int64_t T, const float inv_sum[G], float *out) {
    float x[D], acc[G][D] = {}, zero_acc[G][CHANNEL_GROUPS] = {};
    for (int64_t t = 0; t < N; t++) {
        float sj[CHANNEL_GROUPS], zj[CHANNEL_GROUPS];
        unpack_row(codes + t * CODE_BYTES, x);
        token_scales(scale, zero, t, sj, zj);
        for (int g = 0; g < G; g++) {
            const float p = s[g * T + t];
            for (int j = 0; j < CHANNEL_GROUPS; j++) {
                const float a = p * sj[j];
                zero_acc[g][j] += p * zj[j];
                for (int d = j * GROUP; d < (j + 1) * GROUP && d < D; d++) acc[g][d] += a * x[d];
            }
        }
    }
    for (int64_t u = 0; u < NT; u++)
        for (int g = 0; g < G; g++) {
            const float p = s[g * T + N + u];
            for (int d = 0; d < D; d++) acc[g][d] += p * tail[u * D + d];
        }
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) out[g * D + d] = (acc[g][d] + zero_acc[g][d / GROUP]) * inv_sum[g];
}
#endif

/* One decode step of H KV heads: query head (b, h, g) at q + b * q_batch + (h * G + g) * D, its
 * output at the same offset of out (q_batch floats a row apart); k, v: N coded tokens per head;
 * tail_k, tail_v: NT more at full precision, strides tail_batch, tail_head (rows of D
 * contiguous), may be NULL when NT == 0. Returns 0, or -1 if scratch memory could not be allocated. */
static int decode_heads(int B, int H, int64_t N, int64_t NT, const float *q, int64_t q_batch, quantized k,
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
            float qs[G * D], inv_sum[G];
            const int64_t at = b * q_batch + (int64_t)h * G * D;
            for (int i = 0; i < G * D; i++) qs[i] = q[at + i] * scale;
            const float *tk = NT ? tail_k + b * tail_batch + h * tail_head : NULL;
            const float *tv = NT ? tail_v + b * tail_batch + h * tail_head : NULL;
            const int64_t ko = b * k.scale_batch + h * k.scale_head, vo = b * v.scale_batch + h * v.scale_head;
            head_scores(k.codes + b * k.codes_batch + h * k.codes_head, k.scale + ko, k.zero + ko, keys_per_channel, N,
                        tk, NT, qs, s, T);
            softmax_rows(s, T, inv_sum);
            head_values(v.codes + b * v.codes_batch + h * v.codes_head, v.scale + vo, v.zero + vo, N, tv, NT, s, T,
                        inv_sum, out + at);
            free(s);
        }
    return failed ? -1 : 0;
}

/* q [B, H, G, D] float32 (contiguous); k, v: N coded tokens per head; tail_k, tail_v: NT more at
 * full precision, strides tail_batch, tail_head (rows of D contiguous), may be NULL when NT == 0;
 * out [B, H, G, D] float32. Returns 0, or -1 if scratch memory could not be allocated. */
int headpolicy_decode_quantized(int B, int H, int64_t N, int64_t NT, const float *q, quantized k,
                                int keys_per_channel, quantized v, const float *tail_k, const float *tail_v,
                                int64_t tail_batch, int64_t tail_head, float scale, float *out, int threads) {
    return decode_heads(B, H, N, NT, q, (int64_t)H * G * D, k, keys_per_channel, v, tail_k, tail_v, tail_batch,
                        tail_head, scale, out, threads);
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

/* A slot's view of per-token buffers [B, H, capacity, *] (rows of a head contiguous, so a slot is
 * CODE_BYTES codes and CHANNEL_GROUPS scales and zeros further on); the strides stay. */
static inline quantized at_slot(quantized x, int64_t slot) {
    x.codes += slot * CODE_BYTES;
    x.scale += slot * CHANNEL_GROUPS;
    x.zero += slot * CHANNEL_GROUPS;
    return x;
}

/* A decode step's key and value, k and v [B, H, D] float32 contiguous, quantised per token into
 * slot `slot` of the per-token buffers K and V [B, H, capacity, *] (at_slot). */
void headpolicy_put_token(int B, int H, int64_t slot, const float *k, const float *v, const quantized *K,
                          const quantized *V) {
    const float *x[2] = {k, v};
    const quantized *buffers[2] = {K, V};
    for (int i = 0; i < 2; i++) headpolicy_quantize_tokens(B, H, x[i], at_slot(*buffers[i], slot));
}

/* One part of a layer's decode step (headpolicy_decode_step): a quantised KV-head group's whole
 * buffers and what this step reads and writes of them. */
typedef struct {
    quantized k, v;           /* the whole K/V buffers [B, heads, capacity, *] */
    int64_t heads;            /* KV heads of the part */
    int64_t kv_first;         /* its first KV head among the step's new tokens */
    int64_t keys_per_channel; /* 1: keys per channel in whole token groups (a retrieval part) */
    int64_t n;                /* coded tokens attended */
    int64_t slot;             /* the slot this step's key and value are quantised into first, or -1 */
    int64_t n_tail;           /* full-precision tokens attended after the coded ones */
    const float *k_tail, *v_tail;
    int64_t tail_batch, tail_head;
} step_part;

/* A layer's decode step over its quantised parts of this specialisation, in one call: each
 * part's new token goes into its slot (a streaming ring's), then each part's query heads
 * attend its n coded tokens and n_tail tail tokens. q, out [B, Hkv * G, D] float32 and
 * k_new, v_new [B, Hkv, D] float32, all contiguous, every KV head of the layer (a part's
 * query heads are those of its KV heads). Returns 0, or -1 if scratch memory could not be
 * allocated. */
int headpolicy_decode_step(int B, int Hkv, int P, const step_part *parts, const float *q, const float *k_new,
                           const float *v_new, float scale, float *out, int threads) {
    const int64_t q_batch = (int64_t)Hkv * G * D;
    for (int i = 0; i < P; i++) {
        const step_part *p = parts + i;
        if (p->slot < 0) continue;
        const quantized dest[2] = {at_slot(p->k, p->slot), at_slot(p->v, p->slot)};
        const float *x[2] = {k_new, v_new};
        for (int j = 0; j < 2; j++) {
            for (int b = 0; b < B; b++) { /* the part's heads are contiguous in [B, Hkv, D] */
                quantized row = dest[j];
                row.codes += b * row.codes_batch;
                row.scale += b * row.scale_batch;
                row.zero += b * row.scale_batch;
                headpolicy_quantize_tokens(1, (int)p->heads, x[j] + ((int64_t)b * Hkv + p->kv_first) * D, row);
            }
        }
    }
    int failed = 0;
    for (int i = 0; i < P; i++) {
        const step_part *p = parts + i;
        const int64_t at = p->kv_first * G * D;
        failed |= decode_heads(B, (int)p->heads, p->n, p->n_tail, q + at, q_batch, p->k, (int)p->keys_per_channel,
                               p->v, p->k_tail, p->v_tail, p->tail_batch, p->tail_head, scale, out + at, threads);
    }
    return failed;
}
