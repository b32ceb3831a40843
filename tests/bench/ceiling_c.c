/* The per-page ceiling through the system's liblz4 and libzstd, the ones the
 * C engine links: sizes, one-core speeds, per-page decompression latency and
 * what a dictionary costs (CDict/DDict memory, training time).  The Python
 * side (zswapd/bench/ceiling.py) computes the same sizes through
 * python-zstandard, which bundles its own libzstd; this tool says what the
 * engine's own library does.
 *
 *   cc -O2 -o ceiling_c tests/bench/ceiling_c.c -lzstd -llz4
 *   ceiling_c codec PAGES HUGE LEVEL [DICT]   sizes and speeds for lz4, zstd at LEVEL,
 *                                             and zstd at LEVEL with DICT (a file)
 *   ceiling_c latency PAGES HUGE LEVEL DICT  per-page decompression latency, the three
 *                                             codecs timed in alternation, warm and cold
 *   ceiling_c op PAGES HUGE LEVEL DICT|- compress|decompress lz4|zstd|zstd+dict
 *                                             one operation, for callgrind (see cmd_op)
 *   ceiling_c train SAMPLES KIB               train on SAMPLES (raw pages) four ways
 *   ceiling_c write PAGES KIB OUT             write a dictionary made by ZDICT_trainFromBuffer
 *
 * PAGES and SAMPLES are files of raw 4 KiB pages.  HUGE is the pool's huge
 * threshold (python -c 'from zswapd.pool import HUGE_THRESHOLD as h; print(h)'):
 * the rule (a compressed length >= HUGE is stored raw) is codec.is_huge's.
 * Same-filled pages cost 0 and are skipped, as the codec does.  Output: one
 * line of key=value per measurement.
 */
#define ZDICT_STATIC_LINKING_ONLY
#define ZSTD_STATIC_LINKING_ONLY
#include <lz4.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zdict.h>
#include <zstd.h>

#define PAGE 4096
#define REPS 5

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*n ? *n : 1);
    if (!b || fread(b, 1, *n, f) != *n) {
        perror(path);
        exit(2);
    }
    fclose(f);
    return b;
}

/* Peak resident set since the last reset, and the reset (Linux clear_refs 5). */
static long hwm_kib(void)
{
    char line[256];
    long v = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6))
            v = atol(line + 6);
    if (f)
        fclose(f);
    return v;
}

static void reset_hwm(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static int same_filled(const unsigned char *p)
{
    uint64_t w, x;
    memcpy(&w, p, 8);
    for (int i = 8; i < PAGE; i += 8) {
        memcpy(&x, p + i, 8);
        if (x != w)
            return 0;
    }
    return 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p)
{
    qsort(v, n, sizeof *v, cmp_double);
    return v[(size_t)(p * (double)(n - 1))];
}

/* A codec under test: compresses one page into dst (room bytes), 0 if it
 * does not fit; decompresses into a page. */
typedef struct {
    const char *name;
    int level;
    ZSTD_CCtx *cc;
    ZSTD_DCtx *dc;
    ZSTD_CDict *cdict;
    ZSTD_DDict *ddict;
} Codec;

static size_t comp(Codec *c, const unsigned char *src, unsigned char *dst, size_t room)
{
    if (!c->cc) {
        int n = LZ4_compress_default((const char *)src, (char *)dst, PAGE, (int)room);
        return n > 0 ? (size_t)n : 0;
    }
    /* A CDict is referenced by the context (ZSTD_CCtx_refCDict, once), so
     * ZSTD_compress2 keeps the context's frame flags: plain
     * ZSTD_compress_usingCDict would write a content size and a dict id, and
     * its _advanced form, which takes frame flags, is deprecated in 1.5. */
    size_t r = ZSTD_compress2(c->cc, dst, room, src, PAGE);
    return ZSTD_isError(r) ? 0 : r;
}

static int decomp(Codec *c, const unsigned char *src, size_t n, unsigned char *dst)
{
    if (!c->cc)
        return LZ4_decompress_safe((const char *)src, (char *)dst, (int)n, PAGE) == PAGE ? 0 : -1;
    size_t r = c->ddict ? ZSTD_decompress_usingDDict(c->dc, dst, PAGE, src, n, c->ddict)
                        : ZSTD_decompressDCtx(c->dc, dst, PAGE, src, n);
    return !ZSTD_isError(r) && r == PAGE ? 0 : -1;
}

/* Frames as the engine writes them: no content size, checksum or dict id. */
static ZSTD_CCtx *cctx(int level)
{
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, level);
    ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
    ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 0);
    ZSTD_CCtx_setParameter(cc, ZSTD_c_dictIDFlag, 0);
    /* RAW_LITERALS=1: literals stored, not Huffman coded (an experimental
     * parameter): trades ratio for decoding speed. */
    if (getenv("RAW_LITERALS"))
        ZSTD_CCtx_setParameter(cc, ZSTD_c_literalCompressionMode, ZSTD_ps_disable);
    return cc;
}

