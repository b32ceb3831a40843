/* The page level (engine.py's PythonEngine is the reference): a page's
 * store, load and discard, and the byte ranges the store and the FUSE
 * threads call.  Each page is changed under its entry lock bit (engine.h),
 * compressed or decompressed with no pool lock held, and switched in the
 * crash order: new object complete, then the page-table entry (one 8-byte
 * store), then the old object freed, after the entry bit is dropped.
 *
 * Locks: *_locked functions expect the page's entry bit held; the range
 * functions take the entry bits, and through pool.c the class and pool
 * locks.  No function here takes the GIL or allocates.
 */
#include "codec.h"

#include <string.h>

/* A dictionary slot's count of naming entries, one less.  A release: the
 * dictionary's last readers (under this page's entry lock, which the
 * caller took after them) happen before tier.c's dict_drop, whose acquire
 * load sees the count reach 0, frees the DDict (tier.c, "readers"). */
static inline void unref_dict(Engine *e, unsigned tier)
{
    __atomic_sub_fetch(&e->dict_refs[tier], 1, __ATOMIC_RELEASE);
}

/* Free what an entry named; the entry no longer names it (crash rules 1, 2). */
static void release(Engine *e, uint64_t entry)
{
    unsigned kind = entry_kind(entry);
    if (!kind)
        return;
    uint32_t h = entry_handle(entry);
    SUB(e->pages_stored, 1);
    unsigned tier = entry_tier(entry);
    if (entry_backed(entry)) {
        backing_release(e, entry); /* dead bytes in its segment, for cleaning */
        if (tier && tier <= DICT_SLOTS)
            unref_dict(e, tier);
        return;
    }
    if (kind == KIND_SAME) {
        pool_lock(e);
        drop_handle(e, h);
        pool_unlock(e);
        SUB(e->same_pages, 1);
    } else {
        obj_free(e, h, entry_len(entry));
        if (kind == KIND_HUGE)
            SUB(e->huge_pages, 1);
        if (tier && tier <= DICT_SLOTS)
            unref_dict(e, tier); /* after the entry stopped naming it (tier.c) */
    }
}

