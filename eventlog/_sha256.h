/* SHA-256 for marlgrc's C modules (eventlog/_chaincheck.c, eventlog/_seal.c, ledger/_rowdecode.c):
 * OpenSSL's low-level SHA256_Init/Update/Final from the process's libcrypto (the library hashlib
 * uses; the one-shot SHA256() of OpenSSL 3 fetches an EVP implementation on every call, which costs
 * more than hashing a small event). Each module's set_sha256(init, update, final) receives their
 * addresses (eventlog.native.sha256_functions) and checks they compute SHA-256 before SHA_READY is
 * set. eventlog/native.py compiles with this folder on the include path and folds this file into
 * every module's build tag. */
#ifndef MARLGRC_SHA256_H
#define MARLGRC_SHA256_H
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*sha_init_fn)(void *ctx);
typedef int (*sha_update_fn)(void *ctx, const void *data, size_t len);
typedef int (*sha_final_fn)(unsigned char *md, void *ctx);
static sha_init_fn SHA_INIT = NULL;
static sha_update_fn SHA_UPDATE = NULL;
static sha_final_fn SHA_FINAL = NULL;
static int SHA_READY = 0;

static inline void sha256_of(const unsigned char *d, size_t n, unsigned char *md) {
    unsigned char ctx[256] __attribute__((aligned(16))); /* SHA256_CTX is 112 bytes */
    SHA_INIT(ctx);
    SHA_UPDATE(ctx, d, n);
    SHA_FINAL(md, ctx);
}

static PyObject *set_sha256(PyObject *self, PyObject *args) {
    unsigned long long a, b, c;
    if (!PyArg_ParseTuple(args, "KKK:set_sha256", &a, &b, &c)) return NULL;
    if (!a || !b || !c) {
        PyErr_SetString(PyExc_ValueError, "set_sha256: null function pointer");
        return NULL;
    }
    SHA_INIT = (sha_init_fn)(uintptr_t)a;
    SHA_UPDATE = (sha_update_fn)(uintptr_t)b;
    SHA_FINAL = (sha_final_fn)(uintptr_t)c;
    unsigned char md[32];
    sha256_of((const unsigned char *)"abc", 3, md);
    static const unsigned char want[8] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea};
    SHA_READY = memcmp(md, want, 8) == 0;
    if (!SHA_READY) {
        PyErr_SetString(PyExc_RuntimeError, "set_sha256: the given functions do not compute SHA-256");
        return NULL;
    }
    Py_RETURN_NONE;
}
#endif
