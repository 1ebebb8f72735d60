/* Weight rows times quantized activation rows, per weight format, for one ISA (see _qdot_ops.h).
 *
 * Included by each _qdot_isa_*.c with QD_ISA and QD_SFX set; defines qd_rows_<SFX>, which runs output
 * rows [o0, o1) of expert e against activation rows [r0, r0 + nr). Activations arrive quantized per
 * 32-value block (int8 codes, one fp32 scale per block); each block's integer dot
 * product is exact, then scaled in fp32, as llama.cpp does (the activations' block scale times code sum, per
 * 32 and per 16 codes, comes precomputed for the unsigned formats' offset).
 *
 * The 32-value formats are read through one block decoder, `blk_<fmt>(row, b)`, which gives block b's 32 codes
 * (signed for I8 / Q8_0, else unsigned), their scale and the constant the unsigned codes' offset costs per
 * unit of activation sum (zero point x scale). One
 * loop template runs a decoder: four activation rows share each decoded block (prefill), a single row
 * keeps two accumulators (decode). The K formats go a super-block (256 weights) at a time, its scales decoded
 * once (QD_K_KERNEL); moekit int4 two blocks at a time (rows_i4). Formats (qd_fmt in _qdot.h):
 *   I8    moekit int8: int8 codes, one fp32 scale per row
 *   I4    moekit int4: column 2j in the low nibble and 2j+1 in the high one, fp32 scale (and uint8 zero,
 *         else 8) per group of 32/64/128; read two blocks a step (rows_i4), its activations permuted to match
 *   Q8_0, Q4_0, Q5_0 (blocks of 32) and Q4_K, Q5_K, Q6_K (super-blocks of 256): GGUF's own bytes, as in ggml.
 *   F32   plain fp32 rows times the fp32 activations (dot_f32; nothing is rounded).
 */

#define QD_CAT2(a, b) a##_##b
#define QD_CAT(a, b) QD_CAT2(a, b)
#define FN(name) QD_CAT(name, QD_SFX)

typedef struct { V u; float sw, c; } qd_blk;  /* one decoded block of 32 weights: codes, scale, offset cost */
typedef struct { const uint8_t *row; const float *sc; const uint8_t *zp; int gshift; float sw; } qd_wrow;

static inline qd_blk qd_blk_of(V u, float sw, float c) { qd_blk k = {u, sw, c}; return k; }

static inline qd_blk FN(blk_i8)(const qd_wrow *w, int b) { return qd_blk_of(v_load(w->row + 32 * b), w->sw, 0.f); }

static inline qd_blk FN(blk_i4)(const qd_wrow *w, int b) {
    int g = b >> w->gshift;
    float s = w->sc[g];
    return qd_blk_of(v_nibbles(w->row + 16 * b), s, s * (float)(w->zp ? w->zp[g] : 8));
}

static inline qd_blk FN(blk_q8_0)(const qd_wrow *w, int b) {
    const uint8_t *blk = w->row + 34 * b;
    uint16_t h; memcpy(&h, blk, 2);
    return qd_blk_of(v_load(blk + 2), qd_half(h), 0.f);
}

static inline qd_blk FN(blk_q4_0)(const qd_wrow *w, int b) {
    const uint8_t *blk = w->row + 18 * b;
    uint16_t h; memcpy(&h, blk, 2);
    float d = qd_half(h);
    return qd_blk_of(v_nibbles(blk + 2), d, 8.f * d);
}

static inline qd_blk FN(blk_q5_0)(const qd_wrow *w, int b) {
    const uint8_t *blk = w->row + 22 * b;
    uint16_t h; uint32_t qh;
    memcpy(&h, blk, 2); memcpy(&qh, blk + 2, 4);
    float d = qd_half(h);
    return qd_blk_of(v_or(v_nibbles(blk + 6), v_bits32(qh, 0x10)), d, 16.f * d);
}

static inline void qd_scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* acc += this block's scaled dot product with activation row x; corr += what the codes' offset added */
#define QD_ACC(k, x, b, acc, corr, SIGNED) {                                                      \
        V xv_ = v_load((x).q + 32 * (b));                                                        \
        acc = v_fma1(SIGNED ? v_dot_ss((k).u, xv_) : v_dot_us((k).u, xv_), (x).d[b] * (k).sw, acc); \
        if (!SIGNED) corr += (k).c * (x).ds[b]; }

