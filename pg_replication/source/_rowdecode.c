/* Row changes of one relation, decoded from pgoutput (protocol 1) straight into Arrow string columns.
 *
 * The per-change work of CDC (parse an Insert/Update/Delete's TupleData, keep the published
 * columns, find the key) runs here instead of in Python; the rows stay unfolded, in stream order,
 * and are folded per key in SQL (pg_replication/replicate/column_changes.py). Anything this does not handle
 * (an unchanged TOAST value, malformed input, a value that is not UTF-8) returns a negative code
 * without touching the columns, so the caller decodes that message the careful way
 * (source/pgoutput.py), which names the problem. The columns are handed to pyarrow as buffers
 * (pa.Array.from_buffers): no Python object per value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#include "_rowdecode.h"

typedef struct {
    const char *ptr;
    Py_ssize_t len; /* -1: NULL */
} Field;

/* One Arrow string column being built: int32 offsets, UTF-8 data, validity bitmap. */
typedef struct {
    int32_t *offsets; /* rows + 1 */
    char *data;
    uint8_t *valid;
    Py_ssize_t data_len, data_cap, rows_cap, nulls;
} Builder;

static int builder_reserve(Builder *b, Py_ssize_t rows, Py_ssize_t extra_bytes) {
    if (rows + 1 > b->rows_cap) {
        Py_ssize_t cap = b->rows_cap ? b->rows_cap : 1024;
        while (cap < rows + 1) cap *= 2;
        int32_t *offsets = PyMem_Realloc(b->offsets, sizeof(int32_t) * (size_t)cap);
        if (offsets == NULL) return -1;
        b->offsets = offsets;
        uint8_t *valid = PyMem_Realloc(b->valid, (size_t)(cap + 7) / 8);
        if (valid == NULL) return -1;
        b->valid = valid;
        if (b->rows_cap == 0) b->offsets[0] = 0;
        b->rows_cap = cap;
    }
    if (b->data_len + extra_bytes > b->data_cap) {
        Py_ssize_t cap = b->data_cap ? b->data_cap : 16384;
        while (cap < b->data_len + extra_bytes) cap *= 2;
        char *data = PyMem_Realloc(b->data, (size_t)cap);
        if (data == NULL) return -1;
        b->data = data;
        b->data_cap = cap;
    }
    return 0;
}

/* Append a value (NULL when len < 0) as row ``row``; space reserved by builder_reserve. */
static void builder_put(Builder *b, Py_ssize_t row, const char *ptr, Py_ssize_t len) {
    uint8_t bit = (uint8_t)(1u << (row & 7));
    if (len < 0) {
        b->valid[row >> 3] &= (uint8_t)~bit;
        b->nulls++;
        len = 0;
    } else {
        b->valid[row >> 3] |= bit;
        memcpy(b->data + b->data_len, ptr, (size_t)len);
        b->data_len += len;
    }
    b->offsets[row + 1] = (int32_t)b->data_len;
}

static void builder_free(Builder *b) {
    PyMem_Free(b->offsets);
    PyMem_Free(b->data);
    PyMem_Free(b->valid);
    memset(b, 0, sizeof(*b));
}

/* (validity or None, offsets, data, null count) of the first ``rows`` rows, as bytes. */
static PyObject *builder_buffers(Builder *b, Py_ssize_t rows) {
    if (builder_reserve(b, rows, 0) < 0) return PyErr_NoMemory();
    if (rows == 0) b->offsets[0] = 0;
    PyObject *valid;
    if (b->nulls) {
        valid = PyBytes_FromStringAndSize((const char *)b->valid, (rows + 7) / 8);
        if (valid == NULL) return NULL;
    } else {
        valid = Py_None;
        Py_INCREF(valid);
    }
    return Py_BuildValue("(Ny#y#n)", valid, (const char *)b->offsets, (Py_ssize_t)sizeof(int32_t) * (rows + 1),
                         b->data ? b->data : "", b->data_len, b->nulls);
}