/* A CDict with the parameters zstd picks for 4 KiB inputs (the default
 * ZSTD_createCDict picks them for inputs of unknown size: bigger tables). */
static ZSTD_CDict *cdict_for_pages(const void *dict, size_t n, int level, int by_ref)
{
    ZSTD_compressionParameters cp = ZSTD_getCParams(level, PAGE, n);
    return ZSTD_createCDict_advanced(dict, n, by_ref ? ZSTD_dlm_byRef : ZSTD_dlm_byCopy, ZSTD_dct_fullDict, cp,
                                     ZSTD_defaultCMem);
}

static void run_codec(Codec *c, const unsigned char *pages, size_t np, size_t huge)
{
    unsigned char *out = malloc(np * PAGE), page[PAGE];
    size_t *len = calloc(np, sizeof *len);
    double *lat = malloc(np * REPS * sizeof *lat), tc[REPS], td[REPS];
    size_t stored = 0, nsame = 0, nhuge = 0, ncomp = 0, nlat = 0;
    for (int r = 0; r < REPS; r++) {
        double t = now();
        ncomp = 0;
        for (size_t i = 0; i < np; i++) {
            const unsigned char *p = pages + i * PAGE;
            if (same_filled(p)) {
                len[i] = 0;
                continue;
            }
            ncomp++;
            /* huge - 1 bytes of room: a page that needs more is huge (codec.is_huge) */
            len[i] = comp(c, p, out + i * PAGE, huge - 1);
            if (!len[i])
                len[i] = PAGE;
        }
        tc[r] = now() - t;
    }
    for (size_t i = 0; i < np; i++) {
        stored += len[i];
        nsame += !len[i] && same_filled(pages + i * PAGE);
        nhuge += len[i] == PAGE;
    }
    for (int r = 0; r < REPS; r++) {
        double t = now();
        for (size_t i = 0; i < np; i++) {
            if (!len[i] || len[i] == PAGE)
                continue;
            double t1 = now();
            if (decomp(c, out + i * PAGE, len[i], page) || (r == 0 && memcmp(page, pages + i * PAGE, PAGE))) {
                fprintf(stderr, "%s: page %zu did not come back\n", c->name, i);
                exit(1);
            }
            lat[nlat++] = now() - t1;
        }
        td[r] = now() - t;
    }
    size_t ndec = nlat / REPS;
    double warm50 = pct(lat, nlat, 0.5) * 1e6, warm99 = pct(lat, nlat, 0.99) * 1e6;
    /* Cold: caches flushed by walking 32 MiB before each of up to 2000 pages,
     * as a swap-in after a while of other work would find them. */
    static unsigned char *junk;
    double cold50 = 0, cold99 = 0;
    if (getenv("COLD")) {
        size_t nc = 0;
        if (!junk)
            junk = calloc(32u << 20, 1);
        for (size_t i = 0; i < np && nc < 2000; i++) {
            if (!len[i] || len[i] == PAGE)
                continue;
            for (size_t j = 0; j < (32u << 20); j += 64)
                junk[j]++;
            double t1 = now();
            decomp(c, out + i * PAGE, len[i], page);
            lat[nc++] = now() - t1;
        }
        cold50 = pct(lat, nc, 0.5) * 1e6;
        cold99 = pct(lat, nc, 0.99) * 1e6;
    }
    printf("codec=%s level=%d pages=%zu same=%zu huge=%zu stored=%zu ratio=%.4f comp_MBps=%.1f dec_MBps=%.1f "
           "dec_p50_us=%.2f dec_p99_us=%.2f cold_p50_us=%.2f cold_p99_us=%.2f\n",
           c->name, c->level, np, nsame, nhuge, stored, (double)np * PAGE / (double)(stored ? stored : 1),
           ncomp * PAGE / pct(tc, REPS, 0.5) / 1e6, ndec * PAGE / pct(td, REPS, 0.5) / 1e6, warm50, warm99, cold50,
           cold99);
    free(out);
    free(len);
    free(lat);
}