#define QD_ROWS_KERNEL(NAME, DECODE, SIGNED)                                               \
static void FN(NAME)(const qd_wrow *w, int nb, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo, int o) { \
    int r = r0;                                                                                  \
    for (; r + 4 <= r0 + nr; r += 4) {  /* four activation rows share each decoded block */      \
        VF acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()};                                    \
        float corr[4] = {0.f, 0.f, 0.f, 0.f};                                                    \
        qd_xrow x[4] = {qd_row_of(xq, r), qd_row_of(xq, r + 1), qd_row_of(xq, r + 2), qd_row_of(xq, r + 3)}; \
        for (int b = 0; b < nb; b++) {                                                           \
            qd_blk k = DECODE(w, b);                                                             \
            for (int i = 0; i < 4; i++) QD_ACC(k, x[i], b, acc[i], corr[i], SIGNED)       \
        }                                                                                        \
        for (int i = 0; i < 4; i++) out[(int64_t)(r + i) * ldo + o] = v_hsum(acc[i]) - corr[i];  \
    }                                                                                            \
    for (; r < r0 + nr; r++) {  /* one row: two accumulators (even and odd blocks), two chains, not one */ \
        VF a0 = v_zero(), a1 = v_zero();                                                         \
        float c0 = 0.f, c1 = 0.f;                                                                \
        qd_xrow x = qd_row_of(xq, r);                                                            \
        int b = 0;                                                                               \
        for (; b + 1 < nb; b += 2) {                                                             \
            qd_blk k0 = DECODE(w, b), k1 = DECODE(w, b + 1);                                     \
            QD_ACC(k0, x, b, a0, c0, SIGNED)                                              \
            QD_ACC(k1, x, b + 1, a1, c1, SIGNED)                                          \
        }                                                                                        \
        if (b < nb) { qd_blk k0 = DECODE(w, b); QD_ACC(k0, x, b, a0, c0, SIGNED) }         \
        out[(int64_t)r * ldo + o] = v_hsum(a0) + v_hsum(a1) - c0 - c1;                           \
    }                                                                                            \
}

/* moekit int4 reads two blocks (32 bytes) a step: low nibbles are block 2p's and 2p+1's even columns, high
 * nibbles their odd ones, so its activations come pair by pair as [32 evens | 32 odds] (a last odd block as
 * [16 evens | 16 odds]); one pair of dot products fills lanes 0-3 with block 2p and 4-7 with block 2p+1. */
#define I4_PAIR(w, x, p, acc, corr) {                                                             \
        V v_ = v_load((w)->row + 32 * (p));                                                      \
        int b_ = 2 * (p), g0_ = b_ >> (w)->gshift, g1_ = (b_ + 1) >> (w)->gshift;                \
        float s0_ = (w)->sc[g0_], s1_ = (w)->sc[g1_];                                            \
        VI p_ = v_dot_us2(v_and(v_, 15), v_load((x).q + 64 * (p)), v_srl(v_, 4), v_load((x).q + 64 * (p) + 32)); \
        acc = v_fma2(p_, (x).d[b_] * s0_, (x).d[b_ + 1] * s1_, acc);                             \
        corr += s0_ * (float)((w)->zp ? (w)->zp[g0_] : 8) * (x).ds[b_]                           \
              + s1_ * (float)((w)->zp ? (w)->zp[g1_] : 8) * (x).ds[b_ + 1]; }

static void FN(rows_i4)(const qd_wrow *w, int nb, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo, int o) {
    int np = nb / 2, r = r0;
    for (; r + 4 <= r0 + nr; r += 4) {  /* four activation rows share each pair of decoded blocks */
        VF acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()};
        float corr[4] = {0.f, 0.f, 0.f, 0.f};
        qd_xrow x[4] = {qd_row_of(xq, r), qd_row_of(xq, r + 1), qd_row_of(xq, r + 2), qd_row_of(xq, r + 3)};
        for (int p = 0; p < np; p++)
            for (int i = 0; i < 4; i++) I4_PAIR(w, x[i], p, acc[i], corr[i])
        if (nb & 1) { qd_blk k = FN(blk_i4)(w, nb - 1); for (int i = 0; i < 4; i++) QD_ACC(k, x[i], nb - 1, acc[i], corr[i], 0) }
        for (int i = 0; i < 4; i++) out[(int64_t)(r + i) * ldo + o] = v_hsum(acc[i]) - corr[i];
    }
    for (; r < r0 + nr; r++) {
        VF a0 = v_zero(), a1 = v_zero();
        float c0 = 0.f, c1 = 0.f;
        qd_xrow x = qd_row_of(xq, r);
        int p = 0;
        for (; p + 1 < np; p += 2) { I4_PAIR(w, x, p, a0, c0) I4_PAIR(w, x, p + 1, a1, c1) }
        if (p < np) I4_PAIR(w, x, p, a0, c0)
        if (nb & 1) { qd_blk k = FN(blk_i4)(w, nb - 1); QD_ACC(k, x, nb - 1, a1, c1, 0) }
        out[(int64_t)r * ldo + o] = v_hsum(a0) + v_hsum(a1) - c0 - c1;
    }
}

