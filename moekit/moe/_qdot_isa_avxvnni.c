/* The avxvnni build of the kernels (gcc on x86-64 only; _qdot.c runs it where the CPU has avx2,fma,f16c,avxvnni). */
#include "_qdot.h"
#ifdef QD_X86
#pragma GCC target("avx2,fma,f16c,avxvnni")
#include <immintrin.h>
#define QD_ISA QD_AVXVNNI
#define QD_SFX avxvnni
#include "_qdot_ops.h"
#include "_qdot_body.h"
#endif
