/* What the FUSE threads do with a request: READ, WRITE and
 * FALLOCATE(PUNCH_HOLE|KEEP_SIZE) of the device file are served here, in C
 * and without the GIL, once Python has answered INIT (enable()); everything
 * else, and any such request that meets something the store's policy must
 * decide, goes up whole to the Python callback (FuseFS.handle behind
 * zswapd/fuse/native.py), which stays the single place for the protocol's
 * rules.  Nothing here holds an engine lock across a call into Python.
 */
#include "fuse_server.h"

#include <errno.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

void write_reply(Server *s, int fd, const void *buf, size_t n)
{
    for (;;) {
        ssize_t w = write(fd, buf, n);
        if (w >= 0 || errno == ENOENT || errno == ENODEV)
            return; /* ENOENT: the request was interrupted away */
        if (errno != EINTR && errno != EAGAIN) {
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

/* 1 if served here, 0 to hand up to Python. */
int serve_hot(Server *s, int fd, const uint8_t *in, size_t n, uint8_t *out)
{
    const struct in_header *h = (const void *)in;
    Engine *e = &s->engine->e;
    struct out_header *oh = (void *)out;
    uint64_t size = s->dev_size;
    if (!__atomic_load_n(&s->hot, __ATOMIC_ACQUIRE) || h->nodeid != FILE_NODE || h->len != n || !e->arena)
        return 0;
    oh->error = 0;
    oh->unique = h->unique;
    if (h->opcode == FUSE_READ && n >= IN_HDR + IO_IN) {
        uint64_t off;
        uint32_t len;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 4);
        if (len > s->max_write || off > size || len > size - off)
            return 0;
        int st = read_range(e, off, out + OUT_HDR, len);
        if (st == ST_OK)
            ADD(e->num_reads, 1);
        else if (st == ST_CORRUPT)
            SUB(e->failed_reads, 1); /* Python reads it again and counts it */
        if (st != ST_OK)
            return 0;
        oh->len = OUT_HDR + len;
        write_reply(s, fd, out, OUT_HDR + len);
        return 1;
    }
    if (h->opcode == FUSE_WRITE && n >= IN_HDR + IO_IN) {
        uint64_t off;
        uint32_t len;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 4);
        if (len != n - IN_HDR - IO_IN || off > size || len > size - off)
            return 0;
        uint64_t done = 0;
        int st = write_range(e, off, in + IN_HDR + IO_IN, len, __atomic_load_n(&e->full, __ATOMIC_RELAXED), &done);
        if (st == ST_OK)
            ADD(e->num_writes, 1);
        if (st != ST_OK)
            return 0; /* the policy's call: Python writes it (again) whole */
        oh->len = OUT_HDR + 8;
        memcpy(out + OUT_HDR, &len, 4);
        memset(out + OUT_HDR + 4, 0, 4);
        write_reply(s, fd, out, OUT_HDR + 8);
        return 1;
    }
    if (h->opcode == FUSE_FALLOCATE && n >= IN_HDR + FALLOC_IN) {
        uint64_t off, len;
        uint32_t mode;
        memcpy(&off, in + IN_HDR + 8, 8);
        memcpy(&len, in + IN_HDR + 16, 8);
        memcpy(&mode, in + IN_HDR + 24, 4);
        if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) || off >= size || len > size - off ||
            off % PAGE_SIZE || len % PAGE_SIZE)
            return 0;
        discard_range(e, off / PAGE_SIZE, (off + len) / PAGE_SIZE);
        long t = trim(e);
        if (t < 0)
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
        oh->len = OUT_HDR;
        write_reply(s, fd, out, OUT_HDR);
        return 1;
    }
    return 0;
}

void serve_cold(Server *s, int fd, const uint8_t *in, size_t n)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *req = PyBytes_FromStringAndSize((const char *)in, (Py_ssize_t)n);
    PyObject *r = req ? PyObject_CallOneArg(s->callback, req) : NULL;
    Py_XDECREF(req);
    if (r && r != Py_None) {
        Py_buffer b;
        if (PyObject_GetBuffer(r, &b, PyBUF_SIMPLE) == 0) {
            write_reply(s, fd, b.buf, (size_t)b.len);
            PyBuffer_Release(&b);
        }
    }
    if (!r || PyErr_Occurred()) {
        /* native.py's callback catches everything; this is the last guard:
         * answer EIO rather than leave the request hanging. */
        PyErr_Clear();
        const struct in_header *h = (const void *)in;
        if (n >= IN_HDR) {
            struct out_header oh = {OUT_HDR, -EIO, h->unique};
            write_reply(s, fd, &oh, sizeof oh);
        }
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
}
