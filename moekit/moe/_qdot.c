/* moekit.moe._qdot: integer-dot matmuls on quantized weights, for the few rows per expert of decoding.
 *
 * What it holds: the CPU dispatch (the best of the _qdot_isa_*.c builds this CPU runs, or one forced by
 * name), the activation quantization (per 32-value block, to int8, as llama.cpp's q8_0 rows), a small
 * thread pool whose workers sleep on a condition variable after a short spin (no spin-waiting barrier),
 * with tasks taken from a shared counter, so that a worker that lost its core leaves its share to the
 * others, and a per-call measure of cost per weight byte at each thread count that picks the count
 * (explored now and then): decode adapts to another process taking a core. Two entry points:
 *   matmul(wmat, x_ptr, N, groups_ptr, A, out_ptr)      y[rows] = x[rows] @ W_e^T per (e, start, count)
 *       (F32 weights: plain fp32 dot products, the fp32 experts' decode path; every other format rounds x)
 *   moe(act, wmat_in, wmat_out, x_ptr, N, groups_ptr, A, out_ptr)   one MoE layer's active experts:
 *       h = x W_in^T, a = act(h) ("swiglu": silu(gate) * up over [gate | up]; "gelu": erf GELU), y = a W_out^T
 * Pointers are raw addresses of contiguous CPU tensors (moekit/moe/native.py checks them).
 * What it does not hold: formats' layouts (quant_format.py, GGUF), choosing kernels (quantized.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include "_qdot.h"

/* ------------------------------------------------------------------ dispatch */

static const char *isa_names[] = {"generic", "avx2", "avxvnni", "avx512vnni"};
static qd_rows_fn isa_fns[4];
static int isa_ok[4], isa_cur;

static void detect_isa(void) {
    isa_fns[0] = qd_rows_generic; isa_ok[0] = 1;
#ifdef QD_X86
    __builtin_cpu_init();
    isa_fns[1] = qd_rows_avx2; isa_fns[2] = qd_rows_avxvnni; isa_fns[3] = qd_rows_vnni;
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    isa_ok[1] = avx2;
    isa_ok[2] = avx2 && __builtin_cpu_supports("avxvnni");
    isa_ok[3] = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#endif
    for (int i = 3; i >= 0; i--) if (isa_ok[i]) { isa_cur = i; break; }
}

/* ------------------------------------------------------------------ activations */

/* Row x [in] to int8 per 32-value block. perm (moekit int4): each pair of blocks is stored as its 32 even
 * columns then its 32 odd ones (a last odd block as its 16 evens then 16 odds), the nibble order of the codes. */
static void quantize_row(const float *x, int in, int perm, int8_t *q, float *d, float *ds, float *ds16) {
    int nb = in / 32;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float id = amax > 0.f ? 127.f / amax : 0.f;
        d[b] = amax / 127.f;
        int32_t s[2] = {0, 0};
        int pair = perm && (b | 1) < nb, base = pair ? 64 * (b >> 1) : 32 * b, off = pair ? 16 * (b & 1) : 0;
        for (int j = 0; j < 32; j++) {
            int8_t v = (int8_t)lrintf(xb[j] * id);
            s[j >> 4] += v;
            q[perm ? base + (j & 1) * (pair ? 32 : 16) + off + j / 2 : 32 * b + j] = v;
        }
        ds16[2 * b] = d[b] * (float)s[0]; ds16[2 * b + 1] = d[b] * (float)s[1];
        ds[b] = d[b] * (float)(s[0] + s[1]);
    }
}

static int xq_alloc(qd_xq *xq, int n, int in) {
    xq->in = in;
    xq->q = malloc((size_t)n * in + 64);
    xq->d = malloc(sizeof(float) * ((size_t)n * in / 32 + 1));
    xq->ds = malloc(sizeof(float) * ((size_t)n * in / 32 + 1));
    xq->ds16 = malloc(sizeof(float) * ((size_t)n * in / 16 + 1));
    return xq->q && xq->d && xq->ds && xq->ds16;
}

static void xq_free(qd_xq *xq) { free(xq->q); free(xq->d); free(xq->ds); free(xq->ds16); }