static void note_used(Engine *e)
{
    unsigned long long used = (unsigned long long)__atomic_load_n(&e->frames_used, __ATOMIC_RELAXED) * FRAME_SIZE;
    unsigned long long max = __atomic_load_n(&e->mem_used_max, __ATOMIC_RELAXED);
    while (used > max &&
           !__atomic_compare_exchange_n(&e->mem_used_max, &max, used, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* Byte `at` of a range with `left` bytes to go: its page (returned), its
 * offset in that page, and how many of the bytes fall in that page. */
static inline uint64_t span(uint64_t at, uint64_t left, uint32_t *within, uint64_t *take)
{
    *within = (uint32_t)(at % PAGE_SIZE);
    *take = PAGE_SIZE - *within < left ? PAGE_SIZE - *within : left;
    return at / PAGE_SIZE;
}

/* The page a write stopped at, encoded, for the write to go on with once
 * the policy has decided (Stopped, codec.h). */
static void keep_stopped(Engine *e, Ctx *t, uint64_t idx, const uint8_t *page, unsigned kind, unsigned algo,
                         const uint8_t *payload, uint32_t len, uint64_t word)
{
    Stopped *st = &t->stopped;
    memcpy(st->page, page, PAGE_SIZE);
    if (kind == KIND_COMPRESSED && payload != st->payload)
        memcpy(st->payload, payload, len);
    st->idx = idx;
    st->kind = kind;
    st->algo = algo;
    st->len = len;
    st->word = word;
    st->e = e;
}

/* With page idx's entry lock held: encode (no pool lock), allocate (class and
 * pool locks), switch the entry.  *old gets the entry replaced, to release
 * once the entry lock is dropped.  A page refused or without room is kept
 * encoded in the thread's context: the write goes on with it, not with a
 * second compression, if the policy lets it. */
static int store_page_locked(Engine *e, Ctx *t, uint64_t idx, const uint8_t *page, int refuse, uint64_t *old)
{
    const uint8_t *payload;
    uint32_t len = 0;
    uint64_t word = 0;
    unsigned algo, kind;
    Stopped *stopped = &t->stopped;
    *old = 0;
    if (stopped->e == e && stopped->idx == idx && !memcmp(stopped->page, page, PAGE_SIZE)) {
        kind = stopped->kind; /* the page this write stopped at, the same bytes */
        algo = stopped->algo;
        len = stopped->len;
        word = stopped->word;
        payload = kind == KIND_HUGE ? page : stopped->payload;
    } else {
        algo = (unsigned)__atomic_load_n(&e->algo, __ATOMIC_RELAXED);
        kind = encode(e, t, algo, page, &payload, &len, &word);
    }
    stopped->e = NULL;
    if (refuse && kind != KIND_SAME) {
        keep_stopped(e, t, idx, page, kind, algo, payload, len, word);
        return ST_REFUSED;
    }
    /* Allocate before freeing the old object: a failed store keeps the page. */
    uint32_t h;
    uint64_t entry;
    if (kind == KIND_SAME) {
        pool_lock(e);
        h = new_handle(e, word);
        pool_unlock(e);
        entry = make_entry(h, kind, 0, 0);
    } else {
        h = obj_store(e, payload, len);
        entry = make_entry(h, kind, kind == KIND_COMPRESSED ? algo : 0, len);
    }
    if (!h) {
        keep_stopped(e, t, idx, page, kind, algo, payload, len, word);
        return ST_NOROOM;
    }
    CHECK(idx < e->npages);
    *old = e->page[idx];
    entry = entry_with_idle(entry, LOAD(e->now_tick)); /* a write is an access */
    __atomic_store_n(&e->page[idx], entry, __ATOMIC_RELEASE); /* the switch */
    if (kind == KIND_SAME)
        ADD(e->same_pages, 1);
    else if (kind == KIND_HUGE)
        ADD(e->huge_pages, 1);
    ADD(e->pages_stored, 1);
    return ST_OK;
}

/* With page idx's entry lock held: a read is an access.  The entry is
 * stored again only when the tick moved on: one 8-byte store naming the
 * same object (crash-safe), about once a minute per page read. */
static inline void stamp_locked(Engine *e, uint64_t idx, uint64_t entry)
{
    unsigned now = LOAD(e->now_tick);
    if (entry_idle(entry) != (now & ENTRY_IDLE_MASK))
        __atomic_store_n(&e->page[idx], entry_with_idle(entry, now), __ATOMIC_RELEASE);
}

/* With page idx's entry lock held: its bytes into dst (4096). */
static int load_page_locked(Engine *e, Ctx *t, uint64_t idx, uint8_t *dst)
{
    CHECK(idx < e->npages);
    uint64_t entry = __atomic_load_n(&e->page[idx], __ATOMIC_ACQUIRE);
    unsigned kind = entry_kind(entry);
    if (!kind) {
        memset(dst, 0, PAGE_SIZE);
        return ST_OK;
    }
    stamp_locked(e, idx, entry);
    uint32_t h = entry_handle(entry);
    if (entry_backed(entry)) {
        /* Under the entry bit nothing can move the object (cleaning
         * switches entries under it), so one read is enough. */
        const uint8_t *payload;
        int st = backing_load(e, t, idx, entry, &payload);
        if (st != ST_OK)
            return st;
        if (kind == KIND_HUGE) {
            memcpy(dst, payload, PAGE_SIZE);
            return ST_OK;
        }
        if (decompress(e, t, entry_algo(entry), entry_tier(entry), payload, entry_len(entry), dst) != 0) {
            ADD(e->failed_reads, 1);
            return ST_CORRUPT;
        }
        return ST_OK;
    }
    CHECK(h <= e->max_handles);
    if (kind == KIND_SAME) {
        uint64_t w = e->handle[h];
        for (unsigned i = 0; i < PAGE_SIZE; i += 8)
            memcpy(dst + i, &w, 8);
        return ST_OK;
    }
    uint32_t n = entry_len(entry);
    if (kind == KIND_HUGE) {
        obj_copy(e, h, PAGE_SIZE, dst);
        return ST_OK;
    }
    obj_copy(e, h, n, t->obuf);
    if (decompress(e, t, entry_algo(entry), entry_tier(entry), t->obuf, n, dst) != 0) {
        ADD(e->failed_reads, 1);
        return ST_CORRUPT;
    }
    return ST_OK;
}

/* Write len bytes at offset; stops at the first page that is refused or finds
 * no room, with *done = bytes written before it.  Each page is updated under
 * its entry lock (a partial page's read, modify and write too), so two
 * threads never update one page at once; its old object is freed after. */
static int write_range(Engine *e, uint64_t offset, const uint8_t *data, uint64_t len, int refuse, uint64_t *done)
{
    Ctx *t = ctx_get(e);
    uint64_t pos = 0;
    int st = ST_OK;
    if (!t) {
        *done = 0;
        return ST_NOMEM;
    }
    while (pos < len) {
        uint32_t within;
        uint64_t take, idx = span(offset + pos, len - pos, &within, &take);
        uint64_t old = 0;
        entry_lock(e, idx);
        if (take == PAGE_SIZE) {
            st = store_page_locked(e, t, idx, data + pos, refuse, &old);
        } else {
            st = load_page_locked(e, t, idx, t->pbuf);
            if (st == ST_OK) {
                memcpy(t->pbuf + within, data + pos, take);
                st = store_page_locked(e, t, idx, t->pbuf, refuse, &old);
            }
        }
        entry_unlock(e, idx);
        if (entry_kind(old))
            release(e, old);
        if (st != ST_OK)
            break;
        note_used(e);
        pos += take;
    }
    *done = pos;
    if (trim(e) < 0 && st == ST_OK)
        st = ST_PUNCH;
    return st;
}

int write_request(Engine *e, uint64_t offset, const uint8_t *data, uint64_t len, const Policy *policy, uint64_t *done)
{
    uint64_t pos = 0;
    int retried = 0, st;
    ADD(e->num_writes, 1);
    for (;;) {
        uint64_t step = 0;
        st = write_range(e, offset + pos, data + pos, len - pos, __atomic_load_n(&e->full, __ATOMIC_RELAXED), &step);
        if (step)
            retried = 0; /* a new page stops, if one does */
        pos += step;
        if (st != ST_REFUSED && st != ST_NOROOM)
            break;
        int go = policy ? policy->decide(policy->arg, st, retried) : 0;
        if (go < 0)
            st = ST_POLICY;
        if (go <= 0)
            break;
        retried |= st == ST_NOROOM;
    }
    *done = pos;
    return st;
}

/* A backed page: its blocks read from the file with no lock held (this
 * thread's buffer, O_DIRECT), then the entry checked again under its bit
 * and the object decompressed there, as a dictionary's object is (the slot
 * stays installed while the entry names it).  Cleaning may have moved the
 * object (and punched the old copy) meanwhile: then the entry's location
 * has changed and the page is read again from where it is now.  An entry
 * that names the same object means the copy read was the page's, since a
 * segment is punched only after every entry into it switched away and is
 * reused only after that; the object's header, which names the page and
 * the length, is checked too (backing_load). */
static int read_backed(Engine *e, Ctx *t, uint64_t idx, uint64_t entry, uint8_t *dst)
{
    for (;;) {
        const uint8_t *payload;
        int st = backing_load(e, t, idx, entry, &payload);
        entry_lock(e, idx);
        uint64_t now = e->page[idx];
        if ((now ^ entry) & ENTRY_CONTENT_MASK) {
            if (!entry_backed(now)) { /* back in the pool, rewritten or discarded */
                st = load_page_locked(e, t, idx, dst);
                entry_unlock(e, idx);
                return st;
            }
            entry_unlock(e, idx);
            entry = now; /* moved by cleaning: read it where it is */
            continue;
        }
        if (st == ST_OK) {
            stamp_locked(e, idx, now);
            if (entry_kind(entry) == KIND_HUGE)
                memcpy(dst, payload, PAGE_SIZE);
            else if (decompress(e, t, entry_algo(entry), entry_tier(entry), payload, entry_len(entry), dst) != 0) {
                ADD(e->failed_reads, 1);
                st = ST_CORRUPT;
            }
        }
        entry_unlock(e, idx);
        return st;
    }
}

/* Each page's object is copied out under its entry lock, then decompressed
 * with no lock held; a backed one is read from the file with none held. */
int read_range(Engine *e, uint64_t offset, uint8_t *out, uint64_t len)
{
    ADD(e->num_reads, 1);
    Ctx *t = ctx_get(e);
    if (!t)
        return ST_NOMEM;
    uint64_t pos = 0;
    while (pos < len) {
        uint32_t within;
        uint64_t take, idx = span(offset + pos, len - pos, &within, &take);
        uint8_t *dst = take == PAGE_SIZE ? out + pos : t->pbuf;
        int st = ST_OK;
        entry_lock(e, idx);
        uint64_t entry = e->page[idx];
        unsigned tier = entry_tier(entry);
        if (entry_backed(entry)) {
            entry_unlock(e, idx);
            st = read_backed(e, t, idx, entry, dst);
        } else if (entry_kind(entry) == KIND_COMPRESSED && (!tier || tier == TIER_PLAIN)) {
            uint32_t n = entry_len(entry);
            obj_copy(e, entry_handle(entry), n, t->obuf);
            stamp_locked(e, idx, entry);
            entry_unlock(e, idx);
            if (decompress(e, t, entry_algo(entry), entry_tier(entry), t->obuf, n, dst) != 0) {
                ADD(e->failed_reads, 1);
                st = ST_CORRUPT;
            }
        } else {
            /* A dictionary's object is decompressed under the entry lock:
             * while the entry names the slot, the slot stays installed
             * (tier.c drops only a slot no entry names). */
            st = load_page_locked(e, t, idx, dst);
            entry_unlock(e, idx);
        }
        if (st != ST_OK)
            return st;
        if (dst == t->pbuf)
            memcpy(out + pos, t->pbuf + within, take);
        pos += take;
    }
    return ST_OK;
}

/* Free pages first..end-1: each entry zeroed under its lock, then its object
 * freed.  Returns the pages freed. */
unsigned long long discard_range(Engine *e, uint64_t first, uint64_t end)
{
    unsigned long long freed = 0;
    for (uint64_t idx = first; idx < end; idx++) {
        if (!entry_kind(__atomic_load_n(&e->page[idx], __ATOMIC_RELAXED)))
            continue; /* empty: nothing to lock for */
        entry_lock(e, idx);
        uint64_t old = e->page[idx];
        if (entry_kind(old))
            __atomic_store_n(&e->page[idx], 0, __ATOMIC_RELEASE);
        entry_unlock(e, idx);
        if (entry_kind(old)) {
            release(e, old);
            freed++;
        }
    }
    ADD(e->notify_free, freed);
    return freed;
}

