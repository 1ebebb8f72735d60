/* One weight row times one quantized activation row, per weight format, for one ISA (see _qdot_ops.h).
 *
 * Included by _qdot.c once per ISA with QD_ISA and QD_SFX set; defines qd_rows_<SFX>, which runs output
 * rows [o0, o1) of expert e against activation rows [r0, r0 + nr). Activations arrive quantized per
 * 32-value block (int8 codes, one fp32 scale per block, int32 sums per 16 codes); each block's integer dot
 * product is exact, then scaled in fp32, as llama.cpp does. Formats (qd_fmt in _qdot.c):
 *   I8    moekit int8: int8 codes, one fp32 scale per row
 *   I4    moekit int4: column 2j in the low nibble and 2j+1 in the high one, fp32 scale (and uint8 zero,
 *         else 8) per group of 32/64/128; its activations come with each block's evens first, then odds
 *   Q8_0, Q4_0, Q5_0 (blocks of 32) and Q4_K, Q6_K (super-blocks of 256): GGUF's own bytes, as in ggml.
 */

#define QD_CAT2(a, b) a##_##b
#define QD_CAT(a, b) QD_CAT2(a, b)
#define FN(name) QD_CAT(name, QD_SFX)

static inline float FN(dot_i8)(const uint8_t *w, float sw, const qd_xrow *x, int nb) {
    VF acc = v_zero();
    for (int b = 0; b < nb; b++)
        acc = v_fma1(v_dot_ss(v_load(w + 32 * b), v_load(x->q + 32 * b)), x->d[b], acc);
    return v_hsum(acc) * sw;
}

static inline float FN(dot_i4)(const uint8_t *w, const float *sc, const uint8_t *zp, int gshift, const qd_xrow *x, int nb) {
    VF acc = v_zero();
    float corr = 0.f;
    for (int b = 0; b < nb; b++) {
        int g = b >> gshift;
        float s = sc[g] * x->d[b];
        acc = v_fma1(v_dot_us(v_nibbles(w + 16 * b), v_load(x->q + 32 * b)), s, acc);
        corr += s * (float)(zp ? zp[g] : 8) * (float)(x->s16[2 * b] + x->s16[2 * b + 1]);
    }
    return v_hsum(acc) - corr;
}

static inline float FN(dot_q8_0)(const uint8_t *w, const qd_xrow *x, int nb) {
    VF acc = v_zero();
    for (int b = 0; b < nb; b++, w += 34) {
        uint16_t h; memcpy(&h, w, 2);
        acc = v_fma1(v_dot_ss(v_load(w + 2), v_load(x->q + 32 * b)), qd_half(h) * x->d[b], acc);
    }
    return v_hsum(acc);
}

static inline float FN(dot_q4_0)(const uint8_t *w, const qd_xrow *x, int nb) {
    VF acc = v_zero();
    float corr = 0.f;
    for (int b = 0; b < nb; b++, w += 18) {
        uint16_t h; memcpy(&h, w, 2);
        float s = qd_half(h) * x->d[b];
        acc = v_fma1(v_dot_us(v_nibbles(w + 2), v_load(x->q + 32 * b)), s, acc);
        corr += 8.f * s * (float)(x->s16[2 * b] + x->s16[2 * b + 1]);
    }
    return v_hsum(acc) - corr;
}

static inline float FN(dot_q5_0)(const uint8_t *w, const qd_xrow *x, int nb) {
    VF acc = v_zero();
    float corr = 0.f;
    for (int b = 0; b < nb; b++, w += 22) {
        uint16_t h; uint32_t qh;
        memcpy(&h, w, 2); memcpy(&qh, w + 2, 4);
        float s = qd_half(h) * x->d[b];
        V u = v_or(v_nibbles(w + 6), v_bits32(qh, 0x10));
        acc = v_fma1(v_dot_us(u, v_load(x->q + 32 * b)), s, acc);
        corr += 16.f * s * (float)(x->s16[2 * b] + x->s16[2 * b + 1]);
    }
    return v_hsum(acc) - corr;
}

static inline void qd_scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

