/* cnnlab's native kernels: the memory-bound parts of a conv block, fused.
 *
 * A conv block is  Conv2d -> [BatchNorm2d] -> [Dropout] -> ReLU -> [MaxPool2d].
 * cnnlab.fastops.conv_block runs it as
 *
 *   cols = im2col(x)                      (this file)
 *   z    = W @ cols                       (torch.mm: the arithmetic, in BLAS)
 *   out  = block_forward(z)               (this file: bias, batch norm, dropout, ReLU, pool)
 *
 * and backward as block_backward (this file), two more torch.mm and col2im (this file).
 * Activations are stored channel-major, "CNHW": [C][B][H][W], so that every per-channel
 * pass (batch statistics, normalisation) reads one contiguous slice that stays in cache.
 *
 * The math is torch's, element for element (tests/test_native.py checks values and
 * gradients against torch's modules); only the order of float additions differs:
 * - batch norm in training: mean and biased variance over (B, H, W) per channel, two passes,
 *   summed in double; running_mean += momentum * (mean - running_mean) and the running
 *   variance likewise with the unbiased variance, as torch does;
 * - dropout: a unit is kept when its uniform 8- or 16-bit draw u < threshold and then
 *   scaled by `scale` (= 1 / (1 - p), as a float32), the mask cnnlab.model.FastDropout
 *   draws. The draws are indexed in NCHW order, so both paths use the same random bytes
 *   for the same unit;
 * - ReLU then max-pool (window = stride = pool, floor mode): computed as pool then ReLU,
 *   which gives the same values and sends the gradient to the same element: the first
 *   maximum of the window in row-major order, torch's choice. NaN counts as a maximum and
 *   passes the ReLU, as in torch.
 *
 * Compiled on first use by cnnlab/native/__init__.py; plain C99, no torch headers.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NO_GRAD 255

/* n uniform random bytes: xoshiro256++ (Blackman and Vigna), four interleaved streams so
 * that the CPU overlaps them, seeded through splitmix64 from one 64-bit seed (which
 * cnnlab.fastops.random_bytes draws from torch's generator, so torch.manual_seed governs it). */
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define STREAMS 4
void cl_random_bytes(uint8_t *out, long n, uint64_t seed)
{
    uint64_t s[4][STREAMS];
    for (int g = 0; g < STREAMS; g++)
        for (int i = 0; i < 4; i++)
            s[i][g] = splitmix64(&seed);
    for (long pos = 0; pos < n;) {
        uint64_t r[STREAMS];
        for (int g = 0; g < STREAMS; g++) {
            r[g] = rotl(s[0][g] + s[3][g], 23) + s[0][g];
            const uint64_t t = s[1][g] << 17;
            s[2][g] ^= s[0][g];
            s[3][g] ^= s[1][g];
            s[1][g] ^= s[2][g];
            s[0][g] ^= s[3][g];
            s[2][g] ^= t;
            s[3][g] = rotl(s[3][g], 45);
        }
        const long m = n - pos < (long)sizeof r ? n - pos : (long)sizeof r;
        memcpy(out + pos, r, m);
        pos += m;
    }
}
 /* arg value: ReLU output was not > 0, no gradient flows */

typedef float v8f __attribute__((vector_size(32))); /* GCC/Clang vector extension: 8 floats */
typedef float v4f __attribute__((vector_size(16)));
typedef int v8i __attribute__((vector_size(32))); /* comparisons of v8f give v8i lanes of -1 or 0 */
typedef int v4i __attribute__((vector_size(16)));

/* bytes (or 16-bit draws) to int lanes and back, for 0..255 values: SSE4.1/AVX2 instructions
 * where the compiler targets them (its __builtin_convertvector became one scalar move per
 * lane here), else a loop per lane */
#if defined(__AVX2__)
#include <immintrin.h>
static inline v8i widen8_u8(const uint8_t *p) { return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline v8i widen8_u16(const uint16_t *p) { return (v8i)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline v4i widen4_u8(const uint8_t *p)
{
    int w;
    memcpy(&w, p, sizeof w);
    return (v4i)_mm_cvtepu8_epi32(_mm_cvtsi32_si128(w));
}
static inline void narrow8_u8(uint8_t *p, v8i v)
{
    const __m256i x = (__m256i)v;
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(w, w));
}
static inline void narrow4_u8(uint8_t *p, v4i v)
{
    const __m128i w = _mm_packus_epi32((__m128i)v, (__m128i)v);
    const int b = _mm_cvtsi128_si32(_mm_packus_epi16(w, w));
    memcpy(p, &b, sizeof b);
}
#else
static inline v8i widen8_u8(const uint8_t *p)
{
    v8i r;
    for (int l = 0; l < 8; l++)
        r[l] = p[l];
    return r;
}
static inline v8i widen8_u16(const uint16_t *p)
{
    v8i r;
    for (int l = 0; l < 8; l++)
        r[l] = p[l];
    return r;
}
static inline v4i widen4_u8(const uint8_t *p)
{
    v4i r;
    for (int l = 0; l < 4; l++)
        r[l] = p[l];
    return r;
}
static inline void narrow8_u8(uint8_t *p, v8i v)
{
    for (int l = 0; l < 8; l++)
        p[l] = (uint8_t)v[l];
}
static inline void narrow4_u8(uint8_t *p, v4i v)
{
    for (int l = 0; l < 4; l++)
        p[l] = (uint8_t)v[l];
}
#endif

static inline v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the first n < 8 lanes of a vector from p (the rest 0), and to p: each n its own memcpy of a
 * constant size, which compiles to a few moves (a memcpy of a variable size became a loop
 * of 4-byte moves, most of a row's time where a row ends in a part of a vector) */
#define PARTIAL8(n, CASE) \
    switch (n) {          \
    case 1: CASE(1);      \
        break;            \
    case 2: CASE(2);      \
        break;            \
    case 3: CASE(3);      \
        break;            \
    case 4: CASE(4);      \
        break;            \
    case 5: CASE(5);      \
        break;            \
    case 6: CASE(6);      \
        break;            \
    default: CASE(7);     \
    }

static inline v8f load_part8(const float *p, int n)
{
    v8f v = {0};
#define LOAD_CASE(m) memcpy(&v, p, sizeof(float) * (m))
    PARTIAL8(n, LOAD_CASE)
#undef LOAD_CASE
    return v;
}

static inline void store_part8(float *p, v8f v, int n)
{
#define STORE_CASE(m) memcpy(p, &v, sizeof(float) * (m))
    PARTIAL8(n, STORE_CASE)
#undef STORE_CASE
}

/* dst[0:n] = src[0:n] for the short rows of a conv (n = 12 or 4 in the lab): 8 and 4 floats at
 * a time, the last chunk overlapping the one before, so that no loop tail is left (a loop
 * spent more on its length tests than on the copy) */
static inline void copy_row(float *dst, const float *src, int n)
{
    if (n >= 8) {
        int j = 0;
        for (; j + 8 <= n; j += 8)
            memcpy(dst + j, src + j, 32);
        if (j < n)
            memcpy(dst + n - 8, src + n - 8, 32);
    } else if (n >= 4) {
        memcpy(dst, src, 16);
        memcpy(dst + n - 4, src + n - 4, 16);
    } else {
        for (int j = 0; j < n; j++)
            dst[j] = src[j];
    }
}

/* dst[0:n] += src[0:n], 8 then 4 floats at a time (adding cannot overlap) */
static inline void add_row(float *dst, const float *src, int n)
{
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        v8f a = load8(dst + j) + load8(src + j);
        memcpy(dst + j, &a, 32);
    }
    if (j + 4 <= n) {
        v4f a, b;
        memcpy(&a, dst + j, 16);
        memcpy(&b, src + j, 16);
        a += b;
        memcpy(dst + j, &a, 16);
        j += 4;
    }
    for (; j < n; j++)
        dst[j] += src[j];
}

/* [j0, j1): the output columns whose input column j*s - p + kw lies inside [0, W) */
static void valid_cols(int Wo, int W, int s, int p, int kw, int *j0, int *j1)
{
    int a = 0, b = Wo;
    while (a < Wo && a * s - p + kw < 0)
        a++;
    while (b > a && (b - 1) * s - p + kw >= W)
        b--;
    *j0 = a;
    *j1 = b;
}

/* x: [C][B][H][W] -> cols: [C*k*k][B*Ho*Wo] (the rows F.unfold gives, per image side by side),
 * for the images [b0, b1) */
static void im2col_range(const float *x, float *cols, int C, int B, int H, int W, int k, int s, int p, int Ho,
                         int Wo, int b0, int b1)
{
    const long N = (long)B * Ho * Wo;
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < k; kh++)
            for (int kw = 0; kw < k; kw++) {
                float *dst = cols + ((long)(c * k + kh) * k + kw) * N + (long)b0 * Ho * Wo;
                int j0, j1;
                valid_cols(Wo, W, s, p, kw, &j0, &j1);
                for (int b = b0; b < b1; b++) {
                    const float *img = x + ((long)c * B + b) * H * W;
                    for (int i = 0; i < Ho; i++, dst += Wo) {
                        int ih = i * s - p + kh;
                        if (ih < 0 || ih >= H) {
                            for (int j = 0; j < Wo; j++)
                                dst[j] = 0.0f;
                            continue;
                        }
                        const float *row = img + (long)ih * W;
                        for (int j = 0; j < j0; j++)
                            dst[j] = 0.0f;
                        if (s == 1) {
                            copy_row(dst + j0, row - p + kw + j0, j1 - j0);
                        } else {
                            for (int j = j0; j < j1; j++)
                                dst[j] = row[j * s - p + kw];
                        }
                        for (int j = j1; j < Wo; j++)
                            dst[j] = 0.0f;
                    }
                }
            }
}

/* The adjoint of cl_im2col: dx[C][B][H][W] = sum of the columns' entries over every place
 * each input element was copied to, for the images [b0, b1) (each image's sums are added in
 * the same order whatever the range). Their part of dx is overwritten. */
static void col2im_range(const float *cols, float *dx, int C, int B, int H, int W, int k, int s, int p, int Ho,
                         int Wo, int b0, int b1)
{
    const long N = (long)B * Ho * Wo;
    for (int c = 0; c < C; c++)
        memset(dx + ((long)c * B + b0) * H * W, 0, sizeof(float) * (long)(b1 - b0) * H * W);
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < k; kh++)
            for (int kw = 0; kw < k; kw++) {
                const float *src = cols + ((long)(c * k + kh) * k + kw) * N + (long)b0 * Ho * Wo;
                int j0, j1;
                valid_cols(Wo, W, s, p, kw, &j0, &j1);
                for (int b = b0; b < b1; b++) {
                    float *img = dx + ((long)c * B + b) * H * W;
                    for (int i = 0; i < Ho; i++, src += Wo) {
                        int ih = i * s - p + kh;
                        if (ih < 0 || ih >= H)
                            continue;
                        float *row = img + (long)ih * W;
                        if (s == 1) {
                            add_row(row - p + kw + j0, src + j0, j1 - j0);
                        } else {
                            for (int j = j0; j < j1; j++)
                                row[j * s - p + kw] += src[j];
                        }
                    }
                }
            }
}


/* im2col_range and col2im_range for stride 1 without padding (the lab's conv2 and conv3): every
 * row of a window lies inside the image, so each column row is whole rows of the image; the
 * row length is a constant where it is one of a few common ones (so that copy_row and add_row
 * become fixed moves), which took a third off these passes. The same values, added in the same
 * order, as the general versions. */
#define WO_DISPATCH(Wo, CALL)                                                                                   \
    do {                                                                                                       \
        switch (Wo) {                                                                                          \
        case 4: CALL(4); break;                                                                                \
        case 8: CALL(8); break;                                                                                \
        case 12: CALL(12); break;                                                                              \
        case 16: CALL(16); break;                                                                              \
        default: CALL(Wo);                                                                                     \
        }                                                                                                      \
    } while (0)

/* to_cols: im2col's copy of the images [b0, b1) of img into cols; else col2im's sum of cols
 * into img (those images' part of img overwritten) */
