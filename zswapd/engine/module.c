/* The CPython module zswapd._engine and its Engine type: arguments, the
 * Python exceptions for the engine's statuses, the attributes (counters,
 * figures) and the module's constants.  It releases the GIL around every
 * call that takes one of the engine's locks (NOGIL) and never takes the GIL
 * while one is held (engine.h).  The calls that read or replace every index at once
 * (volatile, set_volatile, rebuild, check_pages, close) hold lock_all.
 */
#include "module.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <structmember.h>

#include "codec.h"
#include "fuse_server.h"
#include "tier.h"

PyObject *PoolError, *PoolFull, *StateError, *CorruptObject;

PyObject *raise_status(Engine *e, int st)
{
    switch (st) {
    case ST_CORRUPT:
        PyErr_SetString(CorruptObject, "corrupt object: it did not decompress to a 4096-byte page");
        break;
    case ST_PUNCH:
        PyErr_Format(StateError, "punching frames out of the arena memfd failed: %s", strerror(LOAD(e->punch_errno)));
        break;
    case ST_NOROOM:
        PyErr_SetString(PoolFull, "no frame or handle is available under the limit");
        break;
    case ST_NOMEM:
        PyErr_SetString(PyExc_MemoryError, "no memory for this thread's compression state");
        break;
    case ST_IO:
        errno = backing_errno(e) ? backing_errno(e) : EIO;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "the backing file");
        break;
    default:
        PyErr_Format(PyExc_RuntimeError, "engine status %d", st);
    }
    return NULL;
}

static void engine_release_buffers(EngineObject *self)
{
    for (int i = 0; i < self->nbufs; i++)
        PyBuffer_Release(&self->bufs[i]);
    self->nbufs = 0;
    self->e.page = NULL;
    self->e.arena = NULL;
}