/* Strict UTF-8, as Python's decoder checks it: no overlongs, surrogates or values past U+10FFFF. */
static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        int extra;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { extra = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { extra = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { extra = 3; cp = c & 0x07; }
        else return 0;
        if (i + extra >= n) return 0;
        for (int k = 1; k <= extra; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((extra == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += extra + 1;
    }
    return 1;
}

/* strings_to_arrow(values: list[str | None]) -> the buffers of an Arrow string array. */
static PyObject *strings_to_arrow(PyObject *module, PyObject *values) {
    if (!PyList_Check(values)) { PyErr_SetString(PyExc_TypeError, "strings_to_arrow takes a list"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(values);
    Builder b = {0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        const char *ptr = NULL;
        Py_ssize_t len = -1;
        if (v != Py_None) {
            ptr = PyUnicode_AsUTF8AndSize(v, &len);
            if (ptr == NULL) goto done;
        }
        if (builder_reserve(&b, i + 1, len > 0 ? len : 0) < 0 || b.data_len + (len > 0 ? len : 0) > INT32_MAX) { PyErr_NoMemory(); goto done; }
        builder_put(&b, i, ptr, len);
    }
    result = builder_buffers(&b, n);
done:
    builder_free(&b);
    return result;
}

/* Append ``n`` bytes to a builder's current value (space grows as needed). */
static int builder_add(Builder *b, const char *p, Py_ssize_t n) {
    if (b->data_len + n > b->data_cap) {
        Py_ssize_t cap = b->data_cap ? b->data_cap : 16384;
        while (cap < b->data_len + n) cap *= 2;
        char *data = PyMem_Realloc(b->data, (size_t)cap);
        if (data == NULL) { PyErr_NoMemory(); return -1; }
        b->data = data;
        b->data_cap = cap;
    }
    memcpy(b->data + b->data_len, p, (size_t)n);
    b->data_len += n;
    return 0;
}

/* The JSON of a one-dimensional array literal without quotes, backslashes or nested braces, as
 * text_values.array_to_json writes it (its _fast_json): 1 written, 0 not such a literal, -1 error. */
static int array_json(Builder *b, const char *t, Py_ssize_t n, char kind) {
    if (n < 2 || t[0] != '{' || memchr(t, '"', (size_t)n) || memchr(t, '\\', (size_t)n) || memchr(t + 1, '{', (size_t)n - 1)) return 0;
    const char *inner = t + 1;
    Py_ssize_t m = n - 2;
    if (m == 0) return builder_add(b, "[]", 2) < 0 ? -1 : 1;
    if (kind == 'f') {
        if (memchr(inner, 'N', (size_t)m) || memchr(inner, 'I', (size_t)m)) return 0;
        if (builder_add(b, "[", 1) < 0 || builder_add(b, inner, m) < 0 || builder_add(b, "]", 1) < 0) return -1;
        return 1;
    }
    if (kind != 's') { /* int and bool: the literal with NULL spelled null (and t, f spelled out) */
        if (builder_add(b, "[", 1) < 0) return -1;
        for (Py_ssize_t i = 0; i < m; i++) {
            const char *word = NULL;
            if (i + 4 <= m && memcmp(inner + i, "NULL", 4) == 0) { word = "null"; i += 3; }
            else if (kind == 'b' && inner[i] == 't') word = "true";
            else if (kind == 'b' && inner[i] == 'f') word = "false";
            if (word ? builder_add(b, word, (Py_ssize_t)strlen(word)) < 0 : builder_add(b, inner + i, 1) < 0) return -1;
        }
        return builder_add(b, "]", 1) < 0 ? -1 : 1;
    }
    for (Py_ssize_t i = 0; i < m; i++)
        if ((unsigned char)inner[i] < 0x20) return 0;
    /* to_json's spacing: "," between items, as text_values.array_to_json writes them too */
    if (builder_add(b, "[", 1) < 0) return -1;
    for (Py_ssize_t i = 0, start = 0; i <= m; i++) {
        if (i < m && inner[i] != ',') continue;
        const char *item = inner + start;
        Py_ssize_t len = i - start;
        if (start > 0 && builder_add(b, ",", 1) < 0) return -1;
        if (len == 4 && memcmp(item, "NULL", 4) == 0) { if (builder_add(b, "null", 4) < 0) return -1; }
        else if (builder_add(b, "\"", 1) < 0 || builder_add(b, item, len) < 0 || builder_add(b, "\"", 1) < 0) return -1;
        start = i + 1;
    }
    return builder_add(b, "]", 1) < 0 ? -1 : 1;
}

/* arrays_to_json(rows, validity, offsets, data, kind, fallback) -> the buffers of the JSON column:
 * kind 'int', 'float', 'bool' or 'text'; literals the fast form does not cover go to
 * ``fallback`` (text_values.array_to_json's converter), one str at a time. */
static PyObject *arrays_to_json(PyObject *module, PyObject *args) {
    PyObject *valid_obj, *fallback;
    Py_buffer offsets_buf, data_buf;
    const char *kind_name;
    Py_ssize_t rows;
    if (!PyArg_ParseTuple(args, "nOy*y*sO", &rows, &valid_obj, &offsets_buf, &data_buf, &kind_name, &fallback)) return NULL;
    char kind = strcmp(kind_name, "int") == 0 ? 'i' : strcmp(kind_name, "float") == 0 ? 'f'
              : strcmp(kind_name, "bool") == 0 ? 'b' : strcmp(kind_name, "text") == 0 ? 's' : 0;
    Py_buffer valid_buf = {0};
    int has_valid = valid_obj != Py_None;
    PyObject *result = NULL;
    Builder b = {0};
    if (has_valid && PyObject_GetBuffer(valid_obj, &valid_buf, PyBUF_SIMPLE) < 0) goto release;
    const int32_t *offsets = offsets_buf.buf;
    const char *data = data_buf.buf;
    if (rows < 0 || offsets_buf.len < 4 * (rows + 1)) { PyErr_SetString(PyExc_ValueError, "arrays_to_json: short offsets"); goto release; }
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (builder_reserve(&b, i + 1, 0) < 0) { PyErr_NoMemory(); goto release; }
        if (has_valid && !(((const uint8_t *)valid_buf.buf)[i >> 3] & (1u << (i & 7)))) {
            builder_put(&b, i, NULL, -1);
            continue;
        }
        const char *t = data + offsets[i];
        Py_ssize_t n = offsets[i + 1] - offsets[i];
        Py_ssize_t before = b.data_len;
        int done = kind ? array_json(&b, t, n, kind) : 0;
        if (done < 0) goto release;
        if (done == 0) {
            b.data_len = before;
            PyObject *text = PyUnicode_DecodeUTF8(t, n, "strict");
            if (text == NULL) goto release;
            PyObject *json = PyObject_CallOneArg(fallback, text);
            Py_DECREF(text);
            if (json == NULL) goto release;
            Py_ssize_t len;
            const char *p = PyUnicode_AsUTF8AndSize(json, &len);
            if (p == NULL || builder_add(&b, p, len) < 0) { Py_DECREF(json); goto release; }
            Py_DECREF(json);
        }
        if (b.data_len > INT32_MAX) { PyErr_SetString(PyExc_OverflowError, "arrays_to_json: column past 2 GiB"); goto release; }
        b.valid[i >> 3] |= (uint8_t)(1u << (i & 7));
        b.offsets[i + 1] = (int32_t)b.data_len;
    }
    result = builder_buffers(&b, rows);
release:
    builder_free(&b);
    if (has_valid && valid_buf.obj) PyBuffer_Release(&valid_buf);
    PyBuffer_Release(&offsets_buf);
    PyBuffer_Release(&data_buf);
    return result;
}

typedef struct {
    PyObject_HEAD
    Py_ssize_t width;       /* published columns kept */
    Py_ssize_t source_width; /* columns in the relation's tuples */
    Py_ssize_t *target;     /* per source column: kept position or -1 */
    Py_ssize_t key_width;
    Py_ssize_t *key_positions; /* kept positions of the key columns */
    Builder *columns;       /* width string columns */
    Builder *fills;         /* key_width columns: key of the warehouse row to fill from (U rows) */
    char *ops;
    Py_ssize_t rows, ops_capacity;
    Py_ssize_t inserted, updated, deleted; /* changes taken (a TRUNCATE keeps them counted) */
    Field *old_fields, *new_fields;
} RowColumns;

static int read_u32(const unsigned char *p) { return (int)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]); }

/* TupleData at *pos into fields[0..source_width). 0 ok, NEEDS_PYTHON otherwise. */
static int parse_tuple(RowColumns *self, const unsigned char *buf, Py_ssize_t size, Py_ssize_t *pos, Field *fields) {
    Py_ssize_t p = *pos;
    if (p + 2 > size) return NEEDS_PYTHON;
    int16_t n = (int16_t)((buf[p] << 8) | buf[p + 1]);
    p += 2;
    if (n != self->source_width) return NEEDS_PYTHON;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p >= size) return NEEDS_PYTHON;
        unsigned char kind = buf[p];
        if (kind == 't') {
            if (p + 5 > size) return NEEDS_PYTHON;
            int32_t len = read_u32(buf + p + 1);
            p += 5;
            if (len < 0 || p + len > size) return NEEDS_PYTHON;
            fields[i].ptr = (const char *)buf + p;
            fields[i].len = len;
            p += len;
        } else if (kind == 'n') {
            fields[i].ptr = NULL;
            fields[i].len = -1;
            p += 1;
        } else {
            return NEEDS_PYTHON; /* 'u' unchanged TOAST, 'b' binary, or garbage */
        }
    }
    *pos = p;
    return 0;
}