/* The K formats a super-block (256 weights) a step: its scales and mins decoded once, shared by the rows;
 * two accumulators (a sub-block pair's low and high nibbles) so no one chain of multiply-adds bounds it. */
typedef struct { float d[8], m[8]; } qd_ksc;

static inline void FN(k_scales)(const uint8_t *blk, qd_ksc *k) {  /* Q4_K / Q5_K: d x scale_j, dmin x min_j */
    uint16_t h0, h1; memcpy(&h0, blk, 2); memcpy(&h1, blk + 2, 2);
    float d = qd_half(h0), dmin = qd_half(h1);
    for (int j = 0; j < 8; j++) { int sc, m; qd_scale_min_k4(j, blk + 4, &sc, &m); k->d[j] = d * (float)sc; k->m[j] = dmin * (float)m; }
}

#define QK_PAIR(lo, hi, x, b, k, c, acc0, acc1, corr) {                                           \
        acc0 = v_fma1(v_dot_us(lo, v_load((x).q + 32 * (b))), (x).d[b] * (k).d[2 * (c)], acc0);     \
        acc1 = v_fma1(v_dot_us(hi, v_load((x).q + 32 * ((b) + 1))), (x).d[(b) + 1] * (k).d[2 * (c) + 1], acc1); \
        corr += (k).m[2 * (c)] * (x).ds[b] + (k).m[2 * (c) + 1] * (x).ds[(b) + 1]; }

static inline void FN(sb_q4_k)(const uint8_t *blk, const qd_ksc *k, const qd_xrow *x, int sb, VF *a0, VF *a1, float *corr) {
    for (int c = 0; c < 4; c++) {
        V v = v_load(blk + 16 + 32 * c);
        QK_PAIR(v_and(v, 15), v_srl(v, 4), *x, 8 * sb + 2 * c, *k, c, *a0, *a1, *corr)
    }
}

static inline void FN(sb_q5_k)(const uint8_t *blk, const qd_ksc *k, const qd_xrow *x, int sb, VF *a0, VF *a1, float *corr) {
    V qh = v_load(blk + 16);
    for (int c = 0; c < 4; c++) {
        V v = v_load(blk + 48 + 32 * c);
        V lo = v_or(v_and(v, 15), v_sll(v_and(v_srl(qh, 2 * c), 1), 4));
        V hi = v_or(v_srl(v, 4), v_sll(v_and(v_srl(qh, 2 * c + 1), 1), 4));
        QK_PAIR(lo, hi, *x, 8 * sb + 2 * c, *k, c, *a0, *a1, *corr)
    }
}

static inline void FN(sb_q6_k)(const uint8_t *blk, const qd_ksc *unused, const qd_xrow *x, int sb, VF *a0, VF *a1, float *corr) {
    uint16_t h; memcpy(&h, blk + 208, 2);
    float d = qd_half(h);
    (void)unused;
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = blk + 64 * half;
        const int8_t *sc = (const int8_t *)(blk + 192) + 8 * half;
        V q1 = v_load(ql), q2 = v_load(ql + 32), hv = v_load(blk + 128 + 32 * half);
        V u[4] = {v_or(v_and(q1, 15), v_sll(v_and(hv, 3), 4)), v_or(v_and(q2, 15), v_sll(v_and(v_srl(hv, 2), 3), 4)),
                  v_or(v_srl(q1, 4), v_sll(v_and(v_srl(hv, 4), 3), 4)), v_or(v_srl(q2, 4), v_sll(v_srl(hv, 6), 4))};
        for (int k = 0; k < 4; k++) {
            int b = 8 * sb + 4 * half + k;
            float f = d * x->d[b], lo = f * (float)sc[2 * k], hi = f * (float)sc[2 * k + 1];
            VF *acc = k & 1 ? a1 : a0;
            *acc = v_fma2(v_dot_us(u[k], v_load(x->q + 32 * b)), lo, hi, *acc);
            *corr += 32.f * d * ((float)sc[2 * k] * x->ds16[2 * b] + (float)sc[2 * k + 1] * x->ds16[2 * b + 1]);
        }
    }
}

