/* The chain writer's sealer in C (eventlog/fastseal.py builds and loads this; the closure made by
 * eventlog/chain.py's ChainWriter.sealer is the pure-Python twin that defines the bytes, used when
 * no compiler is present, and for every call this module hands back to it).
 *
 * Head(seq=-1, hash=bytes(32)): a chain's head, shared by the writer and all its sealers.
 * Sealer(head, python_seal, constants..., program, event_class, clock): callable
 *   seal(payload, source_event_hashes=(), produced_at=None) -> Event, the same bytes and head update
 *   as python_seal. It encodes the header, the payload (through `program`, the payload schema
 *   compiled by eventlog/fastseal.py), hashes the body with SHA-256 and moves the head. Anything off
 *   its fast path (a value of another type than the encoder's common ones, a missing field, an
 *   out-of-range number, a non-dict record, sources that are not 32-byte bytes objects in a list or
 *   tuple) is handed, with nothing changed, to python_seal with the same arguments (produced_at
 *   already read from the clock), which gives the same bytes or raises the reference error.
 * sealer.set_delivery(send, hashes, every, mark): from then on each call also sends the event and
 *   records its hash for the chain's next checkpoint, as EventLog's Python appender does (see deliver).
 * SHA-256 comes from the process's libcrypto (the one hashlib uses), passed in by set_sha256.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <stdint.h>
#include <time.h>

#include "_sha256.h"
#include "_ndarray.h"

/* ---- a growable byte buffer ------------------------------------------------------------------ */
typedef struct {
    unsigned char *p;
    size_t len, cap;
    unsigned char stack[2048];
} Buf;

static void buf_init(Buf *b) { b->p = b->stack; b->len = 0; b->cap = sizeof b->stack; }
static void buf_free(Buf *b) { if (b->p != b->stack) PyMem_Free(b->p); }

