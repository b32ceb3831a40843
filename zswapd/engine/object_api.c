/* The pool's object API: store, load and free objects and words by handle,
 * as pool.Pool offers them.  Only tests/test_pool.py and tests/test_engine.py
 * use it, to run the same allocator calls through both engines and compare
 * the bytes; the store goes through the page level (page.c).  Each call
 * takes what pool.c's functions take (class and pool locks), with the GIL
 * released where a call can wait for them.
 */
#include "module.h"

static int check_handle(Engine *e, unsigned long long h)
{
    if (!h || h > LOAD(e->handles_made)) {
        PyErr_Format(PoolError, "unknown handle %llu", h);
        return -1;
    }
    return 0;
}

/* A handle argument (an int), checked. */
static int handle_arg(Engine *e, PyObject *arg, unsigned long long *h)
{
    *h = PyLong_AsUnsignedLongLong(arg);
    if (*h == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    return check_handle(e, *h);
}

/* (handle, length) arguments, checked. */
static int handle_len_args(Engine *e, PyObject *args, unsigned long long *h, unsigned int *n)
{
    if (!PyArg_ParseTuple(args, "KI", h, n))
        return -1;
    return check_handle(e, *h);
}

/* store(data, over=0): `over` frames past the limit it may take (a
 * background move's, MOVE_RESERVE at most) */
PyObject *Engine_store(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    Py_buffer data;
    unsigned int over = 0;
    READY(e);
    if (!PyArg_ParseTuple(args, "y*|I", &data, &over))
        return NULL;
    Py_ssize_t n = data.len;
    PyObject *res = NULL;
    if (n > (Py_ssize_t)FRAME_SIZE) {
        PyErr_Format(PoolError, "object of %zd bytes is larger than a frame (%u)", n, FRAME_SIZE);
    } else if (n == 0) {
        PyErr_SetString(PoolError, "empty object");
    } else if (n != (Py_ssize_t)FRAME_SIZE && n + HEADER > FRAME_SIZE) {
        PyErr_Format(PoolError, "object of %zd bytes needs the raw page form (>= %u)", n, e->huge_threshold);
    } else if (over > MOVE_RESERVE) {
        PyErr_Format(PoolError, "a move may take at most %u frames past the limit, not %u", MOVE_RESERVE, over);
    } else {
        uint32_t h;
        NOGIL(h = obj_store_over(e, data.buf, (uint32_t)n, over));
        if (!h)
            PyErr_SetString(PoolFull, "no room for the object (frames or handles)");
        else
            res = PyLong_FromUnsignedLong(h);
    }
    PyBuffer_Release(&data);
    return res;
}

PyObject *Engine_load(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long h;
    unsigned int n;
    READY(e);
    if (handle_len_args(e, args, &h, &n) < 0)
        return NULL;
    if (n > FRAME_SIZE) {
        PyErr_Format(PoolError, "length %u is larger than a frame", n);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out)
        return NULL;
    obj_copy(e, (uint32_t)h, n, (uint8_t *)PyBytes_AS_STRING(out));
    return out;
}

PyObject *Engine_free(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long h;
    unsigned int n;
    READY(e);
    if (handle_len_args(e, args, &h, &n) < 0)
        return NULL;
    NOGIL(obj_free(e, (uint32_t)h, n));
    Py_RETURN_NONE;
}

PyObject *Engine_store_word(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    unsigned long long w = PyLong_AsUnsignedLongLong(arg);
    READY(e);
    if (w == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint32_t h;
    NOGIL({
        pool_lock(e);
        h = new_handle(e, w);
        pool_unlock(e);
    });
    if (!h) {
        PyErr_SetString(PoolFull, "handle table is full");
        return NULL;
    }
    return PyLong_FromUnsignedLong(h);
}

PyObject *Engine_word(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    unsigned long long h;
    READY(e);
    if (handle_arg(e, arg, &h) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(e->handle[h]);
}

PyObject *Engine_free_word(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    unsigned long long h;
    READY(e);
    if (handle_arg(e, arg, &h) < 0)
        return NULL;
    NOGIL({
        pool_lock(e);
        drop_handle(e, (uint32_t)h);
        pool_unlock(e);
    });
    Py_RETURN_NONE;
}
