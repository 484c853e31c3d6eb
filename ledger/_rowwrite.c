/* The ledger's batch writer: one transaction of row inserts, written by SQLite on a thread of its own.

   Python's sqlite3 executemany binds every parameter under the GIL, so the inserts of one batch and
   the reading and checking of the next cannot share the machine's cores. Here the rows are first
   flattened (under the GIL) into C values that point into the Python objects, which the job keeps
   alive; a POSIX thread then runs BEGIN IMMEDIATE, every statement over its rows, and COMMIT without
   ever touching Python. ``Job.wait()`` joins it and raises what failed; on any failure the thread
   rolls the transaction back first.

   The SQLite functions come from the library that owns the connection (dlsym on the Python module
   that wraps it: sqlcipher3's, or the standard sqlite3's), never from a second copy. The connection's
   sqlite3* handle reaches us through SQLite's own extension loading: loading this shared object
   into the connection calls sqlite3_rowwrite_init with it, and ``take_loaded()`` hands it over once.
   The caller (ledger/nativewrite.py) does that under a lock, then turns extension loading off again.

   The caller guarantees that nothing else uses the connection while a job runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
typedef long long i64;

#define SQLITE_OK 0
#define SQLITE_DONE 101
#define SQLITE_STATIC ((void (*)(void *))0)

typedef struct {
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_int64)(sqlite3_stmt *, int, i64);
    int (*bind_double)(sqlite3_stmt *, int, double);
    int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
    int (*bind_blob)(sqlite3_stmt *, int, const void *, int, void (*)(void *));
    int (*bind_null)(sqlite3_stmt *, int);
    int (*bind_parameter_count)(sqlite3_stmt *);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    const char *(*errmsg)(sqlite3 *);
    int (*extended_errcode)(sqlite3 *);
    int (*get_autocommit)(sqlite3 *);
    int (*exec)(sqlite3 *, const char *, void *, void *, char **);
    const char *(*db_filename)(sqlite3 *, const char *);
} api_t;

static const char *API_NAMES[] = {
    "sqlite3_prepare_v2", "sqlite3_bind_int64", "sqlite3_bind_double", "sqlite3_bind_text",
    "sqlite3_bind_blob", "sqlite3_bind_null", "sqlite3_bind_parameter_count", "sqlite3_step",
    "sqlite3_reset", "sqlite3_finalize", "sqlite3_errmsg", "sqlite3_extended_errcode",
    "sqlite3_get_autocommit", "sqlite3_exec", "sqlite3_db_filename",
};

static sqlite3 *loaded_db = NULL;

/* SQLite's entry point for this file as an extension: remember the connection and stay loaded. */
__attribute__((visibility("default"))) int sqlite3_rowwrite_init(sqlite3 *db, char **err, const void *api) {
    (void)err;
    (void)api;
    loaded_db = db;
    return SQLITE_OK;
}

static PyObject *WriteError;  /* (extended code, message, statement index) */

/* ------------------------------------------------------------------ Writer: a connection's handle */
typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    api_t api;
    int busy;  /* a job runs on the connection */
} WriterObject;

typedef enum { V_NULL, V_INT, V_REAL, V_TEXT, V_BLOB } vkind;

typedef struct {
    vkind kind;
    int len;
    union {
        i64 i;
        double d;
        const char *p;
    } u;
} value_t;

typedef struct {
    const char *sql;     /* points into a str the job holds */
    Py_ssize_t nrows;
    int ncols;
    value_t *values;     /* nrows * ncols */
} stmt_t;

typedef struct {
    PyObject_HEAD
    WriterObject *writer;
    PyObject *keep;      /* the statements and row lists, alive while the thread reads them */
    stmt_t *stmts;
    Py_ssize_t nstmts;
    pthread_t thread;
    int started, joined;
    /* results, written by the thread before it ends */
    int failed;
    int code;
    Py_ssize_t failed_stmt;
    i64 rows;
    char message[512];
} JobObject;

static PyTypeObject JobType;

/* ------------------------------------------------------------------ the thread */
static int run_sql(JobObject *job, const char *sql) {
    api_t *a = &job->writer->api;
    int rc = a->exec(job->writer->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        job->failed = 1;
        job->code = a->extended_errcode(job->writer->db);
        snprintf(job->message, sizeof job->message, "%s: %s", sql, a->errmsg(job->writer->db));
    }
    return rc;
}

