/* What the FUSE threads' two files share: the Server (one per set of
 * threads) and its Thread slots.  fuse_loop.c runs the threads (reading,
 * waking, stopping); fuse_ops.c decides what a request gets (served in C, or
 * handed up to Python) and writes replies.  The fields' rules are at the top
 * of fuse_loop.c. */
#ifndef ZSWAPD_FUSE_SERVER_H
#define ZSWAPD_FUSE_SERVER_H

#include "module.h"

#include <linux/fuse.h>

#define MAX_IO (1u << 20)
/* The largest request: max_write of data after the WRITE headers, and a page
 * spare (read(2) of /dev/fuse wants at least max_write + 80 bytes). */
#define REQ_BUF (MAX_IO + 4096 + sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))
/* Threads per server: far past any CPU count we would serve with, and it
 * keeps the Server object fixed-size.  The [fuse] threads maximum
 * (config.MAX_FUSE_THREADS) is this number: engine.py checks at import. */
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
    PyObject *callback; /* a request handed up: FuseFS.handle, behind fuse/threads.py */
    PyObject *decide;   /* a write stopped: the store's policy, behind fuse/threads.py */
    int efd;
    int nthreads, nfds, nblocking;
    Thread threads[MAX_THREADS];
    int started;
    int stop;
    int serving;   /* C serves what admit() lets through: set by enable(), after INIT */
    int reader;    /* 1 while a thread holds the reader token */
    int busy;      /* threads between a read and its reply */
    int max_busy;  /* the most at once: do followers join when a queue forms? */
    int gone;      /* the connection is gone: every thread ends */
    uint32_t wake; /* the followers' futex word, bumped by each wake */
    int followers; /* threads asleep on it */
    uint32_t max_write;
    uint64_t dev_size;
    unsigned long long served_in_c, handed_up; /* requests, by the path they took */
    unsigned long long io_errors;
    unsigned long long errors; /* error replies written in C (ENOSPC, EIO) */
    int alive; /* threads still serving: 0 once the connection is gone */
};

/* fuse_ops.c */
/* 1 if the request was served in C (and answered), 0 to hand it up. */
int serve_in_c(Server *s, int fd, const uint8_t *in, size_t n, uint8_t *out);
/* Up to Python with the GIL, and its reply (EIO if it fails) back down. */
void hand_up(Server *s, int fd, const uint8_t *in, size_t n);

#endif
