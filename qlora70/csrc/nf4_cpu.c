/* NF4 quantize / dequantize on the CPU: the same numbers as the pure-torch reference in qlora70/nf4.py, bit for bit;
 * and the fused elementwise / row kernels of CPU training (seeded dropout, the LoRA fp32 sum, cross-entropy rows,
 * RMSNorm, SwiGLU, rotary embedding), each the reference of a torch formulation in qlora70/ops.py.
 *
 * Built at first use by qlora70/native.py (`cc -O3 -march=native -shared`), loaded with ctypes; no Python or torch
 * headers. Every function works on a block range [b0, b1) so the caller can split the work across threads (ctypes
 * releases the GIL). Arithmetic is plain IEEE fp32 (never build with -ffast-math): the scaled value is x * inv[b]
 * and the decoded value is code[k] * absmax[b], both single fp32 multiplies, as in torch; conversions to bf16/fp16
 * round to nearest even, as torch's casts do.
 *
 * Layout (bitsandbytes): the weight is flat row-major, blocks of `bs` elements, two codes per byte with the even
 * element in the high nibble; an odd element count pads the last low nibble with `pad_code`.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

/* fp32 -> IEEE fp16, round to nearest even, overflow -> inf, NaN -> quiet NaN. Scaling by 2^112 then 2^-110 makes
 * the fp32 adder do the rounding at the fp16 mantissa position (normal and subnormal alike). */
static inline uint16_t f32_to_f16(float f) {
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = ((f < 0 ? -f : f) * bits_f32(0x77800000u)) * bits_f32(0x08800000u);  /* * 2^112 * 2^-110 */
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* IEEE fp16 -> fp32 (exact, subnormals included). */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * bits_f32(0x07800000u);  /* * 2^-112 */
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return bits_f32(r);
}

/* ---- dequantize: packed codes + per-block absmax -> out[n] -------------------------------------------------------
 * The block's absmax is either given in fp32 (`absmax`, qabsmax == NULL) or double-quantized: 8-bit codes `qabsmax`
 * decoded as nmap[code] * nabs[b / nbs] + offset (two fp32 roundings, as in torch). Per block: a 16-entry table of
 * code[k] * absmax (already in the output type), then each byte writes two entries. */
typedef struct {
    const float *absmax;   /* fp32 [n_blocks], or NULL with double quantization */
    const uint8_t *qabsmax; /* uint8 [n_blocks] */
    const float *nmap;     /* fp32 [256] */
    const float *nabs;     /* fp32 [ceil(n_blocks / nbs)] */
    float offset;
    int64_t nbs_log2;      /* log2 of the nested blocksize (a power of two) */
} scales_t;

static inline float block_absmax(const scales_t *sc, int64_t b) {
    if (sc->qabsmax == NULL) return sc->absmax[b];
    const float a = sc->nmap[sc->qabsmax[b]] * sc->nabs[b >> sc->nbs_log2];
    return a + sc->offset;
}
#define DEFINE_DEQUANT(NAME, T, CONV)                                                                                \
    void NAME(const uint8_t *packed, const scales_t *sc, const float *code, T *out, int64_t n, int64_t bs,         \
              int64_t b0, int64_t b1) {                                                                              \
        for (int64_t b = b0; b < b1; ++b) {                                                                          \
            T t[16];                                                                                                 \
            const float a = block_absmax(sc, b);                                                                     \
            for (int k = 0; k < 16; ++k) t[k] = CONV(code[k] * a);                                                   \
            const int64_t e0 = b * bs, e1 = (e0 + bs < n) ? e0 + bs : n;                                             \
            const uint8_t *p = packed + e0 / 2;                                                                      \
            T *o = out + e0;                                                                                         \
            const int64_t npairs = (e1 - e0) / 2;                                                                    \
            for (int64_t j = 0; j < npairs; ++j) {                                                                   \
                const uint8_t v = p[j];                                                                              \
                o[2 * j] = t[v >> 4];                                                                                \
                o[2 * j + 1] = t[v & 15];                                                                            \
            }                                                                                                        \
            if ((e1 - e0) & 1) o[e1 - e0 - 1] = t[p[npairs] >> 4];                                                  \
        }                                                                                                            \
    }

#define ID_F32(x) (x)
#define TO_F64(x) ((double)(x))
DEFINE_DEQUANT(nf4_dequant_f64, double, TO_F64)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* AVX-512: the per-block table lives in one register and `vpermw` / `vpermps` look up 32 / 16 nibbles at a time;
 * `vpermt2w` / `vpermt2ps` interleave the high- and low-nibble values back into element order. The table itself is
 * built with vector ops: fp32 products, then bf16 by the same integer round-to-nearest-even as f32_to_bf16 (not
 * vcvtneps2bf16, which flushes subnormals) or fp16 by vcvtps2ph (IEEE round to nearest even). */
#include <immintrin.h>

static inline __m512i table16_bf16(__m512 prod) {
    const __m512i u = _mm512_castps_si512(prod);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(prod, prod, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(r));
}

