/* The harness's step recorder in C (loaded by producers/fastrecord.py).
 *
 * For an env whose events are sealed as they happen, a step is recorded in two calls:
 *   observe(ep, step, state, collapsed, flags, live, observations, infos) -> [state hash, obs hashes...]
 *   act(ep, step, live, actions, chosen, rewards, terms, truncs, cut, sources, ep_return) -> ep_return
 * They build the env.state, agent.observation and joint.action payloads and call the chain's sealers
 * (eventlog's C sealer, or any callable) as producers/harness.py's Python functions `observe` and
 * `joint_action` (+ sealing) do, in the same order, with the same conversions (float(), int(), the
 * truth value of `truncated or cut`). Those functions stay the reference: a call whose arguments are
 * not of the plain kinds checked here (exact dicts and lists, or defaultdicts where only .get() reads
 * them; str agent ids; discrete action spaces; (action, log_prob) tuples; no action masks) is handed to
 * them unchanged before anything is sealed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_ndarray.h"

static PyTypeObject *NDARRAY = NULL;
static PyObject *F32 = NULL;  /* numpy.dtype(float32) */
static int MIRROR_OK = 0;
static PyObject *S_EPISODE, *S_STEP, *S_STATE, *S_COLLAPSED, *S_FLAGS, *S_AGENT_ID, *S_OBSERVATION,
    *S_ACTION_MASK, *S_DISCRETE, *S_LOG_PROB, *S_REWARD, *S_TERMINATED, *S_TRUNCATED, *S_ACTIONS, *S_JOINT,
    *S_EVENT_HASH;
static PyObject *ZERO = NULL, *EMPTY_TUPLE = NULL;
static PyTypeObject *DEFAULTDICT = NULL;  /* collections.defaultdict (MPE's rewards): .get() is dict's */

/* a mapping read only through .get(): a dict, or a defaultdict (whose .get does not call the factory) */
static inline int get_mapping(PyObject *o) { return PyDict_CheckExact(o) || Py_TYPE(o) == DEFAULTDICT; }

typedef struct {
    PyObject_HEAD
    PyObject *append_state, *append_obs, *append_action;  /* sealers; append_obs: dict agent -> sealer */
    PyObject *discrete;                                    /* dict agent -> bool */
    PyObject *observe_py, *joint_action_py, *float_view;   /* the Python reference and its float_view */
    PyTypeObject *event_class;
} RecorderObject;

/* `x` is what float_view(x) returns unchanged: exactly an ndarray, 1-D, of dtype float32. */
static inline int is_f32_vector(PyObject *x) {
    return MIRROR_OK && Py_TYPE(x) == NDARRAY && ((ArrayMirror *)x)->nd == 1 && ((ArrayMirror *)x)->descr == F32;
}

static PyObject *event_hash(RecorderObject *self, PyObject *event) {
    if (Py_TYPE(event) == self->event_class && PyTuple_GET_SIZE(event) > 3) {
        PyObject *h = PyTuple_GET_ITEM(event, 3);
        Py_INCREF(h);
        return h;
    }
    return PyObject_GetAttr(event, S_EVENT_HASH);
}

/* sealer(payload, sources) -> the event's hash (new reference) */
static PyObject *seal(RecorderObject *self, PyObject *sealer, PyObject *payload, PyObject *sources) {
    PyObject *args[2] = {payload, sources};
    PyObject *event = PyObject_Vectorcall(sealer, args, 2, NULL);
    if (event == NULL) return NULL;
    PyObject *h = event_hash(self, event);
    Py_DECREF(event);
    return h;
}

static int exact_str_list(PyObject *live) {
    if (!PyList_CheckExact(live)) return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(live); i++)
        if (!PyUnicode_CheckExact(PyList_GET_ITEM(live, i))) return 0;
    return 1;
}

/* observe(ep, step, state, collapsed, flags, live, observations, infos): state and collapsed are
 * float_view'ed already; flags a list or None. */