static void Engine_dealloc(EngineObject *self)
{
    Engine *e = &self->e;
    engine_release_buffers(self);
    backing_detach(e);
    dict_free_all(e);
    PyMem_RawFree(e->elock);
    e->elock = NULL;
    if (e->locks_ready) {
        pthread_mutex_destroy(&e->pool_lock);
        for (int c = 0; c < MAX_CLASSES; c++)
            pthread_mutex_destroy(&e->cls_lock[c]);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_zstd_level(int level)
{
    int r = codec_check_level(level);
    if (r < 0)
        PyErr_Format(PyExc_ValueError, "zstd refuses level %d", level);
    return r;
}

/* The tables' names, entry sizes and dimensions, in state.layout's order. */
#define TABLE_NAME(name, type, dim) #name,
#define TABLE_SIZE(name, type, dim) sizeof(type),
#define TABLE_DIM(name, type, dim) dim,
static const char *const table_names[NTABLES] = {ENGINE_TABLES(TABLE_NAME)};
static const Py_ssize_t table_item[NTABLES] = {ENGINE_TABLES(TABLE_SIZE)};
static const int table_dim[NTABLES] = {ENGINE_TABLES(TABLE_DIM)};

static Py_ssize_t dim_entries(int dim, uint64_t npages, uint32_t max_frames, uint32_t max_handles)
{
    switch (dim) {
    case DIM_PAGES:
        return (Py_ssize_t)npages;
    case DIM_HANDLES:
        return (Py_ssize_t)max_handles + 1;
    case DIM_ZSPAGES:
        return (Py_ssize_t)max_frames + 1;
    case DIM_DICTS:
        return DICT_SLOTS + 1;
    case DIM_DICT_BYTES:
        return (Py_ssize_t)DICT_SLOTS * DICT_MAX_BYTES;
    case DIM_SEGMENTS:
        return (Py_ssize_t)MAX_SEGMENTS;
    default:
        return (Py_ssize_t)max_frames;
    }
}

/* The buffer of `name` in the dict, writable and at least `need` bytes, or NULL. */
static void *take_buffer(EngineObject *self, PyObject *bufs, const char *name, Py_ssize_t need)
{
    PyObject *o = PyDict_GetItemString(bufs, name);
    if (!o) {
        PyErr_Format(PyExc_KeyError, "state buffer %s is missing", name);
        return NULL;
    }
    if (PyObject_GetBuffer(o, &self->bufs[self->nbufs], PyBUF_WRITABLE) < 0)
        return NULL;
    Py_buffer *b = &self->bufs[self->nbufs++];
    if (b->len < need) {
        PyErr_Format(StateError, "state table %s is %zd bytes, the geometry needs %zd", name, b->len, need);
        return NULL;
    }
    return b->buf;
}

/* Engine(buffers: dict name -> buffer, arena_fd, npages, max_frames,
 *        max_handles, classes: [(size, frames, objs)], class_of: bytes(4097),
 *        huge_threshold, reserve_frames, algo, zstd_level) */
static int Engine_init(EngineObject *self, PyObject *args, PyObject *Py_UNUSED(kw))
{
    Engine *e = &self->e;
    PyObject *bufs, *classes;
    Py_buffer class_of;
    unsigned long long npages;
    unsigned int max_frames, max_handles;
    if (self->nbufs) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!iKIIO!y*IIii", &PyDict_Type, &bufs, &e->arena_fd, &npages, &max_frames,
                          &max_handles, &PyList_Type, &classes, &class_of, &e->huge_threshold, &e->reserve_frames,
                          &e->algo, &e->zstd_level))
        return -1;
    int ok = 0;
    e->npages = npages;
    e->max_frames = max_frames;
    e->max_handles = max_handles;
    Py_ssize_t ncls = PyList_GET_SIZE(classes);
    if (class_of.len != FRAME_SIZE + 1 || ncls < 1 || ncls > MAX_CLASSES) {
        PyErr_SetString(PyExc_ValueError, "class table: expected 1..256 classes and a 4097-byte lookup");
        goto out;
    }
    if (e->huge_threshold < 2 || e->huge_threshold > FRAME_SIZE - HEADER + 1) {
        PyErr_Format(PyExc_ValueError, "huge threshold %u is outside 2..%u", e->huge_threshold, FRAME_SIZE - HEADER + 1);
        goto out;
    }
    e->ncls = (int)ncls;
    for (Py_ssize_t i = 0; i < ncls; i++) {
        unsigned size, frames, objs;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(classes, i), "III", &size, &frames, &objs))
            goto out;
        if (size < 16 || size > FRAME_SIZE || !frames || frames > MAX_FRAMES_PER_ZSPAGE || !objs ||
            objs >= SLOT_END || objs * size > frames * FRAME_SIZE) {
            PyErr_Format(PyExc_ValueError, "class %zd: bad shape %u/%u/%u", i, size, frames, objs);
            goto out;
        }
        e->csize[i] = (uint16_t)size;
        e->cframes[i] = (uint8_t)frames;
        e->cobjs[i] = (uint16_t)objs;
    }
    memcpy(e->class_of, class_of.buf, FRAME_SIZE + 1);
    for (unsigned i = 0; i <= FRAME_SIZE; i++)
        if (e->class_of[i] >= ncls) {
            PyErr_SetString(PyExc_ValueError, "class lookup names a class out of range");
            goto out;
        }
    /* The state's tables, checked against the geometry before any use. */
    void *ptrs[NTABLES];
    for (int i = 0; i < NTABLES; i++) {
        Py_ssize_t need = dim_entries(table_dim[i], npages, max_frames, max_handles) * table_item[i];
        if (!(ptrs[i] = take_buffer(self, bufs, table_names[i], need)))
            goto out;
    }
#define TABLE_POINTER(name, type, dim) e->name = ptrs[T_##name];
    ENGINE_TABLES(TABLE_POINTER)
#undef TABLE_POINTER
    if (!(e->arena = take_buffer(self, bufs, "arena", (Py_ssize_t)max_frames * FRAME_SIZE)))
        goto out;

    e->elock = PyMem_RawCalloc((size_t)(npages / 64 + 1), sizeof *e->elock);
    if (!e->elock) {
        PyErr_NoMemory();
        goto out;
    }
    if (e->algo != ALGO_LZ4 && e->algo != ALGO_ZSTD) {
        PyErr_Format(PyExc_ValueError, "unknown algorithm id %d", e->algo);
        goto out;
    }
    if (check_zstd_level(e->zstd_level) < 0)
        goto out;
    if (!e->locks_ready) {
        /* Plain (not adaptive) mutexes: ThreadSanitizer knows them, and
         * every hold is short. */
        if (pthread_mutex_init(&e->pool_lock, NULL) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_mutex_init failed");
            goto out;
        }
        for (int c = 0; c < MAX_CLASSES; c++)
            pthread_mutex_init(&e->cls_lock[c], NULL);
        e->locks_ready = 1;
    }
    ok = 1;