static inline __attribute__((always_inline)) void cols_s1p0_k(const int to_cols, float *img, float *cols, int C,
                                                              int B, int H, int W, int k, int Ho, const int Wo,
                                                              int b0, int b1)
{
    const long N = (long)B * Ho * Wo;
    for (int c = 0; !to_cols && c < C; c++)
        memset(img + ((long)c * B + b0) * H * W, 0, sizeof(float) * (long)(b1 - b0) * H * W);
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < k; kh++)
            for (int kw = 0; kw < k; kw++) {
                float *col = cols + ((long)(c * k + kh) * k + kw) * N + (long)b0 * Ho * Wo;
                for (int b = b0; b < b1; b++) {
                    float *row = img + ((long)c * B + b) * H * W + (long)kh * W + kw;
                    for (int i = 0; i < Ho; i++, col += Wo, row += W) {
                        if (to_cols)
                            copy_row(col, row, Wo);
                        else
                            add_row(row, col, Wo);
                    }
                }
            }
}

/* im2col (to_cols) or col2im for the images [b0, b1): the general versions, or the ones above */
static void cols_images(int to_cols, float *img, float *cols, int C, int B, int H, int W, int k, int s, int p, int Ho,
                        int Wo, int b0, int b1)
{
    if (s != 1 || p != 0) {
        if (to_cols)
            im2col_range(img, cols, C, B, H, W, k, s, p, Ho, Wo, b0, b1);
        else
            col2im_range(cols, img, C, B, H, W, k, s, p, Ho, Wo, b0, b1);
        return;
    }
#define COLS_CALL(wo)                                                                                           \
    (to_cols ? cols_s1p0_k(1, img, cols, C, B, H, W, k, Ho, wo, b0, b1)                                         \
             : cols_s1p0_k(0, img, cols, C, B, H, W, k, Ho, wo, b0, b1))
    WO_DISPATCH(Wo, COLS_CALL);
#undef COLS_CALL
}

void cl_im2col(const float *x, float *cols, int C, int B, int H, int W, int k, int s, int p, int Ho, int Wo)
{
    cols_images(1, (float *)x, cols, C, B, H, W, k, s, p, Ho, Wo, 0, B);
}

void cl_col2im(const float *cols, float *dx, int C, int B, int H, int W, int k, int s, int p, int Ho, int Wo)
{
    cols_images(0, dx, (float *)cols, C, B, H, W, k, s, p, Ho, Wo, 0, B);
}

/* Sums over a channel: float lanes (they vectorise, and several independent ones hide the
 * adder's latency) over blocks of BLOCK elements, the block totals added in double. */
#define LANES 32
#define BLOCK 4096

static double sum_f(const float *v, long n)
{
    double total = 0.0;
    for (long start = 0; start < n; start += BLOCK) {
        const long end = start + BLOCK < n ? start + BLOCK : n;
        float acc[LANES] = {0.0f};
        long i = start;
        for (; i + LANES <= end; i += LANES)
            for (int l = 0; l < LANES; l++)
                acc[l] += v[i + l];
        for (; i < end; i++)
            acc[0] += v[i];
        for (int l = 0; l < LANES; l++)
            total += acc[l];
    }
    return total;
}

/* sum of (v - mean)^2 */
static double sum_sq_dev(const float *v, long n, float mean)
{
    double total = 0.0;
    for (long start = 0; start < n; start += BLOCK) {
        const long end = start + BLOCK < n ? start + BLOCK : n;
        float acc[LANES] = {0.0f};
        long i = start;
        for (; i + LANES <= end; i += LANES)
            for (int l = 0; l < LANES; l++) {
                float d = v[i + l] - mean;
                acc[l] += d * d;
            }
        for (; i < end; i++) {
            float d = v[i] - mean;
            acc[0] += d * d;
        }
        for (int l = 0; l < LANES; l++)
            total += acc[l];
    }
    return total;
}

/* sum of g and sum of g * z */
static void sum_g_gz(const float *g, const float *z, long n, double *sg, double *sgz)
{
    double t1 = 0.0, t2 = 0.0;
    for (long start = 0; start < n; start += BLOCK) {
        const long end = start + BLOCK < n ? start + BLOCK : n;
        float a1[LANES] = {0.0f}, a2[LANES] = {0.0f};
        long i = start;
        for (; i + LANES <= end; i += LANES)
            for (int l = 0; l < LANES; l++) {
                a1[l] += g[i + l];
                a2[l] += g[i + l] * z[i + l];
            }
        for (; i < end; i++) {
            a1[0] += g[i];
            a2[0] += g[i] * z[i];
        }
        for (int l = 0; l < LANES; l++) {
            t1 += a1[l];
            t2 += a2[l];
        }
    }
    *sg = t1;
    *sgz = t2;
}

/* n values of the forward before the ReLU and the pool. With norm, z is first normalised in
 * place, z = (z - mean) * invstd (what backward needs); then t = (z * g + bt) * dropout
 * factor. The factor is `scale` where the unit's draw u < threshold, else 0; m: the n draws
 * (bits 8 or 16), or NULL for no dropout. Returns 0 when every t is finite (else NaN).
 * In vectors of 8 (the draws compared as ints, selecting by a lane mask) and a scalar tail,
 * each value computed alone by the same operations; affine_dropout_k is compiled once per
 * case with norm, dropout and bits constant. (The compiler's own vectorisation left a scalar
 * tail of up to 63 values that branched on every random draw: 16 of the 144 values of a
 * conv2 plane, and a third of this pass's time.) */
static inline __attribute__((always_inline)) float affine_dropout_k(float *t, float *z, long n, const int norm,
                                                                     float mean, float invstd, float g, float bt,
                                                                     const void *m, const int bits, int threshold,
                                                                     float scale)
{
    const uint8_t *u8 = m;
    const uint16_t *u16 = m;
    v8f chk = {0};
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v = load8(z + i);
        if (norm) {
            v = (v - mean) * invstd;
            memcpy(z + i, &v, sizeof v);
        }
        v = v * g + bt;
        if (m) {
            const v8i u = bits == 8 ? widen8_u8(u8 + i) : widen8_u16(u16 + i);
            const v8f sv = {scale, scale, scale, scale, scale, scale, scale, scale};
            v = v * (v8f)((v8i)sv & (u < threshold));
        }
        memcpy(t + i, &v, sizeof v);
        chk += v - v;
    }
    float tail = 0.0f;
    for (; i < n; i++) {
        float v = z[i];
        if (norm)
            z[i] = v = (v - mean) * invstd;
        v = v * g + bt;
        if (m)
            v *= (int)(bits == 8 ? u8[i] : u16[i]) < threshold ? scale : 0.0f;
        t[i] = v;
        tail += v - v;
    }
    for (int l = 0; l < 8; l++)
        tail += chk[l];
    return tail;
}

static float affine_dropout(float *t, float *z, long n, int norm, float mean, float invstd, float g, float bt,
                            const void *m, int bits, int threshold, float scale)
{
#define AD(NORM, M, BITS) affine_dropout_k(t, z, n, NORM, mean, invstd, g, bt, M, BITS, threshold, scale)
    if (!m)
        return norm ? AD(1, NULL, 8) : AD(0, NULL, 8);
    if (bits == 8)
        return norm ? AD(1, m, 8) : AD(0, m, 8);
    return norm ? AD(1, m, 16) : AD(0, m, 16);
#undef AD
}

/* g *= dropout factor, for n values with draws m */
static void mask_grad(float *g, long n, const void *m, int bits, int threshold, float scale)
{
    if (bits == 8) {
        const uint8_t *u = m;
#pragma omp simd
        for (long i = 0; i < n; i++)
            g[i] *= (int)u[i] < threshold ? scale : 0.0f;
    } else {
        const uint16_t *u = m;
#pragma omp simd
        for (long i = 0; i < n; i++)
            g[i] *= (int)u[i] < threshold ? scale : 0.0f;
    }
}

/* 2x2 max-pool then ReLU, and its gradient, a vector of n = 8 or 4 windows at a time (GCC/Clang
 * vector extensions: comparisons give lanes of -1 or 0, which select by bit masks). A row of
 * Wp >= n windows takes vectors at j = 0, n, ..., the last one at Wp - n, overlapping the one
 * before: each window's result is computed alone, so a window computed twice is written twice
 * with the same value, and no scalar loop tail is left (rows of 14 and 6 windows in the lab,
 * where a scalar tail took most of the time). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAS_SHUFFLEVECTOR 1
#endif
#endif
#define UNPAREN(...) __VA_ARGS__
#ifdef HAS_SHUFFLEVECTOR
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
#ifdef HAS_SHUFFLEVECTOR
#define SHUF4(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF4(a, b, ...) __builtin_shuffle(a, b, (v4i){__VA_ARGS__})
#endif

/* POOL2_KERNELS(n, vf, vi, SHUF, even, odd, lo, hi) defines pool2_fwd_<n> and
 * pool2_bwd_<n>: even/odd pick the even and odd lanes of two vectors, lo/hi interleave two
 * vectors' first and second halves. */
#define POOL2_KERNELS(n, vf, vi, SHUF, EVEN, ODD, LO, HI)                                                        \
    static inline vf sel_##n(vi m, vf x, vf y) { return (vf)(((vi)x & m) | ((vi)y & ~m)); }                   \
    /* windows [j, j + n) of the row pair r0, r1: outputs to o, winners' places to g (or NULL) */             \
    static inline void pool2_fwd_##n(const float *r0, const float *r1, int j, float *o, uint8_t *g)           \
    {                                                                                                          \
        vf p0, p1, q0, q1;                                                                                     \
        memcpy(&p0, r0 + 2 * j, sizeof p0);                                                                    \
        memcpy(&p1, r0 + 2 * j + n, sizeof p1);                                                                \
        memcpy(&q0, r1 + 2 * j, sizeof q0);                                                                    \
        memcpy(&q1, r1 + 2 * j + n, sizeof q1);                                                                \
        const vf a = SHUF(p0, p1, UNPAREN EVEN), b = SHUF(p0, p1, UNPAREN ODD), c = SHUF(q0, q1, UNPAREN EVEN), d = SHUF(q0, q1, UNPAREN ODD); \
        const vi i0 = b > a, i1 = d > c; /* -1 where the right one wins */                                     \
        const vf m0 = sel_##n(i0, b, a), m1 = sel_##n(i1, d, c);                                               \
        const vi lower = m1 > m0;                                                                              \
        const vf best = sel_##n(lower, m1, m0), zero = {0};                                                    \
        const vi pos = best > zero;                                                                            \
        const vf out = (vf)((vi)best & pos);                                                                   \
        memcpy(o + j, &out, sizeof out);                                                                       \
        if (g) {                                                                                               \
            const vi place = (lower & (2 - i1)) | (~lower & -i0);                                              \
            narrow##n##_u8(g + j, (place & pos) | (NO_GRAD & ~pos));                                           \
        }                                                                                                      \
    }                                                                                                          \
    /* the gradient of windows [j, j + n): go's values at their winners' places in r0, r1, else 0 */        \
    static inline void pool2_bwd_##n(const float *go, const uint8_t *ap, int j, float *r0, float *r1)        \
    {                                                                                                          \
        vf gv;                                                                                                 \
        memcpy(&gv, go + j, sizeof gv);                                                                        \
        const vi a = widen##n##_u8(ap + j);                                                                    \
        const vf zero = {0};                                                                                   \
        const vf w0 = sel_##n(a == 0, gv, zero), w1 = sel_##n(a == 1, gv, zero);                               \
        const vf w2 = sel_##n(a == 2, gv, zero), w3 = sel_##n(a == 3, gv, zero);                               \
        const vf s0 = SHUF(w0, w1, UNPAREN LO), s1 = SHUF(w0, w1, UNPAREN HI), t0 = SHUF(w2, w3, UNPAREN LO), t1 = SHUF(w2, w3, UNPAREN HI);   \
        memcpy(r0 + 2 * j, &s0, sizeof s0);                                                                    \
        memcpy(r0 + 2 * j + n, &s1, sizeof s1);                                                                \
        memcpy(r1 + 2 * j, &t0, sizeof t0);                                                                    \
        memcpy(r1 + 2 * j + n, &t1, sizeof t1);                                                                \
    }

POOL2_KERNELS(8, v8f, v8i, SHUF8, (0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15),
              (0, 8, 1, 9, 2, 10, 3, 11), (4, 12, 5, 13, 6, 14, 7, 15))
POOL2_KERNELS(4, v4f, v4i, SHUF4, (0, 2, 4, 6), (1, 3, 5, 7), (0, 4, 1, 5), (2, 6, 3, 7))