static inline __m512i table16_f16(__m512 prod) {
    return _mm512_castsi256_si512(_mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#define DEFINE_DEQUANT16_AVX512(NAME, TABLE)                                                                         \
    void NAME(const uint8_t *packed, const scales_t *sc, const float *code, uint16_t *out, int64_t n, int64_t bs,  \
              int64_t b0, int64_t b1) {                                                                              \
        const __m512 codes = _mm512_loadu_ps(code);                                                                  \
        const __m512i lo_mask = _mm512_set1_epi16(15);                                                               \
        const __m512i i0 = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,  \
                                            6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);                            \
        const __m512i i1 = _mm512_add_epi16(i0, _mm512_set1_epi16(16));                                              \
        for (int64_t b = b0; b < b1; ++b) {                                                                          \
            const __m512i t = TABLE(_mm512_mul_ps(codes, _mm512_set1_ps(block_absmax(sc, b))));                      \
            const int64_t e0 = b * bs, e1 = (e0 + bs < n) ? e0 + bs : n;                                             \
            const uint8_t *p = packed + e0 / 2;                                                                      \
            uint16_t *o = out + e0;                                                                                  \
            const int64_t npairs = (e1 - e0) / 2;                                                                    \
            for (int64_t j = 0; j < npairs; j += 32) {                                                               \
                const int64_t m = npairs - j < 32 ? npairs - j : 32;                                                 \
                const __mmask32 k = m == 32 ? 0xFFFFFFFFu : ((1u << m) - 1u);                                        \
                const __m512i x = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, p + j));                          \
                const __m512i vh = _mm512_permutexvar_epi16(_mm512_srli_epi16(x, 4), t);                             \
                const __m512i vl = _mm512_permutexvar_epi16(_mm512_and_si512(x, lo_mask), t);                        \
                const __m512i y0 = _mm512_permutex2var_epi16(vh, i0, vl);                                            \
                const __m512i y1 = _mm512_permutex2var_epi16(vh, i1, vl);                                            \
                if (m == 32) {                                                                                       \
                    _mm512_storeu_si512((void *)(o + 2 * j), y0);                                                    \
                    _mm512_storeu_si512((void *)(o + 2 * j + 32), y1);                                               \
                } else {                                                                                             \
                    const uint64_t k2 = m >= 16 ? ~0ull : ((1ull << (2 * m)) - 1ull);                                \
                    const uint64_t k3 = m > 16 ? ((1ull << (2 * (m - 16))) - 1ull) : 0ull;                           \
                    _mm512_mask_storeu_epi16(o + 2 * j, (__mmask32)k2, y0);                                          \
                    _mm512_mask_storeu_epi16(o + 2 * j + 32, (__mmask32)k3, y1);                                     \
                }                                                                                                    \
            }                                                                                                        \
            if ((e1 - e0) & 1) {                                                                                     \
                uint16_t tt[32];                                                                                     \
                _mm512_storeu_si512((void *)tt, t);                                                                  \
                o[e1 - e0 - 1] = tt[p[npairs] >> 4];                                                                 \
            }                                                                                                        \
        }                                                                                                            \
    }
DEFINE_DEQUANT16_AVX512(nf4_dequant_bf16, table16_bf16)
DEFINE_DEQUANT16_AVX512(nf4_dequant_f16, table16_f16)

void nf4_dequant_f32(const uint8_t *packed, const scales_t *sc, const float *code, float *out, int64_t n, int64_t bs,
                     int64_t b0, int64_t b1) {
    const __m512 codes = _mm512_loadu_ps(code);
    const __m512i lo_mask = _mm512_set1_epi32(15);
    const __m512i i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(8));
    for (int64_t b = b0; b < b1; ++b) {
        const __m512 t = _mm512_mul_ps(codes, _mm512_set1_ps(block_absmax(sc, b)));
        const int64_t e0 = b * bs, e1 = (e0 + bs < n) ? e0 + bs : n;
        const uint8_t *p = packed + e0 / 2;
        float *o = out + e0;
        const int64_t npairs = (e1 - e0) / 2;
        for (int64_t j = 0; j < npairs; j += 16) {
            const int64_t m = npairs - j < 16 ? npairs - j : 16;
            const __mmask16 k = (__mmask16)(m == 16 ? 0xFFFFu : ((1u << m) - 1u));
            const __m512i x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p + j));
            const __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), t);
            const __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(x, lo_mask), t);
            const __m512 y0 = _mm512_permutex2var_ps(vh, i0, vl);
            const __m512 y1 = _mm512_permutex2var_ps(vh, i1, vl);
            if (m == 16) {
                _mm512_storeu_ps(o + 2 * j, y0);
                _mm512_storeu_ps(o + 2 * j + 16, y1);
            } else {
                const uint32_t k2 = m >= 8 ? 0xFFFFu : ((1u << (2 * m)) - 1u);
                const uint32_t k3 = m > 8 ? ((1u << (2 * (m - 8))) - 1u) : 0u;
                _mm512_mask_storeu_ps(o + 2 * j, (__mmask16)k2, y0);
                _mm512_mask_storeu_ps(o + 2 * j + 16, (__mmask16)k3, y1);
            }
        }
        if ((e1 - e0) & 1) {
            float tt[16];
            _mm512_storeu_ps(tt, t);
            o[e1 - e0 - 1] = tt[p[npairs] >> 4];
        }
    }
}
int nf4_simd(void) { return 512; }
#else
DEFINE_DEQUANT(nf4_dequant_f32, float, ID_F32)
DEFINE_DEQUANT(nf4_dequant_bf16, uint16_t, f32_to_bf16)
DEFINE_DEQUANT(nf4_dequant_f16, uint16_t, f32_to_f16)
int nf4_simd(void) { return 0; }
#endif