static int same_key(RowColumns *self, Field *a, Field *b) {
    for (Py_ssize_t k = 0; k < self->key_width; k++) {
        Py_ssize_t kept = self->key_positions[k];
        Py_ssize_t i = -1;
        for (Py_ssize_t s = 0; s < self->source_width; s++)
            if (self->target[s] == kept) { i = s; break; }
        if (a[i].len != b[i].len) return 0;
        if (a[i].len > 0 && memcmp(a[i].ptr, b[i].ptr, (size_t)a[i].len) != 0) return 0;
    }
    return 1;
}

static int is_key(RowColumns *self, Py_ssize_t kept) {
    for (Py_ssize_t k = 0; k < self->key_width; k++)
        if (self->key_positions[k] == kept) return 1;
    return 0;
}

static Field *key_field(RowColumns *self, Field *fields, Py_ssize_t k) {
    for (Py_ssize_t s = 0; s < self->source_width; s++)
        if (self->target[s] == self->key_positions[k]) return &fields[s];
    return NULL; /* not reached: the key is among the kept columns */
}

static int tuple_is_utf8(RowColumns *self, Field *fields, Py_ssize_t *bytes) {
    for (Py_ssize_t s = 0; s < self->source_width; s++) {
        if (self->target[s] < 0 || fields[s].len < 0) continue;
        if (!valid_utf8((const unsigned char *)fields[s].ptr, fields[s].len)) return 0;
        *bytes += fields[s].len;
    }
    return 1;
}