static PyObject *Recorder_observe(RecorderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "observe() takes 8 arguments");
        return NULL;
    }
    PyObject *ep = args[0], *step = args[1], *state = args[2], *collapsed = args[3], *flags = args[4];
    PyObject *live = args[5], *observations = args[6], *infos = args[7];
    /* the plain case only: anything else goes to the reference before anything is sealed */
    int plain = exact_str_list(live) && PyDict_CheckExact(observations) && get_mapping(infos)
                && PyDict_CheckExact(self->append_obs);
    for (Py_ssize_t i = 0; plain && i < PyList_GET_SIZE(live); i++) {
        PyObject *a = PyList_GET_ITEM(live, i);
        if (PyDict_GetItemWithError(observations, a) == NULL || PyDict_GetItemWithError(self->append_obs, a) == NULL) {
            if (PyErr_Occurred()) return NULL;
            plain = 0;
            break;
        }
        if (PyDict_GET_SIZE(infos)) {
            PyObject *info = PyDict_GetItemWithError(infos, a);
            if (info == NULL && PyErr_Occurred()) return NULL;
            if (info != NULL) {
                if (!get_mapping(info)) { plain = 0; break; }
                PyObject *mask = PyDict_GetItemWithError(info, S_ACTION_MASK);
                if (mask == NULL && PyErr_Occurred()) return NULL;
                if (mask != NULL && mask != Py_None) plain = 0;  /* masks are converted by the reference */
            }
        }
    }
    if (!plain) return PyObject_Vectorcall(self->observe_py, args, 8, NULL);

    PyObject *payload = PyDict_New();
    if (payload == NULL) return NULL;
    if (PyDict_SetItem(payload, S_EPISODE, ep) < 0 || PyDict_SetItem(payload, S_STEP, step) < 0
        || PyDict_SetItem(payload, S_STATE, state) < 0 || PyDict_SetItem(payload, S_COLLAPSED, collapsed) < 0
        || (flags != Py_None && PyDict_SetItem(payload, S_FLAGS, flags) < 0)) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *st_hash = seal(self, self->append_state, payload, EMPTY_TUPLE);
    Py_DECREF(payload);
    if (st_hash == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(live);
    PyObject *sources = PyList_New(n + 1), *st_sources = PyTuple_Pack(1, st_hash);
    if (sources == NULL || st_sources == NULL) {
        Py_XDECREF(sources); Py_XDECREF(st_sources); Py_DECREF(st_hash);
        return NULL;
    }
    PyList_SET_ITEM(sources, 0, st_hash);  /* steals */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyList_GET_ITEM(live, i);
        /* looked up again: a sealer or float_view may have run Python code in between */
        PyObject *obs = PyDict_GetItemWithError(observations, a);
        PyObject *sealer = obs == NULL ? NULL : PyDict_GetItemWithError(self->append_obs, a);
        if (sealer == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, a);
            goto fail;
        }
        Py_INCREF(sealer);
        PyObject *vec = is_f32_vector(obs) ? (Py_INCREF(obs), obs) : PyObject_CallOneArg(self->float_view, obs);
        payload = vec == NULL ? NULL : PyDict_New();
        int bad = payload == NULL || PyDict_SetItem(payload, S_EPISODE, ep) < 0
                  || PyDict_SetItem(payload, S_STEP, step) < 0 || PyDict_SetItem(payload, S_AGENT_ID, a) < 0
                  || PyDict_SetItem(payload, S_OBSERVATION, vec) < 0;
        Py_XDECREF(vec);
        PyObject *h = bad ? NULL : seal(self, sealer, payload, st_sources);
        Py_XDECREF(payload);
        Py_DECREF(sealer);
        if (h == NULL) goto fail;
        PyList_SET_ITEM(sources, i + 1, h);
    }
    Py_DECREF(st_sources);
    return sources;
