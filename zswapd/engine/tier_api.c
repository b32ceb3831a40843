/* The recompression tier's Python face: Engine.recompress_step, the
 * census the stats read, and recompress_page(), the secondary codec alone
 * (what the differential tests hand the Python engine, so both engines
 * store the same bytes: python-zstandard bundles its own libzstd, which may
 * compress a page to other bytes than the system's).  Each call releases
 * the GIL around the engine's work (module.h). */
#include "module.h"

#include <string.h>

#include "tier.h"

/* recompress_step(first, end, min_len, max_len, idle_ticks, threshold, level, max_pages)
 *   -> (next page, pages recompressed, bytes saved, candidates compressed, status) */
PyObject *Engine_recompress_step(EngineObject *self, PyObject *args)
{
    Engine *e = &self->e;
    unsigned long long first, end, max_pages;
    unsigned int min_len, max_len, idle_ticks, threshold;
    int level;
    READY(e);
    if (!PyArg_ParseTuple(args, "KKIIIIiK", &first, &end, &min_len, &max_len, &idle_ticks, &threshold, &level,
                          &max_pages))
        return NULL;
    if (level < 1 || level > ZSTD_maxCLevel()) {
        PyErr_Format(PyExc_ValueError, "zstd level %d is outside 1..%d", level, ZSTD_maxCLevel());
        return NULL;
    }
    TierStep p = {idle_ticks, min_len, max_len, threshold, level, max_pages};
    TierDone d = {0, 0, 0};
    uint64_t cursor = first;
    int st;
    NOGIL(st = recompress_step(e, &cursor, end, &p, &d));
    if (st != ST_OK && st != ST_NOROOM)
        return raise_status(e, st);
    return Py_BuildValue("KKKKi", (unsigned long long)cursor, d.pages, d.saved, d.looked, st);
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

/* recompress_page(page, level, room) -> bytes, or None if it does not fit
 * in room bytes: what recompress_step stores for the page. */
PyObject *tier_recompress_page(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer page;
    int level;
    unsigned int room;
    if (!PyArg_ParseTuple(args, "y*iI", &page, &level, &room))
        return NULL;
    PyObject *out = NULL;
    if (page.len != PAGE_SIZE || room > FRAME_SIZE) {
        PyErr_Format(PyExc_ValueError, "recompress_page takes a %u-byte page and room up to %u", PAGE_SIZE, FRAME_SIZE);
    } else {
        Ctx *t = ctx_get(NULL);
        uint32_t n = t ? recompress_page(t, level, page.buf, room) : 0;
        if (!t)
            PyErr_NoMemory();
        else if (n)
            out = PyBytes_FromStringAndSize((const char *)t->rbuf, n);
        else
            out = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&page);
    return out;
}
