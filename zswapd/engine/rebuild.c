/* The rebuild scan and the invariant check.
 *
 * The scan a new worker runs before serving (rebuild.py's rebuild_pages and
 * check_pages, over pool.py's begin_rebuild / claim_word / claim_object /
 * finish_rebuild, and rebuild.check_pool), in one pass over the page table's
 * resident extents and then one over the pool tables.  It writes exactly what
 * the Python reference writes, in the same order where order shows (the
 * fullness lists are linked in the order the page table first names each
 * zspage; the free stacks are filled from the top id down), so both engines
 * leave the same bytes: tests/test_state.py compares them after crashes.
 * Messages are the reference's, so an operator reads the same error
 * whichever engine attached.  Scratch arrays (a byte per handle, frame and
 * zspage) are allocated here and freed before returning: this runs once per
 * takeover, never on the I/O path.
 *
 * Locks: the callers (module.c's rebuild and check_pages) hold lock_all, so
 * nothing else runs; the fields that are also read unlocked are still
 * stored with STORE.
 */
#include "engine.h"

#include <stdarg.h>
#include <string.h>

#define MAX_SLOTS 2048 /* objs per zspage <= 8 frames * 4096 / 16 */

static void errs_add(Errs *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void errs_add(Errs *b, const char *fmt, ...)
{
    if (b->n++ >= 20) /* as rebuild.check_pool: the first 20 */
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
        if (!loc_is_huge(loc))
            FAIL(s, "handle %llu holds a raw page but its entry 0x%llx is not a huge location",
                 (unsigned long long)h, (unsigned long long)loc);
        if (own_frame(e, s, loc_frame(loc), "huge handle", h) < 0)
            return -1;
        ADD(e->huge_objects, 1);
        ADD(e->obj_bytes, n);
        return 0;
    }
    if (loc_is_huge(loc) || !(n > 0 && n < e->huge_threshold))
        FAIL(s, "handle %llu of a %u-byte object has entry 0x%llx", (unsigned long long)h, n,
             (unsigned long long)loc);
    uint64_t z = loc_zspage(loc);
    uint32_t slot = loc_slot(loc);
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

/* The dictionary heads (rebuild.py's _check_dicts); their reference counts
 * start at 0 and the page table's scan counts them. */
static int rebuild_dicts(Engine *e, Scan *s)
{
    for (unsigned slot = 1; slot <= DICT_SLOTS; slot++) {
        uint64_t head = e->dict_head[slot];
        e->dict_refs[slot] = 0;
        if (head && (!(uint32_t)head || (uint32_t)head > DICT_MAX_BYTES || !(head >> 32)))
            FAIL(s, "dictionary slot %u has a bad head 0x%llx", slot, (unsigned long long)head);
    }
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
            unsigned kind = entry_kind(entry);
            if (!kind)
                continue;
            uint64_t h = entry_handle(entry);
            if (entry & ENTRY_UNUSED)
                FAIL(s, "page %llu: entry 0x%llx has bits set that no entry uses", (unsigned long long)idx,
                     (unsigned long long)entry);
            counts[0]++;
            /* A backed entry's object is in the file (rebuild_segments'
             * part); its dictionary reference is counted here. */
            int backed = entry_backed(entry);
            int r;
            char *outer = s->err;
            size_t outer_len = s->errlen;
            s->err = inner;
            s->errlen = sizeof inner;
            if (kind == KIND_SAME && !backed) {
                r = claim_handle(e, s, h);
                counts[1]++;
            } else {
                uint32_t n = entry_len(entry);
                unsigned tier = entry_tier(entry);
                if ((kind == KIND_HUGE) != (n == PAGE_SIZE) || entry_algo(entry) >= nalgos) {
                    snprintf(inner, sizeof inner, "entry 0x%llx has a bad length or algorithm for its kind",
                             (unsigned long long)entry);
                    r = -1;
                } else if (tier && (kind != KIND_COMPRESSED || entry_algo(entry) != ALGO_ZSTD)) {
                    snprintf(inner, sizeof inner, "entry 0x%llx names tier %u but is not a zstd object",
                             (unsigned long long)entry, tier);
                    r = -1;
                } else if (tier && tier != TIER_PLAIN && !e->dict_head[tier]) {
                    snprintf(inner, sizeof inner, "entry 0x%llx names dictionary slot %u, which the state does not hold",
                             (unsigned long long)entry, tier);
                    r = -1;
                } else {
                    r = 0;
                    if (!backed) {
                        r = claim_object(e, s, h, n);
                        counts[2] += kind == KIND_HUGE;
                    }
                    if (tier && tier != TIER_PLAIN)
                        e->dict_refs[tier]++;
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
            if (slot_is_free(hdr) || !hdr || hdr > e->max_handles || !s->claimed[hdr])
                freeslots[nfree++] = (uint16_t)slot;
            else if (e->handle[hdr] != obj_loc(z, slot))
                freeslots[nfree++] = (uint16_t)slot; /* the other copy of a compaction move */
        }
        if (objs - nfree != e->zs_inuse[z])
            FAIL(s, "zspage %u: %u claims, %u owned slots", z, e->zs_inuse[z], objs - nfree);
        uint32_t nxt = SLOT_END;
        for (unsigned k = nfree; k-- > 0;) {
            uint32_t offset = freeslots[k] * size;
            *slot_word(e, chain[offset >> FRAME_SHIFT], offset & (FRAME_SIZE - 1)) = free_slot_header(nxt);
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

int rebuild_all(Engine *e, const uint64_t *ext, size_t next, unsigned nalgos, unsigned long long counts[3],
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
        r = rebuild_dicts(e, &s);
        if (r == 0)
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

/* rebuild.check_pages + rebuild.check_pool.  Returns -1 with `fatal`
 * set for what the reference raises at once (a handle named twice, counters
 * that disagree with the page table), else 0 with any broken invariant in
 * `b`.  It also checks, where the reference compares sets, that the header
 * of each owned slot names its owner (which implies the reference's set
 * checks and is what makes two owners of one slot visible). */
int check_all(Engine *e, const uint64_t *ext, size_t next, Errs *b, char *fatal, size_t fatlen)
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
    unsigned long long drefs[DICT_SLOTS + 1] = {0};
    for (size_t x = 0; x < next; x++) {
        for (uint64_t idx = ext[2 * x]; idx < ext[2 * x + 1]; idx++) {
            uint64_t entry = e->page[idx];
            unsigned kind = entry_kind(entry);
            if (!kind)
                continue;
            uint64_t h = entry_handle(entry);
            if (entry_backed(entry)) {
                stored++;
                if (entry_tier(entry) && entry_tier(entry) <= DICT_SLOTS)
                    drefs[entry_tier(entry)]++;
                continue; /* check_segments' part */
            }
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
            if (entry_tier(entry) && entry_tier(entry) <= DICT_SLOTS)
                drefs[entry_tier(entry)]++;
            nowners++;
            if (!h || h > hm) {
                errs_add(b, "owned handle %llu is outside 1..%u", (unsigned long long)h, hm);
                continue;
            }
            if (kind == KIND_SAME)
                continue;
            uint32_t n = entry_len(entry);
            obj_bytes += n;
            uint64_t loc = e->handle[h];
            if (n == FRAME_SIZE) {
                huge++;
                uint64_t frame = loc_frame(loc);
                if (!loc_is_huge(loc) || frame >= fm) {
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
            uint64_t z = loc_zspage(loc);
            if (loc_is_huge(loc) || !(z > 0 && z <= zm)) {
                errs_add(b, "handle %llu has entry 0x%llx", (unsigned long long)h, (unsigned long long)loc);
                continue;
            }
            zcnt[z]++;
            unsigned cls = e->zs_class[z];
            if (cls < (unsigned)e->ncls && loc_slot(loc) >= e->cobjs[cls])
                errs_add(b, "zspage %llu: slot %u beyond %u", (unsigned long long)z, loc_slot(loc), e->cobjs[cls]);
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
                if (!slot_is_free(hdr) && hdr && hdr <= e->max_handles && own[hdr] &&
                    e->handle[hdr] == obj_loc(z, slot))
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
                if (!slot_is_free(hdr)) {
                    errs_add(b, "zspage %u: free slot %u has an owned header 0x%x", z, slot, hdr);
                    break;
                }
                slot = slot_next(hdr);
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
    for (unsigned slot = 1; slot <= DICT_SLOTS; slot++)
        if (drefs[slot] != (unsigned long long)LOAD(e->dict_refs[slot]))
            errs_add(b, "dictionary slot %u: %llu references counted, %llu entries name it", slot,
                     (unsigned long long)LOAD(e->dict_refs[slot]), drefs[slot]);
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

