/* hfreduce._C: the SIMD reduce kernels and the shared-memory synchronisation primitives.
 *
 * Kernels
 *   reduce(dst, srcs, dtype, op, avg=0, first=None, dst2=None)
 *       dst = op(first, srcs[0], ..., srcs[k-1]) in one pass (first=None: dst itself, in place);
 *       avg > 0 divides the result by avg (AVG's last step); dst2 also receives the result.
 *   copy(dst, src) / zero(dst)          memcpy / memset with the GIL released.
 *
 * [Note: one pass, in place]
 * Measured on the development machine: an in-place add (dst += x) runs 2-2.5x faster than an add
 * into a third buffer, which pays an extra read-for-ownership stream. So the kernel accumulates
 * into dst, and it walks the data in blocks of BLK elements: the dst block stays in L1 while
 * every source adds into it, so each source and dst cross the memory bus exactly once whatever
 * the number of sources. fp16 and bf16 accumulate in an fp32 block and round once at the end.
 *
 * SIMD: the loops are written so GCC vectorises them, and on x86-64 every kernel is compiled
 * three times (x86-64-v4 = AVX-512, v3 = AVX2+FMA+F16C, baseline SSE2) with target_clones; the
 * loader picks the best one for the CPU at run time (simd() says which).
 *
 * Synchronisation (int64 words of a shared mapping, all atomics seq_cst)
 *   load(buf, i), store(buf, i, v), min_of(buf, start, stride, count), load32(buf, byte_off)
 *   publish(buf, word, value, epoch_off, waiters_word): store, bump the epoch futex, wake sleepers
 *   epoch_wait(buf, epoch_off, waiters_word, expected, timeout) -> True when the epoch moved
 *   pipeline(...): the engine's per-rank chunk loop for one collective, without the GIL
 *   pipeline_cma(...), cma_probe(...): the single-copy path for own buffers on one node
 *   pipeline_lanes(...): across nodes, one tree per slice owner, single-copy inside the node
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HFR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define HFR_HAVE_CLONES 1
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define HFR_CLONES
#define HFR_HAVE_CLONES 0
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

enum { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3, DT_I32 = 4, DT_I64 = 5, DT_U8 = 6 };
enum { OP_SUM = 0, OP_MAX = 2, OP_MIN = 3, OP_BOR = 4 };

#define BLK 1024
#define MAXSRC 64

static const int dt_size[] = {4, 8, 2, 2, 4, 8, 1};

/* ---------------------------------------------------------------- half-precision conversion */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

#ifdef __FLT16_MAX__
typedef _Float16 hfr_f16;
static inline float f16_to_f32(uint16_t h) {
    hfr_f16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}