static void quantize_rows(const float *x, int n, int64_t ld, const qd_wmat *m, qd_xq *xq) {
    xq->xf = x;  /* (F32 weights read the activations as they are: rows of `in` floats, ld == in) */
    if (m->fmt == QF_F32) return;
    for (int r = 0; r < n; r++)
        quantize_row(x + (int64_t)r * ld, m->in, m->fmt == QF_I4, xq->q + (int64_t)r * m->in, xq->d + (int64_t)r * (m->in / 32),
                     xq->ds + (int64_t)r * (m->in / 32), xq->ds16 + (int64_t)r * (m->in / 16));
}

/* ------------------------------------------------------------------ the thread pool */

static double now_ns(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec * 1e9 + ts.tv_nsec; }

#define QD_MAX_THREADS 64
#define QD_SPIN_NS 300000.0 /* a worker spins this long for the next job, then sleeps: long enough to span the
                              Python between a decode step's calls (waking a sleeping thread costs tens of
                              microseconds on a VM, at every call); when another program wants the core, the
                              engine's ThreadTuner drops to one thread and the workers go to sleep */

typedef struct {            /* one parallel matmul: tasks are (group, chunk of output rows) */
    const qd_wmat *m; const qd_xq *xq; const int64_t *groups; float *out; int64_t ldo;
    int chunk, chunks_per_group, ntasks, nthreads;
    atomic_int next, done;
} qd_job;

static struct {
    pthread_mutex_t mu; pthread_cond_t cv;
    atomic_uint gen; atomic_int sleepers, busy;  /* busy: workers that may hold the current job's pointer */
    _Atomic(qd_job *) job;
    int started, limit;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, 0, 1};

static void run_tasks(qd_job *j) {
    qd_rows_fn rows = isa_fns[isa_cur];
    int t;
    while ((t = atomic_fetch_add(&j->next, 1)) < j->ntasks) {
        const int64_t *g = j->groups + 3 * (t / j->chunks_per_group);
        int o0 = (t % j->chunks_per_group) * j->chunk, o1 = o0 + j->chunk;
        if (o1 > j->m->out) o1 = j->m->out;
        rows(j->m, (int)g[0], o0, o1, j->xq, (int)g[1], (int)g[2], j->out, j->ldo);
        atomic_fetch_add(&j->done, 1);
    }
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&pool.gen);
    for (;;) {
        double until = now_ns() + QD_SPIN_NS;
        for (int spins = 1; atomic_load(&pool.gen) == seen; spins++) {
#ifdef QD_X86
            __builtin_ia32_pause();
#endif
            if ((spins & 63) == 0 && now_ns() > until) break;
        }
        if (atomic_load(&pool.gen) == seen) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = atomic_load(&pool.gen);
        atomic_fetch_add(&pool.busy, 1);
        qd_job *j = atomic_load(&pool.job);
        if (j && id < j->nthreads - 1) run_tasks(j);  /* the calling thread is the job's first thread */
        atomic_fetch_sub(&pool.busy, 1);
    }
    return NULL;
}

static void ensure_workers(int n) {
    while (pool.started < n) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)pool.started) != 0) break;
        pthread_detach(t);
        pool.started++;
    }
}

static void run_job(qd_job *j) {
    if (j->nthreads > 1) {
        ensure_workers(j->nthreads);
        atomic_store(&pool.job, j);
        atomic_fetch_add(&pool.gen, 1);
        if (atomic_load(&pool.sleepers)) { pthread_mutex_lock(&pool.mu); pthread_cond_broadcast(&pool.cv); pthread_mutex_unlock(&pool.mu); }
    }
    run_tasks(j);
    for (long spins = 0; atomic_load(&j->done) < j->ntasks; spins++)
        if (spins > 2000) sched_yield();  /* a worker holds the last task: give the core away, do not burn it */
    atomic_store(&pool.job, NULL);
    while (atomic_load(&pool.busy)) sched_yield();  /* j lives on this stack: no worker may still hold it */
}

/* ------------------------------------------------------------------ adaptive thread count */

static double cost_ewma[48][QD_MAX_THREADS + 1]; /* ns per weight byte, by log2(bytes) bucket and thread count */
static unsigned calls_in[48];