fail:
    Py_DECREF(st_sources);
    Py_DECREF(sources);  /* unset items are NULL: list_dealloc skips them */
    return NULL;
}

/* act(ep, step, live, actions, chosen, rewards, terms, truncs, cut, sources, ep_return) -> ep_return:
 * the joint.action payload (as joint_action builds it), sealed naming `sources`. */
static PyObject *Recorder_act(RecorderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "act() takes 11 arguments");
        return NULL;
    }
    PyObject *ep = args[0], *step = args[1], *live = args[2], *actions = args[3], *chosen = args[4];
    PyObject *rewards = args[5], *terms = args[6], *truncs = args[7], *cut = args[8], *sources = args[9];
    PyObject *ep_return = args[10];
    int plain = exact_str_list(live) && PyDict_CheckExact(actions) && PyDict_CheckExact(chosen)
                && get_mapping(rewards) && get_mapping(terms) && get_mapping(truncs)
                && PyDict_CheckExact(self->discrete) && PyFloat_CheckExact(ep_return) && PyBool_Check(cut);
    for (Py_ssize_t i = 0; plain && i < PyList_GET_SIZE(live); i++) {
        PyObject *a = PyList_GET_ITEM(live, i);
        PyObject *d = PyDict_GetItemWithError(self->discrete, a);
        PyObject *c = d == NULL ? NULL : PyDict_GetItemWithError(chosen, a);
        PyObject *x = c == NULL ? NULL : PyDict_GetItemWithError(actions, a);
        if (PyErr_Occurred()) return NULL;
        if (x == NULL || d != Py_True || !PyTuple_CheckExact(c) || PyTuple_GET_SIZE(c) < 2) plain = 0;
    }
    if (!plain) {
        PyObject *jargs[10] = {ep, step, live, actions, chosen, rewards, terms, truncs, cut, ep_return};
        PyObject *res = PyObject_Vectorcall(self->joint_action_py, jargs, 10, NULL);  /* (payload, ep_return) */
        if (res == NULL) return NULL;
        if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 2) {
            Py_DECREF(res);
            PyErr_SetString(PyExc_TypeError, "joint_action() must return (payload, ep_return)");
            return NULL;
        }
        PyObject *h = seal(self, self->append_action, PyTuple_GET_ITEM(res, 0), sources);
        if (h == NULL) { Py_DECREF(res); return NULL; }
        Py_DECREF(h);
        PyObject *r = PyTuple_GET_ITEM(res, 1);
        Py_INCREF(r);
        Py_DECREF(res);
        return r;
    }
    double total = PyFloat_AS_DOUBLE(ep_return);
    Py_ssize_t n = PyList_GET_SIZE(live);
    PyObject *records = PyList_New(0), *joint = PyList_New(0);
    if (records == NULL || joint == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyList_GET_ITEM(live, i);
        /* r = float(rewards.get(a, 0.0)); ep_return += r */
        PyObject *rv = PyDict_GetItemWithError(rewards, a);
        if (rv == NULL && PyErr_Occurred()) goto fail;
        PyObject *r = PyNumber_Float(rv != NULL ? rv : ZERO);
        if (r == NULL) goto fail;
        total += PyFloat_AS_DOUBLE(r);
        /* d = int(actions[a]); the record's values in the order the dict literal evaluates them */
        PyObject *x = PyDict_GetItemWithError(actions, a);
        PyObject *d = x != NULL ? PyNumber_Long(x) : NULL;
        if (d == NULL) {
            if (x == NULL && !PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, a);
            Py_DECREF(r);
            goto fail;
        }
        PyObject *c = PyDict_GetItemWithError(chosen, a);
        PyObject *lp = c != NULL && PyTuple_CheckExact(c) && PyTuple_GET_SIZE(c) > 1
                       ? PyNumber_Float(PyTuple_GET_ITEM(c, 1)) : NULL;
        PyObject *term = NULL, *trunc = NULL, *rec = NULL, *jd = NULL;
        int t = -1;
        if (lp == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "the policy's choices changed during act()");
        } else if ((term = PyDict_GetItemWithError(terms, a)) != NULL || !PyErr_Occurred()) {
            if (term == NULL) term = Py_False;
            trunc = PyDict_GetItemWithError(truncs, a);
            if (trunc != NULL || !PyErr_Occurred()) {
                if (trunc == NULL) trunc = Py_False;
                Py_INCREF(trunc);
                t = PyObject_IsTrue(trunc);
                if (t == 0) Py_SETREF(trunc, (Py_INCREF(cut), cut));
            }
        }
        if (t >= 0) {
            rec = PyDict_New();
            if (rec != NULL && (PyDict_SetItem(rec, S_AGENT_ID, a) < 0 || PyDict_SetItem(rec, S_DISCRETE, d) < 0
                                || PyDict_SetItem(rec, S_LOG_PROB, lp) < 0 || PyDict_SetItem(rec, S_REWARD, r) < 0
                                || PyDict_SetItem(rec, S_TERMINATED, term) < 0
                                || PyDict_SetItem(rec, S_TRUNCATED, trunc) < 0 || PyList_Append(records, rec) < 0))
                Py_CLEAR(rec);
            jd = rec == NULL ? NULL : PyNumber_Float(d);  /* joint.append(float(d)) */
            if (jd != NULL && PyList_Append(joint, jd) < 0) Py_CLEAR(jd);
        }
        Py_XDECREF(trunc);
        Py_XDECREF(lp);
        Py_DECREF(r);
        Py_DECREF(d);
        Py_XDECREF(rec);
        if (jd == NULL) goto fail;
        Py_DECREF(jd);
    }
    PyObject *payload = PyDict_New();
    if (payload == NULL || PyDict_SetItem(payload, S_EPISODE, ep) < 0 || PyDict_SetItem(payload, S_STEP, step) < 0
        || PyDict_SetItem(payload, S_ACTIONS, records) < 0 || PyDict_SetItem(payload, S_JOINT, joint) < 0) {
        Py_XDECREF(payload);
        goto fail;
    }
    Py_CLEAR(records);
    Py_CLEAR(joint);
    PyObject *h = seal(self, self->append_action, payload, sources);
    Py_DECREF(payload);
    if (h == NULL) return NULL;
    Py_DECREF(h);
    return PyFloat_FromDouble(total);