/* one window, scalar: for rows of fewer than 4 windows */
static inline void pool2_fwd_1(const float *r0, const float *r1, int j, float *o, uint8_t *g)
{
    const float a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    const float m0 = b > a ? b : a, m1 = d > c ? d : c, best = m1 > m0 ? m1 : m0;
    o[j] = best > 0.0f ? best : 0.0f;
    if (g)
        g[j] = best > 0.0f ? (m1 > m0 ? 2 + (d > c) : (b > a)) : NO_GRAD;
}

static inline void pool2_bwd_1(const float *go, const uint8_t *ap, int j, float *r0, float *r1)
{
    const int a = ap[j];
    r0[2 * j] = a == 0 ? go[j] : 0.0f;
    r0[2 * j + 1] = a == 1 ? go[j] : 0.0f;
    r1[2 * j] = a == 2 ? go[j] : 0.0f;
    r1[2 * j + 1] = a == 3 ? go[j] : 0.0f;
}

/* CALL(n, j) for the windows of a row of Wp: vectors of n = 8 from j = 0, the last at Wp - 8
 * (overlapping), or of 4 for 4-7 windows, or one window at a time below that */
#define POOL2_ROW(Wp, CALL)                                                                                     \
    do {                                                                                                       \
        if ((Wp) >= 8) {                                                                                       \
            for (int j_ = 0; j_ + 8 < (Wp); j_ += 8)                                                           \
                CALL(8, j_);                                                                                   \
            CALL(8, (Wp) - 8);                                                                                 \
        } else if ((Wp) >= 4) {                                                                                \
            CALL(4, 0);                                                                                        \
            CALL(4, (Wp) - 4);                                                                                 \
        } else {                                                                                               \
            for (int j_ = 0; j_ < (Wp); j_++)                                                                  \
                CALL(1, j_);                                                                                   \
        }                                                                                                      \
    } while (0)

/* The gradient of pool2_relu for one plane: each window gets its output's gradient at the
 * winning element and 0 elsewhere (go, ap: the pooled plane's gradient and arg). Rows and
 * columns past the last window must be zero already. */
static void pool2_backward(const float *go, const uint8_t *ap, float *gp, int Wo, int Hp, int Wp)
{
    for (int ip = 0; ip < Hp; ip++) {
        float *r0 = gp + (long)2 * ip * Wo, *r1 = r0 + Wo;
        const float *gi = go + (long)ip * Wp;
        const uint8_t *a = ap + (long)ip * Wp;
#define BWD(n, j) pool2_bwd_##n(gi, a, j, r0, r1)
        POOL2_ROW(Wp, BWD);
#undef BWD
    }
}

/* 2x2 max-pool, then ReLU, of one finite plane (row length Wo) into out (Hp x Wp), and each
 * window's winner into arg (or NULL): ties go to the first element in row-major order, as in
 * torch */
static void pool2_relu(const float *v, int Wo, int Hp, int Wp, float *out, uint8_t *arg)
{
    for (int ip = 0; ip < Hp; ip++) {
        const float *r0 = v + (long)2 * ip * Wo, *r1 = r0 + Wo;
        float *o = out + (long)ip * Wp;
        uint8_t *g = arg ? arg + (long)ip * Wp : NULL;
#define FWD(n, j) pool2_fwd_##n(r0, r1, j, o, g)
        POOL2_ROW(Wp, FWD);
#undef FWD
    }
}

/* Everything of a conv block after the convolution's matrix product, forward.
 *
 * z        [O][N], N = B*Ho*Wo: W @ cols. Overwritten with z + bias, or with the normalised
 *          zhat = (z + bias - mean) * invstd when there is a batch norm (what backward needs).
 *          (The bias then only shifts the mean, and is folded into it.)
 * bias     [O] or NULL.
 * gamma, beta, run_mean, run_var: [O], or all NULL when there is no batch norm.
 * batch_stats  1: normalise with the batch's statistics and update the running ones
 *          (training); 0: with the running ones (evaluation).
 * invstd_out [O]: 1 / sqrt(var + eps) as used (batch norm only); backward needs it.
 * mask     NULL for no dropout, else the B*O*Ho*Wo draws of mask_bits (8 or 16) bits, in
 *          channel-major order [O][B][Ho][Wo] like z (the caller reorders FastDropout's NCHW
 *          draws, so each unit keeps its own draw).
 * pool     window = stride of the max-pool, 0 for none; the output is [O][B][Hp][Wp], or
 *          [O][N] without a pool.
 * arg      NULL, or one byte per output: the winning element's place in its window (0 without
 *          a pool), or NO_GRAD where the ReLU's output is <= 0 (a NaN gets its gradient, as in
 *          torch). Backward needs it. So pool * pool must be below NO_GRAD (the caller checks).
 * tmp      scratch of Ho*Wo floats.
 */
static void block_forward_ch(float *z, int O, int B, int Ho, int Wo, const float *bias, const float *gamma,
                             const float *beta, float *run_mean, float *run_var, int batch_stats, double momentum,
                             double eps, float *invstd_out, const uint8_t *mask, int mask_bits, int threshold,
                             float scale, int pool, float *out, uint8_t *arg, float *tmp, int o0, int o1);

void cl_block_forward(float *z, int O, int B, int Ho, int Wo, const float *bias, const float *gamma,
                      const float *beta, float *run_mean, float *run_var, int batch_stats, double momentum,
                      double eps, float *invstd_out, const uint8_t *mask, int mask_bits,
                      int threshold, float scale, int pool, float *out, uint8_t *arg, float *tmp)
{
    block_forward_ch(z, O, B, Ho, Wo, bias, gamma, beta, run_mean, run_var, batch_stats, momentum, eps, invstd_out,
                     mask, mask_bits, threshold, scale, pool, out, arg, tmp, 0, O);
}

/* A batch norm's normalisation of one channel, zhat = (z - mf) * isf, where z is the product
 * before the bias bo. With batch_stats: from the batch's mean of z (mean_z) and sum of squared
 * deviations from it (ss), over n values, and the running statistics are updated when
 * `update`; else from the running statistics. */
static void bn_norm(int batch_stats, double mean_z, double ss, long n, float bo, float *run_mean, float *run_var,
                    int update, double momentum, double eps, float *mf, float *isf)
{
    double invstd;
    if (batch_stats) {
        const double mean = mean_z + bo, var = ss / n;
        invstd = 1.0 / sqrt(var + eps);
        if (update) {
            *run_mean = (float)((1.0 - momentum) * *run_mean + momentum * mean);
            *run_var = (float)((1.0 - momentum) * *run_var + momentum * (n > 1 ? ss / (n - 1) : var));
        }
    } else {
        mean_z = *run_mean - bo;
        invstd = 1.0 / sqrt((double)*run_var + eps);
    }
    *mf = (float)mean_z;
    *isf = (float)invstd;
}

/* The rest of a block's forward for one channel and the images [b0, b1), its normalisation
 * known: zc (the channel's z, [B][Ho][Wo]) normalised in place, (zc - mf) * isf, with norm, or
 * plus the bias bo with add_bias; then gamma * zhat + beta (g, bt), the dropout factor (mc:
 * the channel's draws, or NULL), ReLU and the pool, into oc and ac (the channel's out and arg;
 * ac may be NULL). tmp: Ho*Wo floats. Each value is computed alone, so any split of the
 * images gives the same numbers. */
static void channel_forward(float *zc, int B, int Ho, int Wo, int norm, float mf, float isf, float g, float bt,
                            int add_bias, float bo, const uint8_t *mc, int mask_bits, int threshold, float scale,
                            int pool, float *oc, uint8_t *ac, float *tmp, int b0, int b1)
{
    (void)B;
    const int HW = Ho * Wo;
    const int Hp = pool ? Ho / pool : Ho, Wp = pool ? Wo / pool : Wo;
    const long i0 = (long)b0 * HW, i1 = (long)b1 * HW;
    if (add_bias) {
#pragma omp simd
        for (long i = i0; i < i1; i++)
            zc[i] += bo;
    }
    if (!pool) { /* the whole range at once: gamma * zhat + beta (or z + bias), dropout, ReLU */
        affine_dropout(oc + i0, zc + i0, i1 - i0, norm, mf, isf, g, bt, mc ? mc + i0 * (mask_bits / 8) : NULL,
                       mask_bits, threshold, scale);
        if (ac)
            for (long i = i0; i < i1; i++)
                ac[i] = !(oc[i] <= 0.0f) ? 0 : NO_GRAD; /* NaN passes, as in torch */
#pragma omp simd
        for (long i = i0; i < i1; i++)
            oc[i] = oc[i] < 0.0f ? 0.0f : oc[i]; /* NaN passes, as in torch */
        return;
    }
    for (int b = b0; b < b1; b++) {
        float *zp = zc + (long)b * HW;
        /* gamma * zhat + beta (or z + bias), times the dropout factor: into tmp */
        const int finite = affine_dropout(tmp, zp, HW, norm, mf, isf, g, bt,
                                          mc ? mc + (long)b * HW * (mask_bits / 8) : NULL, mask_bits, threshold,
                                          scale) == 0.0f;
        float *op = oc + (long)b * Hp * Wp;
        uint8_t *ap = ac ? ac + (long)b * Hp * Wp : NULL;
        if (pool == 2 && finite) {
            pool2_relu(tmp, Wo, Hp, Wp, op, ap);
            continue;
        }
        for (int ip = 0; ip < Hp; ip++)
            for (int jp = 0; jp < Wp; jp++) {
                const float *w0 = tmp + (long)ip * pool * Wo + jp * pool;
                float best = w0[0];
                int where = 0;
                for (int r = 0; r < pool; r++)
                    for (int q = 0; q < pool; q++) {
                        float v = w0[r * Wo + q];
                        if (v > best || (isnan(v) && !isnan(best))) {
                            best = v;
                            where = r * pool + q;
                        }
                    }
                op[ip * Wp + jp] = best < 0.0f ? 0.0f : best;
                if (ap)
                    ap[ip * Wp + jp] = !(best <= 0.0f) ? (uint8_t)where : NO_GRAD;
            }
    }
}

/* cl_block_forward for the channels [o0, o1): each channel's numbers are computed alone, in the
 * same order whatever the range (so splitting the channels between threads changes no bit) */
static void block_forward_ch(float *z, int O, int B, int Ho, int Wo, const float *bias, const float *gamma,
                             const float *beta, float *run_mean, float *run_var, int batch_stats, double momentum,
                             double eps, float *invstd_out, const uint8_t *mask, int mask_bits, int threshold,
                             float scale, int pool, float *out, uint8_t *arg, float *tmp, int o0, int o1)
{
    (void)O;
    const long N = (long)B * Ho * Wo, outn = (long)B * (pool ? (Ho / pool) * (Wo / pool) : Ho * Wo);
    for (int o = o0; o < o1; o++) {
        float *zc = z + o * N;
        float g = 1.0f, bt = 0.0f, mf = 0.0f, isf = 1.0f; /* normalisation (with batch norm) and affine */
        const float bo = bias ? bias[o] : 0.0f;
        if (gamma) { /* statistics of z + bias; the bias shifts the mean only */
            double mean_z = 0.0, ss = 0.0;
            if (batch_stats) {
                mean_z = sum_f(zc, N) / N;
                ss = sum_sq_dev(zc, N, (float)mean_z);
            }
            bn_norm(batch_stats, mean_z, ss, N, bo, run_mean + o, run_var + o, 1, momentum, eps, &mf, &isf);
            if (invstd_out)
                invstd_out[o] = isf;
            g = gamma[o];
            bt = beta[o];
        }
        channel_forward(zc, B, Ho, Wo, gamma != NULL, mf, isf, g, bt, bias && !gamma, bo,
                        mask ? mask + (long)o * N * (mask_bits / 8) : NULL, mask_bits, threshold, scale, pool,
                        out + o * outn, arg ? arg + o * outn : NULL, tmp, 0, B);
    }
}

