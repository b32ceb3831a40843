/* zswapd's C engine: the data, its small accessors and the rules every file
 * of the engine relies on (as zram_drv.h is to zram).
 *
 * The engine is the store's fast path (page table, zsmalloc-style pool,
 * lz4/zstd) over the memfd state of zswapd/state.py.  It mirrors
 * zswapd/pool.py (the reference engine) and the page-level half of
 * zswapd/engine.py line for line, with the same names (frame, zspage, size
 * class, slot, handle, fullness group, hot/cold frame stacks; glossary at the
 * top of pool.py).  It invents no layout: every table it touches is a buffer
 * the State object hands over, and the volatile scalars (stack tops, list
 * heads, per-class totals) live in Engine, as they live in a Python Pool.
 *
 * Files (zswapd/engine/), one job each:
 *   engine.h       this: the Engine struct, the bit layouts and their
 *                  accessors, the lock helpers, the lock and crash order
 *   pool.c         frames, handles, zspages, object bytes, compaction
 *   codec.h/.c     same-filled detection, lz4/zstd, the per-thread contexts
 *                  (zcomp.c's job); dictionaries go here
 *   page.c         a page's store, load and discard; byte ranges; where a
 *                  write stops, it asks the store's policy (Policy, below)
 *   rebuild.c      the rebuild scan and the invariant check
 *   module.h/.c    the CPython type and module: arguments, errors, counters,
 *                  the constants Python checks its own copies against
 *   takeover.c     rebuild(), check_pages(), the volatile indexes to and
 *                  from a Python Pool
 *   object_api.c   the pool's object API, for the pool tests only
 *   fuse_server.h  the FUSE threads' shared state
 *   fuse_loop.c    the FUSE threads: reading /dev/fuse, waking, stopping
 *   fuse_ops.c     which requests C serves and how (READ, WRITE, punch)
 *   tier.h/.c      the recompression tier: a bounded step the store's policy
 *                  calls off the serving threads, as compact() in pool.c
 *   tier_api.c     its Python face: recompress_step, census, recompress_page
 * A tier of colder storage (recompression, writeback) belongs in a file of
 * its own beside page.c, with bounded steps the policy calls, as compact()
 * is in pool.c.  engine.h, pool.c, codec.c, page.c, tier.c and rebuild.c
 * include no Python: what crosses to Python is in module.c, takeover.c,
 * object_api.c, tier_api.c and the fuse_*.c files.
 *
 * Crash consistency: the same order as pool.py and store.py.
 *   write:   new object complete (slot header, payload), then handle-table
 *            entry, then the page-table entry (one aligned 8-byte store),
 *            then the old object is freed.
 *   discard: page-table entry zeroed, then the object freed.
 *   compact: copy (slot header, payload), switch the handle entry, free the
 *            old slot.
 *   recompress: new object complete, then the page-table entry (only if it
 *            still is the entry the object was read from), then the old
 *            object freed (tier.c).
 *   idle stamp, tried bit: one 8-byte store of the entry, naming the same
 *            object, under the entry lock.
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
 * never taken while one of these is held (a FUSE thread hands a request or a
 * decision up to Python holding none), so a thread holding the GIL may wait
 * for them.
 *
 * What runs concurrently: compression and decompression (each thread has
 * its own lz4 state, zstd contexts and scratch pages: Ctx, codec.h), pages of
 * different classes, and anything touching different pages, with nothing
 * shared but the pool lock's short sections.  A huge object is copied under
 * its entry bit alone (compaction never moves one).  Counters are atomic
 * (relaxed) everywhere: the engine's threads bump them with ADD, Python
 * bumps them through Engine.count (never a read-modify-write of the
 * attribute, which would lose a C thread's bump in between), and the
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
#ifndef ZSWAPD_ENGINE_H
#define ZSWAPD_ENGINE_H

/* First, before any system header (fallocate, pthread_timedjoin_np); the
 * files that include Python.h get it from there, first too. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define FRAME_SIZE 4096u
#define FRAME_SHIFT 12
#define PAGE_SIZE 4096u
#define HEADER 4u /* a slot's header: its owner's handle, or a free-list link */
#define GROUPS 10u /* fullness groups 1..10 (0: empty, GROUP_FULL: full) */
#define GROUP_FULL (GROUPS + 1)
#define MAX_CLASSES 256
#define MAX_FRAMES_PER_ZSPAGE 8
/* Frames beyond the memory limit that the ladder's recompression (and only
 * it: a background move, never a write) may take for new objects: at the
 * limit a smaller class often has no free slot, and a move needs its new
 * copy before it frees the old (the crash order).  Two zspages of the
 * longest chain: room for new objects in two classes before compaction of
 * what the moves freed pays the frames back (store.py, the ladder).  64 KiB,
 * a quarter of the hot reserve the pool keeps resident anyway.  pool.py's
 * MOVE_RESERVE is the same rule (engine.py checks). */
