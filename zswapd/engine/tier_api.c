/* The recompression tier's Python face: Engine.recompress_step, the
 * census the stats read, and recompress_page(), the secondary codec alone
 * (what the differential tests hand the Python engine, so both engines
 * store the same bytes: python-zstandard bundles its own libzstd, which may
 * compress a page to other bytes than the system's).  Each call releases
 * the GIL around the engine's work (module.h). */
#include "module.h"

#include <string.h>

#include "tier.h"

/* recompress_step(first, end, min_len, max_len, idle_ticks, threshold, level, max_pages, slot, over)
 *   -> (next page, pages recompressed, bytes saved, candidates compressed, status,
 *       probes, probe bytes without the dictionary, probe bytes with it) */
PyObject *Engine_recompress_step(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long first, end, max_pages;
    unsigned int min_len, max_len, idle_ticks, threshold, slot = 0, over = 0;
    int level;
    READY(e);
    if (!PyArg_ParseTuple(args, "KKIIIIiK|II", &first, &end, &min_len, &max_len, &idle_ticks, &threshold, &level,
                          &max_pages, &slot, &over))
        return NULL;
    if (over > MOVE_RESERVE) {
        PyErr_Format(PyExc_ValueError, "a step may take at most %u frames past the limit, not %u", MOVE_RESERVE, over);
        return NULL;
    }
    if (level < 1 || level > ZSTD_maxCLevel()) {
        PyErr_Format(PyExc_ValueError, "zstd level %d is outside 1..%d", level, ZSTD_maxCLevel());
        return NULL;
    }
    TierStep p = {idle_ticks, min_len, max_len, threshold, level, max_pages, slot, over};
    TierDone d = {0, 0, 0, 0, 0, 0};
    uint64_t cursor = first;
    int st;
    NOGIL(st = recompress_step(e, &cursor, end, &p, &d));
    if (st == ST_NODICT) {
        PyErr_Format(PyExc_ValueError, "dictionary slot %u holds no dictionary", slot);
        return NULL;
    }
    if (st != ST_OK && st != ST_NOROOM)
        return raise_status(e, st);
    return Py_BuildValue("KKKKiKKK", (unsigned long long)cursor, d.pages, d.saved, d.looked, st, d.probes,
                         d.probe_plain, d.probe_dict);
}

/* add_dictionary(bytes) -> (slot, id) */
PyObject *Engine_add_dictionary(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    Py_buffer b;
    READY(e);
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    unsigned slot = 0;
    uint32_t id = 0;
    int r = -1;
    if (b.len > 0 && b.len <= DICT_MAX_BYTES)
        NOGIL(r = dict_install(e, b.buf, (uint32_t)b.len, &slot, &id));
    PyBuffer_Release(&b);
    if (r == -2) {
        PyErr_Format(PyExc_ValueError, "every dictionary slot (%u) is in use", DICT_SLOTS);
        return NULL;
    }
    if (r < 0) {
        PyErr_Format(PyExc_ValueError, "a dictionary must be 1..%u bytes that zstd accepts", DICT_MAX_BYTES);
        return NULL;
    }
    return Py_BuildValue("II", slot, id);
}