static int pick_threads(int bucket) {
    int limit = pool.limit, best = limit;
    if (limit <= 1) return 1;
    unsigned c = calls_in[bucket]++;
    for (int t = 1; t <= limit; t++) if (cost_ewma[bucket][t] == 0.0) return t; /* each count tried once first */
    if (c % 16 == 15) return 1 + (int)((c / 16) % (unsigned)limit);            /* explore now and then */
    for (int t = limit; t >= 1; t--) if (cost_ewma[bucket][t] < cost_ewma[bucket][best]) best = t;
    return best;
}

static void record_cost(int bucket, int t, double ns, double bytes) {
    double c = ns / (bytes > 1 ? bytes : 1), *e = &cost_ewma[bucket][t];
    *e = *e == 0.0 ? c : 0.75 * *e + 0.25 * c;
}

static int bucket_of(double bytes) { int b = 0; while (bytes > 1.0 && b < 47) { bytes /= 2; b++; } return b; }

static void parallel_rows(const qd_wmat *m, const qd_xq *xq, const int64_t *groups, int A, float *out, int64_t ldo) {
    int64_t active = 0;  /* experts with rows: each one's whole weight is read once */
    for (int a = 0; a < A; a++) active += groups[3 * a + 2] > 0 ? 1 : 0;
    double bytes = (double)active * m->out * m->row_bytes;
    int chunk = (int)(32768 / (m->row_bytes > 0 ? m->row_bytes : 1));
    chunk = chunk < 4 ? 4 : chunk;
    qd_job j = {m, xq, groups, out, ldo, chunk, (m->out + chunk - 1) / chunk, 0, 1};
    j.ntasks = A * j.chunks_per_group;
    atomic_init(&j.next, 0); atomic_init(&j.done, 0);
    int bucket = bucket_of(bytes);
    j.nthreads = pick_threads(bucket);
    if (j.nthreads > j.ntasks) j.nthreads = j.ntasks > 0 ? j.ntasks : 1;
    double t0 = now_ns();
    run_job(&j);
    if (pool.limit > 1) record_cost(bucket, j.nthreads, now_ns() - t0, bytes);
}

/* ------------------------------------------------------------------ Python entry points */

static int parse_wmat(PyObject *t, qd_wmat *m) {
    unsigned long long w, scale, zero;
    if (!PyArg_ParseTuple(t, "iiiKLLKLLKi", &m->fmt, &m->in, &m->out, &w, &m->row_bytes, &m->expert_bytes,
                          &scale, &m->scale_row, &m->scale_expert, &zero, &m->gshift))
        return 0;
    m->w = (const uint8_t *)(uintptr_t)w; m->scale = (const float *)(uintptr_t)scale; m->zero = (const uint8_t *)(uintptr_t)zero;
    if (m->fmt < QF_I8 || m->fmt > QF_F32 || (m->fmt != QF_F32 && m->in % (m->fmt >= QF_Q4_K ? 256 : 32))) {
        PyErr_Format(PyExc_ValueError, "weight format %d with input width %d is not one the kernels run", m->fmt, m->in);
        return 0;
    }
    return 1;
}

static double kernel_ns; static long long kernel_calls;  /* time inside matmul / moe calls (GIL released) */

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    PyObject *wt; qd_wmat m; unsigned long long x, groups, out; int n, A;
    if (!PyArg_ParseTuple(args, "OKiKiK", &wt, &x, &n, &groups, &A, &out) || !parse_wmat(wt, &m)) return NULL;
    qd_xq xq;
    if (!xq_alloc(&xq, n, m.in)) { xq_free(&xq); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    double t0 = now_ns();
    quantize_rows((const float *)(uintptr_t)x, n, m.in, &m, &xq);
    parallel_rows(&m, &xq, (const int64_t *)(uintptr_t)groups, A, (float *)(uintptr_t)out, m.out);
    kernel_ns += now_ns() - t0; kernel_calls++;
    Py_END_ALLOW_THREADS
    xq_free(&xq);
    Py_RETURN_NONE;
}

