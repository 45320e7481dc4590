/* The COPY-both stream of a replication session, read many messages per call.
 *
 * psycopg2 hands Python one ReplicationMessage object per message, and the drain then dispatched
 * each in Python: about 1–1.5 µs a message, more than the decode. CopyReader takes the messages
 * from libpq itself (PQgetCopyData on psycopg2's own connection), answers for the keepalives,
 * and appends each Insert/Update/Delete of a relation routed to a RowColumns straight into it;
 * only what Python must see comes back (Begin/Commit, Relation, Type, Truncate, stream and
 * logical messages, a row change the compiled decoder does not take).
 *
 * libpq is not linked: its functions are resolved at run time from the library psycopg2 has
 * loaded (stream.py, through psycopg2's extension module) and handed to bind_libpq. The PGconn
 * belongs to that library instance; psycopg2-binary bundles its own copy, and psycopg 3 may load
 * another: a function from any other copy would read the connection with the wrong internals.
 * Only these functions and two of libpq's stable ABI values are used, so no libpq headers are
 * needed at build time either.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_rowdecode.h"
#include <structmember.h>

typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;
#define PGRES_FATAL_ERROR 7 /* ExecStatusType */
#define PG_DIAG_SQLSTATE 'C'

/* In the order bind_libpq takes them. */
static struct {
    int (*get_copy_data)(PGconn *, char **, int);
    int (*consume_input)(PGconn *);
    void (*freemem)(void *);
    PGresult *(*get_result)(PGconn *);
    int (*result_status)(const PGresult *);
    char *(*result_error_message)(const PGresult *);
    char *(*result_error_field)(const PGresult *, int);
    void (*clear)(PGresult *);
    char *(*error_message)(const PGconn *);
    int (*socket)(const PGconn *);
} pq;

#define LIBPQ_FUNCTIONS 10

PyObject *bind_libpq(PyObject *module, PyObject *addresses) {
    if (!PyTuple_Check(addresses) || PyTuple_GET_SIZE(addresses) != LIBPQ_FUNCTIONS) {
        PyErr_SetString(PyExc_TypeError, "bind_libpq takes a tuple of 10 function addresses");
        return NULL;
    }
    void *found[LIBPQ_FUNCTIONS];
    for (Py_ssize_t i = 0; i < LIBPQ_FUNCTIONS; i++) {
        found[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(addresses, i));
        if (found[i] == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bind_libpq: a NULL function address");
            return NULL;
        }
    }
    memcpy(&pq, found, sizeof(pq));
    Py_RETURN_NONE;
}

/* What next() returns besides a message (bytes) or None (nothing waiting). */
enum { REPLY_REQUESTED = 1, STREAM_ENDED = 2, MORE = 3 };
#define MESSAGES_PER_CALL 16384 /* then back to Python: signals, other threads */

typedef struct {
    PyObject_HEAD
    PGconn *conn;
    PyObject *routes;  /* dict: relation oid -> RowColumns taking its row changes */
    PyObject *touched; /* set: relation oids that took a change (the caller empties it) */
    int skipping;      /* row changes are dropped (a transaction applied before) */
    int in_block;      /* inside a Stream Start/Stop block: row changes carry an xid, never routed */
    unsigned long long wal_end; /* the server's position in the last XLogData or keepalive */
    Py_ssize_t changes, change_bytes; /* row changes routed (taken by a RowColumns) */
    Py_ssize_t bytes, messages;       /* every XLogData payload */
} CopyReader;

static uint64_t read_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static PyObject *error_result(const char *sqlstate, const char *message) {
    return Py_BuildValue("(zs)", sqlstate, message ? message : "unknown libpq error");
}

/* The end of the COPY: the server's error (sqlstate, message), or STREAM_ENDED. */
static PyObject *copy_ended(CopyReader *self) {
    PGresult *res = pq.get_result(self->conn);
    PyObject *out = NULL;
    if (res != NULL && pq.result_status(res) == PGRES_FATAL_ERROR)
        out = error_result(pq.result_error_field(res, PG_DIAG_SQLSTATE), pq.result_error_message(res));
    if (res != NULL) pq.clear(res);
    return out ? out : PyLong_FromLong(STREAM_ENDED);
}