#define MOVE_RESERVE (2u * MAX_FRAMES_PER_ZSPAGE)
#define ALGO_LZ4 0
#define ALGO_ZSTD 1

/* ---- the page-table entry (entry.py; engine.py checks the two agree) ------
 *   bits 0-1   kind: 0 empty (reads as zeros), 1 same-filled, 2 compressed,
 *              3 huge (a raw page)
 *   bits 2-3   algorithm of a compressed page (codec.ALGORITHMS)
 *   bits 4-16  payload length in bytes
 *   bits 17-19 tier: 0 as a write stored it; 1..DICT_SLOTS recompressed with
 *              zstd and that dictionary slot; TIER_PLAIN recompressed, no
 *              dictionary (tier.c)
 *   bit 20     tried: recompression kept the object as it was; not retried
 *   bits 21-31 idle stamp: last access in IDLE_TICK ticks, mod 2048
 *   bits 32-62 handle (of a same-filled page: the handle holding its word);
 *              with bit 63, the object's location in the backing file in
 *              OBJ_ALIGN units (backing.c)
 *   bit 63     BACKED: the payload lives in the backing file; kind,
 *              algorithm, length and tier still describe it */
#define KIND_SAME 1u
#define KIND_COMPRESSED 2u
#define KIND_HUGE 3u
#define ENTRY_KIND_MASK 0x3ull
#define ENTRY_ALGO_SHIFT 2
#define ENTRY_ALGO_MASK 0x3ull
#define ENTRY_LEN_SHIFT 4
#define ENTRY_LEN_MASK 0x1FFFull
#define ENTRY_TIER_SHIFT 17
#define ENTRY_TIER_MASK 0x7ull
#define DICT_SLOTS 6u
#define TIER_PLAIN 7u
#define ENTRY_TRIED (1ull << 20)
#define ENTRY_IDLE_SHIFT 21
#define ENTRY_IDLE_MASK 0x7FFull
#define IDLE_CLAMP 1024u
#define ENTRY_HANDLE_SHIFT 32
#define ENTRY_HANDLE_MASK 0x7FFFFFFFull
#define ENTRY_BACKED (1ull << 63)
#define ENTRY_UNUSED 0ull
/* what a page's contents depend on: not the stamp, not tried */
#define ENTRY_CONTENT_MASK (~(ENTRY_TRIED | ENTRY_IDLE_MASK << ENTRY_IDLE_SHIFT))

