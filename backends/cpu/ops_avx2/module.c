/* Python glue of backends.cpu._ops_avx2 (CPython C API, buffer protocol, no numpy headers).
 *
 * Compiled for the baseline instruction set: importing the module and calling
 * have_avx2() is safe on any CPU; every other function refuses to run without AVX2.
 * Each kernel call releases the GIL for its whole computation.
 *
 *   have_avx2() -> bool               CPU (and OS) support AVX2, FMA and F16C
 *   use_vnni(on) -> bool              the int8 kernels on AVX512-VNNI where the CPU has it (default on)
 *   set_spin_us(us)                   how long idle pool workers spin before sleeping
 *   park()                            idle pool workers sleep now (before OpenBLAS takes the cores)
 *   matrix(parts, k) -> capsule       parts: [(buffer, ggml_type, rows, x8)], each (rows, k) in x8 blocks
 *   x8_bytes / repack_x8              the 8-row interleaved layout every block type is read in (x8.h)
 *   release_pages(buffer)             drop a read-only file mapping's pages from the resident set
 *   dequantize_ids(matrix, ids, out)  rows by index (embedding lookups through the output head)
 *   matmul(x, matrix, out, threads)   out[:, :rows] = x @ W.T, x (n, k) float32, out (n, >= rows)
 *     [, next, prefetch_bytes]        then an idle pool worker reads up to prefetch_bytes of the matrix
 *                                     `next` toward the caches until the next task (threadpool.c)
 *   matmul_f32(x, w, out, threads)    out = x @ w in float32, batch-invariant (fmatmul.c); w (k, n)
 *                                     the transposed view of an (n, k) array, or with contiguous rows
 *   dequantize(matrix, row0, row1, out, threads)   out[:(row1-row0)*k] = W[row0:row1] as float32
 *   quantize_q8_0(x, out, threads)    float32 (n,) -> Q8_0 blocks (n / 32 * 34 bytes)
 *   quantize_act(x, q, d, s, isum, threads, per=32)   the activation quantization matmul applies
 *                                             (per: weights a scale, 32 or 256: quantized.py's
 *                                             activation_block)
 *   rms_norm(x, w, eps, out)          decoder-layer ops (ops.c); out is a new C-contiguous array
 *   rope(x, cos, sin, positions, neox, out)
 *   silu_mul(gate_up, out, threads)
 *   logsumexp(x) -> tuple           log(sum(exp(row))) of each row, in double (sampling's logprobs)
 *   attention(q, k, v, positions, out, threads)
 *   decode_attention(q, k, v, lengths, out, threads[, table])   B sequences, one query each;
 *                                     with a block table, k/v are a layer of the paged arena
 *   decode_layer(x, ...)              one llama-block layer for one token, the ops above fused
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "ops_avx2.h"

#if defined(__x86_64__) || defined(_M_X64)
#define OPS_X86 1
#else
#define OPS_X86 0
#endif

int ops_cpu_has_avx2(void)
{
#if OPS_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int ops_cpu_has_vnni(void)
{
#if OPS_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    return ops_cpu_has_avx2() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

int ops_part_supported(int qtype)
{
    return qformat(qtype) != NULL;
}

int64_t ops_row_bytes(int qtype, int64_t k)
{
    const QFormat *f = qformat(qtype);
    return f && k % f->block == 0 ? k / f->block * f->size : -1;
}

static int g_have_avx2 = -1;

static int require_avx2(void)
{
    if (g_have_avx2 < 0)
        g_have_avx2 = ops_cpu_has_avx2();
    if (!g_have_avx2) {
        PyErr_SetString(PyExc_RuntimeError, "ops_avx2: this CPU lacks AVX2/FMA/F16C");
        return 0;
    }
    return 1;
}

/* ---- the weight matrix capsule: a QMatrix plus the buffers it points into ---- */

typedef struct {
    QMatrix m;
    Py_buffer views[8];
    int nviews;
} MatrixObj;

static const char *MATRIX_NAME = "ops_avx2.QMatrix";

static void matrix_free(PyObject *capsule)
{
    MatrixObj *obj = (MatrixObj *)PyCapsule_GetPointer(capsule, MATRIX_NAME);
    if (!obj)
        return;
    for (int i = 0; i < obj->nviews; i++)
        PyBuffer_Release(&obj->views[i]);
    free(obj);
}

static PyObject *py_matrix(PyObject *self, PyObject *args)
{
    PyObject *parts;
    long long k;
    if (!PyArg_ParseTuple(args, "OL", &parts, &k))
        return NULL;
    PyObject *seq = PySequence_Fast(parts, "parts must be a sequence of (buffer, type, rows)");
    if (!seq)
        return NULL;
    const Py_ssize_t np = PySequence_Fast_GET_SIZE(seq);
    if (np < 1 || np > 8) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "a matrix has 1..8 parts, got %zd", np);
        return NULL;
    }
    MatrixObj *obj = calloc(1, sizeof(MatrixObj));
    if (!obj) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    obj->m.k = k;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *buf;
        int qtype, x8 = 0;
        long long rows;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OiL|p", &buf, &qtype, &rows, &x8))
            goto fail;
        const int64_t rb = ops_row_bytes(qtype, k);
        /* every block type has its kernels in the x8 layout only */
        if (!ops_part_supported(qtype) || rb < 0 || rows < 1 || !x8) {
            PyErr_Format(PyExc_ValueError, "part %zd: type %d%s with %lld rows of %lld weights has no kernel",
                         i, qtype, x8 ? " (x8)" : "", rows, k);
            goto fail;
        }
        if (PyObject_GetBuffer(buf, &obj->views[i], PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        obj->nviews++;
        const int64_t expect = x8 ? ops_x8_bytes(qtype, rows, k) : rows * rb;
        if (obj->views[i].len != expect) {
            PyErr_Format(PyExc_ValueError, "part %zd: %zd bytes, expected %lld", i, obj->views[i].len,
                         (long long)expect);
            goto fail;
        }
        obj->m.parts[i] = (QPart){(const uint8_t *)obj->views[i].buf, qtype, x8, rows, rb};
        obj->m.rows += rows;
    }
    obj->m.nparts = (int)np;
    Py_DECREF(seq);
    PyObject *capsule = PyCapsule_New(obj, MATRIX_NAME, matrix_free);
    if (!capsule) {
        for (int i = 0; i < obj->nviews; i++)
            PyBuffer_Release(&obj->views[i]);
        free(obj);
    }
    return capsule;
fail:
    for (int i = 0; i < obj->nviews; i++)
        PyBuffer_Release(&obj->views[i]);
    free(obj);
    Py_DECREF(seq);
    return NULL;
}