/* Offer a row change to the RowColumns routed for its relation: 1 taken, 0 not, -1 error. */
static int route(CopyReader *self, const unsigned char *p, Py_ssize_t size) {
    uint32_t oid = ((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 8) | p[4];
    PyObject *key = PyLong_FromUnsignedLong(oid);
    if (key == NULL) return -1;
    PyObject *rows = PyDict_GetItemWithError(self->routes, key);
    int taken = 0;
    if (rows != NULL && Py_IS_TYPE(rows, &RowColumnsType)) {
        int code = rowcolumns_add(rows, p, size);
        if (code == ADD_FAILED || (code > 0 && PySet_Add(self->touched, key) < 0)) taken = -1;
        else taken = code > 0;
    } else if (PyErr_Occurred()) {
        taken = -1;
    }
    Py_DECREF(key);
    return taken;
}

/* Before waiting on an empty socket, pause this long: the walsender sends (and flushes) each
 * message on its own, and a reader already waiting is woken for each one; paused, it finds a
 * buffer's worth at once. Measured (bench/cdc.py): 8-10% less client CPU per change, for at most
 * this much more latency. */
#define COALESCE_NS 500000L

/* Wait up to ``ms`` for the socket to be readable, without the GIL: 1 readable, 0 not, -1 error. */
static int wait_readable(CopyReader *self, int ms) {
    struct pollfd fd = {.fd = pq.socket(self->conn), .events = POLLIN};
    if (fd.fd < 0) return -1;
    int ready;
    struct timespec pause = {0, COALESCE_NS};
    Py_BEGIN_ALLOW_THREADS
    ready = nanosleep(&pause, NULL) == 0 ? poll(&fd, 1, ms) : -1; /* a signal in the pause: EINTR, below */
    Py_END_ALLOW_THREADS
    if (ready < 0 && errno == EINTR) return 0; /* a signal: back to Python, which handles it */
    return ready < 0 ? -1 : ready > 0;
}

/* next(wait_ms=0) -> the next message Python must see (bytes: a pgoutput message), None when
 * nothing came for ``wait_ms`` (waited here, without the GIL: no trip through Python per
 * wake-up), REPLY_REQUESTED (the server asks for standby feedback now), STREAM_ENDED, MORE (call
 * again), or (sqlstate or None, message) when the stream broke. */
static PyObject *CopyReader_next(CopyReader *self, PyObject *args) {
    int wait_ms = 0;
    if (!PyArg_ParseTuple(args, "|i", &wait_ms)) return NULL;
    if (pq.get_copy_data == NULL) { PyErr_SetString(PyExc_RuntimeError, "CopyReader: bind_libpq was not called"); return NULL; }
    int tried_socket = 0, waited = 0;
    for (int n = 0; n < MESSAGES_PER_CALL; n++) {
        char *buf = NULL;
        int len = pq.get_copy_data(self->conn, &buf, 1 /* async: never wait */);
        if (len == 0) {
            if (tried_socket) {
                if (waited || wait_ms <= 0) Py_RETURN_NONE;
                int ready = wait_readable(self, wait_ms);
                if (ready < 0) return error_result(NULL, strerror(errno));
                if (ready == 0) Py_RETURN_NONE;
                waited = 1; /* once per call: the caller's checks run at least every wait_ms */
            }
            /* Read the socket only once the buffer is empty: libpq's buffer stays one read long. */
            if (!pq.consume_input(self->conn)) return error_result(NULL, pq.error_message(self->conn));
            tried_socket = 1;
            continue;
        }
        if (len == -1) return copy_ended(self);
        if (len < 0) return error_result(NULL, pq.error_message(self->conn));
        tried_socket = waited = 0;
        const unsigned char *m = (const unsigned char *)buf;
        if (m[0] == 'k' && len >= 18) { /* keepalive: walEnd(8), sendTime(8), replyRequested(1) */
            self->wal_end = read_u64(m + 1);
            int reply = m[17];
            pq.freemem(buf);
            if (reply) return PyLong_FromLong(REPLY_REQUESTED);
            continue;
        }
        if (m[0] != 'w' || len < 25) {
            PyObject *out = error_result(NULL, "unrecognized replication message");
            pq.freemem(buf);
            return out;
        }
        /* XLogData: dataStart(8), walEnd(8), sendTime(8), then the pgoutput message */
        self->wal_end = read_u64(m + 9);
        const unsigned char *p = m + 25;
        Py_ssize_t size = len - 25;
        self->bytes += size;
        self->messages++;
        if (!self->in_block && size > 5 && (p[0] == 'I' || p[0] == 'U' || p[0] == 'D')) {
            if (self->skipping) { pq.freemem(buf); continue; }
            int taken = route(self, p, size);
            if (taken != 0) {
                pq.freemem(buf);
                if (taken < 0) return NULL;
                self->changes++;
                self->change_bytes += size;
                continue;
            }
        }
        PyObject *out = PyBytes_FromStringAndSize((const char *)p, size);
        pq.freemem(buf);
        return out;
    }
    return PyLong_FromLong(MORE);
}

/* route(routes, touched): where row changes go from now on (see the CopyReader struct). */
static PyObject *CopyReader_route(CopyReader *self, PyObject *args) {
    PyObject *routes, *touched;
    if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &routes, &PySet_Type, &touched)) return NULL;
    Py_INCREF(routes);
    Py_XSETREF(self->routes, routes);
    Py_INCREF(touched);
    Py_XSETREF(self->touched, touched);
    Py_RETURN_NONE;
}

