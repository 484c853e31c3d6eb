/* Raw marlgrc event bytes straight to ledger row tuples: the materializer's hot path.
 *
 * ledger/fastrows.py compiles, per current schema, a small program (ints and strings) that says how
 * to walk the Avro body and what goes into each row column, and hands the programs over once
 * (set_programs). decode_rows_native(value, topic, partition, offset) then checks the C3 01 marker
 * and the fingerprint, walks the body with a bounds check on every read and builds
 * (name, [(table, row)]) exactly as ledger.tables.row_tuples_for_event does after the codec's
 * decode. Anything unusual (unknown fingerprint, truncation, invalid UTF-8, trailing bytes, a
 * varint past 64 bits, a negative block count, a boolean byte other than 0/1, ...) returns None;
 * decode_rows then calls the Python reference, which gives the exact result or DecodeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Avro types in a program's type code (prefix notation; ledger/fastrows.py writes the same numbers). */
enum { T_LONG = 1, T_INT, T_STRING, T_BYTES, T_FIXED, T_FLOAT, T_DOUBLE, T_BOOL, T_ARRAY, T_RECORD };
/* What to do with one top-level field. */
enum { A_SKIP = 1, A_SCALAR, A_JSON, A_FLOATS, A_HASHES, A_PROTECTED, A_JSON_SUM };
/* Row columns that are not slots. */
enum { C_NONE = -1, C_TOPIC = -2, C_PARTITION = -3, C_OFFSET = -4, C_EVENT_HASH = -5, C_RAW = -6 };

#define OK 0
#define BAIL 1   /* not handled here: the caller falls back to the Python reference */
#define FAIL -1  /* Python exception set */
#define MAX_SLOTS 64
#define MAX_DEPTH 24

typedef struct {
    unsigned char fp[8];
    PyObject *name, *table;
    int32_t *code;
    Py_ssize_t ncode;
    int32_t *cols;
    Py_ssize_t ncols;
    int nslots;
    char **keys;
    Py_ssize_t *keylens;
    Py_ssize_t nkeys;
} Program;

static Program *programs = NULL;
static Py_ssize_t nprograms = 0;
static PyObject *fallback = NULL;   /* the Python reference, called by decode_rows on BAIL */
static PyObject *builtin_sum = NULL;
static unsigned long long n_native = 0, n_fallback = 0;

/* ---- reading Avro ------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p, *end;
} Src;

static inline int rd_long(Src *s, int64_t *out)
{
    uint64_t n = 0;
    int shift = 0;
    for (int i = 0; i < 10; i++) {
        if (s->p >= s->end)
            return BAIL;
        unsigned b = *s->p++;
        if (i == 9 && b > 1)
            return BAIL; /* past 64 bits */
        n |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = (int64_t)((n >> 1) ^ (0 - (n & 1)));
            return OK;
        }
        shift += 7;
    }
    return BAIL;
}

/* A length (string, bytes) that fits in what is left. */
static inline int rd_len(Src *s, Py_ssize_t *n)
{
    int64_t v;
    if (rd_long(s, &v))
        return BAIL;
    if (v < 0 || v > (int64_t)(s->end - s->p))
        return BAIL;
    *n = (Py_ssize_t)v;
    return OK;
}

/* The next block count of an array: 0 ends it; negative counts (with byte sizes) are left to Python;
 * a count above the bytes left cannot be honest for the item types here (each takes >= 1 byte). */
static inline int rd_count(Src *s, Py_ssize_t *n)
{
    return rd_len(s, n);
}

static inline uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline int rd_double(Src *s, double *d)
{
    if (s->end - s->p < 8)
        return BAIL;
    uint64_t v = le64(s->p);
    memcpy(d, &v, 8);
    s->p += 8;
    return OK;
}

static inline int rd_float(Src *s, double *d)
{
    if (s->end - s->p < 4)
        return BAIL;
    const unsigned char *p = s->p;
    uint32_t v = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    float f;
    memcpy(&f, &v, 4);
    *d = (double)f;
    s->p += 4;
    return OK;
}

/* ---- text output --------------------------------------------------------------------------- */

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    char small[2048];
} Out;

static int out_grow(Out *o, Py_ssize_t need)
{
    Py_ssize_t cap = o->cap;
    while (cap < o->len + need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return FAIL;
        }
        cap *= 2;
    }
    char *nb;
    if (o->buf == o->small) {
        nb = PyMem_Malloc(cap);
        if (nb)
            memcpy(nb, o->buf, o->len);
    } else {
        nb = PyMem_Realloc(o->buf, cap);
    }
    if (!nb) {
        PyErr_NoMemory();
        return FAIL;
    }
    o->buf = nb;
    o->cap = cap;
    return OK;
}

#define RESERVE(o, n) do { if ((o)->len + (Py_ssize_t)(n) > (o)->cap && out_grow((o), (n))) return FAIL; } while (0)

static inline int put(Out *o, const char *s, Py_ssize_t n)
{
    RESERVE(o, n);
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    return OK;
}

static inline int putc1(Out *o, char c)
{
    RESERVE(o, 1);
    o->buf[o->len++] = c;
    return OK;
}

static PyObject *out_str(Out *o, Py_ssize_t start)
{
    Py_ssize_t n = o->len - start;
    PyObject *u = PyUnicode_New(n, 127);
    if (u)
        memcpy(PyUnicode_1BYTE_DATA(u), o->buf + start, n);
    return u;
}

static const char HEX[] = "0123456789abcdef";

static inline char *hex_into(char *w, const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        *w++ = HEX[p[i] >> 4];
        *w++ = HEX[p[i] & 15];
    }
    return w;
}

static int put_long(Out *o, int64_t v)
{
    char tmp[24];
    char *e = tmp + sizeof tmp, *w = e;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        *--w = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--w = '-';
    return put(o, w, e - w);
}

/* float.__repr__, and json's spelling of the non-finite values. */
static int put_repr(Out *o, double d)
{
    if (!isfinite(d)) {
        if (isnan(d))
            return put(o, "NaN", 3);
        return d > 0 ? put(o, "Infinity", 8) : put(o, "-Infinity", 9);
    }
    char *s = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!s)
        return FAIL;
    int rc = put(o, s, (Py_ssize_t)strlen(s));
    PyMem_Free(s);
    return rc;
}

