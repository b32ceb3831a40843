/* The recompression tier (zram's recompress, as of 6.13): a bounded step
 * that takes idle objects stored by a write (tier 0, not yet tried) and
 * stores them again with the secondary codec, zstd at a higher level.
 * engine.py's PythonEngine.recompress_step is the reference, step for step;
 * the store drives the steps (store.py: which bands of object sizes, the
 * biggest first, and when), off every serving thread.
 *
 * Per page, the crash order of a move (engine.h):
 *   1. under the entry lock: the entry read, the object copied out;
 *   2. no lock: decompressed and compressed again (the expensive part);
 *   3. no entry lock: the new object stored (class, pool locks in pool.c);
 *   4. under the entry lock: if the entry is unchanged, the switch (one
 *      8-byte store: tier, algorithm, length, handle; the idle stamp kept);
 *      if it changed (a write, a read restamping it, a discard), the new
 *      object is freed instead: it was never named;
 *   5. the old object freed, after the entry lock is dropped.
 * A crash before 4 leaves an unnamed new object (the rebuild frees it);
 * after it, an unnamed old one.  A page kept as it was gets the tried bit,
 * by the same unchanged-entry test.  Lock order as everywhere: the entry
 * bit alone, or the class and pool locks alone, never the bit around them
 * here (obj_copy takes the class lock inside the bit, as the read path).
 *
 * No allocation but the calling thread's Ctx (its secondary zstd context is
 * made on first use), which is why no serving thread calls this.
 */
#include "tier.h"

#include <string.h>

/* The object's size class, or one past the last for a huge (raw) page. */
static unsigned class_or_huge(const Engine *e, unsigned kind, uint32_t n)
{
    return kind == KIND_HUGE ? (unsigned)e->ncls : e->class_of[n + HEADER];
}

/* Under the page's entry lock: replace `entry` by `next` if it is still the
 * page's entry.  1 if replaced. */
static int switch_if_unchanged(Engine *e, uint64_t idx, uint64_t entry, uint64_t next)
{
    int ok;
    entry_lock(e, idx);
    ok = e->page[idx] == entry;
    if (ok)
        __atomic_store_n(&e->page[idx], next, __ATOMIC_RELEASE);
    entry_unlock(e, idx);
    return ok;
}

int tier_candidate(uint64_t entry, unsigned now, const TierStep *p)
{
    unsigned kind = entry_kind(entry);
    if ((kind != KIND_COMPRESSED && kind != KIND_HUGE) || entry_tier(entry) || entry_tried(entry))
        return 0;
    uint32_t n = entry_len(entry);
    return n >= p->min_len && n <= p->max_len && entry_age(entry, now) >= p->idle_ticks;
}

int recompress_step(Engine *e, uint64_t *cursor, uint64_t end, const TierStep *p, TierDone *d)
{
    Ctx *t = ctx_get(e);
    if (!t)
        return ST_NOMEM;
    unsigned now = LOAD(e->now_tick) & ENTRY_IDLE_MASK;
    uint32_t room = e->huge_threshold - 1;
    int st = ST_OK;
    uint64_t idx = *cursor;
    if (end > e->npages)
        end = e->npages;
    for (; idx < end && d->looked < p->max_pages; idx++) {
        uint64_t entry = __atomic_load_n(&e->page[idx], __ATOMIC_ACQUIRE);
        if (!entry_kind(entry))
            continue;
        if (entry_age(entry, now) > IDLE_CLAMP) {
            /* older than the stamp can tell for long: clamp (entry.py) */
            uint64_t clamped = entry_with_idle(entry, (now - IDLE_CLAMP) & ENTRY_IDLE_MASK);
            if (switch_if_unchanged(e, idx, entry, clamped))
                entry = clamped;
        }
        if (!tier_candidate(entry, now, p))
            continue;
        d->looked++;
        unsigned kind = entry_kind(entry);
        uint32_t h = entry_handle(entry), n = entry_len(entry);
        entry_lock(e, idx);
        int same = e->page[idx] == entry;
        if (same)
            obj_copy(e, h, n, t->obuf);
        entry_unlock(e, idx);
        if (!same)
            continue;
        const uint8_t *page = t->obuf;
        if (kind == KIND_COMPRESSED) {
            if (decompress(e, t, entry_algo(entry), 0, t->obuf, n, t->pbuf) != 0)
                continue; /* corrupt: a read reports it (failed_reads) */
            page = t->pbuf;
        }
        uint32_t m = recompress_page(t, p->level, page, room);
        if (!m || m + p->threshold > n || e->class_of[m + HEADER] >= class_or_huge(e, kind, n)) {
            /* kept: never tried again until rewritten */
            if (switch_if_unchanged(e, idx, entry, entry | ENTRY_TRIED))
                ADD(*(m ? &e->recompress_skipped : &e->recompress_incompressible), 1);
            continue;
        }
        uint32_t h2 = obj_store(e, t->rbuf, m);
        if (!h2) {
            st = ST_NOROOM; /* this page again at the next step */
            break;
        }
        uint64_t next = make_entry(h2, KIND_COMPRESSED, ALGO_ZSTD, m) | (uint64_t)TIER_PLAIN << ENTRY_TIER_SHIFT;
        next = entry_with_idle(next, entry_idle(entry));
        if (!switch_if_unchanged(e, idx, entry, next)) {
            obj_free(e, h2, m); /* never named */
            continue;
        }
        obj_free(e, h, n);
        if (kind == KIND_HUGE)
            SUB(e->huge_pages, 1);
        ADD(e->recompressed, 1);
        ADD(e->recompress_saved, n - m);
        d->pages++;
        d->saved += n - m;
    }
    *cursor = idx;
    if (trim(e) < 0 && st == ST_OK)
        st = ST_PUNCH;
    return st;
}