static inline unsigned entry_kind(uint64_t entry) { return (unsigned)(entry & ENTRY_KIND_MASK); }
static inline unsigned entry_algo(uint64_t entry) { return (unsigned)(entry >> ENTRY_ALGO_SHIFT & ENTRY_ALGO_MASK); }
static inline uint32_t entry_len(uint64_t entry) { return (uint32_t)(entry >> ENTRY_LEN_SHIFT & ENTRY_LEN_MASK); }
static inline unsigned entry_tier(uint64_t entry) { return (unsigned)(entry >> ENTRY_TIER_SHIFT & ENTRY_TIER_MASK); }
static inline int entry_tried(uint64_t entry) { return (entry & ENTRY_TRIED) != 0; }
static inline unsigned entry_idle(uint64_t entry) { return (unsigned)(entry >> ENTRY_IDLE_SHIFT & ENTRY_IDLE_MASK); }
static inline uint32_t entry_handle(uint64_t entry) { return (uint32_t)(entry >> ENTRY_HANDLE_SHIFT & ENTRY_HANDLE_MASK); }
static inline int entry_backed(uint64_t entry) { return (entry & ENTRY_BACKED) != 0; }
static inline uint32_t entry_loc(uint64_t entry) { return (uint32_t)(entry >> ENTRY_HANDLE_SHIFT & ENTRY_HANDLE_MASK); }
static inline uint64_t entry_with_idle(uint64_t entry, unsigned tick)
{
    return (entry & ~(ENTRY_IDLE_MASK << ENTRY_IDLE_SHIFT)) | ((uint64_t)tick & ENTRY_IDLE_MASK) << ENTRY_IDLE_SHIFT;
}
/* ticks since the page's last access, modulo the stamp's range */
static inline unsigned entry_age(uint64_t entry, unsigned now)
{
    return (unsigned)((now - entry_idle(entry)) & ENTRY_IDLE_MASK);
}
static inline uint64_t make_entry(uint32_t h, unsigned kind, unsigned algo, uint32_t len)
{
    return (uint64_t)h << ENTRY_HANDLE_SHIFT | (uint64_t)len << ENTRY_LEN_SHIFT | (uint64_t)algo << ENTRY_ALGO_SHIFT |
           kind;
}

/* A backed entry for the object `old` names (kind, algorithm, length, tier;
 * the stamp and tried bit too) at location `loc` of the backing file. */
static inline uint64_t make_backed(uint32_t loc, uint64_t old)
{
    return ENTRY_BACKED | (uint64_t)loc << ENTRY_HANDLE_SHIFT | (old & ~(ENTRY_BACKED | ENTRY_HANDLE_MASK << ENTRY_HANDLE_SHIFT));
}

/* ---- the handle table's word (pool.py's glossary) --------------------------
 *   huge object:       LOC_HUGE | frame
 *   compressed object: zspage << 16 | slot
 *   same-filled page:  the fill word itself (the page entry's kind tells) */
#define LOC_HUGE (1ull << 63)
#define LOC_FRAME_MASK 0xFFFFFFFFull
#define LOC_ZSPAGE_SHIFT 16
#define LOC_SLOT_MASK 0xFFFFull

static inline int loc_is_huge(uint64_t loc) { return (loc & LOC_HUGE) != 0; }
static inline uint32_t loc_frame(uint64_t loc) { return (uint32_t)(loc & LOC_FRAME_MASK); }
/* 64 bits: a corrupt word may name a zspage beyond 2^32, which the rebuild
 * must see as out of range rather than truncated into it. */
static inline uint64_t loc_zspage(uint64_t loc) { return loc >> LOC_ZSPAGE_SHIFT; }
static inline uint32_t loc_slot(uint64_t loc) { return (uint32_t)(loc & LOC_SLOT_MASK); }
static inline uint64_t huge_loc(uint32_t frame) { return LOC_HUGE | frame; }
static inline uint64_t obj_loc(uint32_t z, uint32_t slot) { return (uint64_t)z << LOC_ZSPAGE_SHIFT | slot; }

/* ---- a slot's header (the first 4 bytes of each slot) ----------------------
 *   allocated: the owning handle (1..2^31-1)
 *   free:      SLOT_FREE | the next free slot (SLOT_END: none) */
#define SLOT_FREE 0x80000000u
#define SLOT_END 0xFFFFu

static inline int slot_is_free(uint32_t hdr) { return (hdr & SLOT_FREE) != 0; }
static inline uint32_t slot_next(uint32_t hdr) { return hdr & 0xFFFFu; }
static inline uint32_t free_slot_header(uint32_t next) { return SLOT_FREE | next; }

