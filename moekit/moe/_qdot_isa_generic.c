/* The portable build of the kernels: plain C, any CPU (the fallback, and the path tests force). */
#include "_qdot.h"
#define QD_ISA QD_GENERIC
#define QD_SFX generic
#include "_qdot_ops.h"
#include "_qdot_body.h"
