/* The backing file: writeback of pool objects into log-structured segments,
 * cleaning of segments, and reads of backed pages.  zswapd/backing.py is the
 * reference (its glossary and crash order are this file's) and both leave
 * the same page table, segment table and file bytes for the same calls
 * (tests/test_backing.py).
 *
 * What it owns: the Backing struct (process memory: the fd, the open
 * segment's buffer, the segment being cleaned, the steps' pending objects,
 * the candidate clock hand) and the state's segment table.
 *
 * Locks.  The backing lock (Backing.lock) serialises the steps: one
 * writeback or cleaning step runs at a time and only it touches the open
 * segment, the victim and the pending list.  Order: backing lock -> entry
 * bit -> class lock -> pool lock; no I/O is done holding an entry bit, a
 * class lock or the pool lock, except a read-modify-write of a partial
 * backed page (page.c's load_page_locked), which holds that page's bit.
 * Reads of backed pages take no lock of this file (page.c's read_backed
 * re-checks the entry after the read).  The segment table's words are
 * changed by one 8-byte store (a step, holding the backing lock) or an
 * atomic add (the live bytes: any thread releasing a backed entry), so a
 * step's fill or state change never loses a release's subtraction.
 *
 * No allocation on the I/O paths: the two segment buffers are made at
 * attach, each thread's read buffer with its codec context (codec.c).
 * Writes are O_DIRECT of whole blocks from the block-aligned segment
 * buffer; a partial last block is written again, with the same leading
 * bytes, by the next commit.  No fsync: swap lives one boot.
 */
#include "codec.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t page, old, new;
    uint32_t at, nbytes;
    int64_t from_seg; /* cleaning: the segment the object leaves; writeback: -1 */
} Pending;

typedef struct Backing {
    int fd;
    uint32_t nseg;
    uint64_t size;
    pthread_mutex_t lock;
    uint8_t *buf;  /* the open segment as written so far (SEG_SIZE) */
    uint8_t *cbuf; /* the segment being cleaned (SEG_SIZE) */
    int64_t open;  /* -1: none */
    uint32_t pos, flushed;
    uint64_t cursor, scan_left;
    int64_t victim;
    uint32_t cpos, cfill;
    uint32_t used; /* segments not free */
    uint32_t npending;
    Pending pending[MAX_PENDING];
    unsigned long long written; /* atomic: bytes written, ever */
    /* reads of backed pages by latency: bucket i counts those of
     * 2^(i-1) < us <= 2^i microseconds (atomic) */
    unsigned long long lat[LAT_BUCKETS];
    int err;                    /* atomic: errno of the last failed I/O */
} Backing;

int backing_errno(Engine *e) { return e->bk ? LOAD(e->bk->err) : 0; }

static void io_failed(Backing *b, int err) { STORE(b->err, err); }

int backing_attach(Engine *e, int fd, uint64_t size)
{
    if (e->bk)
        return -EBUSY;
    if (size < 2 * SEG_SIZE || size % SEG_BLOCK || size / SEG_SIZE > MAX_SEGMENTS)
        return -EINVAL; /* backing.check_backing_size */
    uint32_t nseg = (uint32_t)(size / SEG_SIZE);
    /* The table must fit the file: a state written with a larger one names
     * segments this file does not have. */
    uint32_t used = 0;
    for (uint64_t s = 0; s < MAX_SEGMENTS; s++) {
        uint64_t w = __atomic_load_n(&e->segment[s], __ATOMIC_RELAXED);
        if (!w)
            continue;
        if (s >= nseg)
            return -EFBIG;
        used += seg_state(w) != SEG_FREE;
    }
    Backing *b = calloc(1, sizeof *b);
    void *p1 = NULL, *p2 = NULL;
    if (!b || posix_memalign(&p1, SEG_BLOCK, SEG_SIZE) || posix_memalign(&p2, SEG_BLOCK, SEG_SIZE)) {
        free(b);
        free(p1);
        free(p2);
        return -ENOMEM;
    }
    b->fd = fd;
    b->nseg = nseg;
    b->size = size;
    b->buf = p1;
    b->cbuf = p2;
    b->open = b->victim = -1;
    b->used = used;
    pthread_mutex_init(&b->lock, NULL);
    __atomic_store_n(&e->bk, b, __ATOMIC_RELEASE);
    return 0;
}