/* ---- buffer helpers ---- */

static int is_format(const Py_buffer *v, char code)
{
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    return f[0] == code && f[1] == '\0';
}

/* A C-contiguous float32 buffer of ndim 1 or 2; *rows, *cols describe it as 2-D. */
static int get_f32(PyObject *obj, Py_buffer *v, int writable, const char *what, int64_t *rows, int64_t *cols)
{
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return 0;
    if (!is_format(v, 'f') || v->itemsize != 4 || v->ndim < 1 || v->ndim > 2) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous float32 array of 1 or 2 dimensions", what);
        PyBuffer_Release(v);
        return 0;
    }
    *rows = v->ndim == 2 ? v->shape[0] : 1;
    *cols = v->ndim == 2 ? v->shape[1] : v->shape[0];
    return 1;
}

static MatrixObj *get_matrix(PyObject *capsule)
{
    return (MatrixObj *)PyCapsule_GetPointer(capsule, MATRIX_NAME);
}

static int alloc_act(QAct *a, int64_t n, int64_t k)
{
    a->n = n;
    a->k = k;
    a->nb = k / QK;
    a->g = n < ACT_G && n > 0 ? n : ACT_G;
    a->sblocks = 1;
    /* one allocation: q, then d, s, isum, halves, off6, pairs (4-byte aligned since k is a
     * multiple of 32), rows padded to whole groups (act_at) */
    const int64_t np = (n + a->g - 1) / a->g * a->g, nbl = np * a->nb;
    char *mem = malloc((size_t)(np * k + 7 * nbl * 4));
    if (!mem)
        return 0;
    a->q = (int8_t *)mem;
    a->d = (float *)(mem + np * k);
    a->s = a->d + nbl;
    a->isum = (int32_t *)(a->s + nbl);
    a->halves = a->isum + nbl;
    a->off6 = a->halves + nbl;
    a->pairs = a->off6 + 2 * nbl;
    return 1;
}

/* ---- kernels ---- */

/* An idle worker brings the first `budget` bytes of m toward the caches, part by part in
 * the order the matmul reads them: the next matmul of a decode step, while the caller runs
 * the norms, RoPE and attention in between (a decode step streams every weight once). */
static void prefetch_matrix(const QMatrix *m, int64_t budget)
{
    const void *p[8];
    int64_t len[8];
    int n = 0;
    for (int i = 0; i < m->nparts && budget > 0; i++, n++) {
        const QPart *part = &m->parts[i];
        const int64_t bytes = (part->x8 ? (part->rows + 7) / 8 * 8 : part->rows) * part->row_bytes;
        p[n] = part->data;
        len[n] = bytes < budget ? bytes : budget;
        budget -= len[n];
    }
    ops_prefetch_async(n, p, len);
}

#if OPS_X86
/* out (n, ldo) = x (n, ldx) @ W.T through the int8 kernels, a the activations' storage
 * (alloc_act(n, w->k)); then an idle pool worker reads up to `budget` bytes of `next` ahead
 * -- not when one thread was granted, which leaves no worker to read */
static void int8_matmul(const QMatrix *w, const float *x, int64_t ldx, QAct *a, float *out, int64_t ldo, int threads,
                        const QMatrix *next, int64_t budget)
{
    a->sblocks = ops_act_sblocks(w);
    ops_quantize_act(x, ldx, a, threads);
    ops_matmul(w, a, out, ldo, threads);
    if (next && budget > 0 && threads > 1)
        prefetch_matrix(next, budget);
}
#endif

static PyObject *py_matmul(PyObject *self, PyObject *args)
{
    PyObject *xo, *mo, *oo, *no = Py_None;
    int threads;
    long long prefetch = 0;
    if (!PyArg_ParseTuple(args, "OOOi|OL", &xo, &mo, &oo, &threads, &no, &prefetch))
        return NULL;
    if (!require_avx2())
        return NULL;
    MatrixObj *m = get_matrix(mo);
    if (!m)
        return NULL;
    MatrixObj *next = no == Py_None ? NULL : get_matrix(no);
    if (no != Py_None && !next)
        return NULL;
    Py_buffer xv, ov;
    int64_t n, k, on, ldo;
    if (!get_f32(xo, &xv, 0, "x", &n, &k))
        return NULL;
    if (!get_f32(oo, &ov, 1, "out", &on, &ldo)) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    PyObject *result = NULL;
    QAct a;
    if (k != m->m.k || on != n || ldo < m->m.rows) {
        PyErr_Format(PyExc_ValueError, "matmul: x (%lld, %lld), W (%lld, %lld), out (%lld, %lld) do not fit",
                     (long long)n, (long long)k, (long long)m->m.rows, (long long)m->m.k, (long long)on,
                     (long long)ldo);
    } else if (!alloc_act(&a, n, k)) {
        PyErr_NoMemory();
    } else {
#if OPS_X86
        Py_BEGIN_ALLOW_THREADS
        int8_matmul(&m->m, (const float *)xv.buf, k, &a, (float *)ov.buf, ldo, threads, next ? &next->m : NULL,
                    prefetch);
        Py_END_ALLOW_THREADS
#endif
        free(a.q);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&xv);
    PyBuffer_Release(&ov);
    return result;
}