/* json.encoder's ensure_ascii string of UTF-8 bytes; BAIL on what Python's strict decoder refuses. */
static int put_json_str(Out *o, const unsigned char *p, Py_ssize_t n)
{
    RESERVE(o, n * 6 + 2);
    char *w = o->buf + o->len;
    const unsigned char *e = p + n;
    *w++ = '"';
    while (p < e) {
        unsigned c = *p;
        if (c < 0x80) {
            p++;
            if (c >= 0x20 && c <= 0x7e && c != '"' && c != '\\') {
                *w++ = (char)c;
                continue;
            }
            *w++ = '\\';
            switch (c) {
            case '"': *w++ = '"'; break;
            case '\\': *w++ = '\\'; break;
            case '\b': *w++ = 'b'; break;
            case '\f': *w++ = 'f'; break;
            case '\n': *w++ = 'n'; break;
            case '\r': *w++ = 'r'; break;
            case '\t': *w++ = 't'; break;
            default:
                *w++ = 'u'; *w++ = '0'; *w++ = '0';
                *w++ = HEX[c >> 4]; *w++ = HEX[c & 15];
            }
            continue;
        }
        uint32_t cp;
        int more;
        unsigned lo = 0x80, hi = 0xBF; /* allowed range of the first continuation byte */
        if (c >= 0xC2 && c <= 0xDF) { cp = c & 0x1F; more = 1; }
        else if (c >= 0xE0 && c <= 0xEF) {
            cp = c & 0x0F; more = 2;
            if (c == 0xE0) lo = 0xA0;       /* overlong */
            if (c == 0xED) hi = 0x9F;       /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            cp = c & 0x07; more = 3;
            if (c == 0xF0) lo = 0x90;       /* overlong */
            if (c == 0xF4) hi = 0x8F;       /* past U+10FFFF */
        } else
            return BAIL;
        if (e - p <= more)
            return BAIL;
        if (p[1] < lo || p[1] > hi)
            return BAIL;
        cp = (cp << 6) | (p[1] & 0x3F);
        for (int k = 2; k <= more; k++) {
            if ((p[k] & 0xC0) != 0x80)
                return BAIL;
            cp = (cp << 6) | (p[k] & 0x3F);
        }
        p += more + 1;
        if (cp >= 0x10000) {
            uint32_t v = cp - 0x10000;
            uint32_t h = 0xD800 | (v >> 10), l = 0xDC00 | (v & 0x3FF);
            *w++ = '\\'; *w++ = 'u';
            *w++ = HEX[h >> 12]; *w++ = HEX[(h >> 8) & 15]; *w++ = HEX[(h >> 4) & 15]; *w++ = HEX[h & 15];
            *w++ = '\\'; *w++ = 'u';
            *w++ = HEX[l >> 12]; *w++ = HEX[(l >> 8) & 15]; *w++ = HEX[(l >> 4) & 15]; *w++ = HEX[l & 15];
        } else {
            *w++ = '\\'; *w++ = 'u';
            *w++ = HEX[cp >> 12]; *w++ = HEX[(cp >> 8) & 15]; *w++ = HEX[(cp >> 4) & 15]; *w++ = HEX[cp & 15];
        }
    }
    *w++ = '"';
    o->len = w - o->buf;
    return OK;
}

static int put_hex_str(Out *o, const unsigned char *p, Py_ssize_t n)
{
    RESERVE(o, 2 * n + 2);
    char *w = o->buf + o->len;
    *w++ = '"';
    w = hex_into(w, p, n);
    *w++ = '"';
    o->len = w - o->buf;
    return OK;
}

/* ---- JSON of an Avro value (json.JSONEncoder(separators=(",", ":"), default=_hex)) --------- */

typedef struct {
    const Program *prog;
} Ctx;

#define TRY(x) do { int rc_ = (x); if (rc_) return rc_; } while (0)

static int json_value(const Ctx *c, const int32_t **pc, Src *s, Out *o)
{
    int32_t t = *(*pc)++;
    switch (t) {
    case T_LONG:
    case T_INT: {
        int64_t v;
        TRY(rd_long(s, &v));
        return put_long(o, v);
    }
    case T_STRING: {
        Py_ssize_t n;
        TRY(rd_len(s, &n));
        const unsigned char *p = s->p;
        s->p += n;
        return put_json_str(o, p, n);
    }
    case T_BYTES: {
        Py_ssize_t n;
        TRY(rd_len(s, &n));
        const unsigned char *p = s->p;
        s->p += n;
        return put_hex_str(o, p, n);
    }
    case T_FIXED: {
        Py_ssize_t n = *(*pc)++;
        if (s->end - s->p < n)
            return BAIL;
        const unsigned char *p = s->p;
        s->p += n;
        return put_hex_str(o, p, n);
    }
    case T_FLOAT: {
        double d;
        TRY(rd_float(s, &d));
        return put_repr(o, d);
    }
    case T_DOUBLE: {
        double d;
        TRY(rd_double(s, &d));
        return put_repr(o, d);
    }
    case T_BOOL: {
        if (s->p >= s->end || *s->p > 1)
            return BAIL;
        return *s->p++ ? put(o, "true", 4) : put(o, "false", 5);
    }
    case T_ARRAY: {
        int32_t ilen = *(*pc)++;
        const int32_t *item = *pc;
        int first = 1;
        TRY(putc1(o, '['));
        for (;;) {
            Py_ssize_t n;
            TRY(rd_count(s, &n));
            if (n == 0)
                break;
            for (Py_ssize_t i = 0; i < n; i++) {
                if (!first)
                    TRY(putc1(o, ','));
                first = 0;
                const int32_t *ip = item;
                TRY(json_value(c, &ip, s, o));
            }
        }
        *pc = item + ilen;
        return putc1(o, ']');
    }
    case T_RECORD: {
        int32_t nf = *(*pc)++;
        TRY(putc1(o, '{'));
        for (int32_t f = 0; f < nf; f++) {
            int32_t k = *(*pc)++;
            if (f)
                TRY(putc1(o, ','));
            TRY(put(o, c->prog->keys[k], c->prog->keylens[k]));
            TRY(json_value(c, pc, s, o));
        }
        return putc1(o, '}');
    }
    }
    return BAIL; /* unreachable: programs are validated */
}