/* Everything of a conv block after the convolution, backward: from the gradient of the
 * block's output to the gradient of z (the matrix product's output), plus the gradients of
 * gamma, beta and the conv bias.
 *
 * gout     gradient of the output, laid out as cl_block_forward's out.
 * arg      cl_block_forward's arg.
 * zhat     cl_block_forward's z on return (normalised when there is a batch norm).
 * gz       [O][N], written.
 * mask     cl_block_forward's mask (channel-major).
 * gamma, invstd: [O], NULL without batch norm. The batch norm must have used batch
 *          statistics (training); backward through running statistics is torch's business.
 * dgamma, dbeta, dbias: [O] or NULL, written.
 */
static void block_backward_ch(const float *gout, const uint8_t *arg, const float *zhat, float *gz, int B, int Ho,
                              int Wo, const uint8_t *mask, int mask_bits, int threshold, float scale, int pool,
                              const float *gamma, const float *invstd, float *dgamma, float *dbeta, float *dbias,
                              int o0, int o1);

void cl_block_backward(const float *gout, const uint8_t *arg, const float *zhat, float *gz, int O, int B, int Ho,
                       int Wo, const uint8_t *mask, int mask_bits, int threshold, float scale, int pool,
                       const float *gamma, const float *invstd, float *dgamma, float *dbeta, float *dbias)
{
    block_backward_ch(gout, arg, zhat, gz, B, Ho, Wo, mask, mask_bits, threshold, scale, pool, gamma, invstd, dgamma,
                      dbeta, dbias, 0, O);
}

/* The gradient of one channel's z before its batch norm's backward, for the images [b0, b1):
 * gc (the channel's [B][Ho][Wo]) from go and ac (the channel's output gradient and arg),
 * through the pool, the ReLU and the dropout (mc: the channel's draws, or NULL). Each value
 * alone. */
static void channel_backward(const float *go, const uint8_t *ac, float *gc, int Ho, int Wo, const uint8_t *mc,
                             int mask_bits, int threshold, float scale, int pool, int b0, int b1)
{
    const int HW = Ho * Wo;
    const int Hp = pool ? Ho / pool : Ho, Wp = pool ? Wo / pool : Wo;
    const long i0 = (long)b0 * HW, i1 = (long)b1 * HW;
    if (!pool) {
#pragma omp simd
        for (long i = i0; i < i1; i++)
            gc[i] = ac[i] == NO_GRAD ? 0.0f : go[i];
    }
    for (int b = b0; pool && b < b1; b++) {
        float *gp = gc + (long)b * HW;
        const float *gi = go + (long)b * Hp * Wp;
        const uint8_t *ap = ac + (long)b * Hp * Wp;
        if (pool == 2) {
            if (Ho % 2 || Wo % 2)
                memset(gp, 0, sizeof(float) * HW);
            pool2_backward(gi, ap, gp, Wo, Hp, Wp);
        } else {
            memset(gp, 0, sizeof(float) * HW);
            for (int ip = 0; ip < Hp; ip++)
                for (int jp = 0; jp < Wp; jp++) {
                    int a = ap[ip * Wp + jp];
                    if (a != NO_GRAD)
                        gp[(ip * pool + a / pool) * Wo + jp * pool + a % pool] = gi[ip * Wp + jp];
                }
        }
    }
    if (mc)
        mask_grad(gc + i0, i1 - i0, mc + i0 * (mask_bits / 8), mask_bits, threshold, scale);
}

/* A batch norm's backward for the values [i0, i1) of a channel, from the sums over the batch
 * of g (sg) and of g * zhat (sgz), over n values: g = gamma * invstd * (g - sg/n - zhat * sgz/n) */
static void bn_backward(float *gc, const float *zc, long i0, long i1, float gamma, float invstd, double sg,
                        double sgz, long n)
{
    const float c = gamma * invstd, mg = (float)(sg / n), mgz = (float)(sgz / n);
#pragma omp simd
    for (long i = i0; i < i1; i++)
        gc[i] = c * (gc[i] - mg - zc[i] * mgz);
}

/* cl_block_backward for the channels [o0, o1) (each channel alone, as block_forward_ch) */
static void block_backward_ch(const float *gout, const uint8_t *arg, const float *zhat, float *gz, int B, int Ho,
                              int Wo, const uint8_t *mask, int mask_bits, int threshold, float scale, int pool,
                              const float *gamma, const float *invstd, float *dgamma, float *dbeta, float *dbias,
                              int o0, int o1)
{
    const long N = (long)B * Ho * Wo, outn = (long)B * (pool ? (Ho / pool) * (Wo / pool) : Ho * Wo);
    for (int o = o0; o < o1; o++) {
        float *gc = gz + o * N;
        channel_backward(gout + o * outn, arg + o * outn, gc, Ho, Wo,
                         mask ? mask + (long)o * N * (mask_bits / 8) : NULL, mask_bits, threshold, scale, pool, 0, B);
        if (gamma) {
            const float *zc = zhat + o * N;
            double sg, sgz;
            sum_g_gz(gc, zc, N, &sg, &sgz);
            if (dbeta)
                dbeta[o] = (float)sg;
            if (dgamma)
                dgamma[o] = (float)sgz;
            bn_backward(gc, zc, 0, N, gamma[o], invstd[o], sg, sgz, N);
        }
        if (dbias)
            dbias[o] = (float)sum_f(gc, N);
    }
}

/* The first conv block's convolution when its input has one channel and stride 1 (the
 * lab's 28x28 images): computed directly from each zero-padded image, 8 outputs of a row
 * at a time for every output channel, instead of an im2col matrix k*k times the image's
 * size and a matrix product of only k*k terms per output.
 *
 * The padded plane has XS = ceil(Wo / 8) * 8 + k - 1 columns, zero beyond the image, so the
 * last vector of a row reads only zeros past the row's end (its lanes past Wo are dropped
 * on store, or multiplied by a zero gradient). */
#define MAX_TAPS 64

static int padded_cols(int Wo, int k) { return (Wo + 7) / 8 * 8 + k - 1; }

/* xp: (H + 2p) rows of padded_cols(Wo, k) floats */
static void pad_plane(const float *x, float *xp, int H, int W, int p, int xs)
{
    memset(xp, 0, sizeof(float) * (H + 2 * p) * xs);
    for (int i = 0; i < H; i++)
        memcpy(xp + (long)(i + p) * xs + p, x + (long)i * W, sizeof(float) * W);
}

static inline __attribute__((always_inline)) void conv1_forward_k(const float *x, const float *w, float *z, int B,
                                                                   int H, int W, const int k, int p, int Ho, int Wo,
                                                                   int O, float *xp, int b0, int b1)
{
    const int xs = padded_cols(Wo, k), T = k * k;
    v8f src[MAX_TAPS];
    for (int b = b0; b < b1; b++) {
        pad_plane(x + (long)b * H * W, xp, H, W, p, xs);
        for (int i = 0; i < Ho; i++)
            for (int j = 0; j < Wo; j += 8) {
                for (int t = 0; t < T; t++)
                    src[t] = load8(xp + (long)(i + t / k) * xs + j + t % k);
                const int n = Wo - j < 8 ? Wo - j : 8;
                for (int o = 0; o < O; o++) {
                    const float *wo = w + (long)o * T;
                    v8f acc = src[0] * wo[0];
                    for (int t = 1; t < T; t++)
                        acc += src[t] * wo[t];
                    float *dst = z + (((long)o * B + b) * Ho + i) * Wo + j;
                    if (n == 8)
                        memcpy(dst, &acc, sizeof acc);
                    else
                        store_part8(dst, acc, n);
                }
            }
    }
}

/* (k = 3 compiled on its own, with the taps unrolled); the images [b0, b1) */
static void conv1_forward(const float *x, const float *w, float *z, int B, int H, int W, int k, int p, int Ho,
                          int Wo, int O, float *xp, int b0, int b1)
{
    if (k == 3)
        conv1_forward_k(x, w, z, B, H, W, 3, p, Ho, Wo, O, xp, b0, b1);
    else
        conv1_forward_k(x, w, z, B, H, W, k, p, Ho, Wo, O, xp, b0, b1);
}

/* its weight gradient's sums over the images [b0, b1): total[o][t] = sum over b, i, j of
 * gz[o][b][i][j] * xp_b[i + di][j + dj], for every output channel o, in registers of 8 float
 * lanes per image and channel, then added up in double, image after image (total is
 * overwritten). dw = (float)total, or the threads' totals added in thread order. */
static inline __attribute__((always_inline)) void conv1_weight_grad_k(const float *x, const float *gz, int O, int B,
                                                                       int H, int W, const int k, int p, int Ho,
                                                                       int Wo, float *xp, double *total, int b0,
                                                                       int b1)
{
    const int xs = padded_cols(Wo, k), T = k * k;
    for (int t = 0; t < O * T; t++)
        total[t] = 0.0;
    for (int b = b0; b < b1; b++) {
        pad_plane(x + (long)b * H * W, xp, H, W, p, xs);
        for (int o = 0; o < O; o++) {
            v8f acc[MAX_TAPS];
            for (int t = 0; t < T; t++)
                acc[t] = (v8f){0};
            const float *go = gz + ((long)o * B + b) * Ho * Wo;
            for (int i = 0; i < Ho; i++)
                for (int j = 0; j < Wo; j += 8) {
                    const v8f g = Wo - j >= 8 ? load8(go + (long)i * Wo + j) : load_part8(go + (long)i * Wo + j, Wo - j);
                    for (int t = 0; t < T; t++)
                        acc[t] += g * load8(xp + (long)(i + t / k) * xs + j + t % k);
                }
            for (int t = 0; t < T; t++) {
                double sum = 0.0;
                for (int l = 0; l < 8; l++)
                    sum += acc[t][l];
                total[(long)o * T + t] += sum;
            }
        }
    }
}

static void conv1_weight_grad(const float *x, const float *gz, int O, int B, int H, int W, int k, int p, int Ho,
                              int Wo, float *xp, double *total, int b0, int b1)
{
    if (k == 3)
        conv1_weight_grad_k(x, gz, O, B, H, W, 3, p, Ho, Wo, xp, total, b0, b1);
    else
        conv1_weight_grad_k(x, gz, O, B, H, W, k, p, Ho, Wo, xp, total, b0, b1);
}

/* ------------------------------------------------------------------ the whole training step
 *
 * cl_train_step runs what cnnlab.fastops.train_step runs, in one call: every hidden block
 * forward (im2col, matrix product, cl_block_forward), the output layer, the mean
 * cross-entropy, and every gradient back to the first block. The fc and output-layer products
 * go to the BLAS that torch itself uses (its sgemm_, whose address Python passes in); the
 * conv products to gemm_small_k and gemm_dot where they are built (else to that BLAS too).
 * What the one call saves is the Python and the dispatch around ~100 small calls per step,
 * about a quarter of a step at the lab's sizes.
 *
 * Threads (OpenMP, when the library was built with it; `nt` per call, 1 = no threads): one
 * parallel region per call, with a barrier wherever a pass reads what other threads wrote.
 * - Conv blocks are split by image: each thread takes the same images (share(B)) through
 *   every conv block, forward and backward (im2col, the product, batch norm, dropout, ReLU,
 *   pool, their gradients, col2im), so that each core keeps its own images' activations in
 *   its own caches; threads exchange only sums. The batch statistics and their gradients'
 *   sums, the bias gradient and the weight gradient are each thread's sums over its images,
 *   added in thread order after a barrier: a fixed order, so a given thread count gives the
 *   same numbers run after run. With one thread they are the plain sums, so one thread
 *   computes exactly what it always has; with more, the sums are split, and the numbers differ
 *   from one thread's by rounding (tests/test_native_threads.py checks both).
 * - Fc blocks (a few hundred values per image) are split by rows or columns of each product
 *   (every element the same dot product as in one call) and by channel for the rest.
 * - BLAS runs one thread inside each worker (cl_set_blas_threads); Adam is split by
 *   elements; the dropout bytes are drawn by thread 0 in one fixed order; the output layer,
 *   the loss and the predictions (a few thousand flops) are one thread's.
 */

typedef void (*cl_sgemm_fn)(const char *ta, const char *tb, const int *m, const int *n, const int *k,
                            const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                            const float *beta, float *c, const int *ldc);

/* Row-major C[M][N] = op(A) op(B) (+ C when acc), with leading dimensions. op(A) is [M][K]: A
 * is stored [M][lda], or [K][lda] when ta. op(B) is [K][N]: B is stored [K][ldb], or [N][ldb]
 * when tb. Column-major BLAS sees the transposes, so it computes C^T = op(B)^T op(A)^T. */
