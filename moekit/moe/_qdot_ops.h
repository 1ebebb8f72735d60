/* The handful of 32-byte vector operations the integer-dot kernels are written in, for one ISA.
 *
 * Included by one _qdot_isa_*.c file per instruction set, with QD_ISA set to QD_GENERIC, QD_AVX2, QD_AVXVNNI
 * or QD_VNNI.
 * V: 32 bytes (codes or int8 activations); VI: 8 int32 lanes; VF: 8 float lanes.
 * QD_GENERIC is plain C on small arrays (any CPU, any compiler); QD_AVX2 uses maddubs/madd for the
 * unsigned x signed byte dot product; QD_VNNI the same with one vpdpbusd (AVX-512 VL + VNNI, 256-bit),
 * QD_AVXVNNI with its VEX form (AVX-VNNI CPUs without AVX-512).
 * Every kernel calls only these, so the three builds compute the same integer sums exactly.
 */

#if QD_ISA == QD_GENERIC

typedef struct { uint8_t b[32]; } V;
typedef struct { int32_t i[8]; } VI;
typedef struct { float f[8]; } VF;

static inline V v_load(const void *p) { V v; memcpy(v.b, p, 32); return v; }
static inline V v_nibbles(const uint8_t *p16) {  /* [low nibbles of 16 bytes | high nibbles] */
    V v; for (int j = 0; j < 16; j++) { v.b[j] = p16[j] & 15; v.b[j + 16] = p16[j] >> 4; } return v;
}
static inline V v_and(V a, uint8_t c) { for (int j = 0; j < 32; j++) a.b[j] &= c; return a; }
static inline V v_or(V a, V b) { for (int j = 0; j < 32; j++) a.b[j] |= b.b[j]; return a; }
static inline V v_srl(V a, int n) { for (int j = 0; j < 32; j++) a.b[j] >>= n; return a; }
static inline V v_sll(V a, int n) { for (int j = 0; j < 32; j++) a.b[j] = (uint8_t)(a.b[j] << n); return a; }
static inline V v_bits32(uint32_t bits, uint8_t value) {  /* byte j = value where bit j is set, else 0 */
    V v; for (int j = 0; j < 32; j++) v.b[j] = (bits >> j) & 1 ? value : 0; return v;
}
static inline VI v_dot_us(V u, V s) {  /* lane k = sum of 4 products u * (int8)s */
    VI r; for (int k = 0; k < 8; k++) { int32_t acc = 0;
        for (int j = 4 * k; j < 4 * k + 4; j++) acc += (int32_t)u.b[j] * (int8_t)s.b[j]; r.i[k] = acc; } return r;
}
static inline VI v_dot_us2(V u1, V s1, V u2, V s2) {  /* v_dot_us(u1, s1) + v_dot_us(u2, s2) */
    VI a = v_dot_us(u1, s1), b = v_dot_us(u2, s2);
    for (int k = 0; k < 8; k++) a.i[k] += b.i[k];
    return a;
}
static inline VI v_dot_ss(V w, V s) {
    VI r; for (int k = 0; k < 8; k++) { int32_t acc = 0;
        for (int j = 4 * k; j < 4 * k + 4; j++) acc += (int32_t)(int8_t)w.b[j] * (int8_t)s.b[j]; r.i[k] = acc; } return r;
}
static inline VF v_zero(void) { VF r; for (int k = 0; k < 8; k++) r.f[k] = 0.f; return r; }
static inline VF v_fma1(VI a, float s, VF acc) { for (int k = 0; k < 8; k++) acc.f[k] += (float)a.i[k] * s; return acc; }
static inline VF v_fma2(VI a, float lo, float hi, VF acc) {  /* lanes 0-3 scaled by lo, 4-7 by hi */
    for (int k = 0; k < 8; k++) acc.f[k] += (float)a.i[k] * (k < 4 ? lo : hi); return acc;
}
static inline float v_hsum(VF a) { float s = 0.f; for (int k = 0; k < 8; k++) s += a.f[k]; return s; }
static inline VF v_loadf(const float *p) { VF r; memcpy(r.f, p, 32); return r; }
static inline VF v_fmaf(VF a, VF b, VF acc) { for (int k = 0; k < 8; k++) acc.f[k] += a.f[k] * b.f[k]; return acc; }
static inline float qd_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { float f = ldexpf((float)man, -24); memcpy(&bits, &f, 4); bits |= sign; }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
}

#else  /* x86 vector builds */

typedef __m256i V;
typedef __m256i VI;
typedef __m256 VF;

static inline V v_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline V v_nibbles(const uint8_t *p16) {
    __m128i b = _mm_loadu_si128((const __m128i *)p16), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}
static inline V v_and(V a, uint8_t c) { return _mm256_and_si256(a, _mm256_set1_epi8((char)c)); }
static inline V v_or(V a, V b) { return _mm256_or_si256(a, b); }
static inline V v_srl(V a, int n) { return _mm256_and_si256(_mm256_srli_epi16(a, n), _mm256_set1_epi8((char)(0xff >> n))); }
static inline V v_sll(V a, int n) { return _mm256_and_si256(_mm256_slli_epi16(a, n), _mm256_set1_epi8((char)(0xff << n))); }
static inline V v_bits32(uint32_t bits, uint8_t value) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));  /* all ones where the byte's bit is set */
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8((char)value));
}
#if QD_ISA == QD_VNNI
static inline VI v_dot_us(V u, V s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
static inline VI v_dot_us2(V u1, V s1, V u2, V s2) { return _mm256_dpbusd_epi32(v_dot_us(u1, s1), u2, s2); }
#elif QD_ISA == QD_AVXVNNI
static inline VI v_dot_us(V u, V s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
static inline VI v_dot_us2(V u1, V s1, V u2, V s2) { return _mm256_dpbusd_avx_epi32(v_dot_us(u1, s1), u2, s2); }
#else
static inline VI v_dot_us(V u, V s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
static inline VI v_dot_us2(V u1, V s1, V u2, V s2) {  /* codes <= 15: two maddubs sums fit int16 (4 x 15 x 128) */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2)), _mm256_set1_epi16(1));
}
#endif
static inline VI v_dot_ss(V w, V s) { return v_dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w)); }
static inline VF v_zero(void) { return _mm256_setzero_ps(); }
static inline VF v_fma1(VI a, float s, VF acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s), acc); }
static inline VF v_fma2(VI a, float lo, float hi, VF acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo)), acc);
}
static inline float v_hsum(VF a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float qd_half(uint16_t h) { return _cvtsh_ss(h); }
static inline VF v_loadf(const float *p) { return _mm256_loadu_ps(p); }
static inline VF v_fmaf(VF a, VF b, VF acc) { return _mm256_fmadd_ps(a, b, acc); }

#endif