static int cmd_codec(int argc, char **argv)
{
    size_t n, dn = 0;
    unsigned char *pages = slurp(argv[2], &n), *dict = NULL;
    size_t np = n / PAGE, huge = (size_t)atol(argv[3]);
    int level = atoi(argv[4]);
    Codec lz = {"lz4", 0, NULL, NULL, NULL, NULL};
    Codec zs = {"zstd", level, cctx(level), ZSTD_createDCtx(), NULL, NULL};
    run_codec(&lz, pages, np, huge);
    run_codec(&zs, pages, np, huge);
    if (argc < 6)
        return 0;
    dict = slurp(argv[5], &dn);
    printf("dict bytes=%zu id=%u header=%zu\n", dn, ZDICT_getDictID(dict, dn), ZDICT_getDictHeaderSize(dict, dn));
    /* Memory of each way to hold it, and its creation time. */
    for (int by_ref = 0; by_ref < 2; by_ref++) {
        double t = now();
        ZSTD_CDict *a = by_ref ? ZSTD_createCDict_byReference(dict, dn, level) : ZSTD_createCDict(dict, dn, level);
        double ta = now() - t;
        t = now();
        ZSTD_CDict *b = cdict_for_pages(dict, dn, level, by_ref);
        double tb = now() - t;
        t = now();
        ZSTD_DDict *d = by_ref ? ZSTD_createDDict_byReference(dict, dn) : ZSTD_createDDict(dict, dn);
        double td = now() - t;
        printf("by_ref=%d cdict_default_bytes=%zu create_us=%.0f cdict_4k_bytes=%zu create_us=%.0f ddict_bytes=%zu "
               "create_us=%.0f cctx_bytes=%zu dctx_bytes=%zu\n",
               by_ref, ZSTD_sizeof_CDict(a), ta * 1e6, ZSTD_sizeof_CDict(b), tb * 1e6, ZSTD_sizeof_DDict(d), td * 1e6,
               ZSTD_sizeof_CCtx(zs.cc), ZSTD_sizeof_DCtx(zs.dc));
        ZSTD_freeCDict(a);
        ZSTD_freeCDict(b);
        ZSTD_freeDDict(d);
    }
    Codec zd = {"zstd+dict(default cdict)", level, cctx(level), ZSTD_createDCtx(), ZSTD_createCDict(dict, dn, level),
                ZSTD_createDDict_byReference(dict, dn)};
    ZSTD_CCtx_refCDict(zd.cc, zd.cdict);
    run_codec(&zd, pages, np, huge);
    Codec z4 = {"zstd+dict(4k cdict)", level, cctx(level), ZSTD_createDCtx(), cdict_for_pages(dict, dn, level, 1),
                zd.ddict};
    ZSTD_CCtx_refCDict(z4.cc, z4.cdict);
    run_codec(&z4, pages, np, huge);
    return 0;
}

/* Per-page decompression latency of lz4, zstd at LEVEL and zstd at LEVEL
 * with DICT, timed page by page in alternation (so the machine's drift falls
 * on all three alike), warm and then cold (caches flushed before each page).
 * Pages huge under any of them are left out. */