/* ---- top-level fields -------------------------------------------------------------------------- */

static int scalar(const int32_t **pc, Src *s, PyObject **slot)
{
    int32_t t = *(*pc)++;
    switch (t) {
    case T_LONG:
    case T_INT: {
        int64_t v;
        TRY(rd_long(s, &v));
        *slot = PyLong_FromLongLong(v);
        break;
    }
    case T_STRING: {
        Py_ssize_t n;
        TRY(rd_len(s, &n));
        *slot = PyUnicode_DecodeUTF8((const char *)s->p, n, NULL);
        s->p += n;
        if (!*slot && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return BAIL;
        }
        break;
    }
    case T_BYTES: {
        Py_ssize_t n;
        TRY(rd_len(s, &n));
        *slot = PyBytes_FromStringAndSize((const char *)s->p, n);
        s->p += n;
        break;
    }
    case T_FIXED: {
        Py_ssize_t n = *(*pc)++;
        if (s->end - s->p < n)
            return BAIL;
        *slot = PyBytes_FromStringAndSize((const char *)s->p, n);
        s->p += n;
        break;
    }
    case T_FLOAT:
    case T_DOUBLE: {
        double d;
        TRY(t == T_FLOAT ? rd_float(s, &d) : rd_double(s, &d));
        *slot = PyFloat_FromDouble(d);
        break;
    }
    case T_BOOL:
        if (s->p >= s->end || *s->p > 1)
            return BAIL;
        *slot = *s->p++ ? Py_True : Py_False;
        Py_INCREF(*slot);
        break;
    default:
        return BAIL;
    }
    return *slot ? OK : FAIL;
}

/* "%#.17g" of a float32 value widened to double, the same text as
 * PyOS_double_to_string(d, 'g', 17, Py_DTSF_ALT, NULL) but without its big-number arithmetic: a
 * float32 is m * 2^e with m < 2^24, so d * 10^k fits in 128 bits for 1e-28 <= |d| < 3.5e38 and the
 * 17 digits come exactly (ties to even, as dtoa). Returns the length written, 0 where the value is
 * outside that range (or not a float32), and the caller asks PyOS_double_to_string. */
#ifdef __SIZEOF_INT128__
typedef unsigned __int128 u128;
static u128 POW5[45], POW10[39];
#define TEN16 10000000000000000ULL
#define TEN17 100000000000000000ULL

static void g17_init(void)
{
    POW5[0] = POW10[0] = 1;
    for (int i = 1; i < 45; i++)
        POW5[i] = POW5[i - 1] * 5;
    for (int i = 1; i < 39; i++)
        POW10[i] = POW10[i - 1] * 10;
}

/* floor(m * 2^e * 10^k) into *q and whether the rest is below, at or above one half (-1, 0, 1);
 * 0 if it does not fit. */
static int scaled(uint64_t m, int e, int k, uint64_t *q, int *half)
{
    u128 num, Q, rem, den;
    if (k >= 0) {
        if (k > 44)
            return 0;
        num = (u128)m * POW5[k];
        int sh = e + k;
        if (sh >= 0) {
            if (sh > 20)
                return 0;
            Q = num << sh;
            *half = -1;
            if (Q >= (u128)TEN17 * 16)
                return 0;
            *q = (uint64_t)Q;
            return 1;
        }
        int s = -sh;
        if (s >= 127)
            return 0;
        Q = num >> s;
        rem = num & (((u128)1 << s) - 1);
        den = (u128)1 << s;
    } else {
        int kk = -k;
        if (kk > 38 || e < 0 || e > 103)
            return 0;
        num = (u128)m << e;
        den = POW10[kk];
        Q = num / den;
        rem = num % den;
    }
    if (Q >= (u128)TEN17 * 16)
        return 0;
    *q = (uint64_t)Q;
    u128 twice = rem * 2; /* den <= 2^127, so no overflow */
    *half = twice < den ? -1 : twice == den ? 0 : 1;
    return 1;
}

static int g17(double d, char *out)
{
    if (!isfinite(d) || d == 0)
        return 0;
    int neg = d < 0, e2;
    double fr = frexp(fabs(d), &e2);
    double mf = fr * 16777216.0;
    uint64_t m = (uint64_t)mf;
    if ((double)m != mf)
        return 0; /* more than 24 significant bits: not a float32 */
    int e = e2 - 24;
    int E = (int)floor((e2 - 1) * 0.30102999566398120);
    uint64_t q = 0;
    int half = 0, tries = 0;
    for (;;) {
        if (!scaled(m, e, 16 - E, &q, &half))
            return 0;
        if (q >= TEN17)
            E++;
        else if (q < TEN16)
            E--;
        else
            break;
        if (++tries > 3)
            return 0;
    }
    if (half > 0 || (half == 0 && (q & 1)))
        q++;
    if (q == TEN17) {
        q = TEN16;
        E++;
    }
    char dig[17];
    for (int i = 16; i >= 0; i--) {
        dig[i] = (char)('0' + q % 10);
        q /= 10;
    }
    char *w = out;
    if (neg)
        *w++ = '-';
    if (E >= -4 && E < 17) {
        if (E >= 0) {
            memcpy(w, dig, E + 1);
            w += E + 1;
            *w++ = '.';
            memcpy(w, dig + E + 1, 16 - E);
            w += 16 - E;
        } else {
            *w++ = '0';
            *w++ = '.';
            for (int i = 0; i < -E - 1; i++)
                *w++ = '0';
            memcpy(w, dig, 17);
            w += 17;
        }
    } else {
        *w++ = dig[0];
        *w++ = '.';
        memcpy(w, dig + 1, 16);
        w += 16;
        *w++ = 'e';
        int x = E;
        *w++ = x < 0 ? '-' : '+';
        if (x < 0)
            x = -x;
        if (x >= 100)
            *w++ = (char)('0' + x / 100);
        *w++ = (char)('0' + (x / 10) % 10);
        *w++ = (char)('0' + x % 10);
    }
    return (int)(w - out);
}
#else
static void g17_init(void) {}
static int g17(double d, char *out) { (void)d; (void)out; return 0; }
#endif