static PyObject *py_quantize_act(PyObject *self, PyObject *args)
{
    PyObject *xo, *qo, *d_o, *so, *io;
    int threads, per = QK;
    if (!PyArg_ParseTuple(args, "OOOOOi|i", &xo, &qo, &d_o, &so, &io, &threads, &per))
        return NULL;
    if (per != QK && per != QK_K) {
        PyErr_SetString(PyExc_ValueError, "quantize_act: per is 32 or 256 weights a scale");
        return NULL;
    }
    if (!require_avx2())
        return NULL;
    Py_buffer xv, qv, dv, sv, iv;
    int64_t n, k, r, c;
    if (!get_f32(xo, &xv, 0, "x", &n, &k))
        return NULL;
    PyObject *result = NULL;
    int got = 0;
    if (PyObject_GetBuffer(qo, &qv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    got = 1;
    if (!get_f32(d_o, &dv, 1, "d", &r, &c))
        goto done;
    got = 2;
    if (!get_f32(so, &sv, 1, "s", &r, &c))
        goto done;
    got = 3;
    if (PyObject_GetBuffer(io, &iv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    got = 4;
    if (k % per || qv.len != n * k || dv.len != n * (k / QK) * 4 || sv.len != dv.len || iv.len != dv.len) {
        PyErr_SetString(PyExc_ValueError, "quantize_act: buffer sizes do not match x");
        goto done;
    }
    QAct a;
    if (!alloc_act(&a, n, k)) {
        PyErr_NoMemory();
        goto done;
    }
    a.sblocks = per / QK;
#if OPS_X86
    Py_BEGIN_ALLOW_THREADS
    ops_quantize_act((const float *)xv.buf, k, &a, threads);
    Py_END_ALLOW_THREADS
#endif
    for (int64_t i = 0; i < n; i++) /* out of the interleaved layout into row-major buffers */
        for (int64_t b = 0; b < a.nb; b++) {
            const int64_t at = act_at(&a, i, b);
            memcpy((int8_t *)qv.buf + i * k + QK * b, a.q + QK * at, QK);
            ((float *)dv.buf)[i * a.nb + b] = a.d[at];
            ((float *)sv.buf)[i * a.nb + b] = a.s[at];
            ((int32_t *)iv.buf)[i * a.nb + b] = a.isum[at];
        }
    free(a.q);
    result = Py_NewRef(Py_None);
done:
    if (got >= 4) PyBuffer_Release(&iv);
    if (got >= 3) PyBuffer_Release(&sv);
    if (got >= 2) PyBuffer_Release(&dv);
    if (got >= 1) PyBuffer_Release(&qv);
    PyBuffer_Release(&xv);
    return result;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args)
{
    PyObject *mo, *oo;
    long long row0, row1;
    int threads;
    if (!PyArg_ParseTuple(args, "OLLOi", &mo, &row0, &row1, &oo, &threads))
        return NULL;
    if (!require_avx2())
        return NULL;
    MatrixObj *m = get_matrix(mo);
    if (!m)
        return NULL;
    Py_buffer ov;
    int64_t r, c;
    if (!get_f32(oo, &ov, 1, "out", &r, &c))
        return NULL;
    PyObject *result = NULL;
    if (row0 < 0 || row1 > m->m.rows || row0 > row1 || r * c < (row1 - row0) * m->m.k) {
        PyErr_Format(PyExc_ValueError, "dequantize: rows %lld..%lld of %lld into %lld floats", row0, row1,
                     (long long)m->m.rows, (long long)(r * c));
    } else {
#if OPS_X86
        Py_BEGIN_ALLOW_THREADS
        ops_dequantize(&m->m, row0, row1, (float *)ov.buf, threads);
        Py_END_ALLOW_THREADS
#endif
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&ov);
    return result;
}

static PyObject *py_quantize_q8_0(PyObject *self, PyObject *args)
{
    PyObject *xo, *oo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOi", &xo, &oo, &threads))
        return NULL;
    if (!require_avx2())
        return NULL;
    Py_buffer xv, ov;
    int64_t r, c;
    if (!get_f32(xo, &xv, 0, "x", &r, &c))
        return NULL;
    if (PyObject_GetBuffer(oo, &ov, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    PyObject *result = NULL;
    const int64_t n = r * c;
    if (n % QK || ov.len != n / QK * 34) {
        PyErr_Format(PyExc_ValueError, "quantize_q8_0: %lld floats into %zd bytes", (long long)n, ov.len);
    } else {
#if OPS_X86
        Py_BEGIN_ALLOW_THREADS
        ops_quantize_q8_0((const float *)xv.buf, n, (uint8_t *)ov.buf, threads);
        Py_END_ALLOW_THREADS
#endif
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&xv);
    PyBuffer_Release(&ov);
    return result;
}

/* ---- decoder-layer ops: strided float32 views ---- */

typedef struct {
    Py_buffer v;
    float *p;
    Py_ssize_t shape[4];
    Py_ssize_t strides[4]; /* in floats */
} F32View;

/* A float32 view of `ndim` dimensions whose last axis is contiguous. */
static int get_view(PyObject *o, F32View *a, int ndim, int writable, const char *what)
{
    if (PyObject_GetBuffer(o, &a->v, PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return 0;
    int ok = is_format(&a->v, 'f') && a->v.itemsize == 4 && a->v.ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) {
        a->shape[i] = a->v.shape[i];
        a->strides[i] = a->v.strides[i] / 4;
        ok = a->v.strides[i] % 4 == 0 && a->v.strides[i] >= 0;
    }
    if (ok && a->shape[ndim - 1] > 1 && a->strides[ndim - 1] != 1)
        ok = 0;
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be a float32 array of %d dimensions, last axis contiguous", what, ndim);
        PyBuffer_Release(&a->v);
        return 0;
    }
    a->p = (float *)a->v.buf;
    return 1;
}

/* One argument's float view: the object, where to put it, its rank, writable, its name. */
typedef struct {
    PyObject *obj;
    F32View *view;
    int ndim, writable;
    const char *what;
} ViewArg;

/* Every view of a call, in order: 1, or 0 with the error set and none of them held. */
static int get_views(const ViewArg *args, int n)
{
    for (int i = 0; i < n; i++)
        if (!get_view(args[i].obj, args[i].view, args[i].ndim, args[i].writable, args[i].what)) {
            while (i-- > 0)
                PyBuffer_Release(&args[i].view->v);
            return 0;
        }
    return 1;
}

static void release_views(const ViewArg *args, int n)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&args[i].view->v);
}

/* (n,) int64 positions, each in [0, limit) */
static int get_positions(PyObject *o, Py_buffer *v, Py_ssize_t n, int64_t limit)
{
    if (PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return 0;
    if (!(is_format(v, 'q') || is_format(v, 'l')) || v->itemsize != 8 || v->len != n * 8) {
        PyErr_Format(PyExc_TypeError, "positions must be %zd int64 values", n);
        PyBuffer_Release(v);
        return 0;
    }
    const int64_t *p = (const int64_t *)v->buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] < 0 || p[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "position %lld is outside 0..%lld", (long long)p[i], (long long)limit - 1);
            PyBuffer_Release(v);
            return 0;
        }
    return 1;
}

static int contiguous(const F32View *a, int ndim)
{
    Py_ssize_t expect = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        if (a->shape[i] > 1 && a->strides[i] != expect)
            return 0;
        expect *= a->shape[i];
    }
    return 1;
}

/* decode_layer(x, attn_norm, ffn_norm, qkv, o, gate_up, down, next, k_cache, v_cache, pos, cos, sin,
 *              neox, eps, heads, threads, prefetch_bytes)
 * One llama-block decoder layer for one token of one sequence, in place on x (1, dim): the same
 * kernels, in the same order, as the forward pass calls one by one (so the same bits) without
 * returning to Python between them -- a decode step's ~100 returns cost more than its norms,
 * RoPE and attention together. The token's key and value go to position pos of k_cache and
 * v_cache, (n_kv, capacity, hd) with contiguous rows; attention reads positions 0..pos. Each
 * matmul's successor is read ahead as matmul's `next`; `next` (or None) follows down. */
static PyObject *py_decode_layer(PyObject *self, PyObject *args)
{
    PyObject *xo, *ano, *fno, *mo[5], *kco, *vco, *co, *so;
    long long pos, prefetch;
    int neox, heads, threads;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLOOpfiiL", &xo, &ano, &fno, &mo[0], &mo[1], &mo[2], &mo[3], &mo[4], &kco,
                          &vco, &pos, &co, &so, &neox, &eps, &heads, &threads, &prefetch) ||
        !require_avx2())
        return NULL;
    const QMatrix *w[5] = {NULL};
    for (int i = 0; i < 5; i++) {
        if (i == 4 && mo[i] == Py_None)
            break;
        MatrixObj *m = get_matrix(mo[i]);
        if (!m)
            return NULL;
        w[i] = &m->m;
    }
    F32View x, an, fn, kc, vc, c, sn;
    const ViewArg views[] = {{xo, &x, 2, 1, "x"}, {ano, &an, 1, 0, "attn_norm"}, {fno, &fn, 1, 0, "ffn_norm"},
                             {kco, &kc, 3, 1, "k_cache"}, {vco, &vc, 3, 1, "v_cache"}, {co, &c, 2, 0, "cos"},
                             {so, &sn, 2, 0, "sin"}};
    if (!get_views(views, 7))
        return NULL;
    PyObject *result = NULL;
    const int64_t dim = x.shape[1], n_kv = kc.shape[0], cap = kc.shape[1], hd = kc.shape[2];
    const int64_t qd = heads > 0 ? heads * hd : 0, kvd = n_kv * hd, ffn = w[2]->rows / 2;
    if (x.shape[0] != 1 || !contiguous(&x, 2) || an.shape[0] != dim || fn.shape[0] != dim || heads < 1 ||
        n_kv < 1 || heads % n_kv || vc.shape[0] != n_kv || vc.shape[1] != cap || vc.shape[2] != hd ||
        (cap > 1 && (kc.strides[1] != hd || vc.strides[1] != hd)) || pos < 0 || pos >= cap ||
        !contiguous(&c, 2) || !contiguous(&sn, 2) || c.shape[0] != sn.shape[0] || c.shape[1] != sn.shape[1] ||
        pos >= c.shape[0] || 2 * c.shape[1] > hd || w[0]->k != dim || w[0]->rows != qd + 2 * kvd ||
        w[1]->k != qd || w[1]->rows != dim || w[2]->k != dim || w[2]->rows % 2 || w[3]->k != ffn ||
        w[3]->rows != dim) {
        PyErr_SetString(PyExc_ValueError,
                        "decode_layer: x (1, dim); norms (dim,); qkv (heads*hd + 2*n_kv*hd, dim), o (dim, heads*hd), "
                        "gate_up (2f, dim), down (dim, f); k/v caches (n_kv, capacity, hd) with pos < capacity; "
                        "cos/sin (positions > pos, <= hd/2)");
        goto done;
    }
#if OPS_X86
    /* everything allocated before anything is written: out of memory leaves x and the caches
     * as they were. Scratch: h, qkv, q and k after RoPE, attention, a projection, gate_up, its
     * activation; and each matmul's quantized activations */
    float *h = malloc((size_t)(dim + (qd + 2 * kvd) + qd + kvd + qd + dim + 3 * ffn) * sizeof(float));
    QAct acts[4];
    int got = 0;
    while (h && got < 4 && alloc_act(&acts[got], 1, w[got]->k))
        got++;
    if (got < 4) {
        while (got > 0)
            free(acts[--got].q);
        free(h);
        PyErr_NoMemory();
        goto done;
    }
    float *qkv = h + dim, *qr = qkv + qd + 2 * kvd, *kr = qr + qd, *att = kr + kvd, *proj = att + qd;
    float *gu = proj + dim, *act = gu + 2 * ffn;
    const int64_t p1 = pos;
    Py_BEGIN_ALLOW_THREADS
    ops_rms_norm(x.p, dim, an.p, 1, dim, eps, h);
    int8_matmul(w[0], h, dim, &acts[0], qkv, w[0]->rows, threads, w[1], prefetch);
    ops_rope(qkv, qd + 2 * kvd, hd, 1, heads, hd, c.p, sn.p, c.shape[1], &p1, neox, qr);
    ops_rope(qkv + qd, qd + 2 * kvd, hd, 1, n_kv, hd, c.p, sn.p, c.shape[1], &p1, neox, kr);
    for (int64_t g = 0; g < n_kv; g++) {
        memcpy(kc.p + g * kc.strides[0] + pos * hd, kr + g * hd, (size_t)hd * sizeof(float));
        memcpy(vc.p + g * vc.strides[0] + pos * hd, qkv + qd + kvd + g * hd, (size_t)hd * sizeof(float));
    }
    ops_attention(qr, kc.p, kc.strides[0], vc.p, vc.strides[0], &p1, 1, heads, n_kv, pos + 1, hd, att, threads);
    int8_matmul(w[1], att, qd, &acts[1], proj, dim, threads, w[2], prefetch);
    for (int64_t e = 0; e < dim; e++)
        x.p[e] += proj[e];
    ops_rms_norm(x.p, dim, fn.p, 1, dim, eps, h);
    int8_matmul(w[2], h, dim, &acts[2], gu, 2 * ffn, threads, w[3], prefetch);
    ops_silu_mul(gu, 2 * ffn, 1, ffn, act, threads);
    int8_matmul(w[3], act, ffn, &acts[3], proj, dim, threads, w[4], prefetch);
    for (int64_t e = 0; e < dim; e++)
        x.p[e] += proj[e];
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 4; i++)
        free(acts[i].q);
    free(h);