static void gemm_ld(cl_sgemm_fn f, int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B,
                    int ldb, int acc, float *C, int ldc)
{
    const float one = 1.0f, beta = acc ? 1.0f : 0.0f;
    f(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

static void gemm(cl_sgemm_fn f, int ta, int tb, int M, int N, int K, const float *A, const float *B, int acc,
                 float *C)
{
    gemm_ld(f, ta, tb, M, N, K, A, ta ? M : K, B, tb ? K : N, acc, C, N);
}

/* 0 when f multiplies correctly in all four transpose cases (checked once, before use) */
int cl_sgemm_check(cl_sgemm_fn f)
{
    enum { M = 3, N = 4, K = 5 };
    float a[M * K], b[K * N], c[M * N];
    for (int i = 0; i < M * K; i++)
        a[i] = (float)(i % 7) - 2.0f;
    for (int i = 0; i < K * N; i++)
        b[i] = (float)(i % 5) * 0.5f - 1.0f;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            for (int i = 0; i < M * N; i++)
                c[i] = NAN;
            gemm(f, ta, tb, M, N, K, a, b, 0, c);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) {
                    float want = 0.0f;
                    for (int l = 0; l < K; l++)
                        want += (ta ? a[l * M + i] : a[i * K + l]) * (tb ? b[j * K + l] : b[l * N + j]);
                    if (!(fabsf(c[i * N + j] - want) <= 1e-4f))
                        return 1 + ta * 2 + tb;
                }
        }
    return 0;
}

/* ---- threads */

/* MKL_Set_Num_Threads_Local (or NULL): set to 1 in each thread of a step (the one thread of a
 * one-thread step too), and put back after, so that BLAS never starts threads of its own
 * inside the team's, and every product is computed the same way whatever the thread count */
typedef int (*cl_blas_threads_fn)(int);
static cl_blas_threads_fn blas_threads_local = NULL;

void cl_set_blas_threads(cl_blas_threads_fn f) { blas_threads_local = f; }

/* whether the library was built with OpenMP (else every call runs one thread) */
int cl_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* a thread's place in the team of a parallel call */
typedef struct {
    int t, nt;
} team;

static void team_enter(team *tm, int nt, int *blas_prev)
{
    (void)nt; /* the team is what OpenMP gave (num_threads(nt)) */
#ifdef _OPENMP
    tm->t = omp_get_thread_num();
    tm->nt = omp_get_num_threads();
#else
    tm->t = 0;
    tm->nt = 1;
#endif
    *blas_prev = -1;
    if (blas_threads_local)
        *blas_prev = blas_threads_local(1);
}

static void team_leave(const team *tm, int blas_prev)
{
    (void)tm;
    if (blas_threads_local && blas_prev >= 0)
        blas_threads_local(blas_prev);
}

/* this thread's share [a, b) of n items: contiguous, by thread index, fixed for a thread count */
static inline void share(int n, const team *tm, int *a, int *b)
{
    *a = (int)((long)n * tm->t / tm->nt);
    *b = (int)((long)n * (tm->t + 1) / tm->nt);
}

static inline void team_sync(const team *tm)
{
#ifdef _OPENMP
    if (tm->nt > 1) {
#pragma omp barrier
    }
#else
    (void)tm;
#endif
}

/* C = op(A) op(B) by the team: each thread computes a block of C's rows (when M > N) or
 * columns, every element with the full K; no barrier */
static void gemm_team(const team *tm, cl_sgemm_fn f, int ta, int tb, int M, int N, int K, const float *A,
                      const float *B, float *C)
{
    if (tm->nt == 1) {
        gemm(f, ta, tb, M, N, K, A, B, 0, C);
        return;
    }
    const int lda = ta ? M : K, ldb = tb ? K : N;
    int a, b;
    if (N >= M) {
        share(N, tm, &a, &b);
        if (b > a)
            gemm_ld(f, ta, tb, M, b - a, K, A, lda, tb ? B + (long)a * ldb : B + a, ldb, 0, C + a, N);
    } else {
        share(M, tm, &a, &b);
        if (b > a)
            gemm_ld(f, ta, tb, b - a, N, K, ta ? A + a : A + (long)a * lda, lda, B, ldb, 0, C + (long)a * N, N);
    }
}

/* ---- the conv products, in C
 *
 * A conv's forward (z = W cols: M = output channels, K = C*k*k) and its input columns' gradient
 * (dcols = W^T gz: M = C*k*k, K = output channels) have a short K (54-108 and 12-24 in the
 * lab) and thousands of columns. For these, MKL computed each element as one chain of fused
 * multiply-adds over k from 0, in order, and so does gemm_small_k: its results equal MKL's
 * bit for bit here (the lab's state hashes are unchanged), at 2-2.7x its speed (MKL spent much
 * of these products packing and zeroing; with K this short there is nothing to gain from
 * packing). A register tile of SK_MR rows x 2 vectors of columns: each step of k loads two
 * vectors of B and broadcasts SK_MR elements of A.
 *
 * The weight gradient (dW = gz cols^T: K = the images' columns, thousands) can be gemm_dot:
 * dot products along K in vector lanes, the lanes then added, ~3x MKL's speed here. Its sums
 * are ordered differently from MKL's, so it rounds differently (the same math), and a run's
 * numbers would change: it is off unless the user asks for it (cl_set_dot_wgrad, from
 * CNNLAB_NATIVE_DOT_WGRAD=1), and the kernels string then says so.
 *
 * Built where the compiler targets FMA (AVX2 + FMA, or AVX-512); elsewhere, and for K >
 * SK_KMAX in gemm_small_k, the products go to BLAS as the others do. */
#if defined(__AVX512F__)
#define SK_VEC 16
typedef __m512 skv;
#define SK_LOAD _mm512_loadu_ps
#define SK_STORE _mm512_storeu_ps
#define SK_FMA _mm512_fmadd_ps
#define SK_SET1 _mm512_set1_ps
#define SK_ZERO _mm512_setzero_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define SK_VEC 8
typedef __m256 skv;
#define SK_LOAD _mm256_loadu_ps
#define SK_STORE _mm256_storeu_ps
#define SK_FMA _mm256_fmadd_ps
#define SK_SET1 _mm256_set1_ps
#define SK_ZERO _mm256_setzero_ps
#endif

#ifdef SK_VEC
#define SK_MR 6
#define SK_KMAX 256

/* rows [m0, m0 + SK_MR) of C (those below M), columns [j, j + nv * SK_VEC), nv = 1 or 2 */
static inline __attribute__((always_inline)) void small_k_tile(int ta, int m0, int M, int K, const float *A,
                                                               int lda, const float *B, int ldb, float *C,
                                                               int ldc, int j, const int nv)
{
    const float *ar[SK_MR]; /* each row of op(A); rows past M repeat the last (computed, not stored) */
    for (int r = 0; r < SK_MR; r++) {
        const int m = m0 + r < M ? m0 + r : M - 1;
        ar[r] = ta ? A + m : A + (long)m * lda;
    }
    const long astep = ta ? lda : 1;
    skv c[SK_MR][2];
    for (int r = 0; r < SK_MR; r++)
        c[r][0] = c[r][1] = SK_ZERO();
    const float *b = B + j;
    for (int k = 0; k < K; k++, b += ldb) {
        const skv b0 = SK_LOAD(b), b1 = nv == 2 ? SK_LOAD(b + SK_VEC) : b0;
        for (int r = 0; r < SK_MR; r++) {
            const skv a = SK_SET1(ar[r][k * astep]);
            c[r][0] = SK_FMA(a, b0, c[r][0]);
            if (nv == 2)
                c[r][1] = SK_FMA(a, b1, c[r][1]);
        }
    }
    for (int r = 0; r < SK_MR && m0 + r < M; r++) {
        SK_STORE(C + (long)(m0 + r) * ldc + j, c[r][0]);
        if (nv == 2)
            SK_STORE(C + (long)(m0 + r) * ldc + j + SK_VEC, c[r][1]);
    }
}

/* row-major C[M][N] = op(A) B, op(A) [M][K] (A stored [M][lda], or [K][lda] when ta), B [K][ldb] */
static void gemm_small_k(int ta, int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C,
                         int ldc)
{
    int j = 0;
    for (; j + 2 * SK_VEC <= N; j += 2 * SK_VEC)
        for (int m0 = 0; m0 < M; m0 += SK_MR)
            small_k_tile(ta, m0, M, K, A, lda, B, ldb, C, ldc, j, 2);
    for (; j + SK_VEC <= N; j += SK_VEC)
        for (int m0 = 0; m0 < M; m0 += SK_MR)
            small_k_tile(ta, m0, M, K, A, lda, B, ldb, C, ldc, j, 1);
    for (; j < N; j++)
        for (int m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++)
                acc = fmaf(ta ? A[(long)k * lda + m] : A[(long)m * lda + k], B[(long)k * ldb + j], acc);
            C[(long)m * ldc + j] = acc;
        }
}

/* row-major C[M][N] = A B^T for a long K: A [M][lda], B [N][ldb], both along K: each element
 * a dot product in SK_VEC lanes (a chain of FMAs per lane over k = lane, lane + SK_VEC, ...),
 * the lanes then added, then the last K % SK_VEC terms; a register tile of DOT_T x DOT_T
 * elements per step of k. The conv weight gradients (M = output channels, N = C*k*k, K = the
 * images' columns), where MKL ran at a third of this speed. */
#define DOT_T 4
static inline float lanes_sum(skv v)
{
    float l[SK_VEC];
    memcpy(l, &v, sizeof l);
    float s = 0.0f;
    for (int i = 0; i < SK_VEC; i++)
        s += l[i];
    return s;
}

static void gemm_dot(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
    const int Kv = K - K % SK_VEC;
    for (int m0 = 0; m0 < M; m0 += DOT_T)
        for (int n0 = 0; n0 < N; n0 += DOT_T) {
            const float *a[DOT_T], *b[DOT_T];
            for (int r = 0; r < DOT_T; r++) {
                a[r] = A + (long)(m0 + r < M ? m0 + r : M - 1) * lda;
                b[r] = B + (long)(n0 + r < N ? n0 + r : N - 1) * ldb;
            }
            skv acc[DOT_T][DOT_T];
            for (int r = 0; r < DOT_T; r++)
                for (int q = 0; q < DOT_T; q++)
                    acc[r][q] = SK_ZERO();
            for (int kk = 0; kk < Kv; kk += SK_VEC) {
                skv av[DOT_T], bv[DOT_T];
                for (int r = 0; r < DOT_T; r++) {
                    av[r] = SK_LOAD(a[r] + kk);
                    bv[r] = SK_LOAD(b[r] + kk);
                }
                for (int r = 0; r < DOT_T; r++)
                    for (int q = 0; q < DOT_T; q++)
                        acc[r][q] = SK_FMA(av[r], bv[q], acc[r][q]);
            }
            for (int r = 0; r < DOT_T && m0 + r < M; r++)
                for (int q = 0; q < DOT_T && n0 + q < N; q++) {
                    float s = lanes_sum(acc[r][q]);
                    for (int kk = Kv; kk < K; kk++)
                        s = fmaf(a[r][kk], b[q][kk], s);
                    C[(long)(m0 + r) * ldc + n0 + q] = s;
                }
        }
}
#endif

/* whether the step computes conv weight gradients with gemm_dot (where it is built) rather
 * than BLAS: set once, when Python loads the library */
static int dot_wgrad = 0;

void cl_set_dot_wgrad(int on) { dot_wgrad = on; }

/* The short-K kernel's vector width in floats (16 with AVX-512, 8 with AVX2 + FMA), 0 where it
 * is not built */
int cl_small_k(void)
{
#ifdef SK_VEC
    return SK_VEC;
#else
    return 0;
#endif
}

/* gemm_dot called alone (for tests): 0, or -1 where it is not built */
int cl_gemm_dot(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
#ifdef SK_VEC
    if (M > 0 && N > 0 && K >= 0) {
        gemm_dot(M, N, K, A, lda, B, ldb, C, ldc);
        return 0;
    }
#else
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
#endif
    return -1;
}