/* g17, or Python's own formatting where g17 declines. */
static int put_g17(Out *o, double d)
{
    RESERVE(o, 32);
    int n = g17(d, o->buf + o->len);
    if (n) {
        o->len += n;
        return OK;
    }
    char *txt = PyOS_double_to_string(d, 'g', 17, Py_DTSF_ALT, NULL);
    if (!txt)
        return FAIL;
    int rc = put(o, txt, (Py_ssize_t)strlen(txt));
    PyMem_Free(txt);
    return rc;
}

/* Test hook: g17's text of d, or None where it leaves d to PyOS_double_to_string. */
static PyObject *g17_text(PyObject *self, PyObject *arg)
{
    (void)self;
    double d = PyFloat_AsDouble(arg);
    if (d == -1.0 && PyErr_Occurred())
        return NULL;
    char buf[40];
    int n = g17(d, buf);
    if (!n)
        Py_RETURN_NONE;
    return PyUnicode_FromStringAndSize(buf, n);
}

/* "%#.17g" of each element in "[...]" (ledger.tables._floats); a NaN or infinity makes the column
 * _json's text instead, as there. */
static int floats_text(const Ctx *c, const int32_t **pc, Src *s, Out *o)
{
    const int32_t *start_pc = *pc;
    Src start = *s;
    Py_ssize_t out_start = o->len;
    int first = 1;
    TRY(putc1(o, '['));
    for (;;) {
        Py_ssize_t n;
        TRY(rd_count(s, &n));
        if (n == 0)
            break;
        for (Py_ssize_t i = 0; i < n; i++) {
            double d;
            TRY(rd_float(s, &d));
            if (!isfinite(d)) {
                *s = start;
                o->len = out_start;
                *pc = start_pc;
                return json_value(c, pc, s, o);
            }
            if (!first)
                TRY(putc1(o, ','));
            first = 0;
            TRY(put_g17(o, d));
        }
    }
    *pc = start_pc + 3; /* T_ARRAY, 1, T_FLOAT */
    return putc1(o, ']');
}

/* b"".join(array<fixed>). */
static int hashes(const int32_t **pc, Src *s, Out *o, PyObject **slot)
{
    Py_ssize_t size = (*pc)[3]; /* T_ARRAY, 2, T_FIXED, size */
    *pc += 4;
    o->len = 0;
    for (;;) {
        Py_ssize_t n;
        TRY(rd_count(s, &n));
        if (n == 0)
            break;
        if (size && n > (s->end - s->p) / size)
            return BAIL;
        TRY(put(o, (const char *)s->p, n * size));
        s->p += n * size;
    }
    *slot = PyBytes_FromStringAndSize(o->buf, o->len);
    return *slot ? OK : FAIL;
}

static int cmp32(const void *a, const void *b, size_t n)
{
    return memcmp(*(const unsigned char *const *)a, *(const unsigned char *const *)b, n);
}

static size_t sort_width;
static int cmp_ref(const void *a, const void *b) { return cmp32(a, b, sort_width); }

/* An array of records written as JSON, with field `cap` of each item seen on the way:
 * A_PROTECTED: slot+1 = " ".join(sorted({hex of the fixed})) (ledger.tables._protected), and the
 *   JSON is "[]" when the array is empty (as _json([]) is);
 * A_JSON_SUM: slot+1 = sum(item[cap] for item in array) as Python's sum() computes it. */
static int array_capture(const Ctx *c, int action, int32_t cap, const int32_t **pc, Src *s, Out *o,
                         PyObject **slots)
{
    const int32_t *tp = *pc;
    if (tp[0] != T_ARRAY || tp[2] != T_RECORD)
        return BAIL;
    int32_t ilen = tp[1];
    const int32_t *item = tp + 2;
    int32_t nf = item[1];
    const unsigned char *stack_refs[64];
    const unsigned char **refs = stack_refs;
    Py_ssize_t nrefs = 0, refcap = 64, refsize = 0;
    double sum = 0.0;
    Py_ssize_t count = 0;
    PyObject *sumlist = NULL;
    int rc = OK, first = 1;

    o->len = 0;
#define CHECK(x) do { rc = (x); if (rc) goto done; } while (0)
    CHECK(putc1(o, '['));
    for (;;) {
        Py_ssize_t n;
        CHECK(rd_count(s, &n));
        if (n == 0)
            break;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!first)
                CHECK(putc1(o, ','));
            first = 0;
            const int32_t *ip = item + 2;
            CHECK(putc1(o, '{'));
            for (int32_t f = 0; f < nf; f++) {
                int32_t k = *ip++;
                if (f)
                    CHECK(putc1(o, ','));
                CHECK(put(o, c->prog->keys[k], c->prog->keylens[k]));
                const unsigned char *at = s->p;
                int32_t ft = *ip;
                CHECK(json_value(c, &ip, s, o));
                if (f != cap)
                    continue;
                if (action == A_JSON_SUM) {
                    double d;
                    Src one = {at, s->p};
                    if (ft == T_DOUBLE)
                        rd_double(&one, &d);
                    else
                        rd_float(&one, &d);
#if PY_VERSION_HEX >= 0x030C0000
                    /* 3.12's sum() compensates rounding: let it do the adding */
                    if (!sumlist && !(sumlist = PyList_New(0))) { rc = FAIL; goto done; }
                    PyObject *x = PyFloat_FromDouble(d);
                    if (!x || PyList_Append(sumlist, x)) { Py_XDECREF(x); rc = FAIL; goto done; }
                    Py_DECREF(x);
#else
                    sum += d;
#endif
                } else {
                    if (nrefs == refcap) {
                        const unsigned char **nr = PyMem_Malloc(sizeof(*nr) * refcap * 2);
                        if (!nr) { PyErr_NoMemory(); rc = FAIL; goto done; }
                        memcpy(nr, refs, sizeof(*nr) * nrefs);
                        if (refs != stack_refs)
                            PyMem_Free(refs);
                        refs = nr;
                        refcap *= 2;
                    }
                    refs[nrefs++] = at;
                    refsize = s->p - at;
                }
            }
            CHECK(putc1(o, '}'));
            count++;
        }
    }
    CHECK(putc1(o, ']'));
    *pc = item + ilen;
    if (!(slots[0] = out_str(o, 0))) { rc = FAIL; goto done; }
    if (action == A_JSON_SUM) {
        if (count == 0)
            slots[1] = PyLong_FromLong(0);
#if PY_VERSION_HEX >= 0x030C0000
        else
            slots[1] = PyObject_CallOneArg(builtin_sum, sumlist);
#else
        else
            slots[1] = PyFloat_FromDouble(0.0 + sum);
#endif
    } else if (nrefs == 0) {
        slots[1] = PyUnicode_New(0, 127);
    } else {
        sort_width = (size_t)refsize;
        qsort(refs, nrefs, sizeof(*refs), cmp_ref);
        Py_ssize_t uniq = 1;
        for (Py_ssize_t i = 1; i < nrefs; i++)
            if (memcmp(refs[i], refs[uniq - 1], refsize))
                refs[uniq++] = refs[i];
        Py_ssize_t width = 2 * refsize;
        PyObject *u = PyUnicode_New(uniq * width + (uniq - 1), 127);
        if (u) {
            char *w = (char *)PyUnicode_1BYTE_DATA(u);
            for (Py_ssize_t i = 0; i < uniq; i++) {
                if (i)
                    *w++ = ' ';
                w = hex_into(w, refs[i], refsize);
            }
        }
        slots[1] = u;
    }
    if (!slots[1])
        rc = FAIL;