#endif
    result = Py_NewRef(Py_None);
done:
    release_views(views, 7);
    return result;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args)
{
    PyObject *xo, *wo, *oo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOfO", &xo, &wo, &eps, &oo) || !require_avx2())
        return NULL;
    F32View x, w, o;
    if (!get_view(xo, &x, 2, 0, "x"))
        return NULL;
    if (!get_view(wo, &w, 1, 0, "w")) {
        PyBuffer_Release(&x.v);
        return NULL;
    }
    if (!get_view(oo, &o, 2, 1, "out")) {
        PyBuffer_Release(&x.v);
        PyBuffer_Release(&w.v);
        return NULL;
    }
    PyObject *result = NULL;
    if (w.shape[0] != x.shape[1] || o.shape[0] != x.shape[0] || o.shape[1] != x.shape[1] || !contiguous(&o, 2)) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: x (n, d), w (d,), out (n, d) contiguous");
    } else {
        Py_BEGIN_ALLOW_THREADS
        ops_rms_norm(x.p, x.strides[0], w.p, x.shape[0], x.shape[1], eps, o.p);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x.v);
    PyBuffer_Release(&w.v);
    PyBuffer_Release(&o.v);
    return result;
}

static PyObject *py_rope(PyObject *self, PyObject *args)
{
    PyObject *xo, *co, *so, *po, *oo;
    int neox;
    if (!PyArg_ParseTuple(args, "OOOOpO", &xo, &co, &so, &po, &neox, &oo) || !require_avx2())
        return NULL;
    F32View x, c, s, o;
    const ViewArg views[] = {{xo, &x, 3, 0, "x"}, {co, &c, 2, 0, "cos"}, {so, &s, 2, 0, "sin"}, {oo, &o, 3, 1, "out"}};
    if (!get_views(views, 4))
        return NULL;
    Py_buffer pv;
    int got_pv = 0;
    PyObject *result = NULL;
    if (!contiguous(&c, 2) || !contiguous(&s, 2) || c.shape[0] != s.shape[0] || c.shape[1] != s.shape[1] ||
        2 * c.shape[1] > x.shape[2] || !contiguous(&o, 3) || o.shape[0] != x.shape[0] ||
        o.shape[1] != x.shape[1] || o.shape[2] != x.shape[2]) {
        PyErr_SetString(PyExc_ValueError, "rope: x (n, heads, hd), cos/sin (positions, <= hd/2), out like x");
        goto done;
    }
    if (!get_positions(po, &pv, x.shape[0], c.shape[0]))
        goto done;
    got_pv = 1;
    Py_BEGIN_ALLOW_THREADS
    ops_rope(x.p, x.strides[0], x.strides[1], x.shape[0], x.shape[1], x.shape[2], c.p, s.p, c.shape[1],
             (const int64_t *)pv.buf, neox, o.p);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (got_pv) PyBuffer_Release(&pv);
    release_views(views, 4);
    return result;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args)
{
    PyObject *go, *oo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOi", &go, &oo, &threads) || !require_avx2())
        return NULL;
    F32View g, o;
    if (!get_view(go, &g, 2, 0, "gate_up"))
        return NULL;
    if (!get_view(oo, &o, 2, 1, "out")) {
        PyBuffer_Release(&g.v);
        return NULL;
    }
    PyObject *result = NULL;
    if (g.shape[1] % 2 || o.shape[0] != g.shape[0] || o.shape[1] != g.shape[1] / 2 || !contiguous(&o, 2)) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: gate_up (n, 2f), out (n, f) contiguous");
    } else {
        Py_BEGIN_ALLOW_THREADS
        ops_silu_mul(g.p, g.strides[0], g.shape[0], g.shape[1] / 2, o.p, threads);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&g.v);
    PyBuffer_Release(&o.v);
    return result;
}

