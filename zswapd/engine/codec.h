/* The codecs and each thread's context for them (zcomp.h's job): the one
 * place in C that turns a page into a kind and a payload, and back.  Nothing
 * here takes a lock of the engine's: a thread compresses in its own context. */
#ifndef ZSWAPD_CODEC_H
#define ZSWAPD_CODEC_H

#include "engine.h"

#include <zstd.h>

/* The page a write stopped at (REFUSED, NOROOM), encoded.  The write goes
 * on from it once the store's policy has decided, and stores this instead of
 * compressing the page a second time; its bytes are kept to make sure it is
 * the same page (a partial page is merged with whatever the page holds by
 * then).  e NULL: none. */
typedef struct {
    const Engine *e;
    uint64_t idx;
    unsigned kind, algo;
    uint32_t len;
    uint64_t word;
    uint8_t page[PAGE_SIZE];     /* the page as encoded */
    uint8_t payload[FRAME_SIZE]; /* its compressed form */
} Stopped;

/* A thread's codec state: made on the thread's first page (a FUSE thread's
 * at its start), reused for every page after, freed when the thread ends.
 * The dictionaries' digested forms are not here: one ZSTD_DDict per slot,
 * shared by every thread, and the recompression step's ZSTD_CDict live in
 * the Engine (tier.c). */
typedef struct Ctx {
    void *lz4_state;
    ZSTD_CCtx *zc;
    ZSTD_DCtx *zd;
    int zlevel; /* level zc is set to; INT_MIN: not yet */
    ZSTD_CCtx *rzc; /* the secondary codec's (tier.c), made on first use: never a serving thread's */
    int rzlevel;
    uint8_t rbuf[FRAME_SIZE]; /* recompressed output */
    uint8_t cbuf[FRAME_SIZE]; /* compressed output */
    uint8_t pbuf[PAGE_SIZE];  /* a page for read-modify-write */
    uint8_t obuf[FRAME_SIZE]; /* an object copied out of the pool */
    uint8_t *dbuf;            /* READ_BUFFER, block aligned: a backed object read O_DIRECT */
    Stopped stopped;
} Ctx;

/* Once, at module load: the key whose destructor frees a thread's Ctx. */
int codec_init(void);
/* This thread's context, with zstd at the engine's level (e NULL: as it
 * is); NULL: no memory. */
Ctx *ctx_get(Engine *e);
/* 0 if zstd accepts `level`, -1 if not (checked on this thread's context). */
int codec_check_level(int level);
/* codec.encode: the page's kind; *payload and *len for an object, *word for
 * a same-filled page. */
unsigned encode(Engine *e, Ctx *t, unsigned algo, const uint8_t *page, const uint8_t **payload, uint32_t *len,
                uint64_t *word);
/* n bytes of a compressed object of `tier` (entry.h) into a 4096-byte page;
 * -1 if they are not one. */
int decompress(Engine *e, Ctx *t, unsigned algo, unsigned tier, const uint8_t *src, uint32_t n, uint8_t *dst);
/* The secondary codec (tier.c): the page compressed with zstd at `level`
 * (with cdict, if not NULL) into at most room bytes of t->rbuf; 0 if it
 * does not fit. */
uint32_t recompress_page(Ctx *t, int level, const ZSTD_CDict *cdict, const uint8_t *page, uint32_t room);
const char *codec_lz4_version(void);
const char *codec_zstd_version(void);

#endif
