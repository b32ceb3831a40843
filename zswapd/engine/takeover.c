/* What a takeover and a switch of engines hand across, as the Engine
 * type's methods: rebuild() and check_pages() (rebuild.c, over the page
 * table's resident extents) and volatile()/set_volatile() (the volatile
 * indexes, to and from a Python Pool: the class statistics and the tests
 * read them, and the Python engine's rebuild hands them over).  Each holds
 * lock_all while it reads or replaces the indexes; the rebuild and the
 * check release the GIL for their scan.
 */
#include "module.h"

#include "tier.h"

#include <limits.h>

static PyObject *u32_list(const uint32_t *v, int n)
{
    PyObject *l = PyList_New(n);
    for (int i = 0; l && i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLong(v[i]);
        if (!x) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* Per-class totals: also read by the unlocked getters, hence LOAD. */
PyObject *u64_list(const unsigned long long *v, int n)
{
    PyObject *l = PyList_New(n);
    for (int i = 0; l && i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(LOAD(v[i]));
        if (!x) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* The volatile scalars, under pool.Pool's attribute names. */
static PyObject *volatile_unlocked(Engine *e);

/* A consistent snapshot: every lock held while it is read. */
PyObject *Engine_volatile(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    lock_all(e);
    PyObject *r = volatile_unlocked(e);
    unlock_all(e);
    return r;
}

static PyObject *volatile_unlocked(Engine *e)
{
    PyObject *frag = PyList_New(0);
    if (!frag)
        return NULL;
    for (int c = 0; c < e->ncls; c++) {
        if (e->fragmented[c]) {
            PyObject *x = PyLong_FromLong(c);
            if (!x || PyList_Append(frag, x) < 0) {
                Py_XDECREF(x);
                Py_DECREF(frag);
                return NULL;
            }
            Py_DECREF(x);
        }
    }
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:N,s:N,s:N,s:N,s:K,s:K,s:K,s:N}", "frames_made", e->frames_made,
        "hot_top", e->hot_top, "cold_top", e->cold_top, "frames_used", e->frames_used, "zs_free_top", e->zs_free_top,
        "zs_made", e->zs_made, "handle_free_top", e->handle_free_top, "handles_made", e->handles_made, "handles_used",
        e->handles_used, "heads", u32_list(e->heads, e->ncls * (int)(GROUPS + 1)), "nonempty",
        u32_list(e->nonempty, e->ncls), "cls_zspages", u64_list(e->cls_zspages, e->ncls), "cls_used",
        u64_list(e->cls_used, e->ncls), "huge_objects", LOAD(e->huge_objects), "obj_bytes", LOAD(e->obj_bytes),
        "pages_compacted", LOAD(e->pages_compacted), "fragmented", frag);
}

static int get_u64(PyObject *d, const char *k, unsigned long long *out, unsigned long long max)
{
    PyObject *o = PyDict_GetItemString(d, k);
    if (!o) {
        PyErr_Format(PyExc_KeyError, "volatile state lacks %s", k);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > max) {
        PyErr_Format(StateError, "volatile %s = %llu is beyond %llu", k, v, max);
        return -1;
    }
    *out = v;
    return 0;
}

static int get_list(PyObject *d, const char *k, unsigned long long *out, Py_ssize_t n, unsigned long long max)
{
    PyObject *o = PyDict_GetItemString(d, k);
    if (!o || !PyList_Check(o) || PyList_GET_SIZE(o) != n) {
        PyErr_Format(PyExc_ValueError, "volatile %s must be a list of %zd", k, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(o, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        if (v > max) {
            PyErr_Format(StateError, "volatile %s[%zd] = %llu is beyond %llu", k, i, v, max);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

/* Adopt a Python Pool's volatile scalars (after its rebuild scan). */
PyObject *Engine_set_volatile(EngineObject *self, PyObject *d)
{
    Engine *e = &self->e;
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "set_volatile takes a dict");
        return NULL;
    }
    unsigned long long v[9], huge, obj, comp;
    static const char *const names[9] = {"frames_made", "hot_top", "cold_top", "frames_used", "zs_free_top",
                                         "zs_made", "handle_free_top", "handles_made", "handles_used"};
    unsigned long long maxes[9] = {e->max_frames, e->max_frames, e->max_frames, e->max_frames, e->max_frames,
                                   e->max_frames, e->max_handles, e->max_handles, e->max_handles};
    for (int i = 0; i < 9; i++)
        if (get_u64(d, names[i], &v[i], maxes[i]) < 0)
            return NULL;
    if (get_u64(d, "huge_objects", &huge, e->max_frames) < 0 || get_u64(d, "obj_bytes", &obj, ULLONG_MAX) < 0 ||
        get_u64(d, "pages_compacted", &comp, ULLONG_MAX) < 0)
        return NULL;
    int nh = e->ncls * (int)(GROUPS + 1);
    unsigned long long *heads = PyMem_Malloc(sizeof *heads * (size_t)nh);
    unsigned long long ne[MAX_CLASSES], zs[MAX_CLASSES], used[MAX_CLASSES];
    if (!heads)
        return PyErr_NoMemory();
    if (get_list(d, "heads", heads, nh, e->max_frames) < 0 || get_list(d, "nonempty", ne, e->ncls, 0xFFFFFFFF) < 0 ||
        get_list(d, "cls_zspages", zs, e->ncls, ULLONG_MAX) < 0 ||
        get_list(d, "cls_used", used, e->ncls, ULLONG_MAX) < 0) {
        PyMem_Free(heads);
        return NULL;
    }
    PyObject *frag = PyDict_GetItemString(d, "fragmented");
    PyObject *seq = frag ? PySequence_Fast(frag, "fragmented must be a sequence") : NULL;
    if (!seq) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "volatile state lacks fragmented");
        PyMem_Free(heads);
        return NULL;
    }
    uint8_t fr[MAX_CLASSES] = {0};
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (c < 0 || c >= e->ncls) {
            if (!PyErr_Occurred())
                PyErr_Format(StateError, "fragmented names class %ld", c);
            Py_DECREF(seq);
            PyMem_Free(heads);
            return NULL;
        }
        fr[c] = 1;
    }
    Py_DECREF(seq);
    lock_all(e);
    e->frames_made = (uint32_t)v[0];
    STORE(e->hot_top, (uint32_t)v[1]);
    e->cold_top = (uint32_t)v[2];
    STORE(e->frames_used, (uint32_t)v[3]);
    e->zs_free_top = (uint32_t)v[4];
    e->zs_made = (uint32_t)v[5];
    e->handle_free_top = (uint32_t)v[6];
    STORE(e->handles_made, (uint32_t)v[7]);
    STORE(e->handles_used, (uint32_t)v[8]);
    for (int i = 0; i < nh; i++)
        e->heads[i] = (uint32_t)heads[i];
    for (int c = 0; c < e->ncls; c++) {
        e->nonempty[c] = (uint32_t)ne[c];
        STORE(e->cls_zspages[c], zs[c]);
        STORE(e->cls_used[c], used[c]);
        STORE(e->fragmented[c], fr[c]);
    }
    STORE(e->huge_objects, huge);
    STORE(e->obj_bytes, obj);
    STORE(e->pages_compacted, comp);
    unlock_all(e);
    PyMem_Free(heads);
    Py_RETURN_NONE;
}

/* extents: a list of (first, end) ranges of a table of `limit` entries. */
static uint64_t *parse_extents_of(PyObject *list, size_t *n, uint64_t limit, const char *what);

static uint64_t *parse_extents(Engine *e, PyObject *list, size_t *n)
{
    return parse_extents_of(list, n, e->npages, "the page table");
}

static uint64_t *parse_extents_of(PyObject *list, size_t *n, uint64_t limit, const char *what)
{
    PyObject *seq = PySequence_Fast(list, "extents must be a sequence of (first, end)");
    if (!seq)
        return NULL;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    uint64_t *ext = PyMem_RawMalloc(sizeof *ext * 2 * (size_t)(len ? len : 1));
    if (!ext) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned long long first, end;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &first, &end))
            goto bad;
        if (first > end || end > limit) {
            PyErr_Format(PyExc_ValueError, "extent %llu..%llu is outside %s (%llu entries)", first, end, what,
                         (unsigned long long)limit);
            goto bad;
        }
        ext[2 * i] = first;
        ext[2 * i + 1] = end;
    }
    Py_DECREF(seq);
    *n = (size_t)len;
    return ext;