/* CopyReader(pgconn_ptr): psycopg2's ``connection.pgconn_ptr`` of a session in COPY-both mode
 * (START_REPLICATION done); the connection must outlive the reader. Nothing is routed at first. */
static int CopyReader_init(CopyReader *self, PyObject *args, PyObject *kwds) {
    PyObject *ptr;
    if (!PyArg_ParseTuple(args, "O", &ptr)) return -1;
    void *conn = PyLong_AsVoidPtr(ptr);
    if (conn == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "CopyReader: a NULL connection");
        return -1;
    }
    self->conn = conn;
    PyObject *empty = PyTuple_New(0), *routes = PyDict_New(), *touched = PySet_New(NULL);
    PyObject *args2 = (empty && routes && touched) ? PyTuple_Pack(2, routes, touched) : NULL;
    PyObject *done = args2 ? CopyReader_route(self, args2) : NULL;
    Py_XDECREF(empty);
    Py_XDECREF(routes);
    Py_XDECREF(touched);
    Py_XDECREF(args2);
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 0;
}

static void CopyReader_dealloc(CopyReader *self) {
    Py_XDECREF(self->routes);
    Py_XDECREF(self->touched);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef CopyReader_methods[] = {
    {"next", (PyCFunction)CopyReader_next, METH_VARARGS, "The next message Python must see (see the module comment)."},
    {"route", (PyCFunction)CopyReader_route, METH_VARARGS, "route(routes, touched): where row changes go from now on."},
    {NULL},
};

static PyMemberDef CopyReader_members[] = {
    {"skipping", T_INT, offsetof(CopyReader, skipping), 0, "nonzero: row changes are dropped"},
    {"in_block", T_INT, offsetof(CopyReader, in_block), 0, "nonzero: inside a streamed transaction's block"},
    {"wal_end", T_ULONGLONG, offsetof(CopyReader, wal_end), READONLY, "the server's position last reported"},
    {"changes", T_PYSSIZET, offsetof(CopyReader, changes), READONLY, "row changes taken by a routed RowColumns"},
    {"change_bytes", T_PYSSIZET, offsetof(CopyReader, change_bytes), READONLY, "their pgoutput bytes"},
    {"bytes", T_PYSSIZET, offsetof(CopyReader, bytes), READONLY, "pgoutput bytes read"},
    {"messages", T_PYSSIZET, offsetof(CopyReader, messages), READONLY, "pgoutput messages read"},
    {NULL},
};

static PyTypeObject CopyReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pg_replication.source._rowdecode.CopyReader",
    .tp_basicsize = sizeof(CopyReader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A replication session's COPY-both stream, read in C; row changes routed to RowColumns.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CopyReader_init,
    .tp_dealloc = (destructor)CopyReader_dealloc,
    .tp_methods = CopyReader_methods,
    .tp_members = CopyReader_members,
};

int copyboth_init(PyObject *module) {
    if (PyType_Ready(&CopyReaderType) < 0) return -1;
    Py_INCREF(&CopyReaderType);
    if (PyModule_AddObject(module, "CopyReader", (PyObject *)&CopyReaderType) < 0) {
        Py_DECREF(&CopyReaderType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "REPLY_REQUESTED", REPLY_REQUESTED) < 0 ||
        PyModule_AddIntConstant(module, "STREAM_ENDED", STREAM_ENDED) < 0 || PyModule_AddIntConstant(module, "MORE", MORE) < 0)
        return -1;
    return 0;
}