done:
#undef CHECK
    if (refs != stack_refs)
        PyMem_Free(refs);
    Py_XDECREF(sumlist);
    return rc;
}

/* ---- one event ---------------------------------------------------------------------------------- */

static int decode_event(const Program *prog, Src *s, PyObject **slots, Out *o)
{
    Ctx c = {prog};
    const int32_t *pc = prog->code;
    int32_t nfields = *pc++;
    int slot = 0;
    for (int32_t f = 0; f < nfields; f++) {
        int32_t action = *pc++;
        switch (action) {
        case A_SKIP:
            o->len = 0;
            TRY(json_value(&c, &pc, s, o));
            break;
        case A_SCALAR:
            TRY(scalar(&pc, s, &slots[slot++]));
            break;
        case A_JSON:
            o->len = 0;
            TRY(json_value(&c, &pc, s, o));
            if (!(slots[slot++] = out_str(o, 0)))
                return FAIL;
            break;
        case A_FLOATS:
            o->len = 0;
            TRY(floats_text(&c, &pc, s, o));
            if (!(slots[slot++] = out_str(o, 0)))
                return FAIL;
            break;
        case A_HASHES:
            TRY(hashes(&pc, s, o, &slots[slot++]));
            break;
        case A_PROTECTED:
        case A_JSON_SUM: {
            int32_t cap = *pc++;
            TRY(array_capture(&c, action, cap, &pc, s, o, &slots[slot]));
            slot += 2;
            break;
        }
        default:
            return BAIL;
        }
    }
    return s->p == s->end ? OK : BAIL; /* trailing bytes: the reference names them */
}

static const Program *find_program(const unsigned char *fp)
{
    for (Py_ssize_t i = 0; i < nprograms; i++)
        if (memcmp(programs[i].fp, fp, 8) == 0)
            return &programs[i];
    return NULL;
}

/* The row of one event: OK with *prog_out and a new reference in *row_out, BAIL when this event is
 * left to the reference, FAIL with a Python exception set. args: value, topic, partition, offset. */
static int native_row(PyObject *const *args, const Program **prog_out, PyObject **row_out)
{
    PyObject *value = args[0];
    if (!PyBytes_CheckExact(value))
        return BAIL;
    const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t len = PyBytes_GET_SIZE(value);
    if (len < 10 + 32 || v[0] != 0xC3 || v[1] != 0x01)
        return BAIL;
    const Program *prog = find_program(v + 2);
    if (!prog)
        return BAIL;

    PyObject *slots[MAX_SLOTS] = {NULL};
    Out o;
    o.buf = o.small;
    o.len = 0;
    o.cap = sizeof o.small;
    Src s = {v + 10, v + len};
    int rc = decode_event(prog, &s, slots, &o);
    if (rc == OK) {
        PyObject *row = PyTuple_New(prog->ncols);
        if (!row) {
            rc = FAIL;
            goto done;
        }
        for (Py_ssize_t i = 0; i < prog->ncols; i++) {
            int32_t col = prog->cols[i];
            PyObject *x;
            switch (col) {
            case C_NONE: x = Py_None; Py_INCREF(x); break;
            case C_TOPIC: x = args[1]; Py_INCREF(x); break;
            case C_PARTITION: x = args[2]; Py_INCREF(x); break;
            case C_OFFSET: x = args[3]; Py_INCREF(x); break;
            case C_RAW: x = value; Py_INCREF(x); break;
            case C_EVENT_HASH:
                x = PyBytes_FromStringAndSize((const char *)v + len - 32, 32);
                if (!x) {
                    Py_DECREF(row);
                    rc = FAIL;
                    goto done;
                }
                break;
            default: x = slots[col]; Py_INCREF(x);
            }
            PyTuple_SET_ITEM(row, i, x);
        }
        *prog_out = prog;
        *row_out = row;
    }
done:
    for (int i = 0; i < prog->nslots; i++)
        Py_XDECREF(slots[i]);
    if (o.buf != o.small)
        PyMem_Free(o.buf);
    return rc;
}

/* (name, [(table, row)]), Py_None when this event is left to the reference, NULL on error. */
static PyObject *native_rows(PyObject *const *args)
{
    const Program *prog;
    PyObject *row;
    int rc = native_row(args, &prog, &row);
    if (rc == BAIL)
        Py_RETURN_NONE;
    if (rc != OK)
        return NULL;
    PyObject *pair = PyTuple_Pack(2, prog->table, row);
    Py_DECREF(row);
    if (!pair)
        return NULL;
    PyObject *list = PyList_New(1);
    if (!list) {
        Py_DECREF(pair);
        return NULL;
    }
    PyList_SET_ITEM(list, 0, pair);
    PyObject *result = PyTuple_Pack(2, prog->name, list);
    Py_DECREF(list);
    return result;
}

static int check_args(Py_ssize_t nargs, const char *fn)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s(value, topic, partition, offset) takes 4 arguments, got %zd", fn, nargs);
        return FAIL;
    }
    if (!programs) {
        PyErr_SetString(PyExc_RuntimeError, "ledger row programs not set: call set_programs first");
        return FAIL;
    }
    return OK;
}

