/* The recompression tier's step (tier.c), for module.c and the census. */
#ifndef ZSWAPD_TIER_H
#define ZSWAPD_TIER_H

#include "codec.h"

/* One step's bounds: objects of [min_len, max_len] bytes (4096: a huge
 * page) idle at least idle_ticks, at most max_pages of them compressed. */
typedef struct {
    unsigned idle_ticks;
    uint32_t min_len, max_len;
    uint32_t threshold; /* bytes an object must shrink by to be kept */
    int level;          /* zstd's */
    unsigned long long max_pages;
} TierStep;

/* What a step did: pages recompressed, bytes saved, candidates compressed. */
typedef struct {
    unsigned long long pages, saved, looked;
} TierDone;

/* Is `entry` a candidate of step p at tick now? */
int tier_candidate(uint64_t entry, unsigned now, const TierStep *p);
/* Pages *cursor..end-1, until max_pages candidates were compressed; *cursor
 * is left where the next step goes on.  ST_OK, ST_NOROOM (no room for a new
 * object: *cursor stays on its page), ST_NOMEM, ST_PUNCH. */
int recompress_step(Engine *e, uint64_t *cursor, uint64_t end, const TierStep *p, TierDone *d);

#endif
