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
 *   4. under the entry lock: if the entry is unchanged and still names the
 *      bytes copied in 1 (an equal entry may name a new object: see
 *      switch_if_same_object), the switch (one 8-byte store: tier,
 *      algorithm, length, handle; the idle stamp kept); if it changed (a
 *      write, a read restamping it, a discard), the new object is freed
 *      instead: it was never named;
 *   5. the old object freed, after the entry lock is dropped.
 * A crash before 4 leaves an unnamed new object (the rebuild frees it);
 * after it, an unnamed old one.  A page kept as it was gets the tried bit,
 * by the same unchanged-entry test.  Lock order as everywhere: the entry
 * bit alone, or the class and pool locks alone, never the bit around them
 * here (obj_copy takes the class lock inside the bit, as the read path).
 *
 * Dictionaries (the state's dict_head/dict_bytes tables; dict_refs counts
 * the entries naming each slot):
 *   install: the bytes into a free slot, the DDict made, then the head
 *            (id << 32 | length, one 8-byte store): complete or absent.
 *   use:     an entry names a slot only after dict_refs counts it (the
 *            count first, then the switch); release() (page.c) counts it
 *            off after the entry stopped naming it.  So refs >= the entries
 *            naming a slot, at every moment.
 *   drop:    only at refs 0: the head zeroed first, then the DDict freed.
 *            A reader decompresses a dictionary's object under its page's
 *            entry lock (page.c), so no reader holds a DDict nobody names.
 * install, drop and the step run on one thread at a time (the store's tier
 * lock): refs of a slot rise only there, so refs 0 seen there stays 0.
 *
 * Readers and the free (the one-off ThreadSanitizer report in
 * ZSTD_freeDDict, examined): a reader loads ddict[slot] and decompresses
 * under the entry lock of a page naming the slot, so while it does, the
 * entry cannot change and refs stays >= 1: drop cannot free that DDict,
 * and no takeover replaces one under it (dict_load_all runs only in the
 * rebuild, before any thread serves).  What was missing was the ordering,
 * not the exclusion: the chain reader's unlock -> writer's lock -> the
 * writer's refs decrement (release(), page.c) -> drop's load of 0 -> free
 * had two relaxed links, so the reader's accesses to the DDict were not
 * ordered before the free in the C11 model (benign on x86, a data race all
 * the same, which TSan reports when no GIL handoff happens to order them).
 * The decrement is a release and drop's load an acquire (a release
 * sequence: every earlier decrement is covered by the last one's).  The
 * count's increment in the step needs no order: drop runs on that thread.
 * tests/test_engine.py's test_native_dictionary_dropped_while_readers_...
 * runs that loop under TSan: 2-3 reports in 30 s before, none after.
 *
 * No allocation but the calling thread's Ctx (its secondary zstd context is
 * made on first use) and the dictionaries' digested forms, which is why no
 * serving thread calls this.
 */
#include "tier.h"

#include <string.h>
#include <zdict.h>

/* ---- dictionaries ------------------------------------------------------- */

static inline uint8_t *dict_at(Engine *e, unsigned slot)
{
    return e->dict_bytes + (size_t)(slot - 1) * DICT_MAX_BYTES;
}

static void free_cdict(Engine *e)
{
    ZSTD_freeCDict(e->cdict);
    e->cdict = NULL;
    e->cdict_slot = 0;
}

int dict_install(Engine *e, const uint8_t *bytes, uint32_t n, unsigned *slot, uint32_t *id)
{
    if (!n || n > DICT_MAX_BYTES)
        return -1;
    unsigned s = 0;
    uint32_t top = 0;
    for (unsigned i = DICT_SLOTS; i >= 1; i--) {
        uint64_t head = LOAD(e->dict_head[i]);
        if (!head)
            s = i; /* the lowest free slot */
        else if ((uint32_t)(head >> 32) > top)
            top = (uint32_t)(head >> 32);
    }
    if (!s)
        return -2;
    ZSTD_DDict *dd = ZSTD_createDDict(bytes, n);
    if (!dd)
        return -1;
    memcpy(dict_at(e, s), bytes, n);
    ZSTD_freeDDict(__atomic_exchange_n(&e->ddict[s], dd, __ATOMIC_ACQ_REL)); /* none: the slot was free */
    STORE(e->dict_refs[s], 0);
    __atomic_store_n(&e->dict_head[s], (uint64_t)(top + 1) << 32 | n, __ATOMIC_RELEASE); /* last */
    *slot = s;
    *id = top + 1;
    return 0;
}