static PyObject *decode_rows_native(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_args(nargs, "decode_rows_native"))
        return NULL;
    return native_rows(args);
}

static PyObject *decode_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_args(nargs, "decode_rows"))
        return NULL;
    PyObject *r = native_rows(args);
    if (r != Py_None) {
        n_native++;
        return r;
    }
    Py_DECREF(r);
    n_fallback++;
    return PyObject_Vectorcall(fallback, args, 4, NULL);
}

static PyObject *counts(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(KK)", n_native, n_fallback);
}

/* ---- the materializer's per-event checks, common case only (ledger.materialize.check_batch) ---- */

/* SHA-256 (sha256_of, set_sha256, SHA_READY): the header shared with eventlog's C modules. */
#include "_sha256.h"

/* Row columns check_batch reads (ledger/fastrows.py _HEADER; every program starts with it). */
enum { R_EVENT_ID = 0, R_CHAIN = 4, R_SEQ = 5, R_EVENT_TYPE = 7, R_PREV = 16, R_HASH = 17, R_MIN = 18 };

/* 1 if equal, 0 if not, -1 with an exception (a and b are exact str). */
static inline int str_eq(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

/* One record, handled only when it is the normal case: OK (everything recorded), BAIL (nothing
 * touched: the Python loop handles it), FAIL (exception). */
static int check_one(PyObject *rec, PyObject *heads, PyObject *changed, PyObject *offsets, PyObject *rows,
                     PyObject *topic_of, PyObject *seen)
{
    if (!PyTuple_CheckExact(rec) || PyTuple_GET_SIZE(rec) != 5)
        return BAIL;
    PyObject *topic = PyTuple_GET_ITEM(rec, 0), *partition = PyTuple_GET_ITEM(rec, 1);
    PyObject *offset = PyTuple_GET_ITEM(rec, 2), *key = PyTuple_GET_ITEM(rec, 3);
    PyObject *value = PyTuple_GET_ITEM(rec, 4);
    if (!PyUnicode_CheckExact(topic) || !PyLong_CheckExact(partition) || !PyLong_CheckExact(offset) ||
        !PyUnicode_CheckExact(key) || !PyBytes_CheckExact(value))
        return BAIL;
    int overflow;
    long long off = PyLong_AsLongLongAndOverflow(offset, &overflow);
    if (overflow || off == LLONG_MAX || (off == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return BAIL;
    }
    PyObject *dargs[4] = {value, topic, partition, offset};
    const Program *prog;
    PyObject *row = NULL, *hkey = NULL, *okey = NULL, *next_off = NULL, *head_new = NULL, *list = NULL;
    int rc = native_row(dargs, &prog, &row);
    if (rc != OK)
        return rc;
    rc = BAIL;
    if (PyTuple_GET_SIZE(row) < R_MIN)
        goto done;
    PyObject *event_id = PyTuple_GET_ITEM(row, R_EVENT_ID), *chain = PyTuple_GET_ITEM(row, R_CHAIN);
    PyObject *seqo = PyTuple_GET_ITEM(row, R_SEQ), *event_type = PyTuple_GET_ITEM(row, R_EVENT_TYPE);
    PyObject *prev = PyTuple_GET_ITEM(row, R_PREV), *hash = PyTuple_GET_ITEM(row, R_HASH);
    if (!PyUnicode_CheckExact(event_id) || !PyUnicode_CheckExact(chain) || !PyLong_CheckExact(seqo) ||
        !PyUnicode_CheckExact(event_type) || !PyBytes_CheckExact(prev) || !PyBytes_CheckExact(hash) ||
        PyBytes_GET_SIZE(hash) != 32)
        goto done;
    /* hash, topic, key */
    const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t vlen = PyBytes_GET_SIZE(value);
    unsigned char md[32];
    sha256_of(v, (size_t)(vlen - 32), md);
    if (memcmp(md, PyBytes_AS_STRING(hash), 32) != 0)
        goto done;
    PyObject *want_topic = PyDict_GetItemWithError(topic_of, event_type);
    if (!want_topic) {
        if (PyErr_Occurred())
            PyErr_Clear();
        goto done;
    }
    if (!PyUnicode_CheckExact(want_topic))
        goto done;
    int eq = str_eq(want_topic, topic);
    if (eq == 1)
        eq = str_eq(key, chain);
    if (eq != 1) {
        rc = eq < 0 ? FAIL : BAIL;
        goto done;
    }
    /* the chain's next event? */
    long long seq = PyLong_AsLongLongAndOverflow(seqo, &overflow);
    if (overflow || (seq == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        goto done;
    }
    if (!(hkey = PyTuple_Pack(2, topic, chain))) {
        rc = FAIL;
        goto done;
    }
    PyObject *head = PyDict_GetItemWithError(heads, hkey);
    if (!head && PyErr_Occurred()) {
        rc = FAIL;
        goto done;
    }
    if (!head || head == Py_None) {
        static const unsigned char zero[32] = {0};
        if (seq != 0 || PyBytes_GET_SIZE(prev) != 32 || memcmp(PyBytes_AS_STRING(prev), zero, 32) != 0)
            goto done;
    } else {
        if (!PyTuple_CheckExact(head) || PyTuple_GET_SIZE(head) != 2)
            goto done;
        PyObject *hseq = PyTuple_GET_ITEM(head, 0), *hhash = PyTuple_GET_ITEM(head, 1);
        if (!PyLong_CheckExact(hseq) || !PyBytes_CheckExact(hhash))
            goto done;
        long long h = PyLong_AsLongLongAndOverflow(hseq, &overflow);
        if (overflow || (h == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            goto done;
        }
        if (h == LLONG_MAX || seq != h + 1 || PyBytes_GET_SIZE(prev) != PyBytes_GET_SIZE(hhash) ||
            memcmp(PyBytes_AS_STRING(prev), PyBytes_AS_STRING(hhash), PyBytes_GET_SIZE(prev)) != 0)
            goto done;
    }
    list = PyDict_GetItemWithError(rows, prog->table);
    if (!list && PyErr_Occurred()) {
        rc = FAIL;
        goto done;
    }
    if (list && !PyList_CheckExact(list)) {
        list = NULL;
        goto done;
    }
    Py_XINCREF(list); /* held across the dict updates below */
    /* the normal case: record it */
    rc = FAIL;
    if (!(okey = PyTuple_Pack(2, topic, partition)) || !(next_off = PyLong_FromLongLong(off + 1)) ||
        PyDict_SetItem(offsets, okey, next_off))
        goto done;
    if (!(head_new = PyTuple_Pack(2, seqo, hash)) || PyDict_SetItem(heads, hkey, head_new) ||
        PyDict_SetItem(changed, hkey, head_new))
        goto done;
    if (seen != Py_None && PySet_Add(seen, event_id))
        goto done;
    if (list) {
        if (PyList_Append(list, row))
            goto done;
    } else {
        if (!(list = PyList_New(1)))
            goto done;
        Py_INCREF(row);
        PyList_SET_ITEM(list, 0, row);
        if (PyDict_SetItem(rows, prog->table, list))
            goto done;
    }
    n_native++;
    rc = OK;
done:
    Py_XDECREF(row);
    Py_XDECREF(hkey);
    Py_XDECREF(okey);
    Py_XDECREF(next_off);
    Py_XDECREF(head_new);
    Py_XDECREF(list);
    return rc;
}

/* check_rows(records, start, heads, changed, offsets, rows, topic_of, seen) -> index of the first
 * record not handled. Each record from `start` that is the normal case (decoded by a program here,
 * hash right, on its event type's topic, keyed by its chain, the chain's next event) is recorded as
 * check_batch records it: offsets[(topic, partition)] = offset + 1, heads[(topic, chain)] =
 * changed[(topic, chain)] = (seq, event_hash), seen.add(event_id) unless seen is None, and
 * rows[table].append(row). Stops at the first record that is anything else, touching nothing for it. */
static PyObject *check_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError,
                     "check_rows(records, start, heads, changed, offsets, rows, topic_of, seen) takes 8 arguments, "
                     "got %zd", nargs);
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "check_rows: start must be >= 0");
        return NULL;
    }
    PyObject *records = args[0], *heads = args[2], *changed = args[3], *offsets = args[4], *rows = args[5];
    PyObject *topic_of = args[6], *seen = args[7];
    if (!programs || !SHA_READY || !PyList_CheckExact(records) || !PyDict_CheckExact(heads) ||
        !PyDict_CheckExact(changed) || !PyDict_CheckExact(offsets) || !PyDict_CheckExact(rows) ||
        !PyDict_CheckExact(topic_of) || (seen != Py_None && !PySet_CheckExact(seen)))
        return PyLong_FromSsize_t(start); /* nothing handled here: the caller's Python path does it all */
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(records); i++) {
        int rc = check_one(PyList_GET_ITEM(records, i), heads, changed, offsets, rows, topic_of, seen);
        if (rc == FAIL)
            return NULL;
        if (rc == BAIL)
            break;
    }
    return PyLong_FromSsize_t(i);
}