/* Results of a page store, reported up to the store, which owns the policy.
 * The first three are the module's OK, REFUSED, NOROOM (engine.py). */
#define ST_OK 0
#define ST_REFUSED 1 /* the store is full and the page needs pool memory */
#define ST_NOROOM 2  /* the pool had no frame or handle for it */
#define ST_CORRUPT 3 /* an object did not decompress to a page */
#define ST_PUNCH 4   /* fallocate(PUNCH_HOLE) on the arena failed */
#define ST_POLICY 5  /* asking the policy failed (a Python exception, left set) */
#define ST_NOMEM 6   /* no memory for a thread's codec context */
#define ST_IO 7      /* the backing file's read or write failed (Backing.err) */

#ifdef ZSWAPD_BOUNDS
/* The sanitizer build checks every table index: ASan cannot see past the end
 * of a table inside one mapping. */
#define CHECK(cond)                                                                                                \
    do {                                                                                                           \
        if (!(cond)) {                                                                                             \
            fprintf(stderr, "%s:%d: bound check failed: %s\n", __FILE__, __LINE__, #cond);                          \
            abort();                                                                                               \
        }                                                                                                          \
    } while (0)
#else
#define CHECK(cond) ((void)0)
#endif

/* ---- the state's tables ------------------------------------------------------
 * X(name, C type, what it is indexed by), in state.layout's order; module.c
 * exports the list as TABLES and engine.py asserts it equals state.py's.
 * Entries: DIM_PAGES npages, DIM_HANDLES max_handles + 1 (0 is no handle),
 * DIM_ZSPAGES max_frames + 1 (0 is no zspage), DIM_FRAMES max_frames,
 * DIM_DICTS DICT_SLOTS + 1 (slot 0 unused), DIM_DICT_BYTES DICT_SLOTS *
 * DICT_MAX_BYTES (state.py), DIM_SEGMENTS MAX_SEGMENTS (backing.c). */
enum { DIM_PAGES, DIM_HANDLES, DIM_ZSPAGES, DIM_FRAMES, DIM_DICTS, DIM_DICT_BYTES, DIM_SEGMENTS };
#define DICT_MAX_BYTES (256u * 1024u)
#define ENGINE_TABLES(X)                                                                                           \
    X(page, uint64_t, DIM_PAGES)                                                                                   \
    X(handle, uint64_t, DIM_HANDLES)                                                                               \
    X(zs_first, uint32_t, DIM_ZSPAGES)                                                                             \
    X(zs_class, uint16_t, DIM_ZSPAGES)                                                                             \
    X(frame_next, uint32_t, DIM_FRAMES)                                                                            \
    X(zs_inuse, uint16_t, DIM_ZSPAGES)                                                                             \
    X(zs_free, uint16_t, DIM_ZSPAGES)                                                                              \
    X(zs_next, uint32_t, DIM_ZSPAGES)                                                                              \
    X(zs_prev, uint32_t, DIM_ZSPAGES)                                                                              \
    X(zs_group, uint8_t, DIM_ZSPAGES)                                                                              \
    X(zs_stack, uint32_t, DIM_ZSPAGES)                                                                             \
    X(hot, uint32_t, DIM_FRAMES)                                                                                   \
    X(cold, uint32_t, DIM_FRAMES)                                                                                  \
    X(handle_stack, uint32_t, DIM_HANDLES)                                                                         \
    X(dict_head, uint64_t, DIM_DICTS)                                                                              \
    X(dict_refs, uint64_t, DIM_DICTS)                                                                              \
    X(dict_bytes, uint8_t, DIM_DICT_BYTES)                                                                         \
    X(segment, uint64_t, DIM_SEGMENTS)

#define TABLE_ENUM(name, type, dim) T_##name,
enum { ENGINE_TABLES(TABLE_ENUM) NTABLES };
#undef TABLE_ENUM

/* ---- the event counters (engine.Counters' names and order) -----------------
 * engine.py asserts the list; the store counts through Engine.count. */
#define ENGINE_COUNTERS(X)                                                                                         \
    X(num_reads) X(num_writes) X(failed_reads) X(failed_writes) X(notify_free) X(same_pages) X(huge_pages)         \
        X(pages_stored) X(mem_used_max) X(compactions) X(limit_hits) X(recompressed) X(recompress_saved)          \
            X(recompress_skipped) X(recompress_incompressible) X(recompress_cpu_us) X(dictionaries_trained)        \
                X(bd_count) X(bd_reads) X(bd_writes) X(segments_cleaned)

typedef struct {
#define TABLE_FIELD(name, type, dim) type *name;
    ENGINE_TABLES(TABLE_FIELD)
#undef TABLE_FIELD
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
    unsigned long long compressions; /* atomic: pages given to lz4/zstd */

    /* the event counters; the engine bumps them atomically */
#define COUNTER_FIELD(name) unsigned long long name;
    ENGINE_COUNTERS(COUNTER_FIELD)
#undef COUNTER_FIELD

    /* The dictionaries' digested forms (tier.c): a DDict per installed slot,
     * shared by every reading thread (read under the entry lock of a page
     * naming the slot, which keeps the slot installed); the CDict of the
     * slot and level the recompression step last used (its caller's only). */
    void *ddict[DICT_SLOTS + 1];
    void *cdict;
    unsigned cdict_slot;
    int cdict_level;

    int algo, zstd_level; /* read by each thread's codec context */
    /* The idle tick now (entry.tick_of of CLOCK_MONOTONIC), stamped on every
     * write and read; the store sets it, relaxed, as time passes. */
    unsigned now_tick;

    struct Backing *bk; /* the backing file (backing.c); NULL: none attached */

    int full; /* the store's full flag: while set, a page that needs memory is refused */
    int punch_errno;
    uint64_t *elock; /* the entry lock bits, one per page (process memory) */
    pthread_mutex_t pool_lock;
    pthread_mutex_t cls_lock[MAX_CLASSES];
    int locks_ready;
} Engine;

/* ---- atomics ------------------------------------------------------------- */

#define ADD(field, v) __atomic_add_fetch(&(field), (v), __ATOMIC_RELAXED)
#define SUB(field, v) __atomic_sub_fetch(&(field), (v), __ATOMIC_RELAXED)
/* A field written under its lock and also read without it (see the top):
 * the lock holder writes with STORE (a plain read of its own lock's field is
 * fine), the unlocked reader uses LOAD.  Relaxed: on x86 these are the same
 * movs as plain accesses, so the write and read paths pay nothing. */
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define STORE(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELAXED)

/* ---- locking ------------------------------------------------------------- */

static inline void pool_lock(Engine *e) { pthread_mutex_lock(&e->pool_lock); }
static inline void pool_unlock(Engine *e) { pthread_mutex_unlock(&e->pool_lock); }
static inline void class_lock(Engine *e, unsigned cls) { pthread_mutex_lock(&e->cls_lock[cls]); }
static inline void class_unlock(Engine *e, unsigned cls) { pthread_mutex_unlock(&e->cls_lock[cls]); }

/* zram's ZRAM_LOCK: a bit per page-table entry, held while a thread reads
 * the page's object or replaces the entry.  Kept beside the table, in this
 * process's memory, not in the entry's bit 63: a worker that dies holding it
 * must not leave a set bit in the memfd for the next one to trip over. */
static inline void entry_lock(Engine *e, uint64_t idx)
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

static inline void entry_unlock(Engine *e, uint64_t idx)
{
    __atomic_fetch_and(&e->elock[idx >> 6], ~(1ull << (idx & 63)), __ATOMIC_RELEASE);
}

/* Everything, for the operations that read or replace every index at once
 * (rebuild, the invariant check, volatile()/set_volatile(), close). */
static inline void lock_all(Engine *e)
{
    for (int c = 0; c < e->ncls; c++)
        class_lock(e, (unsigned)c);
    pool_lock(e);
}

static inline void unlock_all(Engine *e)
{
    pool_unlock(e);
    for (int c = e->ncls; c-- > 0;)
        class_unlock(e, (unsigned)c);
}

/* ---- zspage geometry (class lock, or the only thread) ------------------------ */

static inline unsigned group_of(unsigned inuse, unsigned objs)
{
    if (inuse >= objs)
        return GROUP_FULL;
    return (inuse * GROUPS + objs - 1) / objs;
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

static inline uint8_t *frame_bytes(Engine *e, uint32_t frame) { return e->arena + ((size_t)frame << FRAME_SHIFT); }

/* ---- pool.c ---------------------------------------------------------------- */

long long frame_room(const Engine *e);
/* frame_room with `over` more frames past the limit (0..MOVE_RESERVE): what
 * a background move may take (MOVE_RESERVE). */
long long frame_room_over(const Engine *e, unsigned over);
int punch(Engine *e, uint32_t first, uint32_t count);
long trim_excess(Engine *e);
/* Frames beyond the reserve back to the kernel; most requests free nothing
 * beyond it, and then no lock is taken.  -1: a punch failed (punch_errno). */
static inline long trim(Engine *e)
{
    if (LOAD(e->hot_top) <= e->reserve_frames)
        return 0;
    return trim_excess(e);
}
long refill_reserve(Engine *e);
uint32_t new_handle(Engine *e, uint64_t value);
void drop_handle(Engine *e, uint32_t h);
void link_zs(Engine *e, uint32_t z, unsigned cls, unsigned group);
uint32_t obj_store(Engine *e, const uint8_t *data, uint32_t n);
/* obj_store that may take `over` frames past the limit (a background move). */
uint32_t obj_store_over(Engine *e, const uint8_t *data, uint32_t n, unsigned over);
void obj_copy(Engine *e, uint32_t h, uint32_t n, uint8_t *dst);
void obj_free(Engine *e, uint32_t h, uint32_t n);
unsigned long long freeable(const Engine *e, unsigned cls);
unsigned long long freeable_frames(const Engine *e);
long long compact(Engine *e, unsigned long long budget);

/* mem_used_max (zram's): raised to what the pool uses now, by whichever
 * thread just took frames (a write, or a recompression's new object). */
static inline void note_used(Engine *e)
{
    unsigned long long used = (unsigned long long)__atomic_load_n(&e->frames_used, __ATOMIC_RELAXED) * FRAME_SIZE;
    unsigned long long max = __atomic_load_n(&e->mem_used_max, __ATOMIC_RELAXED);
    while (used > max &&
           !__atomic_compare_exchange_n(&e->mem_used_max, &max, used, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* ---- page.c ---------------------------------------------------------------- */

/* The store's policy, asked when a write stops at a page that is refused
 * (the store is full) or finds no room: decide() returns 1 for the write to
 * go on from that page (after it compacted, or found the store no longer
 * full), 0 to end the write there, -1 if asking failed.  `retried`: this
 * page already stopped for want of room, and the policy made room.  The
 * engine decides nothing itself; decide() runs holding none of its locks. */
typedef struct {
    int (*decide)(void *arg, int status, int retried);
    void *arg;
} Policy;

/* One write request: num_writes counted here.  Pages are stored in order,
 * refused (REFUSED) while the engine's full flag is set if they need
 * memory; at a page that stops it, the policy is asked, and the write goes
 * on from that page (the page is not compressed again) or ends there.
 * Returns ST_OK, the status it ended on (ST_REFUSED, ST_NOROOM: the
 * policy's choice; ST_POLICY; ST_CORRUPT for a partial page whose old
 * contents do not decompress; ST_NOMEM; ST_PUNCH), with *done the bytes
 * written.  policy NULL: every stop ends the write. */
int write_request(Engine *e, uint64_t offset, const uint8_t *data, uint64_t len, const Policy *policy, uint64_t *done);
/* One read request: num_reads counted here, failed_reads for an object that
 * does not decompress (ST_CORRUPT). */
int read_range(Engine *e, uint64_t offset, uint8_t *out, uint64_t len);
unsigned long long discard_range(Engine *e, uint64_t first, uint64_t end);

/* ---- backing.c: the backing file (backing.py is the reference) ----------- */

#define SEG_SIZE (256u * 1024)
#define SEG_SHIFT 18
#define SEG_BLOCK 4096u
#define OBJ_ALIGN 16u
#define OBJ_HEADER 8u
#define MAX_SEGMENTS (1u << 17)
#define MAX_PENDING 1024
#define SEG_LIVE_MASK 0xFFFFFull
#define SEG_FILL_SHIFT 20
#define SEG_FILL_MASK 0xFFFFFull
#define SEG_STATE_SHIFT 40
#define SEG_FREE 0
#define SEG_OPEN 1
#define SEG_FULL 2
#define SEG_CLEANING 3
#define READ_BUFFER (2 * SEG_BLOCK) /* an object from a 16-byte boundary spans at most two blocks */

static inline uint32_t obj_span(uint32_t len) { return (OBJ_HEADER + len + OBJ_ALIGN - 1) / OBJ_ALIGN * OBJ_ALIGN; }
static inline uint32_t seg_live(uint64_t w) { return (uint32_t)(w & SEG_LIVE_MASK); }
static inline uint32_t seg_fill(uint64_t w) { return (uint32_t)(w >> SEG_FILL_SHIFT & SEG_FILL_MASK); }
static inline unsigned seg_state(uint64_t w) { return (unsigned)(w >> SEG_STATE_SHIFT & 3); }
static inline uint64_t seg_word(uint32_t live, uint32_t fill, unsigned state)
{
    return (uint64_t)state << SEG_STATE_SHIFT | (uint64_t)fill << SEG_FILL_SHIFT | live;
}
/* The segment an entry's location is in. */
static inline uint32_t loc_segment(uint32_t loc) { return (uint32_t)((uint64_t)loc * OBJ_ALIGN >> SEG_SHIFT); }

struct Ctx;
/* 0, or -errno (no memory: -ENOMEM; a file too small for the table: -EFBIG). */
int backing_attach(Engine *e, int fd, uint64_t size);
void backing_detach(Engine *e);
/* Bounded steps (the backing lock held inside): objects moved. */
long writeback_step(Engine *e, unsigned max_objects, unsigned long long max_bytes, unsigned idle_ticks,
                   unsigned long long *nbytes);
long clean_step(Engine *e, unsigned max_objects, unsigned long long max_bytes, unsigned percent, int *freed);
/* A backed page's payload into t's read buffer: ST_OK (*payload set),
 * ST_CORRUPT (the file does not hold its object there), ST_IO. */
int backing_load(Engine *e, struct Ctx *t, uint64_t idx, uint64_t entry, const uint8_t **payload);
/* What a backed entry leaves: its object's bytes are dead from now on. */
void backing_release(Engine *e, uint64_t entry);
/* figures: size, live, dead, used segments, bytes written; -1 without a file. */
int backing_figures(Engine *e, unsigned long long out[5]);
int backing_errno(Engine *e);
#define LAT_BUCKETS 24 /* backed-read latency, log2 microseconds: up to 8 s */
int backing_latency(Engine *e, unsigned long long out[LAT_BUCKETS]);
int rebuild_segments(Engine *e, const uint64_t *pages, size_t npx, const uint64_t *segs, size_t nsx,
                     unsigned long long *count, char *err, size_t errlen);
int check_segments(Engine *e, const uint64_t *pages, size_t npx, const uint64_t *segs, size_t nsx, char *err,
                   size_t errlen);

/* ---- rebuild.c ------------------------------------------------------------- */

/* Broken invariants, collected as the reference does (the first 20). */
typedef struct {
    char *msg;
    size_t cap, len;
    int n;
} Errs;

int rebuild_all(Engine *e, const uint64_t *ext, size_t next, unsigned nalgos, unsigned long long counts[3], char *err,
                size_t errlen);
int check_all(Engine *e, const uint64_t *ext, size_t next, Errs *b, char *fatal, size_t fatlen);

#endif
