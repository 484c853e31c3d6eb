/* Hot loop of chain verification (eventlog/native.py builds and loads this; eventlog/fastpath.py
 * holds the pure-Python twin that defines the semantics and is used when no compiler is present).
 *
 * check_chain(values: list[bytes], prev: bytes, leaves: bytearray | None) -> (n_ok, last_hash)
 *   Accepts the longest prefix of `values` in which every event's SHA-256(value[:-32]) equals
 *   value[-32:] and value[10:42] equals the previous event's hash (the first one: `prev`).
 *   For each accepted event, appends SHA-256(0x00 || event_hash) (its Merkle leaf) to `leaves`.
 * merkle_root_from_leaves(leaves: bytes-like, start: int, count: int) -> bytes
 *   RFC 6962 root over `count` 32-byte leaves starting at leaf index `start`.
 * merkle_root_of_event_hashes(hashes: list[bytes]) -> bytes
 *   The same root over the leaves SHA-256(0x00 || h) of a non-empty list of 32-byte event hashes.
 * group_messages(msgs: list, start: int, bufs: dict, chunk: int, untrack: type | None) -> (stop, what, topic, key)
 *   The Kafka reader's grouping loop (eventlog/fastpath.py: py_group_messages defines it): from
 *   msgs[start] on, appends each message m to bufs[m.topic()][m.key()] = (messages, values) and
 *   m.value() to its values, until a message with m.error() not None (what 1, stop = its index), a
 *   topic or key not in bufs (what 2, stop = its index), a buffer reaching `chunk` messages (what 3,
 *   stop = the index after it) or the end (what 0, stop = len(msgs)). Messages of exactly the type
 *   `untrack` are untracked by the cyclic GC once buffered (the only thing the Python twin omits).
 * SHA-256 comes from the process's libcrypto (the one hashlib uses), passed in by set_sha256(init, update, final).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdlib.h>

#include "_sha256.h"

#define HL 32
#define PREV_START 10
#define MIN_LEN (PREV_START + HL + 2 + HL)

static PyObject *check_chain(PyObject *self, PyObject *args) {
    PyObject *values, *leaves;
    const char *prev; Py_ssize_t prev_len;
    if (!PyArg_ParseTuple(args, "O!y#O", &PyList_Type, &values, &prev, &prev_len, &leaves)) return NULL;
    if (!SHA_READY) { PyErr_SetString(PyExc_RuntimeError, "set_sha256 first"); return NULL; }
    if (prev_len != HL) { PyErr_SetString(PyExc_ValueError, "prev must be 32 bytes"); return NULL; }
    int want_leaves = leaves != Py_None;
    if (want_leaves && !PyByteArray_Check(leaves)) { PyErr_SetString(PyExc_TypeError, "leaves must be a bytearray"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(values), i;
    unsigned char last[HL], md[HL], buf[1 + HL];
    memcpy(last, prev, HL);
    unsigned char *lv = NULL;
    Py_ssize_t base = 0;
    if (want_leaves) {
        base = PyByteArray_GET_SIZE(leaves);
        if (PyByteArray_Resize(leaves, base + n * HL) < 0) return NULL;
        lv = (unsigned char *)PyByteArray_AS_STRING(leaves) + base;
    }
    buf[0] = 0x00;
    for (i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        if (!PyBytes_Check(v)) break;
        Py_ssize_t len = PyBytes_GET_SIZE(v);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(v);
        if (len < MIN_LEN) break;
        sha256_of(p, (size_t)(len - HL), md);
        if (memcmp(md, p + len - HL, HL) != 0) break;
        if (memcmp(p + PREV_START, last, HL) != 0) break;
        memcpy(last, md, HL);
        if (want_leaves) {
            memcpy(buf + 1, md, HL);
            sha256_of(buf, 1 + HL, lv + i * HL);
        }
    }
    if (want_leaves && PyByteArray_Resize(leaves, base + i * HL) < 0) return NULL;
    return Py_BuildValue("(ny#)", i, (const char *)last, (Py_ssize_t)HL);
}

static void mth(const unsigned char *leaves, Py_ssize_t n, unsigned char *out) {
    /* left-to-right pairing, odd last node carried up: the RFC 6962 shape */
    unsigned char *level = malloc((size_t)n * HL), buf[1 + 2 * HL];
    memcpy(level, leaves, (size_t)n * HL);
    buf[0] = 0x01;
    while (n > 1) {
        Py_ssize_t m = 0, j;
        for (j = 0; j + 1 < n; j += 2) {
            memcpy(buf + 1, level + j * HL, 2 * HL);
            sha256_of(buf, 1 + 2 * HL, level + m * HL);
            m++;
        }
        if (n % 2) { memmove(level + m * HL, level + (n - 1) * HL, HL); m++; }
        n = m;
    }
    memcpy(out, level, HL);
    free(level);
}

static PyObject *merkle_root_from_leaves(PyObject *self, PyObject *args) {
    Py_buffer b; Py_ssize_t start, count;
    if (!PyArg_ParseTuple(args, "y*nn", &b, &start, &count)) return NULL;
    if (!SHA_READY || start < 0 || count <= 0 || (start + count) * HL > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "leaf range outside the buffer (or SHA-256 not set)");
        return NULL;
    }
    unsigned char root[HL];
    mth((const unsigned char *)b.buf + start * HL, count, root);
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)root, HL);
}

/* merkle_root_of_event_hashes(hashes: list[bytes]) -> bytes: the RFC 6962 root over the leaves
 * SHA-256(0x00 || h) of a non-empty list of 32-byte event hashes (a writer's checkpoint). */