static PyObject *py_logsumexp(PyObject *self, PyObject *args)
{
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "O", &xo) || !require_avx2())
        return NULL;
    F32View x;
    if (!get_view(xo, &x, 2, 0, "x"))
        return NULL;
    PyObject *result = PyTuple_New(x.shape[0]);
    for (Py_ssize_t i = 0; result && i < x.shape[0]; i++) {
        double v;
        Py_BEGIN_ALLOW_THREADS
        v = ops_logsumexp(x.p + i * x.strides[0], x.shape[1]);
        Py_END_ALLOW_THREADS
        PyObject *f = PyFloat_FromDouble(v);
        if (!f) {
            Py_CLEAR(result);
            break;
        }
        PyTuple_SET_ITEM(result, i, f);
    }
    PyBuffer_Release(&x.v);
    return result;
}

static PyObject *py_attention(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *vo, *po, *oo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOi", &qo, &ko, &vo, &po, &oo, &threads) || !require_avx2())
        return NULL;
    F32View q, k, v, o;
    const ViewArg views[] = {{qo, &q, 3, 0, "q"}, {ko, &k, 3, 0, "k"}, {vo, &v, 3, 0, "v"}, {oo, &o, 2, 1, "out"}};
    if (!get_views(views, 4))
        return NULL;
    Py_buffer pv;
    int got_pv = 0;
    PyObject *result = NULL;
    const Py_ssize_t n = q.shape[0], heads = q.shape[1], hd = q.shape[2], n_kv = k.shape[0], t = k.shape[1];
    if (!contiguous(&q, 3) || !contiguous(&o, 2) || n_kv < 1 || heads % n_kv || k.shape[2] != hd ||
        v.shape[0] != n_kv || v.shape[1] != t || v.shape[2] != hd || (t > 1 && (k.strides[1] != hd || v.strides[1] != hd)) ||
        o.shape[0] != n || o.shape[1] != heads * hd || t < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "attention: q (n, heads, hd) contiguous, k/v (n_kv, t, hd) with contiguous rows, "
                        "out (n, heads * hd)");
        goto done;
    }
    if (!get_positions(po, &pv, n, INT64_MAX))
        goto done;
    got_pv = 1;
    Py_BEGIN_ALLOW_THREADS
    ops_attention(q.p, k.p, k.strides[0], v.p, v.strides[0], (const int64_t *)pv.buf, n, heads, n_kv, t, hd, o.p,
                  threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (got_pv) PyBuffer_Release(&pv);
    release_views(views, 4);
    return result;
}