out:
    PyBuffer_Release(&class_of);
    if (!ok)
        engine_release_buffers(self);
    return ok ? 0 : -1;
}

static PyObject *range_error(unsigned long long off, unsigned long long len, unsigned long long size)
{
    PyErr_Format(PyExc_ValueError, "range %llu+%llu is beyond the device size %llu", off, len, size);
    return NULL;
}

int call_policy(PyObject *fn, int status, int retried)
{
    PyObject *r = PyObject_CallFunction(fn, "ii", status, retried);
    if (!r)
        return -1;
    int go = PyObject_IsTrue(r);
    Py_DECREF(r);
    return go;
}

/* The Policy of a write from Python: the engine's `policy` attribute (the
 * store's, engine.py), called with the GIL, which the write runs without.
 * An exception stays set for Engine_write to raise. */
static int decide_by_attribute(void *arg, int status, int retried)
{
    PyGILState_STATE g = PyGILState_Ensure();
    int go = 0;
    PyObject *policy = PyObject_GetAttrString((PyObject *)arg, "policy");
    if (!policy)
        PyErr_Clear(); /* a bare Engine (no store): every stop ends the write */
    else if (policy != Py_None)
        go = call_policy(policy, status, retried);
    Py_XDECREF(policy);
    PyGILState_Release(g);
    return go;
}

/* write(offset, data) -> (bytes done, status): one write request; the
 * engine's policy is asked where it stops (write_request). */
static PyObject *Engine_write(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long offset;
    Py_buffer data;
    READY(e);
    if (!PyArg_ParseTuple(args, "Ky*", &offset, &data))
        return NULL;
    if (offset > e->npages * PAGE_SIZE || (unsigned long long)data.len > e->npages * PAGE_SIZE - offset) {
        PyBuffer_Release(&data);
        return range_error(offset, (unsigned long long)data.len, e->npages * PAGE_SIZE);
    }
    uint64_t done = 0;
    int st;
    Policy policy = {decide_by_attribute, self};
    NOGIL(st = write_request(e, offset, data.buf, (uint64_t)data.len, &policy, &done));
    PyBuffer_Release(&data);
    if (st == ST_POLICY)
        return NULL; /* the policy's exception */
    if (st != ST_OK && st != ST_REFUSED && st != ST_NOROOM)
        return raise_status(e, st);
    return Py_BuildValue("Ki", (unsigned long long)done, st);
}

/* readinto(offset, out) -> bytes read */
static PyObject *Engine_readinto(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long offset;
    Py_buffer out;
    READY(e);
    if (!PyArg_ParseTuple(args, "Kw*", &offset, &out))
        return NULL;
    if (offset > e->npages * PAGE_SIZE || (unsigned long long)out.len > e->npages * PAGE_SIZE - offset) {
        PyBuffer_Release(&out);
        return range_error(offset, (unsigned long long)out.len, e->npages * PAGE_SIZE);
    }
    int st;
    NOGIL(st = read_range(e, offset, out.buf, (uint64_t)out.len));
    Py_ssize_t n = out.len;
    PyBuffer_Release(&out);
    if (st != ST_OK)
        return raise_status(e, st);
    return PyLong_FromSsize_t(n);
}

/* discard_pages(first, end) -> pages freed: entry zeroed, then the object freed. */
static PyObject *Engine_discard_pages(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long first, end;
    READY(e);
    if (!PyArg_ParseTuple(args, "KK", &first, &end))
        return NULL;
    if (first > end || end > e->npages)
        return range_error(first * PAGE_SIZE, (end - first) * PAGE_SIZE, e->npages * PAGE_SIZE);
    unsigned long long freed = 0;
    long t;
    NOGIL({
        freed = discard_range(e, first, end);
        t = trim(e);
    });
    if (t < 0)
        return raise_status(e, ST_PUNCH);
    return PyLong_FromUnsignedLongLong(freed);
}

static PyObject *Engine_compact(EngineObject *self, PyObject *args, PyObject *kw)
{
    Engine *e = &self->e;
    static char *kwlist[] = {"max_moves", NULL};
    PyObject *maxo = Py_None;
    READY(e);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &maxo))
        return NULL;
    unsigned long long budget = 1ull << 62;
    if (maxo != Py_None) {
        long long m = PyLong_AsLongLong(maxo);
        if (m == -1 && PyErr_Occurred())
            return NULL;
        budget = m < 0 ? 0 : (unsigned long long)m;
    }
    long long moved;
    NOGIL(moved = compact(e, budget));
    if (moved < 0)
        return raise_status(e, ST_PUNCH);
    return PyLong_FromLongLong(moved);
}

