/* zswapd native engine: the store's hot path (page table, zsmalloc-style pool,
 * lz4/zstd) in C, over the memfd state layout of zswapd/state.py.
 *
 * This file mirrors zswapd/pool.py (the reference engine) and the page-level
 * half of zswapd/store.py line for line; the names are the same (frame,
 * zspage, size class, slot, handle, fullness group, hot/cold stacks).  It
 * invents no layout: every table it touches is a buffer the State object
 * hands over (state.view(name), state.arena()), and the volatile scalars
 * (stack tops, list heads, per-class totals) live in this object, exactly as
 * they live in a Python Pool, and cross over with volatile()/set_volatile().
 * The rebuild scan and the invariant check are here too (rebuild,
 * check_pages), leaving the same bytes as pool.py's reference scan.
 *
 * Crash consistency: the same order as pool.py and store.py.
 *   write:   new object complete (slot header, payload), then handle-table
 *            entry, then the page-table entry (one aligned 8-byte store),
 *            then the old object is freed.
 *   discard: page-table entry zeroed, then the object freed.
 *   compact: copy (slot header, payload), switch the handle entry, free the
 *            old slot.
 * A frame is punched only while free.  Locks change none of this: they
 * decide which thread makes a step, never the order of the steps.
 *
 * Locking, as zsmalloc and zram.
 *   entry lock bit  one per page (elock, process memory; zram's ZRAM_LOCK).
 *                   Held while a thread replaces a page's entry (for a
 *                   partial page: the read, the modify and the store) or
 *                   copies its object out.  So two threads never update one
 *                   page at once, and an object is never freed under a reader.
 *   class lock      one per size class: the class's fullness lists, its
 *                   zspages' inuse/free-slot/group fields and slot headers,
 *                   per-class totals, and the bytes of its objects (a store
 *                   copies the payload in, a reader copies it out, compaction
 *                   moves it, all under this lock).
 *   pool lock       the frame stacks (hot, cold), frames_made/frames_used,
 *                   the zspage-id stack, the handle stack; trim's punches.
 * Lock order: entry bit -> class lock -> pool lock.  At most one entry bit
 * and one class lock are held at a time (lock_all, below, takes every class
 * lock in ascending order, then the pool lock: rebuild, the invariant
 * check, volatile()/set_volatile() and close).  Compaction takes only class
 * locks (and the pool lock inside), COMPACT_STEP moves per hold.  The GIL is
 * never taken while one of these is held (a FUSE thread hands a request up
 * to Python holding none), so a thread holding the GIL may wait for them.
 *
 * What runs concurrently: compression and decompression (each thread has
 * its own lz4 state, zstd contexts and scratch pages: Ctx, below), pages of
 * different classes, and anything touching different pages, with nothing
 * shared but the pool lock's short sections.  A huge object is copied under
 * its entry bit alone (compaction never moves one).  Counters are atomic
 * (relaxed) everywhere: the engine's threads bump them with ADD, Python
 * bumps them through Engine.count (never a read-modify-write of the
 * attribute, which would lose a native thread's bump in between), and the
 * attributes read and set them with atomic loads and stores.
 * Figures read for policy or stats without a lock (hot_top in trim,
 * frames_used, handles_used/handles_made, frame_limit, cls_zspages,
 * cls_used, fragmented: freeable, the compaction order, the getters) may be
 * stale, never torn: their writers hold the lock the field is listed under
 * AND store it with STORE (relaxed), and the unlocked readers use LOAD, so
 * the reads are defined C11 (and ThreadSanitizer, which
 * tests/test_engine.py runs over the threaded test, sees no race).
 * No allocation on the write or read path: the lz4 state, the zstd contexts,
 * the compression buffer and the read-modify-write page are made once per
 * thread (a FUSE thread's when it starts).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/falloc.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* LZ4_compress_fast_extState_fastReset is in lz4's static-linking section:
 * the shared liblz4 does not export it, so setup.py links the system's
 * liblz4.a (PIC on Debian) when it has one, and otherwise builds with
 * ZSWAPD_LZ4_FULL_RESET, which pays a 16 KiB state reset per page. */
#define LZ4_STATIC_LINKING_ONLY
#include <lz4.h>
#include <zstd.h>

#define FRAME_SIZE 4096u
#define FRAME_SHIFT 12
#define PAGE_SIZE 4096u
#define HEADER 4u
#define GROUPS 10u
#define GROUP_FULL (GROUPS + 1)
#define FREE_TAG 0x80000000u
#define SLOT_END 0xFFFFu
#define HUGE_LOC (1ull << 63)
#define FRAME_MASK 0xFFFFFFFFull
#define MAX_CLASSES 256
#define MAX_FRAMES_PER_ZSPAGE 8

#define KIND_MASK 0x3ull
#define KIND_SAME 1u
#define KIND_COMPRESSED 2u
#define KIND_HUGE 3u
#define LEN_SHIFT 4
#define LEN_MASK 0x1FFFull
#define HANDLE_SHIFT 32
#define ALGO_LZ4 0
#define ALGO_ZSTD 1

/* Results of a page store, reported up to Store, which owns the policy. */
#define ST_OK 0
#define ST_REFUSED 1 /* the store is full and the page needs pool memory */
#define ST_NOROOM 2  /* the pool had no frame or handle for it */
#define ST_CORRUPT 3 /* an object did not decompress to a page */
#define ST_PUNCH 4   /* fallocate(PUNCH_HOLE) on the arena failed */
#define ST_BAD 5     /* misuse of the object API */
#define ST_NOMEM 6   /* no memory for a thread's codec context */

#ifdef ZSWAPD_BOUNDS
/* The sanitizer build checks every table index: ASan cannot see past the end
 * of a table inside one mapping. */
#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "_engine.c:%d: bound check failed: %s\n",          \
                    __LINE__, #cond);                                          \
            abort();                                                           \
        }                                                                      \
    } while (0)
#else
#define CHECK(cond) ((void)0)
#endif

enum {
    T_PAGE, T_HANDLE, T_ZS_FIRST, T_ZS_CLASS, T_FRAME_NEXT, T_ZS_INUSE,
    T_ZS_FREE, T_ZS_NEXT, T_ZS_PREV, T_ZS_GROUP, T_ZS_STACK, T_HOT, T_COLD,
    T_HANDLE_STACK, T_ARENA, NBUF
};
static const char *const buf_names[NBUF] = {
    "page", "handle", "zs_first", "zs_class", "frame_next", "zs_inuse",
    "zs_free", "zs_next", "zs_prev", "zs_group", "zs_stack", "hot", "cold",
    "handle_stack", "arena",
};
static const Py_ssize_t buf_item[NBUF] = {8, 8, 4, 2, 4, 2, 2, 4, 4, 1, 4, 4, 4, 4, 1};

static PyObject *PoolError, *PoolFull, *StateError;

typedef struct {
    PyObject_HEAD
    Py_buffer bufs[NBUF];
    int nbufs;
    uint64_t *page;
    uint64_t *handle;
    uint32_t *zs_first;
    uint16_t *zs_class;
    uint32_t *frame_next;
    uint16_t *zs_inuse;
    uint16_t *zs_free;
    uint32_t *zs_next;
    uint32_t *zs_prev;
    uint8_t *zs_group;
    uint32_t *zs_stack;
    uint32_t *hot;
    uint32_t *cold;
    uint32_t *handle_stack;
    uint8_t *arena;
    int arena_fd;

    uint64_t npages;
    uint32_t max_frames, max_handles;
    long long frame_limit;
    unsigned int reserve_frames;
    unsigned int huge_threshold;

    /* class table, from pool.CLASSES */
    int ncls;
    uint16_t csize[MAX_CLASSES];
    uint8_t cframes[MAX_CLASSES];
    uint16_t cobjs[MAX_CLASSES];
    uint8_t class_of[FRAME_SIZE + 1];

    /* volatile scalars (a Python Pool's attributes of the same names) */
    uint32_t frames_made, hot_top, cold_top, frames_used; /* pool lock */
    uint32_t zs_free_top, zs_made;                        /* pool lock */
    uint32_t handle_free_top, handles_made, handles_used; /* pool lock */
    uint32_t heads[MAX_CLASSES * (GROUPS + 1)];           /* class lock */
    uint32_t nonempty[MAX_CLASSES];                       /* class lock */
    unsigned long long cls_zspages[MAX_CLASSES], cls_used[MAX_CLASSES]; /* class lock */
    uint8_t fragmented[MAX_CLASSES];                      /* class lock */
    unsigned long long huge_objects, obj_bytes, pages_compacted; /* atomic */

    /* counters (store.Counters, same names); the engine bumps them atomically */
    unsigned long long num_reads, num_writes, failed_reads, failed_writes,
        notify_free, same_pages, huge_pages, pages_stored, mem_used_max,
        compactions, limit_hits;

    int algo, zstd_level; /* read by each thread's codec context */

    int full; /* Store.full, mirrored: the FUSE threads refuse with it */
    int punch_errno;
    uint64_t *elock; /* the entry lock bits, one per page (process memory) */
    pthread_mutex_t pool_lock;
    pthread_mutex_t cls_lock[MAX_CLASSES];
    int locks_ready;
} Engine;

/* ---- locking ------------------------------------------------------------ */

static void pool_lock(Engine *e) { pthread_mutex_lock(&e->pool_lock); }
static void pool_unlock(Engine *e) { pthread_mutex_unlock(&e->pool_lock); }
static void class_lock(Engine *e, unsigned cls) { pthread_mutex_lock(&e->cls_lock[cls]); }
static void class_unlock(Engine *e, unsigned cls) { pthread_mutex_unlock(&e->cls_lock[cls]); }

/* zram's ZRAM_LOCK: a bit per page-table entry, held while a thread reads
 * the page's object or replaces the entry.  Kept beside the table, in this
 * process's memory, not in the entry's bit 63: a worker that dies holding it
 * must not leave a set bit in the memfd for the next one to trip over. */
static void entry_lock(Engine *e, uint64_t idx)
{
    uint64_t *w = &e->elock[idx >> 6], bit = 1ull << (idx & 63);
    unsigned spins = 0;
    while (__atomic_fetch_or(w, bit, __ATOMIC_ACQUIRE) & bit) {
        while (__atomic_load_n(w, __ATOMIC_RELAXED) & bit) {
            if (++spins < 64)
                __builtin_ia32_pause();
            else
                sched_yield(); /* the holder is compressing a page: microseconds */
        }
    }
}

static void entry_unlock(Engine *e, uint64_t idx)
{
    __atomic_fetch_and(&e->elock[idx >> 6], ~(1ull << (idx & 63)), __ATOMIC_RELEASE);
}

/* Everything, for the operations that read or replace every index at once
 * (rebuild, the invariant check, volatile()/set_volatile(), close). */
static void lock_all(Engine *e)
{
    for (int c = 0; c < e->ncls; c++)
        class_lock(e, (unsigned)c);
    pool_lock(e);
}

static void unlock_all(Engine *e)
{
    pool_unlock(e);
    for (int c = e->ncls; c-- > 0;)
        class_unlock(e, (unsigned)c);
}

#define ADD(field, v) __atomic_add_fetch(&(field), (v), __ATOMIC_RELAXED)
#define SUB(field, v) __atomic_sub_fetch(&(field), (v), __ATOMIC_RELAXED)
/* A field written under its lock and also read without it (see the top):
 * the lock holder writes with STORE (a plain read of its own lock's field is
 * fine), the unlocked reader uses LOAD.  Relaxed: on x86 these are the same
 * movs as plain accesses, so the hot path pays nothing. */
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define STORE(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELAXED)

/* ---- per-thread codec state ------------------------------------------------
 * Compression and decompression run outside every pool lock, each thread
 * with its own lz4 state, zstd contexts and scratch pages: made on a
 * thread's first call (a FUSE thread's at its start), reused for every page
 * after, freed when the thread ends. */
typedef struct {
    void *lz4_state;
    ZSTD_CCtx *zc;
    ZSTD_DCtx *zd;
    int zlevel; /* level zc is set to; INT_MIN: not yet */
    uint8_t cbuf[FRAME_SIZE]; /* compressed output */
    uint8_t pbuf[PAGE_SIZE];  /* a page for read-modify-write */
    uint8_t obuf[FRAME_SIZE]; /* an object copied out of the pool */
} Ctx;

static pthread_key_t ctx_key;
static __thread Ctx *tls_ctx;

static void ctx_free(void *p)
{
    Ctx *t = p;
    if (!t)
        return;
    ZSTD_freeCCtx(t->zc);
    ZSTD_freeDCtx(t->zd);
    free(t->lz4_state);
    free(t);
}

static int set_zstd_level(ZSTD_CCtx *zc, int level)
{
    /* The same frame as codec.py's ZstdCompressor: no content size, no
     * checksum, no dictionary id. */
    ZSTD_CCtx_reset(zc, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(ZSTD_CCtx_setParameter(zc, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(zc, ZSTD_c_contentSizeFlag, 0)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(zc, ZSTD_c_checksumFlag, 0)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(zc, ZSTD_c_dictIDFlag, 0)))
        return -1;
    return 0;
}

/* This thread's context, with zstd at the engine's level; NULL: no memory. */
static Ctx *ctx_get(Engine *e)
{
    Ctx *t = tls_ctx;
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t)
            return NULL;
        t->lz4_state = malloc((size_t)LZ4_sizeofState());
        t->zc = ZSTD_createCCtx();
        t->zd = ZSTD_createDCtx();
        if (!t->lz4_state || !t->zc || !t->zd) {
            ctx_free(t);
            return NULL;
        }
        /* fastReset needs one full initialisation of the state. */
        LZ4_initStream(t->lz4_state, (size_t)LZ4_sizeofState());
        t->zlevel = INT_MIN;
        tls_ctx = t;
        pthread_setspecific(ctx_key, t);
    }
    int level = __atomic_load_n(&e->zstd_level, __ATOMIC_RELAXED);
    if (t->zlevel != level) {
        if (set_zstd_level(t->zc, level) < 0)
            return NULL; /* set_codec validated it: cannot happen */
        t->zlevel = level;
    }
    return t;
}