void backing_detach(Engine *e)
{
    Backing *b = e->bk;
    if (!b)
        return;
    e->bk = NULL;
    pthread_mutex_destroy(&b->lock);
    free(b->buf);
    free(b->cbuf);
    free(b);
}

void backing_release(Engine *e, uint64_t entry)
{
    uint32_t loc = entry_loc(entry);
    SUB(e->segment[loc_segment(loc)], obj_span(entry_len(entry)));
    SUB(e->bd_count, 1);
}

static inline uint64_t obj_header(uint64_t page, uint32_t len) { return page << 16 | len; }

int backing_load(Engine *e, Ctx *t, uint64_t idx, uint64_t entry, const uint8_t **payload)
{
    Backing *b = __atomic_load_n(&e->bk, __ATOMIC_ACQUIRE);
    if (!b) {
        STORE(e->punch_errno, ENXIO);
        return ST_IO;
    }
    uint64_t off = (uint64_t)entry_loc(entry) * OBJ_ALIGN;
    uint32_t n = entry_len(entry);
    uint64_t first = off / SEG_BLOCK * SEG_BLOCK;
    uint64_t end = (off + OBJ_HEADER + n + SEG_BLOCK - 1) / SEG_BLOCK * SEG_BLOCK;
    if (end > b->size)
        return ST_CORRUPT;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ssize_t got = pread(b->fd, t->dbuf, (size_t)(end - first), (off_t)first);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (got != (ssize_t)(end - first)) {
        io_failed(b, got < 0 ? errno : EIO);
        return ST_IO;
    }
    long long us = ((long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec) + 999) / 1000;
    unsigned bucket = 0;
    while (bucket + 1 < LAT_BUCKETS && (1LL << bucket) < us)
        bucket++;
    ADD(b->lat[bucket], 1);
    uint64_t hdr;
    memcpy(&hdr, t->dbuf + (off - first), 8);
    if (hdr != obj_header(idx, n)) {
        ADD(e->failed_reads, 1);
        return ST_CORRUPT;
    }
    ADD(e->bd_reads, 1);
    *payload = t->dbuf + (off - first) + OBJ_HEADER;
    return ST_OK;
}

/* ---- the open segment (backing lock held) ---------------------------------- */

/* The next page to write back, or -1 once this step has looked at every
 * page.  The one place that chooses (backing.py's next_candidate): a clock
 * hand over the pages idle at least idle_ticks; the store asks for the
 * oldest first, age band by age band (store.IDLE_LADDER). */
static int64_t next_candidate(Engine *e, Backing *b, unsigned idle_ticks, uint64_t *seen)
{
    unsigned now = LOAD(e->now_tick) & ENTRY_IDLE_MASK;
    while (b->scan_left) {
        uint64_t idx = b->cursor;
        b->cursor = idx + 1 < e->npages ? idx + 1 : 0;
        b->scan_left--;
        uint64_t w = __atomic_load_n(&e->page[idx], __ATOMIC_RELAXED);
        unsigned kind = entry_kind(w);
        if (!entry_backed(w) && (kind == KIND_COMPRESSED || kind == KIND_HUGE) && entry_age(w, now) >= idle_ticks) {
            *seen = w;
            return (int64_t)idx;
        }
    }
    return -1;
}

static int write_all(Backing *b, const uint8_t *src, size_t n, uint64_t offset)
{
    ssize_t w = pwrite(b->fd, src, n, (off_t)offset);
    if (w != (ssize_t)n) {
        io_failed(b, w < 0 ? errno : EIO);
        return -1;
    }
    ADD(b->written, n);
    return 0;
}

/* Write the open segment's new blocks, store its fill, then switch each
 * pending entry that still names what was copied, and free what it left. */