/* ---- quantize, pass 1: per-block absmax (raw, unclamped) and the count of NaN/inf values ---------------------- */
#define DEFINE_ABSMAX(NAME, T, LOAD)                                                                                 \
    int64_t NAME(const T *x, float *absmax, int64_t n, int64_t bs, int64_t b0, int64_t b1) {                        \
        int64_t bad = 0;                                                                                             \
        for (int64_t b = b0; b < b1; ++b) {                                                                          \
            const int64_t e0 = b * bs, e1 = (e0 + bs < n) ? e0 + bs : n;                                             \
            float m = 0.0f;                                                                                          \
            for (int64_t i = e0; i < e1; ++i) {                                                                      \
                const float v = LOAD(x[i]);                                                                          \
                const float a = v < 0 ? -v : v;                                                                      \
                bad += !(a <= 3.4028234663852886e38f);                                                               \
                m = a > m ? a : m;                                                                                   \
            }                                                                                                        \
            absmax[b] = m;                                                                                           \
        }                                                                                                            \
        return bad;                                                                                                  \
    }

/* ---- quantize, pass 2: code = number of midpoints strictly below x * inv[b] (ties go to the lower code, as
 * torch.bucketize), then packed two per byte. `mid` holds the 15 midpoints, ascending. */
#define DEFINE_QUANT(NAME, T, LOAD)                                                                                  \
    void NAME(const T *x, const float *inv, const float *mid, uint8_t *packed, int64_t n, int64_t bs,               \
              int64_t pad_code, int64_t b0, int64_t b1) {                                                            \
        float md[15];                                                                                                \
        for (int k = 0; k < 15; ++k) md[k] = mid[k];                                                                 \
        for (int64_t b = b0; b < b1; ++b) {                                                                          \
            const int64_t e0 = b * bs, e1 = (e0 + bs < n) ? e0 + bs : n;                                             \
            const float s = inv[b];                                                                                  \
            uint8_t c[4096];                                                                                         \
            for (int64_t i = e0; i < e1; ++i) {                                                                      \
                const float v = LOAD(x[i]) * s;                                                                      \
                uint8_t q = 0;                                                                                       \
                for (int k = 0; k < 15; ++k) q += v > md[k];                                                         \
                c[i - e0] = q;                                                                                       \
            }                                                                                                        \
            if ((e1 - e0) & 1) c[e1 - e0] = (uint8_t)pad_code;                                                       \
            uint8_t *p = packed + e0 / 2;                                                                            \
            const int64_t nbytes = (e1 - e0 + 1) / 2;                                                                \
            for (int64_t j = 0; j < nbytes; ++j) p[j] = (uint8_t)((c[2 * j] << 4) | c[2 * j + 1]);                  \
        }                                                                                                            \
    }

#define LOAD_BF16(h) bf16_to_f32(h)
#define LOAD_F16(h) f16_to_f32(h)
DEFINE_ABSMAX(nf4_absmax_f32, float, ID_F32)
DEFINE_ABSMAX(nf4_absmax_bf16, uint16_t, LOAD_BF16)
DEFINE_ABSMAX(nf4_absmax_f16, uint16_t, LOAD_F16)
DEFINE_QUANT(nf4_quant_f32, float, ID_F32)
DEFINE_QUANT(nf4_quant_bf16, uint16_t, LOAD_BF16)
DEFINE_QUANT(nf4_quant_f16, uint16_t, LOAD_F16)

/* ---- seeded dropout: y[i] = x[i] * (keep(i) ? scale : 0), one pass, any of f32/bf16/f16 in and out. keep(i) is a
 * pure function of (seed, i): h(i) = mix32(mix32(lo32(i) ^ lo32(seed)) + (hi32(seed) ^ hi32(i) * 0x9E3779B9)),
 * keep iff h(i) >= thr (thr = round(p * 2^32)), mix32 being the "lowbias32" integer hash (a bijection of uint32).
 * So forward, checkpoint recomputation and backward (the same call on the gradient) regenerate the mask from the
 * seed alone: nothing is stored. qlora70/ops.py has the same hash in torch integer ops (the reference). */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

#define STORE_F32(v) (v)
#define STORE_BF16(v) f32_to_bf16(v)
#define STORE_F16(v) f32_to_f16(v)
#define DEFINE_DROP(NAME, TI, LOAD, TO, STORE)                                                                       \
    static void NAME(const TI *x, TO *y, int64_t i0, int64_t i1, uint64_t seed, uint32_t thr, float scale) {        \
        const uint32_t s0 = (uint32_t)seed, s1 = (uint32_t)(seed >> 32);                                             \
        for (int64_t i = i0; i < i1; ++i) {                                                                          \
            const uint32_t h = mix32(mix32((uint32_t)i ^ s0) + (s1 ^ ((uint32_t)((uint64_t)i >> 32) * 0x9E3779B9u))); \
            y[i] = STORE(LOAD(x[i]) * (h >= thr ? scale : 0.0f));                                                    \
        }                                                                                                            \
    }
DEFINE_DROP(drop_f32_f32, float, ID_F32, float, STORE_F32)
DEFINE_DROP(drop_f32_bf16, float, ID_F32, uint16_t, STORE_BF16)
DEFINE_DROP(drop_f32_f16, float, ID_F32, uint16_t, STORE_F16)
DEFINE_DROP(drop_bf16_f32, uint16_t, LOAD_BF16, float, STORE_F32)
DEFINE_DROP(drop_bf16_bf16, uint16_t, LOAD_BF16, uint16_t, STORE_BF16)
DEFINE_DROP(drop_bf16_f16, uint16_t, LOAD_BF16, uint16_t, STORE_F16)
DEFINE_DROP(drop_f16_f32, uint16_t, LOAD_F16, float, STORE_F32)
DEFINE_DROP(drop_f16_bf16, uint16_t, LOAD_F16, uint16_t, STORE_BF16)
DEFINE_DROP(drop_f16_f16, uint16_t, LOAD_F16, uint16_t, STORE_F16)

