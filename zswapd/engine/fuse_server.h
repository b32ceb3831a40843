/* What the FUSE threads' two files share: the Server (one per set of
 * threads) and its Thread slots.  fuse_loop.c runs the threads (reading,
 * waking, stopping); fuse_ops.c decides what a request gets (served in C, or
 * handed up to Python) and writes replies.  The fields' rules are at the top
 * of fuse_loop.c. */
#ifndef ZSWAPD_FUSE_SERVER_H
#define ZSWAPD_FUSE_SERVER_H

#include "module.h"

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
    EngineObject *engine;
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

/* fuse_ops.c */
/* 1 if the request was served here (and answered), 0 to hand it up. */
int serve_hot(Server *s, int fd, const uint8_t *in, size_t n, uint8_t *out);
/* Up to Python with the GIL, and its reply (EIO if it fails) back down. */
void serve_cold(Server *s, int fd, const uint8_t *in, size_t n);
void write_reply(Server *s, int fd, const void *buf, size_t n);

#endif
