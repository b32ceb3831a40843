/* The pool: frames, handles, zspages, object bytes and compaction (as
 * mm/zsmalloc.c; pool.py is the reference, with the glossary and the crash
 * rules each step below follows).
 *
 * Locks, per function (the order is engine.h's: entry bit, class lock,
 * pool lock):
 *   frames and handles (frame_room, take_frame, give_frame, new_handle,
 *   drop_handle, trim_locked, punch): the caller holds the pool lock;
 *   trim_excess and refill_reserve take it.
 *   zspages and slots (new_zspage, free_zspage, pop_slot, push_slot,
 *   link_zs, unlink_zs, put_bytes, get_bytes): the caller holds the class
 *   lock; new_zspage and free_zspage take the pool lock inside it.
 *   objects (obj_store, obj_copy, obj_free): take what they need; the
 *   caller holds whatever keeps the handle alive (a page's entry bit).
 *   compaction (compact, compact_class): take the class locks, COMPACT_STEP
 *   moves per hold.
 *   freeable, freeable_frames, frame_room: also called with no lock, on
 *   figures read with LOAD (engine.h, "Figures read ... without a lock").
 */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>

/* ---- frames (pool lock) ---------------------------------------------------- */

long long frame_room_over(const Engine *e, unsigned over)
{
    /* Under the pool lock from the allocator, unlocked from Python's
     * frame_room(); frame_limit is set from Python holding none of the locks. */
    long long used = LOAD(e->frames_used), limit = LOAD(e->frame_limit);
    long long room = (long long)e->max_frames - used;
    if (limit) {
        long long lim = limit + (over < MOVE_RESERVE ? over : MOVE_RESERVE) - used;
        if (lim < room)
            room = lim;
    }
    return room;
}

long long frame_room(const Engine *e) { return frame_room_over(e, 0); }

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

int punch(Engine *e, uint32_t first, uint32_t count)
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

/* trim() (engine.h) once a free left more than the reserve. */
long trim_excess(Engine *e)
{
    pool_lock(e);
    long n = trim_locked(e);
    pool_unlock(e);
    return n;
}

long refill_reserve(Engine *e)
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
        frame_bytes(e, frame)[0] = 0; /* fault it in now */
        e->hot[e->hot_top] = frame;
        STORE(e->hot_top, e->hot_top + 1);
        added++;
    }
    pool_unlock(e);
    return added;
}

/* ---- handles (pool lock) ------------------------------------------------- */

uint32_t new_handle(Engine *e, uint64_t value)
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

void drop_handle(Engine *e, uint32_t h)
{
    CHECK(h <= e->max_handles && e->handle_free_top <= e->max_handles);
    e->handle[h] = 0;
    e->handle_stack[e->handle_free_top++] = h;
    STORE(e->handles_used, e->handles_used - 1);
}

/* ---- zspages and fullness (class lock) --------------------------------------- */

void link_zs(Engine *e, uint32_t z, unsigned cls, unsigned group)
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

/* With the class lock held; takes the pool lock for the id and frames.
 * `over`: frames past the limit it may take (frame_room_over). */