fail:
    Py_XDECREF(records);
    Py_XDECREF(joint);
    return NULL;
}

static int Recorder_init(RecorderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"append_state", "append_obs", "append_action", "discrete", "observe", "joint_action",
                             "float_view", "event_class", NULL};
    PyObject *o[7];
    PyTypeObject *event_class;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!OO!OOOO!:Recorder", kwlist, &o[0], &PyDict_Type, &o[1], &o[2],
                                     &PyDict_Type, &o[3], &o[4], &o[5], &o[6], &PyType_Type, &event_class))
        return -1;
    PyObject **slots[7] = {&self->append_state, &self->append_obs, &self->append_action, &self->discrete,
                           &self->observe_py, &self->joint_action_py, &self->float_view};
    for (int i = 0; i < 7; i++) { Py_INCREF(o[i]); Py_XSETREF(*slots[i], o[i]); }
    Py_INCREF(event_class);
    Py_XSETREF(self->event_class, event_class);
    return 0;
}

static int Recorder_traverse(RecorderObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->append_state); Py_VISIT(self->append_obs); Py_VISIT(self->append_action); Py_VISIT(self->discrete);
    Py_VISIT(self->observe_py); Py_VISIT(self->joint_action_py); Py_VISIT(self->float_view);
    Py_VISIT(self->event_class);
    return 0;
}

