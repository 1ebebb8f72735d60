/* The avx2 build of the kernels (gcc on x86-64 only; _qdot.c runs it where the CPU has avx2,fma,f16c). */
#include "_qdot.h"
#ifdef QD_X86
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#define QD_ISA QD_AVX2
#define QD_SFX avx2
#include "_qdot_ops.h"
#include "_qdot_body.h"
#endif