static int commit(Engine *e, Backing *b, Ctx *t)
{
    if (!b->npending)
        return 0;
    uint64_t seg = (uint64_t)b->open;
    uint32_t first = b->flushed / SEG_BLOCK * SEG_BLOCK;
    uint32_t end = (b->pos + SEG_BLOCK - 1) / SEG_BLOCK * SEG_BLOCK;
    uint32_t np = b->npending;
    b->npending = 0;
    if (write_all(b, b->buf + first, end - first, seg * SEG_SIZE + first) < 0) {
        memset(b->buf + b->flushed, 0, b->pos - b->flushed);
        b->pos = b->flushed;
        return -1;
    }
    uint32_t fill = seg_fill(__atomic_load_n(&e->segment[seg], __ATOMIC_RELAXED));
    ADD(e->segment[seg], (uint64_t)(b->pos - fill) << SEG_FILL_SHIFT);
    b->flushed = b->pos;
    for (uint32_t i = 0; i < np; i++) {
        Pending *p = &b->pending[i];
        uint32_t n = entry_len(p->new);
        entry_lock(e, p->page);
        uint64_t cur = __atomic_load_n(&e->page[p->page], __ATOMIC_RELAXED);
        if ((cur ^ p->old) & ENTRY_CONTENT_MASK) {
            entry_unlock(e, p->page); /* rewritten or discarded meanwhile: the copy is dead */
            continue;
        }
        /* The entry as it is now (a read may have stamped it) at the new place. */
        uint64_t next = (p->new & ENTRY_CONTENT_MASK) | (cur & ~ENTRY_CONTENT_MASK);
        if (p->from_seg < 0) {
            uint32_t h = entry_handle(p->old);
            /* The same entry may name other bytes (rewritten twice, the
             * same handle and length again): switch only to a true copy. */
            obj_copy(e, h, n, t->obuf);
            if (memcmp(t->obuf, b->buf + p->at + OBJ_HEADER, n)) {
                entry_unlock(e, p->page);
                continue;
            }
            __atomic_store_n(&e->page[p->page], next, __ATOMIC_RELEASE); /* the switch */
            ADD(e->segment[seg], p->nbytes);
            entry_unlock(e, p->page);
            ADD(e->bd_count, 1);
            ADD(e->bd_writes, 1);
            if (entry_kind(p->old) == KIND_HUGE)
                SUB(e->huge_pages, 1);
            obj_free(e, h, n);
        } else {
            __atomic_store_n(&e->page[p->page], next, __ATOMIC_RELEASE);
            ADD(e->segment[seg], p->nbytes);
            SUB(e->segment[p->from_seg], p->nbytes);
            entry_unlock(e, p->page);
        }
    }
    return 0;
}

/* The open segment with nbytes free, sealing it and opening the lowest free
 * one if needed, leaving `reserve` free segments.  1 ready, 0 no segment,
 * -1 a write failed. */
static int room(Engine *e, Backing *b, Ctx *t, uint32_t nbytes, uint32_t reserve)
{
    if (b->open >= 0 && b->pos + nbytes <= SEG_SIZE)
        return 1;
    if (b->open >= 0) {
        if (commit(e, b, t) < 0)
            return -1;
        ADD(e->segment[b->open], (uint64_t)(SEG_FULL - SEG_OPEN) << SEG_STATE_SHIFT);
        b->open = -1;
    }
    if (b->nseg - b->used <= reserve)
        return 0;
    uint32_t s;
    for (s = 0; s < b->nseg; s++)
        if (seg_state(__atomic_load_n(&e->segment[s], __ATOMIC_RELAXED)) == SEG_FREE)
            break;
    if (s == b->nseg)
        return 0;
    __atomic_store_n(&e->segment[s], seg_word(0, 0, SEG_OPEN), __ATOMIC_RELAXED);
    b->used++;
    b->open = s;
    b->pos = b->flushed = 0;
    memset(b->buf, 0, SEG_SIZE);
    return 1;
}

static void append(Engine *e, Backing *b, uint64_t page, uint64_t old, const uint8_t *payload, uint32_t n,
                   int64_t from_seg)
{
    (void)e;
    uint32_t at = b->pos;
    uint32_t loc = (uint32_t)(((uint64_t)b->open * SEG_SIZE + at) / OBJ_ALIGN);
    uint64_t hdr = obj_header(page, n);
    memcpy(b->buf + at, &hdr, 8);
    if (payload)
        memcpy(b->buf + at + OBJ_HEADER, payload, n);
    Pending *p = &b->pending[b->npending++];
    p->page = page;
    p->old = old;
    p->new = make_backed(loc, old);
    p->at = at;
    p->nbytes = obj_span(n);
    p->from_seg = from_seg;
    b->pos += p->nbytes;
}

/* ---- the steps --------------------------------------------------------------- */