static int reserve_all(RowColumns *self, Py_ssize_t rows, Py_ssize_t bytes) {
    for (Py_ssize_t j = 0; j < self->width; j++)
        if (builder_reserve(&self->columns[j], rows, bytes) < 0) return -1;
    for (Py_ssize_t k = 0; k < self->key_width; k++)
        if (builder_reserve(&self->fills[k], rows, bytes) < 0) return -1;
    if (rows > self->ops_capacity) {
        Py_ssize_t cap = self->ops_capacity ? self->ops_capacity * 2 : 1024;
        while (cap < rows) cap *= 2;
        char *ops = PyMem_Realloc(self->ops, (size_t)cap);
        if (ops == NULL) return -1;
        self->ops = ops;
        self->ops_capacity = cap;
    }
    return 0;
}

/* A row whose values are ``fields`` (only the key when key_only) and whose fill key is ``fill``
 * (NULL: none). Space is reserved. */
static void put_row(RowColumns *self, char op, Field *fields, int key_only, Field *fill) {
    Py_ssize_t row = self->rows;
    for (Py_ssize_t s = 0; s < self->source_width; s++) {
        Py_ssize_t j = self->target[s];
        if (j < 0) continue;
        if (key_only && !is_key(self, j)) builder_put(&self->columns[j], row, NULL, -1);
        else builder_put(&self->columns[j], row, fields[s].ptr, fields[s].len);
    }
    for (Py_ssize_t k = 0; k < self->key_width; k++) {
        Field *f = fill ? key_field(self, fill, k) : NULL;
        builder_put(&self->fills[k], row, f ? f->ptr : NULL, f ? f->len : -1);
    }
    self->ops[row] = op;
    self->rows = row + 1;
}

/* One Insert/Update/Delete message: 1 insert, 2 update, 3 delete; NEEDS_PYTHON when the message
 * must go the careful way (nothing appended); ADD_FAILED with a Python error set (out of memory). */