static int buf_grow(Buf *b, size_t need) {
    size_t cap = b->cap;
    while (cap < b->len + need) cap *= 2;
    unsigned char *p = PyMem_Malloc(cap);
    if (p == NULL) { PyErr_NoMemory(); return -1; }
    memcpy(p, b->p, b->len);
    if (b->p != b->stack) PyMem_Free(b->p);
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const void *d, size_t n) {
    if (b->len + n > b->cap && buf_grow(b, n) < 0) return -1;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

static inline int buf_varint(Buf *b, uint64_t z) {
    if (b->len + 10 > b->cap && buf_grow(b, 10) < 0) return -1;
    unsigned char *o = b->p + b->len;
    while (z > 0x7F) { *o++ = (unsigned char)((z & 0x7F) | 0x80); z >>= 7; }
    *o++ = (unsigned char)z;
    b->len = (size_t)(o - b->p);
    return 0;
}

static inline int buf_long(Buf *b, long long v) {
    return buf_varint(b, ((uint64_t)v << 1) ^ (uint64_t)(v >> 63));
}

/* ---- payload encoding -------------------------------------------------------------------------- */
/* Opcodes of a program node, a tuple (op, ...) built by eventlog/fastseal.py:compile_program. */
enum { OP_NULL, OP_BOOL, OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BYTES, OP_STRING, OP_FIXED, OP_ARRAY,
       OP_FLOAT_ARRAY, OP_DOUBLE_ARRAY, OP_RECORD };
#define OFF_PATH 1  /* encode's result when the value is not on the fast path: hand back to Python */

static PyTypeObject *NDARRAY = NULL;  /* numpy.ndarray, when numpy is present */

static int MIRROR_OK = 0;

/* A 1-D native-endian float32 (width 4) or float64 (8) array of stride `width`, read through the
 * mirror: 1 and its length and data, or 0 (not such an array: the buffer protocol decides). */
static inline int mirror_vector(PyObject *v, int width, Py_ssize_t *n, const char **data) {
    ArrayMirror *a = (ArrayMirror *)v;
    DescrMirror *d = (DescrMirror *)a->descr;
    if (a->nd != 1 || d == NULL || d->kind != 'f' || d->type != (width == 4 ? 'f' : 'd')
        || (d->byteorder != '=' && d->byteorder != '<') || (a->strides[0] != width && a->dimensions[0] != 0))
        return 0;
    *n = a->dimensions[0];
    *data = a->data;
    return 1;
}

static int encode(Buf *b, PyObject *node, PyObject *v);

static int encode_vector(Buf *b, PyObject *v, int width) {
    Py_ssize_t n, i;
    if (PyList_CheckExact(v) || PyTuple_CheckExact(v)) {
        n = PySequence_Fast_GET_SIZE(v);
        if (n == 0) return buf_put(b, "", 1);
        if (buf_long(b, n) < 0) return -1;
        if (b->len + (size_t)n * width + 1 > b->cap && buf_grow(b, (size_t)n * width + 1) < 0) return -1;
        PyObject **items = PySequence_Fast_ITEMS(v);
        for (i = 0; i < n; i++) {
            PyObject *x = items[i];
            if (!PyFloat_CheckExact(x)) return OFF_PATH;
            int rc = width == 4 ? PyFloat_Pack4(PyFloat_AS_DOUBLE(x), (char *)b->p + b->len, 1)
                                : PyFloat_Pack8(PyFloat_AS_DOUBLE(x), (char *)b->p + b->len, 1);
            if (rc < 0) { PyErr_Clear(); return OFF_PATH; }
            b->len += width;
        }
        return buf_put(b, "", 1);
    }
#if PY_LITTLE_ENDIAN
    if (NDARRAY != NULL && Py_TYPE(v) == NDARRAY) {
        const char *data;
        if (MIRROR_OK && mirror_vector(v, width, &n, &data)) {
            if (n > 0 && (buf_long(b, n) < 0 || buf_put(b, data, (size_t)n * width) < 0)) return -1;
            return buf_put(b, "", 1);
        }
        Py_buffer view;
        if (PyObject_GetBuffer(v, &view, PyBUF_RECORDS_RO) < 0) { PyErr_Clear(); return OFF_PATH; }
        const char *f = view.format;
        if (f != NULL && (*f == '<' || *f == '=' || *f == '@')) f++;
        int ok = view.ndim == 1 && view.itemsize == width && f != NULL && f[0] == (width == 4 ? 'f' : 'd')
                 && f[1] == 0 && (view.strides == NULL || view.strides[0] == width);
        if (!ok) { PyBuffer_Release(&view); return OFF_PATH; }
        n = view.shape[0];
        int rc = 0;
        if (n > 0) rc = buf_long(b, n) < 0 || buf_put(b, view.buf, (size_t)n * width) < 0 ? -1 : 0;
        PyBuffer_Release(&view);
        if (rc < 0) return -1;
        return buf_put(b, "", 1);
    }
#endif
    return OFF_PATH;
}

static int encode(Buf *b, PyObject *node, PyObject *v) {
    long op = PyLong_AsLong(PyTuple_GET_ITEM(node, 0));
    int overflow;
    long long x;
    Py_ssize_t n, i;
    switch (op) {
    case OP_NULL:
        return 0;
    case OP_BOOL: {
        int t = PyObject_IsTrue(v);
        if (t < 0) { PyErr_Clear(); return OFF_PATH; }
        return buf_put(b, t ? "\x01" : "\x00", 1);
    }
    case OP_INT:
    case OP_LONG:
        if (!PyLong_Check(v)) return OFF_PATH;
        x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) { PyErr_Clear(); return OFF_PATH; }
        if (op == OP_INT && (x < INT32_MIN || x > INT32_MAX)) return OFF_PATH;
        return buf_long(b, x);
    case OP_FLOAT:
    case OP_DOUBLE: {
        if (!PyFloat_CheckExact(v)) return OFF_PATH;
        unsigned char tmp[8];
        int rc = op == OP_FLOAT ? PyFloat_Pack4(PyFloat_AS_DOUBLE(v), (char *)tmp, 1)
                                : PyFloat_Pack8(PyFloat_AS_DOUBLE(v), (char *)tmp, 1);
        if (rc < 0) { PyErr_Clear(); return OFF_PATH; }
        return buf_put(b, tmp, op == OP_FLOAT ? 4 : 8);
    }
    case OP_BYTES:
        if (!PyBytes_CheckExact(v)) return OFF_PATH;
        n = PyBytes_GET_SIZE(v);
        if (buf_long(b, n) < 0) return -1;
        return buf_put(b, PyBytes_AS_STRING(v), (size_t)n);
    case OP_STRING: {
        if (!PyUnicode_CheckExact(v)) return OFF_PATH;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) { PyErr_Clear(); return OFF_PATH; }
        if (buf_long(b, n) < 0) return -1;
        return buf_put(b, s, (size_t)n);
    }
    case OP_FIXED:
        if (!PyBytes_CheckExact(v) || PyBytes_GET_SIZE(v) != PyLong_AsSsize_t(PyTuple_GET_ITEM(node, 1)))
            return OFF_PATH;
        return buf_put(b, PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v));
    case OP_ARRAY: {
        if (!PyList_CheckExact(v) && !PyTuple_CheckExact(v)) return OFF_PATH;
        PyObject *items = PyTuple_GET_ITEM(node, 1);
        n = PySequence_Fast_GET_SIZE(v);
        if (n > 0 && buf_long(b, n) < 0) return -1;
        for (i = 0; i < n; i++) {
            /* a list may change under a callback only through items that are not on the fast path */
            if (i >= PySequence_Fast_GET_SIZE(v)) return OFF_PATH;
            PyObject *item = PySequence_Fast_GET_ITEM(v, i);
            Py_INCREF(item);
            int rc = encode(b, items, item);
            Py_DECREF(item);
            if (rc != 0) return rc;
        }
        return buf_put(b, "", 1);
    }
    case OP_FLOAT_ARRAY:
        return encode_vector(b, v, 4);
    case OP_DOUBLE_ARRAY:
        return encode_vector(b, v, 8);
    case OP_RECORD: {
        if (!PyDict_CheckExact(v)) return OFF_PATH;
        PyObject *fields = PyTuple_GET_ITEM(node, 1);
        n = PyTuple_GET_SIZE(fields);
        for (i = 0; i < n; i++) {
            /* (name, program) or (name, program, default) */
            PyObject *f = PyTuple_GET_ITEM(fields, i);
            PyObject *val = PyDict_GetItemWithError(v, PyTuple_GET_ITEM(f, 0));
            if (val == NULL) {
                if (PyErr_Occurred()) { PyErr_Clear(); return OFF_PATH; }
                if (PyTuple_GET_SIZE(f) < 3) return OFF_PATH;  /* required field missing */
                val = PyTuple_GET_ITEM(f, 2);                    /* the schema's default */
            }
            Py_INCREF(val);
            int rc = encode(b, PyTuple_GET_ITEM(f, 1), val);
            Py_DECREF(val);
            if (rc != 0) return rc;
        }
        return 0;
    }
    default:
        PyErr_Format(PyExc_RuntimeError, "unknown opcode %ld in a payload program", op);
        return -1;
    }
}