/* ---- LoRA sum: out = y + scale * d in fp32 (two roundings, as torch's y.float() + d.float() * scale), and its
 * backward: gy = g, gd = g * scale, both rounded to y's and d's dtype. y, d (and gy, gd) share one dtype kind. */
#define DEFINE_ADD(NAME, T, LOAD)                                                                                    \
    static void NAME(const T *y, const T *d, float *out, int64_t i0, int64_t i1, float scale) {                     \
        for (int64_t i = i0; i < i1; ++i) out[i] = LOAD(y[i]) + LOAD(d[i]) * scale;                                 \
    }
#define DEFINE_ADDGRAD(NAME, T, STORE)                                                                               \
    static void NAME(const float *g, T *gy, T *gd, int64_t i0, int64_t i1, float scale) {                           \
        for (int64_t i = i0; i < i1; ++i) { gy[i] = STORE(g[i]); gd[i] = STORE(g[i] * scale); }                    \
    }
DEFINE_ADD(add_f32, float, ID_F32)
DEFINE_ADD(add_bf16, uint16_t, LOAD_BF16)
DEFINE_ADD(add_f16, uint16_t, LOAD_F16)
DEFINE_ADDGRAD(addgrad_f32, float, STORE_F32)
DEFINE_ADDGRAD(addgrad_bf16, uint16_t, STORE_BF16)
DEFINE_ADDGRAD(addgrad_f16, uint16_t, STORE_F16)

/* ---- cross-entropy rows: loss[r] = logsumexp(l[r, :]) - l[r, y[r]] and, with `grad`, l[r, :] overwritten in
 * place by softmax(l[r, :]) - onehot(y[r]) in l's dtype (what backward needs), one row at a time in cache: the row
 * is read three times from L2 and written once, instead of ~7 full-size passes through memory with an fp32 copy.
 * exp is Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial; < 5e-7 relative), written so
 * it vectorizes; arguments are <= 0 (l - max), clamped at -87 (exp(-87) = 1.6e-38: a negligible share of the sum).
 * Sums: fp32 SIMD lanes over 1024 values (`omp simd`, built with -fopenmp-simd: no OpenMP runtime), then fp64.
 * A non-finite logit or an out-of-range target gives a NaN loss. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float big = x * 1.44269504088896341f + 12582912.0f;  /* + 1.5 * 2^23 rounds to an integer (vectorizes; */
    const float k = big - 12582912.0f;                           /* floorf does not without -fno-trapping-math) */
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * (r * r) + r + 1.0f;
    return e * bits_f32((f32_bits(big) - 0x4B400000u + 127u) << 23);  /* 2^k, k in [-126, 0] */
}

#define DEFINE_CE(NAME, T, LOAD, STORE)                                                                              \
    static void NAME(T *l, const int64_t *y, float *loss, int64_t V, int64_t r0, int64_t r1, int grad, float *e) {  \
        for (int64_t r = r0; r < r1; ++r) {                                                                          \
            T *row = l + r * V;                                                                                      \
            float mx = -INFINITY, bad = 0.0f;                                                                        \
            double total = 0.0;                                                                                      \
            _Pragma("omp simd reduction(max:mx) reduction(+:bad)")                                                   \
            for (int64_t v = 0; v < V; ++v) {                                                                        \
                const float a = LOAD(row[v]);                                                                        \
                mx = a > mx ? a : mx;                                                                                \
                bad += a - a;  /* NaN if any logit is NaN or infinite */                                             \
            }                                                                                                        \
            for (int64_t v0 = 0; v0 < V; v0 += 1024) {  /* fp32 SIMD partial sums of 1024, added in fp64 */      \
                const int64_t v1 = v0 + 1024 < V ? v0 + 1024 : V;                                                    \
                float part = 0.0f;                                                                                   \
                _Pragma("omp simd reduction(+:part)")                                                                \
                for (int64_t v = v0; v < v1; ++v) {                                                                  \
                    const float ev = exp_neg(LOAD(row[v]) - mx);                                                     \
                    e[v] = ev;                                                                                       \
                    part += ev;                                                                                      \
                }                                                                                                    \
                total += part;                                                                                       \
            }                                                                                                        \
            const int64_t t = y[r];                                                                                  \
            if (bad != 0.0f || t < 0 || t >= V) { loss[r] = NAN; continue; }                                         \
            loss[r] = (float)(log(total) + (double)mx - (double)LOAD(row[t]));                                       \
            if (!grad) continue;                                                                                     \
            const float inv = (float)(1.0 / total);                                                                  \
            _Pragma("omp simd")                                                                                      \
            for (int64_t v = 0; v < V; ++v) row[v] = STORE(e[v] * inv);                                              \
            row[t] = STORE(e[t] * inv - 1.0f);                                                                       \
        }                                                                                                            \
    }