int dict_drop(Engine *e, unsigned slot)
{
    if (!slot || slot > DICT_SLOTS || !LOAD(e->dict_head[slot]))
        return -1;
    if (__atomic_load_n(&e->dict_refs[slot], __ATOMIC_ACQUIRE)) /* pairs with page.c's unref_dict */
        return -2;
    __atomic_store_n(&e->dict_head[slot], 0, __ATOMIC_RELEASE); /* first */
    if (e->cdict_slot == slot)
        free_cdict(e);
    ZSTD_freeDDict(__atomic_exchange_n(&e->ddict[slot], NULL, __ATOMIC_ACQ_REL));
    return 0;
}

int dict_load_all(Engine *e)
{
    free_cdict(e);
    int r = 0;
    for (unsigned s = 1; s <= DICT_SLOTS; s++) {
        uint64_t head = LOAD(e->dict_head[s]);
        uint32_t n = (uint32_t)head;
        ZSTD_DDict *dd = head ? ZSTD_createDDict(dict_at(e, s), n) : NULL;
        if (head && !dd)
            r = -1;
        ZSTD_freeDDict(__atomic_exchange_n(&e->ddict[s], dd, __ATOMIC_ACQ_REL));
    }
    return r;
}

void dict_free_all(Engine *e)
{
    free_cdict(e);
    for (unsigned s = 1; s <= DICT_SLOTS; s++)
        ZSTD_freeDDict(__atomic_exchange_n(&e->ddict[s], NULL, __ATOMIC_ACQ_REL));
}

/* The CDict of (slot, level), made when either changes. */
static const ZSTD_CDict *cdict_for(Engine *e, unsigned slot, int level)
{
    if (e->cdict && e->cdict_slot == slot && e->cdict_level == level)
        return e->cdict;
    free_cdict(e);
    uint64_t head = LOAD(e->dict_head[slot]);
    if (!head)
        return NULL;
    e->cdict = ZSTD_createCDict(dict_at(e, slot), (uint32_t)head, level);
    if (e->cdict) {
        e->cdict_slot = slot;
        e->cdict_level = level;
    }
    return e->cdict;
}

size_t dict_train(uint8_t *out, size_t cap, const uint8_t *samples, size_t nsamples)
{
    size_t *sizes = malloc(nsamples * sizeof *sizes);
    if (!sizes)
        return 0;
    for (size_t i = 0; i < nsamples; i++)
        sizes[i] = PAGE_SIZE;
    size_t r = ZDICT_trainFromBuffer(out, cap, samples, sizes, (unsigned)nsamples);
    free(sizes);
    return ZDICT_isError(r) ? 0 : r;
}

size_t sample_idle(Engine *e, uint64_t *cursor, uint64_t end, unsigned idle_ticks, uint64_t stride, uint8_t *out,
                   size_t max)
{
    Ctx *t = ctx_get(e);
    if (!t)
        return 0;
    unsigned now = LOAD(e->now_tick) & ENTRY_IDLE_MASK;
    size_t got = 0;
    uint64_t idx = *cursor;
    if (end > e->npages)
        end = e->npages;
    for (; idx < end && got < max; idx += stride) {
        uint64_t entry = __atomic_load_n(&e->page[idx], __ATOMIC_ACQUIRE);
        unsigned tier = entry_tier(entry);
        /* as a write stored it, or recompressed without a dictionary:
         * decompressed with no lock held, which a dictionary's object may
         * not be (its slot could be dropped meanwhile); a backed page's
         * object is in the file, not the pool */
        if (entry_kind(entry) != KIND_COMPRESSED || (tier && tier != TIER_PLAIN) || entry_backed(entry) ||
            entry_age(entry, now) < idle_ticks)
            continue;
        uint32_t n = entry_len(entry);
        entry_lock(e, idx);
        int same = e->page[idx] == entry;
        if (same)
            obj_copy(e, entry_handle(entry), n, t->obuf);
        entry_unlock(e, idx);
        if (same && decompress(e, t, entry_algo(entry), tier, t->obuf, n, out + got * PAGE_SIZE) == 0)
            got++;
    }
    *cursor = idx;
    return got;
}

/* ---- the step ------------------------------------------------------------- */