/* ---- Head ------------------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    long long seq;
    PyObject *hash; /* bytes */
} HeadObject;

static int Head_init(HeadObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seq", "hash", NULL};
    long long seq = -1;
    PyObject *hash = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|LO", kwlist, &seq, &hash)) return -1;
    PyObject *h;
    if (hash != NULL) {
        Py_INCREF(hash);
        h = hash;
    } else {
        h = PyBytes_FromStringAndSize(NULL, 32);
        if (h == NULL) return -1;
        memset(PyBytes_AS_STRING(h), 0, 32);
    }
    Py_XSETREF(self->hash, h);
    self->seq = seq;
    return 0;
}

static void Head_dealloc(HeadObject *self) {
    Py_XDECREF(self->hash);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Head_members[] = {
    {"seq", T_LONGLONG, offsetof(HeadObject, seq), 0, "seq of the last event (-1: none)"},
    {"hash", T_OBJECT_EX, offsetof(HeadObject, hash), 0, "event_hash of the last event"},
    {NULL}};

static PyTypeObject HeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_seal.Head",
    .tp_basicsize = sizeof(HeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A chain's head (seq, hash), shared by its writer and sealers.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Head_init,
    .tp_dealloc = (destructor)Head_dealloc,
    .tp_members = Head_members,
};

/* ---- Sealer ---------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    HeadObject *head;
    PyObject *python_seal;
    PyObject *prefix, *chain_and_id, *type_run, *producer_class, *tail; /* bytes */
    long long retention;
    PyObject *program;          /* the payload's record node */
    PyTypeObject *event_class;  /* a tuple subclass of 6 fields */
    PyObject *topic, *chain_id, *event_type;
    PyObject *clock;            /* None: the wall clock in µs, as time.time_ns() // 1000 */
    /* delivery (set_delivery), all NULL until set */
    PyObject *send;             /* send(topic, chain_id, value) */
    PyObject *hashes;           /* list: the chain's event hashes since its last checkpoint */
    PyObject *mark;             /* mark(event, n) when the event made len(hashes) 1 or >= every */
    Py_ssize_t every;
    vectorcallfunc vectorcall;
} SealerObject;