/* ---- programs --------------------------------------------------------------------------------- */

static void free_programs(void)
{
    for (Py_ssize_t i = 0; i < nprograms; i++) {
        Program *p = &programs[i];
        Py_XDECREF(p->name);
        Py_XDECREF(p->table);
        PyMem_Free(p->code);
        PyMem_Free(p->cols);
        for (Py_ssize_t k = 0; k < p->nkeys; k++)
            PyMem_Free(p->keys ? p->keys[k] : NULL);
        PyMem_Free(p->keys);
        PyMem_Free(p->keylens);
    }
    PyMem_Free(programs);
    programs = NULL;
    nprograms = 0;
}

/* Structural check of a type code so that decoding never reads past the program. */
static int valid_type(const int32_t *code, Py_ssize_t n, Py_ssize_t *pc, Py_ssize_t nkeys, int depth)
{
    if (depth > MAX_DEPTH || *pc >= n)
        return 0;
    int32_t t = code[(*pc)++];
    switch (t) {
    case T_LONG: case T_INT: case T_STRING: case T_BYTES: case T_FLOAT: case T_DOUBLE: case T_BOOL:
        return 1;
    case T_FIXED:
        if (*pc >= n || code[*pc] < 0)
            return 0;
        (*pc)++;
        return 1;
    case T_ARRAY: {
        if (*pc >= n)
            return 0;
        int32_t ilen = code[(*pc)++];
        Py_ssize_t start = *pc;
        if (!valid_type(code, n, pc, nkeys, depth + 1))
            return 0;
        return *pc - start == ilen;
    }
    case T_RECORD: {
        if (*pc >= n)
            return 0;
        int32_t nf = code[(*pc)++];
        if (nf < 0)
            return 0;
        for (int32_t f = 0; f < nf; f++) {
            if (*pc >= n || code[*pc] < 0 || code[*pc] >= nkeys)
                return 0;
            (*pc)++;
            if (!valid_type(code, n, pc, nkeys, depth + 1))
                return 0;
        }
        return 1;
    }
    }
    return 0;
}

static int valid_program(const Program *p)
{
    const int32_t *code = p->code;
    Py_ssize_t n = p->ncode, pc = 0;
    int slots = 0;
    if (n < 1)
        return 0;
    int32_t nfields = code[pc++];
    for (int32_t f = 0; f < nfields; f++) {
        if (pc >= n)
            return 0;
        int32_t action = code[pc++];
        Py_ssize_t tstart;
        switch (action) {
        case A_SKIP: case A_SCALAR: case A_JSON:
            tstart = pc;
            if (!valid_type(code, n, &pc, p->nkeys, 0))
                return 0;
            if (action == A_SCALAR && (code[tstart] == T_ARRAY || code[tstart] == T_RECORD))
                return 0;
            slots += action != A_SKIP;
            break;
        case A_FLOATS:
            if (pc + 3 > n || code[pc] != T_ARRAY || code[pc + 1] != 1 || code[pc + 2] != T_FLOAT)
                return 0;
            pc += 3;
            slots++;
            break;
        case A_HASHES:
            if (pc + 4 > n || code[pc] != T_ARRAY || code[pc + 1] != 2 || code[pc + 2] != T_FIXED || code[pc + 3] < 0)
                return 0;
            pc += 4;
            slots++;
            break;
        case A_PROTECTED: case A_JSON_SUM: {
            if (pc >= n)
                return 0;
            int32_t cap = code[pc++];
            tstart = pc;
            if (!valid_type(code, n, &pc, p->nkeys, 0))
                return 0;
            if (code[tstart] != T_ARRAY || code[tstart + 2] != T_RECORD || cap < 0 || cap >= code[tstart + 3])
                return 0;
            /* the captured field's type */
            Py_ssize_t q = tstart + 4;
            for (int32_t f2 = 0; f2 <= cap; f2++) {
                q++; /* key */
                if (f2 == cap)
                    break;
                if (!valid_type(code, n, &q, p->nkeys, 0))
                    return 0;
            }
            int32_t ft = code[q];
            if (action == A_JSON_SUM ? (ft != T_DOUBLE && ft != T_FLOAT) : (ft != T_FIXED || code[q + 1] == 0))
                return 0;
            slots += 2;
            break;
        }
        default:
            return 0;
        }
    }
    if (pc != n || slots != p->nslots || slots > MAX_SLOTS)
        return 0;
    for (Py_ssize_t i = 0; i < p->ncols; i++)
        if (p->cols[i] < C_RAW || p->cols[i] >= slots)
            return 0;
    return 1;
}