static int bind_row(api_t *a, sqlite3_stmt *st, const value_t *v, int ncols) {
    for (int c = 0; c < ncols; c++) {
        int rc;
        switch (v[c].kind) {
        case V_NULL: rc = a->bind_null(st, c + 1); break;
        case V_INT: rc = a->bind_int64(st, c + 1, v[c].u.i); break;
        case V_REAL: rc = a->bind_double(st, c + 1, v[c].u.d); break;
        case V_TEXT: rc = a->bind_text(st, c + 1, v[c].u.p, v[c].len, SQLITE_STATIC); break;
        default: rc = a->bind_blob(st, c + 1, v[c].u.p, v[c].len, SQLITE_STATIC); break;
        }
        if (rc != SQLITE_OK)
            return rc;
    }
    return SQLITE_OK;
}

static void *job_thread(void *arg) {
    JobObject *job = (JobObject *)arg;
    api_t *a = &job->writer->api;
    sqlite3 *db = job->writer->db;
    if (run_sql(job, "BEGIN IMMEDIATE") != SQLITE_OK)
        return NULL;
    for (Py_ssize_t s = 0; s < job->nstmts && !job->failed; s++) {
        stmt_t *t = &job->stmts[s];
        sqlite3_stmt *st = NULL;
        if (a->prepare_v2(db, t->sql, -1, &st, NULL) != SQLITE_OK || st == NULL) {
            job->failed = 1;
            job->code = a->extended_errcode(db);
            job->failed_stmt = s;
            snprintf(job->message, sizeof job->message, "%s", a->errmsg(db));
            if (st)
                a->finalize(st);
            break;
        }
        if (t->nrows > 0 && a->bind_parameter_count(st) != t->ncols) {
            job->failed = 1;
            job->code = 25; /* SQLITE_RANGE */
            job->failed_stmt = s;
            snprintf(job->message, sizeof job->message, "statement takes %d parameters, rows have %d",
                     a->bind_parameter_count(st), t->ncols);
            a->finalize(st);
            break;
        }
        for (Py_ssize_t r = 0; r < t->nrows; r++) {
            int rc = bind_row(a, st, t->values + (size_t)r * t->ncols, t->ncols);
            if (rc == SQLITE_OK)
                rc = a->step(st);
            if (rc != SQLITE_DONE && rc != SQLITE_OK && rc != 100 /* a RETURNING row */) {
                job->failed = 1;
                job->code = a->extended_errcode(db);
                job->failed_stmt = s;
                snprintf(job->message, sizeof job->message, "%s", a->errmsg(db));
                break;
            }
            a->reset(st);
            job->rows++;
        }
        a->finalize(st);
    }
    if (!job->failed)
        run_sql(job, "COMMIT");
    if (job->failed && !a->get_autocommit(db)) {
        int keep = job->code;
        char msg[512];
        memcpy(msg, job->message, sizeof msg);
        a->exec(db, "ROLLBACK", NULL, NULL, NULL);
        job->code = keep;
        memcpy(job->message, msg, sizeof msg);
    }
    return NULL;
}