/* ---- frames (pool lock) ---------------------------------------------------- */

static long long frame_room(const Engine *e)
{
    /* Under the pool lock from the allocator, unlocked from Python's
     * frame_room(); frame_limit is set from Python with no engine lock. */
    long long used = LOAD(e->frames_used), limit = LOAD(e->frame_limit);
    long long room = (long long)e->max_frames - used;
    if (limit) {
        long long lim = limit - used;
        if (lim < room)
            room = lim;
    }
    return room;
}

static uint32_t take_frame(Engine *e)
{
    uint32_t frame;
    if (e->hot_top) {
        STORE(e->hot_top, e->hot_top - 1);
        frame = e->hot[e->hot_top];
    } else if (e->cold_top) {
        frame = e->cold[--e->cold_top];
    } else {
        frame = e->frames_made++;
    }
    CHECK(frame < e->max_frames);
    STORE(e->frames_used, e->frames_used + 1);
    return frame;
}

static void give_frame(Engine *e, uint32_t frame)
{
    CHECK(e->hot_top < e->max_frames);
    STORE(e->frames_used, e->frames_used - 1);
    e->hot[e->hot_top] = frame;
    STORE(e->hot_top, e->hot_top + 1);
}

static int punch(Engine *e, uint32_t first, uint32_t count)
{
    if (!count)
        return 0;
    if (fallocate(e->arena_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)first * FRAME_SIZE, (off_t)count * FRAME_SIZE) != 0) {
        STORE(e->punch_errno, errno); /* read by whichever thread reports it */
        return -1;
    }
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* pool.trim: frames beyond the reserve go back to the kernel. */
static long trim_locked(Engine *e)
{
    uint32_t top = e->hot_top, keep = e->reserve_frames;
    if (top <= keep)
        return 0;
    uint32_t *fr = e->hot + keep;
    uint32_t n = top - keep;
    /* The hot stack is volatile: sorting its tail in place is free. */
    qsort(fr, n, sizeof *fr, cmp_u32);
    STORE(e->hot_top, keep);
    uint32_t first = fr[0], prev = fr[0];
    int err = 0;
    for (uint32_t i = 1; i < n; i++) {
        if (fr[i] != prev + 1) {
            err |= punch(e, first, prev + 1 - first);
            first = fr[i];
        }
        prev = fr[i];
    }
    err |= punch(e, first, prev + 1 - first);
    /* Lowest frames are reused first: push in descending order.  The cold
     * stack never overlaps the hot one, so copy from the tail backwards. */
    for (uint32_t i = n; i-- > 0;) {
        CHECK(e->cold_top < e->max_frames);
        e->cold[e->cold_top++] = fr[i];
    }
    return err ? -1 : (long)n;
}

static long trim(Engine *e)
{
    /* Most requests free nothing beyond the reserve: skip the lock then. */
    if (LOAD(e->hot_top) <= e->reserve_frames)
        return 0;
    pool_lock(e);
    long n = trim_locked(e);
    pool_unlock(e);
    return n;
}

static long refill_reserve(Engine *e)
{
    long added = 0;
    pool_lock(e);
    while (e->hot_top < e->reserve_frames && (e->cold_top || e->frames_made < e->max_frames)) {
        uint32_t frame;
        if (e->cold_top) {
            frame = e->cold[--e->cold_top];
        } else {
            frame = e->frames_made++;
        }
        CHECK(frame < e->max_frames);
        e->arena[(size_t)frame << FRAME_SHIFT] = 0; /* fault it in now */
        e->hot[e->hot_top] = frame;
        STORE(e->hot_top, e->hot_top + 1);
        added++;
    }
    pool_unlock(e);
    return added;
}

/* ---- handles (pool lock) ------------------------------------------------- */

static uint32_t new_handle(Engine *e, uint64_t value)
{
    uint32_t h;
    if (e->handle_free_top) {
        h = e->handle_stack[--e->handle_free_top];
    } else if (e->handles_made < e->max_handles) {
        h = e->handles_made + 1;
        STORE(e->handles_made, h);
    } else {
        return 0;
    }
    CHECK(h <= e->max_handles);
    e->handle[h] = value;
    STORE(e->handles_used, e->handles_used + 1);
    return h;
}

static void drop_handle(Engine *e, uint32_t h)
{
    CHECK(h <= e->max_handles && e->handle_free_top <= e->max_handles);
    e->handle[h] = 0;
    e->handle_stack[e->handle_free_top++] = h;
    STORE(e->handles_used, e->handles_used - 1);
}

/* ---- zspages and fullness (class lock) --------------------------------------- */

static inline unsigned group_of(unsigned inuse, unsigned objs)
{
    if (inuse >= objs)
        return GROUP_FULL;
    return (inuse * GROUPS + objs - 1) / objs;
}

static void link_zs(Engine *e, uint32_t z, unsigned cls, unsigned group)
{
    e->zs_group[z] = (uint8_t)group;
    if (group == GROUP_FULL || group == 0)
        return;
    unsigned slot = cls * (GROUPS + 1) + group;
    uint32_t head = e->heads[slot];
    e->zs_prev[z] = 0;
    e->zs_next[z] = head;
    if (head)
        e->zs_prev[head] = z;
    e->heads[slot] = z;
    e->nonempty[cls] |= 1u << group;
}

static void unlink_zs(Engine *e, uint32_t z, unsigned cls)
{
    unsigned group = e->zs_group[z];
    if (group == GROUP_FULL || group == 0)
        return;
    unsigned slot = cls * (GROUPS + 1) + group;
    uint32_t nxt = e->zs_next[z], prv = e->zs_prev[z];
    if (prv) {
        e->zs_next[prv] = nxt;
    } else {
        e->heads[slot] = nxt;
        if (!nxt)
            e->nonempty[cls] &= ~(1u << group);
    }
    if (nxt)
        e->zs_prev[nxt] = prv;
}

/* (frame, offset in frame) of byte `offset` of zspage z */
static inline uint32_t zs_frame_at(const Engine *e, uint32_t z, uint32_t offset, uint32_t *off)
{
    uint32_t frame = e->zs_first[z];
    for (uint32_t i = offset >> FRAME_SHIFT; i; i--) {
        CHECK(frame < e->max_frames);
        frame = e->frame_next[frame];
    }
    CHECK(frame < e->max_frames);
    *off = offset & (FRAME_SIZE - 1);
    return frame;
}

static inline uint32_t *slot_word(Engine *e, uint32_t frame, uint32_t off)
{
    return (uint32_t *)(e->arena + ((size_t)frame << FRAME_SHIFT) + off);
}

/* With the class lock held; takes the pool lock for the id and frames. */
static uint32_t new_zspage(Engine *e, unsigned cls)
{
    unsigned nf = e->cframes[cls], objs = e->cobjs[cls], size = e->csize[cls];
    uint32_t z, frames[MAX_FRAMES_PER_ZSPAGE];
    pool_lock(e);
    if (frame_room(e) < (long long)nf) {
        pool_unlock(e);
        return 0;
    }
    if (e->zs_free_top)
        z = e->zs_stack[--e->zs_free_top];
    else
        z = ++e->zs_made;
    CHECK(z <= e->max_frames);
    for (unsigned i = 0; i < nf; i++)
        frames[i] = take_frame(e);
    pool_unlock(e);
    /* z and its frames are this thread's now.  Chain, class and first frame
     * are persistent: all written before any slot of this zspage is handed
     * out (crash rule 1). */
    for (unsigned i = 0; i + 1 < nf; i++)
        e->frame_next[frames[i]] = frames[i + 1];
    e->zs_first[z] = frames[0];
    e->zs_class[z] = (uint16_t)cls;
    e->zs_inuse[z] = 0;
    e->zs_free[z] = 0;
    for (unsigned slot = 0; slot < objs; slot++) {
        uint32_t offset = slot * size;
        uint32_t frame = frames[offset >> FRAME_SHIFT];
        *slot_word(e, frame, offset & (FRAME_SIZE - 1)) = FREE_TAG | (slot + 1 < objs ? slot + 1 : SLOT_END);
    }
    STORE(e->cls_zspages[cls], e->cls_zspages[cls] + 1);
    link_zs(e, z, cls, 0);
    return z;
}

/* With the class lock held; takes the pool lock. */
static void free_zspage(Engine *e, uint32_t z, unsigned cls)
{
    unlink_zs(e, z, cls);
    e->zs_group[z] = 0;
    uint32_t frame = e->zs_first[z];
    pool_lock(e);
    for (unsigned i = 0; i < e->cframes[cls]; i++) {
        uint32_t nxt = e->frame_next[frame];
        give_frame(e, frame);
        frame = nxt;
    }
    CHECK(e->zs_free_top <= e->max_frames);
    e->zs_stack[e->zs_free_top++] = z;
    pool_unlock(e);
    STORE(e->cls_zspages[cls], e->cls_zspages[cls] - 1);
}

static uint32_t pop_slot(Engine *e, uint32_t z, unsigned cls, uint32_t h, uint32_t *frame_out, uint32_t *off_out)
{
    uint32_t slot = e->zs_free[z];
    CHECK(slot < e->cobjs[cls]);
    uint32_t off, frame = zs_frame_at(e, z, slot * e->csize[cls], &off);
    uint32_t *w = slot_word(e, frame, off);
    e->zs_free[z] = (uint16_t)(*w & 0xFFFF);
    *w = h;
    unsigned inuse = e->zs_inuse[z] + 1u;
    e->zs_inuse[z] = (uint16_t)inuse;
    STORE(e->cls_used[cls], e->cls_used[cls] + 1);
    unsigned group = group_of(inuse, e->cobjs[cls]);
    if (group != e->zs_group[z]) {
        unlink_zs(e, z, cls);
        link_zs(e, z, cls, group);
    }
    *frame_out = frame;
    *off_out = off;
    return slot;
}

static void push_slot(Engine *e, uint32_t z, unsigned cls, uint32_t slot)
{
    uint32_t off, frame = zs_frame_at(e, z, slot * e->csize[cls], &off);
    *slot_word(e, frame, off) = FREE_TAG | e->zs_free[z];
    e->zs_free[z] = (uint16_t)slot;
    unsigned inuse = e->zs_inuse[z] - 1u;
    e->zs_inuse[z] = (uint16_t)inuse;
    STORE(e->cls_used[cls], e->cls_used[cls] - 1);
    if (inuse == 0) {
        free_zspage(e, z, cls);
        return;
    }
    unsigned group = group_of(inuse, e->cobjs[cls]);
    if (group != e->zs_group[z]) {
        unlink_zs(e, z, cls);
        link_zs(e, z, cls, group);
    }
    STORE(e->fragmented[cls], 1);
}

/* ---- object bytes -------------------------------------------------------- */

static void put_bytes(Engine *e, uint32_t frame, uint32_t off, const uint8_t *data, uint32_t n)
{
    uint32_t first = n < FRAME_SIZE - off ? n : FRAME_SIZE - off;
    memcpy(e->arena + ((size_t)frame << FRAME_SHIFT) + off, data, first);
    if (first < n) {
        uint32_t next = e->frame_next[frame];
        CHECK(next < e->max_frames);
        memcpy(e->arena + ((size_t)next << FRAME_SHIFT), data + first, n - first);
    }
}

/* n bytes at (frame, off) into dst, following the chain across frames. */
static void get_bytes(Engine *e, uint32_t frame, uint32_t off, uint32_t n, uint8_t *dst)
{
    const uint8_t *p = e->arena + ((size_t)frame << FRAME_SHIFT) + off;
    if (off + n <= FRAME_SIZE) {
        memcpy(dst, p, n);
        return;
    }
    uint32_t first = FRAME_SIZE - off;
    uint32_t next = e->frame_next[frame];
    CHECK(next < e->max_frames);
    memcpy(dst, p, first);
    memcpy(dst + first, e->arena + ((size_t)next << FRAME_SHIFT), n - first);
}

/* pool.store: returns the handle, 0 when full (PoolFull). n in 1..4096 and
 * either n == 4096 or n + HEADER <= 4096 (checked by callers).  Takes the
 * class lock (and the pool lock inside it). */
static uint32_t obj_store(Engine *e, const uint8_t *data, uint32_t n)
{
    if (n == FRAME_SIZE) {
        pool_lock(e);
        uint32_t h = 0, frame = 0;
        if (frame_room(e) >= 1) {
            h = new_handle(e, 0);
            if (h)
                frame = take_frame(e);
        }
        pool_unlock(e);
        if (!h)
            return 0;
        memcpy(e->arena + ((size_t)frame << FRAME_SHIFT), data, FRAME_SIZE);
        __atomic_store_n(&e->handle[h], HUGE_LOC | frame, __ATOMIC_RELEASE); /* last: crash rule 1 */
        ADD(e->huge_objects, 1);
        ADD(e->obj_bytes, FRAME_SIZE);
        return h;
    }
    unsigned cls = e->class_of[n + HEADER];
    uint32_t z;
    class_lock(e, cls);
    uint32_t mask = e->nonempty[cls];
    if (mask) {
        z = e->heads[cls * (GROUPS + 1) + (31 - __builtin_clz(mask))];
    } else {
        /* Python takes the zspage before the handle; a full handle table
         * then leaves an empty zspage listed, which is harmless: keep the
         * same order so both engines leave the same tables. */
        z = new_zspage(e, cls);
        if (!z) {
            class_unlock(e, cls);
            return 0;
        }
    }
    pool_lock(e);
    uint32_t h = new_handle(e, 0);
    pool_unlock(e);
    if (!h) {
        class_unlock(e, cls);
        return 0;
    }
    uint32_t frame, off;
    uint32_t slot = pop_slot(e, z, cls, h, &frame, &off);
    put_bytes(e, frame, off + HEADER, data, n);
    __atomic_store_n(&e->handle[h], (uint64_t)z << 16 | slot, __ATOMIC_RELEASE); /* last: crash rule 1 */
    class_unlock(e, cls);
    ADD(e->obj_bytes, n);
    return h;
}