bad:
    Py_DECREF(seq);
    PyMem_RawFree(ext);
    return NULL;
}

/* rebuild(extents, nalgos) -> (pages_stored, same_pages, huge_pages); also
 * sets those counters.  Raises StateError as store.rebuild would. */
PyObject *Engine_rebuild(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    PyObject *list;
    unsigned int nalgos;
    READY(e);
    if (!PyArg_ParseTuple(args, "OI", &list, &nalgos))
        return NULL;
    size_t next = 0;
    uint64_t *ext = parse_extents(e, list, &next);
    if (!ext)
        return NULL;
    char err[1024] = "";
    unsigned long long counts[3] = {0, 0, 0};
    int r;
    NOGIL({
        lock_all(e);
        r = rebuild_all(e, ext, next, nalgos, counts, err, sizeof err);
        if (r == 0) {
            STORE(e->pages_stored, counts[0]);
            STORE(e->same_pages, counts[1]);
            STORE(e->huge_pages, counts[2]);
        }
        unlock_all(e);
    });
    PyMem_RawFree(ext);
    if (r < 0) {
        PyErr_SetString(StateError, err);
        return NULL;
    }
    if (dict_load_all(e) < 0) /* the dictionaries' digested forms, for reads */
        return PyErr_NoMemory();
    return Py_BuildValue("KKK", counts[0], counts[1], counts[2]);
}