static PyObject *Engine_trim(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    long n;
    READY(e);
    NOGIL(n = trim(e));
    if (n < 0)
        return raise_status(e, ST_PUNCH);
    return PyLong_FromLong(n);
}

static PyObject *Engine_refill_reserve(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    long n;
    READY(e);
    NOGIL(n = refill_reserve(e));
    return PyLong_FromLong(n);
}

static PyObject *Engine_set_codec(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    int algo, level;
    READY(e);
    if (!PyArg_ParseTuple(args, "ii", &algo, &level))
        return NULL;
    if (algo != ALGO_LZ4 && algo != ALGO_ZSTD) {
        PyErr_Format(PyExc_ValueError, "unknown algorithm id %d", algo);
        return NULL;
    }
    if (check_zstd_level(level) < 0)
        return NULL;
    /* Each thread's context picks the level up at its next page; a page
     * being compressed meanwhile keeps the codec it started with (every
     * entry records its own algorithm). */
    __atomic_store_n(&e->zstd_level, level, __ATOMIC_RELAXED);
    __atomic_store_n(&e->algo, algo, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *Engine_freeable(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    long cls = PyLong_AsLong(arg);
    if (cls == -1 && PyErr_Occurred())
        return NULL;
    if (cls < 0 || cls >= e->ncls) {
        PyErr_Format(PoolError, "no size class %ld", cls);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(freeable(e, (unsigned)cls));
}

static PyObject *Engine_freeable_frames(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    return PyLong_FromUnsignedLongLong(freeable_frames(e));
}

/* frame_room(over=0): over, frames past the limit a background move may take */
static PyObject *Engine_frame_room(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned int over = 0;
    if (!PyArg_ParseTuple(args, "|I", &over))
        return NULL;
    return PyLong_FromLongLong(frame_room_over(e, over));
}

/* attach_backing(fd, size): the backing file (backing.c); the fd stays the caller's. */
static PyObject *Engine_attach_backing(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    int fd;
    unsigned long long size;
    READY(e);
    if (!PyArg_ParseTuple(args, "iK", &fd, &size))
        return NULL;
    int r;
    NOGIL({
        lock_all(e);
        r = backing_attach(e, fd, size);
        unlock_all(e);
    });
    if (r == -EFBIG) {
        PyErr_Format(StateError,
                     "the segment table names segments beyond this backing file's %llu bytes: the file given is "
                     "smaller than the one the state was written to",
                     size);
        return NULL;
    }
    if (r == -EBUSY) {
        PyErr_SetString(PyExc_ValueError, "a backing file is already attached");
        return NULL;
    }
    if (r == -EINVAL) {
        PyErr_Format(PyExc_ValueError,
                     "backing file size %llu is not a multiple of %u bytes from two segments (%u bytes) to %llu", size,
                     SEG_BLOCK, 2 * SEG_SIZE, (unsigned long long)MAX_SEGMENTS * SEG_SIZE);
        return NULL;
    }
    if (r < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *step_error(Engine *e, long r)
{
    if (r == -ENXIO) {
        PyErr_SetString(PyExc_ValueError, "no backing file is attached");
        return NULL;
    }
    if (r == -ENOMEM)
        return PyErr_NoMemory();
    return raise_status(e, ST_IO);
}

/* writeback(max_objects, max_bytes, idle_ticks=0) -> (objects moved, bytes appended) */
static PyObject *Engine_writeback(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned int max_objects, idle_ticks = 0;
    unsigned long long max_bytes, nbytes = 0;
    READY(e);
    if (!PyArg_ParseTuple(args, "IK|I", &max_objects, &max_bytes, &idle_ticks))
        return NULL;
    long r;
    NOGIL(r = writeback_step(e, max_objects, max_bytes, idle_ticks, &nbytes));
    if (r < 0)
        return step_error(e, r);
    return Py_BuildValue("lK", r, nbytes);
}

/* clean(max_objects, max_bytes, percent) -> (objects moved, segments freed) */
static PyObject *Engine_clean(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned int max_objects, percent;
    unsigned long long max_bytes;
    READY(e);
    if (!PyArg_ParseTuple(args, "IKI", &max_objects, &max_bytes, &percent))
        return NULL;
    long r;
    int freed = 0;
    NOGIL(r = clean_step(e, max_objects, max_bytes, percent, &freed));
    if (r < 0)
        return step_error(e, r);
    return Py_BuildValue("li", r, freed);
}

static PyObject *Engine_backing_figures(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    unsigned long long f[5];
    READY(e);
    if (backing_figures(e, f) < 0) {
        PyErr_SetString(PyExc_ValueError, "no backing file is attached");
        return NULL;
    }
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "size", f[0], "live_bytes", f[1], "dead_bytes", f[2],
                         "segments_used", f[3], "bytes_written", f[4]);
}

/* backing_latency() -> [reads with latency <= 1, 2, 4, ... us] (LAT_BUCKETS) */
static PyObject *Engine_backing_latency(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    unsigned long long h[LAT_BUCKETS];
    READY(e);
    if (backing_latency(e, h) < 0) {
        PyErr_SetString(PyExc_ValueError, "no backing file is attached");
        return NULL;
    }
    return u64_list(h, LAT_BUCKETS);
}

static PyObject *Engine_close(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    if (e->locks_ready) {
        /* The FUSE threads are stopped first (FuseThreads.stop); the locks
         * wait out any call still running from another Python thread. */
        lock_all(e);
        engine_release_buffers(self);
        unlock_all(e);
        backing_detach(e);
    }
    Py_RETURN_NONE;
}

static PyObject *get_cls_zspages(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return u64_list(e->cls_zspages, e->ncls);
}
static PyObject *get_cls_used(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return u64_list(e->cls_used, e->ncls);
}
/* The getters take none of the engine's locks: every figure they read is LOAD/STORE
 * (see the top), so a reading thread sees a recent value, never a torn one. */
static PyObject *get_frames_used(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromUnsignedLong(LOAD(e->frames_used));
}
static PyObject *get_handles_used(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromUnsignedLong(LOAD(e->handles_used));
}
static PyObject *get_mem_used_total(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromUnsignedLongLong((unsigned long long)LOAD(e->frames_used) * FRAME_SIZE);
}
static PyObject *get_reserve_bytes(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromUnsignedLongLong((unsigned long long)LOAD(e->hot_top) * FRAME_SIZE);
}
static PyObject *get_frame_limit(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromLongLong(LOAD(e->frame_limit));
}
static int set_frame_limit(EngineObject *self, PyObject *v, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "frame_limit cannot be deleted");
        return -1;
    }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (x < 0) {
        PyErr_SetString(PyExc_ValueError, "frame_limit must be >= 0");
        return -1;
    }
    STORE(e->frame_limit, x);
    return 0;
}

/* The counters (engine.Counters' names) and the other atomic totals, as
 * attributes: a PyMemberDef would read and write them with plain accesses
 * while the engine's threads ADD to them.  closure: the field's offset in
 * Engine. */
#define FIELD_U64(e, c) ((unsigned long long *)((char *)(e) + (size_t)(c)))
static PyObject *get_u64_field(EngineObject *self, void *c)
{
    return PyLong_FromUnsignedLongLong(LOAD(*FIELD_U64(&self->e, c)));
}
static int set_u64_field(EngineObject *self, PyObject *v, void *c)
{
    Engine *e = &self->e;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "an engine counter cannot be deleted");
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    STORE(*FIELD_U64(e, c), x);
    return 0;
}

static PyObject *get_now_tick(EngineObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(LOAD(self->e.now_tick));
}
static int set_now_tick(EngineObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "now_tick cannot be deleted");
        return -1;
    }
    unsigned long x = PyLong_AsUnsignedLong(v);
    if (x == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    STORE(self->e.now_tick, (unsigned)(x & ENTRY_IDLE_MASK));
    return 0;
}