/* The n payload bytes of handle h into dst.  The caller holds what keeps h
 * alive (the page's entry lock, or is the only thread); a compressed object
 * is copied under its class lock, which compaction holds while it moves
 * objects, so the copy is never torn by a move. */
static void obj_copy(Engine *e, uint32_t h, uint32_t n, uint8_t *dst)
{
    uint64_t loc = __atomic_load_n(&e->handle[h], __ATOMIC_ACQUIRE);
    if (loc & HUGE_LOC) { /* a huge object never moves */
        CHECK((loc & FRAME_MASK) < e->max_frames);
        memcpy(dst, e->arena + ((size_t)(loc & FRAME_MASK) << FRAME_SHIFT), n);
        return;
    }
    unsigned cls = e->class_of[n + HEADER];
    class_lock(e, cls);
    loc = e->handle[h];
    uint32_t z = (uint32_t)(loc >> 16);
    CHECK(z <= e->max_frames && e->zs_class[z] < e->ncls);
    uint32_t off, frame = zs_frame_at(e, z, (uint32_t)(loc & 0xFFFF) * e->csize[e->zs_class[z]], &off);
    get_bytes(e, frame, off + HEADER, n, dst);
    class_unlock(e, cls);
}

/* Free object h of n payload bytes; nothing names it any more (crash rule 2). */
static void obj_free(Engine *e, uint32_t h, uint32_t n)
{
    uint64_t loc = __atomic_load_n(&e->handle[h], __ATOMIC_ACQUIRE);
    SUB(e->obj_bytes, n);
    if (loc & HUGE_LOC) {
        pool_lock(e);
        give_frame(e, (uint32_t)(loc & FRAME_MASK));
        drop_handle(e, h);
        pool_unlock(e);
        SUB(e->huge_objects, 1);
        return;
    }
    /* The class from the length: the lock is taken before the location is
     * read again, since compaction may move the object until then. */
    unsigned cls = n + HEADER <= FRAME_SIZE ? e->class_of[n + HEADER] : 0;
    class_lock(e, cls);
    loc = e->handle[h];
    uint32_t z = (uint32_t)(loc >> 16);
    CHECK(z <= e->max_frames && e->zs_class[z] == cls);
    push_slot(e, z, e->zs_class[z], (uint32_t)(loc & 0xFFFF));
    pool_lock(e);
    drop_handle(e, h);
    pool_unlock(e);
    class_unlock(e, cls);
}

/* ---- compaction ----------------------------------------------------------- */

/* Also called without the class lock (the compaction order, Python's
 * freeable/freeable_frames): the two totals are then read at different
 * moments, and a reader can see a new zspage's first object counted in
 * cls_used but the zspage not yet in cls_zspages (or a freed zspage gone
 * before its last object), so "used > capacity" is possible and means
 * nothing is freeable, not 2^64 - 1 wasted slots. */
static unsigned long long freeable(const Engine *e, unsigned cls)
{
    unsigned long long cap = LOAD(e->cls_zspages[cls]) * e->cobjs[cls], used = LOAD(e->cls_used[cls]);
    return cap > used ? (cap - used) / e->cobjs[cls] : 0;
}

static unsigned long long freeable_frames(const Engine *e)
{
    unsigned long long t = 0;
    for (int c = 0; c < e->ncls; c++)
        if (LOAD(e->fragmented[c]))
            t += freeable(e, (unsigned)c) * e->cframes[c];
    return t;
}

static uint32_t emptiest(const Engine *e, unsigned cls)
{
    uint32_t mask = e->nonempty[cls];
    if (!mask)
        return 0;
    return e->heads[cls * (GROUPS + 1) + __builtin_ctz(mask)];
}

static uint32_t fullest_except(const Engine *e, unsigned cls, uint32_t avoid)
{
    uint32_t mask = e->nonempty[cls];
    while (mask) {
        unsigned group = 31 - __builtin_clz(mask);
        for (uint32_t z = e->heads[cls * (GROUPS + 1) + group]; z; z = e->zs_next[z])
            if (z != avoid)
                return z;
        mask &= ~(1u << group);
    }
    return 0;
}

/* Objects moved per hold of a class lock: the longest a writer of that
 * class waits for compaction (about 32 copies of at most 4 KiB). */
#define COMPACT_STEP 32

/* Takes the class lock, in steps of COMPACT_STEP moves.  Source and
 * destination are chosen afresh after each step; single-threaded that is the
 * choice the reference makes (the source stays the emptiest, the destination
 * the fullest), and with other threads it is the right choice for now. */
static unsigned long long compact_class(Engine *e, unsigned cls, unsigned long long budget)
{
    unsigned size = e->csize[cls];
    unsigned long long moves = 0;
    class_lock(e, cls);
    while (moves < budget && freeable(e, cls) > 0) {
        uint32_t src = emptiest(e, cls), dst = fullest_except(e, cls, src);
        if (!src || !dst)
            break;
        uint32_t slot = 0;
        unsigned long long step_end = moves + COMPACT_STEP < budget ? moves + COMPACT_STEP : budget;
        while (moves < step_end && e->zs_inuse[src] && e->zs_group[dst] != GROUP_FULL) {
            uint32_t off, frame, hdr;
            for (;;) { /* the next allocated slot of src: its header is a handle */
                CHECK(slot < e->cobjs[cls]);
                frame = zs_frame_at(e, src, slot * size, &off);
                hdr = *slot_word(e, frame, off);
                if (!(hdr & FREE_TAG))
                    break;
                slot++;
            }
            /* Crash rule 3: copy (header, then payload), switch the handle,
             * then free the old slot. */
            uint32_t dframe, doff;
            uint32_t dslot = pop_slot(e, dst, cls, hdr, &dframe, &doff);
            uint8_t tmp[FRAME_SIZE];
            get_bytes(e, frame, off + HEADER, size - HEADER, tmp);
            put_bytes(e, dframe, doff + HEADER, tmp, size - HEADER);
            CHECK(hdr <= e->max_handles);
            __atomic_store_n(&e->handle[hdr], (uint64_t)dst << 16 | dslot, __ATOMIC_RELEASE);
            moves++;
            int last = e->zs_inuse[src] == 1;
            if (last)
                ADD(e->pages_compacted, e->cframes[cls]);
            push_slot(e, src, cls, slot);
            if (last)
                break; /* src is freed: its id is the pool's, and another
                        * class may already have made it a zspage of its
                        * own, so not one more look at zs_inuse[src] */
            slot++;
        }
        if (moves == step_end && moves < budget) {
            /* a bounded step: let writers and readers of this class in */
            class_unlock(e, cls);
            class_lock(e, cls);
        }
    }
    class_unlock(e, cls);
    return moves;
}

static long long compact(Engine *e, unsigned long long budget)
{
    int order[MAX_CLASSES], n = 0;
    /* The order is read without the class locks: a stale figure only
     * changes which class goes first. */
    for (int c = 0; c < e->ncls; c++) {
        if (!LOAD(e->fragmented[c]))
            continue;
        if (!freeable(e, (unsigned)c)) {
            class_lock(e, (unsigned)c);
            if (!freeable(e, (unsigned)c))
                STORE(e->fragmented[c], 0);
            class_unlock(e, (unsigned)c);
            continue;
        }
        /* insertion sort, stable: most freeable frames first */
        unsigned long long key = freeable(e, (unsigned)c) * e->cframes[c];
        int i = n++;
        while (i > 0 && freeable(e, (unsigned)order[i - 1]) * e->cframes[order[i - 1]] < key) {
            order[i] = order[i - 1];
            i--;
        }
        order[i] = c;
    }
    unsigned long long moved = 0;
    for (int i = 0; i < n; i++) {
        if (moved >= budget)
            break;
        moved += compact_class(e, (unsigned)order[i], budget - moved);
        class_lock(e, (unsigned)order[i]);
        if (!freeable(e, (unsigned)order[i]))
            STORE(e->fragmented[order[i]], 0);
        class_unlock(e, (unsigned)order[i]);
    }
    if (trim(e) < 0)
        return -1;
    return (long long)moved;
}

/* ---- codec (no lock: the thread's own context) ------------------------------ */

/* The fill word if all 8-byte words of the page are equal. */
static int same_filled(const uint8_t *page, uint64_t *word)
{
    uint64_t w;
    memcpy(&w, page, 8);
    for (unsigned i = 8; i < PAGE_SIZE; i += 8) {
        uint64_t x;
        memcpy(&x, page + i, 8);
        if (x != w)
            return 0;
    }
    *word = w;
    return 1;
}

/* codec.encode: kind, algorithm and payload.  The huge rule is codec.py's
 * (a compressed length >= the threshold Store passes in is stored raw);
 * compressing into threshold - 1 bytes of room decides it without
 * compressing past the point where it could matter. */
static unsigned encode(Engine *e, Ctx *t, unsigned algo, const uint8_t *page, const uint8_t **payload, uint32_t *len,
                       uint64_t *word)
{
    if (page[0] == page[8] && page[PAGE_SIZE - 1] == page[PAGE_SIZE - 9] && same_filled(page, word))
        return KIND_SAME;
    int room = (int)e->huge_threshold - 1;
    long n;
    if (algo == ALGO_LZ4) {
#ifdef ZSWAPD_LZ4_FULL_RESET
        n = LZ4_compress_fast_extState(t->lz4_state, (const char *)page, (char *)t->cbuf, (int)PAGE_SIZE, room, 1);
#else
        n = LZ4_compress_fast_extState_fastReset(t->lz4_state, (const char *)page, (char *)t->cbuf,
                                                 (int)PAGE_SIZE, room, 1);
#endif
    } else {
        size_t r = ZSTD_compress2(t->zc, t->cbuf, (size_t)room, page, PAGE_SIZE);
        n = ZSTD_isError(r) ? 0 : (long)r;
    }
    if (n <= 0) {
        *payload = page;
        *len = PAGE_SIZE;
        return KIND_HUGE;
    }
    *payload = t->cbuf;
    *len = (uint32_t)n;
    return KIND_COMPRESSED;
}

static int decompress(Ctx *t, unsigned algo, const uint8_t *src, uint32_t n, uint8_t *dst)
{
    if (algo == ALGO_LZ4) {
        int r = LZ4_decompress_safe((const char *)src, (char *)dst, (int)n, (int)PAGE_SIZE);
        return r == (int)PAGE_SIZE ? 0 : -1;
    }
    size_t r = ZSTD_decompressDCtx(t->zd, dst, PAGE_SIZE, src, n);
    return (!ZSTD_isError(r) && r == PAGE_SIZE) ? 0 : -1;
}

/* ---- page level (store.py) -------------------------------------------------- */