static PyObject *Sealer_vectorcall(SealerObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static int Sealer_init(SealerObject *self, PyObject *args, PyObject *kw) {
    HeadObject *head;
    PyObject *python_seal, *prefix, *chain_and_id, *type_run, *producer_class, *tail, *program, *topic, *chain_id,
        *event_type, *clock;
    PyTypeObject *event_class;
    long long retention;
    if (!PyArg_ParseTuple(args, "O!OO!O!O!O!O!LO!O!UUUO", &HeadType, &head, &python_seal, &PyBytes_Type, &prefix,
                          &PyBytes_Type, &chain_and_id, &PyBytes_Type, &type_run, &PyBytes_Type, &producer_class,
                          &PyBytes_Type, &tail, &retention, &PyTuple_Type, &program, &PyType_Type, &event_class,
                          &topic, &chain_id, &event_type, &clock))
        return -1;
    if (!PyType_IsSubtype(event_class, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "event_class must be a tuple subclass");
        return -1;
    }
    if (!SHA_READY) { PyErr_SetString(PyExc_RuntimeError, "set_sha256 first"); return -1; }
#define SET(f, v) do { Py_INCREF(v); Py_XSETREF(self->f, (void *)(v)); } while (0)
    SET(head, head); SET(python_seal, python_seal); SET(prefix, prefix); SET(chain_and_id, chain_and_id);
    SET(type_run, type_run); SET(producer_class, producer_class); SET(tail, tail); SET(program, program);
    SET(event_class, event_class); SET(topic, topic); SET(chain_id, chain_id); SET(event_type, event_type);
    SET(clock, clock);
#undef SET
    self->retention = retention;
    self->vectorcall = (vectorcallfunc)Sealer_vectorcall;
    return 0;
}

static int Sealer_traverse(SealerObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->head); Py_VISIT(self->python_seal); Py_VISIT(self->program); Py_VISIT(self->event_class);
    Py_VISIT(self->clock); Py_VISIT(self->send); Py_VISIT(self->hashes); Py_VISIT(self->mark);
    return 0;
}

static int Sealer_clear(SealerObject *self) {
    Py_CLEAR(self->head); Py_CLEAR(self->python_seal); Py_CLEAR(self->prefix); Py_CLEAR(self->chain_and_id);
    Py_CLEAR(self->type_run); Py_CLEAR(self->producer_class); Py_CLEAR(self->tail); Py_CLEAR(self->program);
    Py_CLEAR(self->event_class); Py_CLEAR(self->topic); Py_CLEAR(self->chain_id); Py_CLEAR(self->event_type);
    Py_CLEAR(self->clock); Py_CLEAR(self->send); Py_CLEAR(self->hashes); Py_CLEAR(self->mark);
    return 0;
}

static void Sealer_dealloc(SealerObject *self) {
    PyObject_GC_UnTrack(self);
    Sealer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int put_bytes(Buf *b, PyObject *o) { return buf_put(b, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)); }

/* After an event is sealed: send it (if that fails, the head goes back and the error is raised), record its hash for the next checkpoint, and call mark on the
 * first hash since the last checkpoint and when `every` are pending (the delivery set by set_delivery,
 * the same steps as EventLog's Python appender). Steals `event`. */