static int Recorder_clear(RecorderObject *self) {
    Py_CLEAR(self->append_state); Py_CLEAR(self->append_obs); Py_CLEAR(self->append_action); Py_CLEAR(self->discrete);
    Py_CLEAR(self->observe_py); Py_CLEAR(self->joint_action_py); Py_CLEAR(self->float_view);
    Py_CLEAR(self->event_class);
    return 0;
}

static void Recorder_dealloc(RecorderObject *self) {
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Recorder_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))Recorder_observe, METH_FASTCALL,
     "observe(ep, step, state, collapsed, flags, live, observations, infos) -> source hashes"},
    {"act", (PyCFunction)(void (*)(void))Recorder_act, METH_FASTCALL,
     "act(ep, step, live, actions, chosen, rewards, terms, truncs, cut, sources, ep_return) -> ep_return"},
    {NULL}};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_record.Recorder",
    .tp_basicsize = sizeof(RecorderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
};

/* set_ndarray(numpy.ndarray, numpy.dtype(float32), probes): probes are (array, ndim, dtype) triples as
 * Python reads them; the mirror is used only if it reads every one the same. Returns whether it is. */
static PyObject *set_ndarray(PyObject *self, PyObject *args) {
    PyObject *cls, *f32, *probes;
    if (!PyArg_ParseTuple(args, "O!OO!:set_ndarray", &PyType_Type, &cls, &f32, &PyList_Type, &probes)) return NULL;
    Py_INCREF(cls);
    Py_XSETREF(NDARRAY, (PyTypeObject *)cls);
    Py_INCREF(f32);
    Py_XSETREF(F32, f32);
    int ok = PyList_GET_SIZE(probes) > 0;
    for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(probes); i++) {
        PyObject *p = PyList_GET_ITEM(probes, i);
        if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 3 || Py_TYPE(PyTuple_GET_ITEM(p, 0)) != NDARRAY) {
            ok = 0;
            break;
        }
        ArrayMirror *a = (ArrayMirror *)PyTuple_GET_ITEM(p, 0);
        long nd = PyLong_AsLong(PyTuple_GET_ITEM(p, 1));
        if (nd == -1 && PyErr_Occurred()) return NULL;
        ok = a->nd == nd && a->descr == PyTuple_GET_ITEM(p, 2);
    }
    MIRROR_OK = ok;
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"set_ndarray", set_ndarray, METH_VARARGS, "set_ndarray(numpy.ndarray, float32 dtype, probes) -> bool"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_record", NULL, -1, methods};

PyMODINIT_FUNC PyInit__record(void) {
    if (PyType_Ready(&RecorderType) < 0) return NULL;
    struct { PyObject **slot; const char *s; } names[] = {
        {&S_EPISODE, "episode"}, {&S_STEP, "step"}, {&S_STATE, "state"}, {&S_COLLAPSED, "collapsed_state"},
        {&S_FLAGS, "flags"}, {&S_AGENT_ID, "agent_id"}, {&S_OBSERVATION, "observation"},
        {&S_ACTION_MASK, "action_mask"}, {&S_DISCRETE, "discrete"}, {&S_LOG_PROB, "log_prob"},
        {&S_REWARD, "reward"}, {&S_TERMINATED, "terminated"}, {&S_TRUNCATED, "truncated"},
        {&S_ACTIONS, "actions"}, {&S_JOINT, "joint_vector"}, {&S_EVENT_HASH, "event_hash"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].s)) == NULL) return NULL;
    if ((ZERO = PyFloat_FromDouble(0.0)) == NULL || (EMPTY_TUPLE = PyTuple_New(0)) == NULL) return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    PyObject *dd = collections == NULL ? NULL : PyObject_GetAttrString(collections, "defaultdict");
    Py_XDECREF(collections);
    if (dd == NULL || !PyType_Check(dd)) { Py_XDECREF(dd); return NULL; }
    DEFAULTDICT = (PyTypeObject *)dd;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RecorderType);
    if (PyModule_AddObject(m, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
