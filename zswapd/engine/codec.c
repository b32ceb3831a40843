/* The codecs (as zram's zcomp.c): same-filled detection, lz4 and zstd with a
 * context per thread, and the huge rule.  codec.py is the reference and
 * decides the same way; the engine's page level (page.c) calls encode and
 * decompress with no lock held.  What runs here touches only the calling
 * thread's Ctx and the engine's algorithm and level (atomic loads).
 *
 * LZ4_compress_fast_extState_fastReset is in lz4's static-linking section:
 * the shared liblz4 does not export it, so setup.py links the system's
 * liblz4.a (PIC on Debian) when it has one, and otherwise builds with
 * ZSWAPD_LZ4_FULL_RESET, which pays a 16 KiB state reset per page.
 */
#include "codec.h"

#include <limits.h>
#include <string.h>

#define LZ4_STATIC_LINKING_ONLY
#include <lz4.h>

static pthread_key_t ctx_key;
static __thread Ctx *tls_ctx;

static void ctx_free(void *p)
{
    Ctx *t = p;
    if (!t)
        return;
    ZSTD_freeCCtx(t->zc);
    ZSTD_freeCCtx(t->rzc);
    ZSTD_freeDCtx(t->zd);
    free(t->dbuf);
    free(t->lz4_state);
    free(t);
}

int codec_init(void) { return pthread_key_create(&ctx_key, ctx_free) == 0 ? 0 : -1; }

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

Ctx *ctx_get(Engine *e)
{
    Ctx *t = tls_ctx;
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t)
            return NULL;
        t->lz4_state = malloc((size_t)LZ4_sizeofState());
        t->zc = ZSTD_createCCtx();
        t->zd = ZSTD_createDCtx();
        /* Made with the rest, at the thread's start: a read of a backed
         * page allocates nothing. */
        void *d = NULL;
        if (posix_memalign(&d, SEG_BLOCK, READ_BUFFER) == 0)
            t->dbuf = d;
        if (!t->lz4_state || !t->zc || !t->zd || !t->dbuf) {
            ctx_free(t);
            return NULL;
        }
        /* fastReset needs one full initialisation of the state. */
        LZ4_initStream(t->lz4_state, (size_t)LZ4_sizeofState());
        t->zlevel = INT_MIN;
        tls_ctx = t;
        pthread_setspecific(ctx_key, t);
    }
    if (!e)
        return t; /* the secondary codec alone (tier_api.c) */
    int level = __atomic_load_n(&e->zstd_level, __ATOMIC_RELAXED);
    if (t->zlevel != level) {
        if (set_zstd_level(t->zc, level) < 0)
            return NULL; /* set_codec validated it: cannot happen */
        t->zlevel = level;
    }
    return t;
}

int codec_check_level(int level)
{
    Ctx *t = tls_ctx;
    ZSTD_CCtx *zc = t ? t->zc : ZSTD_createCCtx();
    int r = zc ? set_zstd_level(zc, level) : -1;
    if (t)
        t->zlevel = INT_MIN; /* re-set at next use */
    else
        ZSTD_freeCCtx(zc);
    return r;
}

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

/* The huge rule is codec.py's (a compressed length >= the threshold the
 * store passes in is stored raw); compressing into threshold - 1 bytes of
 * room decides it without compressing past the point where it could matter. */
unsigned encode(Engine *e, Ctx *t, unsigned algo, const uint8_t *page, const uint8_t **payload, uint32_t *len,
                uint64_t *word)
{
    if (page[0] == page[8] && page[PAGE_SIZE - 1] == page[PAGE_SIZE - 9] && same_filled(page, word))
        return KIND_SAME;
    int room = (int)e->huge_threshold - 1;
    long n;
    ADD(e->compressions, 1);
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

int decompress(Engine *e, Ctx *t, unsigned algo, unsigned tier, const uint8_t *src, uint32_t n, uint8_t *dst)
{
    if (tier && tier != TIER_PLAIN) {
        /* a dictionary slot: the caller holds the entry lock of a page
         * naming it, which keeps it installed (tier.c) */
        const ZSTD_DDict *dd = tier <= DICT_SLOTS ? __atomic_load_n(&e->ddict[tier], __ATOMIC_ACQUIRE) : NULL;
        if (!dd || algo != ALGO_ZSTD)
            return -1;
        size_t r = ZSTD_decompress_usingDDict(t->zd, dst, PAGE_SIZE, src, n, dd);
        return (!ZSTD_isError(r) && r == PAGE_SIZE) ? 0 : -1;
    }
    if (algo == ALGO_LZ4) {
        int r = LZ4_decompress_safe((const char *)src, (char *)dst, (int)n, (int)PAGE_SIZE);
        return r == (int)PAGE_SIZE ? 0 : -1;
    }
    size_t r = ZSTD_decompressDCtx(t->zd, dst, PAGE_SIZE, src, n);
    return (!ZSTD_isError(r) && r == PAGE_SIZE) ? 0 : -1;
}

uint32_t recompress_page(Ctx *t, int level, const ZSTD_CDict *cdict, const uint8_t *page, uint32_t room)
{
    if (!t->rzc) {
        t->rzc = ZSTD_createCCtx();
        t->rzlevel = INT_MIN;
        if (!t->rzc)
            return 0;
    }
    if (cdict) {
        /* the CDict carries the level; the frame as codec.py's, no dictionary id */
        if (set_zstd_level(t->rzc, level) < 0 || ZSTD_isError(ZSTD_CCtx_refCDict(t->rzc, cdict)))
            return 0;
        t->rzlevel = INT_MIN; /* the next page without a dictionary sets it again */
    } else if (t->rzlevel != level) {
        if (set_zstd_level(t->rzc, level) < 0)
            return 0;
        t->rzlevel = level;
    }
    size_t r = ZSTD_compress2(t->rzc, t->rbuf, room, page, PAGE_SIZE);
    return ZSTD_isError(r) ? 0 : (uint32_t)r;
}

const char *codec_lz4_version(void) { return LZ4_versionString(); }
const char *codec_zstd_version(void) { return ZSTD_versionString(); }