static PyObject *deliver(SealerObject *self, PyObject *event) {
    if (event == NULL || self->send == NULL) return event;
    PyObject *value = PyTuple_GET_ITEM(event, 4);
    PyObject *send_args[3] = {self->topic, self->chain_id, value};
    PyObject *r = PyObject_Vectorcall(self->send, send_args, 3, NULL);
    if (r == NULL) {  /* not sent: the event never happened, the head goes back to the one before it */
        PyObject *prev = PyErr_ExceptionMatches(PyExc_Exception) && PyBytes_Check(value) && PyBytes_GET_SIZE(value) >= 42
                         ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(value) + 10, 32) : NULL;
        if (prev != NULL) {
            self->head->seq -= 1;
            Py_SETREF(self->head->hash, prev);
        }
        Py_DECREF(event);
        return NULL;
    }
    Py_DECREF(r);
    if (self->hashes == NULL) return event;
    if (PyList_Append(self->hashes, PyTuple_GET_ITEM(event, 3)) < 0) { Py_DECREF(event); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(self->hashes);
    if (n == 1 || n >= self->every) {
        PyObject *count = PyLong_FromSsize_t(n);
        r = count == NULL ? NULL : PyObject_CallFunctionObjArgs(self->mark, event, count, NULL);
        Py_XDECREF(count);
        if (r == NULL) { Py_DECREF(event); return NULL; }
        Py_DECREF(r);
    }
    return event;
}

static PyObject *seal(SealerObject *self, PyObject *payload, PyObject *sources, PyObject *produced_at);

/* seal(payload, source_event_hashes=(), produced_at=None), then its delivery */
static PyObject *Sealer_call(SealerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"payload", "source_event_hashes", "produced_at", NULL};
    PyObject *payload, *sources = NULL, *produced_at = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO", kwlist, &payload, &sources, &produced_at)) return NULL;
    return deliver(self, seal(self, payload, sources, produced_at));
}

/* The same through the vectorcall protocol (no argument tuple): positional calls, the hot loops' form. */
static PyObject *Sealer_vectorcall(SealerObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || n < 1 || n > 3) {
        PyObject *tuple = PyTuple_New(n), *kw = NULL, *res = NULL;
        if (tuple == NULL) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) { Py_INCREF(args[i]); PyTuple_SET_ITEM(tuple, i, args[i]); }
        if (kwnames != NULL) {
            kw = PyDict_New();
            for (Py_ssize_t i = 0; kw != NULL && i < PyTuple_GET_SIZE(kwnames); i++)
                if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), args[n + i]) < 0) Py_CLEAR(kw);
            if (kw == NULL) { Py_DECREF(tuple); return NULL; }
        }
        res = Sealer_call(self, tuple, kw);
        Py_DECREF(tuple);
        Py_XDECREF(kw);
        return res;
    }
    return deliver(self, seal(self, args[0], n > 1 ? args[1] : NULL, n > 2 ? args[2] : Py_None));
}