static uint32_t new_zspage(Engine *e, unsigned cls, unsigned over)
{
    unsigned nf = e->cframes[cls], objs = e->cobjs[cls], size = e->csize[cls];
    uint32_t z, frames[MAX_FRAMES_PER_ZSPAGE];
    pool_lock(e);
    if (frame_room_over(e, over) < (long long)nf) {
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
        *slot_word(e, frame, offset & (FRAME_SIZE - 1)) = free_slot_header(slot + 1 < objs ? slot + 1 : SLOT_END);
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
    e->zs_free[z] = (uint16_t)slot_next(*w);
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
    *slot_word(e, frame, off) = free_slot_header(e->zs_free[z]);
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
    memcpy(frame_bytes(e, frame) + off, data, first);
    if (first < n) {
        uint32_t next = e->frame_next[frame];
        CHECK(next < e->max_frames);
        memcpy(frame_bytes(e, next), data + first, n - first);
    }
}

/* n bytes at (frame, off) into dst, following the chain across frames. */
static void get_bytes(Engine *e, uint32_t frame, uint32_t off, uint32_t n, uint8_t *dst)
{
    const uint8_t *p = frame_bytes(e, frame) + off;
    if (off + n <= FRAME_SIZE) {
        memcpy(dst, p, n);
        return;
    }
    uint32_t first = FRAME_SIZE - off;
    uint32_t next = e->frame_next[frame];
    CHECK(next < e->max_frames);
    memcpy(dst, p, first);
    memcpy(dst + first, frame_bytes(e, next), n - first);
}

/* pool.store: returns the handle, 0 when full (PoolFull). n in 1..4096 and
 * either n == 4096 or n + HEADER <= 4096 (checked by callers).  Takes the
 * class lock (and the pool lock inside it).  `over`: frames past the limit
 * it may take, for a background move (MOVE_RESERVE); 0 for a write. */
uint32_t obj_store_over(Engine *e, const uint8_t *data, uint32_t n, unsigned over)
{
    if (n == FRAME_SIZE) {
        pool_lock(e);
        uint32_t h = 0, frame = 0;
        if (frame_room_over(e, over) >= 1) {
            h = new_handle(e, 0);
            if (h)
                frame = take_frame(e);
        }
        pool_unlock(e);
        if (!h)
            return 0;
        memcpy(frame_bytes(e, frame), data, FRAME_SIZE);
        __atomic_store_n(&e->handle[h], huge_loc(frame), __ATOMIC_RELEASE); /* last: crash rule 1 */
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
        z = new_zspage(e, cls, over);
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
    __atomic_store_n(&e->handle[h], obj_loc(z, slot), __ATOMIC_RELEASE); /* last: crash rule 1 */
    class_unlock(e, cls);
    ADD(e->obj_bytes, n);
    return h;
}

uint32_t obj_store(Engine *e, const uint8_t *data, uint32_t n) { return obj_store_over(e, data, n, 0); }

/* The n payload bytes of handle h into dst.  The caller holds what keeps h
 * alive (the page's entry lock, or is the only thread); a compressed object
 * is copied under its class lock, which compaction holds while it moves
 * objects, so the copy is never torn by a move. */
void obj_copy(Engine *e, uint32_t h, uint32_t n, uint8_t *dst)
{
    uint64_t loc = __atomic_load_n(&e->handle[h], __ATOMIC_ACQUIRE);
    if (loc_is_huge(loc)) { /* a huge object never moves */
        CHECK(loc_frame(loc) < e->max_frames);
        memcpy(dst, frame_bytes(e, loc_frame(loc)), n);
        return;
    }
    unsigned cls = e->class_of[n + HEADER];
    class_lock(e, cls);
    loc = e->handle[h];
    uint32_t z = (uint32_t)loc_zspage(loc);
    CHECK(z <= e->max_frames && e->zs_class[z] < e->ncls);
    uint32_t off, frame = zs_frame_at(e, z, loc_slot(loc) * e->csize[e->zs_class[z]], &off);
    get_bytes(e, frame, off + HEADER, n, dst);
    class_unlock(e, cls);
}

/* Free object h of n payload bytes; nothing names it any more (crash rule 2). */
void obj_free(Engine *e, uint32_t h, uint32_t n)
{
    uint64_t loc = __atomic_load_n(&e->handle[h], __ATOMIC_ACQUIRE);
    SUB(e->obj_bytes, n);
    if (loc_is_huge(loc)) {
        pool_lock(e);
        give_frame(e, loc_frame(loc));
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
    uint32_t z = (uint32_t)loc_zspage(loc);
    CHECK(z <= e->max_frames && e->zs_class[z] == cls);
    push_slot(e, z, e->zs_class[z], loc_slot(loc));
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
unsigned long long freeable(const Engine *e, unsigned cls)
{
    unsigned long long cap = LOAD(e->cls_zspages[cls]) * e->cobjs[cls], used = LOAD(e->cls_used[cls]);
    return cap > used ? (cap - used) / e->cobjs[cls] : 0;
}

unsigned long long freeable_frames(const Engine *e)
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
                if (!slot_is_free(hdr))
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
            __atomic_store_n(&e->handle[hdr], obj_loc(dst, dslot), __ATOMIC_RELEASE);
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

long long compact(Engine *e, unsigned long long budget)
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