/* Free what an entry named; the entry no longer names it (crash rules 1, 2). */
static void release(Engine *e, uint64_t entry)
{
    unsigned kind = entry & KIND_MASK;
    if (!kind)
        return;
    uint32_t h = (uint32_t)(entry >> HANDLE_SHIFT);
    SUB(e->pages_stored, 1);
    if (kind == KIND_SAME) {
        pool_lock(e);
        drop_handle(e, h);
        pool_unlock(e);
        SUB(e->same_pages, 1);
    } else {
        obj_free(e, h, (uint32_t)((entry >> LEN_SHIFT) & LEN_MASK));
        if (kind == KIND_HUGE)
            SUB(e->huge_pages, 1);
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

/* With page idx's entry lock held: encode (no pool lock), allocate (class and
 * pool locks), switch the entry.  *old gets the entry replaced, to release
 * once the entry lock is dropped. */
static int store_page_locked(Engine *e, Ctx *t, uint64_t idx, const uint8_t *page, int refuse, uint64_t *old)
{
    const uint8_t *payload;
    uint32_t len = 0;
    uint64_t word = 0;
    unsigned algo = (unsigned)__atomic_load_n(&e->algo, __ATOMIC_RELAXED);
    unsigned kind = encode(e, t, algo, page, &payload, &len, &word);
    *old = 0;
    if (refuse && kind != KIND_SAME)
        return ST_REFUSED;
    /* Allocate before freeing the old object: a failed store keeps the page. */
    uint32_t h;
    uint64_t entry;
    if (kind == KIND_SAME) {
        pool_lock(e);
        h = new_handle(e, word);
        pool_unlock(e);
        entry = (uint64_t)h << HANDLE_SHIFT | kind;
    } else {
        h = obj_store(e, payload, len);
        unsigned a = kind == KIND_COMPRESSED ? algo : 0;
        entry = (uint64_t)h << HANDLE_SHIFT | (uint64_t)len << LEN_SHIFT | a << 2 | kind;
    }
    if (!h)
        return ST_NOROOM;
    CHECK(idx < e->npages);
    *old = e->page[idx];
    __atomic_store_n(&e->page[idx], entry, __ATOMIC_RELEASE); /* the switch */
    if (kind == KIND_SAME)
        ADD(e->same_pages, 1);
    else if (kind == KIND_HUGE)
        ADD(e->huge_pages, 1);
    ADD(e->pages_stored, 1);
    return ST_OK;
}

/* With page idx's entry lock held: its bytes into dst (4096). */
static int load_page_locked(Engine *e, Ctx *t, uint64_t idx, uint8_t *dst)
{
    CHECK(idx < e->npages);
    uint64_t entry = __atomic_load_n(&e->page[idx], __ATOMIC_ACQUIRE);
    unsigned kind = entry & KIND_MASK;
    if (!kind) {
        memset(dst, 0, PAGE_SIZE);
        return ST_OK;
    }
    uint32_t h = (uint32_t)(entry >> HANDLE_SHIFT);
    CHECK(h <= e->max_handles);
    if (kind == KIND_SAME) {
        uint64_t w = e->handle[h];
        for (unsigned i = 0; i < PAGE_SIZE; i += 8)
            memcpy(dst + i, &w, 8);
        return ST_OK;
    }
    uint32_t n = (uint32_t)((entry >> LEN_SHIFT) & LEN_MASK);
    if (kind == KIND_HUGE) {
        obj_copy(e, h, PAGE_SIZE, dst);
        return ST_OK;
    }
    obj_copy(e, h, n, t->obuf);
    if (decompress(t, (unsigned)((entry >> 2) & 3), t->obuf, n, dst) != 0) {
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
        uint64_t idx = (offset + pos) / PAGE_SIZE;
        uint32_t within = (uint32_t)((offset + pos) % PAGE_SIZE);
        uint64_t take = PAGE_SIZE - within;
        if (take > len - pos)
            take = len - pos;
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
        if (old & KIND_MASK)
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

/* Each page's object is copied out under its entry lock, then decompressed
 * with no lock held. */
static int read_range(Engine *e, uint64_t offset, uint8_t *out, uint64_t len)
{
    Ctx *t = ctx_get(e);
    if (!t)
        return ST_NOMEM;
    uint64_t pos = 0;
    while (pos < len) {
        uint64_t idx = (offset + pos) / PAGE_SIZE;
        uint32_t within = (uint32_t)((offset + pos) % PAGE_SIZE);
        uint64_t take = PAGE_SIZE - within;
        if (take > len - pos)
            take = len - pos;
        uint8_t *dst = take == PAGE_SIZE ? out + pos : t->pbuf;
        int st = ST_OK;
        entry_lock(e, idx);
        uint64_t entry = e->page[idx];
        unsigned kind = entry & KIND_MASK;
        uint32_t n = (uint32_t)((entry >> LEN_SHIFT) & LEN_MASK);
        if (kind == KIND_COMPRESSED) {
            obj_copy(e, (uint32_t)(entry >> HANDLE_SHIFT), n, t->obuf);
            entry_unlock(e, idx);
            if (decompress(t, (unsigned)((entry >> 2) & 3), t->obuf, n, dst) != 0) {
                ADD(e->failed_reads, 1);
                st = ST_CORRUPT;
            }
        } else {
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
static unsigned long long discard_range(Engine *e, uint64_t first, uint64_t end)
{
    unsigned long long freed = 0;
    for (uint64_t idx = first; idx < end; idx++) {
        if (!(__atomic_load_n(&e->page[idx], __ATOMIC_RELAXED) & KIND_MASK))
            continue; /* empty: nothing to lock for */
        entry_lock(e, idx);
        uint64_t old = e->page[idx];
        if (old & KIND_MASK)
            __atomic_store_n(&e->page[idx], 0, __ATOMIC_RELEASE);
        entry_unlock(e, idx);
        if (old & KIND_MASK) {
            release(e, old);
            freed++;
        }
    }
    ADD(e->notify_free, freed);
    return freed;
}

/* ---- rebuild and invariants -------------------------------------------------
 *
 * The scan a new worker runs before serving (store.py's rebuild and
 * check_invariants over pool.py's begin_rebuild / claim_word / claim_object /
 * finish_rebuild / check_invariants), in one pass over the page table's
 * resident extents and then one over the pool tables.  It writes exactly what
 * the Python reference writes, in the same order where order shows (the
 * fullness lists are linked in the order the page table first names each
 * zspage; the free stacks are filled from the top id down), so both engines
 * leave the same bytes: tests/test_state.py compares them after crashes.
 * Messages are the reference's, so an operator reads the same error
 * whichever engine attached.  Scratch arrays (a byte per handle, frame and
 * zspage) are allocated here and freed before returning: this runs once per
 * takeover, never on the I/O path.
 */

#define MAX_SLOTS 2048 /* objs per zspage <= 8 frames * 4096 / 16 */

typedef struct {
    char *msg;
    size_t cap, len;
    int n;
} Errs;

static void errs_add(Errs *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void errs_add(Errs *b, const char *fmt, ...)
{
    if (b->n++ >= 20) /* as pool.check_invariants: the first 20 */
        return;
    if (b->len && b->len + 2 < b->cap) {
        memcpy(b->msg + b->len, "; ", 2);
        b->len += 2;
    }
    if (b->len + 1 >= b->cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(b->msg + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (w > 0)
        b->len += (size_t)w < b->cap - b->len ? (size_t)w : b->cap - b->len - 1;
}

typedef struct {
    uint8_t *claimed; /* per handle */
    uint8_t *owned;   /* per frame */
    uint8_t *seen;    /* per zspage */
    uint32_t *live;   /* zspages in the order first claimed */
    uint32_t nlive;
    char *err;
    size_t errlen;
} Scan;

#define FAIL(s, ...)                                                                              \
    do {                                                                                          \
        snprintf((s)->err, (s)->errlen, __VA_ARGS__);                                             \
        return -1;                                                                                \
    } while (0)

/* The rebuild runs under lock_all; the fields that are also read unlocked
 * (see the top) are still stored with STORE. */
static void rebuild_begin(Engine *e)
{
    e->frames_made = e->cold_top = 0;
    STORE(e->hot_top, 0);
    STORE(e->frames_used, 0);
    e->zs_free_top = e->zs_made = 0;
    e->handle_free_top = 0;
    STORE(e->handles_made, 0);
    STORE(e->handles_used, 0);
    memset(e->heads, 0, sizeof e->heads);
    memset(e->nonempty, 0, sizeof e->nonempty);
    for (int c = 0; c < MAX_CLASSES; c++) {
        STORE(e->cls_zspages[c], 0);
        STORE(e->cls_used[c], 0);
        STORE(e->fragmented[c], 0);
    }
    STORE(e->huge_objects, 0);
    STORE(e->obj_bytes, 0);
}

static int claim_handle(Engine *e, Scan *s, uint64_t h)
{
    if (!h || h > e->max_handles)
        FAIL(s, "a page names handle %llu, outside 1..%u", (unsigned long long)h, e->max_handles);
    if (s->claimed[h])
        FAIL(s, "handle %llu is named by two pages", (unsigned long long)h);
    s->claimed[h] = 1;
    if (h > e->handles_made)
        STORE(e->handles_made, (uint32_t)h);
    STORE(e->handles_used, e->handles_used + 1);
    return 0;
}

static int own_frame(Engine *e, Scan *s, uint64_t frame, const char *what, uint64_t id)
{
    if (frame >= e->max_frames)
        FAIL(s, "%s %llu names frame %llu, outside 0..%u", what, (unsigned long long)id,
             (unsigned long long)frame, e->max_frames - 1);
    if (s->owned[frame])
        FAIL(s, "frame %llu is owned twice (%s %llu)", (unsigned long long)frame, what, (unsigned long long)id);
    s->owned[frame] = 1;
    STORE(e->frames_used, e->frames_used + 1);
    if (frame >= e->frames_made)
        e->frames_made = (uint32_t)frame + 1;
    return 0;
}

static int claim_object(Engine *e, Scan *s, uint64_t h, uint32_t n)
{
    if (claim_handle(e, s, h) < 0)
        return -1;
    uint64_t loc = e->handle[h];
    if (n == FRAME_SIZE) {
        if (!(loc & HUGE_LOC))
            FAIL(s, "handle %llu holds a raw page but its entry 0x%llx is not a huge location",
                 (unsigned long long)h, (unsigned long long)loc);
        if (own_frame(e, s, loc & FRAME_MASK, "huge handle", h) < 0)
            return -1;
        ADD(e->huge_objects, 1);
        ADD(e->obj_bytes, n);
        return 0;
    }
    if ((loc & HUGE_LOC) || !(n > 0 && n < e->huge_threshold))
        FAIL(s, "handle %llu of a %u-byte object has entry 0x%llx", (unsigned long long)h, n,
             (unsigned long long)loc);
    uint64_t z = loc >> 16;
    uint32_t slot = (uint32_t)(loc & 0xFFFF);
    if (!(z > 0 && z < (uint64_t)e->max_frames + 1))
        FAIL(s, "handle %llu points into zspage %llu, outside 1..%u", (unsigned long long)h,
             (unsigned long long)z, e->max_frames);
    if (!s->seen[z]) { /* first claim into z: check and own its chain */
        unsigned cls = e->zs_class[z];
        if (cls >= (unsigned)e->ncls)
            FAIL(s, "zspage %llu has class %u, there are %d", (unsigned long long)z, cls, e->ncls);
        uint32_t frame = e->zs_first[z];
        for (unsigned i = 0; i < e->cframes[cls]; i++) {
            if (i)
                frame = e->frame_next[frame]; /* frame < max_frames: owned just before */
            if (own_frame(e, s, frame, "zspage", z) < 0)
                return -1;
        }
        s->seen[z] = 1;
        e->zs_inuse[z] = 0;
        s->live[s->nlive++] = (uint32_t)z;
        if (z > e->zs_made)
            e->zs_made = (uint32_t)z;
    }
    unsigned cls = e->zs_class[z];
    if (slot >= e->cobjs[cls] || e->class_of[n + HEADER] != cls)
        FAIL(s, "handle %llu: slot %u of zspage %llu (class %u) cannot hold %u bytes", (unsigned long long)h, slot,
             (unsigned long long)z, e->csize[cls], n);
    uint32_t off, frame = zs_frame_at(e, (uint32_t)z, slot * e->csize[cls], &off);
    uint32_t hdr = *slot_word(e, frame, off);
    if (hdr != h)
        FAIL(s, "handle %llu points to slot %u of zspage %llu, whose header names 0x%x", (unsigned long long)h, slot,
             (unsigned long long)z, hdr);
    e->zs_inuse[z]++;
    STORE(e->cls_used[cls], e->cls_used[cls] + 1);
    ADD(e->obj_bytes, n);
    return 0;
}

/* The page table, as store.rebuild walks it.  counts: stored, same, huge. */
static int rebuild_claim_pages(Engine *e, Scan *s, const uint64_t *ext, size_t next, unsigned nalgos,
                               unsigned long long counts[3])
{
    char inner[512];
    for (size_t x = 0; x < next; x++) {
        for (uint64_t idx = ext[2 * x]; idx < ext[2 * x + 1]; idx++) {
            uint64_t entry = e->page[idx];
            unsigned kind = entry & KIND_MASK;
            if (!kind)
                continue;
            uint64_t h = entry >> HANDLE_SHIFT;
            if ((entry & (1ull << 63)) || ((entry >> 17) & 0x7FFF))
                FAIL(s, "page %llu: entry 0x%llx has bits set that no entry uses", (unsigned long long)idx,
                     (unsigned long long)entry);
            counts[0]++;
            int r;
            char *outer = s->err;
            size_t outer_len = s->errlen;
            s->err = inner;
            s->errlen = sizeof inner;
            if (kind == KIND_SAME) {
                r = claim_handle(e, s, h);
                counts[1]++;
            } else {
                uint32_t n = (uint32_t)((entry >> LEN_SHIFT) & LEN_MASK);
                if ((kind == KIND_HUGE) != (n == PAGE_SIZE) || ((entry >> 2) & 0x3) >= nalgos) {
                    snprintf(inner, sizeof inner, "entry 0x%llx has a bad length or algorithm for its kind",
                             (unsigned long long)entry);
                    r = -1;
                } else {
                    r = claim_object(e, s, h, n);
                    counts[2] += kind == KIND_HUGE;
                }
            }
            s->err = outer;
            s->errlen = outer_len;
            if (r < 0)
                FAIL(s, "page %llu: %s", (unsigned long long)idx, inner);
        }
    }
    return 0;
}

/* pool.finish_rebuild: free what nothing claimed and rebuild every index. */
static int rebuild_finish(Engine *e, Scan *s)
{
    uint32_t top = 0;
    for (uint32_t h = e->handles_made; h > 0; h--)
        if (!s->claimed[h])
            e->handle_stack[top++] = h;
    e->handle_free_top = top;

    uint16_t freeslots[MAX_SLOTS];
    for (uint32_t i = 0; i < s->nlive; i++) {
        uint32_t z = s->live[i];
        unsigned cls = e->zs_class[z], objs = e->cobjs[cls], size = e->csize[cls];
        uint32_t chain[MAX_FRAMES_PER_ZSPAGE];
        chain[0] = e->zs_first[z];
        for (unsigned k = 1; k < e->cframes[cls]; k++)
            chain[k] = e->frame_next[chain[k - 1]];
        unsigned nfree = 0;
        for (unsigned slot = 0; slot < objs; slot++) {
            uint32_t offset = slot * size;
            uint32_t hdr = *slot_word(e, chain[offset >> FRAME_SHIFT], offset & (FRAME_SIZE - 1));
            if ((hdr & FREE_TAG) || !hdr || hdr > e->max_handles || !s->claimed[hdr])
                freeslots[nfree++] = (uint16_t)slot;
            else if (e->handle[hdr] != ((uint64_t)z << 16 | slot))
                freeslots[nfree++] = (uint16_t)slot; /* the other copy of a compaction move */
        }
        if (objs - nfree != e->zs_inuse[z])
            FAIL(s, "zspage %u: %u claims, %u owned slots", z, e->zs_inuse[z], objs - nfree);
        uint32_t nxt = SLOT_END;
        for (unsigned k = nfree; k-- > 0;) {
            uint32_t offset = freeslots[k] * size;
            *slot_word(e, chain[offset >> FRAME_SHIFT], offset & (FRAME_SIZE - 1)) = FREE_TAG | nxt;
            nxt = freeslots[k];
        }
        e->zs_free[z] = (uint16_t)nxt;
        STORE(e->cls_zspages[cls], e->cls_zspages[cls] + 1);
        e->zs_group[z] = 0;
        link_zs(e, z, cls, group_of(e->zs_inuse[z], objs));
        if (nfree)
            STORE(e->fragmented[cls], 1);
    }
    top = 0;
    for (uint32_t z = e->zs_made; z > 0; z--)
        if (!s->seen[z])
            e->zs_stack[top++] = z;
    e->zs_free_top = top;

    /* Frames: punch every free one (it may hold a dead object) and keep it
     * cold, lowest on top; punch everything above the highest owned at once. */
    uint32_t made = e->frames_made, nfree = 0;
    for (uint32_t f = 0; f < made; f++)
        nfree += !s->owned[f];
    uint32_t k = nfree, run = UINT32_MAX;
    for (uint32_t f = 0; f < made; f++) {
        if (s->owned[f])
            continue;
        e->cold[--k] = f;
        if (run == UINT32_MAX)
            run = f;
        if (f + 1 == made || s->owned[f + 1]) {
            if (punch(e, run, f + 1 - run) < 0)
                FAIL(s, "punching frames %u+%u out of the arena memfd failed: %s", run, f + 1 - run,
                     strerror(LOAD(e->punch_errno)));
            run = UINT32_MAX;
        }
    }
    if (punch(e, made, e->max_frames - made) < 0)
        FAIL(s, "punching frames %u+%u out of the arena memfd failed: %s", made, e->max_frames - made,
             strerror(LOAD(e->punch_errno)));
    e->cold_top = nfree;
    return 0;
}

static int rebuild_all(Engine *e, const uint64_t *ext, size_t next, unsigned nalgos, unsigned long long counts[3],
                       char *err, size_t errlen)
{
    Scan s = {0};
    s.err = err;
    s.errlen = errlen;
    s.claimed = calloc((size_t)e->max_handles + 1, 1);
    s.owned = calloc(e->max_frames, 1);
    s.seen = calloc((size_t)e->max_frames + 1, 1);
    s.live = malloc(((size_t)e->max_frames + 1) * sizeof *s.live);
    int r = -1;
    if (!s.claimed || !s.owned || !s.seen || !s.live) {
        snprintf(err, errlen, "out of memory for the rebuild scan");
    } else {
        rebuild_begin(e);
        counts[0] = counts[1] = counts[2] = 0;
        r = rebuild_claim_pages(e, &s, ext, next, nalgos, counts);
        if (r == 0)
            r = rebuild_finish(e, &s);
    }
    free(s.claimed);
    free(s.owned);
    free(s.seen);
    free(s.live);
    return r;
}

/* store.check_invariants + pool.check_invariants.  Returns -1 with `fatal`
 * set for what the reference raises at once (a handle named twice, counters
 * that disagree with the page table), else 0 with any broken invariant in
 * `b`.  It also checks, where the reference compares sets, that the header
 * of each owned slot names its owner (which implies the reference's set
 * checks and is what makes two owners of one slot visible). */
static int check_all(Engine *e, const uint64_t *ext, size_t next, Errs *b, char *fatal, size_t fatlen)
{
    uint32_t hm = e->handles_made, zm = e->zs_made, fm = e->frames_made;
    uint32_t maxz = e->max_frames; /* zspage ids are 1..max_frames */
    uint8_t *own = calloc((size_t)e->max_handles + 1, 1);
    uint8_t *hmark = calloc((size_t)e->max_handles + 1, 1);
    uint32_t *zcnt = calloc((size_t)maxz + 1, sizeof *zcnt);
    uint8_t *zfree = calloc((size_t)maxz + 1, 1);
    uint8_t *lgroup = calloc((size_t)maxz + 1, 1);
    uint8_t *fown = calloc(e->max_frames, 1);
    uint8_t *fmark = calloc(e->max_frames, 1);
    int r = -1;
    if (!own || !hmark || !zcnt || !zfree || !lgroup || !fown || !fmark) {
        snprintf(fatal, fatlen, "out of memory for the invariant check");
        goto out;
    }
    if (hm > e->max_handles || zm > maxz || fm > e->max_frames) {
        snprintf(fatal, fatlen, "volatile counts out of range: %u handles, %u zspages, %u frames made", hm, zm, fm);
        goto out;
    }
    /* The page table: owners, and each owned object against the tables. */
    unsigned long long stored = 0, same = 0, huge_pages = 0, nowners = 0, obj_bytes = 0, huge = 0, nfown = 0;
    for (size_t x = 0; x < next; x++) {
        for (uint64_t idx = ext[2 * x]; idx < ext[2 * x + 1]; idx++) {
            uint64_t entry = e->page[idx];
            unsigned kind = entry & KIND_MASK;
            if (!kind)
                continue;
            uint64_t h = entry >> HANDLE_SHIFT;
            if (h <= e->max_handles) {
                if (own[h]) {
                    snprintf(fatal, fatlen, "page %llu names handle %llu, which another page names too",
                             (unsigned long long)idx, (unsigned long long)h);
                    goto out;
                }
                own[h] = 1;
            }
            stored++;
            same += kind == KIND_SAME;
            huge_pages += kind == KIND_HUGE;
            nowners++;
            if (!h || h > hm) {
                errs_add(b, "owned handle %llu is outside 1..%u", (unsigned long long)h, hm);
                continue;
            }
            if (kind == KIND_SAME)
                continue;
            uint32_t n = (uint32_t)((entry >> LEN_SHIFT) & LEN_MASK);
            obj_bytes += n;
            uint64_t loc = e->handle[h];
            if (n == FRAME_SIZE) {
                huge++;
                uint64_t frame = loc & FRAME_MASK;
                if (!(loc & HUGE_LOC) || frame >= fm) {
                    errs_add(b, "huge handle %llu has entry 0x%llx", (unsigned long long)h, (unsigned long long)loc);
                } else if (fown[frame]) {
                    errs_add(b, "frame %llu owned by huge handle %llu and another owner", (unsigned long long)frame,
                             (unsigned long long)h);
                } else {
                    fown[frame] = 1;
                    nfown++;
                }
                continue;
            }
            uint64_t z = loc >> 16;
            if ((loc & HUGE_LOC) || !(z > 0 && z <= zm)) {
                errs_add(b, "handle %llu has entry 0x%llx", (unsigned long long)h, (unsigned long long)loc);
                continue;
            }
            zcnt[z]++;
            unsigned cls = e->zs_class[z];
            if (cls < (unsigned)e->ncls && (loc & 0xFFFF) >= e->cobjs[cls])
                errs_add(b, "zspage %llu: slot %llu beyond %u", (unsigned long long)z,
                         (unsigned long long)(loc & 0xFFFF), e->cobjs[cls]);
        }
    }
    if (stored != e->pages_stored || same != e->same_pages || huge_pages != e->huge_pages) {
        snprintf(fatal, fatlen,
                 "counters say %llu stored, %llu same-filled, %llu huge pages; the page table holds %llu, %llu, %llu",
                 e->pages_stored, e->same_pages, e->huge_pages, stored, same, huge_pages);
        goto out;
    }
    /* Handles: owned once (above), free once, nothing lost. */
    uint32_t ftop = e->handle_free_top;
    if (ftop > e->max_handles + 1u) {
        errs_add(b, "the free handle stack top %u is beyond the table", ftop);
        ftop = 0;
    }
    int dup = 0;
    for (uint32_t i = 0; i < ftop; i++) {
        uint32_t h = e->handle_stack[i];
        if (h <= e->max_handles) {
            dup |= hmark[h];
            hmark[h] = 1;
        }
        if (!h || h > hm || own[h])
            errs_add(b, "free handle %u is out of range or owned", h);
    }
    if (dup)
        errs_add(b, "a handle is on the free stack twice");
    if (nowners + ftop != hm)
        errs_add(b, "%llu owned + %u free handles != %u made", nowners, ftop, hm);
    if (e->handles_used != nowners)
        errs_add(b, "handles_used %u != %llu owned", e->handles_used, nowners);
    if (obj_bytes != LOAD(e->obj_bytes))
        errs_add(b, "obj_bytes %llu != %llu owned", LOAD(e->obj_bytes), obj_bytes);
    if (huge != LOAD(e->huge_objects))
        errs_add(b, "huge_objects %llu != %llu owned", LOAD(e->huge_objects), huge);
    /* Zspages: the free stack, the fullness lists, then each live one. */
    uint32_t ztop = e->zs_free_top;
    if (ztop > maxz + 1u) {
        errs_add(b, "the free zspage stack top %u is beyond the table", ztop);
        ztop = 0;
    }
    int zbad = 0;
    for (uint32_t i = 0; i < ztop; i++) {
        uint32_t z = e->zs_stack[i];
        if (!z || z > zm || zfree[z])
            zbad = 1;
        else
            zfree[z] = 1;
    }
    if (zbad)
        errs_add(b, "the free zspage stack has duplicates or ids out of range");
    for (int cls = 0; cls < e->ncls; cls++) {
        for (unsigned group = 1; group <= GROUPS; group++) {
            uint32_t z = e->heads[cls * (GROUPS + 1) + group];
            if (!!z != !!(e->nonempty[cls] & 1u << group))
                errs_add(b, "class %d group %u: nonempty bit disagrees with the list", cls, group);
            uint32_t prev = 0;
            while (z) {
                if (z > maxz || lgroup[z]) {
                    errs_add(b, "zspage %u is on two fullness lists (or a list loops)", z);
                    break;
                }
                lgroup[z] = (uint8_t)group;
                if (e->zs_prev[z] != prev || e->zs_class[z] != cls)
                    errs_add(b, "zspage %u: bad back link or class on list %d/%u", z, cls, group);
                prev = z;
                z = e->zs_next[z];
            }
        }
    }
    unsigned long long cls_zspages[MAX_CLASSES] = {0}, cls_used[MAX_CLASSES] = {0};
    for (uint32_t z = 1; z <= zm; z++) {
        if (zfree[z]) {
            if (zcnt[z])
                errs_add(b, "zspage %u is free but %u handles point into it", z, zcnt[z]);
            continue;
        }
        unsigned cls = e->zs_class[z];
        if (cls >= (unsigned)e->ncls) {
            errs_add(b, "zspage %u has class %u", z, cls);
            continue;
        }
        unsigned objs = e->cobjs[cls], size = e->csize[cls];
        cls_zspages[cls]++;
        uint32_t chain[MAX_FRAMES_PER_ZSPAGE];
        int chain_ok = 1;
        uint32_t frame = e->zs_first[z];
        for (unsigned i = 0; i < e->cframes[cls]; i++) {
            if (i) {
                if (frame >= e->max_frames) {
                    chain_ok = 0;
                    break;
                }
                frame = e->frame_next[frame];
            }
            chain[i] = frame;
            if (frame >= fm) {
                errs_add(b, "zspage %u chains frame %u beyond %u made", z, frame, fm);
                chain_ok = 0;
            } else if (fown[frame]) {
                errs_add(b, "frame %u owned by zspage %u and another owner", frame, z);
            } else {
                fown[frame] = 1;
                nfown++;
            }
        }
        uint32_t used = zcnt[z];
        cls_used[cls] += used;
        if (e->zs_inuse[z] != used || !used)
            errs_add(b, "zspage %u: inuse %u, %u owned objects", z, e->zs_inuse[z], used);
        if (chain_ok) {
            /* Owned slots: their header names a handle that points back. */
            unsigned named = 0;
            for (unsigned slot = 0; slot < objs; slot++) {
                uint32_t offset = slot * size;
                uint32_t hdr = *slot_word(e, chain[offset >> FRAME_SHIFT], offset & (FRAME_SIZE - 1));
                if (!(hdr & FREE_TAG) && hdr && hdr <= e->max_handles && own[hdr] &&
                    e->handle[hdr] == ((uint64_t)z << 16 | slot))
                    named++;
            }
            if (named != used)
                errs_add(b, "zspage %u: %u objects point into it, %u slot headers name their owner", z, used, named);
            /* The free list threads exactly the unowned slots. */
            uint8_t seen[MAX_SLOTS / 8] = {0};
            unsigned nseen = 0;
            uint32_t slot = e->zs_free[z];
            while (slot != SLOT_END && nseen <= objs) {
                if (slot >= objs || seen[slot >> 3] & (1u << (slot & 7))) {
                    errs_add(b, "zspage %u: free list reaches slot %u twice, owned or out of range", z, slot);
                    break;
                }
                seen[slot >> 3] |= (uint8_t)(1u << (slot & 7));
                nseen++;
                uint32_t offset = slot * size;
                uint32_t hdr = *slot_word(e, chain[offset >> FRAME_SHIFT], offset & (FRAME_SIZE - 1));
                if (!(hdr & FREE_TAG)) {
                    errs_add(b, "zspage %u: free slot %u has an owned header 0x%x", z, slot, hdr);
                    break;
                }
                slot = hdr & 0xFFFF;
            }
            if (nseen + used != objs)
                errs_add(b, "zspage %u: %u free + %u owned slots != %u", z, nseen, used, objs);
        }
        unsigned group = group_of(e->zs_inuse[z], objs);
        unsigned listed = lgroup[z] ? lgroup[z] : GROUP_FULL;
        if (e->zs_group[z] != group || listed != group)
            errs_add(b, "zspage %u: group %u, listed in %u, should be %u", z, e->zs_group[z], lgroup[z], group);
    }
    for (int cls = 0; cls < e->ncls; cls++) {
        if (cls_zspages[cls] != e->cls_zspages[cls]) {
            errs_add(b, "per-class zspage counts are wrong");
            break;
        }
    }
    for (int cls = 0; cls < e->ncls; cls++) {
        if (cls_used[cls] != e->cls_used[cls]) {
            errs_add(b, "per-class object counts are wrong");
            break;
        }
    }
    /* Frames: owned ones once, free ones once on the hot or cold stack. */
    if (e->frames_used != nfown)
        errs_add(b, "frames_used %u != %llu owned", e->frames_used, nfown);
    unsigned long long nstack = 0;
    int fdup = 0;
    uint32_t tops[2] = {e->hot_top, e->cold_top};
    const uint32_t *stacks[2] = {e->hot, e->cold};
    for (int k = 0; k < 2; k++) {
        if (tops[k] > e->max_frames) {
            errs_add(b, "a free frame stack top %u is beyond the table", tops[k]);
            continue;
        }
        for (uint32_t i = 0; i < tops[k]; i++) {
            uint32_t f = stacks[k][i];
            nstack++;
            if (f >= fm || fown[f]) {
                errs_add(b, "free frame %u is owned or out of range", f);
                continue;
            }
            fdup |= fmark[f];
            fmark[f] = 1;
        }
    }
    if (fdup)
        errs_add(b, "a free frame is on the hot/cold stacks twice");
    if (nstack + nfown != fm)
        errs_add(b, "%llu free + %llu owned frames != %u made", nstack, nfown, fm);
    r = 0;
out:
    free(own);
    free(hmark);
    free(zcnt);
    free(zfree);
    free(lgroup);
    free(fown);
    free(fmark);
    return r;
}

/* ---- Python glue ---------------------------------------------------------------- */

static PyObject *raise_status(Engine *e, int st)
{
    switch (st) {
    case ST_CORRUPT:
        PyErr_SetString(PyExc_ValueError, "corrupt object: it did not decompress to a 4096-byte page");
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
    default:
        PyErr_Format(PyExc_RuntimeError, "engine status %d", st);
    }
    return NULL;
}

static void engine_release_buffers(Engine *e)
{
    for (int i = 0; i < e->nbufs; i++)
        PyBuffer_Release(&e->bufs[i]);
    e->nbufs = 0;
    e->page = NULL;
    e->arena = NULL;
}

static void Engine_dealloc(Engine *e)
{
    engine_release_buffers(e);
    PyMem_RawFree(e->elock);
    e->elock = NULL;
    if (e->locks_ready) {
        pthread_mutex_destroy(&e->pool_lock);
        for (int c = 0; c < MAX_CLASSES; c++)
            pthread_mutex_destroy(&e->cls_lock[c]);
    }
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* zstd accepts `level` (checked on this thread's context). */
static int check_zstd_level(int level)
{
    Ctx *t = tls_ctx;
    ZSTD_CCtx *zc = t ? t->zc : ZSTD_createCCtx();
    int r = zc ? set_zstd_level(zc, level) : -1;
    if (t)
        t->zlevel = INT_MIN; /* re-set at next use */
    else
        ZSTD_freeCCtx(zc);
    if (r < 0)
        PyErr_Format(PyExc_ValueError, "zstd refuses level %d", level);
    return r;
}

/* Engine(buffers: dict name -> buffer, arena_fd, npages, max_frames,
 *        max_handles, classes: [(size, frames, objs)], class_of: bytes(4097),
 *        huge_threshold, reserve_frames, algo, zstd_level) */
static int Engine_init(Engine *e, PyObject *args, PyObject *Py_UNUSED(kw))
{
    PyObject *bufs, *classes;
    Py_buffer class_of;
    unsigned long long npages;
    unsigned int max_frames, max_handles;
    if (e->nbufs) {
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
    const Py_ssize_t want[NBUF] = {
        (Py_ssize_t)npages, (Py_ssize_t)max_handles + 1, (Py_ssize_t)max_frames + 1, (Py_ssize_t)max_frames + 1,
        max_frames, (Py_ssize_t)max_frames + 1, (Py_ssize_t)max_frames + 1, (Py_ssize_t)max_frames + 1,
        (Py_ssize_t)max_frames + 1, (Py_ssize_t)max_frames + 1, (Py_ssize_t)max_frames + 1, max_frames, max_frames,
        (Py_ssize_t)max_handles + 1, (Py_ssize_t)max_frames * FRAME_SIZE,
    };
    void *ptrs[NBUF];
    for (int i = 0; i < NBUF; i++) {
        PyObject *o = PyDict_GetItemString(bufs, buf_names[i]);
        if (!o) {
            PyErr_Format(PyExc_KeyError, "state buffer %s is missing", buf_names[i]);
            goto out;
        }
        if (PyObject_GetBuffer(o, &e->bufs[e->nbufs], PyBUF_WRITABLE) < 0)
            goto out;
        Py_buffer *b = &e->bufs[e->nbufs++];
        if (b->len < want[i] * buf_item[i]) {
            PyErr_Format(StateError, "state table %s is %zd bytes, the geometry needs %zd", buf_names[i], b->len,
                         want[i] * buf_item[i]);
            goto out;
        }
        ptrs[i] = b->buf;
    }
    e->page = ptrs[T_PAGE];
    e->handle = ptrs[T_HANDLE];
    e->zs_first = ptrs[T_ZS_FIRST];
    e->zs_class = ptrs[T_ZS_CLASS];
    e->frame_next = ptrs[T_FRAME_NEXT];
    e->zs_inuse = ptrs[T_ZS_INUSE];
    e->zs_free = ptrs[T_ZS_FREE];
    e->zs_next = ptrs[T_ZS_NEXT];
    e->zs_prev = ptrs[T_ZS_PREV];
    e->zs_group = ptrs[T_ZS_GROUP];
    e->zs_stack = ptrs[T_ZS_STACK];
    e->hot = ptrs[T_HOT];
    e->cold = ptrs[T_COLD];
    e->handle_stack = ptrs[T_HANDLE_STACK];
    e->arena = ptrs[T_ARENA];

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
        engine_release_buffers(e);
    return ok ? 0 : -1;
}

#define READY(e)                                                                                  \
    do {                                                                                          \
        if (!(e)->arena) {                                                                        \
            PyErr_SetString(PyExc_ValueError, "engine is closed");                                \
            return NULL;                                                                          \
        }                                                                                         \
    } while (0)

/* Run `stmt` with the GIL released; it takes the engine's own locks. */
#define NOGIL(stmt)                                                                               \
    do {                                                                                          \
        Py_BEGIN_ALLOW_THREADS stmt;                                                              \
        Py_END_ALLOW_THREADS                                                                      \
    } while (0)

static PyObject *range_error(unsigned long long off, unsigned long long len, unsigned long long size)
{
    PyErr_Format(PyExc_ValueError, "range %llu+%llu is beyond the device size %llu", off, len, size);
    return NULL;
}

/* write(offset, data, refuse) -> (bytes done, status) */
static PyObject *Engine_write(Engine *e, PyObject *args)
{
    unsigned long long offset;
    Py_buffer data;
    int refuse;
    READY(e);
    if (!PyArg_ParseTuple(args, "Ky*p", &offset, &data, &refuse))
        return NULL;
    if (offset > e->npages * PAGE_SIZE || (unsigned long long)data.len > e->npages * PAGE_SIZE - offset) {
        PyBuffer_Release(&data);
        return range_error(offset, (unsigned long long)data.len, e->npages * PAGE_SIZE);
    }
    uint64_t done = 0;
    int st;
    NOGIL(st = write_range(e, offset, data.buf, (uint64_t)data.len, refuse, &done));
    PyBuffer_Release(&data);
    if (st == ST_PUNCH || st == ST_NOMEM)
        return raise_status(e, st);
    return Py_BuildValue("Ki", (unsigned long long)done, st);
}

/* readinto(offset, out) -> bytes read */
static PyObject *Engine_readinto(Engine *e, PyObject *args)
{
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
static PyObject *Engine_discard_pages(Engine *e, PyObject *args)
{
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

static PyObject *Engine_compact(Engine *e, PyObject *args, PyObject *kw)
{
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

static PyObject *Engine_trim(Engine *e, PyObject *Py_UNUSED(a))
{
    long n;
    READY(e);
    NOGIL(n = trim(e));
    if (n < 0)
        return raise_status(e, ST_PUNCH);
    return PyLong_FromLong(n);
}

static PyObject *Engine_refill_reserve(Engine *e, PyObject *Py_UNUSED(a))
{
    long n;
    READY(e);
    NOGIL(n = refill_reserve(e));
    return PyLong_FromLong(n);
}

static PyObject *Engine_set_codec(Engine *e, PyObject *args)
{
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

/* ---- the pool's object API (pool tests run it against both engines) ---------- */

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

static PyObject *Engine_store(Engine *e, PyObject *arg)
{
    Py_buffer data;
    READY(e);
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = data.len;
    PyObject *res = NULL;
    if (n > (Py_ssize_t)FRAME_SIZE) {
        PyErr_Format(PoolError, "object of %zd bytes is larger than a frame (%u)", n, FRAME_SIZE);
    } else if (n == 0) {
        PyErr_SetString(PoolError, "empty object");
    } else if (n != (Py_ssize_t)FRAME_SIZE && n + HEADER > FRAME_SIZE) {
        PyErr_Format(PoolError, "object of %zd bytes needs the raw page form (>= %u)", n, e->huge_threshold);
    } else {
        uint32_t h;
        NOGIL(h = obj_store(e, data.buf, (uint32_t)n));
        if (!h)
            PyErr_SetString(PoolFull, "no room for the object (frames or handles)");
        else
            res = PyLong_FromUnsignedLong(h);
    }
    PyBuffer_Release(&data);
    return res;
}

static PyObject *Engine_load(Engine *e, PyObject *args)
{
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

static PyObject *Engine_free(Engine *e, PyObject *args)
{
    unsigned long long h;
    unsigned int n;
    READY(e);
    if (handle_len_args(e, args, &h, &n) < 0)
        return NULL;
    NOGIL(obj_free(e, (uint32_t)h, n));
    Py_RETURN_NONE;
}

static PyObject *Engine_store_word(Engine *e, PyObject *arg)
{
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

static PyObject *Engine_word(Engine *e, PyObject *arg)
{
    unsigned long long h;
    READY(e);
    if (handle_arg(e, arg, &h) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(e->handle[h]);
}

static PyObject *Engine_free_word(Engine *e, PyObject *arg)
{
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

static PyObject *Engine_freeable(Engine *e, PyObject *arg)
{
    long cls = PyLong_AsLong(arg);
    if (cls == -1 && PyErr_Occurred())
        return NULL;
    if (cls < 0 || cls >= e->ncls) {
        PyErr_Format(PoolError, "no size class %ld", cls);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(freeable(e, (unsigned)cls));
}

static PyObject *Engine_freeable_frames(Engine *e, PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLongLong(freeable_frames(e));
}

static PyObject *Engine_frame_room(Engine *e, PyObject *Py_UNUSED(a))
{
    return PyLong_FromLongLong(frame_room(e));
}

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
static PyObject *u64_list(const unsigned long long *v, int n)
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
static PyObject *Engine_volatile(Engine *e, PyObject *Py_UNUSED(a))
{
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
static PyObject *Engine_set_volatile(Engine *e, PyObject *d)
{
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

/* extents: a list of (first, end) page ranges, within the device. */
static uint64_t *parse_extents(Engine *e, PyObject *list, size_t *n)
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
        if (first > end || end > e->npages) {
            PyErr_Format(PyExc_ValueError, "extent %llu..%llu is outside the page table (%llu pages)", first, end,
                         (unsigned long long)e->npages);
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
static PyObject *Engine_rebuild(Engine *e, PyObject *args)
{
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
    return Py_BuildValue("KKK", counts[0], counts[1], counts[2]);
}

/* check_invariants(extents): raises StateError as store.check_invariants. */
static PyObject *Engine_check_pages(Engine *e, PyObject *args)
{
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

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(a))
{
    if (e->locks_ready) {
        /* The FUSE threads are stopped first (NativeServer.stop); the locks
         * wait out any call still running from another Python thread. */
        lock_all(e);
        engine_release_buffers(e);
        unlock_all(e);
    }
    Py_RETURN_NONE;
}

static PyObject *get_cls_zspages(Engine *e, void *Py_UNUSED(c)) { return u64_list(e->cls_zspages, e->ncls); }
static PyObject *get_cls_used(Engine *e, void *Py_UNUSED(c)) { return u64_list(e->cls_used, e->ncls); }
/* The getters hold no engine lock: every figure they read is LOAD/STORE
 * (see the top), so a reading thread sees a recent value, never a torn one. */
static PyObject *get_frames_used(Engine *e, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLong(LOAD(e->frames_used)); }
static PyObject *get_handles_used(Engine *e, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLong(LOAD(e->handles_used)); }
static PyObject *get_mem_used_total(Engine *e, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong((unsigned long long)LOAD(e->frames_used) * FRAME_SIZE);
}
static PyObject *get_reserve_bytes(Engine *e, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong((unsigned long long)LOAD(e->hot_top) * FRAME_SIZE);
}
static PyObject *get_frame_limit(Engine *e, void *Py_UNUSED(c)) { return PyLong_FromLongLong(LOAD(e->frame_limit)); }
static int set_frame_limit(Engine *e, PyObject *v, void *Py_UNUSED(c))
{
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

/* The counters (store.Counters' names) and the other atomic totals, as
 * attributes: a PyMemberDef would read and write them with plain accesses
 * while the engine's threads ADD to them.  closure: the field's offset. */
#define FIELD_U64(e, c) ((unsigned long long *)((char *)(e) + (size_t)(c)))
static PyObject *get_u64_field(Engine *e, void *c) { return PyLong_FromUnsignedLongLong(LOAD(*FIELD_U64(e, c))); }
static int set_u64_field(Engine *e, PyObject *v, void *c)
{
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

static PyObject *get_full(Engine *e, void *Py_UNUSED(c)) { return PyLong_FromLong(LOAD(e->full)); }
static int set_full(Engine *e, PyObject *v, void *Py_UNUSED(c))
{
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

#define COUNTERS(X)                                                                               \
    X(num_reads) X(num_writes) X(failed_reads) X(failed_writes) X(notify_free) X(same_pages)      \
        X(huge_pages) X(pages_stored) X(mem_used_max) X(compactions) X(limit_hits)
#define COUNTER_NAME(f) #f,
#define COUNTER_OFFSET(f) offsetof(Engine, f),
static const char *const counter_names[] = {COUNTERS(COUNTER_NAME)};
static const size_t counter_offsets[] = {COUNTERS(COUNTER_OFFSET)};
#define NCOUNTERS (sizeof counter_offsets / sizeof counter_offsets[0])

/* count(name, n=1): add n to counter `name` atomically.  Python's way to bump
 * a counter: `engine.num_writes += 1` is a load and a store, and a native
 * thread's bump in between would be lost. */
static PyObject *Engine_count(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
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
    COUNTERS(COUNTER_GETSET)
    {"pages_compacted", (getter)get_u64_field, (setter)set_u64_field, NULL, (void *)offsetof(Engine, pages_compacted)},
    {"huge_objects", (getter)get_u64_field, NULL, NULL, (void *)offsetof(Engine, huge_objects)},
    {"obj_bytes", (getter)get_u64_field, NULL, NULL, (void *)offsetof(Engine, obj_bytes)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Engine_members[] = {
    {"huge_threshold", T_UINT, offsetof(Engine, huge_threshold), READONLY, NULL},
    {"reserve_frames", T_UINT, offsetof(Engine, reserve_frames), READONLY, NULL},
    {"max_frames", T_UINT, offsetof(Engine, max_frames), READONLY, NULL},
    {"max_handles", T_UINT, offsetof(Engine, max_handles), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Engine_methods[] = {
    {"write", (PyCFunction)Engine_write, METH_VARARGS, "write(offset, data, refuse) -> (bytes done, status)"},
    {"readinto", (PyCFunction)Engine_readinto, METH_VARARGS, "readinto(offset, out) -> bytes read"},
    {"discard_pages", (PyCFunction)Engine_discard_pages, METH_VARARGS, "discard_pages(first, end) -> pages freed"},
    {"compact", (PyCFunction)(void (*)(void))Engine_compact, METH_VARARGS | METH_KEYWORDS, "compact(max_moves=None) -> objects moved"},
    {"trim", (PyCFunction)Engine_trim, METH_NOARGS, NULL},
    {"refill_reserve", (PyCFunction)Engine_refill_reserve, METH_NOARGS, NULL},
    {"count", (PyCFunction)(void (*)(void))Engine_count, METH_FASTCALL, "count(name, n=1): add n to a counter atomically"},
    {"_set_codec", (PyCFunction)Engine_set_codec, METH_VARARGS, "set_codec(algo_id, zstd_level)"},
    {"store", (PyCFunction)Engine_store, METH_O, NULL},
    {"load", (PyCFunction)Engine_load, METH_VARARGS, NULL},
    {"free", (PyCFunction)Engine_free, METH_VARARGS, NULL},
    {"store_word", (PyCFunction)Engine_store_word, METH_O, NULL},
    {"word", (PyCFunction)Engine_word, METH_O, NULL},
    {"free_word", (PyCFunction)Engine_free_word, METH_O, NULL},
    {"freeable", (PyCFunction)Engine_freeable, METH_O, NULL},
    {"freeable_frames", (PyCFunction)Engine_freeable_frames, METH_NOARGS, NULL},
    {"frame_room", (PyCFunction)Engine_frame_room, METH_NOARGS, NULL},
    {"volatile", (PyCFunction)Engine_volatile, METH_NOARGS, NULL},
    {"set_volatile", (PyCFunction)Engine_set_volatile, METH_O, NULL},
    {"rebuild", (PyCFunction)Engine_rebuild, METH_VARARGS, "rebuild(extents, nalgos) -> (stored, same, huge)"},
    {"check_pages", (PyCFunction)Engine_check_pages, METH_VARARGS, "check_pages(extents): raise StateError unless every invariant holds"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "release the state's buffers"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zswapd._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The native engine over a zswapd state's tables",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
    .tp_getset = Engine_getset,
};

/* ---- native FUSE serving (stage 2) ----------------------------------------------
 *
 * N threads read /dev/fuse, each its own fd.  READ, WRITE and
 * FALLOCATE(PUNCH_HOLE|KEEP_SIZE) of the device file (nodeid 2), once
 * Python has answered INIT (enable()), are served here without the GIL under
 * the engine lock.  Everything else, and any hot request that meets
 * something the store's policy must decide (a full pool, a corrupt object,
 * a range at the device's end, an unaligned discard), goes up whole to the
 * Python callback (FuseFS.handle behind zswapd/fuse/native.py), which stays
 * the single place for the protocol's rules.  The callback runs with the
 * GIL, but the GIL does not serialize callbacks (the engine releases it
 * inside a read): native.py gives them turns and hands back a copy of the
 * reply, since FuseFS builds READ replies in one buffer of its own.  Per-thread buffers are allocated at
 * thread start: nothing is allocated per request on the hot path.
 *
 * The fds.  A reply must be written on the fd its request was read from (the
 * kernel keeps a request in flight on that fd's own processing list).  The
 * supervisor makes one FUSE_DEV_IOC_CLONE of the connection per thread and
 * keeps them, so a request a dead worker had read stays on a live list and
 * FUSE_NOTIFY_RESEND (which walks every clone) hands it to the next worker;
 * a clone made here would end those requests with EIO as the worker died
 * (kernel-facts).  A clone is its own open file description, so its
 * O_NONBLOCK is its own: the connection's fd stays non-blocking for the
 * Python session while a clone can sleep in read(2).  Without clones the
 * threads share the connection's fd.
 *
 * One reader at a time.  Only one idle thread waits for the next request
 * (the reader token): it spins for SPIN_NS after its last reply, then sleeps
 * in the kernel.  The other idle threads sleep on a futex, so a request
 * wakes no thread but the one that takes it (when every idle thread waited
 * in the kernel, each request also woke a thread that found nothing: 4 KiB
 * random reads at queue depth 1 took p50 11.5 us with two threads against
 * 9.0 with one; now 9.3 with two or four, docs/benchmarks.md).  The reader drops
 * the token as it takes a request, and if more requests are already queued,
 * or the one it took goes up to Python (where the GIL may hold it), it wakes
 * one follower, which becomes the reader: threads join in as the queue
 * deepens and nobody else moves at queue depth 1.  A thread that has served
 * takes the token back if it is free, else sleeps as a follower.  Since only
 * the reader reads, it may set O_NONBLOCK on its fd to spin and clear it to
 * sleep, even on a clone it shares (the state is kept per fd): non-blocking
 * reads spin faster than poll(2) then read(2), which took a third longer per
 * request at queue depth 1.  Each empty turn of a spin ends in
 * sched_yield(): whatever the scheduler put on the spinner's CPU (the
 * program, the loop device's worker) runs at once, not after the spin (two
 * threads on two CPUs without it: 0.5% of 4 KiB reads took exactly SPIN_NS).
 * A thread does not spin while another is serving.  On the connection's own
 * fd (O_NONBLOCK, shared with the Python session) the reader sleeps in
 * poll(2) instead of a read.
 *
 * Stopping.  stop() sets stop and wakes the threads: every follower through
 * the futex, the reader through the eventfd if it is in poll(2), or through
 * WAKE_SIGNAL (a handler that does nothing, so read(2) returns EINTR) if it
 * is in a blocking read, sent again every STOP_RETRY_NS until each thread is
 * joined, because one may enter read(2) just after the signal.  Each thread
 * finishes the request it holds.  When the connection is gone (ENODEV), the
 * reader says so (gone) and wakes every follower, which then end too.
 */
#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>

#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_FALLOCATE 43
#define FILE_NODE 2
#define IN_HDR 40
#define OUT_HDR 16
#define IO_IN 40
#define FALLOC_IN 32
#define MAX_IO (1u << 20)
#define REQ_BUF (MAX_IO + 4096 + IN_HDR + IO_IN)
/* Threads per server: far past any CPU count we would serve with, and it
 * keeps the Server object fixed-size. */
#define MAX_THREADS 64
/* 200 us: longer than the gap between a swap-in's reply and the next
 * request at queue depth 1 on this VM (tens of us), far shorter than a
 * scheduler tick, so an idle daemon stops burning a CPU at once. */
#define SPIN_NS 200000L
/* A real-time signal: CPython installs no handler for one, and a process
 * sending it to us by mistake finds it does nothing. */
#define WAKE_SIGNAL (SIGRTMIN + 3)
/* How often stop() re-sends WAKE_SIGNAL to a thread not yet joined. */
#define STOP_RETRY_NS 2000000L

typedef struct Server Server;

typedef struct {
    Server *s;
    int fd;
    int blocking;  /* a clone: read(2) sleeps, unless O_NONBLOCK is set to spin */
    int *nonblock; /* whether O_NONBLOCK is set now, one per fd (the first
                      thread's nb), changed only by the reader */
    int nb;
    int flags; /* the fd's flags without O_NONBLOCK */
    pthread_t tid;
} Thread;

struct Server {
    PyObject_HEAD
    Engine *engine;
    PyObject *callback;
    int efd;
    int nthreads, nfds, nblocking;
    Thread threads[MAX_THREADS];
    int started;
    int stop;
    int hot;
    int reader;    /* 1 while a thread holds the reader token */
    int busy;      /* threads between a read and its reply */
    int max_busy;  /* the most at once: do followers join when a queue forms? */
    int gone;      /* the connection is gone: every thread ends */
    uint32_t wake; /* the followers' futex word, bumped by each wake */
    int followers; /* threads asleep on it */
    uint32_t max_write;
    uint64_t dev_size;
    unsigned long long hot_requests, cold_requests, io_errors;
    int alive; /* threads still serving: 0 once the connection is gone */
};

struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

static int stopping(Server *s) { return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE); }

static long ns_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000000000L + (now.tv_nsec - t->tv_nsec);
}

static int take_reader(Server *s)
{
    int free_ = 0;
    return __atomic_compare_exchange_n(&s->reader, &free_, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void drop_reader(Server *s) { __atomic_store_n(&s->reader, 0, __ATOMIC_SEQ_CST); }

static int ending(Server *s) { return stopping(s) || __atomic_load_n(&s->gone, __ATOMIC_ACQUIRE); }

static long futex(uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

/* Wake ``n`` followers (INT_MAX: all); no system call when none sleeps. */
static void wake_followers(Server *s, int n)
{
    __atomic_add_fetch(&s->wake, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->followers, __ATOMIC_SEQ_CST))
        futex(&s->wake, FUTEX_WAKE_PRIVATE, (uint32_t)n);
}

/* Sleep until woken, unless the reader token is free (then the caller takes
 * it).  The token is checked after the futex word is read, and a waker
 * drops the token before it bumps the word, so no wake is lost. */
static void follow(Server *s)
{
    uint32_t seen = __atomic_load_n(&s->wake, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&s->reader, __ATOMIC_SEQ_CST) || ending(s))
        return;
    __atomic_add_fetch(&s->followers, 1, __ATOMIC_SEQ_CST);
    futex(&s->wake, FUTEX_WAIT_PRIVATE, seen);
    __atomic_sub_fetch(&s->followers, 1, __ATOMIC_SEQ_CST);
}

/* Requests queued beyond the one just taken. */
static int more_queued(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* Spin on only while this thread served within SPIN_NS and no other thread
 * is serving: a request that comes while one is served wakes a sleeper
 * anyway, and the spin would only take a CPU from the program or the loop
 * device's worker. */
static int may_spin(Server *s, const struct timespec *last)
{
    return ns_since(last) < SPIN_NS && !__atomic_load_n(&s->busy, __ATOMIC_RELAXED);
}

static void write_reply(Server *s, int fd, const void *buf, size_t n)
{
    for (;;) {
        ssize_t w = write(fd, buf, n);
        if (w >= 0 || errno == ENOENT || errno == ENODEV)
            return; /* ENOENT: the request was interrupted away */
        if (errno != EINTR && errno != EAGAIN) {
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

/* 1 if served here, 0 to hand up to Python. */
static int serve_hot(Server *s, int fd, const uint8_t *in, size_t n, uint8_t *out)
{
    const struct in_header *h = (const void *)in;
    Engine *e = s->engine;
    struct out_header *oh = (void *)out;
    uint64_t size = s->dev_size;
    if (!__atomic_load_n(&s->hot, __ATOMIC_ACQUIRE) || h->nodeid != FILE_NODE || h->len != n || !e->arena)
        return 0;
    oh->error = 0;
    oh->unique = h->unique;
    if (h->opcode == FUSE_READ && n >= IN_HDR + IO_IN) {
        uint64_t off;
        uint32_t len;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 4);
        if (len > s->max_write || off > size || len > size - off)
            return 0;
        int st = read_range(e, off, out + OUT_HDR, len);
        if (st == ST_OK)
            ADD(e->num_reads, 1);
        else if (st == ST_CORRUPT)
            SUB(e->failed_reads, 1); /* Python reads it again and counts it */
        if (st != ST_OK)
            return 0;
        oh->len = OUT_HDR + len;
        write_reply(s, fd, out, OUT_HDR + len);
        return 1;
    }
    if (h->opcode == FUSE_WRITE && n >= IN_HDR + IO_IN) {
        uint64_t off;
        uint32_t len;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 4);
        if (len != n - IN_HDR - IO_IN || off > size || len > size - off)
            return 0;
        uint64_t done = 0;
        int st = write_range(e, off, in + IN_HDR + IO_IN, len, __atomic_load_n(&e->full, __ATOMIC_RELAXED), &done);
        if (st == ST_OK)
            ADD(e->num_writes, 1);
        if (st != ST_OK)
            return 0; /* the policy's call: Python writes it (again) whole */
        oh->len = OUT_HDR + 8;
        memcpy(out + OUT_HDR, &len, 4);
        memset(out + OUT_HDR + 4, 0, 4);
        write_reply(s, fd, out, OUT_HDR + 8);
        return 1;
    }
    if (h->opcode == FUSE_FALLOCATE && n >= IN_HDR + FALLOC_IN) {
        uint64_t off, len;
        uint32_t mode;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 8);
        memcpy(&mode, in + IN_HDR + 24, 4);
        if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) || off >= size || len > size - off ||
            off % PAGE_SIZE || len % PAGE_SIZE)
            return 0;
        discard_range(e, off / PAGE_SIZE, (off + len) / PAGE_SIZE);
        long t = trim(e);
        if (t < 0)
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
        oh->len = OUT_HDR;
        write_reply(s, fd, out, OUT_HDR);
        return 1;
    }
    return 0;
}

static void serve_cold(Server *s, int fd, const uint8_t *in, size_t n)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *req = PyBytes_FromStringAndSize((const char *)in, (Py_ssize_t)n);
    PyObject *r = req ? PyObject_CallOneArg(s->callback, req) : NULL;
    Py_XDECREF(req);
    if (r && r != Py_None) {
        Py_buffer b;
        if (PyObject_GetBuffer(r, &b, PyBUF_SIMPLE) == 0) {
            write_reply(s, fd, b.buf, (size_t)b.len);
            PyBuffer_Release(&b);
        }
    }
    if (!r || PyErr_Occurred()) {
        /* native.py's callback catches everything; this is the last guard:
         * answer EIO rather than leave the request hanging. */
        PyErr_Clear();
        const struct in_header *h = (const void *)in;
        if (n >= IN_HDR) {
            struct out_header oh = {OUT_HDR, -EIO, h->unique};
            write_reply(s, fd, &oh, sizeof oh);
        }
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
}

static void set_nonblock(Thread *t, int on)
{
    if (*t->nonblock != on && fcntl(t->fd, F_SETFL, t->flags | (on ? O_NONBLOCK : 0)) == 0)
        *t->nonblock = on;
}

/* The reader's wait for the next request: spin with non-blocking reads
 * while may_spin, then sleep (a blocking read on a clone, poll(2) on the
 * connection's O_NONBLOCK fd).  A request, or -1 with errno. */
static ssize_t next_request(Thread *t, uint8_t *in, const struct timespec *last)
{
    Server *s = t->s;
    for (;;) {
        if (ending(s)) {
            errno = EINTR;
            return -1;
        }
        if (may_spin(s, last)) {
            if (t->blocking)
                set_nonblock(t, 1);
            ssize_t n = read(t->fd, in, REQ_BUF);
            if (n >= 0 || errno != EAGAIN)
                return n;
            sched_yield();
            continue;
        }
        if (t->blocking) {
            set_nonblock(t, 0);
            return read(t->fd, in, REQ_BUF);
        }
        ssize_t n = read(t->fd, in, REQ_BUF);
        if (n >= 0 || errno != EAGAIN)
            return n;
        struct pollfd p[2] = {{.fd = t->fd, .events = POLLIN}, {.fd = s->efd, .events = POLLIN}};
        poll(p, 2, -1);
    }
}

static void wake_handler(int sig) { (void)sig; }

/* Process-directed signals go to the interpreter's threads, where CPython's
 * handlers want them; a FUSE thread takes only WAKE_SIGNAL (and the
 * synchronous ones, which cannot be blocked). */
static void server_sigmask(void)
{
    sigset_t m;
    sigfillset(&m);
    int keep[] = {WAKE_SIGNAL, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS};
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++)
        sigdelset(&m, keep[i]);
    pthread_sigmask(SIG_SETMASK, &m, NULL);
}

static void *server_thread(void *arg)
{
    Thread *t = arg;
    Server *s = t->s;
    server_sigmask();
    uint8_t *in = malloc(REQ_BUF), *out = malloc(OUT_HDR + MAX_IO);
    ctx_get(s->engine); /* this thread's codec context, before the first request */
    struct timespec last = {0, 0};
    while (in && out && !ending(s)) {
        if (!take_reader(s)) {
            follow(s);
            continue;
        }
        ssize_t n = next_request(t, in, &last);
        int err = errno;
        if (n >= 0) { /* serving: the next reader does not spin beside it */
            int b = __atomic_add_fetch(&s->busy, 1, __ATOMIC_RELAXED);
            int m = __atomic_load_n(&s->max_busy, __ATOMIC_RELAXED);
            while (b > m && !__atomic_compare_exchange_n(&s->max_busy, &m, b, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            }
        }
        drop_reader(s);
        if (n < 0) {
            if (err == EAGAIN || err == EINTR || err == ENOENT)
                continue;
            if (err == ENODEV) { /* unmounted: the connection is gone */
                __atomic_store_n(&s->gone, 1, __ATOMIC_RELEASE);
                break;
            }
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
            struct pollfd p = {.fd = s->efd, .events = POLLIN};
            poll(&p, 1, 10); /* as session.py: never end on a read error */
            continue;
        }
        /* Another reader while this one serves, when more requests wait:
         * at queue depth 1 everyone else stays asleep.  With no follower
         * asleep (one thread, or the others busy) there is nobody to wake,
         * and no poll(2) per request to pay. */
        int woke = __atomic_load_n(&s->followers, __ATOMIC_SEQ_CST) && more_queued(t->fd);
        if (woke)
            wake_followers(s, 1);
        if (n >= IN_HDR && serve_hot(s, t->fd, in, (size_t)n, out)) {
            __atomic_add_fetch(&s->hot_requests, 1, __ATOMIC_RELAXED);
        } else {
            if (!woke)
                wake_followers(s, 1); /* Python's turn: the GIL may keep it */
            __atomic_add_fetch(&s->cold_requests, 1, __ATOMIC_RELAXED);
            serve_cold(s, t->fd, in, (size_t)n);
        }
        __atomic_sub_fetch(&s->busy, 1, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_MONOTONIC, &last);
    }
    wake_followers(s, INT_MAX); /* they end too, or one becomes the reader */
    if (t->blocking && t->nonblock == &t->nb)
        set_nonblock(t, 0); /* as the next server expects a clone */
    free(in);
    free(out);
    __atomic_sub_fetch(&s->alive, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void Server_join(Server *s)
{
    if (!s->started)
        return;
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    wake_followers(s, INT_MAX);
    uint64_t one = 1;
    if (write(s->efd, &one, sizeof one) < 0) {
        /* eventfd cannot fail here short of a bug; the threads still stop
         * at their next request */
    }
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < s->nthreads; i++) {
        Thread *t = &s->threads[i];
        for (;;) {
            if (t->blocking)
                pthread_kill(t->tid, WAKE_SIGNAL);
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += STOP_RETRY_NS;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            if (pthread_timedjoin_np(t->tid, NULL, &until) == 0)
                break;
        }
    }
    Py_END_ALLOW_THREADS
    s->started = 0;
}

static void Server_dealloc(Server *s)
{
    Server_join(s);
    if (s->efd >= 0)
        close(s->efd);
    Py_XDECREF(s->engine);
    Py_XDECREF(s->callback);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Server_stop(Server *s, PyObject *Py_UNUSED(a))
{
    Server_join(s);
    Py_RETURN_NONE;
}

static PyObject *Server_enable(Server *s, PyObject *args)
{
    unsigned int max_write;
    unsigned long long dev_size;
    if (!PyArg_ParseTuple(args, "IK", &max_write, &dev_size))
        return NULL;
    if (max_write > MAX_IO || dev_size > s->engine->npages * PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "max_write %u > %u or device size %llu beyond the engine's", max_write,
                     MAX_IO, dev_size);
        return NULL;
    }
    s->max_write = max_write;
    s->dev_size = dev_size;
    __atomic_store_n(&s->hot, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Server_stats(Server *s, PyObject *Py_UNUSED(a))
{
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:i,s:i,s:i,s:i,s:i,s:i}", "hot_requests", __atomic_load_n(&s->hot_requests, __ATOMIC_RELAXED),
        "cold_requests", __atomic_load_n(&s->cold_requests, __ATOMIC_RELAXED), "io_errors",
        __atomic_load_n(&s->io_errors, __ATOMIC_RELAXED), "threads", s->nthreads, "fds", s->nfds, "clones",
        s->nblocking, "max_busy", __atomic_load_n(&s->max_busy, __ATOMIC_RELAXED), "hot",
        __atomic_load_n(&s->hot, __ATOMIC_ACQUIRE), "alive",
        __atomic_load_n(&s->alive, __ATOMIC_ACQUIRE));
}

static PyMethodDef Server_methods[] = {
    {"stop", (PyCFunction)Server_stop, METH_NOARGS, "stop and join the threads"},
    {"enable", (PyCFunction)Server_enable, METH_VARARGS, "enable(max_write, device_size): serve hot opcodes"},
    {"stats", (PyCFunction)Server_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zswapd._engine.Server",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "native FUSE threads over one engine",
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
};

/* WAKE_SIGNAL's handler, installed once; refused if something else owns it. */
static int install_wake_handler(void)
{
    struct sigaction old, sa;
    if (sigaction(WAKE_SIGNAL, NULL, &old) != 0)
        return -1;
    if (old.sa_handler == wake_handler)
        return 0;
    if (old.sa_handler != SIG_DFL || (old.sa_flags & SA_SIGINFO)) {
        errno = EBUSY;
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wake_handler; /* no SA_RESTART: read(2) must return EINTR */
    sigemptyset(&sa.sa_mask);
    return sigaction(WAKE_SIGNAL, &sa, NULL);
}

/* serve_fuse(engine, fds, callback) -> Server: one thread per entry of fds
 * (an fd may repeat), running. */
static PyObject *serve_fuse(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *eng, *fdseq, *cb;
    if (!PyArg_ParseTuple(args, "O!OO", &EngineType, &eng, &fdseq, &cb))
        return NULL;
    PyObject *fds = PySequence_Fast(fdseq, "fds must be a sequence of file descriptors");
    if (!fds)
        return NULL;
    Py_ssize_t nthreads = PySequence_Fast_GET_SIZE(fds);
    if (!PyCallable_Check(cb) || nthreads < 1 || nthreads > MAX_THREADS) {
        Py_DECREF(fds);
        PyErr_Format(PyExc_ValueError, "need a callable and 1..%d fds (one per thread)", MAX_THREADS);
        return NULL;
    }
    Server *s = PyObject_New(Server, &ServerType);
    if (!s) {
        Py_DECREF(fds);
        return NULL;
    }
    s->engine = (Engine *)eng;
    Py_INCREF(eng);
    s->callback = cb;
    Py_INCREF(cb);
    s->nthreads = s->nfds = s->nblocking = 0;
    s->started = 0;
    s->stop = 0;
    s->hot = 0;
    s->reader = 0;
    s->busy = 0;
    s->max_busy = 0;
    s->gone = 0;
    s->wake = 0;
    s->followers = 0;
    s->max_write = 0;
    s->dev_size = 0;
    s->hot_requests = s->cold_requests = s->io_errors = 0;
    s->alive = 0;
    s->efd = -1;
    for (Py_ssize_t i = 0; i < nthreads; i++) {
        int fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        int fl = fd < 0 ? -1 : fcntl(fd, F_GETFL);
        if (PyErr_Occurred() || fl < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "fds[%zd] is not an open file descriptor", i);
            goto fail;
        }
        Thread *t = &s->threads[i];
        *t = (Thread){.s = s, .fd = fd, .blocking = !(fl & O_NONBLOCK), .flags = fl & ~O_NONBLOCK};
        t->nonblock = &t->nb;
        for (Py_ssize_t j = 0; j < i && t->nonblock == &t->nb; j++)
            if (s->threads[j].fd == fd)
                t->nonblock = s->threads[j].nonblock;
        if (t->nonblock == &t->nb) {
            s->nfds++;
            s->nblocking += s->threads[i].blocking;
        }
    }
    if (s->nblocking && install_wake_handler() != 0) {
        PyErr_Format(PyExc_OSError, "cannot install the FUSE threads' wake-up handler for signal %d: %s",
                     WAKE_SIGNAL, strerror(errno));
        goto fail;
    }
    s->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    Py_DECREF(fds);
    s->started = 1;
    for (Py_ssize_t i = 0; i < nthreads; i++) {
        __atomic_add_fetch(&s->alive, 1, __ATOMIC_RELEASE);
        if (pthread_create(&s->threads[i].tid, NULL, server_thread, &s->threads[i]) != 0) {
            __atomic_sub_fetch(&s->alive, 1, __ATOMIC_RELEASE);
            Server_join(s);
            Py_DECREF(s);
            PyErr_SetString(PyExc_OSError, "pthread_create failed");
            return NULL;
        }
        s->nthreads++;
    }
    return (PyObject *)s;
fail:
    Py_DECREF(fds);
    Py_DECREF(s);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"serve_fuse", serve_fuse, METH_VARARGS, "serve_fuse(engine, fds, callback) -> Server: a thread per fd"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, .m_name = "zswapd._engine", .m_doc = "zswapd's native engine", .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    PyObject *pool = PyImport_ImportModule("zswapd.pool");
    if (!pool)
        return NULL;
    PoolError = PyObject_GetAttrString(pool, "PoolError");
    PoolFull = PyObject_GetAttrString(pool, "PoolFull");
    StateError = PyObject_GetAttrString(pool, "StateError");
    Py_DECREF(pool);
    if (!PoolError || !PoolFull || !StateError)
        return NULL;
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&ServerType) < 0)
        return NULL;
    if (pthread_key_create(&ctx_key, ctx_free) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_key_create failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&engine_module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "OK", ST_OK) < 0 || PyModule_AddIntConstant(m, "REFUSED", ST_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "NOROOM", ST_NOROOM) < 0 ||
        PyModule_AddStringConstant(m, "LZ4_VERSION", LZ4_versionString()) < 0 ||
        PyModule_AddStringConstant(m, "ZSTD_VERSION", ZSTD_versionString()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