/* decode_attention(q, k, v, lengths, out, threads[, table]): B sequences, one query each.
 * Without a table k/v are (B, n_kv, T, hd), sequence b's keys in positions 0..lengths[b]-1.
 * With one, k/v are a layer of the paged arena, (n_kv, blocks, block, hd) contiguous, and
 * table (B, nb) int64 lists each sequence's blocks: attention reads the arena in place. */
static PyObject *py_decode_attention(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *vo, *lo, *oo, *to = Py_None;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOi|O", &qo, &ko, &vo, &lo, &oo, &threads, &to) || !require_avx2())
        return NULL;
    const int paged = to != Py_None;
    F32View q, k, v, o;
    const ViewArg views[] = {{qo, &q, 3, 0, "q"}, {ko, &k, 4, 0, "k"}, {vo, &v, 4, 0, "v"}, {oo, &o, 2, 1, "out"}};
    if (!get_views(views, 4))
        return NULL;
    Py_buffer lv, tv;
    int got_tv = 0, got_lv = 0;
    PyObject *result = NULL;
    int64_t *last = NULL;
    const Py_ssize_t b = q.shape[0], heads = q.shape[1], hd = q.shape[2];
    const Py_ssize_t n_kv = paged ? k.shape[0] : k.shape[1];
    Py_ssize_t t = k.shape[2], nb = 0;
    int ok = contiguous(&q, 3) && contiguous(&o, 2) && n_kv >= 1 && heads % n_kv == 0 && k.shape[3] == hd &&
             o.shape[0] == b && o.shape[1] == heads * hd;
    for (int d = 0; ok && d < 4; d++)
        ok = v.shape[d] == k.shape[d];
    if (ok && paged) /* whole arena layers; blocks of whole 8-key groups */
        ok = contiguous(&k, 4) && contiguous(&v, 4) && k.shape[2] % 8 == 0 && k.shape[1] >= 1;
    else if (ok)
        ok = k.shape[0] == b && t >= 1 && (t == 1 || (k.strides[2] == hd && v.strides[2] == hd));
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        paged ? "decode_attention: q (B, heads, hd) contiguous, k/v (n_kv, blocks, block, hd) "
                                "contiguous with block a multiple of 8, out (B, heads * hd)"
                              : "decode_attention: q (B, heads, hd) contiguous, k/v (B, n_kv, T, hd) with "
                                "contiguous rows, out (B, heads * hd)");
        goto done;
    }
    if (paged) { /* every table entry a block of the arena */
        if (PyObject_GetBuffer(to, &tv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            goto done;
        if (tv.ndim != 2 || tv.shape[0] != b || tv.shape[1] < 1) {
            PyErr_SetString(PyExc_ValueError, "decode_attention: table must be (B, blocks per sequence)");
            PyBuffer_Release(&tv);
            goto done;
        }
        nb = tv.shape[1];
        PyBuffer_Release(&tv);
        if (!get_positions(to, &tv, b * nb, k.shape[1]))
            goto done;
        got_tv = 1;
        t = nb * k.shape[2];
    }
    /* lengths (B,) in 1..T, passed on as the last visible position */
    if (!get_positions(lo, &lv, b, t + 1))
        goto done;
    got_lv = 1;
    last = malloc((size_t)(b > 0 ? b : 1) * sizeof(int64_t));
    if (!last) {
        PyErr_NoMemory();
        goto done;
    }
    ok = 1;
    for (Py_ssize_t i = 0; i < b; i++) {
        last[i] = ((const int64_t *)lv.buf)[i] - 1;
        ok &= last[i] >= 0;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: every length must be at least 1");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (paged)
        ops_paged_decode_attention(q.p, k.p, v.p, k.shape[1], k.shape[2], (const int64_t *)tv.buf, nb, last, b,
                                   heads, n_kv, hd, o.p, threads);
    else
        ops_decode_attention(q.p, k.p, k.strides[0], k.strides[1], v.p, v.strides[0], v.strides[1], last, b, heads,
                             n_kv, t, hd, o.p, threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(last);
    if (got_lv) PyBuffer_Release(&lv);
    if (got_tv) PyBuffer_Release(&tv);
    release_views(views, 4);
    return result;
}

/* ---- float32 matmul ---- */

/* Floats from a view's first to its last element, for the overlap check. */
static int64_t view_extent(const F32View *a, int ndim)
{
    int64_t hi = 1;
    for (int i = 0; i < ndim; i++) {
        if (a->shape[i] == 0)
            return 0;
        hi += (int64_t)(a->shape[i] - 1) * a->strides[i];
    }
    return hi;
}

static int views_overlap(const F32View *a, const F32View *b)
{
    const float *a1 = a->p + view_extent(a, 2), *b1 = b->p + view_extent(b, 2);
    return a->p < b1 && b->p < a1;
}

/* matmul_f32(x, w, out, threads): x (m, k) and out (m, n) float32 with contiguous rows; w (k, n)
 * float32, either the transposed view of an (n, k) array with contiguous rows ("nk": the
 * backend's resident W.T and the tied head's E.T) or itself with contiguous rows ("kn"). */
static PyObject *py_matmul_f32(PyObject *self, PyObject *args)
{
    PyObject *xo, *wo, *oo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOi", &xo, &wo, &oo, &threads) || !require_avx2())
        return NULL;
    F32View x, w, o;
    int got = 0;
    PyObject *result = NULL;
    if (!get_view(xo, &x, 2, 0, "x"))
        goto done;
    got = 1;
    if (PyObject_GetBuffer(wo, &w.v, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        goto done;
    got = 2;
    int ok = is_format(&w.v, 'f') && w.v.itemsize == 4 && w.v.ndim == 2;
    for (int i = 0; ok && i < 2; i++) {
        w.shape[i] = w.v.shape[i];
        w.strides[i] = w.v.strides[i] / 4;
        ok = w.v.strides[i] % 4 == 0 && w.v.strides[i] >= 0;
    }
    const int kn = ok && (w.shape[1] <= 1 || w.strides[1] == 1);
    const int nk = ok && !kn && (w.shape[0] <= 1 || w.strides[0] == 1);
    if (!kn && !nk) {
        PyErr_SetString(PyExc_TypeError, "matmul_f32: w must be a float32 (k, n) array with contiguous rows, "
                                         "or the transpose of one (n, k)");
        goto done;
    }
    w.p = (float *)w.v.buf;
    if (!get_view(oo, &o, 2, 1, "out"))
        goto done;
    got = 3;
    const Py_ssize_t m = x.shape[0], k = x.shape[1], n = w.shape[1];
    if (w.shape[0] != k || o.shape[0] != m || o.shape[1] != n) {
        PyErr_Format(PyExc_ValueError, "matmul_f32: x (%zd, %zd) @ w (%zd, %zd) does not fit out (%zd, %zd)", m, k,
                     w.shape[0], n, o.shape[0], o.shape[1]);
        goto done;
    }
    if (m > 1 && o.strides[0] < n) {
        PyErr_SetString(PyExc_ValueError, "matmul_f32: out's rows overlap");
        goto done;
    }
    if (views_overlap(&o, &x) || views_overlap(&o, &w)) {
        PyErr_SetString(PyExc_ValueError, "matmul_f32: out overlaps x or w");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (kn)
        ops_matmul_f32_kn(x.p, x.strides[0], w.p, w.strides[0], m, k, n, o.p, o.strides[0], threads);
    else
        ops_matmul_f32_nk(x.p, x.strides[0], w.p, w.strides[1], m, k, n, o.p, o.strides[0], threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (got >= 3) PyBuffer_Release(&o.v);
    if (got >= 2) PyBuffer_Release(&w.v);
    if (got >= 1) PyBuffer_Release(&x.v);
    return result;
}

/* ---- x8 repacking, page release, row lookup ---- */

static PyObject *py_x8_bytes(PyObject *self, PyObject *args)
{
    int qtype;
    long long rows, k;
    if (!PyArg_ParseTuple(args, "iLL", &qtype, &rows, &k))
        return NULL;
    if (!ops_x8_supported(qtype) || ops_row_bytes(qtype, k) < 0 || rows < 1) {
        PyErr_Format(PyExc_ValueError, "type %d has no x8 layout for (%lld, %lld)", qtype, rows, k);
        return NULL;
    }
    return PyLong_FromLongLong(ops_x8_bytes(qtype, rows, k));
}

static PyObject *py_repack_x8(PyObject *self, PyObject *args)
{
    PyObject *so, *dst_o;
    int qtype, threads;
    long long rows, k;
    if (!PyArg_ParseTuple(args, "OiLLOi", &so, &qtype, &rows, &k, &dst_o, &threads) || !require_avx2())
        return NULL;
    if (!ops_x8_supported(qtype) || ops_row_bytes(qtype, k) < 0 || rows < 1) {
        PyErr_Format(PyExc_ValueError, "type %d has no x8 layout for (%lld, %lld)", qtype, rows, k);
        return NULL;
    }
    Py_buffer sv, dv;
    if (PyObject_GetBuffer(so, &sv, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(dst_o, &dv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    PyObject *result = NULL;
    if (sv.len != rows * ops_row_bytes(qtype, k) || dv.len != ops_x8_bytes(qtype, rows, k)) {
        PyErr_SetString(PyExc_ValueError, "repack_x8: buffer sizes do not match (rows, k)");
    } else {
        Py_BEGIN_ALLOW_THREADS
        ops_repack_x8(qtype, (const uint8_t *)sv.buf, rows, k, (uint8_t *)dv.buf, threads);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&sv);
    PyBuffer_Release(&dv);
    return result;
}

/* Drop a read-only buffer's pages from this process's resident set (madvise MADV_DONTNEED
 * on the whole pages inside it). Only for read-only memory-mapped files: the pages stay in
 * the page cache and fault back in if read again. Returns the bytes released. */
static PyObject *py_release_pages(PyObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    long long released = 0;
#if defined(__linux__)
    if (v.readonly) {
        const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        const uintptr_t lo = ((uintptr_t)v.buf + page - 1) / page * page;
        const uintptr_t hi = ((uintptr_t)v.buf + (uintptr_t)v.len) / page * page;
        if (hi > lo && madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0)
            released = (long long)(hi - lo);
    }
#endif
    PyBuffer_Release(&v);
    return PyLong_FromLongLong(released);
}

static PyObject *py_dequantize_ids(PyObject *self, PyObject *args)
{
    PyObject *mo, *io, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &mo, &io, &oo) || !require_avx2())
        return NULL;
    MatrixObj *m = get_matrix(mo);
    if (!m)
        return NULL;
    Py_buffer iv, ov;
    if (PyObject_GetBuffer(io, &iv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (!(is_format(&iv, 'q') || is_format(&iv, 'l')) || iv.itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "ids must be int64");
        PyBuffer_Release(&iv);
        return NULL;
    }
    const int64_t n = iv.len / 8, *ids = (const int64_t *)iv.buf;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->m.rows) {
            PyErr_Format(PyExc_ValueError, "row %lld is outside 0..%lld", (long long)ids[i], (long long)m->m.rows - 1);
            PyBuffer_Release(&iv);
            return NULL;
        }
    int64_t r, c;
    if (!get_f32(oo, &ov, 1, "out", &r, &c)) {
        PyBuffer_Release(&iv);
        return NULL;
    }
    PyObject *result = NULL;
    if (r * c != n * m->m.k) {
        PyErr_SetString(PyExc_ValueError, "dequantize_ids: out must hold len(ids) rows");
    } else {
        Py_BEGIN_ALLOW_THREADS
        ops_dequantize_ids(&m->m, ids, n, (float *)ov.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&iv);
    PyBuffer_Release(&ov);
    return result;
}

static PyObject *py_park(PyObject *self, PyObject *noargs)
{
    ops_park();
    Py_RETURN_NONE;
}

static PyObject *py_have_avx2(PyObject *self, PyObject *noargs)
{
    if (g_have_avx2 < 0)
        g_have_avx2 = ops_cpu_has_avx2();
    return PyBool_FromLong(g_have_avx2 && OPS_X86);
}

static PyObject *py_use_vnni(PyObject *self, PyObject *arg)
{
    const int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
#if OPS_X86
    return PyBool_FromLong(ops_use_vnni(on));
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg)
{
    const long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred())
        return NULL;
    if (us < 0) {
        PyErr_SetString(PyExc_ValueError, "spin time must be >= 0");
        return NULL;
    }
    ops_set_spin_us(us);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"have_avx2", py_have_avx2, METH_NOARGS, "CPU and OS support AVX2, FMA and F16C."},
    {"use_vnni", py_use_vnni, METH_O, "use_vnni(on) -> bool: the AVX512-VNNI kernels if on and the CPU has them."},
    {"set_spin_us", py_set_spin_us, METH_O, "set_spin_us(us): how long idle pool workers spin before sleeping."},
    {"matrix", py_matrix, METH_VARARGS, "matrix(parts, k): a weight handle over [(buffer, ggml_type, rows)]."},
    {"matmul", py_matmul, METH_VARARGS, "matmul(x, matrix, out, threads[, next, prefetch_bytes]): out[:, :rows] = x @ W.T; then an idle worker reads up to prefetch_bytes of next."},
    {"matmul_f32", py_matmul_f32, METH_VARARGS, "matmul_f32(x, w, out, threads): out = x @ w, float32, batch-invariant."},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(matrix, row0, row1, out, threads)."},
    {"quantize_q8_0", py_quantize_q8_0, METH_VARARGS, "quantize_q8_0(x, out, threads)."},
    {"quantize_act", py_quantize_act, METH_VARARGS, "quantize_act(x, q, d, s, isum, threads, per=32)."},
    {"decode_layer", py_decode_layer, METH_VARARGS,
     "decode_layer(x, attn_norm, ffn_norm, qkv, o, gate_up, down, next, k_cache, v_cache, pos, cos, sin, neox, eps, "
     "heads, threads, prefetch_bytes): one fused llama-block layer for one token."},
    {"x8_bytes", py_x8_bytes, METH_VARARGS, "x8_bytes(type, rows, k): bytes of the x8 layout."},
    {"repack_x8", py_repack_x8, METH_VARARGS, "repack_x8(src, type, rows, k, dst, threads): file rows -> x8 layout."},
    {"release_pages", py_release_pages, METH_O, "release_pages(buffer): drop a read-only mapping's pages from RSS."},
    {"dequantize_ids", py_dequantize_ids, METH_VARARGS, "dequantize_ids(matrix, ids, out): rows by index."},
    {"park", py_park, METH_NOARGS, "park(): idle pool workers sleep now (before an OpenBLAS call)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, w, eps, out)."},
    {"rope", py_rope, METH_VARARGS, "rope(x, cos, sin, positions, neox, out)."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(gate_up, out, threads)."},
    {"logsumexp", py_logsumexp, METH_VARARGS, "logsumexp(x) -> tuple: log(sum(exp(row))) of each row of x (n, d)."},
    {"attention", py_attention, METH_VARARGS, "attention(q, k, v, positions, out, threads)."},
    {"decode_attention", py_decode_attention, METH_VARARGS, "decode_attention(q, k, v, lengths, out, threads[, table])."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ops_avx2",
    "AVX2 kernels for quantized-resident weights (see backends/cpu/quantized.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__ops_avx2(void)
{
    return PyModule_Create(&module);
}
