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
    unsigned slot; /* the dictionary's, 0: none (TIER_PLAIN) */
    unsigned over; /* frames past the memory limit new objects may take: 0, or
                    * up to MOVE_RESERVE for the ladder's passes (store.py) */
} TierStep;

/* What a step did: pages recompressed, bytes saved, candidates compressed;
 * and the retrain rule's probes: one candidate in PROBE_EVERY is also
 * compressed without the dictionary, and the two lengths summed. */
typedef struct {
    unsigned long long pages, saved, looked;
    unsigned long long probes, probe_plain, probe_dict;
} TierDone;

/* One candidate in 32 also compressed without the dictionary: 3% more CPU
 * for a running measure of what the dictionary gains (docs/design.md). */
#define PROBE_EVERY 32
/* A step asked for a dictionary slot that holds none. */
#define ST_NODICT 7

/* Is `entry` a candidate of step p at tick now? */
int tier_candidate(uint64_t entry, unsigned now, const TierStep *p);
/* Pages *cursor..end-1, until max_pages candidates were compressed; *cursor
 * is left where the next step goes on.  ST_OK, ST_NOROOM (no room for a new
 * object: *cursor stays on its page), ST_NOMEM, ST_PUNCH. */
int recompress_step(Engine *e, uint64_t *cursor, uint64_t end, const TierStep *p, TierDone *d);

/* Dictionaries (the tier lock's: see tier.c).  install: 0, -1 bad length
 * or no memory, -2 no free slot; *slot and *id the new one's.  drop: 0, -1
 * no such slot, -2 entries still name it.  load_all: the DDicts of every
 * installed slot (after a rebuild); returns how many zstd refused (corrupt
 * or truncated bytes in the state, or no memory).  Such a slot stays
 * installed but *broken* (dict_broken): its pages' reads fail as corrupt
 * objects (failed_reads), every other page is served, no step may use it,
 * and it is dropped once no page names it.  Its bytes are left as they
 * are: the next takeover tries them again. */
int dict_install(Engine *e, const uint8_t *bytes, uint32_t n, unsigned *slot, uint32_t *id);
int dict_drop(Engine *e, unsigned slot);
int dict_load_all(Engine *e);
int dict_broken(const Engine *e, unsigned slot);
void dict_free_all(Engine *e);
/* ZDICT_trainFromBuffer over nsamples pages; the dictionary's length, 0 if
 * training failed. */
size_t dict_train(uint8_t *out, size_t cap, const uint8_t *samples, size_t nsamples);
/* Up to max idle compressed pages, as a write stored them (tier 0) or
 * recompressed without a dictionary (TIER_PLAIN: else pages going idle a
 * few at a time, which the passes recompress plainly while there is no
 * dictionary, would never add up to a training), decompressed into out,
 * from *cursor to end every stride pages; *cursor left after the last
 * looked at.  Idle stamps are not touched: sampling is no access. */
size_t sample_idle(Engine *e, uint64_t *cursor, uint64_t end, unsigned idle_ticks, uint64_t stride, uint8_t *out,
                   size_t max);

#endif