int rowcolumns_add(PyObject *obj, const unsigned char *buf, Py_ssize_t size) {
    RowColumns *self = (RowColumns *)obj;
    if (size < 6) return NEEDS_PYTHON;
    unsigned char kind = buf[0], marker = buf[5];
    Py_ssize_t pos = 6, bytes = 0;
    Field *old = NULL, *new_ = NULL;
    int code;
    if (kind == 'I') {
        if (marker != 'N' || parse_tuple(self, buf, size, &pos, self->new_fields) < 0) return NEEDS_PYTHON;
        new_ = self->new_fields;
        code = 1;
    } else if (kind == 'U') {
        if (marker == 'K' || marker == 'O') {
            if (parse_tuple(self, buf, size, &pos, self->old_fields) < 0 || pos >= size) return NEEDS_PYTHON;
            old = self->old_fields;
            marker = buf[pos++];
        }
        if (marker != 'N' || parse_tuple(self, buf, size, &pos, self->new_fields) < 0) return NEEDS_PYTHON;
        new_ = self->new_fields;
        if (old != NULL && same_key(self, old, new_)) old = NULL;
        code = 2;
    } else if (kind == 'D') {
        if ((marker != 'K' && marker != 'O') || parse_tuple(self, buf, size, &pos, self->old_fields) < 0)
            return NEEDS_PYTHON;
        old = self->old_fields;
        code = 3;
    } else {
        return NEEDS_PYTHON;
    }
    if (pos != size) return NEEDS_PYTHON;
    if ((new_ && !tuple_is_utf8(self, new_, &bytes)) || (old && !tuple_is_utf8(self, old, &bytes)))
        return NEEDS_PYTHON;
    /* int32 offsets: a column past 2 GiB in one segment is left to the careful path's limits */
    if (reserve_all(self, self->rows + 2, bytes) < 0) { PyErr_NoMemory(); return ADD_FAILED; }
    for (Py_ssize_t j = 0; j < self->width; j++)
        if (self->columns[j].data_len + bytes > INT32_MAX) return NEEDS_PYTHON;
    if (code == 3) {
        put_row(self, 'D', old, 1, NULL); /* the old key's row is gone */
    } else if (old != NULL) {
        put_row(self, 'D', old, 1, NULL); /* an update that changed the key: the old key is gone, */
        put_row(self, 'U', new_, 0, old); /* and the row keeps what it lacks from the old key's row */
    } else {
        put_row(self, 'U', new_, 0, new_);
    }
    if (code == 1) self->inserted++;
    else if (code == 2) self->updated++;
    else self->deleted++;
    return code;
}

/* add(data) -> 1 insert, 2 update, 3 delete; NEEDS_PYTHON when the message must go the careful
 * way (nothing appended). */
static PyObject *RowColumns_add(RowColumns *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) return PyLong_FromLong(NEEDS_PYTHON);
    int code = rowcolumns_add((PyObject *)self, (const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
    return code == ADD_FAILED ? NULL : PyLong_FromLong(code);
}

static void free_builders(RowColumns *self) {
    for (Py_ssize_t j = 0; self->columns && j < self->width; j++) builder_free(&self->columns[j]);
    for (Py_ssize_t k = 0; self->fills && k < self->key_width; k++) builder_free(&self->fills[k]);
}

static uint64_t row_key_hash(RowColumns *self, Py_ssize_t row) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t k = 0; k < self->key_width; k++) {
        Builder *b = &self->columns[self->key_positions[k]];
        int valid = (b->valid[row >> 3] >> (row & 7)) & 1;
        const unsigned char *p = (const unsigned char *)b->data + b->offsets[row];
        Py_ssize_t n = valid ? b->offsets[row + 1] - b->offsets[row] : 0;
        for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
        h = (h ^ (uint64_t)(valid ? 0x100 + n : 0x2FF)) * 1099511628211ULL; /* column end, NULL apart */
    }
    return h;
}

static int same_row_key(RowColumns *self, Py_ssize_t a, Py_ssize_t r) {
    for (Py_ssize_t k = 0; k < self->key_width; k++) {
        Builder *b = &self->columns[self->key_positions[k]];
        int va = (b->valid[a >> 3] >> (a & 7)) & 1, vr = (b->valid[r >> 3] >> (r & 7)) & 1;
        if (va != vr) return 0;
        if (!va) continue;
        Py_ssize_t na = b->offsets[a + 1] - b->offsets[a], nr = b->offsets[r + 1] - b->offsets[r];
        if (na != nr || memcmp(b->data + b->offsets[a], b->data + b->offsets[r], (size_t)na) != 0) return 0;
    }
    return 1;
}