static inline uint16_t f32_to_f16(float f) {
    hfr_f16 x = (hfr_f16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}
#else
/* Portable IEEE binary16 conversions (round to nearest even). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112u) << 23) | (man << 13);
    else if (!man) u = sign;
    else {
        exp = 113;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xffu) - 112;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
        uint32_t r = man >> shift, rem = man & ((1u << shift) - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}
#endif

/* ---------------------------------------------------------------- kernels */
/* Every kernel: dst = op(first, srcs...) (first == NULL: dst itself, in place), block by block;
 * dst2 != NULL also receives each finished block (a second output, written from L1). */
#define NATIVE_KERNEL(NAME, T, UT)                                                                   \
    HFR_CLONES static void NAME(T *restrict d, const T *first, const T *const *srcs, int ns, size_t n, \
                                int op, T *dst2) {                                                   \
        for (size_t b = 0; b < n; b += BLK) {                                                        \
            size_t m = n - b < BLK ? n - b : BLK;                                                    \
            T *restrict dd = d + b;                                                                  \
            if (first) {                                                                             \
                const T *ff = first + b;                                                             \
                if (!ns) memcpy(dd, ff, m * sizeof(T));                                              \
                else {                                                                               \
                    const T *restrict s = srcs[0] + b;                                               \
                    if (ns == 1 && dst2) { /* the common two-rank case: both outputs in one pass */   \
                        T *restrict d2 = dst2 + b;                                                   \
                        if (op == OP_SUM)                                                            \
                            for (size_t i = 0; i < m; i++) { T v = (T)((UT)ff[i] + (UT)s[i]); dd[i] = v; d2[i] = v; } \
                        else if (op == OP_MAX)                                                       \
                            for (size_t i = 0; i < m; i++) { T v = ff[i] >= s[i] ? ff[i] : s[i]; dd[i] = v; d2[i] = v; } \
                        else                                                                         \
                            for (size_t i = 0; i < m; i++) { T v = ff[i] <= s[i] ? ff[i] : s[i]; dd[i] = v; d2[i] = v; } \
                        continue;                                                                    \
                    }                                                                                \
                    if (op == OP_SUM) for (size_t i = 0; i < m; i++) dd[i] = (T)((UT)ff[i] + (UT)s[i]); \
                    else if (op == OP_MAX) for (size_t i = 0; i < m; i++) dd[i] = ff[i] >= s[i] ? ff[i] : s[i]; \
                    else for (size_t i = 0; i < m; i++) dd[i] = ff[i] <= s[i] ? ff[i] : s[i];        \
                }                                                                                    \
            }                                                                                        \
            for (int k = first ? 1 : 0; k < ns; k++) {                                               \
                const T *restrict s = srcs[k] + b;                                                   \
                if (op == OP_SUM) {                                                                  \
                    for (size_t i = 0; i < m; i++) dd[i] = (T)((UT)dd[i] + (UT)s[i]);                \
                } else if (op == OP_MAX) {                                                           \
                    for (size_t i = 0; i < m; i++) dd[i] = dd[i] >= s[i] ? dd[i] : s[i];             \
                } else {                                                                             \
                    for (size_t i = 0; i < m; i++) dd[i] = dd[i] <= s[i] ? dd[i] : s[i];             \
                }                                                                                    \
            }                                                                                        \
            if (dst2) memcpy(dst2 + b, dd, m * sizeof(T));                                           \
        }                                                                                            \
    }

NATIVE_KERNEL(k_f32, float, float)
NATIVE_KERNEL(k_f64, double, double)
NATIVE_KERNEL(k_i32, int32_t, uint32_t)
NATIVE_KERNEL(k_i64, int64_t, uint64_t)

HFR_CLONES static void k_bor(uint8_t *restrict d, const uint8_t *first, const uint8_t *const *srcs, int ns,
                             size_t n, uint8_t *dst2) {
    for (size_t b = 0; b < n; b += 4 * BLK) {
        size_t m = n - b < 4 * BLK ? n - b : 4 * BLK;
        uint8_t *restrict dd = d + b;
        if (first) memcpy(dd, first + b, m);
        for (int k = 0; k < ns; k++) {
            const uint8_t *restrict s = srcs[k] + b;
            for (size_t i = 0; i < m; i++) dd[i] |= s[i];
        }
        if (dst2) memcpy(dst2 + b, dd, m);
    }
}

#define HALF_KERNEL(NAME, TO_F, FROM_F)                                                              \
    HFR_CLONES static void NAME(uint16_t *restrict d, const uint16_t *first, const uint16_t *const *srcs, \
                                int ns, size_t n, int op, int avg, uint16_t *dst2) {                 \
        float acc[BLK];                                                                              \
        float inv = avg > 0 ? (float)avg : 1.0f;                                                     \
        for (size_t b = 0; b < n; b += BLK) {                                                        \
            size_t m = n - b < BLK ? n - b : BLK;                                                    \
            uint16_t *restrict dd = d + b;                                                           \
            const uint16_t *ff = first ? first + b : dd;                                             \
            for (size_t i = 0; i < m; i++) acc[i] = TO_F(ff[i]);                                     \
            for (int k = 0; k < ns; k++) {                                                           \
                const uint16_t *restrict s = srcs[k] + b;                                            \
                if (op == OP_SUM) {                                                                  \
                    for (size_t i = 0; i < m; i++) acc[i] += TO_F(s[i]);                             \
                } else if (op == OP_MAX) {                                                           \
                    for (size_t i = 0; i < m; i++) { float v = TO_F(s[i]); acc[i] = acc[i] >= v ? acc[i] : v; } \
                } else {                                                                             \
                    for (size_t i = 0; i < m; i++) { float v = TO_F(s[i]); acc[i] = acc[i] <= v ? acc[i] : v; } \
                }                                                                                    \
            }                                                                                        \
            if (avg > 0)                                                                             \
                for (size_t i = 0; i < m; i++) acc[i] /= inv;                                        \
            for (size_t i = 0; i < m; i++) dd[i] = FROM_F(acc[i]);                                   \
            if (dst2) memcpy(dst2 + b, dd, m * 2);                                                   \
        }                                                                                            \
    }

HALF_KERNEL(k_bf16, bf16_to_f32, f32_to_bf16)
HALF_KERNEL(k_f16, f16_to_f32, f32_to_f16)

HFR_CLONES static void div_f32(float *restrict d, size_t n, float a) {
    for (size_t i = 0; i < n; i++) d[i] /= a;
}
HFR_CLONES static void div_f64(double *restrict d, size_t n, double a) {
    for (size_t i = 0; i < n; i++) d[i] /= a;
}
static void div_i32(int32_t *d, size_t n, int32_t a) { /* floor division, as numpy's // */
    for (size_t i = 0; i < n; i++) {
        int32_t q = d[i] / a, r = d[i] % a;
        d[i] = (r != 0 && ((r < 0) != (a < 0))) ? q - 1 : q;
    }
}
static void div_i64(int64_t *d, size_t n, int64_t a) {
    for (size_t i = 0; i < n; i++) {
        int64_t q = d[i] / a, r = d[i] % a;
        d[i] = (r != 0 && ((r < 0) != (a < 0))) ? q - 1 : q;
    }
}

static void run_reduce(void *d, const void *first, const void **srcs, int ns, size_t n, int dtype, int op,
                       long avg, void *dst2) {
    /* AVG divides after the sum: with a second output, divide first, then copy. */
    void *d2 = avg > 0 ? NULL : dst2;
    switch (dtype) {
    case DT_F32:
        k_f32((float *)d, (const float *)first, (const float *const *)srcs, ns, n, op, (float *)d2);
        if (avg > 0) div_f32((float *)d, n, (float)avg);
        break;
    case DT_F64:
        k_f64((double *)d, (const double *)first, (const double *const *)srcs, ns, n, op, (double *)d2);
        if (avg > 0) div_f64((double *)d, n, (double)avg);
        break;
    case DT_I32:
        k_i32((int32_t *)d, (const int32_t *)first, (const int32_t *const *)srcs, ns, n, op, (int32_t *)d2);
        if (avg > 0) div_i32((int32_t *)d, n, (int32_t)avg);
        break;
    case DT_I64:
        k_i64((int64_t *)d, (const int64_t *)first, (const int64_t *const *)srcs, ns, n, op, (int64_t *)d2);
        if (avg > 0) div_i64((int64_t *)d, n, (int64_t)avg);
        break;
    case DT_BF16:
        k_bf16((uint16_t *)d, (const uint16_t *)first, (const uint16_t *const *)srcs, ns, n, op, (int)avg,
               (uint16_t *)dst2);
        return;
    case DT_F16:
        k_f16((uint16_t *)d, (const uint16_t *)first, (const uint16_t *const *)srcs, ns, n, op, (int)avg,
              (uint16_t *)dst2);
        return;
    case DT_U8: k_bor((uint8_t *)d, (const uint8_t *)first, (const uint8_t *const *)srcs, ns, n, (uint8_t *)dst2); return;
    }
    if (avg > 0 && dst2) memcpy(dst2, d, n * (size_t)dt_size[dtype]);
}

/* ---------------------------------------------------------------- Python bindings: kernels */
static PyObject *py_reduce(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "srcs", "dtype", "op", "avg", "first", "dst2", NULL};
    PyObject *dst_obj, *srcs_obj, *first_obj = Py_None, *dst2_obj = Py_None;
    int dtype, op;
    long avg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOii|lOO", kwlist, &dst_obj, &srcs_obj, &dtype, &op, &avg,
                                     &first_obj, &dst2_obj))
        return NULL;
    if (dtype < 0 || dtype > DT_U8) return PyErr_Format(PyExc_ValueError, "bad dtype code %d", dtype);
    if (dtype == DT_U8 ? op != OP_BOR : (op != OP_SUM && op != OP_MAX && op != OP_MIN))
        return PyErr_Format(PyExc_ValueError, "op %d is not defined for dtype code %d", op, dtype);
    if (avg > 0 && op != OP_SUM) return PyErr_Format(PyExc_ValueError, "avg needs op SUM");
    PyObject *seq = PySequence_Fast(srcs_obj, "srcs must be a sequence of buffers");
    if (!seq) return NULL;
    Py_ssize_t ns = PySequence_Fast_GET_SIZE(seq);
    if (ns > MAXSRC) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %d sources (got %zd)", MAXSRC, ns);
    }
    Py_buffer dst, first, dst2, srcs[MAXSRC];
    int have_first = 0, have_dst2 = 0;
    const void *ptrs[MAXSRC];
    Py_ssize_t got = 0;
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    int esz = dt_size[dtype];
    if (dst.len % esz) {
        PyErr_Format(PyExc_ValueError, "destination of %zd bytes is not a whole number of %d-byte elements",
                     dst.len, esz);
        goto done;
    }
    if (first_obj != Py_None) {
        if (PyObject_GetBuffer(first_obj, &first, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_first = 1;
        if (first.len != dst.len) {
            PyErr_Format(PyExc_ValueError, "first has %zd bytes, destination %zd", first.len, dst.len);
            goto done;
        }
    }
    if (dst2_obj != Py_None) {
        if (PyObject_GetBuffer(dst2_obj, &dst2, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_dst2 = 1;
        if (dst2.len != dst.len) {
            PyErr_Format(PyExc_ValueError, "dst2 has %zd bytes, destination %zd", dst2.len, dst.len);
            goto done;
        }
    }
    for (; got < ns; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &srcs[got], PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (srcs[got].len != dst.len) {
            PyErr_Format(PyExc_ValueError, "source %zd has %zd bytes, destination %zd", got, srcs[got].len,
                         dst.len);
            got++;
            goto done;
        }
        ptrs[got] = srcs[got].buf;
    }
    size_t n = (size_t)dst.len / (size_t)esz;
    const void *fp = have_first ? first.buf : NULL;
    void *d2 = have_dst2 ? dst2.buf : NULL;
    if (n) {
        if (dst.len >= 65536) {
            Py_BEGIN_ALLOW_THREADS run_reduce(dst.buf, fp, ptrs, (int)ns, n, dtype, op, avg, d2);
            Py_END_ALLOW_THREADS
        } else {
            run_reduce(dst.buf, fp, ptrs, (int)ns, n, dtype, op, avg, d2);
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&srcs[i]);
    if (have_first) PyBuffer_Release(&first);
    if (have_dst2) PyBuffer_Release(&dst2);
    PyBuffer_Release(&dst);
    Py_DECREF(seq);
    return ret;
}

static PyObject *py_copy(PyObject *self, PyObject *args) {
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*", &dst, &src)) return NULL;
    if (dst.len != src.len) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        return PyErr_Format(PyExc_ValueError, "copy: %zd bytes into %zd", src.len, dst.len);
    }
    if (dst.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS memcpy(dst.buf, src.buf, (size_t)dst.len);
        Py_END_ALLOW_THREADS
    } else if (dst.len) {
        memcpy(dst.buf, src.buf, (size_t)dst.len);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyObject *py_zero(PyObject *self, PyObject *args) {
    Py_buffer dst;
    if (!PyArg_ParseTuple(args, "w*", &dst)) return NULL;
    if (dst.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS memset(dst.buf, 0, (size_t)dst.len);
        Py_END_ALLOW_THREADS
    } else if (dst.len) {
        memset(dst.buf, 0, (size_t)dst.len);
    }
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Python bindings: sync */
static int get_words(PyObject *obj, Py_buffer *view, Py_ssize_t first, Py_ssize_t count) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0) return -1;
    if (((uintptr_t)view->buf & 7) || first < 0 || count < 0 || (first + count) * 8 > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_IndexError, "word index out of range (or buffer not 8-byte aligned)");
        return -1;
    }
    return 0;
}

static PyObject *py_load(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t i;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "On", &o, &i) || get_words(o, &v, i, 1) < 0) return NULL;
    int64_t x = __atomic_load_n((int64_t *)v.buf + i, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromLongLong(x);
}

static PyObject *py_store(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t i;
    long long x;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnL", &o, &i, &x) || get_words(o, &v, i, 1) < 0) return NULL;
    __atomic_store_n((int64_t *)v.buf + i, (int64_t)x, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static inline int64_t words_min(const int64_t *w, Py_ssize_t start, Py_ssize_t stride, Py_ssize_t count) {
    int64_t m = INT64_MAX;
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t x = __atomic_load_n(w + start + k * stride, __ATOMIC_SEQ_CST);
        if (x < m) m = x;
    }
    return m;
}

static PyObject *py_min_of(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t start, stride, count;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Onnn", &o, &start, &stride, &count)) return NULL;
    if (count < 1) return PyErr_Format(PyExc_ValueError, "count must be >= 1");
    if (get_words(o, &v, start, (count - 1) * stride + 1) < 0) return NULL;
    int64_t m = words_min((int64_t *)v.buf, start, stride, count);
    PyBuffer_Release(&v);
    return PyLong_FromLongLong(m);
}

static long sys_futex(int32_t *addr, int op, int32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

static void to_timespec(double t, struct timespec *ts) {
    if (t < 0) t = 0;
    ts->tv_sec = (time_t)t;
    ts->tv_nsec = (long)((t - (double)ts->tv_sec) * 1e9);
}

/* publish(buf, word, value, epoch_off, waiters_word): store a counter, bump the epoch, wake sleepers.
 * word == waiters_word means "no counter, just bump and wake". */
static PyObject *py_publish(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t i, epoch_off, waiters;
    long long x;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnLnn", &o, &i, &x, &epoch_off, &waiters)) return NULL;
    if (PyObject_GetBuffer(o, &v, PyBUF_WRITABLE) < 0) return NULL;
    if (((uintptr_t)v.buf & 7) || i < 0 || (i + 1) * 8 > v.len || waiters < 0 || (waiters + 1) * 8 > v.len ||
        epoch_off < 0 || epoch_off + 4 > v.len || (epoch_off & 3)) {
        PyBuffer_Release(&v);
        return PyErr_Format(PyExc_IndexError, "publish: index out of range");
    }
    int64_t *w = (int64_t *)v.buf;
    int32_t *epoch = (int32_t *)((char *)v.buf + epoch_off);
    if (i != waiters) __atomic_store_n(w + i, (int64_t)x, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(epoch, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(w + waiters, __ATOMIC_SEQ_CST) > 0) sys_futex(epoch, FUTEX_WAKE, INT_MAX, NULL);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* epoch_wait(buf, epoch_off, waiters_word, expected, timeout, spin=100) -> True when the epoch moved.
 * The caller loads the epoch (load32), checks its conditions, then sleeps here until a publish. */
static PyObject *py_epoch_wait(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t epoch_off, waiters;
    int expected, spin = 100;
    double timeout;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Onnid|i", &o, &epoch_off, &waiters, &expected, &timeout, &spin)) return NULL;
    if (PyObject_GetBuffer(o, &v, PyBUF_WRITABLE) < 0) return NULL;
    if (((uintptr_t)v.buf & 7) || waiters < 0 || (waiters + 1) * 8 > v.len || epoch_off < 0 ||
        epoch_off + 4 > v.len || (epoch_off & 3)) {
        PyBuffer_Release(&v);
        return PyErr_Format(PyExc_IndexError, "epoch_wait: index out of range");
    }
    int64_t *w = (int64_t *)v.buf;
    int32_t *epoch = (int32_t *)((char *)v.buf + epoch_off);
    int moved = __atomic_load_n(epoch, __ATOMIC_SEQ_CST) != expected;
    if (!moved) {
        Py_BEGIN_ALLOW_THREADS
        for (int k = 0; k < spin && !moved; k++) {
            CPU_RELAX();
            moved = __atomic_load_n(epoch, __ATOMIC_SEQ_CST) != expected;
        }
        if (!moved) {
            struct timespec ts;
            to_timespec(timeout, &ts);
            __atomic_add_fetch(w + waiters, 1, __ATOMIC_SEQ_CST);
            sys_futex(epoch, FUTEX_WAIT, expected, &ts);
            __atomic_sub_fetch(w + waiters, 1, __ATOMIC_SEQ_CST);
            moved = __atomic_load_n(epoch, __ATOMIC_SEQ_CST) != expected;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    return PyBool_FromLong(moved);
}

static PyObject *py_load32(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "On", &o, &off)) return NULL;
    if (PyObject_GetBuffer(o, &v, PyBUF_WRITABLE) < 0) return NULL;
    if (off < 0 || off + 4 > v.len || (((uintptr_t)v.buf + off) & 3)) {
        PyBuffer_Release(&v);
        return PyErr_Format(PyExc_IndexError, "load32: offset out of range");
    }
    int32_t x = __atomic_load_n((int32_t *)((char *)v.buf + off), __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromLong(x);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- the pipeline loop (engine.py's _pipeline, in C)
 *
 * pipeline(ctrl, geometry, locations, input, output, kernel, state, poll) -> (status, state)
 *   Runs this rank's chunk loop for one collective with the GIL released, exactly as
 *   hfreduce.engine.Engine._pipeline_py does, until the collective is done (status 0), nothing
 *   moved for `poll` seconds (status 1: the caller checks liveness and deadlines, then calls
 *   again with the returned state), or the node's abort word is set (status 2).
 */
typedef struct {
    int64_t *w;
    int32_t *epoch;
    Py_ssize_t waiters, abort_word, final_word, stride, w_posted, w_reduced, w_consumed; /* rank 0's words */
    int L, me, K;
} ctl_t;

/* My copy of a per-rank counter whose rank-0 word is `word0`. */
static inline Py_ssize_t ctl_mine(const ctl_t *c, Py_ssize_t word0) { return word0 + (Py_ssize_t)c->me * c->stride; }

static inline void ctl_publish(ctl_t *c, Py_ssize_t word, int64_t v) {
    __atomic_store_n(c->w + word, v, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(c->epoch, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(c->w + c->waiters, __ATOMIC_SEQ_CST) > 0) sys_futex(c->epoch, FUTEX_WAKE, INT_MAX, NULL);
}

/* The node's control block as `c`, from the shared buffer `ctrl_obj` and the geometry tuple
 * (epoch, waiters, abort, final, rank block 0, stride, POSTED, REDUCED, CONSUMED: engine.py's
 * _geometry); `v` holds the buffer until the caller releases it. Returns -1 with an exception set. */
static int ctl_open(PyObject *ctrl_obj, PyObject *geo, int L, int me, int K, ctl_t *c, Py_buffer *v,
                    const char *who) {
    Py_ssize_t epoch_off, waiters, abort_word, final_word, rank_word0, stride, f_posted, f_reduced, f_consumed;
    if (!PyArg_ParseTuple(geo, "nnnnnnnnn", &epoch_off, &waiters, &abort_word, &final_word, &rank_word0, &stride,
                          &f_posted, &f_reduced, &f_consumed))
        return -1;
    if (PyObject_GetBuffer(ctrl_obj, v, PyBUF_WRITABLE) < 0) return -1;
    if (((uintptr_t)v->buf & 7) || (epoch_off & 3) || epoch_off + 4 > v->len ||
        (rank_word0 + (Py_ssize_t)(L - 1) * stride + f_consumed + 1) * 8 > v->len || (final_word + 1) * 8 > v->len) {
        PyBuffer_Release(v);
        PyErr_Format(PyExc_IndexError, "%s: control words out of range", who);
        return -1;
    }
    *c = (ctl_t){.w = (int64_t *)v->buf, .epoch = (int32_t *)((char *)v->buf + epoch_off), .waiters = waiters,
                 .abort_word = abort_word, .final_word = final_word, .stride = stride,
                 .w_posted = rank_word0 + f_posted, .w_reduced = rank_word0 + f_reduced,
                 .w_consumed = rank_word0 + f_consumed,
                 .L = L, .me = me, .K = K};
    return 0;
}

/* Nothing to do: watch the epoch for `spin` rounds (cheap), then sleep on it for at most `left`
 * seconds until a peer publishes. Returns 0 when `left` ran out (the caller reports idleness). */
static int idle_wait(ctl_t *c, int32_t e, int spin, double left) {
    for (int k = 0; k < spin; k++) {
        CPU_RELAX();
        if (__atomic_load_n(c->epoch, __ATOMIC_SEQ_CST) != e) return 1;
    }
    if (left <= 0) return 0;
    struct timespec ts;
    to_timespec(left, &ts);
    __atomic_add_fetch(c->w + c->waiters, 1, __ATOMIC_SEQ_CST);
    sys_futex(c->epoch, FUTEX_WAIT, e, &ts);
    __atomic_sub_fetch(c->w + c->waiters, 1, __ATOMIC_SEQ_CST);
    return 1;
}

/* End of one round of a pipeline loop: after progress, restart the idle clock; with nothing
 * ready, watch the epoch a little, then sleep on it until a peer publishes. Returns 0 once the
 * loop has been idle for `poll` seconds (the caller returns to Python to check liveness). */
static int step_end(ctl_t *c, int progressed, int32_t e, int spin, double poll, double *idle_since) {
    if (progressed) {
        *idle_since = now_s();
        return 1;
    }
    return idle_wait(c, e, spin, poll - (now_s() - *idle_since));
}

static inline void slice_of(size_t n, int parts, int s, size_t *a, size_t *b) {
    size_t units = n / 64;
    *a = (size_t)s * units / (size_t)parts * 64;
    *b = s < parts - 1 ? (size_t)(s + 1) * units / (size_t)parts * 64 : n;
}

/* Chunk i (from the collective's start) begins at byte *c0; my slice of it is [*a, *b) of the chunk. */
static inline void my_slice(int64_t i, long long chunk, long long nbytes, int L, int me, size_t *c0, size_t *a,
                            size_t *b) {
    size_t lo = (size_t)(i * chunk), hi = lo + (size_t)chunk < (size_t)nbytes ? lo + (size_t)chunk : (size_t)nbytes;
    *c0 = lo;
    slice_of(hi - lo, L, me, a, b);
}

static void stage(char *slot, size_t v0, size_t v1, char *in, int64_t in_off, int64_t in_len, size_t c0) {
    /* virtual bytes [v0, v1) of the caller's input into slot (slot[0] = virtual c0), zeros elsewhere */
    if (v1 <= v0) return;
    char *dst = slot + (v0 - c0);
    size_t n = v1 - v0;
    if (!in) { memset(dst, 0, n); return; }
    int64_t i0 = in_off, i1 = in_off + in_len;
    int64_t a = (int64_t)v0 > i0 ? (int64_t)v0 : i0, b = (int64_t)v1 < i1 ? (int64_t)v1 : i1;
    if (a >= b) { memset(dst, 0, n); return; }
    if (a > (int64_t)v0) memset(dst, 0, (size_t)(a - (int64_t)v0));
    if (b < (int64_t)v1) memset(slot + (b - (int64_t)c0), 0, (size_t)((int64_t)v1 - b));
    memcpy(slot + (a - (int64_t)c0), in + (a - i0), (size_t)(b - a));
}

static PyObject *py_pipeline(PyObject *self, PyObject *args) {
    PyObject *ctrl_obj, *geo_obj, *loc_obj, *kind_obj;
    int L, me, K, dtype, op, multi, direct, spin;
    long long g0, nchunks, nbytes, chunk, in_addr, in_off, in_len, out_addr, out_off, out_len, avg;
    long long s_in, s_ready, s_red, s_out;
    double poll;
    if (!PyArg_ParseTuple(args, "OO!(iii)(LLLL)OO(LLL)(LLL)(iiLii)(LLLL)di", &ctrl_obj, &PyTuple_Type, &geo_obj, &L,
                          &me, &K, &g0, &nchunks, &nbytes, &chunk, &loc_obj, &kind_obj, &in_addr, &in_off, &in_len,
                          &out_addr, &out_off, &out_len, &dtype, &op, &avg, &multi, &direct, &s_in, &s_ready,
                          &s_red, &s_out, &poll, &spin))
        return NULL;
    if (L < 1 || L > MAXSRC || me < 0 || me >= L || K < 1 || chunk <= 0 || dtype < 0 || dtype > DT_U8)
        return PyErr_Format(PyExc_ValueError, "pipeline: bad geometry");
    char *loc[MAXSRC];
    int kind[MAXSRC];
    PyObject *ls = PySequence_Fast(loc_obj, "locations"), *ks = PySequence_Fast(kind_obj, "kinds");
    if (!ls || !ks || PySequence_Fast_GET_SIZE(ls) != L || PySequence_Fast_GET_SIZE(ks) != L) {
        Py_XDECREF(ls);
        Py_XDECREF(ks);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "pipeline: one location per local rank");
        return NULL;
    }
    for (int r = 0; r < L; r++) {
        loc[r] = (char *)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(ls, r));
        kind[r] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(ks, r));
    }
    Py_DECREF(ls);
    Py_DECREF(ks);
    if (PyErr_Occurred()) return NULL;
    Py_buffer v;
    ctl_t c;
    if (ctl_open(ctrl_obj, geo_obj, L, me, K, &c, &v, "pipeline") < 0) return NULL;
    const Py_ssize_t stride = c.stride;
    char *in = in_addr ? (char *)(uintptr_t)in_addr : NULL;
    char *out = out_addr ? (char *)(uintptr_t)out_addr : NULL;
    const int esz = dt_size[dtype];
    const int64_t gend = g0 + nchunks;
    const int registered = kind[me] == 1;
    /* [Note: pushing results into registered buffers] On one node with every buffer registered
     * (in the heaps every rank maps), the owner of a slice writes each finished block straight
     * into every peer's buffer while it is still in cache, instead of every peer copying the
     * slice out later: one pass less over the data. Slice s of any buffer is read and written by
     * slice s's owner only, so this needs no extra waiting; REDUCED > g means chunk g is final
     * everywhere. */
    int push = !multi && L > 1;
    for (int r = 0; r < L; r++) push = push && kind[r] == 1;
    int status = 1;
    Py_BEGIN_ALLOW_THREADS
    double idle_since = now_s();
    for (;;) {
        if (s_out >= gend) { status = 0; break; }
        if (__atomic_load_n(c.w + c.abort_word, __ATOMIC_SEQ_CST)) { status = 2; break; }
        int32_t e = __atomic_load_n(c.epoch, __ATOMIC_SEQ_CST);
        int progressed = 1;
        /* 1. reduce my slice of the oldest chunk whose inputs are all in place */
        if (s_red < s_ready && words_min(c.w, c.w_posted, stride, L) > s_red) {
            int64_t g = s_red;
            size_t c0, a, b;
            my_slice(g - g0, chunk, nbytes, L, me, &c0, &a, &b);
            if (b > a) {
                const void *srcs[MAXSRC];
                int ns = 0;
                char *dst = NULL;
                for (int r = 0; r < L; r++) {
                    char *base = kind[r] ? loc[r] + (g - g0) * chunk : loc[r] + (g % K) * chunk;
                    if (r == me) dst = base + a;
                    else srcs[ns++] = base + a;
                }
                const char *first = NULL;
                char *dst2 = NULL;
                if (direct && !registered) {
                    if (in && in_off <= (int64_t)(c0 + a) && (int64_t)(c0 + b) <= in_off + in_len)
                        first = in + (c0 + a - in_off);
                    if (!multi && out && out_off <= (int64_t)(c0 + a) && (int64_t)(c0 + b) <= out_off + out_len)
                        dst2 = out + (c0 + a - out_off);
                }
                if (push) {
                    const size_t step = 32768; /* a block in L1/L2 while it is copied to the peers */
                    for (size_t x = 0; x < b - a; x += step) {
                        size_t m = b - a - x < step ? b - a - x : step;
                        const void *sub[MAXSRC];
                        for (int k = 0; k < ns; k++) sub[k] = (const char *)srcs[k] + x;
                        run_reduce(dst + x, NULL, sub, ns, m / (size_t)esz, dtype, op, avg, NULL);
                        for (int k = 0; k < ns; k++) memcpy((char *)srcs[k] + x, dst + x, m);
                    }
                } else {
                    run_reduce(dst, first, srcs, ns, (b - a) / (size_t)esz, dtype, op, multi ? 0 : avg, dst2);
                }
            }
            s_red++;
            ctl_publish(&c, ctl_mine(&c, c.w_reduced), s_red);
        }
        /* 2. host buffers: a staged chunk is ready at once */
        else if (s_ready < s_in) {
            s_ready++;
            ctl_publish(&c, ctl_mine(&c, c.w_posted), s_ready);
        }
        /* 3. stage the next chunk when its slot is free (not my slice when it is read in place) */
        else if (s_in < gend && s_in - s_out < K && words_min(c.w, c.w_consumed, stride, L) > s_in - K) {
            int64_t g = s_in;
            size_t c0 = (size_t)((g - g0) * chunk), c1 = c0 + (size_t)chunk < (size_t)nbytes ? c0 + (size_t)chunk : (size_t)nbytes;
            char *slot = loc[me] + (g % K) * chunk;
            size_t a, b;
            slice_of(c1 - c0, L, me, &a, &b);
            int fused = direct && b > a && in && in_off <= (int64_t)(c0 + a) && (int64_t)(c0 + b) <= in_off + in_len;
            if (fused) {
                stage(slot, c0, c0 + a, in, in_off, in_len, c0);
                stage(slot, c0 + b, c1, in, in_off, in_len, c0);
            } else {
                stage(slot, c0, c1, in, in_off, in_len, c0);
            }
            s_in++;
        }
        /* 4. copy out the oldest final chunk */
        else if (s_out < s_red && (multi ? __atomic_load_n(c.w + c.final_word, __ATOMIC_SEQ_CST) > s_out
                                         : words_min(c.w, c.w_reduced, stride, L) > s_out)) {
            int64_t g = s_out;
            size_t c0 = (size_t)((g - g0) * chunk), c1 = c0 + (size_t)chunk < (size_t)nbytes ? c0 + (size_t)chunk : (size_t)nbytes;
            if (out) {
                int64_t lo = out_off > (int64_t)c0 ? out_off : (int64_t)c0;
                int64_t hi = out_off + out_len < (int64_t)c1 ? out_off + out_len : (int64_t)c1;
                lo -= (int64_t)c0;
                hi -= (int64_t)c0;
                size_t ma, mb;
                slice_of(c1 - c0, L, me, &ma, &mb);
                if (push) lo = hi; /* every slice was pushed into my buffer by its owner */
                int skip_mine = registered ||
                                (direct && !registered && !multi && mb > ma && out_off <= (int64_t)(c0 + ma) &&
                                 (int64_t)(c0 + mb) <= out_off + out_len);
                for (int s = 0; s < L && lo < hi; s++) {
                    size_t a, b;
                    slice_of(c1 - c0, L, s, &a, &b);
                    int64_t x = (int64_t)a > lo ? (int64_t)a : lo, y = (int64_t)b < hi ? (int64_t)b : hi;
                    if (x >= y || (s == me && skip_mine)) continue;
                    char *base = kind[s] ? loc[s] + (g - g0) * chunk : loc[s] + (g % K) * chunk;
                    memcpy(out + (c0 + (size_t)x - (size_t)out_off), base + x, (size_t)(y - x));
                }
            }
            s_out++;
            ctl_publish(&c, ctl_mine(&c, c.w_consumed), s_out);
        } else {
            progressed = 0;
        }
        if (!step_end(&c, progressed, e, spin, poll, &idle_since)) { status = 1; break; }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return Py_BuildValue("i(LLLL)", status, s_in, s_ready, s_red, s_out);
}

/* ---------------------------------------------------------------- single-copy allreduce on one node (CMA)
 *
 * pipeline_cma(ctrl, geometry, (L, me), (g0, nchunks, nbytes, chunk), pids, addrs, (dtype, op, avg),
 *              tmp, state, poll, spin) -> (status, state, errno)
 *   The ranks' own buffers stay where they are (private memory); every rank reads its peers' bytes
 *   straight from their address spaces with process_vm_readv (cross-memory attach, one copy done
 *   by the kernel). Chunk g is cut into one slice per local rank; for its slice, a rank reads each
 *   peer's input block by block into `tmp` (small enough to stay in L2), adds it into its own
 *   buffer in place, and writes the finished block straight back into every peer's buffer
 *   (process_vm_writev, from cache: the allgather half costs no second pass). That is safe
 *   without further waiting: slice s of any rank's buffer is read and written by slice s's owner
 *   only, in that order. A rank publishes REDUCED and CONSUMED once its slice of chunk g is
 *   pushed; the caller waits for every rank's CONSUMED before returning, so no rank touches a
 *   buffer its owner got back.
 *   status: 0 done, 1 idle for `poll` seconds, 2 the node's abort word is set, 3 process_vm_readv
 *   failed (errno says why: ESRCH, the peer is gone).
 */
#include <sys/uio.h>

static int cma_read(pid_t pid, void *dst, uintptr_t src, size_t n) {
    while (n) {
        struct iovec l = {dst, n}, r = {(void *)src, n};
        ssize_t k = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        if (k == 0) return EFAULT;
        dst = (char *)dst + k;
        src += (size_t)k;
        n -= (size_t)k;
    }
    return 0;
}

static int cma_write(pid_t pid, uintptr_t dst, const void *src, size_t n) {
    while (n) {
        struct iovec l = {(void *)src, n}, r = {(void *)dst, n};
        ssize_t k = process_vm_writev(pid, &l, 1, &r, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        if (k == 0) return EFAULT;
        src = (const char *)src + k;
        dst += (size_t)k;
        n -= (size_t)k;
    }
    return 0;
}

/* Bytes [x0, x1) of my own buffer (addr[me]) += every local peer's same bytes, read with
 * process_vm_readv block by block into `tmp` (one L2-sized block of `blk` bytes per peer), or
 * straight from where the peer's buffer is mapped here when `direct` gives that address
 * (registered buffers: the heaps every local rank maps); `push` also writes each finished block
 * (still in cache) into every peer's buffer. */
static int cma_reduce(const pid_t *pid, const uintptr_t *addr, const uintptr_t *direct, int L, int me, char *tmp,
                      size_t blk, size_t x0, size_t x1, int dtype, int op, long long avg, int push) {
    char *mine = (char *)addr[me];
    const int esz = dt_size[dtype];
    int err = 0;
    for (size_t x = x0; x < x1 && !err; x += blk) {
        size_t n = x1 - x < blk ? x1 - x : blk;
        const void *srcs[MAXSRC];
        int ns = 0;
        for (int r = 0; r < L && !err; r++) {
            if (r == me) continue;
            if (direct && direct[r]) {
                srcs[ns++] = (const char *)direct[r] + x;
                continue;
            }
            char *t = tmp + (size_t)ns * blk;
            err = cma_read(pid[r], t, addr[r] + x, n);
            srcs[ns++] = t;
        }
        if (!err) run_reduce(mine + x, NULL, srcs, ns, n / (size_t)esz, dtype, op, avg, NULL);
        for (int r = 0; push && r < L && !err; r++)
            if (r != me) err = cma_write(pid[r], addr[r] + x, mine + x, n);
    }
    return err;
}

static PyObject *py_pipeline_cma(PyObject *self, PyObject *args) {
    PyObject *ctrl_obj, *geo_obj, *pid_obj, *addr_obj, *tmp_obj;
    int L, me, dtype, op, spin;
    long long g0, nchunks, nbytes, chunk, avg, s_red, s_out;
    double poll;
    if (!PyArg_ParseTuple(args, "OO!(ii)(LLLL)OO(iiL)O(LL)di", &ctrl_obj, &PyTuple_Type, &geo_obj, &L, &me, &g0,
                          &nchunks, &nbytes, &chunk, &pid_obj, &addr_obj, &dtype, &op, &avg, &tmp_obj, &s_red,
                          &s_out, &poll, &spin))
        return NULL;
    if (L < 2 || L > MAXSRC || me < 0 || me >= L || chunk <= 0 || dtype < 0 || dtype > DT_U8)
        return PyErr_Format(PyExc_ValueError, "pipeline_cma: bad geometry");
    pid_t pid[MAXSRC];
    uintptr_t addr[MAXSRC];
    PyObject *ps = PySequence_Fast(pid_obj, "pids"), *as = PySequence_Fast(addr_obj, "addrs");
    if (!ps || !as || PySequence_Fast_GET_SIZE(ps) != L || PySequence_Fast_GET_SIZE(as) != L) {
        Py_XDECREF(ps);
        Py_XDECREF(as);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "pipeline_cma: one pid and address per local rank");
        return NULL;
    }
    for (int r = 0; r < L; r++) {
        pid[r] = (pid_t)PyLong_AsLong(PySequence_Fast_GET_ITEM(ps, r));
        addr[r] = (uintptr_t)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(as, r));
    }
    Py_DECREF(ps);
    Py_DECREF(as);
    if (PyErr_Occurred()) return NULL;
    Py_buffer v, tb;
    ctl_t c;
    if (ctl_open(ctrl_obj, geo_obj, L, me, 1, &c, &v, "pipeline_cma") < 0) return NULL;
    if (PyObject_GetBuffer(tmp_obj, &tb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    /* one tmp block per peer, 64-byte aligned, a whole number of elements */
    size_t blk = (size_t)tb.len / (size_t)(L - 1);
    blk = blk / 64 * 64;
    if (blk < 64 || ((uintptr_t)tb.buf & 63)) {
        PyBuffer_Release(&v);
        PyBuffer_Release(&tb);
        return PyErr_Format(PyExc_ValueError, "pipeline_cma: tmp too small or not 64-byte aligned");
    }
    const Py_ssize_t stride = c.stride;
    char *tmp = (char *)tb.buf;
    const int64_t gend = g0 + nchunks;
    int status = 1, err = 0;
    Py_BEGIN_ALLOW_THREADS
    double idle_since = now_s();
    for (;;) {
        if (s_out >= gend) { status = 0; break; }
        if (__atomic_load_n(c.w + c.abort_word, __ATOMIC_SEQ_CST)) { status = 2; break; }
        int32_t e = __atomic_load_n(c.epoch, __ATOMIC_SEQ_CST);
        int progressed = 1;
        /* 1. reduce my slice of the next chunk (its inputs are in place once every rank posted) */
        if (s_red < gend && words_min(c.w, c.w_posted, stride, L) > s_red) {
            int64_t g = s_red;
            size_t c0, a, b;
            my_slice(g - g0, chunk, nbytes, L, me, &c0, &a, &b);
            err = cma_reduce(pid, addr, NULL, L, me, tmp, blk, c0 + a, c0 + b, dtype, op, avg, 1);
            if (err) { status = 3; break; }
            s_red++;
            s_out = s_red;
            ctl_publish(&c, ctl_mine(&c, c.w_reduced), s_red);
            ctl_publish(&c, ctl_mine(&c, c.w_consumed), s_out);
        } else {
            progressed = 0;
        }
        if (!step_end(&c, progressed, e, spin, poll, &idle_since)) { status = 1; break; }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    PyBuffer_Release(&tb);
    return Py_BuildValue("i(LL)i", status, s_red, s_out, err);
}

/* ---------------------------------------------------------------- lanes: allreduce across nodes, one tree per slice
 *
 * pipeline_lanes(ctrl, geometry, (L, me), (g0, nchunks, nbytes, chunk), pids, (addrs, direct), (dtype, op, avg),
 *                tmp, rbuf, links, trees, wire, pidfds, (timeout, net_timeout, poll), spin[, window])
 *     -> (status, chunks done, errno, where, header bytes, partial-send link mask)
 *
 *   [Note: lanes] Across nodes, for an allreduce of host buffers, local rank s of every node
 *   owns slice s of every chunk on its node and runs its own double binary tree with the local
 *   rank s of the other nodes (its "lane"; the "one leader per slice"). Per chunk g, in
 *   this one loop, without the GIL, no thread hand-offs and no staging in the arena:
 *     1. reduce my slice over the node: read each local peer's bytes with process_vm_readv into
 *        an L2-sized block and add it into my own buffer, in place (as pipeline_cma); a peer's
 *        registered buffer (in the heaps every local rank maps: `direct` gives its address
 *        here, else 0) is read where it lies;
 *     2. up, for tree 0 then tree 1 (each carries one half of my slice): receive each child's
 *        partial half, add it into mine (the root also divides for AVG), send mine to my parent;
 *     3. down, tree 0 then tree 1: receive the final half from my parent straight into my
 *        buffer, send it to my children;
 *     4. write the final slice straight into every local peer's buffer (process_vm_writev, or
 *        memcpy into a registered one).
 *   Slice s of any buffer is read and written only by slice s's owner, so nothing else waits.
 *   Every node walks the same phases in the same order and each phase is a tree protocol, so
 *   blocking sends cannot deadlock. Frames are network.transport frames (prefix + hfreduce's
 *   DATA_HEADER + payload) on the lane's own connections; a frame that is not the expected
 *   one comes back to Python (status 5) with its header bytes: a mismatched call, or an ABORT
 *   frame from a lane peer that failed.
 *   The loop never returns while it waits: it watches the node's abort word and the local
 *   peers' pidfds itself, and the deadlines (no progress for `timeout` locally or `net_timeout`
 *   on a connection). status: 0 done, 2 abort word set, 3 process_vm_readv/writev failed
 *   (errno), 4 connection `where` failed (errno; 0: closed by the peer), 5 unexpected frame on
 *   connection `where`, 6 timeout (where: a connection, or -1 - r when local rank r never
 *   posted), 7 local rank `where` died.
 */
#include <poll.h>
#include <sys/socket.h>

/* The wire format (hfreduce/wire.py holds the one definition; wire.check_c compares these with it
 * at import through _C.wire_header, so a change on one side that the other does not follow fails
 * there instead of as a mismatch between nodes): network.transport's prefix (magic, header length,
 * payload length) then wire.DATA_HEADER "!BBBBbiQQQQ" (type, tree, kind, dtype, op, root, seq,
 * chunk, nbytes, payload length). */
#define WIRE_MAGIC 0x46465431u /* network.transport MAGIC */
#define WIRE_HEADER 41         /* wire.DATA_HEADER.size */
#define WIRE_T_DATA 1          /* wire.T_DATA */
#define LANE_PREFIX 16         /* network.transport PREFIX_SIZE */
#define LANE_HDR (LANE_PREFIX + WIRE_HEADER)
#define LANE_MAXLINK 64
#define LANE_MAXKID 16

typedef struct {
    ctl_t c;
    int npid, pidfd[MAXSRC], pidr[MAXSRC];
    double timeout, net_timeout, poll, last;
    int where, err;
    uint64_t partial;
    unsigned char got[LANE_HDR];
    /* wire fields: kind, dtype, op, root, seq, nbytes */
    int kind, wdtype, wop, root;
    uint64_t seq, wnbytes;
    /* the lane's two threads (see "up and down overlap"): set when the other one failed */
    int *stop;
    int wakefd;
} lane_t;

#define LANE_STOPPED 8 /* internal: the other thread of the lane failed first */

static void put_be32(unsigned char *p, uint32_t v) {
    for (int i = 3; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
}
static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
}

static void lane_header(const lane_t *ln, unsigned char *h, int t, int64_t g, uint64_t n) {
    put_be32(h, WIRE_MAGIC);
    put_be32(h + 4, WIRE_HEADER);
    put_be64(h + 8, n);
    h[16] = WIRE_T_DATA;
    h[17] = (unsigned char)t;
    h[18] = (unsigned char)ln->kind;
    h[19] = (unsigned char)ln->wdtype;
    h[20] = (unsigned char)(signed char)ln->wop;
    put_be32(h + 21, (uint32_t)(int32_t)ln->root);
    put_be64(h + 25, ln->seq);
    put_be64(h + 33, (uint64_t)g);
    put_be64(h + 41, ln->wnbytes);
    put_be64(h + 49, n);
}

/* Wait until `fd` is ready for `ev`; meanwhile watch the abort word, the local peers' pidfds and
 * the connection's deadline. 0: ready (or an error the next call reports), else a status. */
static int lane_poll(lane_t *ln, int fd, short ev, int link) {
    struct pollfd p[2 + MAXSRC];
    for (;;) {
        if (__atomic_load_n(ln->c.w + ln->c.abort_word, __ATOMIC_SEQ_CST)) return 2;
        if (ln->stop && __atomic_load_n(ln->stop, __ATOMIC_SEQ_CST)) return LANE_STOPPED;
        double left = ln->net_timeout - (now_s() - ln->last);
        if (left <= 0) { ln->where = link; return 6; }
        if (left > ln->poll) left = ln->poll;
        p[0].fd = fd; p[0].events = ev; p[0].revents = 0;
        for (int i = 0; i < ln->npid; i++) { p[1 + i].fd = ln->pidfd[i]; p[1 + i].events = POLLIN; p[1 + i].revents = 0; }
        int np = 1 + ln->npid;
        if (ln->stop && ln->wakefd >= 0) { p[np].fd = ln->wakefd; p[np].events = POLLIN; p[np].revents = 0; np++; }
        int k = poll(p, (nfds_t)np, (int)(left * 1000.0) + 1);
        if (k < 0) {
            if (errno == EINTR) continue;
            ln->err = errno; ln->where = link;
            return 4;
        }
        for (int i = 0; i < ln->npid; i++)
            if (p[1 + i].revents) { ln->where = ln->pidr[i]; return 7; }
        if (p[0].revents) return 0;
    }
}

static int lane_recv(lane_t *ln, int fd, int link, unsigned char *dst, size_t n) {
    while (n) {
        ssize_t k = recv(fd, dst, n, MSG_DONTWAIT);
        if (k > 0) { dst += k; n -= (size_t)k; ln->last = now_s(); continue; }
        if (k == 0) { ln->err = 0; ln->where = link; return 4; }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { ln->err = errno; ln->where = link; return 4; }
        int st = lane_poll(ln, fd, POLLIN, link);
        if (st) return st;
    }
    return 0;
}

/* Receive one frame's prefix and header; it must be exactly `want` (else status 5, bytes in ln->got). */
static int lane_expect(lane_t *ln, int fd, int link, const unsigned char *want) {
    int st = lane_recv(ln, fd, link, ln->got, LANE_HDR);
    if (st) return st;
    if (memcmp(ln->got, want, LANE_HDR)) { ln->where = link; return 5; }
    return 0;
}

static int lane_send(lane_t *ln, int fd, int link, const unsigned char *hdr, const char *p, size_t n) {
    struct iovec iov[2] = {{(void *)hdr, LANE_HDR}, {(void *)p, n}};
    int i = 0, sent = 0;
    while (i < 2) {
        if (iov[i].iov_len == 0) { i++; continue; }
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov + i;
        m.msg_iovlen = (size_t)(2 - i);
        ssize_t k = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k > 0) {
            sent = 1;
            ln->last = now_s();
            while (k > 0 && i < 2) {
                size_t d = (size_t)k < iov[i].iov_len ? (size_t)k : iov[i].iov_len;
                iov[i].iov_base = (char *)iov[i].iov_base + d;
                iov[i].iov_len -= d;
                k -= (ssize_t)d;
                if (iov[i].iov_len == 0) i++;
            }
            continue;
        }
        int st;
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            ln->err = errno; ln->where = link;
            st = 4;
        } else {
            st = lane_poll(ln, fd, POLLOUT, link);
            if (!st) continue;
        }
        if (sent && link < 64) ln->partial |= (uint64_t)1 << link;
        return st;
    }
    return 0;
}

/* [Note: up and down overlap]
 * A lane runs each collective on two threads: the up thread (this slice over the node, then up
 * both trees: receive the children's partial halves, add, send to the parent) and the calling
 * thread, which goes down (receive the final halves from the parent, send them to the children,
 * write the final slice into the local peers' buffers). On every connection one thread sends
 * and the other receives, so a link carries chunk g+1's partial one way while chunk g's final
 * comes back the other: a link that every byte must cross both ways (two zones joined by one
 * slow link) is busy in both directions at once, and an allreduce takes S/B over it instead of
 * 2 S/B (a single loop that went up then down per chunk left each direction idle half the time).
 * Python turns it on (`window` >= 0) where the group spans zones: on a host whose "links" are
 * its own CPUs (loopback, a few cores) the second thread only competes with the first, and
 * one chunk after the other measured faster there. The up thread runs at most `window` chunks
 * ahead of the down one (their bytes still in the caches); the down thread takes chunk g only
 * once the up thread is done with it (at the root the final value is there, elsewhere the partial has left
 * the buffer the final lands in). Each pass alone is a tree protocol, so blocking sends cannot
 * deadlock. A thread that fails sets `stop` and wakes the other (eventfd) out of its poll; the
 * first failure is the one reported. */
#include <pthread.h>
#include <sys/eventfd.h>

typedef struct {
    int L, me, dtype, op, esz;
    long long avg, chunk, nbytes;
    int64_t g0, gend;
    const pid_t *pid;
    const uintptr_t *addr, *direct;
    char *mine, *tmp, *rbuf;
    size_t blk, rcap;
    const int *links, *parent, *nkid;
    int (*kids)[LANE_MAXKID];
    int stop, wakefd, first, up_status, window;
    int64_t up_done, down_done;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    lane_t up, down; /* each thread's own deadline, diagnosis and partial-send mask */
} lane_run_t;

/* Wait on the lane's condition (mutex held) for at most `secs`. */
static void lane_cond_wait(lane_run_t *R, double secs) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = ts.tv_nsec + (long long)(secs * 1e9);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&R->cv, &R->mu, &ts);
}

/* The thread `who` (1 up, 2 down) failed: stop and wake the other. */
static void lane_stop(lane_run_t *R, int who) {
    pthread_mutex_lock(&R->mu);
    if (!R->first) R->first = who;
    __atomic_store_n(&R->stop, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&R->cv);
    pthread_mutex_unlock(&R->mu);
    if (R->wakefd >= 0) {
        uint64_t one = 1;
        ssize_t k = write(R->wakefd, &one, sizeof one);
        (void)k;
    }
}

/* The up pass of chunk g: my slice over the node, then up both trees. */
static int lane_up_one(lane_run_t *R, lane_t *ln, int64_t g) {
    unsigned char hdr[LANE_HDR];
    size_t c0, a, b;
    my_slice(g - R->g0, R->chunk, R->nbytes, R->L, R->me, &c0, &a, &b);
    /* 1. my slice over the node, into my own buffer */
    if (R->L > 1)
        ln->err = cma_reduce(R->pid, R->addr, R->direct, R->L, R->me, R->tmp, R->blk, c0 + a, c0 + b, R->dtype,
                             R->op, 0, 0);
    if (ln->err) return 3;
    /* 2. up both trees */
    for (int t = 0; t < 2; t++) {
        size_t ha, hb;
        slice_of(b - a, 2, t, &ha, &hb);
        char *part = R->mine + c0 + a + ha;
        size_t n = hb - ha;
        lane_header(ln, hdr, t, g, n);
        const void *srcs[LANE_MAXKID];
        for (int k = 0; k < R->nkid[t]; k++) {
            int lk = R->kids[t][k];
            int st = lane_expect(ln, R->links[lk], lk, hdr);
            if (!st) st = lane_recv(ln, R->links[lk], lk, (unsigned char *)R->rbuf + (size_t)k * R->rcap, n);
            if (st) return st;
            srcs[k] = R->rbuf + (size_t)k * R->rcap;
        }
        if (R->nkid[t] && n)
            run_reduce(part, NULL, srcs, R->nkid[t], n / (size_t)R->esz, R->dtype, R->op,
                       R->parent[t] < 0 ? R->avg : 0, NULL);
        if (R->parent[t] >= 0) {
            int st = lane_send(ln, R->links[R->parent[t]], R->parent[t], hdr, part, n);
            if (st) return st;
        }
    }
    return 0;
}

/* The down pass of chunk g: down both trees, then the final slice into the local peers' buffers. */
static int lane_down_one(lane_run_t *R, lane_t *ln, int64_t g) {
    unsigned char hdr[LANE_HDR];
    size_t c0, a, b;
    my_slice(g - R->g0, R->chunk, R->nbytes, R->L, R->me, &c0, &a, &b);
    /* 3. down both trees */
    for (int t = 0; t < 2; t++) {
        size_t ha, hb;
        int st = 0;
        slice_of(b - a, 2, t, &ha, &hb);
        char *part = R->mine + c0 + a + ha;
        size_t n = hb - ha;
        lane_header(ln, hdr, t, g, n);
        if (R->parent[t] >= 0) {
            st = lane_expect(ln, R->links[R->parent[t]], R->parent[t], hdr);
            if (!st) st = lane_recv(ln, R->links[R->parent[t]], R->parent[t], (unsigned char *)part, n);
        }
        for (int k = 0; k < R->nkid[t] && !st; k++)
            st = lane_send(ln, R->links[R->kids[t][k]], R->kids[t][k], hdr, part, n);
        if (st) return st;
    }
    /* 4. the final slice into every local peer's buffer */
    for (int r = 0; r < R->L && !ln->err; r++)
        if (r != R->me && b > a) {
            if (R->direct[r])
                memcpy((char *)R->direct[r] + c0 + a, R->mine + c0 + a, b - a);
            else
                ln->err = cma_write(R->pid[r], R->addr[r] + c0 + a, R->mine + c0 + a, b - a);
        }
    if (ln->err) return 3;
    ctl_publish(&ln->c, ctl_mine(&ln->c, ln->c.w_reduced), g + 1);
    ctl_publish(&ln->c, ctl_mine(&ln->c, ln->c.w_consumed), g + 1);
    return 0;
}

/* Wait (mutex held) until `*word` >= want, the other thread stopped, or the abort word is set. */
static int lane_wait_for(lane_run_t *R, lane_t *ln, int64_t *word, int64_t want) {
    int st = 0;
    pthread_mutex_lock(&R->mu);
    while (__atomic_load_n(word, __ATOMIC_SEQ_CST) < want && !R->stop) {
        if (__atomic_load_n(ln->c.w + ln->c.abort_word, __ATOMIC_SEQ_CST)) { st = 2; break; }
        lane_cond_wait(R, ln->poll);
    }
    if (!st && R->stop) st = LANE_STOPPED;
    pthread_mutex_unlock(&R->mu);
    return st;
}

static void lane_advance(lane_run_t *R, int64_t *word, int64_t v) {
    pthread_mutex_lock(&R->mu);
    __atomic_store_n(word, v, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&R->cv);
    pthread_mutex_unlock(&R->mu);
}

static int lane_up(lane_run_t *R) {
    lane_t *ln = &R->up;
    ln->last = now_s();
    for (int64_t g = R->g0; g < R->gend; g++) {
        if (__atomic_load_n(ln->c.w + ln->c.abort_word, __ATOMIC_SEQ_CST)) return 2;
        if (__atomic_load_n(&R->stop, __ATOMIC_SEQ_CST)) return LANE_STOPPED;
        /* at most `window` chunks ahead of the down pass (their bytes still in the caches) */
        if (__atomic_load_n(&R->down_done, __ATOMIC_SEQ_CST) < g - R->window) {
            int st = lane_wait_for(R, ln, &R->down_done, g - R->window);
            if (st) return st;
            ln->last = now_s();
        }
        int st = lane_up_one(R, ln, g);
        if (st) return st;
        lane_advance(R, &R->up_done, g + 1);
        ln->last = now_s();
    }
    return 0;
}

static void *lane_up_main(void *arg) {
    lane_run_t *R = (lane_run_t *)arg;
    R->up_status = lane_up(R);
    if (R->up_status) lane_stop(R, 1);
    return NULL;
}

static int lane_down(lane_run_t *R) {
    lane_t *ln = &R->down;
    for (int64_t g = R->g0; g < R->gend; g++) {
        /* chunk g is the down thread's once the up thread is done with it */
        int st = lane_wait_for(R, ln, &R->up_done, g + 1);
        if (st) return st;
        ln->last = now_s();
        st = lane_down_one(R, ln, g);
        if (st) return st;
        lane_advance(R, &R->down_done, g + 1);
    }
    return 0;
}

/* Run chunks [g0, gend): with a window (>= 0) and more than one chunk on the two threads, else
 * (or if no thread can be made) one chunk after the other, up then down, on this thread. The
 * first failure's lane_t goes to `out`. */
static int lane_run(lane_run_t *R, lane_t *out) {
    if (R->window < 0 || R->gend - R->g0 <= 1) {
        out->last = now_s();
        for (int64_t g = R->g0; g < R->gend; g++) {
            if (__atomic_load_n(out->c.w + out->c.abort_word, __ATOMIC_SEQ_CST)) return 2;
            int st = lane_up_one(R, out, g);
            if (!st) st = lane_down_one(R, out, g);
            if (st) return st;
            R->down_done = g + 1;
            out->last = now_s();
        }
        return 0;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&R->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&R->mu, NULL);
    R->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    R->up = *out;
    R->down = *out;
    R->up.stop = R->down.stop = &R->stop;
    R->up.wakefd = R->down.wakefd = R->wakefd;
    pthread_t th;
    int threaded = pthread_create(&th, NULL, lane_up_main, R) == 0;
    int st;
    if (threaded) {
        st = lane_down(R);
        if (st) lane_stop(R, 2);
        pthread_join(th, NULL);
    } else {
        R->window = INT_MAX / 2; /* the whole up pass, then the whole down pass */
        lane_up_main(R);
        st = R->up_status ? LANE_STOPPED : lane_down(R);
    }
    if (R->wakefd >= 0) close(R->wakefd);
    pthread_mutex_destroy(&R->mu);
    pthread_cond_destroy(&R->cv);
    int from_up = R->up_status && R->up_status != LANE_STOPPED && (R->first == 1 || !st || st == LANE_STOPPED);
    *out = from_up ? R->up : R->down;
    out->partial = R->up.partial | R->down.partial;
    out->stop = NULL;
    out->wakefd = -1;
    if (from_up) return R->up_status;
    return st == LANE_STOPPED ? 2 : st; /* (stopped with no failure of the other thread: cannot happen) */
}

static int seq_ints(PyObject *obj, int *out, int max, const char *what) {
    PyObject *s = PySequence_Fast(obj, what);
    if (!s) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(s);
    if (n > max) {
        Py_DECREF(s);
        PyErr_Format(PyExc_ValueError, "pipeline_lanes: too many %s", what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) out[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(s, i));
    Py_DECREF(s);
    return PyErr_Occurred() ? -1 : (int)n;
}

/* wire_header(tree, kind, dtype, op, root, seq, chunk, nbytes, n) -> the frame prefix and header
 * the lanes' loop writes (hfreduce.wire.check_c compares it with Python's packing). */
static PyObject *py_wire_header(PyObject *self, PyObject *args) {
    int t, kind, dtype, op, root;
    unsigned long long seq, g, nbytes, n;
    if (!PyArg_ParseTuple(args, "iiiiiKKKK", &t, &kind, &dtype, &op, &root, &seq, &g, &nbytes, &n)) return NULL;
    lane_t ln;
    memset(&ln, 0, sizeof ln);
    ln.kind = kind; ln.wdtype = dtype; ln.wop = op; ln.root = root; ln.seq = seq; ln.wnbytes = nbytes;
    unsigned char h[LANE_HDR];
    lane_header(&ln, h, t, (int64_t)g, n);
    return PyBytes_FromStringAndSize((const char *)h, LANE_HDR);
}

static PyObject *py_pipeline_lanes(PyObject *self, PyObject *args) {
    PyObject *ctrl_obj, *geo_obj, *pid_obj, *addr_obj, *direct_obj, *tmp_obj, *rbuf_obj, *link_obj, *tree_obj, *pfd_obj,
        *pr_obj;
    int L, me, dtype, op, spin, kind, wdtype, wop, root;
    long long g0, nchunks, nbytes, chunk, avg, seq, wnbytes;
    double timeout, net_timeout, poll_s;
    int window = -1;
    if (!PyArg_ParseTuple(args, "OO!(ii)(LLLL)O(OO)(iiL)OOOO(iiiiLL)(OO)(ddd)i|i", &ctrl_obj, &PyTuple_Type, &geo_obj,
                          &L, &me, &g0, &nchunks, &nbytes, &chunk, &pid_obj, &addr_obj, &direct_obj, &dtype, &op, &avg, &tmp_obj,
                          &rbuf_obj, &link_obj, &tree_obj, &kind, &wdtype, &wop, &root, &seq, &wnbytes, &pfd_obj,
                          &pr_obj, &timeout, &net_timeout, &poll_s, &spin, &window))
        return NULL;
    if (L < 1 || L > MAXSRC || me < 0 || me >= L || chunk <= 0 || dtype < 0 || dtype > DT_U8)
        return PyErr_Format(PyExc_ValueError, "pipeline_lanes: bad geometry");
    int pid[MAXSRC], links[LANE_MAXLINK], parent[2], kids[2][LANE_MAXKID], nkid[2];
    uintptr_t addr[MAXSRC], direct[MAXSRC];
    lane_t ln;
    memset(&ln, 0, sizeof ln);
    if (seq_ints(pid_obj, pid, MAXSRC, "pids") != L) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "pipeline_lanes: one pid per local rank");
        return NULL;
    }
    for (int k = 0; k < 2; k++) {
        PyObject *as = PySequence_Fast(k ? direct_obj : addr_obj, "addresses");
        if (!as) return NULL;
        if (PySequence_Fast_GET_SIZE(as) != L) {
            Py_DECREF(as);
            return PyErr_Format(PyExc_ValueError, "pipeline_lanes: one address per local rank");
        }
        for (int r = 0; r < L; r++)
            (k ? direct : addr)[r] = (uintptr_t)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(as, r));
        Py_DECREF(as);
        if (PyErr_Occurred()) return NULL;
    }
    int nlinks = seq_ints(link_obj, links, LANE_MAXLINK, "links");
    if (nlinks < 0) return NULL;
    /* trees: ((parent link or -1, (child link, ...)), (...)) */
    if (!PyTuple_Check(tree_obj) || PyTuple_GET_SIZE(tree_obj) != 2)
        return PyErr_Format(PyExc_ValueError, "pipeline_lanes: two trees");
    for (int t = 0; t < 2; t++) {
        PyObject *kid_obj;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(tree_obj, t), "iO", &parent[t], &kid_obj)) return NULL;
        nkid[t] = seq_ints(kid_obj, kids[t], LANE_MAXKID, "children");
        if (nkid[t] < 0) return NULL;
        if (parent[t] >= nlinks) return PyErr_Format(PyExc_ValueError, "pipeline_lanes: bad link index");
        for (int k = 0; k < nkid[t]; k++)
            if (kids[t][k] < 0 || kids[t][k] >= nlinks)
                return PyErr_Format(PyExc_ValueError, "pipeline_lanes: bad link index");
    }
    ln.npid = seq_ints(pfd_obj, ln.pidfd, MAXSRC, "pidfds");
    if (ln.npid < 0) return NULL;
    if (seq_ints(pr_obj, ln.pidr, MAXSRC, "pidfd ranks") != ln.npid) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "pipeline_lanes: one rank per pidfd");
        return NULL;
    }
    ln.kind = kind; ln.wdtype = wdtype; ln.wop = wop; ln.root = root; ln.seq = (uint64_t)seq;
    ln.wnbytes = (uint64_t)wnbytes;
    ln.timeout = timeout; ln.net_timeout = net_timeout; ln.poll = poll_s;
    const int esz = dt_size[dtype];
    Py_buffer v, tb, rb;
    if (ctl_open(ctrl_obj, geo_obj, L, me, 1, &ln.c, &v, "pipeline_lanes") < 0) return NULL;
    if (PyObject_GetBuffer(tmp_obj, &tb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    if (PyObject_GetBuffer(rbuf_obj, &rb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&v);
        PyBuffer_Release(&tb);
        return NULL;
    }
    size_t blk = L > 1 ? (size_t)tb.len / (size_t)(L - 1) / 64 * 64 : 64;
    int maxk = nkid[0] > nkid[1] ? nkid[0] : nkid[1];
    size_t rcap = maxk ? (size_t)rb.len / (size_t)maxk / 64 * 64 : 0;
    /* a half of a slice is at most half a chunk (rounded up to 64 bytes) */
    size_t half_max = ((size_t)chunk / 2 + 64) / 64 * 64;
    if ((L > 1 && (blk < 64 || ((uintptr_t)tb.buf & 63))) || (maxk && rcap < half_max)) {
        PyBuffer_Release(&v);
        PyBuffer_Release(&tb);
        PyBuffer_Release(&rb);
        return PyErr_Format(PyExc_ValueError, "pipeline_lanes: tmp or rbuf too small or not aligned");
    }
    char *mine = (char *)addr[me], *tmp = (char *)tb.buf, *rbuf = (char *)rb.buf;
    const int64_t gend = g0 + nchunks;
    const Py_ssize_t stride = ln.c.stride;
    int64_t g = g0;
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    ln.last = now_s();
    /* every local rank's input is in place once it posted (own buffers: at the start) */
    while (L > 1 && words_min(ln.c.w, ln.c.w_posted, stride, L) < gend) {
        if (__atomic_load_n(ln.c.w + ln.c.abort_word, __ATOMIC_SEQ_CST)) { status = 2; break; }
        int32_t e = __atomic_load_n(ln.c.epoch, __ATOMIC_SEQ_CST);
        if (words_min(ln.c.w, ln.c.w_posted, stride, L) >= gend) break;
        double left = ln.timeout - (now_s() - ln.last);
        if (left <= 0) {
            for (int r = 0; r < L; r++)
                if (__atomic_load_n(ln.c.w + ln.c.w_posted + (Py_ssize_t)r * stride, __ATOMIC_SEQ_CST) < gend)
                    ln.where = -1 - r;
            status = 6;
            break;
        }
        struct pollfd p[MAXSRC];
        for (int i = 0; i < ln.npid; i++) { p[i].fd = ln.pidfd[i]; p[i].events = POLLIN; p[i].revents = 0; }
        if (ln.npid && poll(p, (nfds_t)ln.npid, 0) > 0) {
            for (int i = 0; i < ln.npid; i++)
                if (p[i].revents) { ln.where = ln.pidr[i]; status = 7; }
            if (status) break;
        }
        idle_wait(&ln.c, e, spin, left < poll_s ? left : poll_s);
    }
    if (!status) {
        lane_run_t R;
        memset(&R, 0, sizeof R);
        R.L = L; R.me = me; R.dtype = dtype; R.op = op; R.esz = esz; R.avg = avg; R.chunk = chunk; R.nbytes = nbytes;
        R.g0 = g0; R.gend = gend; R.pid = pid; R.addr = addr; R.direct = direct; R.mine = mine; R.tmp = tmp;
        R.rbuf = rbuf; R.blk = blk; R.rcap = rcap; R.links = links; R.parent = parent; R.kids = kids; R.nkid = nkid;
        R.up_done = R.down_done = g0;
        R.window = window;
        status = lane_run(&R, &ln);
        g = R.down_done;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&rb);
    return Py_BuildValue("iLiiy#K", status, (long long)(g - g0), ln.err, ln.where, (const char *)ln.got,
                         (Py_ssize_t)(status == 5 ? LANE_HDR : 0), (unsigned long long)ln.partial);
}

/* cma_probe(pid, addr, nbytes) -> bytes: read nbytes at addr in process pid (start-up check) */
static PyObject *py_cma_probe(PyObject *self, PyObject *args) {
    int p;
    unsigned long long a;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iKn", &p, &a, &n)) return NULL;
    if (n < 0 || n > 4096) return PyErr_Format(PyExc_ValueError, "cma_probe: 0..4096 bytes");
    char buf[4096];
    int err = cma_read((pid_t)p, buf, (uintptr_t)a, (size_t)n);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize(buf, n);
}

static PyObject *py_simd(PyObject *self, PyObject *noargs) {
#if HFR_HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return PyUnicode_FromString("avx512");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return PyUnicode_FromString("avx2");
    return PyUnicode_FromString("sse2");
#elif defined(__aarch64__)
    return PyUnicode_FromString("neon");
#else
    return PyUnicode_FromString("generic");
#endif
}

static PyMethodDef methods[] = {
    {"reduce", (PyCFunction)(void (*)(void))py_reduce, METH_VARARGS | METH_KEYWORDS,
     "reduce(dst, srcs, dtype, op, avg=0, first=None, dst2=None): dst = op(first or dst, *srcs); dst2 = dst"},
    {"copy", py_copy, METH_VARARGS, "copy(dst, src): memcpy without the GIL"},
    {"zero", py_zero, METH_VARARGS, "zero(dst): memset 0 without the GIL"},
    {"load", py_load, METH_VARARGS, "load(buf, i): atomic load of int64 word i"},
    {"store", py_store, METH_VARARGS, "store(buf, i, v): atomic store of int64 word i"},
    {"min_of", py_min_of, METH_VARARGS, "min_of(buf, start, stride, count): min of int64 words"},
    {"publish", py_publish, METH_VARARGS,
     "publish(buf, word, value, epoch_off, waiters_word): store, bump the epoch, wake sleepers"},
    {"epoch_wait", py_epoch_wait, METH_VARARGS,
     "epoch_wait(buf, epoch_off, waiters_word, expected, timeout, spin=100) -> True when the epoch moved"},
    {"load32", py_load32, METH_VARARGS, "load32(buf, off): atomic load of the int32 at byte offset off"},
    {"pipeline", py_pipeline, METH_VARARGS, "the engine's chunk loop for one collective, without the GIL"},
    {"pipeline_cma", py_pipeline_cma, METH_VARARGS, "single-copy allreduce of own buffers on one node (process_vm_readv)"},
    {"pipeline_lanes", py_pipeline_lanes, METH_VARARGS,
     "allreduce across nodes: one double binary tree per slice owner (lanes), single-copy inside the node"},
    {"wire_header", py_wire_header, METH_VARARGS, "wire_header(tree, kind, dtype, op, root, seq, chunk, nbytes, n): a lane frame's prefix and header"},
    {"cma_probe", py_cma_probe, METH_VARARGS, "read bytes from another process (process_vm_readv)"},
    {"simd", py_simd, METH_NOARGS, "the instruction set the kernels run with on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hfreduce._C",
                                    "hfreduce's C kernels (SIMD reduce) and shared-memory sync primitives", -1,
                                    methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
