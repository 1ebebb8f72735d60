/* The vnni build of the kernels (gcc on x86-64 only; _qdot.c runs it where the CPU has avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni). */
#include "_qdot.h"
#ifdef QD_X86
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#include <immintrin.h>
#define QD_ISA QD_VNNI
#define QD_SFX vnni
#include "_qdot_ops.h"
#include "_qdot_body.h"
#endif