/* drop_dictionary(slot): only a slot no entry names */
PyObject *Engine_drop_dictionary(EngineObject *self, PyObject *arg)
{
    Engine *e = &self->e;
    READY(e);
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    int r = slot < 1 || slot > (long)DICT_SLOTS ? -1 : dict_drop(e, (unsigned)slot);
    if (r == -2) {
        PyErr_Format(PyExc_ValueError, "dictionary slot %ld is still named by %llu pages", slot,
                     (unsigned long long)LOAD(e->dict_refs[slot]));
        return NULL;
    }
    if (r < 0) {
        PyErr_Format(PyExc_ValueError, "dictionary slot %ld holds no dictionary", slot);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* broken_dictionaries() -> [slot]: installed slots zstd refused at the
 * last rebuild (tier.h: their pages do not read, nothing else is touched) */
PyObject *Engine_broken_dictionaries(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    READY(e);
    PyObject *out = PyList_New(0);
    for (unsigned s = 1; out && s <= DICT_SLOTS; s++) {
        if (!dict_broken(e, s))
            continue;
        PyObject *v = PyLong_FromUnsignedLong(s);
        if (!v || PyList_Append(out, v) < 0)
            Py_CLEAR(out);
        Py_XDECREF(v);
    }
    return out;
}

/* sample(first, end, idle_ticks, stride, max) -> (pages, next): idle pages
 * stored by a write, decompressed, concatenated. */
PyObject *Engine_sample(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long first, end, stride, max;
    unsigned int idle_ticks;
    READY(e);
    if (!PyArg_ParseTuple(args, "KKIKK", &first, &end, &idle_ticks, &stride, &max))
        return NULL;
    if (!stride || max > (1ull << 20)) {
        PyErr_SetString(PyExc_ValueError, "sample: stride must be >= 1 and max at most 2^20 pages");
        return NULL;
    }
    /* Filled in place and cut to what was found: the samples (16 MiB for
     * a training) are never held twice. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(max * PAGE_SIZE));
    if (!out)
        return NULL;
    uint8_t *buf = (uint8_t *)PyBytes_AS_STRING(out);
    uint64_t cursor = first;
    size_t got;
    NOGIL(got = sample_idle(e, &cursor, end, idle_ticks, stride, buf, max));
    if (_PyBytes_Resize(&out, (Py_ssize_t)(got * PAGE_SIZE)) < 0)
        return NULL;
    return Py_BuildValue("NK", out, (unsigned long long)cursor);
}

/* dictionaries() -> [(slot, id, bytes, refs)] of the installed slots */
PyObject *Engine_dictionaries(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    READY(e);
    PyObject *out = PyList_New(0);
    for (unsigned s = 1; out && s <= DICT_SLOTS; s++) {
        uint64_t head = LOAD(e->dict_head[s]);
        if (!head)
            continue;
        PyObject *t = Py_BuildValue("IkkK", s, (unsigned long)(head >> 32), (unsigned long)(uint32_t)head,
                                    (unsigned long long)LOAD(e->dict_refs[s]));
        if (!t || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    return out;
}

/* census() -> (ages, pages, bytes): stored pages by idle age in ticks
 * (IDLE_MASK + 1 counts), and pages and payload bytes by codec, indexed
 * kind * 32 + algo * 8 + tier.  One pass over the page table, no lock: a
 * figure for stats, as stale as the moment it is read. */
PyObject *Engine_census(EngineObject *self, PyObject *Py_UNUSED(a))
{
    Engine *e = &self->e;
    READY(e);
    enum { AGES = ENTRY_IDLE_MASK + 1, CODECS = 4 * 32 };
    unsigned long long *ages = PyMem_RawCalloc(AGES + 2 * CODECS, sizeof *ages);
    if (!ages)
        return PyErr_NoMemory();
    unsigned long long *pages = ages + AGES, *bytes = pages + CODECS;
    NOGIL({
        unsigned now = LOAD(e->now_tick);
        for (uint64_t idx = 0; idx < e->npages; idx++) {
            uint64_t entry = __atomic_load_n(&e->page[idx], __ATOMIC_RELAXED);
            unsigned kind = entry_kind(entry);
            if (!kind)
                continue;
            ages[entry_age(entry, now)]++;
            unsigned c = kind * 32 + entry_algo(entry) * 8 + entry_tier(entry);
            pages[c]++;
            bytes[c] += kind == KIND_SAME ? 0 : entry_len(entry);
        }
    });
    PyObject *out = Py_BuildValue("NNN", u64_list(ages, AGES), u64_list(pages, CODECS), u64_list(bytes, CODECS));
    PyMem_RawFree(ages);
    return out;
}

/* recompress_page(page, level, room, dictionary=None) -> bytes, or None if
 * it does not fit in room bytes: what recompress_step stores for the page.
 * A dictionary is digested per call: for tests, not for a hot loop. */
PyObject *tier_recompress_page(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer page, dict = {0};
    int level;
    unsigned int room;
    if (!PyArg_ParseTuple(args, "y*iI|z*", &page, &level, &room, &dict))
        return NULL;
    PyObject *out = NULL;
    if (page.len != PAGE_SIZE || room > FRAME_SIZE) {
        PyErr_Format(PyExc_ValueError, "recompress_page takes a %u-byte page and room up to %u", PAGE_SIZE, FRAME_SIZE);
    } else {
        Ctx *t = ctx_get(NULL);
        ZSTD_CDict *cd = dict.buf ? ZSTD_createCDict(dict.buf, (size_t)dict.len, level) : NULL;
        uint32_t n = t && (cd || !dict.buf) ? recompress_page(t, level, cd, page.buf, room) : 0;
        if (!t || (dict.buf && !cd))
            PyErr_NoMemory();
        else if (n)
            out = PyBytes_FromStringAndSize((const char *)t->rbuf, n);
        else
            out = Py_NewRef(Py_None);
        ZSTD_freeCDict(cd);
    }
    PyBuffer_Release(&page);
    if (dict.buf)
        PyBuffer_Release(&dict);
    return out;
}

/* train_dictionary(samples, size) -> bytes: ZDICT_trainFromBuffer over the
 * 4096-byte pages of samples; ValueError if zstd cannot train on them. */
PyObject *tier_train_dictionary(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer samples;
    unsigned int size;
    if (!PyArg_ParseTuple(args, "y*I", &samples, &size))
        return NULL;
    PyObject *out = NULL;
    size_t n = (size_t)samples.len / PAGE_SIZE;
    uint8_t *buf = size && size <= DICT_MAX_BYTES ? PyMem_RawMalloc(size) : NULL;
    if (!buf) {
        PyErr_Format(PyExc_ValueError, "dictionary size must be 1..%u bytes", DICT_MAX_BYTES);
    } else {
        size_t got;
        NOGIL(got = dict_train(buf, size, samples.buf, n));
        if (got)
            out = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)got);
        else
            PyErr_Format(PyExc_ValueError, "zstd could not train a %u-byte dictionary on %zu pages", size, n);
    }
    PyMem_RawFree(buf);
    PyBuffer_Release(&samples);
    return out;
}