static PyObject *get_full(EngineObject *self, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    return PyLong_FromLong(LOAD(e->full));
}
static int set_full(EngineObject *self, PyObject *v, void *Py_UNUSED(c))
{
    Engine *e = &self->e;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "full cannot be deleted");
        return -1;
    }
    int x = PyObject_IsTrue(v);
    if (x < 0)
        return -1;
    STORE(e->full, x);
    return 0;
}

#define COUNTER_NAME(f) #f,
#define COUNTER_OFFSET(f) offsetof(Engine, f),
static const char *const counter_names[] = {ENGINE_COUNTERS(COUNTER_NAME)};
static const size_t counter_offsets[] = {ENGINE_COUNTERS(COUNTER_OFFSET)};
#define NCOUNTERS (sizeof counter_offsets / sizeof counter_offsets[0])

/* count(name, n=1): add n to counter `name` atomically.  Python's way to bump
 * a counter: `engine.num_writes += 1` is a load and a store, and a native
 * thread's bump in between would be lost. */
static PyObject *Engine_count(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Engine *e = &self->e;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "count(name, n=1) takes 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    const char *name = PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8(args[0]) : NULL;
    if (!name) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "count: the counter name must be a str");
        return NULL;
    }
    long long n = 1;
    if (nargs == 2) {
        n = PyLong_AsLongLong(args[1]);
        if (n == -1 && PyErr_Occurred())
            return NULL;
    }
    for (size_t i = 0; i < NCOUNTERS; i++) {
        if (!strcmp(name, counter_names[i])) {
            ADD(*FIELD_U64(e, counter_offsets[i]), (unsigned long long)n); /* n < 0 wraps: a subtraction */
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_AttributeError, "no engine counter named %R", args[0]);
    return NULL;
}