static int cmd_latency(char **argv)
{
    size_t n, dn;
    unsigned char *pages = slurp(argv[2], &n), *dict;
    size_t np = n / PAGE, huge = (size_t)atol(argv[3]);
    int level = atoi(argv[4]);
    dict = slurp(argv[5], &dn);
    Codec c[3] = {{"lz4", 0, NULL, NULL, NULL, NULL},
                  {"zstd", level, cctx(level), ZSTD_createDCtx(), NULL, NULL},
                  {"zstd+dict", level, cctx(level), ZSTD_createDCtx(), ZSTD_createCDict_byReference(dict, dn, level),
                   ZSTD_createDDict_byReference(dict, dn)}};
    ZSTD_CCtx_refCDict(c[2].cc, c[2].cdict);
    unsigned char *out[3], page[PAGE];
    size_t *len[3], nl = 0;
    for (int k = 0; k < 3; k++) {
        out[k] = malloc(np * PAGE);
        len[k] = calloc(np, sizeof(size_t));
    }
    size_t *idx = malloc(np * sizeof *idx);
    for (size_t i = 0; i < np; i++) {
        const unsigned char *p = pages + i * PAGE;
        if (same_filled(p))
            continue;
        int ok = 1;
        for (int k = 0; k < 3; k++) {
            len[k][i] = comp(&c[k], p, out[k] + i * PAGE, huge - 1);
            ok &= len[k][i] > 0;
        }
        if (ok)
            idx[nl++] = i;
    }
    static unsigned char junk[32u << 20];
    for (int cold = 0; cold < 2; cold++) {
        size_t reps = cold ? 1 : REPS, m = cold ? (nl < 3000 ? nl : 3000) : nl, nt = 0;
        double *lat[3];
        for (int k = 0; k < 3; k++)
            lat[k] = malloc(m * reps * sizeof(double));
        for (size_t r = 0; r < reps; r++)
            for (size_t j = 0; j < m; j++) {
                size_t i = idx[j];
                for (int k = 0; k < 3; k++) {
                    if (cold)
                        for (size_t b = 0; b < sizeof junk; b += 64)
                            junk[b]++;
                    double t = now();
                    if (decomp(&c[k], out[k] + i * PAGE, len[k][i], page)) {
                        fprintf(stderr, "%s: page %zu did not come back\n", c[k].name, i);
                        return 1;
                    }
                    lat[k][nt] = now() - t;
                }
                nt++;
            }
        for (int k = 0; k < 3; k++) {
            double p50 = pct(lat[k], nt, 0.5), p99 = pct(lat[k], nt, 0.99), p999 = pct(lat[k], nt, 0.999);
            printf("latency=%s codec=%s level=%d dict=%zu pages=%zu p50_us=%.2f p99_us=%.2f p999_us=%.2f\n",
                   cold ? "cold" : "warm", c[k].name, c[k].level, k == 2 ? dn : 0, m, p50 * 1e6, p99 * 1e6, p999 * 1e6);
            free(lat[k]);
        }
    }
    return 0;
}

/* One operation over every page that all codecs store compressed, in a
 * function of its own, for instruction counts that the machine's load does
 * not change:  valgrind --tool=callgrind --toggle-collect=run_op ceiling_c op ...
 * OP is compress or decompress; CODEC lz4, zstd or zstd+dict (DICT: a file, or -). */
static __attribute__((noinline)) size_t run_op(Codec *c, int decompress, unsigned char *src, size_t *len,
                                               size_t *idx, size_t m, size_t huge)
{
    unsigned char page[PAGE], buf[PAGE];
    size_t total = 0;
    for (size_t j = 0; j < m; j++) {
        size_t i = idx[j];
        if (decompress)
            total += !decomp(c, src + i * PAGE, len[i], page);
        else
            total += comp(c, src + i * PAGE, buf, huge - 1);
    }
    return total;
}

static int cmd_op(char **argv)
{
    size_t n, dn = 0;
    unsigned char *pages = slurp(argv[2], &n), *dict = NULL;
    size_t np = n / PAGE, huge = (size_t)atol(argv[3]);
    int level = atoi(argv[4]), decompress = !strcmp(argv[6], "decompress");
    const char *name = argv[7];
    if (strcmp(argv[5], "-"))
        dict = slurp(argv[5], &dn);
    Codec c = {name, level, NULL, NULL, NULL, NULL};
    if (strcmp(name, "lz4")) {
        c.cc = cctx(level);
        c.dc = ZSTD_createDCtx();
    }
    if (!strcmp(name, "zstd+dict")) {
        c.cdict = ZSTD_createCDict_byReference(dict, dn, level);
        c.ddict = ZSTD_createDDict_byReference(dict, dn);
        ZSTD_CCtx_refCDict(c.cc, c.cdict);
    }
    unsigned char *out = malloc(np * PAGE);
    size_t *len = calloc(np, sizeof *len), *idx = malloc(np * sizeof *idx), m = 0;
    for (size_t i = 0; i < np; i++)
        if (!same_filled(pages + i * PAGE) && (len[i] = comp(&c, pages + i * PAGE, out + i * PAGE, huge - 1)))
            idx[m++] = i;
    size_t ok = run_op(&c, decompress, decompress ? out : pages, len, idx, m, huge);
    printf("op=%s codec=%s level=%d dict=%zu pages=%zu ok=%zu\n", argv[6], name, level, dn, m, ok);
    return 0;
}