long writeback_step(Engine *e, unsigned max_objects, unsigned long long max_bytes, unsigned idle_ticks,
                   unsigned long long *nbytes)
{
    Backing *b = e->bk;
    Ctx *t = ctx_get(e);
    *nbytes = 0;
    if (!b || !t)
        return !b ? -ENXIO : -ENOMEM;
    if (max_objects > MAX_PENDING)
        max_objects = MAX_PENDING;
    long done = 0;
    int failed = 0;
    pthread_mutex_lock(&b->lock);
    b->scan_left = e->npages;
    while ((unsigned)done < max_objects && *nbytes < max_bytes) {
        uint64_t w = 0;
        int64_t idx = next_candidate(e, b, idle_ticks, &w);
        if (idx < 0)
            break;
        /* Room first (it may commit, taking other pages' bits), then this
         * page's bit for the copy, with the entry seen checked again. */
        uint32_t n = entry_len(w);
        int r = *nbytes + obj_span(n) > max_bytes ? 0 : room(e, b, t, obj_span(n), 1);
        if (r <= 0) {
            b->cursor = (uint64_t)idx; /* first next time */
            failed = r < 0;
            break;
        }
        entry_lock(e, (uint64_t)idx);
        if ((e->page[idx] ^ w) & ENTRY_CONTENT_MASK) {
            entry_unlock(e, (uint64_t)idx); /* changed since the hand saw it */
            continue;
        }
        append(e, b, (uint64_t)idx, w, NULL, n, -1);
        obj_copy(e, entry_handle(w), n, b->buf + b->pending[b->npending - 1].at + OBJ_HEADER);
        entry_unlock(e, (uint64_t)idx);
        done++;
        *nbytes += obj_span(n);
    }
    if (!failed && commit(e, b, t) < 0)
        failed = 1;
    pthread_mutex_unlock(&b->lock);
    if (trim(e) < 0)
        return -EIO;
    return failed ? -EIO : done;
}

static int64_t pick_victim(Engine *e, Backing *b, unsigned percent)
{
    int64_t best = -1;
    uint64_t best_live = (uint64_t)SEG_SIZE * percent / 100;
    for (uint32_t s = 0; s < b->nseg; s++) {
        uint64_t w = __atomic_load_n(&e->segment[s], __ATOMIC_RELAXED);
        if (seg_state(w) == SEG_FULL && seg_live(w) < best_live) {
            best = s;
            best_live = seg_live(w);
        }
    }
    return best;
}