static inline float FN(dot_q4_k)(const uint8_t *w, const qd_xrow *x, int nsb) {
    VF acc = v_zero();
    float corr = 0.f;
    for (int sb = 0; sb < nsb; sb++, w += 144) {
        uint16_t h0, h1; memcpy(&h0, w, 2); memcpy(&h1, w + 2, 2);
        float d = qd_half(h0), dmin = qd_half(h1);
        for (int c = 0; c < 4; c++) {
            V v = v_load(w + 16 + 32 * c);
            V part[2] = {v_and(v, 15), v_srl(v, 4)};
            for (int k = 0; k < 2; k++) {
                int sc, m, b = 8 * sb + 2 * c + k;
                qd_scale_min_k4(2 * c + k, w + 4, &sc, &m);
                acc = v_fma1(v_dot_us(part[k], v_load(x->q + 32 * b)), d * (float)sc * x->d[b], acc);
                corr += dmin * (float)m * x->d[b] * (float)(x->s16[2 * b] + x->s16[2 * b + 1]);
            }
        }
    }
    return v_hsum(acc) - corr;
}

static inline float FN(dot_q6_k)(const uint8_t *w, const qd_xrow *x, int nsb) {
    VF acc = v_zero();
    float corr = 0.f;
    for (int sb = 0; sb < nsb; sb++, w += 210) {
        uint16_t h; memcpy(&h, w + 208, 2);
        float d = qd_half(h);
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = w + 64 * half, *qh = w + 128 + 32 * half;
            const int8_t *sc = (const int8_t *)(w + 192) + 8 * half;
            V q1 = v_load(ql), q2 = v_load(ql + 32), hv = v_load(qh);
            V u[4] = {v_or(v_and(q1, 15), v_sll(v_and(hv, 3), 4)), v_or(v_and(q2, 15), v_sll(v_and(v_srl(hv, 2), 3), 4)),
                      v_or(v_srl(q1, 4), v_sll(v_and(v_srl(hv, 4), 3), 4)), v_or(v_srl(q2, 4), v_sll(v_srl(hv, 6), 4))};
            for (int k = 0; k < 4; k++) {
                int b = 8 * sb + 4 * half + k;
                float f = d * x->d[b], lo = f * (float)sc[2 * k], hi = f * (float)sc[2 * k + 1];
                acc = v_fma2(v_dot_us(u[k], v_load(x->q + 32 * b)), lo, hi, acc);
                corr += 32.f * (lo * (float)x->s16[2 * b] + hi * (float)x->s16[2 * b + 1]);
            }
        }
    }
    return v_hsum(acc) - corr;
}

static inline float FN(dot)(const qd_wmat *m, int e, int o, const qd_xrow *x) {
    const uint8_t *row = m->w + (int64_t)e * m->expert_bytes + (int64_t)o * m->row_bytes;
    int nb = m->in / 32;
    switch (m->fmt) {
    case QF_I8: return FN(dot_i8)(row, m->scale[(int64_t)e * m->scale_expert + (int64_t)o * m->scale_row], x, nb);
    case QF_I4: {
        int64_t at = (int64_t)e * m->scale_expert + (int64_t)o * m->scale_row;
        return FN(dot_i4)(row, m->scale + at, m->zero ? m->zero + at : NULL, m->gshift, x, nb);
    }
    case QF_Q8_0: return FN(dot_q8_0)(row, x, nb);
    case QF_Q4_0: return FN(dot_q4_0)(row, x, nb);
    case QF_Q5_0: return FN(dot_q5_0)(row, x, nb);
    case QF_Q4_K: return FN(dot_q4_k)(row, x, nb / 8);
    default: return FN(dot_q6_k)(row, x, nb / 8);
    }
}

void FN(qd_rows)(const qd_wmat *m, int e, int o0, int o1, const qd_xq *xq, int r0, int nr, float *out, int64_t ldo) {
    for (int o = o0; o < o1; o++)
        for (int r = r0; r < r0 + nr; r++) {
            qd_xrow x = qd_row_of(xq, r);
            out[(int64_t)r * ldo + o] = FN(dot)(m, e, o, &x);
        }
}

#undef FN
#undef QD_CAT
#undef QD_CAT2
