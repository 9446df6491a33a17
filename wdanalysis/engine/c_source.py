"""The C source of the fused kernel (:mod:`wdanalysis.engine.c_kernel` compiles and binds it).

* ``wd_rows_*`` / ``wd_cols_*``: the per-vector sums ``Σa², Σa·d, Σd²`` of a block of stored
  rows against the same rows of a checkpoint (``d = b − a``) or against a float64 update
  (``_d``), widened to float64 in one pass (AVX2/FMA/F16C where the CPU has them).
* ``wd_proj_*``: each stored row projected on ``r`` float64 directions (``a @ W``), the
  only pass over the weight that a LoRA/DoRA update needs (:mod:`wdanalysis.engine.adapter_sums`).
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WD_SIMD 1
#endif

static inline double s_bf16(const uint16_t *p) {
  union { uint32_t u; float f; } v; v.u = (uint32_t)(*p) << 16; return (double)v.f;
}
static inline double s_f32(const float *p) { return (double)*p; }
static inline double s_f64(const double *p) { return *p; }
#if defined(__F16C__)
static inline double s_f16(const uint16_t *p) { return (double)_cvtsh_ss(*p); }
#endif

#ifdef WD_SIMD
static inline __m256d v_bf16(const uint16_t *p) {
  __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(h, 16)));
}
static inline __m256d v_f32(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline __m256d v_f64(const double *p) { return _mm256_loadu_pd(p); }
#if defined(__F16C__)
static inline __m256d v_f16(const uint16_t *p) {
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
}
#endif
#endif

/* Vectors along rows: for each row i, out_k[i] += sum_j (...).  d = b - a (DIFF) or b. */
#ifdef WD_SIMD
#define ROWS(NAME, TA, LA, TB, LB, DIFF)                                                  \
  void NAME(const TA *a, const TB *b, int64_t R, int64_t C, int64_t lda, int64_t ldb,   \
            double *aa, double *ad, double *dd) {                                       \
    for (int64_t i = 0; i < R; i++) {                                                   \
      const TA *ar = a + i * lda; const TB *br = b + i * ldb;                          \
      __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, t0 = s0, t1 = s0, t2 = s0;     \
      int64_t j = 0;                                                                    \
      for (; j + 8 <= C; j += 8) {                                                      \
        __m256d x = v_##LA(ar + j), y = v_##LB(br + j);                                 \
        __m256d u = v_##LA(ar + j + 4), w = v_##LB(br + j + 4);                         \
        if (DIFF) { y = _mm256_sub_pd(y, x); w = _mm256_sub_pd(w, u); }                  \
        s0 = _mm256_fmadd_pd(x, x, s0); s1 = _mm256_fmadd_pd(x, y, s1);                 \
        s2 = _mm256_fmadd_pd(y, y, s2); t0 = _mm256_fmadd_pd(u, u, t0);                 \
        t1 = _mm256_fmadd_pd(u, w, t1); t2 = _mm256_fmadd_pd(w, w, t2);                 \
      }                                                                                 \
      double q0[4], q1[4], q2[4];                                                       \
      _mm256_storeu_pd(q0, _mm256_add_pd(s0, t0));                                      \
      _mm256_storeu_pd(q1, _mm256_add_pd(s1, t1));                                      \
      _mm256_storeu_pd(q2, _mm256_add_pd(s2, t2));                                      \
      double r0 = 0, r1 = 0, r2 = 0;                                                    \
      for (; j < C; j++) {                                                              \
        double x = s_##LA(ar + j), y = s_##LB(br + j); if (DIFF) y -= x;                \
        r0 += x * x; r1 += x * y; r2 += y * y;                                          \
      }                                                                                 \
      aa[i] += ((q0[0] + q0[2]) + (q0[1] + q0[3])) + r0;                                \
      ad[i] += ((q1[0] + q1[2]) + (q1[1] + q1[3])) + r1;                                \
      dd[i] += ((q2[0] + q2[2]) + (q2[1] + q2[3])) + r2;                                \
    }                                                                                   \
  }
#else
#define ROWS(NAME, TA, LA, TB, LB, DIFF)                                                  \
  void NAME(const TA *a, const TB *b, int64_t R, int64_t C, int64_t lda, int64_t ldb,   \
            double *aa, double *ad, double *dd) {                                       \
    for (int64_t i = 0; i < R; i++) {                                                   \
      const TA *ar = a + i * lda; const TB *br = b + i * ldb;                          \
      double s0[4] = {0}, s1[4] = {0}, s2[4] = {0};                                     \
      for (int64_t j = 0; j < C; j++) {                                                 \
        double x = s_##LA(ar + j), y = s_##LB(br + j); if (DIFF) y -= x;                \
        s0[j & 3] += x * x; s1[j & 3] += x * y; s2[j & 3] += y * y;                     \
      }                                                                                 \
      aa[i] += (s0[0] + s0[2]) + (s0[1] + s0[3]);                                       \
      ad[i] += (s1[0] + s1[2]) + (s1[1] + s1[3]);                                       \
      dd[i] += (s2[0] + s2[2]) + (s2[1] + s2[3]);                                       \
    }                                                                                   \
  }
#endif

/* Vectors along columns: out_k[j] += sum_i (...), accumulated row after row. */
#define COLS(NAME, TA, LA, TB, LB, DIFF)                                                  \
  void NAME(const TA *a, const TB *b, int64_t R, int64_t C, int64_t lda, int64_t ldb,   \
            double *aa, double *ad, double *dd) {                                       \
    for (int64_t i = 0; i < R; i++) {                                                   \
      const TA *ar = a + i * lda; const TB *br = b + i * ldb;                          \
      for (int64_t j = 0; j < C; j++) {                                                 \
        double x = s_##LA(ar + j), y = s_##LB(br + j); if (DIFF) y -= x;                \
        aa[j] += x * x; ad[j] += x * y; dd[j] += y * y;                                 \
      }                                                                                 \
    }                                                                                   \
  }

#define BOTH(T, L, TD)                                                                  \
  ROWS(wd_rows_##L, T, L, T, L, 1) COLS(wd_cols_##L, T, L, T, L, 1)                     \
  ROWS(wd_rows_##L##_d, T, L, double, f64, 0) COLS(wd_cols_##L##_d, T, L, double, f64, 0)

/* Projection of each stored row on r directions, float64: P[i][k] += sum_j a[i][j] W[j][k].
   W comes packed as (r8/8, C, 8) (8 directions side by side, zero padded), P is (R, r8).
   Rows go WD_RB at a time through columns in tiles of WD_JT (the tile of W stays in cache,
   each row converted once into float64): 2·WD_RB accumulators of 4 doubles, the two
   vectors of W held in registers (WD_KEEP stops the compiler from re-loading them for
   every multiply-add, which made the loop load-bound), so the loop is FMA-bound. */
typedef double wd_v4 __attribute__((vector_size(32)));
static inline wd_v4 wd_ld4(const double *p) { wd_v4 v; memcpy(&v, p, sizeof v); return v; }
static inline void wd_st4(double *p, wd_v4 v) { memcpy(p, &v, sizeof v); }
#if defined(__x86_64__) && defined(__AVX__)
#define WD_KEEP(v) __asm__("" : "+x"(v))
#else
#define WD_KEEP(v) (void)0
#endif
#define WD_JT 256
#define WD_RB 6
#define WD_RG 36
#define PROJ(NAME, T, L)                                                                  \
  void NAME(const T *a, int64_t R, int64_t C, int64_t lda, const double *w, int64_t r8,  \
            double *p) {                                                                \
    double x[WD_RB][WD_JT], spare[8] = {0};                                             \
    for (int64_t i0 = 0; i0 < R; i0 += WD_RG) {                                         \
      int64_t i1 = i0 + WD_RG < R ? i0 + WD_RG : R;                                     \
      for (int64_t j0 = 0; j0 < C; j0 += WD_JT) {                                       \
        int64_t jn = C - j0 < WD_JT ? C - j0 : WD_JT;                                   \
        for (int64_t i = i0; i < i1; i += WD_RB) {                                      \
          int64_t m = i1 - i < WD_RB ? i1 - i : WD_RB;                                  \
          double *pr[WD_RB];                                                            \
          for (int64_t q = 0; q < WD_RB; q++) {                                         \
            const T *ar = a + (i + q) * lda + j0;                                       \
            if (q < m) { for (int64_t j = 0; j < jn; j++) x[q][j] = s_##L(ar + j); }    \
            else { for (int64_t j = 0; j < jn; j++) x[q][j] = 0.0; }                    \
          }                                                                             \
          for (int64_t kc = 0; kc < r8; kc += 8) {                                      \
            const double *wk = w + kc * C + j0 * 8;                                     \
            for (int64_t q = 0; q < WD_RB; q++) pr[q] = q < m ? p + (i + q) * r8 + kc : spare; \
            wd_v4 c00 = wd_ld4(pr[0]), c01 = wd_ld4(pr[0] + 4);                         \
            wd_v4 c10 = wd_ld4(pr[1]), c11 = wd_ld4(pr[1] + 4);                         \
            wd_v4 c20 = wd_ld4(pr[2]), c21 = wd_ld4(pr[2] + 4);                         \
            wd_v4 c30 = wd_ld4(pr[3]), c31 = wd_ld4(pr[3] + 4);                         \
            wd_v4 c40 = wd_ld4(pr[4]), c41 = wd_ld4(pr[4] + 4);                         \
            wd_v4 c50 = wd_ld4(pr[5]), c51 = wd_ld4(pr[5] + 4);                         \
            for (int64_t j = 0; j < jn; j++) {                                          \
              wd_v4 w0 = wd_ld4(wk + 8 * j), w1 = wd_ld4(wk + 8 * j + 4);               \
              WD_KEEP(w0); WD_KEEP(w1);                                                 \
              double x0 = x[0][j], x1 = x[1][j], x2 = x[2][j];                          \
              double x3 = x[3][j], x4 = x[4][j], x5 = x[5][j];                          \
              c00 += x0 * w0; c01 += x0 * w1; c10 += x1 * w0; c11 += x1 * w1;          \
              c20 += x2 * w0; c21 += x2 * w1; c30 += x3 * w0; c31 += x3 * w1;          \
              c40 += x4 * w0; c41 += x4 * w1; c50 += x5 * w0; c51 += x5 * w1;          \
            }                                                                           \
            wd_st4(pr[0], c00); wd_st4(pr[0] + 4, c01);                                 \
            wd_st4(pr[1], c10); wd_st4(pr[1] + 4, c11);                                 \
            wd_st4(pr[2], c20); wd_st4(pr[2] + 4, c21);                                 \
            wd_st4(pr[3], c30); wd_st4(pr[3] + 4, c31);                                 \
            wd_st4(pr[4], c40); wd_st4(pr[4] + 4, c41);                                 \
            wd_st4(pr[5], c50); wd_st4(pr[5] + 4, c51);                                 \
            for (int64_t t = 0; t < 8; t++) spare[t] = 0.0;                             \
          }                                                                             \
        }                                                                               \
      }                                                                                 \
    }                                                                                   \
  }

BOTH(uint16_t, bf16, 0)
BOTH(float, f32, 0)
BOTH(double, f64, 0)
PROJ(wd_proj_bf16, uint16_t, bf16)
PROJ(wd_proj_f32, float, f32)
PROJ(wd_proj_f64, double, f64)
#if defined(__F16C__)
BOTH(uint16_t, f16, 0)
PROJ(wd_proj_f16, uint16_t, f16)
int wd_has_f16(void) { return 1; }
#endif
int wd_abi(void) { return 2; }
"""
