/* What the CPython-facing files of the engine share: the Engine object
 * (Python's view of an Engine), the exceptions, and the argument and
 * GIL helpers.  module.c owns the type; object_api.c and the fuse_*.c files
 * add to it. */
#ifndef ZSWAPD_MODULE_H
#define ZSWAPD_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine.h"

typedef struct {
    PyObject_HEAD
    Py_buffer bufs[NTABLES + 1]; /* the state's tables and its arena */
    int nbufs;
    Engine e;
} EngineObject;

extern PyTypeObject EngineType;
/* pool.PoolError, pool.PoolFull, state.StateError, errors.CorruptObject,
 * looked up at import. */
extern PyObject *PoolError, *PoolFull, *StateError, *CorruptObject;

/* fn(status, retried) with the GIL held: 1 go on, 0 end the write, -1 an
 * exception (left set).  The one way C asks the store's policy (Policy,
 * engine.h): from Engine.write and from the FUSE threads. */
int call_policy(PyObject *fn, int status, int retried);

/* The Python exception for an engine status; returns NULL. */
PyObject *raise_status(Engine *e, int st);

#define READY(e)                                                                                                   \
    do {                                                                                                           \
        if (!(e)->arena) {                                                                                         \
            PyErr_SetString(PyExc_ValueError, "engine is closed");                                                  \
            return NULL;                                                                                           \
        }                                                                                                          \
    } while (0)

/* Run `stmt` with the GIL released; it takes the engine's own locks. */
#define NOGIL(stmt)                                                                                                \
    do {                                                                                                           \
        Py_BEGIN_ALLOW_THREADS stmt;                                                                               \
        Py_END_ALLOW_THREADS                                                                                       \
    } while (0)

/* A list of n counters, each read with LOAD. */
PyObject *u64_list(const unsigned long long *v, int n);

/* takeover.c: rebuild, check, and the volatile indexes. */
PyObject *Engine_volatile(EngineObject *self, PyObject *a);
PyObject *Engine_set_volatile(EngineObject *self, PyObject *d);
PyObject *Engine_rebuild(EngineObject *self, PyObject *args);
PyObject *Engine_check_pages(EngineObject *self, PyObject *args);
PyObject *Engine_rebuild_backing(EngineObject *self, PyObject *args);
PyObject *Engine_check_backing(EngineObject *self, PyObject *args);

/* object_api.c: the pool's object API, for the pool tests. */
PyObject *Engine_store(EngineObject *self, PyObject *args);
PyObject *Engine_load(EngineObject *self, PyObject *args);
PyObject *Engine_free(EngineObject *self, PyObject *args);
PyObject *Engine_store_word(EngineObject *self, PyObject *arg);
PyObject *Engine_word(EngineObject *self, PyObject *arg);
PyObject *Engine_free_word(EngineObject *self, PyObject *arg);

/* tier_api.c: the recompression tier. */
PyObject *Engine_recompress_step(EngineObject *self, PyObject *args);
PyObject *Engine_census(EngineObject *self, PyObject *a);
PyObject *Engine_add_dictionary(EngineObject *self, PyObject *arg);
PyObject *Engine_drop_dictionary(EngineObject *self, PyObject *arg);
PyObject *Engine_dictionaries(EngineObject *self, PyObject *a);
PyObject *Engine_broken_dictionaries(EngineObject *self, PyObject *a);
PyObject *Engine_sample(EngineObject *self, PyObject *args);
PyObject *tier_recompress_page(PyObject *m, PyObject *args);
PyObject *tier_train_dictionary(PyObject *m, PyObject *args);

/* fuse_loop.c: readies the FUSE threads' type; serve_fuse() starts them. */
int fuse_threads_ready(PyObject *module);
PyObject *serve_fuse(PyObject *module, PyObject *args);

#endif