/* gemm_small_k called alone (for tests): 0, or -1 where it is not built or K > SK_KMAX */
int cl_gemm_small_k(int ta, int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
#ifdef SK_VEC
    if (K <= SK_KMAX && M > 0 && K > 0) {
        gemm_small_k(ta, M, N, K, A, lda, B, ldb, C, ldc);
        return 0;
    }
#else
    (void)ta, (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
#endif
    return -1;
}

/* C[M][N] = op(A) B for the images [b0, b1), where B (not transposed) and C are [.][nimg
 * images x hw]: those images' columns of C (by gemm_small_k where built and K is short) */
static void gemm_images(cl_sgemm_fn f, int ta, int M, int K, const float *A, const float *B, float *C, int nimg,
                        int hw, int b0, int b1)
{
    const int N = nimg * hw;
    if (b1 <= b0)
        return;
#ifdef SK_VEC
    if (K <= SK_KMAX) {
        gemm_small_k(ta, M, (b1 - b0) * hw, K, A, ta ? M : K, B + (long)b0 * hw, N, C + (long)b0 * hw, N);
        return;
    }
#endif
    gemm_ld(f, ta, 0, M, (b1 - b0) * hw, K, A, ta ? M : K, B + (long)b0 * hw, N, 0, C + (long)b0 * hw, N);
}

/* [C][B][HW] (channel-major activations) <-> [C*HW][B] (features in NCHW flatten order), for
 * the channels [c0, c1) */
static void flatten_cm(const float *h, float *f, int B, int HW, int c0, int c1)
{
    for (int c = c0; c < c1; c++)
        for (int b = 0; b < B; b++)
            for (int j = 0; j < HW; j++)
                f[((long)c * HW + j) * B + b] = h[((long)c * B + b) * HW + j];
}

static void unflatten_cm(const float *f, float *h, int B, int HW, int c0, int c1)
{
    for (int c = c0; c < c1; c++)
        for (int b = 0; b < B; b++)
            for (int j = 0; j < HW; j++)
                h[((long)c * B + b) * HW + j] = f[((long)c * HW + j) * B + b];
}

/* One hidden block of the plan, built by cnnlab.fastops.TrainStep. The input is [C][B][H][W]
 * for a conv block and [C][B] for an fc block; the output [O][B][Ho/pool][Wo/pool] or
 * [O][B]. An fc block with flatten > 0 first flattens its input, the previous block's
 * (or the image's) [flatten][B][H*W] with C = flatten * H*W, into `feats`. */
typedef struct {
    int fc, C, H, W, k, s, p, Ho, Wo, O, pool, flatten, flat_hw;
    int mask_bits, threshold; /* mask_bits 0: no dropout */
    int direct; /* the first block, one input channel, stride 1, k*k <= MAX_TAPS: conv1_forward, no im2col */
    float scale;
    int batch_stats; /* a batch norm in training mode (a plan never has one in eval mode) */
    double momentum, eps;
    /* workspace, owned by the plan: NULL where the block has no use for it */
    float *cols, *z, *out, *invstd, *gz, *gout, *dcols, *feats;
    uint8_t *arg, *mask_raw, *mask;
} cl_block;

/* The tensors of one block, per step (they may move between steps): */
enum { P_WEIGHT, P_BIAS, P_GAMMA, P_BETA, P_RUN_MEAN, P_RUN_VAR, P_NUM_BATCHES,
       P_DWEIGHT, P_DBIAS, P_DGAMMA, P_DBETA, P_COUNT };

/* FastDropout's draws are in NCHW order ([B][O][HW] units of `bytes`); the kernels read them
 * channel-major ([O][B][HW]); the channels [o0, o1) of the images [b0, b1) */
static void mask_to_cm(const uint8_t *raw, uint8_t *cm, int B, long unit, int O, int o0, int o1, int b0, int b1)
{
    for (int o = o0; o < o1; o++)
        for (int b = b0; b < b1; b++)
            memcpy(cm + ((long)o * B + b) * unit, raw + ((long)b * O + o) * unit, unit);
}

/* The scratch of a call. Per thread: tmp (Ho*Wo floats of the largest block) and the
 * direct first conv's padded plane. Shared, each thread writing its own row, the others
 * reading after a barrier: part, each conv block's per-thread sums over the thread's images
 * (PARTS per channel: [block][thread][PARTS][omax]); dwp, each thread's part of a conv
 * weight gradient ([thread][wmax]); dwt, each thread's double sums of the direct first conv's
 * weight gradient ([thread][O*k*k]). */
enum { PART_SUM, PART_SS, PART_BIAS, PARTS };

typedef struct {
    float *tmp, *xpad, *dwp;
    double *part, *dwt;
    long tmp_n, xpad_n, omax, wmax, dwt_n;
    int nt;
} scratch;

static int scratch_alloc(scratch *s, int nb, const cl_block *blk, int nt)
{
    s->nt = nt;
    s->tmp_n = 1;
    s->omax = s->wmax = 1;
    for (int i = 0; i < nb; i++) {
        const cl_block *L = &blk[i];
        if ((long)L->Ho * L->Wo > s->tmp_n)
            s->tmp_n = (long)L->Ho * L->Wo;
        if (!L->fc && L->O > s->omax)
            s->omax = L->O;
        if (!L->fc && (long)L->O * L->C * L->k * L->k > s->wmax)
            s->wmax = (long)L->O * L->C * L->k * L->k;
    }
    s->tmp_n = (s->tmp_n + 15) / 16 * 16; /* each thread's own cache lines */
    s->omax = (s->omax + 7) / 8 * 8;
    s->wmax = (s->wmax + 15) / 16 * 16;
    const cl_block *L = &blk[0];
    s->xpad_n = L->direct ? ((long)(L->H + 2 * L->p) * padded_cols(L->Wo, L->k) + 15) / 16 * 16 : 0;
    s->dwt_n = L->direct ? ((long)L->O * L->k * L->k + 7) / 8 * 8 : 0;
    s->tmp = malloc(sizeof(float) * ((s->tmp_n + s->xpad_n) * nt + (nt > 1 ? s->wmax * nt : 0)));
    s->xpad = s->tmp ? s->tmp + s->tmp_n * nt : NULL;
    s->dwp = s->tmp ? s->xpad + s->xpad_n * nt : NULL;
    s->part = malloc(sizeof(double) * ((long)nb * nt * PARTS * s->omax + s->dwt_n * nt + 1));
    s->dwt = s->part ? s->part + (long)nb * nt * PARTS * s->omax : NULL;
    if (s->tmp && s->part)
        return 0;
    free(s->tmp), free(s->part);
    return -1;
}

static void scratch_free(scratch *s) { free(s->tmp), free(s->part); }

/* block i's sums of kind `which` by thread t, one per channel */
static inline double *part_of(const scratch *sc, int i, int t, int which)
{
    return sc->part + (((long)i * sc->nt + t) * PARTS + which) * sc->omax;
}

/* channel o's sum of kind `which` over the batch: the threads' sums added in thread order
 * (with one thread, that thread's sum itself) */
static inline double part_total(const scratch *sc, int i, int which, int o)
{
    double s = part_of(sc, i, 0, which)[o];
    for (int t = 1; t < sc->nt; t++)
        s += part_of(sc, i, t, which)[o];
    return s;
}

/* The image x [B][C][H][W] to the last block's output (returned, in that block's `out`):
 * every block forward, by the team. Shared by the training step and the forward pass. Ends
 * with a barrier.
 * - A conv block: each thread takes its own images (share(B), the same in every block and in
 *   backward) from the block's input to its output, so that their activations stay in its
 *   core's caches; a batch norm's statistics from the threads' sums over their images, added
 *   in thread order (two barriers).
 * - An fc block (a few hundred values per image): the product by rows or columns, the rest by
 *   channel.
 * - The dropout bytes: drawn by thread 0 for the whole batch, in one fixed order. */
static const float *forward_team(const team *tm, int nb, cl_block *blk, void **ptrs, const uint64_t *seeds,
                                 const float *x, int B, float *xcm, const scratch *sc, cl_sgemm_fn sgemm)
{
    float *tmp = sc->tmp + sc->tmp_n * tm->t, *xpad = sc->xpad + sc->xpad_n * tm->t;
    /* the image, channel-major */
    const cl_block *b0 = &blk[0];
    const int Cin = b0->fc ? b0->flatten : b0->C, HWin = b0->fc ? b0->flat_hw : b0->H * b0->W;
    int ilo, ihi, lo, hi;
    share(B, tm, &ilo, &ihi);
    for (int c = 0; c < Cin; c++)
        for (int b = ilo; b < ihi; b++)
            memcpy(xcm + ((long)c * B + b) * HWin, x + ((long)b * Cin + c) * HWin, sizeof(float) * HWin);
    if (b0->fc) /* flatten_cm reads every image; a conv block only this thread's */
        team_sync(tm);
    const float *h = xcm;
    int si = 0;
    for (int i = 0; i < nb; i++) {
        cl_block *L = &blk[i];
        void **P = ptrs + (long)i * P_COUNT;
        const int N = B * L->Ho * L->Wo, CK = L->C * L->k * L->k, HW = L->Ho * L->Wo;
        const long unit = (long)HW * (L->mask_bits / 8);
        const float *gamma = P[P_GAMMA], *bias = P[P_BIAS];
        if (L->mask_bits && tm->t == 0)
            cl_random_bytes(L->mask_raw, unit * B * L->O, seeds[si]);
        si += L->mask_bits != 0;
        if (tm->t == 0 && gamma && L->batch_stats && P[P_NUM_BATCHES])
            *(int64_t *)P[P_NUM_BATCHES] += 1;
        if (L->fc) {
            const float *cols = h;
            if (L->flatten) {
                share(L->flatten, tm, &lo, &hi);
                flatten_cm(h, L->feats, B, L->flat_hw, lo, hi);
                cols = L->feats;
                team_sync(tm);
            }
            gemm_team(tm, sgemm, 0, 0, L->O, N, CK, P[P_WEIGHT], cols, L->z);
            team_sync(tm);
            share(L->O, tm, &lo, &hi);
            if (L->mask_bits)
                mask_to_cm(L->mask_raw, L->mask, B, unit, L->O, lo, hi, 0, B);
            block_forward_ch(L->z, L->O, B, L->Ho, L->Wo, bias, gamma, P[P_BETA], P[P_RUN_MEAN], P[P_RUN_VAR],
                             L->batch_stats, L->momentum, L->eps, L->invstd, L->mask_bits ? L->mask : NULL,
                             L->mask_bits ? L->mask_bits : 8, L->threshold, L->scale, L->pool, L->out, L->arg, tmp,
                             lo, hi);
            team_sync(tm);
            h = L->out;
            continue;
        }
        /* a conv block, this thread's images: the product, */
        if (L->direct) {
            conv1_forward(h, P[P_WEIGHT], L->z, B, L->H, L->W, L->k, L->p, L->Ho, L->Wo, L->O, xpad, ilo, ihi);
        } else {
            cols_images(1, (float *)h, L->cols, L->C, B, L->H, L->W, L->k, L->s, L->p, L->Ho, L->Wo, ilo, ihi);
            gemm_images(sgemm, 0, L->O, CK, P[P_WEIGHT], L->cols, L->z, B, HW, ilo, ihi);
        }
        /* the batch's statistics, */
        const int stats = gamma && L->batch_stats;
        const long i0 = (long)ilo * HW, n_own = (long)(ihi - ilo) * HW;
        if (stats) {
            double *ps = part_of(sc, i, tm->t, PART_SUM), *pq = part_of(sc, i, tm->t, PART_SS);
            for (int o = 0; o < L->O; o++)
                ps[o] = sum_f(L->z + (long)o * N + i0, n_own);
            team_sync(tm);
            for (int o = 0; o < L->O; o++)
                pq[o] = sum_sq_dev(L->z + (long)o * N + i0, n_own, (float)(part_total(sc, i, PART_SUM, o) / N));
            team_sync(tm);
        } else if (L->mask_bits) {
            team_sync(tm); /* thread 0's dropout bytes */
        }
        /* then normalisation, dropout, ReLU and pool */
        const long outn = (long)B * (L->pool ? (L->Ho / L->pool) * (L->Wo / L->pool) : HW);
        for (int o = 0; o < L->O; o++) {
            float g = 1.0f, bt = 0.0f, mf = 0.0f, isf = 1.0f;
            const float bo = bias ? bias[o] : 0.0f;
            if (gamma) {
                const double mean_z = stats ? part_total(sc, i, PART_SUM, o) / N : 0.0;
                const double ss = stats ? part_total(sc, i, PART_SS, o) : 0.0;
                bn_norm(L->batch_stats, mean_z, ss, N, bo, (float *)P[P_RUN_MEAN] + o, (float *)P[P_RUN_VAR] + o,
                        tm->t == 0, L->momentum, L->eps, &mf, &isf);
                if (tm->t == 0)
                    L->invstd[o] = isf;
                g = gamma[o];
                bt = ((const float *)P[P_BETA])[o];
            }
            if (L->mask_bits)
                mask_to_cm(L->mask_raw, L->mask, B, unit, L->O, o, o + 1, ilo, ihi);
            channel_forward(L->z + (long)o * N, B, L->Ho, L->Wo, gamma != NULL, mf, isf, g, bt, bias && !gamma, bo,
                            L->mask_bits ? L->mask + (long)o * N * (L->mask_bits / 8) : NULL, L->mask_bits,
                            L->threshold, L->scale, L->pool, L->out + o * outn, L->arg ? L->arg + o * outn : NULL,
                            tmp, ilo, ihi);
        }
        if (i == nb - 1 || blk[i + 1].fc) /* what comes next reads every image */
            team_sync(tm);
        h = L->out;
    }
    return h;
}

/* values per channel and image in a block's output: its pooled map, or 1 for an fc block */
static int out_hw(const cl_block *L)
{
    if (L->fc)
        return 1;
    return L->pool ? (L->Ho / L->pool) * (L->Wo / L->pool) : L->Ho * L->Wo;
}

/* The output layer: logits [B][K] = feats^T W^T + bias from the last block's output h.
 * Returns the features [F][B] it used (h itself, or h flattened into hfeats). One thread. */
static const float *head_logits(const cl_block *last, void **H, const float *h, int B, int K, int F, float *hfeats,
                                float *logits, cl_sgemm_fn sgemm)
{
    const float *feats = h;
    if (!last->fc) {
        flatten_cm(h, hfeats, B, out_hw(last), 0, last->O);
        feats = hfeats;
    }
    const float *hb = H[1];
    gemm(sgemm, 1, 1, B, K, F, feats, H[0], 0, logits);
    if (hb)
        for (int b = 0; b < B; b++)
            for (int k = 0; k < K; k++)
                logits[(long)b * K + k] += hb[k];
    return feats;
}

/* Runs the block of code by a team of nt threads, or, for one, by the calling thread alone,
 * outside any parallel region */
#ifdef _OPENMP
#define TEAM_RUN(nt, ...)                                                                           \
    do {                                                                                            \
        if ((nt) > 1) {                                                                             \
            _Pragma("omp parallel num_threads(nt)") { __VA_ARGS__ }                                 \
        } else {                                                                                    \
            __VA_ARGS__                                                                             \
        }                                                                                           \
    } while (0)
#else
#define TEAM_RUN(nt, ...)                                                                           \
    do {                                                                                            \
        __VA_ARGS__                                                                                 \
    } while (0)
#endif

/* The forward pass alone (evaluation): logits [B][K] of the batch x, in the plan's mode (a
 * plan for a net in training mode draws dropout masks and updates batch norm's running
 * statistics, as torch's modules do). The blocks' arg may be NULL. tmp is unused (each
 * thread's scratch is allocated here). nt: threads. Returns 0, or -1 when memory ran out. */
int cl_forward(int nb, cl_block *blk, void **ptrs, const uint64_t *seeds, const float *x, int B, int K, int F,
               float *xcm, float *hfeats, float *tmp, float *logits, cl_sgemm_fn sgemm, int nt)
{
    (void)tmp;
    nt = nt < 1 || !cl_openmp() ? 1 : nt;
    scratch sc;
    if (scratch_alloc(&sc, nb, blk, nt))
        return -1;
    TEAM_RUN(nt, {
        team tm;
        int prev;
        team_enter(&tm, nt, &prev);
        const float *h = forward_team(&tm, nb, blk, ptrs, seeds, x, B, xcm, &sc, sgemm);
        if (tm.t == 0)
            head_logits(&blk[nb - 1], ptrs + (long)nb * P_COUNT, h, B, K, F, hfeats, logits, sgemm);
        team_leave(&tm, prev);
    });
    scratch_free(&sc);
    return 0;
}

/* One training step by the team (after a barrier that follows the batch's arrival); ends
 * with a barrier. The arguments are cl_train_step's. */
static void step_team(const team *tm, int nb, cl_block *blk, void **ptrs, const uint64_t *seeds, const float *x,
                      const int64_t *y, int B, int K, int F, float *xcm, float *hfeats, float *hgrad, float *probs,
                      float *logits, float *loss, const scratch *sc, cl_sgemm_fn sgemm)
{
    float *xpad = sc->xpad + sc->xpad_n * tm->t;
    const float *h = forward_team(tm, nb, blk, ptrs, seeds, x, B, xcm, sc, sgemm);
    /* the output layer and the loss: loss = mean(lse - logit[y]); its gradient
     * (softmax - onehot) / B, as torch's cross_entropy backward; one thread */
    cl_block *last = &blk[nb - 1];
    void **H = ptrs + (long)nb * P_COUNT;
    if (tm->t == 0) {
        const float *feats = head_logits(last, H, h, B, K, F, hfeats, logits, sgemm);
        const float *hw = H[0], *hb = H[1];
        double total = 0.0;
        for (int b = 0; b < B; b++) {
            const float *l = logits + (long)b * K;
            float *pr = probs + (long)b * K;
            float mx = l[0];
            for (int k = 1; k < K; k++)
                mx = l[k] > mx || isnan(l[k]) ? l[k] : mx;
            double s = 0.0;
            for (int k = 0; k < K; k++) {
                pr[k] = expf(l[k] - mx);
                s += pr[k];
            }
            total += mx + log(s) - l[y[b]];
            const float inv = (float)(1.0 / s), invB = 1.0f / B;
            for (int k = 0; k < K; k++)
                pr[k] = (pr[k] * inv - (k == y[b] ? 1.0f : 0.0f)) * invB;
        }
        *loss = (float)(total / B);
        if (H[2])
            gemm(sgemm, 1, 1, K, F, B, probs, feats, 0, H[2]); /* dW = g^T feats^T */
        if (H[3] && hb) {
            float *db = H[3];
            for (int k = 0; k < K; k++) {
                double s = 0.0;
                for (int b = 0; b < B; b++)
                    s += probs[(long)b * K + k];
                db[k] = (float)s;
            }
        }
        /* the gradient of the last block's output */
        if (last->fc) {
            gemm(sgemm, 1, 1, F, B, K, hw, probs, 0, last->gout);
        } else {
            gemm(sgemm, 1, 1, F, B, K, hw, probs, 0, hgrad);
            unflatten_cm(hgrad, last->gout, B, out_hw(last), 0, last->O);
        }
    }
    team_sync(tm);
    int ilo, ihi, lo, hi;
    share(B, tm, &ilo, &ihi);
    for (int i = nb - 1; i >= 0; i--) {
        cl_block *L = &blk[i];
        void **P = ptrs + (long)i * P_COUNT;
        const int N = B * L->Ho * L->Wo, CK = L->C * L->k * L->k, HW = L->Ho * L->Wo;
        const float *gamma = P[P_GAMMA];
        float *dbias = P[P_BIAS] ? P[P_DBIAS] : NULL;
        cl_block *prev = i ? &blk[i - 1] : NULL;
        if (L->fc) { /* by channel, then the products by rows or columns */
            share(L->O, tm, &lo, &hi);
            block_backward_ch(L->gout, L->arg, L->z, L->gz, B, L->Ho, L->Wo, L->mask_bits ? L->mask : NULL,
                              L->mask_bits ? L->mask_bits : 8, L->threshold, L->scale, L->pool, gamma, L->invstd,
                              P[P_DGAMMA], P[P_DBETA], dbias, lo, hi);
            team_sync(tm);
            const float *cols = L->flatten ? L->feats : (i ? prev->out : xcm);
            if (P[P_DWEIGHT])
                gemm_team(tm, sgemm, 0, 1, L->O, CK, N, L->gz, cols, P[P_DWEIGHT]);
            if (i == 0)
                break;
            if (!L->flatten) {
                gemm_team(tm, sgemm, 1, 0, CK, N, L->O, P[P_WEIGHT], L->gz, prev->gout);
            } else {
                gemm_team(tm, sgemm, 1, 0, CK, N, L->O, P[P_WEIGHT], L->gz, L->dcols);
                team_sync(tm);
                share(L->flatten, tm, &lo, &hi);
                unflatten_cm(L->dcols, prev->gout, B, L->flat_hw, lo, hi);
            }
            team_sync(tm);
            continue;
        }
        /* a conv block, this thread's images (as forward): the gradient of z, and its sums */
        const long i0 = (long)ilo * HW, n_own = (long)(ihi - ilo) * HW;
        const long outn = (long)B * (L->pool ? (L->Ho / L->pool) * (L->Wo / L->pool) : HW);
        double *ps = part_of(sc, i, tm->t, PART_SUM), *pq = part_of(sc, i, tm->t, PART_SS);
        for (int o = 0; o < L->O; o++) {
            float *gc = L->gz + (long)o * N;
            channel_backward(L->gout + o * outn, L->arg + o * outn, gc, L->Ho, L->Wo,
                             L->mask_bits ? L->mask + (long)o * N * (L->mask_bits / 8) : NULL, L->mask_bits,
                             L->threshold, L->scale, L->pool, ilo, ihi);
            if (gamma)
                sum_g_gz(gc + i0, L->z + (long)o * N + i0, n_own, ps + o, pq + o);
        }
        /* always a barrier here: it also orders the previous block's reduction (below) of dwp
         * before this block's writes to it */
        team_sync(tm);
        double *pb = part_of(sc, i, tm->t, PART_BIAS);
        for (int o = 0; o < L->O; o++) {
            float *gc = L->gz + (long)o * N;
            if (gamma) {
                const double sg = part_total(sc, i, PART_SUM, o), sgz = part_total(sc, i, PART_SS, o);
                if (tm->t == 0 && P[P_DBETA])
                    ((float *)P[P_DBETA])[o] = (float)sg;
                if (tm->t == 0 && P[P_DGAMMA])
                    ((float *)P[P_DGAMMA])[o] = (float)sgz;
                bn_backward(gc, L->z + (long)o * N, i0, i0 + n_own, gamma[o], L->invstd[o], sg, sgz, N);
            }
            if (dbias)
                pb[o] = sum_f(gc + i0, n_own);
        }
        /* the weight gradient over this thread's images (the threads' parts added below), */
        const int T = L->k * L->k;
        if (P[P_DWEIGHT] && L->direct)
            conv1_weight_grad(xcm, L->gz, L->O, B, L->H, L->W, L->k, L->p, L->Ho, L->Wo, xpad,
                              sc->dwt + sc->dwt_n * tm->t, ilo, ihi);
#ifdef SK_VEC
        else if (P[P_DWEIGHT] && dot_wgrad)
            gemm_dot(L->O, CK, (int)n_own, L->gz + i0, N, L->cols + i0, N,
                     tm->nt == 1 ? P[P_DWEIGHT] : sc->dwp + sc->wmax * tm->t, CK);
#endif
        else if (P[P_DWEIGHT] && tm->nt == 1)
            gemm(sgemm, 0, 1, L->O, CK, N, L->gz, L->cols, 0, P[P_DWEIGHT]);
        else if (P[P_DWEIGHT])
            gemm_ld(sgemm, 0, 1, L->O, CK, (int)n_own, L->gz + i0, N, L->cols + i0, N, 0, sc->dwp + sc->wmax * tm->t,
                    CK);
        /* and the input's gradient: these images' columns, then col2im of the same columns */
        if (i > 0) {
            gemm_images(sgemm, 1, CK, L->O, P[P_WEIGHT], L->gz, L->dcols, B, HW, ilo, ihi);
            cols_images(0, prev->gout, L->dcols, L->C, B, L->H, L->W, L->k, L->s, L->p, L->Ho, L->Wo, ilo, ihi);
        }
        team_sync(tm);
        /* the threads' parts added in thread order (no barrier after: the next block touches
         * none of it, and the step ends with one) */
        if (dbias && tm->t == 0)
            for (int o = 0; o < L->O; o++)
                dbias[o] = (float)part_total(sc, i, PART_BIAS, o);
        float *dw = P[P_DWEIGHT];
        if (dw && L->direct) {
            share(L->O * T, tm, &lo, &hi);
            for (int j = lo; j < hi; j++) {
                double s = sc->dwt[j];
                for (int t = 1; t < tm->nt; t++)
                    s += sc->dwt[sc->dwt_n * t + j];
                dw[j] = (float)s;
            }
        } else if (dw && tm->nt > 1) {
            share(L->O * CK, tm, &lo, &hi);
            for (int j = lo; j < hi; j++) {
                float s = sc->dwp[j];
                for (int t = 1; t < tm->nt; t++)
                    s += sc->dwp[sc->wmax * t + j];
                dw[j] = s;
            }
        }
    }
    team_sync(tm);
}

/* the first label of y [B] outside [0, K): 1 + its index, else 0 */
static int bad_label(const int64_t *y, int B, int K)
{
    for (int b = 0; b < B; b++)
        if (y[b] < 0 || y[b] >= K)
            return 1 + b;
    return 0;
}

/* One training step: forward, mean cross-entropy, backward; gradients written (not
 * accumulated) where their pointer is not NULL. x: [B][C][H][W] float32 (NCHW); y: [B]
 * labels; seeds: one per block with dropout, in block order (each seeds cl_random_bytes,
 * as cnnlab.fastops.random_bytes does); ptrs: P_COUNT per block, then the head's weight
 * [K][F], bias [K] (or NULL), and their gradients. xcm: [C][B][H][W] scratch; hfeats,
 * hgrad: [F][B] scratch when the last block is a conv block; probs: [B][K] scratch; tmp:
 * unused (each thread's scratch is allocated here). logits [B][K] and loss are written. nt:
 * threads (1 without OpenMP). Returns 0, 1 + b for the first label y[b] outside [0, K), or
 * -1 when memory ran out. */
int cl_train_step(int nb, cl_block *blk, void **ptrs, const uint64_t *seeds, const float *x, const int64_t *y,
                  int B, int K, int F, float *xcm, float *hfeats, float *hgrad, float *probs, float *tmp,
                  float *logits, float *loss, cl_sgemm_fn sgemm, int nt)
{
    (void)tmp;
    const int bad = bad_label(y, B, K);
    if (bad)
        return bad;
    nt = nt < 1 || !cl_openmp() ? 1 : nt;
    scratch sc;
    if (scratch_alloc(&sc, nb, blk, nt))
        return -1;
    TEAM_RUN(nt, {
        team tm;
        int prev;
        team_enter(&tm, nt, &prev);
        step_team(&tm, nb, blk, ptrs, seeds, x, y, B, K, F, xcm, hfeats, hgrad, probs, logits, loss, &sc, sgemm);
        team_leave(&tm, prev);
    });
    scratch_free(&sc);
    return 0;
}

/* ------------------------------------------------------------------ Adam
 *
 * One step of torch.optim.Adam (no weight decay, no amsgrad, not maximising) over nt float32
 * tensors, computed the way torch's fused CPU kernel computes it, operation for operation:
 * double-precision bias corrections from the float step, then per element in float
 *   m = fma(1 - beta1, g - m, m)                 (exp_avg.lerp_(grad, 1 - beta1))
 *   v = fma((1 - beta2) * g, g, v * beta2)       (its vector loop; its scalar tail, the last
 *       v = fma(v, beta2, (1 - beta2) * g * g)    n % vec elements, rounds this way)
 *   p = p + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)
 * so that the result is torch's bit for bit where its kernel runs vec floats per vector
 * (8 with AVX2; tests/test_native.py checks). steps: each tensor's step count (float),
 * incremented first, as torch does. */
typedef struct {
    int nt;
    float **params, **grads, **exp_avgs, **exp_avg_sqs, **steps;
    const int64_t *sizes;
    double lr, beta1, beta2, eps;
    int vec;
} cl_adam_args;

/* elements [i0, i1) of tensor t at step count `step` (already incremented); every element's
 * arithmetic is the same whatever the range */
static void adam_range(float *p, const float *g, float *m, float *v, int64_t n, int64_t i0, int64_t i1, double step,
                       double lr, double beta1, double beta2, double eps, int vec)
{
    const double step_size = lr / (1.0 - pow(beta1, step)), bc2_sqrt = sqrt(1.0 - pow(beta2, step));
    const float c1 = (float)(1.0 - beta1), c2 = (float)(1.0 - beta2), b2 = (float)beta2;
    const float bs = (float)bc2_sqrt, e = (float)eps, neg_step = (float)-step_size;
    const int64_t body = vec > 1 ? n - n % vec : n, mid = body < i1 ? (body > i0 ? body : i0) : i1;
#pragma omp simd
    for (int64_t i = i0; i < mid; i++) {
        const float mi = fmaf(c1, g[i] - m[i], m[i]), vi = fmaf(c2 * g[i], g[i], v[i] * b2);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] + (neg_step * mi) / (sqrtf(vi) / bs + e);
    }
    for (int64_t i = mid; i < i1; i++) {
        const float mi = fmaf(c1, g[i] - m[i], m[i]), vi = fmaf(v[i], b2, (c2 * g[i]) * g[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] + (neg_step * mi) / (sqrtf(vi) / bs + e);
    }
}

void cl_adam(int nt, float **params, float **grads, float **exp_avgs, float **exp_avg_sqs, float **steps,
             const int64_t *sizes, double lr, double beta1, double beta2, double eps, int vec)
{
    for (int t = 0; t < nt; t++) {
        *steps[t] += 1.0f;
        adam_range(params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], sizes[t], 0, sizes[t], *steps[t], lr, beta1,
                   beta2, eps, vec);
    }
}