/* last_per_key() -> bytes: int64 row numbers, ascending, of each key's last row (the fold:
 * the last change of a key decides its final state). Keys compare as their text. */
static PyObject *RowColumns_last_per_key(RowColumns *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t n = self->rows, size = 1;
    while (size < 2 * n + 2) size <<= 1;
    Py_ssize_t *slots = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)size);
    Py_ssize_t *last = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n + 1)); /* per row: its key's last row */
    Py_ssize_t *slot_of = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    if (!slots || !last || !slot_of) { PyMem_Free(slots); PyMem_Free(last); PyMem_Free(slot_of); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < size; i++) slots[i] = -1;
    for (Py_ssize_t r = 0; r < n; r++) { /* slots hold a key's latest row */
        Py_ssize_t i = (Py_ssize_t)(row_key_hash(self, r) & (uint64_t)(size - 1));
        while (slots[i] >= 0 && !same_row_key(self, slots[i], r)) i = (i + 1) & (size - 1);
        slots[i] = r;
        slot_of[r] = i;
    }
    for (Py_ssize_t r = 0; r < n; r++) last[r] = slots[slot_of[r]];
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(int64_t) * n);
    if (out != NULL) {
        int64_t *rows = (int64_t *)PyBytes_AS_STRING(out);
        Py_ssize_t kept = 0;
        for (Py_ssize_t r = 0; r < n; r++)
            if (last[r] == r) rows[kept++] = r;
        if (_PyBytes_Resize(&out, (Py_ssize_t)sizeof(int64_t) * kept) < 0) out = NULL;
    }
    PyMem_Free(slots);
    PyMem_Free(last);
    PyMem_Free(slot_of);
    return out;
}

static PyObject *RowColumns_clear(RowColumns *self, PyObject *Py_UNUSED(ignored)) {
    free_builders(self);
    self->rows = 0;
    Py_RETURN_NONE;
}

static PyObject *buffers_list(Builder *builders, Py_ssize_t n, Py_ssize_t rows) {
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *item = builder_buffers(&builders[j], rows);
        if (item == NULL) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, j, item);
    }
    return out;
}

static PyObject *RowColumns_get_columns(RowColumns *self, void *closure) { return buffers_list(self->columns, self->width, self->rows); }

static PyObject *RowColumns_get_fills(RowColumns *self, void *closure) { return buffers_list(self->fills, self->key_width, self->rows); }

static PyObject *RowColumns_get_ops(RowColumns *self, void *closure) {
    return PyUnicode_DecodeASCII(self->ops ? self->ops : "", self->rows, "strict");
}

static Py_ssize_t RowColumns_len(RowColumns *self) { return self->rows; }

static void RowColumns_dealloc(RowColumns *self) {
    free_builders(self);
    PyMem_Free(self->columns);
    PyMem_Free(self->fills);
    PyMem_Free(self->target);
    PyMem_Free(self->key_positions);
    PyMem_Free(self->ops);
    PyMem_Free(self->old_fields);
    PyMem_Free(self->new_fields);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* RowColumns(keep, key_positions, source_width): ``keep`` the source positions published to
 * the warehouse, in order; ``key_positions`` the key's positions among the kept columns. */
static int RowColumns_init(RowColumns *self, PyObject *args, PyObject *kwds) {
    PyObject *keep, *keys;
    Py_ssize_t source_width;
    if (!PyArg_ParseTuple(args, "O!O!n", &PyTuple_Type, &keep, &PyTuple_Type, &keys, &source_width)) return -1;
    if (self->columns != NULL) { PyErr_SetString(PyExc_TypeError, "RowColumns is initialised once"); return -1; }
    self->width = PyTuple_GET_SIZE(keep);
    self->key_width = PyTuple_GET_SIZE(keys);
    self->source_width = source_width;
    if (source_width < self->width || self->key_width < 1) {
        PyErr_SetString(PyExc_ValueError, "RowColumns: bad widths");
        return -1;
    }
    self->target = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)source_width + 1);
    self->key_positions = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)self->key_width);
    self->columns = PyMem_Calloc((size_t)self->width + 1, sizeof(Builder));
    self->fills = PyMem_Calloc((size_t)self->key_width, sizeof(Builder));
    self->old_fields = PyMem_Calloc((size_t)source_width + 1, sizeof(Field));
    self->new_fields = PyMem_Calloc((size_t)source_width + 1, sizeof(Field));
    if (!self->target || !self->key_positions || !self->columns || !self->fills || !self->old_fields || !self->new_fields) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t s = 0; s < source_width; s++) self->target[s] = -1;
    for (Py_ssize_t j = 0; j < self->width; j++) {
        Py_ssize_t s = PyLong_AsSsize_t(PyTuple_GET_ITEM(keep, j));
        if (s == -1 && PyErr_Occurred()) return -1;
        if (s < 0 || s >= source_width) { PyErr_SetString(PyExc_ValueError, "RowColumns: kept position out of range"); return -1; }
        self->target[s] = j;
    }
    for (Py_ssize_t k = 0; k < self->key_width; k++) {
        Py_ssize_t j = PyLong_AsSsize_t(PyTuple_GET_ITEM(keys, k));
        if (j == -1 && PyErr_Occurred()) return -1;
        if (j < 0 || j >= self->width) { PyErr_SetString(PyExc_ValueError, "RowColumns: key position out of range"); return -1; }
        self->key_positions[k] = j;
    }
    return 0;
}