DEFINE_CE(ce_f32, float, ID_F32, STORE_F32)
DEFINE_CE(ce_bf16, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_CE(ce_f16, uint16_t, LOAD_F16, STORE_F16)

/* ---- RMSNorm over rows of D fp32 values: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) (torch's order of
 * roundings; the mean from fp32 SIMD partial sums of 1024 combined in fp64). Backward, with xhat = x * r and
 * gw = g * w:  dx = r * (gw - xhat * sum(gw * xhat) / D)  (dL/dw = sum over rows of g * xhat is left to torch). */
static float row_mean_sq(const float *x, int64_t D) {
    double total = 0.0;
    for (int64_t v0 = 0; v0 < D; v0 += 1024) {
        const int64_t v1 = v0 + 1024 < D ? v0 + 1024 : D;
        float part = 0.0f;
        _Pragma("omp simd reduction(+:part)")
        for (int64_t v = v0; v < v1; ++v) part += x[v] * x[v];
        total += part;
    }
    return (float)(total / (double)D);
}

static void rmsnorm_fwd_rows(const float *x, const float *w, float *y, float *rstd, int64_t D, float eps,
                             int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        const float rs = 1.0f / sqrtf(row_mean_sq(xr, D) + eps);
        rstd[r] = rs;
        _Pragma("omp simd")
        for (int64_t v = 0; v < D; ++v) yr[v] = w[v] * (xr[v] * rs);
    }
}

static void rmsnorm_bwd_rows(const float *x, const float *w, const float *rstd, const float *g, float *dx,
                             int64_t D, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * D, *gr = g + r * D;
        float *dr = dx + r * D;
        const float rs = rstd[r];
        double total = 0.0;
        for (int64_t v0 = 0; v0 < D; v0 += 1024) {
            const int64_t v1 = v0 + 1024 < D ? v0 + 1024 : D;
            float part = 0.0f;
            _Pragma("omp simd reduction(+:part)")
            for (int64_t v = v0; v < v1; ++v) part += (gr[v] * w[v]) * (xr[v] * rs);
            total += part;
        }
        const float c = (float)(total / (double)D);
        _Pragma("omp simd")
        for (int64_t v = 0; v < D; ++v) dr[v] = rs * (gr[v] * w[v] - (xr[v] * rs) * c);
    }
}

/* ---- SwiGLU: y = silu(a) * b, silu(a) = a * sigmoid(a); backward: db = dy * silu(a),
 * da = dy * b * s * (1 + a * (1 - s)) with s = sigmoid(a) (exp_neg of -|a|; fp32 arithmetic, any of f32/bf16). */
static inline float sigmoid_f(float a) {
    const float e = exp_neg(a < 0.0f ? a : -a);  /* exp(-|a|) in (0, 1] */
    return a >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}
#define DEFINE_SWIGLU(NAME_F, NAME_B, T, LOAD, STORE)                                                                \
    static void NAME_F(const T *a, const T *b, T *y, int64_t i0, int64_t i1) {                                       \
        _Pragma("omp simd")                                                                                          \
        for (int64_t i = i0; i < i1; ++i) {                                                                          \
            const float av = LOAD(a[i]);                                                                             \
            y[i] = STORE((av * sigmoid_f(av)) * LOAD(b[i]));                                                         \
        }                                                                                                            \
    }                                                                                                                \
    static void NAME_B(const T *a, const T *b, const T *dy, T *da, T *db, int64_t i0, int64_t i1) {                  \
        _Pragma("omp simd")                                                                                          \
        for (int64_t i = i0; i < i1; ++i) {                                                                          \
            const float av = LOAD(a[i]), bv = LOAD(b[i]), g = LOAD(dy[i]), sg = sigmoid_f(av);                       \
            db[i] = STORE(g * (av * sg));                                                                            \
            da[i] = STORE(g * bv * (sg * (1.0f + av * (1.0f - sg))));                                                \
        }                                                                                                            \
    }
DEFINE_SWIGLU(swiglu_f32, swiglu_bwd_f32, float, ID_F32, STORE_F32)
DEFINE_SWIGLU(swiglu_bf16, swiglu_bwd_bf16, uint16_t, LOAD_BF16, STORE_BF16)

/* ---- rotary embedding (HF rotate-half) fused with the head transpose: x (B, T, H, hd) fp32 -> y (B, H, T, hd)
 * in y's kind, y[..i] = x_i c_i - x_{i+h} s_i, y[..i+h] = x_{i+h} c_{i+h} + x_i s_{i+h} (h = hd / 2; cos, sin
 * (B, T, hd) fp32; the products and the sum rounded in fp32, as torch's x * cos + rotate_half(x) * sin). Backward
 * (the transposed rotation): dy (B, H, T, hd) -> dx (B, T, H, hd) fp32, dx_i = dy_i c_i + dy_{i+h} s_{i+h},
 * dx_{i+h} = dy_{i+h} c_{i+h} - dy_i s_i. Blocks are (b, t) rows of H heads. */