/* check_invariants(extents): raises StateError as store.check_invariants. */
PyObject *Engine_check_pages(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    PyObject *list;
    READY(e);
    if (!PyArg_ParseTuple(args, "O", &list))
        return NULL;
    size_t next = 0;
    uint64_t *ext = parse_extents(e, list, &next);
    if (!ext)
        return NULL;
    char fatal[1024] = "", msg[4096] = "";
    Errs b = {msg, sizeof msg, 0, 0};
    int r;
    NOGIL({
        lock_all(e);
        r = check_all(e, ext, next, &b, fatal, sizeof fatal);
        unlock_all(e);
    });
    PyMem_RawFree(ext);
    if (r < 0) {
        PyErr_SetString(StateError, fatal);
        return NULL;
    }
    if (b.n) {
        PyErr_Format(StateError, "pool invariants broken: %s", msg);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* rebuild_backing(pages, segments) -> bd_count: after rebuild(), the
 * segment table from the backed entries (backing.c's rebuild_segments). */
/* The (pages, segments) extent lists rebuild_backing and check_backing
 * take, parsed: 0, or -1 with the exception set and nothing to free. */
static int parse_backing_args(Engine *e, PyObject *args, uint64_t **px, size_t *npx, uint64_t **sx, size_t *nsx)
{
    PyObject *pl, *sl;
    if (!PyArg_ParseTuple(args, "OO", &pl, &sl))
        return -1;
    *npx = *nsx = 0;
    *px = parse_extents(e, pl, npx);
    if (!*px)
        return -1;
    *sx = parse_extents_of(sl, nsx, MAX_SEGMENTS, "the segment table");
    if (!*sx) {
        PyMem_RawFree(*px);
        return -1;
    }
    return 0;
}

PyObject *Engine_rebuild_backing(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    READY(e);
    size_t npx, nsx;
    uint64_t *px, *sx;
    if (parse_backing_args(e, args, &px, &npx, &sx, &nsx) < 0)
        return NULL;
    char err[1024] = "";
    unsigned long long count = 0;
    int r;
    NOGIL({
        lock_all(e);
        r = rebuild_segments(e, px, npx, sx, nsx, &count, err, sizeof err);
        if (r == 0)
            STORE(e->bd_count, count);
        unlock_all(e);
    });
    PyMem_RawFree(px);
    PyMem_RawFree(sx);
    if (r < 0) {
        PyErr_SetString(StateError, err);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(count);
}

PyObject *Engine_check_backing(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    READY(e);
    size_t npx, nsx;
    uint64_t *px, *sx;
    if (parse_backing_args(e, args, &px, &npx, &sx, &nsx) < 0)
        return NULL;
    char err[4096] = "";
    int r;
    NOGIL({
        lock_all(e);
        r = check_segments(e, px, npx, sx, nsx, err, sizeof err);
        unlock_all(e);
    });
    PyMem_RawFree(px);
    PyMem_RawFree(sx);
    if (r < 0) {
        PyErr_SetString(StateError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}