static int32_t *int_array(PyObject *seq, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of ints");
    if (!fast)
        return NULL;
    *n = PySequence_Fast_GET_SIZE(fast);
    int32_t *a = PyMem_Malloc(sizeof(int32_t) * (*n ? *n : 1));
    if (!a) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        long x = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if ((x == -1 && PyErr_Occurred()) || x < INT32_MIN || x > INT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_OverflowError, "program int out of range");
            PyMem_Free(a);
            Py_DECREF(fast);
            return NULL;
        }
        a[i] = (int32_t)x;
    }
    Py_DECREF(fast);
    return a;
}

/* set_programs([(fingerprint8, name, table, code, keys, cols, nslots), ...], fallback) */
static PyObject *set_programs(PyObject *self, PyObject *args)
{
    PyObject *list, *fb;
    if (!PyArg_ParseTuple(args, "O!O:set_programs", &PyList_Type, &list, &fb))
        return NULL;
    if (!PyCallable_Check(fb)) {
        PyErr_SetString(PyExc_TypeError, "set_programs: fallback must be callable");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    Program *progs = PyMem_Calloc(n ? n : 1, sizeof(Program));
    if (!progs)
        return PyErr_NoMemory();
    Py_ssize_t done = 0;
    for (; done < n; done++) {
        Program *p = &progs[done];
        PyObject *fp, *name, *table, *code, *keys, *cols;
        int nslots;
        Py_ssize_t fplen;
        const char *fpb;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, done), "OUUOOOi:program", &fp, &name, &table, &code, &keys,
                              &cols, &nslots))
            goto fail;
        if (PyBytes_AsStringAndSize(fp, (char **)&fpb, &fplen) || fplen != 8) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "program fingerprint must be 8 bytes");
            goto fail;
        }
        memcpy(p->fp, fpb, 8);
        p->name = name; Py_INCREF(name);
        p->table = table; Py_INCREF(table);
        p->nslots = nslots;
        if (!(p->code = int_array(code, &p->ncode)) || !(p->cols = int_array(cols, &p->ncols)))
            goto fail;
        PyObject *fk = PySequence_Fast(keys, "keys must be a sequence of str");
        if (!fk)
            goto fail;
        p->nkeys = PySequence_Fast_GET_SIZE(fk);
        p->keys = PyMem_Calloc(p->nkeys ? p->nkeys : 1, sizeof(char *));
        p->keylens = PyMem_Calloc(p->nkeys ? p->nkeys : 1, sizeof(Py_ssize_t));
        if (!p->keys || !p->keylens) {
            Py_DECREF(fk);
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t k = 0; k < p->nkeys; k++) {
            Py_ssize_t kl;
            const char *ks = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(fk, k), &kl);
            if (!ks || !(p->keys[k] = PyMem_Malloc(kl ? kl : 1))) {
                Py_DECREF(fk);
                if (!PyErr_Occurred())
                    PyErr_NoMemory();
                goto fail;
            }
            memcpy(p->keys[k], ks, kl);
            p->keylens[k] = kl;
        }
        Py_DECREF(fk);
        if (!valid_program(p)) {
            PyErr_Format(PyExc_ValueError, "row program for %U is malformed", name);
            goto fail;
        }
    }
    free_programs();
    programs = progs;
    nprograms = n;
    Py_INCREF(fb);
    Py_XSETREF(fallback, fb);
    Py_RETURN_NONE;
fail:
    {
        Program *old = programs;
        Py_ssize_t oldn = nprograms;
        programs = progs;
        nprograms = done + 1 <= n ? done + 1 : n;
        free_programs();
        programs = old;
        nprograms = oldn;
    }
    return NULL;
}

static PyMethodDef methods[] = {
    {"set_programs", set_programs, METH_VARARGS, "Install the per-schema row programs and the Python fallback."},
    {"decode_rows", (PyCFunction)(void (*)(void))decode_rows, METH_FASTCALL,
     "decode_rows(value, topic, partition, offset) -> (schema name, [(table, row tuple)])."},
    {"decode_rows_native", (PyCFunction)(void (*)(void))decode_rows_native, METH_FASTCALL,
     "As decode_rows, but None where the event is left to the Python reference."},
    {"_g17", g17_text, METH_O, "Test hook: the fast %#.17g text of a float32 value, or None where it declines."},
    {"set_sha256", set_sha256, METH_VARARGS, "set_sha256(init, update, final): OpenSSL's SHA256_* addresses."},
    {"check_rows", (PyCFunction)(void (*)(void))check_rows, METH_FASTCALL,
     "check_rows(records, start, heads, changed, offsets, rows, topic_of, seen) -> first index not handled."},
    {"counts", counts, METH_NOARGS, "(events decoded here, events passed to the fallback) by decode_rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_rowdecode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rowdecode(void)
{
    PyObject *builtins = PyEval_GetBuiltins();
    builtin_sum = builtins ? PyDict_GetItemString(builtins, "sum") : NULL;
    if (!builtin_sum) {
        PyErr_SetString(PyExc_ImportError, "_rowdecode: builtins.sum not found");
        return NULL;
    }
    Py_INCREF(builtin_sum);
    g17_init();
    return PyModule_Create(&moduledef);
}