#define DEFINE_ROPE(NAME_F, NAME_B, T, LOAD, STORE)                                                                  \
    static void NAME_F(const float *x, const float *cs, const float *sn, T *y, int64_t Tn, int64_t H, int64_t hd,   \
                       int64_t r0, int64_t r1) {                                                                     \
        const int64_t h2 = hd / 2;                                                                                   \
        for (int64_t r = r0; r < r1; ++r) {                                                                          \
            const int64_t b = r / Tn, t = r % Tn;                                                                    \
            const float *c = cs + r * hd, *s = sn + r * hd;                                                          \
            for (int64_t h = 0; h < H; ++h) {                                                                        \
                const float *xr = x + (r * H + h) * hd;                                                              \
                T *yr = y + ((b * H + h) * Tn + t) * hd;                                                             \
                _Pragma("omp simd")                                                                                  \
                for (int64_t i = 0; i < h2; ++i) {                                                                   \
                    const float x1 = xr[i], x2 = xr[i + h2];                                                         \
                    yr[i] = STORE(x1 * c[i] + (-x2) * s[i]);                                                         \
                    yr[i + h2] = STORE(x2 * c[i + h2] + x1 * s[i + h2]);                                             \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
    }                                                                                                                \
    static void NAME_B(const T *dy, const float *cs, const float *sn, float *dx, int64_t Tn, int64_t H, int64_t hd, \
                       int64_t r0, int64_t r1) {                                                                     \
        const int64_t h2 = hd / 2;                                                                                   \
        for (int64_t r = r0; r < r1; ++r) {                                                                          \
            const int64_t b = r / Tn, t = r % Tn;                                                                    \
            const float *c = cs + r * hd, *s = sn + r * hd;                                                          \
            for (int64_t h = 0; h < H; ++h) {                                                                        \
                const T *gr = dy + ((b * H + h) * Tn + t) * hd;                                                      \
                float *dr = dx + (r * H + h) * hd;                                                                   \
                _Pragma("omp simd")                                                                                  \
                for (int64_t i = 0; i < h2; ++i) {                                                                   \
                    const float g1 = LOAD(gr[i]), g2 = LOAD(gr[i + h2]);                                             \
                    dr[i] = g1 * c[i] + g2 * s[i + h2];                                                              \
                    dr[i + h2] = g2 * c[i + h2] + (-g1) * s[i];                                                      \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
    }
DEFINE_ROPE(rope_f32, rope_bwd_f32, float, ID_F32, STORE_F32)
DEFINE_ROPE(rope_bf16, rope_bwd_bf16, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_ROPE(rope_f16, rope_bwd_f16, uint16_t, LOAD_F16, STORE_F16)

/* ---- threads: each entry point below splits [0, n_blocks) into `nthreads` contiguous ranges, runs the first
 * nthreads - 1 on new pthreads and the last on the calling thread (which ctypes has released from the GIL). -------- */
enum { K_DQ_F32, K_DQ_F64, K_DQ_BF16, K_DQ_F16, K_AM_F32, K_AM_BF16, K_AM_F16, K_Q_F32, K_Q_BF16, K_Q_F16,
       K_DROP, K_ADD, K_ADDG, K_CE, K_RMS, K_RMSB, K_SWI, K_SWIB, K_ROPE, K_ROPEB };
typedef struct {
    int kind;
    const void *x;          /* packed bytes (dequant) or the input weight (absmax, quant) */
    const scales_t *sc;
    const float *f0, *f1;   /* dequant: code; quant: inv, mid */
    void *out;              /* dequant: output; absmax: absmax; quant: packed */
    int64_t n, bs, pad, b0, b1, bad;
    uint64_t seed;          /* dropout: the seed, threshold and keep scale; pad = in_kind * 3 + out_kind */
    uint32_t thr;
    float scale;
    const void *x2;         /* LoRA sum: d; its backward: gd (out2) */
    void *out2;
    const void *x3;         /* RMSNorm backward: g; SwiGLU backward: dy */
} job_t;

/* The element range [i0, i1) of a job whose blocks are `bs` elements (the last one partial). */
static inline void elem_range(const job_t *j, int64_t *i0, int64_t *i1) {
    *i0 = j->b0 * j->bs;
    *i1 = (j->b1 * j->bs < j->n) ? j->b1 * j->bs : j->n;
}

static void run_rope(const job_t *j) {
    const int64_t Tn = j->pad >> 32, H = (j->pad >> 4) & 0xFFFFFFF, kind = j->pad & 15, hd = j->bs;
    if (j->kind == K_ROPE) {
        if (kind == 0) rope_f32(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
        else if (kind == 1) rope_bf16(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
        else rope_f16(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
    } else {
        if (kind == 0) rope_bwd_f32(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
        else if (kind == 1) rope_bwd_bf16(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
        else rope_bwd_f16(j->x, j->f0, j->f1, j->out, Tn, H, hd, j->b0, j->b1);
    }
}

static void run_rms_swi(const job_t *j) {
    int64_t i0, i1;
    elem_range(j, &i0, &i1);
    switch (j->kind) {
    case K_RMS: rmsnorm_fwd_rows(j->x, j->f0, j->out, j->out2, j->bs, j->scale, j->b0, j->b1); break;
    case K_RMSB: rmsnorm_bwd_rows(j->x, j->f0, j->f1, j->x3, j->out, j->bs, j->b0, j->b1); break;
    case K_SWI:
        if (j->pad == 0) swiglu_f32(j->x, j->x2, j->out, i0, i1); else swiglu_bf16(j->x, j->x2, j->out, i0, i1);
        break;
    case K_SWIB:
        if (j->pad == 0) swiglu_bwd_f32(j->x, j->x2, j->x3, j->out, j->out2, i0, i1);
        else swiglu_bwd_bf16(j->x, j->x2, j->x3, j->out, j->out2, i0, i1);
        break;
    }
}

static void run_ce(job_t *j) {
    float *e = malloc((size_t)j->bs * sizeof(float));  /* one row of exp values (bs = V) */
    if (e == NULL) { j->bad = 1; return; }
    const int grad = (int)(j->pad >> 4), kind = (int)(j->pad & 15);
    if (kind == 0) ce_f32(j->out, j->x, j->out2, j->bs, j->b0, j->b1, grad, e);
    else if (kind == 1) ce_bf16(j->out, j->x, j->out2, j->bs, j->b0, j->b1, grad, e);
    else ce_f16(j->out, j->x, j->out2, j->bs, j->b0, j->b1, grad, e);
    free(e);
}

static void run_add(const job_t *j) {
    int64_t i0, i1;
    elem_range(j, &i0, &i1);
    if (j->kind == K_ADD) {
        if (j->pad == 0) add_f32(j->x, j->x2, j->out, i0, i1, j->scale);
        else if (j->pad == 1) add_bf16(j->x, j->x2, j->out, i0, i1, j->scale);
        else add_f16(j->x, j->x2, j->out, i0, i1, j->scale);
    } else {
        if (j->pad == 0) addgrad_f32(j->x, j->out, j->out2, i0, i1, j->scale);
        else if (j->pad == 1) addgrad_bf16(j->x, j->out, j->out2, i0, i1, j->scale);
        else addgrad_f16(j->x, j->out, j->out2, i0, i1, j->scale);
    }
}

static void run_drop(const job_t *j) {
    int64_t i0, i1;
    elem_range(j, &i0, &i1);
    const void *x = j->x;
    void *y = j->out;
    switch (j->pad) {
    case 0: drop_f32_f32(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 1: drop_f32_bf16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 2: drop_f32_f16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 3: drop_bf16_f32(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 4: drop_bf16_bf16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 5: drop_bf16_f16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 6: drop_f16_f32(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 7: drop_f16_bf16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    case 8: drop_f16_f16(x, y, i0, i1, j->seed, j->thr, j->scale); break;
    }
}

static void run_job(job_t *j) {
    switch (j->kind) {
    case K_DQ_F32: nf4_dequant_f32(j->x, j->sc, j->f0, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_DQ_F64: nf4_dequant_f64(j->x, j->sc, j->f0, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_DQ_BF16: nf4_dequant_bf16(j->x, j->sc, j->f0, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_DQ_F16: nf4_dequant_f16(j->x, j->sc, j->f0, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_AM_F32: j->bad = nf4_absmax_f32(j->x, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_AM_BF16: j->bad = nf4_absmax_bf16(j->x, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_AM_F16: j->bad = nf4_absmax_f16(j->x, j->out, j->n, j->bs, j->b0, j->b1); break;
    case K_Q_F32: nf4_quant_f32(j->x, j->f0, j->f1, j->out, j->n, j->bs, j->pad, j->b0, j->b1); break;
    case K_Q_BF16: nf4_quant_bf16(j->x, j->f0, j->f1, j->out, j->n, j->bs, j->pad, j->b0, j->b1); break;
    case K_Q_F16: nf4_quant_f16(j->x, j->f0, j->f1, j->out, j->n, j->bs, j->pad, j->b0, j->b1); break;
    case K_DROP: run_drop(j); break;
    case K_ADD: case K_ADDG: run_add(j); break;
    case K_CE: run_ce(j); break;
    case K_RMS: case K_RMSB: case K_SWI: case K_SWIB: run_rms_swi(j); break;
    case K_ROPE: case K_ROPEB: run_rope(j); break;
    }
}

static void *job_thread(void *p) { run_job((job_t *)p); return NULL; }

#define MAX_THREADS 256
/* Runs `proto` over all blocks; returns the summed `bad` count (absmax jobs), or -1 if a thread could not start
 * (then nothing is partially done: the missing ranges are run on the calling thread). */
static int64_t run_parallel(job_t proto, int64_t n_blocks, int64_t nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n_blocks) nthreads = n_blocks > 0 ? n_blocks : 1;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    const int64_t step = (n_blocks + nthreads - 1) / nthreads;
    for (int64_t t = 0; t < nthreads; ++t) {
        jobs[t] = proto;
        jobs[t].b0 = t * step < n_blocks ? t * step : n_blocks;
        jobs[t].b1 = (t + 1) * step < n_blocks ? (t + 1) * step : n_blocks;
        jobs[t].bad = 0;
        started[t] = 0;
    }
    for (int64_t t = 0; t + 1 < nthreads; ++t)
        started[t] = pthread_create(&tids[t], NULL, job_thread, &jobs[t]) == 0;
    run_job(&jobs[nthreads - 1]);
    int64_t bad = jobs[nthreads - 1].bad;
    for (int64_t t = 0; t + 1 < nthreads; ++t) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_job(&jobs[t]);
        bad += jobs[t].bad;
    }
    return bad;
}

/* Entry points called from Python. `out_kind`: 0 f32, 1 f64, 2 bf16, 3 f16; `in_kind`: 0 f32, 1 bf16, 2 f16. */
void nf4_dequantize(const uint8_t *packed, const scales_t *sc, const float *code, void *out, int64_t n, int64_t bs,
                    int64_t out_kind, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_DQ_F32 + (int)out_kind; j.x = packed; j.sc = sc; j.f0 = code; j.out = out; j.n = n; j.bs = bs;
    run_parallel(j, (n + bs - 1) / bs, nthreads);
}

int64_t nf4_absmax(const void *x, float *absmax, int64_t n, int64_t bs, int64_t in_kind, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_AM_F32 + (int)in_kind; j.x = x; j.out = absmax; j.n = n; j.bs = bs;
    return run_parallel(j, (n + bs - 1) / bs, nthreads);
}

void nf4_quantize(const void *x, const float *inv, const float *mid, uint8_t *packed, int64_t n, int64_t bs,
                  int64_t pad_code, int64_t in_kind, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_Q_F32 + (int)in_kind; j.x = x; j.f0 = inv; j.f1 = mid; j.out = packed; j.n = n; j.bs = bs;
    j.pad = pad_code;
    run_parallel(j, (n + bs - 1) / bs, nthreads);
}

/* y = x * (keep(i) ? scale : 0) for n elements; kinds 0 f32, 1 bf16, 2 f16 (the dropout loops above). */
void seeded_dropout(const void *x, void *y, int64_t n, int64_t in_kind, int64_t out_kind, uint64_t seed, uint32_t thr,
                    float scale, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_DROP; j.x = x; j.out = y; j.n = n; j.bs = 1 << 16; j.pad = in_kind * 3 + out_kind;
    j.seed = seed; j.thr = thr; j.scale = scale;
    run_parallel(j, (n + j.bs - 1) / j.bs, nthreads);
}

/* out (fp32) = y + scale * d; kind 0 f32, 1 bf16, 2 f16 for y and d. */
void lora_sum(const void *y, const void *d, float *out, int64_t n, int64_t kind, float scale, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_ADD; j.x = y; j.x2 = d; j.out = out; j.n = n; j.bs = 1 << 16; j.pad = kind; j.scale = scale;
    run_parallel(j, (n + j.bs - 1) / j.bs, nthreads);
}

/* gy = g, gd = g * scale (g fp32; gy, gd of `kind`). */
void lora_sum_backward(const float *g, void *gy, void *gd, int64_t n, int64_t kind, float scale, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_ADDG; j.x = g; j.out = gy; j.out2 = gd; j.n = n; j.bs = 1 << 16; j.pad = kind; j.scale = scale;
    run_parallel(j, (n + j.bs - 1) / j.bs, nthreads);
}

/* Cross-entropy of n rows of V logits (kind 0 f32, 1 bf16, 2 f16) with targets y: loss[r]; with `grad` the logits
 * become softmax - onehot in place. Returns the number of threads that could not get their row buffer (0 = ok). */
int64_t ce_rows(void *logits, const int64_t *y, float *loss, int64_t n, int64_t V, int64_t kind, int64_t grad,
                int64_t nthreads) {
    job_t j = {0};
    j.kind = K_CE; j.out = logits; j.x = y; j.out2 = loss; j.n = n; j.bs = V; j.pad = kind | (grad ? 16 : 0);
    return run_parallel(j, n, nthreads);
}

/* RMSNorm of `rows` rows of D fp32 values (bs = D: the job's blocks are rows): y and rstd [rows]. */
void rmsnorm_forward(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t D, float eps,
                     int64_t nthreads) {
    job_t j = {0};
    j.kind = K_RMS; j.x = x; j.f0 = w; j.out = y; j.out2 = rstd; j.n = rows * D; j.bs = D; j.scale = eps;
    run_parallel(j, rows, nthreads);
}

void rmsnorm_backward(const float *x, const float *w, const float *rstd, const float *g, float *dx, int64_t rows,
                      int64_t D, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_RMSB; j.x = x; j.f0 = w; j.f1 = rstd; j.x3 = g; j.out = dx; j.n = rows * D; j.bs = D;
    run_parallel(j, rows, nthreads);
}

/* SwiGLU over n elements of kind 0 f32 / 1 bf16 (a, b, y, dy, da, db all of that kind). */
void swiglu_forward(const void *a, const void *b, void *y, int64_t n, int64_t kind, int64_t nthreads) {
    job_t j = {0};
    j.kind = K_SWI; j.x = a; j.x2 = b; j.out = y; j.n = n; j.bs = 1 << 16; j.pad = kind;
    run_parallel(j, (n + j.bs - 1) / j.bs, nthreads);
}

void swiglu_backward(const void *a, const void *b, const void *dy, void *da, void *db, int64_t n, int64_t kind,
                     int64_t nthreads) {
    job_t j = {0};
    j.kind = K_SWIB; j.x = a; j.x2 = b; j.x3 = dy; j.out = da; j.out2 = db; j.n = n; j.bs = 1 << 16; j.pad = kind;
    run_parallel(j, (n + j.bs - 1) / j.bs, nthreads);
}

/* Rotary embedding of x (B, T, H, hd) fp32 into y (B, H, T, hd) of `kind` (0 f32, 1 bf16, 2 f16), and back:
 * `backward` = 0 or 1; then x is dy (B, H, T, hd) of `kind` and y is dx (B, T, H, hd) fp32. */
void rope(const void *x, const float *cs, const float *sn, void *y, int64_t B, int64_t Tn, int64_t H, int64_t hd,
          int64_t kind, int64_t backward, int64_t nthreads) {
    job_t j = {0};
    j.kind = backward ? K_ROPEB : K_ROPE; j.x = x; j.f0 = cs; j.f1 = sn; j.out = y; j.n = B * Tn * H * hd;
    j.bs = hd; j.pad = (Tn << 32) | (H << 4) | kind;
    run_parallel(j, B * Tn, nthreads);
}

/* Ask Linux to back the 2 MiB-aligned interior of a fresh output buffer with transparent huge pages (where THP is in
 * "madvise" or "always" mode): first-touch page faults drop 512-fold, which is most of the cost of writing a freshly
 * allocated 32 MiB tensor. Returns madvise's result, or -1 where not supported; harmless either way. */
int nf4_advise_hugepages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    const uintptr_t e = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (e > a) return madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)nbytes;
#endif
    return -1;
}

/* For tests: the conversions above, elementwise. */
void conv_f32_to_f16(const float *x, uint16_t *y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]); }
void conv_f32_to_bf16(const float *x, uint16_t *y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = f32_to_bf16(x[i]); }
void conv_f16_to_f32(const uint16_t *x, float *y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = f16_to_f32(x[i]); }
int nf4_abi_version(void) { return 9; }