static void train_one(const char *how, const unsigned char *s, size_t *sizes, unsigned ns, size_t cap,
                      ZDICT_fastCover_params_t *fp, int mode)
{
    void *dict = malloc(cap);
    reset_hwm();
    long before = hwm_kib();
    double t = now(), c = cpu();
    size_t r;
    if (mode == 0)
        r = ZDICT_trainFromBuffer(dict, cap, s, sizes, ns);
    else if (mode == 1)
        r = ZDICT_optimizeTrainFromBuffer_fastCover(dict, cap, s, sizes, ns, fp);
    else if (mode == 2)
        r = ZDICT_trainFromBuffer_fastCover(dict, cap, s, sizes, ns, *fp);
    else {
        ZDICT_cover_params_t cp;
        memset(&cp, 0, sizeof cp);
        cp.d = 8;
        cp.steps = 4;
        cp.zParams.compressionLevel = fp->zParams.compressionLevel;
        r = ZDICT_optimizeTrainFromBuffer_cover(dict, cap, s, sizes, ns, &cp);
    }
    double wall = now() - t, used = cpu() - c;
    if (ZDICT_isError(r)) {
        printf("train=%s error=%s\n", how, ZDICT_getErrorName(r));
    } else {
        printf("train=%s samples=%u bytes=%zu id=%u wall_s=%.3f cpu_s=%.3f k=%u d=%u f=%u peak_growth_kib=%ld\n", how,
               ns, r, ZDICT_getDictID(dict, r), wall, used, fp->k, fp->d, fp->f, hwm_kib() - before);
    }
    free(dict);
}

static int cmd_train(char **argv)
{
    size_t n;
    unsigned char *all = slurp(argv[2], &n);
    size_t cap = (size_t)atol(argv[3]) * 1024;
    unsigned ns = 0;
    unsigned char *s = malloc(n ? n : 1);
    for (size_t i = 0; i + PAGE <= n; i += PAGE) /* same-filled pages are never recompressed */
        if (!same_filled(all + i))
            memcpy(s + (size_t)ns++ * PAGE, all + i, PAGE);
    size_t *sizes = malloc(ns * sizeof *sizes);
    for (unsigned i = 0; i < ns; i++)
        sizes[i] = PAGE;
    ZDICT_fastCover_params_t fp;
    memset(&fp, 0, sizeof fp);
    train_one("trainFromBuffer", s, sizes, ns, cap, &fp, 0);
    fp.d = 8; /* what ZDICT_trainFromBuffer sets */
    fp.steps = 4;
    fp.zParams.compressionLevel = 3;
    train_one("optimize_fastCover(d8,steps4)", s, sizes, ns, cap, &fp, 1);
    /* The k the optimizer chose, without the search. */
    fp.steps = 0;
    fp.splitPoint = 1.0;
    train_one("fastCover(fixed k,d)", s, sizes, ns, cap, &fp, 2);
    fp.k = 0;
    fp.f = 0;
    fp.steps = 4;
    fp.splitPoint = 0;
    fp.nbThreads = 2;
    train_one("optimize_fastCover(2 threads)", s, sizes, ns, cap, &fp, 1);
    if (ns <= 4096)
        train_one("optimize_cover(d8,steps4)", s, sizes, ns, cap, &fp, 3);
    return 0;
}

static int cmd_write(char **argv)
{
    size_t n;
    unsigned char *all = slurp(argv[2], &n);
    size_t cap = (size_t)atol(argv[3]) * 1024;
    unsigned ns = (unsigned)(n / PAGE);
    size_t *sizes = malloc(ns * sizeof *sizes);
    for (unsigned i = 0; i < ns; i++)
        sizes[i] = PAGE;
    void *dict = malloc(cap);
    size_t r = ZDICT_trainFromBuffer(dict, cap, all, sizes, ns);
    if (ZDICT_isError(r)) {
        fprintf(stderr, "%s\n", ZDICT_getErrorName(r));
        return 1;
    }
    FILE *f = fopen(argv[4], "wb");
    if (!f || fwrite(dict, 1, r, f) != r || fclose(f))
        return 1;
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("libzstd=%s liblz4=%s\n", ZSTD_versionString(), LZ4_versionString());
    if (argc >= 5 && !strcmp(argv[1], "codec"))
        return cmd_codec(argc, argv);
    if (argc == 8 && !strcmp(argv[1], "op"))
        return cmd_op(argv);
    if (argc == 6 && !strcmp(argv[1], "latency"))
        return cmd_latency(argv);
    if (argc == 4 && !strcmp(argv[1], "train"))
        return cmd_train(argv);
    if (argc == 5 && !strcmp(argv[1], "write"))
        return cmd_write(argv);
    fprintf(stderr, "usage: see the comment at the top of %s\n", __FILE__);
    return 2;
}