static PyObject *seal(SealerObject *self, PyObject *payload, PyObject *sources, PyObject *produced_at) {
    PyObject *t_obj;  /* produced_at, read from the clock when not given (owned) */
    long long t;
    int overflow = 0;
    if (produced_at != Py_None) {
        Py_INCREF(produced_at);
        t_obj = produced_at;
    } else if (self->clock == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        t_obj = PyLong_FromLongLong((long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000);
    } else {
        t_obj = PyObject_CallNoArgs(self->clock);
    }
    if (t_obj == NULL) return NULL;
    HeadObject *h = self->head;
    long long seq = h->seq + 1;
    int off_path = !PyLong_Check(t_obj) || !PyBytes_CheckExact(h->hash) || PyBytes_GET_SIZE(h->hash) != 32
                   || seq < 0 || seq > 0xFFFFFFFFFFFFLL || !PyDict_CheckExact(payload);  /* ids: 48-bit seq */
    if (!off_path) {
        t = PyLong_AsLongLongAndOverflow(t_obj, &overflow);
        if (overflow || (t == -1 && PyErr_Occurred())) { PyErr_Clear(); off_path = 1; }
        else if ((self->retention > 0 && t > LLONG_MAX - self->retention)
                 || (self->retention < 0 && t < LLONG_MIN - self->retention)) off_path = 1;
    }
    Py_ssize_t n_sources = 0;
    if (!off_path && sources != NULL) {
        if (!PyList_CheckExact(sources) && !PyTuple_CheckExact(sources)) off_path = 1;
        else {
            n_sources = PySequence_Fast_GET_SIZE(sources);
            for (Py_ssize_t i = 0; i < n_sources && !off_path; i++) {
                PyObject *s = PySequence_Fast_GET_ITEM(sources, i);
                if (!PyBytes_CheckExact(s) || PyBytes_GET_SIZE(s) != 32) off_path = 1;
            }
        }
    }
    Buf b;
    buf_init(&b);
    int rc = off_path ? OFF_PATH : 0;
    if (rc == 0) {
        char id_tail[12];  /* "%012llx" of seq (0 <= seq < 2**48 here), without snprintf's cost */
        const int id_len = 12;
        for (int i = 11, q = 0; i >= 0; i--, q += 4) id_tail[i] = "0123456789abcdef"[((unsigned long long)seq >> q) & 15];
        if (put_bytes(&b, self->prefix) < 0 || buf_put(&b, PyBytes_AS_STRING(h->hash), 32) < 0
            || buf_long(&b, seq) < 0 || put_bytes(&b, self->chain_and_id) < 0
            || buf_put(&b, id_tail, (size_t)id_len) < 0 || put_bytes(&b, self->type_run) < 0
            || buf_long(&b, t) < 0 || put_bytes(&b, self->producer_class) < 0
            || buf_long(&b, t + self->retention) < 0 || put_bytes(&b, self->tail) < 0)
            rc = -1;
        if (rc == 0 && n_sources > 0) {
            if (buf_long(&b, n_sources) < 0) rc = -1;
            for (Py_ssize_t i = 0; rc == 0 && i < n_sources; i++)
                if (buf_put(&b, PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(sources, i)), 32) < 0) rc = -1;
        }
        if (rc == 0 && buf_put(&b, "", 1) < 0) rc = -1;
        if (rc == 0) rc = encode(&b, self->program, payload);
    }
    if (rc != 0) {
        buf_free(&b);
        if (rc < 0) { Py_DECREF(t_obj); return NULL; }
        /* off the fast path: the reference sealer, with the same arguments and the clock reading */
        PyObject *no_sources = sources != NULL ? (Py_INCREF(sources), sources) : PyTuple_New(0);
        PyObject *res = no_sources == NULL ? NULL
            : PyObject_CallFunctionObjArgs(self->python_seal, payload, no_sources, t_obj, NULL);
        Py_XDECREF(no_sources);
        Py_DECREF(t_obj);
        return res;
    }
    Py_DECREF(t_obj);
    PyObject *value = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)b.len + 32);
    PyObject *digest = PyBytes_FromStringAndSize(NULL, 32);
    PyObject *seq_obj = PyLong_FromLongLong(seq);
    PyObject *event = NULL;
    if (value != NULL && digest != NULL && seq_obj != NULL) {
        unsigned char ctx[256] __attribute__((aligned(16)));
        unsigned char *md = (unsigned char *)PyBytes_AS_STRING(digest);
        SHA_INIT(ctx);
        SHA_UPDATE(ctx, b.p, b.len);
        SHA_FINAL(md, ctx);
        memcpy(PyBytes_AS_STRING(value), b.p, b.len);
        memcpy(PyBytes_AS_STRING(value) + b.len, md, 32);
        event = self->event_class->tp_alloc(self->event_class, 6);
    }
    buf_free(&b);
    if (event == NULL) { Py_XDECREF(value); Py_XDECREF(digest); Py_XDECREF(seq_obj); return NULL; }
    h->seq = seq;
    Py_INCREF(digest);
    Py_SETREF(h->hash, digest);
    Py_INCREF(self->topic); Py_INCREF(self->chain_id); Py_INCREF(self->event_type);
    PyTuple_SET_ITEM(event, 0, self->topic);
    PyTuple_SET_ITEM(event, 1, self->chain_id);
    PyTuple_SET_ITEM(event, 2, seq_obj);
    PyTuple_SET_ITEM(event, 3, digest);
    PyTuple_SET_ITEM(event, 4, value);
    PyTuple_SET_ITEM(event, 5, self->event_type);
    return event;
}