static PyObject *merkle_root_of_event_hashes(PyObject *self, PyObject *args) {
    PyObject *hashes;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &hashes)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(hashes), i;
    if (!SHA_READY || n == 0) {
        PyErr_SetString(PyExc_ValueError, "a root needs at least one event hash (or SHA-256 is not set)");
        return NULL;
    }
    unsigned char *leaves = PyMem_Malloc((size_t)n * HL), buf[1 + HL], root[HL];
    if (leaves == NULL) return PyErr_NoMemory();
    buf[0] = 0x00;
    for (i = 0; i < n; i++) {
        PyObject *h = PyList_GET_ITEM(hashes, i);
        Py_buffer v;
        if (PyObject_GetBuffer(h, &v, PyBUF_SIMPLE) < 0 || v.len != HL) {
            if (PyErr_Occurred()) PyErr_Clear(); else PyBuffer_Release(&v);
            PyMem_Free(leaves);
            PyErr_SetString(PyExc_ValueError, "event hashes must be 32-byte digests");
            return NULL;
        }
        memcpy(buf + 1, v.buf, HL);
        PyBuffer_Release(&v);
        sha256_of(buf, sizeof buf, leaves + i * HL);
    }
    mth(leaves, n, root);
    PyMem_Free(leaves);
    return PyBytes_FromStringAndSize((const char *)root, HL);
}

static PyObject *S_ERROR, *S_TOPIC, *S_KEY, *S_VALUE;

static PyObject *stop(Py_ssize_t i, int what, PyObject *topic, PyObject *key) {
    return Py_BuildValue("(niOO)", i, what, topic ? topic : Py_None, key ? key : Py_None);
}

static PyObject *group_messages(PyObject *self, PyObject *args) {
    PyObject *msgs, *bufs, *untrack = Py_None;
    Py_ssize_t start, chunk;
    if (!PyArg_ParseTuple(args, "O!nO!n|O", &PyList_Type, &msgs, &start, &PyDict_Type, &bufs, &chunk, &untrack))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(msgs), i;
    if (start < 0) start = 0;
    for (i = start; i < n; i++) {
        PyObject *m = PyList_GET_ITEM(msgs, i), *r = NULL;
        PyObject *err = PyObject_CallMethodNoArgs(m, S_ERROR);
        if (err == NULL) return NULL;
        int has_err = err != Py_None;
        Py_DECREF(err);
        if (has_err) return stop(i, 1, NULL, NULL);
        PyObject *topic = PyObject_CallMethodNoArgs(m, S_TOPIC);
        if (topic == NULL) return NULL;
        PyObject *key = PyObject_CallMethodNoArgs(m, S_KEY);
        if (key == NULL) { Py_DECREF(topic); return NULL; }
        PyObject *keys = PyDict_GetItemWithError(bufs, topic);  /* borrowed */
        PyObject *entry = keys == NULL ? NULL : PyDict_Check(keys) ? PyDict_GetItemWithError(keys, key) : NULL;
        if (keys != NULL && !PyDict_Check(keys)) {
            PyErr_SetString(PyExc_TypeError, "bufs must map topic -> {key: (messages, values)}");
        } else if (entry == NULL) {
            if (!PyErr_Occurred()) r = stop(i, 2, topic, key);
        } else if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 || !PyList_Check(PyTuple_GET_ITEM(entry, 0))
                   || !PyList_Check(PyTuple_GET_ITEM(entry, 1))) {
            PyErr_SetString(PyExc_TypeError, "bufs must map topic -> {key: (messages, values)}");
        } else {
            PyObject *ms = PyTuple_GET_ITEM(entry, 0), *vs = PyTuple_GET_ITEM(entry, 1);
            PyObject *v = PyObject_CallMethodNoArgs(m, S_VALUE);
            if (v != NULL) {
                if (PyList_Append(ms, m) == 0 && PyList_Append(vs, v) == 0) {
                    /* a buffered Message refers to nothing that refers back: keep it out of the
                     * cyclic GC's traversals, which otherwise revisit every buffered message */
                    if ((PyObject *)Py_TYPE(m) == untrack && PyObject_GC_IsTracked(m)) PyObject_GC_UnTrack(m);
                    r = PyList_GET_SIZE(ms) >= chunk ? stop(i + 1, 3, topic, key) : Py_None;
                }
                Py_DECREF(v);
            }
        }
        Py_DECREF(topic);
        Py_DECREF(key);
        if (r != Py_None) return r;  /* a stop, or NULL with an exception set */
    }
    return stop(n, 0, NULL, NULL);
}

static PyMethodDef methods[] = {
    {"set_sha256", set_sha256, METH_VARARGS, "use the SHA256() at this address (libcrypto)"},
    {"check_chain", check_chain, METH_VARARGS, "accept the longest valid prefix of a chain"},
    {"merkle_root_from_leaves", merkle_root_from_leaves, METH_VARARGS, "RFC 6962 root over leaf hashes"},
    {"merkle_root_of_event_hashes", merkle_root_of_event_hashes, METH_VARARGS, "RFC 6962 root over event hashes"},
    {"group_messages", group_messages, METH_VARARGS, "group Kafka messages per (topic, key)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chaincheck", NULL, -1, methods};

PyMODINIT_FUNC PyInit__chaincheck(void) {
    S_ERROR = PyUnicode_InternFromString("error");
    S_TOPIC = PyUnicode_InternFromString("topic");
    S_KEY = PyUnicode_InternFromString("key");
    S_VALUE = PyUnicode_InternFromString("value");
    if (!S_ERROR || !S_TOPIC || !S_KEY || !S_VALUE) return NULL;
    return PyModule_Create(&module);
}