/* The object's size class, or one past the last for a huge (raw) page. */
static unsigned class_or_huge(const Engine *e, unsigned kind, uint32_t n)
{
    return kind == KIND_HUGE ? (unsigned)e->ncls : e->class_of[n + HEADER];
}

/* Under the page's entry lock: replace `entry` by `next` if it is still the
 * page's entry.  1 if replaced.  For a change that keeps the object (the
 * idle stamp's clamp); a change made from a copy of the object checks the
 * copy too (switch_if_same_object). */
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

/* As switch_if_unchanged, for a decision made from the copy of the object
 * in t->obuf: the entry must be the same AND still name those bytes.  An
 * equal entry alone can name another object (ABA): two writes of the page
 * while the step compressed, the second given the handle the first freed
 * (the handle stack is LIFO) at the same length and tick, as every huge
 * page has, would let the step put the old contents back over the newest
 * write.  The bytes compared under the entry lock rule that out: equal
 * bytes are the same contents, whoever stored them.  Costs a copy and a
 * compare of the object, small beside the compression.  Uses t->pbuf. */
static int switch_if_same_object(Engine *e, Ctx *t, uint64_t idx, uint64_t entry, uint64_t next)
{
    uint32_t n = entry_len(entry);
    int ok;
    entry_lock(e, idx);
    ok = e->page[idx] == entry;
    if (ok) {
        obj_copy(e, entry_handle(entry), n, t->pbuf);
        ok = memcmp(t->pbuf, t->obuf, n) == 0;
    }
    if (ok)
        __atomic_store_n(&e->page[idx], next, __ATOMIC_RELEASE);
    entry_unlock(e, idx);
    return ok;
}

int tier_candidate(uint64_t entry, unsigned now, const TierStep *p)
{
    unsigned kind = entry_kind(entry);
    if ((kind != KIND_COMPRESSED && kind != KIND_HUGE) || entry_tier(entry) || entry_tried(entry) ||
        entry_backed(entry))
        return 0; /* a backed page's object is in the file (backing.c), not the pool */
    uint32_t n = entry_len(entry);
    return n >= p->min_len && n <= p->max_len && entry_age(entry, now) >= p->idle_ticks;
}

int recompress_step(Engine *e, uint64_t *cursor, uint64_t end, const TierStep *p, TierDone *d)
{
    Ctx *t = ctx_get(e);
    if (!t)
        return ST_NOMEM;
    const ZSTD_CDict *cd = NULL;
    unsigned tier = TIER_PLAIN;
    if (p->slot) {
        if (p->slot > DICT_SLOTS || !LOAD(e->dict_head[p->slot]))
            return ST_NODICT;
        cd = cdict_for(e, p->slot, p->level);
        if (!cd)
            return ST_NOMEM;
        tier = p->slot;
    }
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
        uint32_t plain = 0;
        int probe = cd && d->looked % PROBE_EVERY == 1;
        if (probe) /* the retrain rule's probe, first: both write t->rbuf */
            plain = recompress_page(t, p->level, NULL, page, room);
        uint32_t m = recompress_page(t, p->level, cd, page, room);
        if (probe) {
            d->probes++;
            d->probe_plain += plain ? plain : PAGE_SIZE;
            d->probe_dict += m ? m : PAGE_SIZE;
        }
        if (!m || m + p->threshold > n || e->class_of[m + HEADER] >= class_or_huge(e, kind, n)) {
            /* kept: never tried again until rewritten */
            if (switch_if_same_object(e, t, idx, entry, entry | ENTRY_TRIED))
                ADD(*(m ? &e->recompress_skipped : &e->recompress_incompressible), 1);
            continue;
        }
        uint32_t h2 = obj_store(e, t->rbuf, m);
        if (!h2) {
            st = ST_NOROOM; /* this page again at the next step */
            break;
        }
        uint64_t next = make_entry(h2, KIND_COMPRESSED, ALGO_ZSTD, m) | (uint64_t)tier << ENTRY_TIER_SHIFT;
        next = entry_with_idle(next, entry_idle(entry));
        if (tier != TIER_PLAIN)
            ADD(e->dict_refs[tier], 1); /* counted before the entry names it */
        if (!switch_if_same_object(e, t, idx, entry, next)) {
            if (tier != TIER_PLAIN)
                SUB(e->dict_refs[tier], 1);
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