static PyMethodDef RowColumns_methods[] = {
    {"add", (PyCFunction)RowColumns_add, METH_O, "Append one Insert/Update/Delete message: 1, 2, 3, or -1 to decode it in Python."},
    {"clear", (PyCFunction)RowColumns_clear, METH_NOARGS, "Forget every row (TRUNCATE)."},
    {"last_per_key", (PyCFunction)RowColumns_last_per_key, METH_NOARGS, "int64 row numbers (bytes), ascending, of each key's last row."},
    {NULL},
};

static PyMemberDef RowColumns_members[] = {
    {"inserted", T_PYSSIZET, offsetof(RowColumns, inserted), READONLY, "inserts taken"},
    {"updated", T_PYSSIZET, offsetof(RowColumns, updated), READONLY, "updates taken"},
    {"deleted", T_PYSSIZET, offsetof(RowColumns, deleted), READONLY, "deletes taken"},
    {NULL},
};

static PyGetSetDef RowColumns_getset[] = {
    {"columns", (getter)RowColumns_get_columns, NULL, "per kept column, its Arrow string buffers (validity, offsets, data, nulls)", NULL},
    {"fills", (getter)RowColumns_get_fills, NULL, "per key column, the buffers of the key of the row unknown values come from", NULL},
    {"ops", (getter)RowColumns_get_ops, NULL, "one 'U' or 'D' per row", NULL},
    {NULL},
};

static PySequenceMethods RowColumns_as_sequence = {.sq_length = (lenfunc)RowColumns_len};

PyTypeObject RowColumnsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pg_replication.source._rowdecode.RowColumns",
    .tp_basicsize = sizeof(RowColumns),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Row changes of one relation decoded from pgoutput into column lists, unfolded, in stream order.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RowColumns_init,
    .tp_dealloc = (destructor)RowColumns_dealloc,
    .tp_methods = RowColumns_methods,
    .tp_getset = RowColumns_getset,
    .tp_members = RowColumns_members,
    .tp_as_sequence = &RowColumns_as_sequence,
};

static PyMethodDef module_methods[] = {
    {"arrays_to_json", (PyCFunction)arrays_to_json, METH_VARARGS, "Array literals (Arrow string buffers) to their JSON, as text_values.array_to_json writes it."},
    {"strings_to_arrow", (PyCFunction)strings_to_arrow, METH_O, "The buffers (validity, offsets, data, nulls) of an Arrow string array of a list of str | None."},
    {"bind_libpq", (PyCFunction)bind_libpq, METH_O, "The addresses of the libpq functions CopyReader calls, in copyboth.c's order."},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowdecode", "pgoutput row changes into Arrow string columns.", -1, module_methods};

PyMODINIT_FUNC PyInit__rowdecode(void) {
    if (PyType_Ready(&RowColumnsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RowColumnsType);
    if (PyModule_AddObject(m, "RowColumns", (PyObject *)&RowColumnsType) < 0) {
        Py_DECREF(&RowColumnsType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "NEEDS_PYTHON", NEEDS_PYTHON) < 0) { Py_DECREF(m); return NULL; }
    if (copyboth_init(m) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