#define QD_K_KERNEL(NAME, SB, SIZE, SCALES)                                                       \
static void FN(NAME)(const qd_wrow *w, int nb, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo, int o) { \
    int nsb = nb / 8;                                                                            \
    for (int r = r0; r < r0 + nr; r += 4) {  /* up to four activation rows share each super-block's scales */ \
        int n = r0 + nr - r < 4 ? r0 + nr - r : 4;                                                \
        VF a0[4], a1[4];                                                                         \
        float corr[4] = {0.f, 0.f, 0.f, 0.f};                                                    \
        qd_xrow x[4];                                                                            \
        for (int i = 0; i < n; i++) { a0[i] = v_zero(); a1[i] = v_zero(); x[i] = qd_row_of(xq, r + i); } \
        for (int sb = 0; sb < nsb; sb++) {                                                       \
            const uint8_t *blk = w->row + (SIZE) * sb;                                           \
            qd_ksc k;                                                                            \
            if (SCALES) FN(k_scales)(blk, &k);                                                   \
            for (int i = 0; i < n; i++) SB(blk, &k, &x[i], sb, &a0[i], &a1[i], &corr[i]);        \
        }                                                                                        \
        for (int i = 0; i < n; i++) out[(int64_t)(r + i) * ldo + o] = v_hsum(a0[i]) + v_hsum(a1[i]) - corr[i]; \
    }                                                                                            \
}

QD_K_KERNEL(rows_q4_k, FN(sb_q4_k), 144, 1)
QD_K_KERNEL(rows_q5_k, FN(sb_q5_k), 176, 1)
QD_K_KERNEL(rows_q6_k, FN(sb_q6_k), 210, 0)

QD_ROWS_KERNEL(rows_i8, FN(blk_i8), 1)
QD_ROWS_KERNEL(rows_q8_0, FN(blk_q8_0), 1)
QD_ROWS_KERNEL(rows_q4_0, FN(blk_q4_0), 0)
QD_ROWS_KERNEL(rows_q5_0, FN(blk_q5_0), 0)


static inline float FN(dot_f32)(const float *w, const float *x, int n) {  /* four chains of 8-float FMAs */
    VF a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = v_fmaf(v_loadf(w + i), v_loadf(x + i), a0);
        a1 = v_fmaf(v_loadf(w + i + 8), v_loadf(x + i + 8), a1);
        a2 = v_fmaf(v_loadf(w + i + 16), v_loadf(x + i + 16), a2);
        a3 = v_fmaf(v_loadf(w + i + 24), v_loadf(x + i + 24), a3);
    }
    float s = v_hsum(a0) + v_hsum(a1) + v_hsum(a2) + v_hsum(a3);
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

void FN(qd_rows)(const qd_wmat *m, int e, int o0, int o1, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo) {
    int nb = m->in / 32;
    if (m->fmt == QF_F32) {
        for (int o = o0; o < o1; o++) {
            const float *row = (const float *)(m->w + (int64_t)e * m->expert_bytes + (int64_t)o * m->row_bytes);
            for (int r = r0; r < r0 + nr; r++) out[(int64_t)r * ldo + o] = FN(dot_f32)(row, xq->xf + (int64_t)r * m->in, m->in);
        }
        return;
    }
    for (int o = o0; o < o1; o++) {
        int64_t at = (int64_t)e * m->scale_expert + (int64_t)o * m->scale_row;
        qd_wrow w = {m->w + (int64_t)e * m->expert_bytes + (int64_t)o * m->row_bytes, m->scale ? m->scale + at : NULL,
                     m->zero ? m->zero + at : NULL, m->gshift, m->fmt == QF_I8 ? m->scale[at] : 0.f};
        switch (m->fmt) {
        case QF_I8: FN(rows_i8)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_I4: FN(rows_i4)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_Q8_0: FN(rows_q8_0)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_Q4_0: FN(rows_q4_0)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_Q5_0: FN(rows_q5_0)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_Q4_K: FN(rows_q4_k)(&w, nb, xq, r0, nr, out, ldo, o); break;
        case QF_Q5_K: FN(rows_q5_k)(&w, nb, xq, r0, nr, out, ldo, o); break;
        default: FN(rows_q6_k)(&w, nb, xq, r0, nr, out, ldo, o); break;
        }
    }
}

#undef QD_ACC
#undef QK_PAIR
#undef QD_K_KERNEL
#undef I4_PAIR
#undef QD_ROWS_KERNEL
#undef FN
#undef QD_CAT
#undef QD_CAT2