/* cl_adam by the team: each tensor's elements shared out in blocks of 64; ends with a barrier */
static void adam_team(const team *tm, const cl_adam_args *a)
{
    for (int t = 0; t < a->nt; t++) {
        const int64_t n = a->sizes[t], blocks = (n + 63) / 64;
        const int64_t i0 = blocks * tm->t / tm->nt * 64, i1 = blocks * (tm->t + 1) / tm->nt * 64;
        const float step = *a->steps[t] + 1.0f;
        adam_range(a->params[t], a->grads[t], a->exp_avgs[t], a->exp_avg_sqs[t], n, i0 < n ? i0 : n, i1 < n ? i1 : n,
                   step, a->lr, a->beta1, a->beta2, a->eps, a->vec);
    }
    team_sync(tm); /* every thread has read the step counts */
    if (tm->t == 0)
        for (int t = 0; t < a->nt; t++)
            *a->steps[t] += 1.0f;
    team_sync(tm);
}

/* ------------------------------------------------------------------ a run of steps
 *
 * What cnnlab's training loop does for each full batch of an epoch, `count` times in one
 * call, with no Python between steps (whose interpreter ran cold after each step's ~4 MB of
 * activations, about a fifth of a step): gather the batch, cl_train_step, then Adam (cl_adam),
 * then record the loss and each sample's predicted class. Step s takes the samples
 * idx[s*B .. s*B + B) of x_all [n_all][sample] and y_all [n_all], and the dropout seeds
 * seeds[s*n_seeds ..). losses[s] and preds[s*B + b] are written (the prediction is the first
 * largest logit, a NaN counting as largest, as torch.argmax). xb [B][sample] and yb [B] are
 * scratch. nt: threads, one parallel region for the whole run. Returns 0; 1 + s*B + b when
 * step s's label b is outside [0, K) (steps before s are done, step s is not); -2 for an index
 * outside [0, n_all) (nothing is done); -1 when memory ran out. */
