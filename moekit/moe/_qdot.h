/* Shared declarations of the integer-dot kernels: weight formats, the weight matrix and activation records.
 *
 * _qdot.c (the Python module: dispatch, threads, activation quantization) and the per-ISA files
 * _qdot_isa_*.c (which include _qdot_ops.h and _qdot_body.h) both include this file.
 */
#ifndef MOEKIT_QDOT_H
#define MOEKIT_QDOT_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#define QD_GENERIC 0
#define QD_AVX2 1
#define QD_AVXVNNI 2
#define QD_VNNI 3

enum qd_fmt { QF_I8 = 0, QF_I4 = 1, QF_Q8_0 = 2, QF_Q4_0 = 3, QF_Q5_0 = 4, QF_Q4_K = 5, QF_Q6_K = 6, QF_Q5_K = 7,
              QF_F32 = 8 /* fp32 rows times fp32 activations (no rounding): the fp32 experts' decode path */ };

typedef struct {            /* E stacked [O, in] weights in one format */
    int fmt, in, out;       /* format, input width (a multiple of 32; 256 for the K formats), output rows */
    const uint8_t *w;       /* codes or GGUF blocks */
    int64_t row_bytes, expert_bytes;
    const float *scale;     /* I8 / I4: per row (I8) or per group (I4), indexed e * scale_expert + o * scale_row */
    int64_t scale_row, scale_expert;
    const uint8_t *zero;    /* I4 with zero points (same indexing as scale), else NULL */
    int gshift;             /* I4: log2(group size / 32) */
} qd_wmat;

typedef struct {            /* N activation rows quantized per 32-value block */
    int8_t *q;              /* [N, in] codes (I4: each block's even columns, then its odd ones) */
    float *d;               /* [N, in / 32] block scales */
    float *ds;              /* [N, in / 32] block scale x the block's code sum (what an offset of 1 in the codes adds) */
    float *ds16;            /* [N, in / 16] the same per 16 codes (Q6_K's half-block scales) */
    const float *xf;        /* F32 weights: the activations themselves, [N, in] (nothing quantized) */
    int in;
} qd_xq;

typedef struct { const int8_t *q; const float *d, *ds, *ds16; } qd_xrow;

static inline qd_xrow qd_row_of(const qd_xq *xq, int r) {
    qd_xrow x = {xq->q + (int64_t)r * xq->in, xq->d + (int64_t)r * (xq->in / 32), xq->ds + (int64_t)r * (xq->in / 32),
                 xq->ds16 + (int64_t)r * (xq->in / 16)};
    return x;
}

typedef void (*qd_rows_fn)(const qd_wmat *m, int e, int o0, int o1, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo);

void qd_rows_generic(const qd_wmat *, int, int, int, const qd_xq *, int, int, float *, int64_t);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QD_X86 1
void qd_rows_avx2(const qd_wmat *, int, int, int, const qd_xq *, int, int, float *, int64_t);
void qd_rows_avxvnni(const qd_wmat *, int, int, int, const qd_xq *, int, int, float *, int64_t);
void qd_rows_vnni(const qd_wmat *, int, int, int, const qd_xq *, int, int, float *, int64_t);
#endif

#endif
