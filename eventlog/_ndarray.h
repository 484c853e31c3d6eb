/* The leading fields of numpy's PyArrayObject_fields and PyArray_Descr (the same in numpy 1.x and 2.x),
 * for marlgrc's C modules (eventlog/_seal.c, producers/_record.c) to test and read a float array in a
 * few loads. The buffer protocol has numpy build a format string for every new array, and
 * `x.dtype` builds nothing but is an attribute lookup. Each module checks the mirror on probe arrays
 * when it is configured and uses it only if it reads them right (else its slower path). */
#ifndef MARLGRC_NDARRAY_H
#define MARLGRC_NDARRAY_H
#include <Python.h>

typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
} ArrayMirror;

typedef struct {
    PyObject_HEAD
    PyTypeObject *typeobj;
    char kind, type, byteorder;
} DescrMirror;
#endif