/* ------------------------------------------------------------------ flattening (under the GIL) */
static int flatten_value(PyObject *o, value_t *v) {
    if (o == Py_None) {
        v->kind = V_NULL;
    } else if (PyLong_Check(o)) {
        int overflow = 0;
        v->u.i = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError, "integer does not fit SQLite's 64 bits");
            return -1;
        }
        if (v->u.i == -1 && PyErr_Occurred())
            return -1;
        v->kind = V_INT;
    } else if (PyFloat_Check(o)) {
        v->kind = V_REAL;
        v->u.d = PyFloat_AS_DOUBLE(o);
    } else if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(o, &n);  /* cached in the str: lives as long as it */
        if (p == NULL)
            return -1;
        if (n > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "string too long for SQLite");
            return -1;
        }
        v->kind = V_TEXT;
        v->u.p = p;
        v->len = (int)n;
    } else if (PyBytes_Check(o)) {
        if (PyBytes_GET_SIZE(o) > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "bytes too long for SQLite");
            return -1;
        }
        v->kind = V_BLOB;
        v->u.p = PyBytes_AS_STRING(o);
        v->len = (int)PyBytes_GET_SIZE(o);
    } else {
        PyErr_Format(PyExc_TypeError, "cannot write a %.100s to the ledger (None, int, float, str or bytes)",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static void job_free_stmts(JobObject *job) {
    if (job->stmts) {
        for (Py_ssize_t s = 0; s < job->nstmts; s++)
            PyMem_Free(job->stmts[s].values);
        PyMem_Free(job->stmts);
        job->stmts = NULL;
    }
    job->nstmts = 0;
}

/* Writer.start(statements) -> Job: statements is a list of (sql, rows) with rows a list of tuples of
   equal length. The thread starts at once. */
static PyObject *Writer_start(WriterObject *self, PyObject *arg) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a write is still running on this ledger connection: wait() for it first");
        return NULL;
    }
    PyObject *stmts = PySequence_Fast(arg, "statements must be a sequence of (sql, rows)");
    if (stmts == NULL)
        return NULL;
    JobObject *job = PyObject_New(JobObject, &JobType);
    if (job == NULL) {
        Py_DECREF(stmts);
        return NULL;
    }
    Py_INCREF(self);
    job->writer = self;
    job->keep = PyList_New(0);
    job->nstmts = PySequence_Fast_GET_SIZE(stmts);
    job->stmts = PyMem_Calloc(job->nstmts ? job->nstmts : 1, sizeof(stmt_t));
    job->started = job->joined = job->failed = 0;
    job->code = 0;
    job->failed_stmt = -1;
    job->rows = 0;
    job->message[0] = 0;
    if (job->keep == NULL || job->stmts == NULL) {
        Py_DECREF(stmts);
        Py_DECREF(job);
        return PyErr_NoMemory();
    }
    if (PyList_Append(job->keep, stmts) < 0)
        goto fail;
    for (Py_ssize_t s = 0; s < job->nstmts; s++) {
        PyObject *item = PySequence_Fast_GET_ITEM(stmts, s);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "each statement must be a (sql: str, rows) tuple");
            goto fail;
        }
        stmt_t *t = &job->stmts[s];
        t->sql = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
        if (t->sql == NULL)
            goto fail;
        PyObject *rows = PySequence_Fast(PyTuple_GET_ITEM(item, 1), "rows must be a sequence of tuples");
        if (rows == NULL)
            goto fail;
        int appended = PyList_Append(job->keep, rows);
        Py_DECREF(rows);  /* job->keep holds it */
        if (appended < 0)
            goto fail;
        t->nrows = PySequence_Fast_GET_SIZE(rows);
        if (t->nrows == 0)
            continue;
        PyObject *first = PySequence_Fast_GET_ITEM(rows, 0);
        if (!PyTuple_Check(first)) {
            PyErr_SetString(PyExc_TypeError, "rows must be tuples");
            goto fail;
        }
        t->ncols = (int)PyTuple_GET_SIZE(first);
        t->values = PyMem_Malloc(sizeof(value_t) * (size_t)t->nrows * (t->ncols ? t->ncols : 1));
        if (t->values == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t r = 0; r < t->nrows; r++) {
            PyObject *row = PySequence_Fast_GET_ITEM(rows, r);
            if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != t->ncols) {
                PyErr_Format(PyExc_TypeError, "row %zd of statement %zd is not a tuple of %d values", r, s, t->ncols);
                goto fail;
            }
            value_t *v = t->values + (size_t)r * t->ncols;
            for (int c = 0; c < t->ncols; c++)
                if (flatten_value(PyTuple_GET_ITEM(row, c), v + c) < 0)
                    goto fail;
        }
    }
    Py_DECREF(stmts);
    stmts = NULL;
    if (pthread_create(&job->thread, NULL, job_thread, job) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the ledger writer thread");
        Py_DECREF(job);
        return NULL;
    }
    job->started = 1;
    self->busy = 1;
    return (PyObject *)job;
fail:
    Py_XDECREF(stmts);
    Py_DECREF(job);
    return NULL;
}