static PyGetSetDef Engine_getset[] = {
    {"cls_zspages", (getter)get_cls_zspages, NULL, "zspages per class (a copy)", NULL},
    {"cls_used", (getter)get_cls_used, NULL, "objects per class (a copy)", NULL},
    {"frames_used", (getter)get_frames_used, NULL, NULL, NULL},
    {"handles_used", (getter)get_handles_used, NULL, NULL, NULL},
    {"mem_used_total", (getter)get_mem_used_total, NULL, NULL, NULL},
    {"reserve_bytes", (getter)get_reserve_bytes, NULL, NULL, NULL},
    {"frame_limit", (getter)get_frame_limit, (setter)set_frame_limit, NULL, NULL},
    {"full", (getter)get_full, (setter)set_full, "Store.full, for the native FUSE threads", NULL},
#define COUNTER_GETSET(f) {#f, (getter)get_u64_field, (setter)set_u64_field, NULL, (void *)offsetof(Engine, f)},
    ENGINE_COUNTERS(COUNTER_GETSET)
    {"pages_compacted", (getter)get_u64_field, (setter)set_u64_field, NULL, (void *)offsetof(Engine, pages_compacted)},
    {"huge_objects", (getter)get_u64_field, NULL, NULL, (void *)offsetof(Engine, huge_objects)},
    {"obj_bytes", (getter)get_u64_field, NULL, NULL, (void *)offsetof(Engine, obj_bytes)},
    {"compressions", (getter)get_u64_field, NULL, "pages given to lz4 or zstd", (void *)offsetof(Engine, compressions)},
    {"now_tick", (getter)get_now_tick, (setter)set_now_tick, "the idle tick stamped on writes and reads", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Engine_members[] = {
    {"huge_threshold", T_UINT, offsetof(EngineObject, e.huge_threshold), READONLY, NULL},
    {"reserve_frames", T_UINT, offsetof(EngineObject, e.reserve_frames), READONLY, NULL},
    {"max_frames", T_UINT, offsetof(EngineObject, e.max_frames), READONLY, NULL},
    {"max_handles", T_UINT, offsetof(EngineObject, e.max_handles), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Engine_methods[] = {
    {"write", (PyCFunction)Engine_write, METH_VARARGS, "write(offset, data) -> (bytes done, status)"},
    {"readinto", (PyCFunction)Engine_readinto, METH_VARARGS, "readinto(offset, out) -> bytes read"},
    {"discard_pages", (PyCFunction)Engine_discard_pages, METH_VARARGS, "discard_pages(first, end) -> pages freed"},
    {"compact", (PyCFunction)(void (*)(void))Engine_compact, METH_VARARGS | METH_KEYWORDS, "compact(max_moves=None) -> objects moved"},
    {"trim", (PyCFunction)Engine_trim, METH_NOARGS, NULL},
    {"refill_reserve", (PyCFunction)Engine_refill_reserve, METH_NOARGS, NULL},
    {"count", (PyCFunction)(void (*)(void))Engine_count, METH_FASTCALL, "count(name, n=1): add n to a counter atomically"},
    {"_set_codec", (PyCFunction)Engine_set_codec, METH_VARARGS, "set_codec(algo_id, zstd_level)"},
    /* the pool's object API (object_api.c), for the pool tests */
    {"store", (PyCFunction)Engine_store, METH_VARARGS, NULL},
    {"load", (PyCFunction)Engine_load, METH_VARARGS, NULL},
    {"free", (PyCFunction)Engine_free, METH_VARARGS, NULL},
    {"store_word", (PyCFunction)Engine_store_word, METH_O, NULL},
    {"word", (PyCFunction)Engine_word, METH_O, NULL},
    {"free_word", (PyCFunction)Engine_free_word, METH_O, NULL},
    /* figures for the store's policy */
    {"freeable", (PyCFunction)Engine_freeable, METH_O, NULL},
    {"freeable_frames", (PyCFunction)Engine_freeable_frames, METH_NOARGS, NULL},
    {"frame_room", (PyCFunction)Engine_frame_room, METH_VARARGS, NULL},
    {"volatile", (PyCFunction)Engine_volatile, METH_NOARGS, NULL},
    {"set_volatile", (PyCFunction)Engine_set_volatile, METH_O, NULL},
    {"rebuild", (PyCFunction)Engine_rebuild, METH_VARARGS, "rebuild(extents, nalgos) -> (stored, same, huge)"},
    {"check_pages", (PyCFunction)Engine_check_pages, METH_VARARGS, "check_pages(extents): raise StateError unless every invariant holds"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "release the state's buffers"},
    {"attach_backing", (PyCFunction)Engine_attach_backing, METH_VARARGS, "attach_backing(fd, size)"},
    {"writeback", (PyCFunction)Engine_writeback, METH_VARARGS, "writeback(max_objects, max_bytes, idle_ticks=0) -> (moved, bytes)"},
    {"clean", (PyCFunction)Engine_clean, METH_VARARGS, "clean(max_objects, max_bytes, percent) -> (moved, freed)"},
    {"backing_figures", (PyCFunction)Engine_backing_figures, METH_NOARGS, NULL},
    {"backing_latency", (PyCFunction)Engine_backing_latency, METH_NOARGS, NULL},
    {"rebuild_backing", (PyCFunction)Engine_rebuild_backing, METH_VARARGS, "rebuild_backing(pages, segments) -> bd_count"},
    {"check_backing", (PyCFunction)Engine_check_backing, METH_VARARGS, "check_backing(pages, segments)"},
    /* the recompression tier (tier_api.c) */
    {"recompress_step", (PyCFunction)Engine_recompress_step, METH_VARARGS,
     "recompress_step(first, end, min_len, max_len, idle_ticks, threshold, level, max_pages) -> "
     "(next, pages, saved, looked, status)"},
    {"census", (PyCFunction)Engine_census, METH_NOARGS, "census() -> (ages, pages, bytes)"},
    {"add_dictionary", (PyCFunction)Engine_add_dictionary, METH_O, "add_dictionary(bytes) -> (slot, id)"},
    {"drop_dictionary", (PyCFunction)Engine_drop_dictionary, METH_O, "drop_dictionary(slot)"},
    {"dictionaries", (PyCFunction)Engine_dictionaries, METH_NOARGS, "dictionaries() -> [(slot, id, bytes, refs)]"},
    {"broken_dictionaries", (PyCFunction)Engine_broken_dictionaries, METH_NOARGS,
     "broken_dictionaries() -> [slot]: installed slots zstd refused at the last rebuild"},
    {"sample", (PyCFunction)Engine_sample, METH_VARARGS, "sample(first, end, idle_ticks, stride, max) -> (pages, next)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zswapd._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The native engine over a zswapd state's tables",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
    .tp_getset = Engine_getset,
};

/* ---- the rules C and Python share -------------------------------------------
 * RULES: every constant, bit layout and list that Python also writes down
 * (entry.py, pool.py, codec.py, state.py, config.py, engine.py), under one
 * name each.  engine.py compares them with its own at import and refuses a
 * build that disagrees: one side defines, the other asserts. */

static const char *const dim_names[] = {"pages", "handles", "zspages", "frames", "dicts", "dict_bytes", "segments"};

static int add_int(PyObject *d, const char *name, unsigned long long v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, name, o) : -1;
    Py_XDECREF(o);
    return r;
}

static PyObject *rules(void)
{
    PyObject *d = PyDict_New(), *tables = PyTuple_New(NTABLES), *counters = NULL;
    if (!d || !tables)
        goto fail;
    for (int i = 0; i < NTABLES; i++) {
        PyObject *t = Py_BuildValue("(sns)", table_names[i], table_item[i], dim_names[table_dim[i]]);
        if (!t)
            goto fail;
        PyTuple_SET_ITEM(tables, i, t);
    }
    counters = PyTuple_New((Py_ssize_t)NCOUNTERS);
    if (!counters)
        goto fail;
    for (size_t i = 0; i < NCOUNTERS; i++) {
        PyObject *c = PyUnicode_FromString(counter_names[i]);
        if (!c)
            goto fail;
        PyTuple_SET_ITEM(counters, (Py_ssize_t)i, c);
    }
#define RULE(name) add_int(d, #name, name) < 0 ||
    if (RULE(ENTRY_KIND_MASK) RULE(ENTRY_ALGO_SHIFT) RULE(ENTRY_ALGO_MASK) RULE(ENTRY_LEN_SHIFT)
            RULE(ENTRY_LEN_MASK) RULE(ENTRY_TIER_SHIFT) RULE(ENTRY_TIER_MASK) RULE(DICT_SLOTS) RULE(DICT_MAX_BYTES) RULE(TIER_PLAIN)
                RULE(ENTRY_TRIED) RULE(ENTRY_IDLE_SHIFT) RULE(ENTRY_IDLE_MASK) RULE(IDLE_CLAMP)
                RULE(ENTRY_HANDLE_SHIFT) RULE(ENTRY_UNUSED) RULE(KIND_SAME) RULE(KIND_COMPRESSED)
                RULE(KIND_HUGE) RULE(ALGO_LZ4) RULE(ALGO_ZSTD) RULE(LOC_HUGE) RULE(LOC_FRAME_MASK)
                    RULE(LOC_ZSPAGE_SHIFT) RULE(LOC_SLOT_MASK) RULE(SLOT_FREE) RULE(SLOT_END) RULE(FRAME_SIZE)
                        RULE(HEADER) RULE(GROUPS) RULE(MAX_FRAMES_PER_ZSPAGE) RULE(MOVE_RESERVE)
                            RULE(ST_OK) RULE(ST_REFUSED) RULE(ST_NOROOM) RULE(MAX_THREADS) RULE(ENTRY_BACKED)
                                RULE(SEG_SIZE) RULE(SEG_BLOCK) RULE(OBJ_ALIGN) RULE(OBJ_HEADER) RULE(MAX_SEGMENTS)
                                    RULE(MAX_PENDING) RULE(SEG_FILL_SHIFT) RULE(SEG_STATE_SHIFT) RULE(SEG_FREE)
                                        RULE(SEG_OPEN) RULE(SEG_FULL) RULE(SEG_CLEANING) RULE(LAT_BUCKETS)
                                PyDict_SetItemString(d, "TABLES", tables) < 0 ||
        PyDict_SetItemString(d, "COUNTERS", counters) < 0)
        goto fail;
#undef RULE
    Py_DECREF(tables);
    Py_DECREF(counters);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(tables);
    Py_XDECREF(counters);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"serve_fuse", serve_fuse, METH_VARARGS, "serve_fuse(engine, fds, callback) -> Server: a thread per fd"},
    {"recompress_page", tier_recompress_page, METH_VARARGS,
     "recompress_page(page, level, room, dictionary=None) -> bytes | None"},
    {"train_dictionary", tier_train_dictionary, METH_VARARGS, "train_dictionary(samples, size) -> bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, .m_name = "zswapd._engine", .m_doc = "zswapd's native engine", .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    PyObject *pool = PyImport_ImportModule("zswapd.pool"), *errors = PyImport_ImportModule("zswapd.errors");
    if (!pool || !errors) {
        Py_XDECREF(pool);
        return NULL;
    }
    PoolError = PyObject_GetAttrString(pool, "PoolError");
    PoolFull = PyObject_GetAttrString(pool, "PoolFull");
    StateError = PyObject_GetAttrString(pool, "StateError");
    CorruptObject = PyObject_GetAttrString(errors, "CorruptObject");
    Py_DECREF(pool);
    Py_DECREF(errors);
    if (!PoolError || !PoolFull || !StateError || !CorruptObject)
        return NULL;
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    if (codec_init() != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_key_create failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&engine_module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "RULES", rules()) < 0 ||
        PyModule_AddStringConstant(m, "LZ4_VERSION", codec_lz4_version()) < 0 ||
        PyModule_AddStringConstant(m, "ZSTD_VERSION", codec_zstd_version()) < 0 || fuse_threads_ready(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
