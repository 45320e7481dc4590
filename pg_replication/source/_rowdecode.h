/* What the two C files of the _rowdecode extension share: the row decoder (_rowdecode.c) and the
 * COPY-both reader that feeds it (_copyboth.c). */
#ifndef PG_REPLICATION_ROWDECODE_H
#define PG_REPLICATION_ROWDECODE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NEEDS_PYTHON (-1) /* the message goes the careful way (source/pgoutput.py) */
#define ADD_FAILED (-2)   /* a Python error is set */

extern PyTypeObject RowColumnsType;

/* One Insert/Update/Delete message appended to a RowColumns: 1, 2, 3, NEEDS_PYTHON or ADD_FAILED. */
int rowcolumns_add(PyObject *rows, const unsigned char *buf, Py_ssize_t size);

PyObject *bind_libpq(PyObject *module, PyObject *addresses);
int copyboth_init(PyObject *module);

#endif