static void job_join(JobObject *job) {
    if (job->started && !job->joined) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(job->thread, NULL);
        Py_END_ALLOW_THREADS
        job->joined = 1;
        job->writer->busy = 0;
        job_free_stmts(job);
        Py_CLEAR(job->keep);
    }
}

/* Job.wait() -> rows written; raises WriteError(code, message, statement index) when it failed (the
   transaction is rolled back by then). */
static PyObject *Job_wait(JobObject *job, PyObject *unused) {
    (void)unused;
    job_join(job);
    if (job->failed) {
        PyObject *args = Py_BuildValue("(isn)", job->code, job->message, job->failed_stmt);
        if (args) {
            PyErr_SetObject(WriteError, args);
            Py_DECREF(args);
        }
        return NULL;
    }
    return PyLong_FromLongLong(job->rows);
}

static PyObject *Job_done(JobObject *job, void *closure) {
    (void)closure;
    return PyBool_FromLong(job->joined);
}

static void Job_dealloc(JobObject *job) {
    job_join(job);  /* never free what the thread may still read */
    job_free_stmts(job);
    Py_XDECREF(job->keep);
    Py_XDECREF(job->writer);
    PyObject_Free(job);
}

static PyMethodDef Job_methods[] = {
    {"wait", (PyCFunction)Job_wait, METH_NOARGS, "Join the writer thread; rows written, or WriteError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Job_getset[] = {
    {"joined", (getter)Job_done, NULL, "whether wait() has joined the thread", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject JobType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_rowwrite.Job",
    .tp_basicsize = sizeof(JobObject),
    .tp_dealloc = (destructor)Job_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = Job_methods,
    .tp_getset = Job_getset,
};

/* ------------------------------------------------------------------ Writer */
static void Writer_dealloc(WriterObject *self) {
    PyObject_Free(self);
}

static PyMethodDef Writer_methods[] = {
    {"start", (PyCFunction)Writer_start, METH_O,
     "start(statements) -> Job: BEGIN IMMEDIATE, each (sql, rows), COMMIT, on a thread of its own"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_rowwrite.Writer",
    .tp_basicsize = sizeof(WriterObject),
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = Writer_methods,
};

/* take_loaded(library_path, filename) -> Writer: the connection this file was last loaded into as a
   SQLite extension, with the SQLite functions of the library at library_path (already loaded in this
   process). Its main database must be ``filename``, else ValueError. */
static PyObject *take_loaded(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *library, *filename;
    if (!PyArg_ParseTuple(args, "ss", &library, &filename))
        return NULL;
    sqlite3 *db = loaded_db;
    loaded_db = NULL;
    if (db == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no connection has loaded the ledger writer");
        return NULL;
    }
    void *lib = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_RuntimeError, "SQLite library %s is not loaded: %s", library, dlerror());
        return NULL;
    }
    WriterObject *w = PyObject_New(WriterObject, &WriterType);
    if (w == NULL) {
        dlclose(lib);
        return NULL;
    }
    w->db = db;
    w->busy = 0;
    void **slots = (void **)&w->api;
    for (size_t i = 0; i < sizeof API_NAMES / sizeof API_NAMES[0]; i++) {
        slots[i] = dlsym(lib, API_NAMES[i]);
        if (slots[i] == NULL) {
            PyErr_Format(PyExc_RuntimeError, "%s has no %s", library, API_NAMES[i]);
            dlclose(lib);
            Py_DECREF(w);
            return NULL;
        }
    }
    dlclose(lib);  /* RTLD_NOLOAD took a reference; the Python module keeps the library loaded */
    const char *name = w->api.db_filename(db, "main");
    if (name == NULL || strcmp(name, filename) != 0) {
        PyErr_Format(PyExc_ValueError, "the loaded connection's database is %s, not %s", name ? name : "(none)",
                     filename);
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

static PyMethodDef module_methods[] = {
    {"take_loaded", take_loaded, METH_VARARGS, "take_loaded(library_path, filename) -> Writer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_rowwrite", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__rowwrite(void) {
    if (PyType_Ready(&JobType) < 0 || PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    WriteError = PyErr_NewException("_rowwrite.WriteError", NULL, NULL);
    if (WriteError == NULL || PyModule_AddObjectRef(m, "WriteError", WriteError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