long clean_step(Engine *e, unsigned max_objects, unsigned long long max_bytes, unsigned percent, int *freed)
{
    Backing *b = e->bk;
    Ctx *t = ctx_get(e);
    *freed = 0;
    if (!b || !t)
        return !b ? -ENXIO : -ENOMEM;
    if (max_objects > MAX_PENDING)
        max_objects = MAX_PENDING;
    long moved = 0;
    int failed = 0;
    unsigned long long nbytes = 0;
    pthread_mutex_lock(&b->lock);
    if (b->victim < 0) {
        int64_t s = pick_victim(e, b, percent);
        if (s < 0)
            goto out;
        ADD(e->segment[s], (uint64_t)(SEG_CLEANING - SEG_FULL) << SEG_STATE_SHIFT);
        b->victim = s;
        b->cpos = 0;
        b->cfill = seg_fill(__atomic_load_n(&e->segment[s], __ATOMIC_RELAXED));
        if (b->cfill) {
            size_t n = (b->cfill + SEG_BLOCK - 1) / SEG_BLOCK * SEG_BLOCK;
            ssize_t got = pread(b->fd, b->cbuf, n, (off_t)((uint64_t)s * SEG_SIZE));
            if (got != (ssize_t)n) {
                io_failed(b, got < 0 ? errno : EIO);
                ADD(e->segment[s], (uint64_t)-((uint64_t)(SEG_CLEANING - SEG_FULL) << SEG_STATE_SHIFT));
                b->victim = -1;
                failed = 1;
                goto out;
            }
        }
    }
    int64_t victim = b->victim;
    while (b->cpos < b->cfill && (unsigned)moved < max_objects && nbytes < max_bytes) {
        uint32_t at = b->cpos;
        uint64_t hdr;
        memcpy(&hdr, b->cbuf + at, 8);
        uint64_t page = hdr >> 16;
        uint32_t n = (uint32_t)(hdr & 0xFFFF);
        if (!hdr || !n || n > PAGE_SIZE || at + obj_span(n) > b->cfill) {
            b->cpos = b->cfill; /* the end of its objects */
            break;
        }
        uint32_t loc = (uint32_t)(((uint64_t)victim * SEG_SIZE + at) / OBJ_ALIGN);
        /* No entry bit here: the copy comes from the victim's buffer, and
         * the commit switches only entries that still name this object. */
        uint64_t w = page < e->npages ? __atomic_load_n(&e->page[page], __ATOMIC_RELAXED) : 0;
        if (entry_backed(w) && entry_loc(w) == loc && entry_len(w) == n) {
            int r = room(e, b, t, obj_span(n), 0);
            if (r <= 0) {
                failed = r < 0;
                break;
            }
            append(e, b, page, w, b->cbuf + at + OBJ_HEADER, n, victim);
            moved++;
            nbytes += obj_span(n);
        }
        b->cpos = at + obj_span(n);
    }
    if (!failed && commit(e, b, t) < 0)
        failed = 1;
    if (!failed && b->cpos >= b->cfill) {
        uint64_t w = __atomic_load_n(&e->segment[victim], __ATOMIC_RELAXED);
        if (seg_live(w) == 0) {
            if (fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)((uint64_t)victim * SEG_SIZE),
                          SEG_SIZE) != 0) {
                io_failed(b, errno);
                failed = 1;
                goto out;
            }
            __atomic_store_n(&e->segment[victim], 0, __ATOMIC_RELAXED);
            b->used--;
            ADD(e->segments_cleaned, 1);
            *freed = 1;
        } else {
            ADD(e->segment[victim], (uint64_t)-((uint64_t)(SEG_CLEANING - SEG_FULL) << SEG_STATE_SHIFT));
        }
        b->victim = -1;
    }
out:
    pthread_mutex_unlock(&b->lock);
    return failed ? -EIO : moved;
}

int backing_latency(Engine *e, unsigned long long out[LAT_BUCKETS])
{
    Backing *b = e->bk;
    if (!b)
        return -1;
    for (unsigned i = 0; i < LAT_BUCKETS; i++)
        out[i] = LOAD(b->lat[i]);
    return 0;
}

int backing_figures(Engine *e, unsigned long long out[5])
{
    Backing *b = e->bk;
    if (!b)
        return -1;
    unsigned long long live = 0, fill = 0;
    for (uint32_t s = 0; s < b->nseg; s++) {
        uint64_t w = __atomic_load_n(&e->segment[s], __ATOMIC_RELAXED);
        live += seg_live(w);
        fill += seg_fill(w);
    }
    out[0] = b->size;
    out[1] = live;
    out[2] = fill - live;
    out[3] = LOAD(b->used);
    out[4] = LOAD(b->written);
    return 0;
}

/* ---- rebuild and check (lock_all held by the caller) ---------------------------- */

/* Each backed page in the extents: (page, entry, segment, offset), checked
 * as rebuild.py's _backed. */
#define FOR_BACKED(e, pages, npx, idx, w)                                                                          \
    for (size_t x_ = 0; x_ < (npx); x_++)                                                                          \
        for (uint64_t idx = (pages)[2 * x_], w; idx < (pages)[2 * x_ + 1]; idx++)                                  \
            if (w = (e)->page[idx], entry_kind(w) && entry_backed(w))

static int backed_ok(uint64_t idx, uint64_t w, uint32_t *seg, uint32_t *at, char *err, size_t errlen)
{
    unsigned kind = entry_kind(w);
    uint32_t n = entry_len(w);
    uint64_t off = (uint64_t)entry_loc(w) * OBJ_ALIGN;
    *seg = (uint32_t)(off >> SEG_SHIFT);
    *at = (uint32_t)(off & (SEG_SIZE - 1));
    if ((kind != KIND_HUGE && kind != KIND_COMPRESSED) || !n || n > PAGE_SIZE ||
        (kind == KIND_HUGE) != (n == PAGE_SIZE)) {
        snprintf(err, errlen, "page %llu: backed entry 0x%llx has a bad kind or length", (unsigned long long)idx,
                 (unsigned long long)w);
        return -1;
    }
    if (*seg >= MAX_SEGMENTS || *at + obj_span(n) > SEG_SIZE) {
        snprintf(err, errlen, "page %llu: backed entry 0x%llx names no segment's object", (unsigned long long)idx,
                 (unsigned long long)w);
        return -1;
    }
    return 0;
}