int cl_train_steps(int nb, cl_block *blk, void **ptrs, const uint64_t *seeds, int n_seeds, int count,
                   const float *x_all, const int64_t *y_all, long n_all, long sample, const int64_t *idx, int B,
                   int K, int F, float *xb, int64_t *yb, float *xcm, float *hfeats, float *hgrad, float *probs,
                   float *tmp, float *logits, float *losses, int64_t *preds, const cl_adam_args *a,
                   cl_sgemm_fn sgemm, int nt)
{
    (void)tmp;
    for (long i = 0; i < (long)count * B; i++)
        if (idx[i] < 0 || idx[i] >= n_all)
            return -2;
    nt = nt < 1 || !cl_openmp() ? 1 : nt;
    scratch sc;
    if (scratch_alloc(&sc, nb, blk, nt))
        return -1;
    int rc = 0;
    TEAM_RUN(nt, {
        team tm;
        int prev;
        team_enter(&tm, nt, &prev);
        for (int s = 0; s < count; s++) {
            const int64_t *is = idx + (long)s * B;
            int lo, hi;
            share(B, &tm, &lo, &hi);
            for (int b = lo; b < hi; b++) {
                memcpy(xb + (long)b * sample, x_all + is[b] * sample, sizeof(float) * sample);
                yb[b] = y_all[is[b]];
            }
            team_sync(&tm);
            const int bad = bad_label(yb, B, K); /* the same answer in every thread */
            if (bad) {
                if (tm.t == 0)
                    rc = 1 + s * B + (bad - 1);
                break;
            }
            step_team(&tm, nb, blk, ptrs, seeds + (long)s * n_seeds, xb, yb, B, K, F, xcm, hfeats, hgrad, probs,
                      logits, losses + s, &sc, sgemm);
            if (tm.t == 0)
                for (int b = 0; b < B; b++) {
                    const float *l = logits + (long)b * K;
                    int best = 0;
                    for (int k = 1; k < K && !isnan(l[best]); k++)
                        if (l[k] > l[best] || isnan(l[k]))
                            best = k;
                    preds[(long)s * B + b] = best;
                }
            adam_team(&tm, a);
        }
        team_leave(&tm, prev);
    });
    scratch_free(&sc);
    return rc;
}

/* ---------------------------------------------------------------------------- layouts */

/* The layout of the structs cnnlab/native/__init__.py mirrors with ctypes, which it checks at
 * load (a mismatch would corrupt memory silently): out = {sizeof, each field's offset in
 * declaration order}. which 0: cl_block, 1: cl_adam_args. Returns how many numbers it
 * wrote; -1 for an unknown struct or an out shorter than that. */
int cl_layout(int which, int64_t *out, int n)
{
#define OFF(T, f) (int64_t)offsetof(T, f)
    const int64_t block[] = {
        (int64_t)sizeof(cl_block), OFF(cl_block, fc), OFF(cl_block, C), OFF(cl_block, H), OFF(cl_block, W),
        OFF(cl_block, k), OFF(cl_block, s), OFF(cl_block, p), OFF(cl_block, Ho), OFF(cl_block, Wo),
        OFF(cl_block, O), OFF(cl_block, pool), OFF(cl_block, flatten), OFF(cl_block, flat_hw),
        OFF(cl_block, mask_bits), OFF(cl_block, threshold), OFF(cl_block, direct), OFF(cl_block, scale),
        OFF(cl_block, batch_stats), OFF(cl_block, momentum), OFF(cl_block, eps), OFF(cl_block, cols),
        OFF(cl_block, z), OFF(cl_block, out), OFF(cl_block, invstd), OFF(cl_block, gz), OFF(cl_block, gout),
        OFF(cl_block, dcols), OFF(cl_block, feats), OFF(cl_block, arg), OFF(cl_block, mask_raw),
        OFF(cl_block, mask)};
    const int64_t adam[] = {
        (int64_t)sizeof(cl_adam_args), OFF(cl_adam_args, nt), OFF(cl_adam_args, params),
        OFF(cl_adam_args, grads), OFF(cl_adam_args, exp_avgs), OFF(cl_adam_args, exp_avg_sqs),
        OFF(cl_adam_args, steps), OFF(cl_adam_args, sizes), OFF(cl_adam_args, lr), OFF(cl_adam_args, beta1),
        OFF(cl_adam_args, beta2), OFF(cl_adam_args, eps), OFF(cl_adam_args, vec)};
#undef OFF
    const int64_t *src = which == 0 ? block : which == 1 ? adam : NULL;
    int len = which == 0 ? (int)(sizeof block / sizeof *block) : (int)(sizeof adam / sizeof *adam);
    if (src == NULL || n < len)
        return -1;
    memcpy(out, src, (size_t)len * sizeof *out);
    return len;
}