static PyObject *Sealer_set_delivery(SealerObject *self, PyObject *args) {
    PyObject *send, *hashes, *mark;
    Py_ssize_t every;
    if (!PyArg_ParseTuple(args, "OOnO", &send, &hashes, &every, &mark)) return NULL;
    if (!PyCallable_Check(send) || (hashes != Py_None && (!PyList_CheckExact(hashes) || !PyCallable_Check(mark)))) {
        PyErr_SetString(PyExc_TypeError, "set_delivery(send, hashes: list | None, every, mark) needs callables");
        return NULL;
    }
    Py_INCREF(send);
    Py_XSETREF(self->send, send);
    if (hashes != Py_None) {
        Py_INCREF(hashes); Py_INCREF(mark);
        Py_XSETREF(self->hashes, hashes);
        Py_XSETREF(self->mark, mark);
    }
    self->every = every;
    Py_RETURN_NONE;
}

static PyMethodDef Sealer_methods[] = {
    {"set_delivery", (PyCFunction)Sealer_set_delivery, METH_VARARGS,
     "set_delivery(send, hashes, every, mark): after each event, send(topic, chain_id, value); then, with a "
     "list `hashes`, append its event_hash and call mark(event, len(hashes)) when that is 1 or >= every"},
    {NULL}};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_seal.Sealer",
    .tp_basicsize = sizeof(SealerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(SealerObject, vectorcall),
    .tp_doc = "seal(payload, source_event_hashes=(), produced_at=None) -> Event",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sealer_init,
    .tp_dealloc = (destructor)Sealer_dealloc,
    .tp_traverse = (traverseproc)Sealer_traverse,
    .tp_clear = (inquiry)Sealer_clear,
    .tp_call = (ternaryfunc)Sealer_call,
    .tp_methods = Sealer_methods,
};

/* set_ndarray(numpy.ndarray, probes): `probes` are arrays of every kind (float32 and float64, 1-D and
 * not, strided, byte-swapped, other dtypes); the mirror is used only if it reads each of them as the
 * buffer protocol does. Returns whether it is. */
static PyObject *set_ndarray(PyObject *self, PyObject *args) {
    PyObject *cls, *probes;
    if (!PyArg_ParseTuple(args, "O!O!:set_ndarray", &PyType_Type, &cls, &PyList_Type, &probes)) return NULL;
    Py_INCREF(cls);
    Py_XSETREF(NDARRAY, (PyTypeObject *)cls);
    int ok = PyList_GET_SIZE(probes) > 0;
    for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(probes); i++) {
        PyObject *p = PyList_GET_ITEM(probes, i);
        if (Py_TYPE(p) != NDARRAY) { ok = 0; break; }
        Py_buffer view;
        if (PyObject_GetBuffer(p, &view, PyBUF_RECORDS_RO) < 0) { PyErr_Clear(); ok = 0; break; }
        for (int width = 4; ok && width <= 8; width += 4) {
            const char *f = view.format;
            if (f != NULL && (*f == '<' || *f == '=' || *f == '@')) f++;
            int want = view.ndim == 1 && view.itemsize == width && f != NULL && f[0] == (width == 4 ? 'f' : 'd')
                       && f[1] == 0 && (view.shape[0] == 0 || view.strides == NULL || view.strides[0] == width);
            Py_ssize_t n = -1;
            const char *data = NULL;
            int got = mirror_vector(p, width, &n, &data);
            if (got != want || (got && (n != view.shape[0] || (n > 0 && data != view.buf)))) ok = 0;
        }
        PyBuffer_Release(&view);
    }
#if PY_LITTLE_ENDIAN
    MIRROR_OK = ok;
#else
    MIRROR_OK = 0;
#endif
    return PyBool_FromLong(MIRROR_OK);
}

static PyMethodDef methods[] = {
    {"set_sha256", set_sha256, METH_VARARGS, "set_sha256(init, update, final): libcrypto's SHA256_* addresses"},
    {"set_ndarray", set_ndarray, METH_VARARGS, "set_ndarray(numpy.ndarray, probes): arrays whose float buffers are copied as they are; whether they are read without the buffer protocol"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_seal", NULL, -1, methods};

PyMODINIT_FUNC PyInit__seal(void) {
    if (PyType_Ready(&HeadType) < 0 || PyType_Ready(&SealerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&HeadType);
    Py_INCREF(&SealerType);
    if (PyModule_AddObject(m, "Head", (PyObject *)&HeadType) < 0
        || PyModule_AddObject(m, "Sealer", (PyObject *)&SealerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