int rebuild_segments(Engine *e, const uint64_t *pages, size_t npx, const uint64_t *segs, size_t nsx,
                     unsigned long long *count, char *err, size_t errlen)
{
    for (size_t x = 0; x < nsx; x++)
        for (uint64_t s = segs[2 * x]; s < segs[2 * x + 1]; s++) {
            uint64_t w = e->segment[s];
            if (!w)
                continue;
            if (seg_state(w) == SEG_FREE) {
                snprintf(err, errlen, "segment %llu: free, but its word is 0x%llx", (unsigned long long)s,
                         (unsigned long long)w);
                return -1;
            }
            e->segment[s] = seg_word(0, seg_fill(w), SEG_FULL);
        }
    *count = 0;
    FOR_BACKED(e, pages, npx, idx, w)
    {
        uint32_t seg, at;
        if (backed_ok(idx, w, &seg, &at, err, errlen) < 0)
            return -1;
        uint64_t sw = e->segment[seg];
        uint32_t sp = obj_span(entry_len(w));
        if (seg_state(sw) == SEG_FREE || at + sp > seg_fill(sw)) {
            snprintf(err, errlen, "page %llu: backed entry 0x%llx points past what segment %u holds",
                     (unsigned long long)idx, (unsigned long long)w, seg);
            return -1;
        }
        e->segment[seg] = sw + sp;
        (*count)++;
    }
    return 0;
}

int check_segments(Engine *e, const uint64_t *pages, size_t npx, const uint64_t *segs, size_t nsx, char *err,
                   size_t errlen)
{
    uint32_t *live = calloc(MAX_SEGMENTS, sizeof *live);
    if (!live) {
        snprintf(err, errlen, "out of memory for the backing check");
        return -1;
    }
    unsigned long long count = 0;
    int r = -1;
    FOR_BACKED(e, pages, npx, idx, w)
    {
        uint32_t seg, at;
        if (backed_ok(idx, w, &seg, &at, err, errlen) < 0)
            goto out;
        live[seg] += obj_span(entry_len(w));
        count++;
    }
    Errs b = {err, errlen, 0, 0};
    err[0] = 0;
    size_t pre = (size_t)snprintf(err, errlen, "backing invariants broken: ");
    b.msg = err + pre;
    b.cap = errlen - pre;
    char tmp[256];
    int nerr = 0;
#define BAD(...)                                                                                                   \
    do {                                                                                                           \
        if (nerr++ < 20) {                                                                                         \
            snprintf(tmp, sizeof tmp, __VA_ARGS__);                                                                \
            size_t l = strlen(b.msg);                                                                              \
            snprintf(b.msg + l, b.cap - l, "%s%s", l ? "; " : "", tmp);                                            \
        }                                                                                                          \
    } while (0)
    if (count != LOAD(e->bd_count))
        BAD("bd_count %llu != %llu backed pages", LOAD(e->bd_count), count);
    for (size_t x = 0; x < nsx; x++)
        for (uint64_t s = segs[2 * x]; s < segs[2 * x + 1]; s++) {
            uint64_t w = e->segment[s];
            if (!w)
                continue;
            if (seg_state(w) == SEG_FREE)
                BAD("segment %llu is free but its word is 0x%llx", (unsigned long long)s, (unsigned long long)w);
            else if (seg_live(w) != live[s] || seg_live(w) > seg_fill(w))
                BAD("segment %llu: live %u, fill %u, pages name %u", (unsigned long long)s, seg_live(w), seg_fill(w),
                    live[s]);
            live[s] = 0;
        }
    int shown = 0;
    for (uint32_t s = 0; s < MAX_SEGMENTS && shown < 4; s++)
        if (live[s]) {
            BAD("segment %u is free but pages name %u bytes in it", s, live[s]);
            shown++;
        }
#undef BAD
    r = nerr ? -1 : 0;
    if (!nerr)
        err[0] = 0;
out:
    free(live);
    return r;
}