static void activate(const char *act, const float *h, int n, int F, float *a) {
    int glu = strcmp(act, "swiglu") == 0;
    for (int r = 0; r < n; r++) {
        const float *hr = h + (int64_t)r * (glu ? 2 * F : F);
        float *ar = a + (int64_t)r * F;
        for (int f = 0; f < F; f++) {
            float g = hr[f];
            ar[f] = glu ? g / (1.f + expf(-g)) * hr[F + f] : 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
        }
    }
}

static PyObject *py_moe(PyObject *self, PyObject *args) {
    const char *act; PyObject *wi, *wo; qd_wmat mi, mo; unsigned long long x, groups, out; int n, A;
    if (!PyArg_ParseTuple(args, "sOOKiKiK", &act, &wi, &wo, &x, &n, &groups, &A, &out) || !parse_wmat(wi, &mi) || !parse_wmat(wo, &mo))
        return NULL;
    int glu = strcmp(act, "swiglu") == 0, F = mo.in;
    if ((!glu && strcmp(act, "gelu")) || mi.out != (glu ? 2 * F : F) || mo.out != mi.in) {
        PyErr_Format(PyExc_ValueError, "moe: activation %s with w_in [%d, %d] and w_out [%d, %d] do not fit", act, mi.out, mi.in, mo.out, mo.in);
        return NULL;
    }
    qd_xq xq, aq;
    float *h = malloc(sizeof(float) * ((size_t)n * mi.out + 1)), *a = malloc(sizeof(float) * ((size_t)n * F + 1));
    int ok = xq_alloc(&xq, n, mi.in) & xq_alloc(&aq, n, F) && h && a;
    if (ok) {
        const int64_t *g = (const int64_t *)(uintptr_t)groups;
        Py_BEGIN_ALLOW_THREADS
        double t0 = now_ns();
        quantize_rows((const float *)(uintptr_t)x, n, mi.in, &mi, &xq);
        parallel_rows(&mi, &xq, g, A, h, mi.out);
        activate(act, h, n, F, a);
        quantize_rows(a, n, F, &mo, &aq);
        parallel_rows(&mo, &aq, g, A, (float *)(uintptr_t)out, mo.out);
        kernel_ns += now_ns() - t0; kernel_calls++;
        Py_END_ALLOW_THREADS
    }
    xq_free(&xq); xq_free(&aq); free(h); free(a);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(isa_names[isa_cur]); }

static PyObject *py_supported(PyObject *self, PyObject *args) {
    PyObject *out = PyList_New(0);
    for (int i = 0; i < 4; i++) if (isa_ok[i]) { PyObject *s = PyUnicode_FromString(isa_names[i]); PyList_Append(out, s); Py_DECREF(s); }
    return out;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int i = 0; i < 4; i++)
        if (strcmp(name, isa_names[i]) == 0) {
            if (!isa_ok[i]) { PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels", name); return NULL; }
            isa_cur = i;
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "unknown instruction set %s", name);
    return NULL;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    n = n < 1 ? 1 : n > QD_MAX_THREADS ? QD_MAX_THREADS : n;
    pool.limit = n;  /* (the measured costs are per thread count: they stay valid when the limit moves) */
    Py_RETURN_NONE;
}

static PyObject *py_kernel_time(PyObject *self, PyObject *args) {  /* (calls, seconds) inside the kernels so far */
    return Py_BuildValue("(Ld)", kernel_calls, kernel_ns / 1e9);
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "matmul(wmat, x_ptr, N, groups_ptr, A, out_ptr)"},
    {"moe", py_moe, METH_VARARGS, "moe(act, wmat_in, wmat_out, x_ptr, N, groups_ptr, A, out_ptr)"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels run"},
    {"supported", py_supported, METH_NOARGS, "the instruction sets this CPU runs"},
    {"set_isa", py_set_isa, METH_VARARGS, "force an instruction set (tests force 'generic')"},
    {"set_threads", py_set_threads, METH_VARARGS, "the most threads a call may use"},
    {"kernel_time", py_kernel_time, METH_NOARGS, "(calls, seconds) spent inside matmul and moe calls since import"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qdot", "moekit's integer-dot quantized kernels", -1, methods};

PyMODINIT_FUNC PyInit__qdot(void) {
    detect_isa();
    return PyModule_Create(&module);
}
