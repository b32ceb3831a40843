/* What the FUSE threads do with a request: serve it in C, or hand it up.
 *
 * READ, WRITE and FALLOCATE(PUNCH_HOLE|KEEP_SIZE) of the device file are
 * served here, in C and without the GIL, when admit() says so; everything
 * else is handed up whole to the Python callback (FuseFS.handle behind
 * zswapd/fuse/threads.py), which answers every opcode.  For the requests
 * admit() lets through, both answer byte for byte alike: FuseFS._read,
 * _write and _fallocate are the protocol's rules, and this file is their
 * fast path (tests/test_fuse_paths.py sends the edge cases through both).
 * To serve another opcode in C: add its case to admit() and a serve_*
 * below, and its edge cases to that test.
 *
 * What C answers is what FuseFS would: the data, a short read or write at
 * the end (handed up), ENOSPC when the store's policy ends a write (asked
 * through `decide`, with the GIL, where the write stopped; the write goes on
 * from that page if the policy made room), EIO for an object that does not
 * decompress (counted in failed_reads by the page level; the daemon goes on).
 *
 * The wire format is the kernel's <linux/fuse.h>.  None of the engine's
 * locks is held across a call into Python; the page level (page.c) takes the entry bits.
 */
#include "fuse_server.h"

#include <errno.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

/* protocol.FILE_ID: the one device file (FUSE_ROOT_ID is its directory). */
#define FILE_NODE 2
#define PUNCH_MODE (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

enum { HAND_UP, SERVE_READ, SERVE_WRITE, SERVE_PUNCH };

/* The admission rule: which requests C answers itself.  Only after Python
 * has answered INIT (enable(), which also sets max_write and the device
 * size), only the device file, only a request whose length field is its
 * length, and only within the device:
 *   READ       size <= max_write, the whole range inside the device
 *              (a read across or at the end is a short read: FuseFS's);
 *   WRITE      the size field is the data's length, offset before the end,
 *              the whole range inside (at or across the end: FuseFS's
 *              ENOSPC or short write);
 *   FALLOCATE  PUNCH_HOLE|KEEP_SIZE of whole pages inside the device (an
 *              unaligned punch zeroes partial pages, other modes zero or
 *              refuse: FuseFS's).
 * Everything else goes up. */
static int admit(const Server *s, const struct fuse_in_header *h, size_t n)
{
    if (!__atomic_load_n(&s->serving, __ATOMIC_ACQUIRE) || h->nodeid != FILE_NODE || h->len != n ||
        !s->engine->e.arena)
        return HAND_UP;
    uint64_t size = s->dev_size;
    size_t body = n - sizeof *h;
    if (h->opcode == FUSE_READ && body >= sizeof(struct fuse_read_in)) {
        const struct fuse_read_in *r = (const void *)(h + 1);
        return r->size <= s->max_write && r->offset <= size && r->size <= size - r->offset ? SERVE_READ : HAND_UP;
    }
    if (h->opcode == FUSE_WRITE && body >= sizeof(struct fuse_write_in)) {
        const struct fuse_write_in *w = (const void *)(h + 1);
        return w->size == body - sizeof *w && w->offset < size && w->size <= size - w->offset ? SERVE_WRITE : HAND_UP;
    }
    if (h->opcode == FUSE_FALLOCATE && body >= sizeof(struct fuse_fallocate_in)) {
        const struct fuse_fallocate_in *f = (const void *)(h + 1);
        return f->mode == PUNCH_MODE && f->offset < size && f->length <= size - f->offset &&
                       !(f->offset % PAGE_SIZE) && !(f->length % PAGE_SIZE)
                   ? SERVE_PUNCH
                   : HAND_UP;
    }
    return HAND_UP;
}

static void write_reply(Server *s, int fd, const void *buf, size_t n)
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

/* The reply's header at the start of `out`, with `body` bytes after it. */
static void reply(Server *s, int fd, uint8_t *out, uint64_t unique, uint32_t body)
{
    struct fuse_out_header *oh = (void *)out;
    oh->len = (uint32_t)sizeof *oh + body;
    oh->error = 0;
    oh->unique = unique;
    write_reply(s, fd, out, oh->len);
}

/* An error reply: FuseFS's ENOSPC for DeviceFull, the session's EIO for a
 * failure. */
static void reply_error(Server *s, int fd, uint64_t unique, int error)
{
    struct fuse_out_header oh = {sizeof oh, -error, unique};
    __atomic_add_fetch(&s->errors, 1, __ATOMIC_RELAXED);
    write_reply(s, fd, &oh, sizeof oh);
}

static int serve_read(Server *s, int fd, const struct fuse_in_header *h, uint8_t *out)
{
    const struct fuse_read_in *r = (const void *)(h + 1);
    if (read_range(&s->engine->e, r->offset, out + sizeof(struct fuse_out_header), r->size) != ST_OK)
        reply_error(s, fd, h->unique, EIO); /* a corrupt object (counted), or no memory for a context */
    else
        reply(s, fd, out, h->unique, r->size);
    return 1;
}

/* The Policy of a write on a FUSE thread: the `decide` callback, with the
 * GIL.  It catches everything (fuse/threads.py); should it fail anyway, the
 * write ends (EIO). */
static int decide_by_callback(void *arg, int status, int retried)
{
    Server *s = arg;
    PyGILState_STATE g = PyGILState_Ensure();
    int go = call_policy(s->decide, status, retried);
    if (go < 0)
        PyErr_Clear();
    PyGILState_Release(g);
    return go;
}

static int serve_write(Server *s, int fd, const struct fuse_in_header *h, uint8_t *out)
{
    const struct fuse_write_in *w = (const void *)(h + 1);
    uint64_t done = 0;
    Policy policy = {decide_by_callback, s};
    int st = write_request(&s->engine->e, w->offset, (const uint8_t *)(w + 1), w->size, &policy, &done);
    if (st == ST_REFUSED || st == ST_NOROOM) {
        reply_error(s, fd, h->unique, ENOSPC); /* the store is full: the policy's word */
        return 1;
    }
    if (st != ST_OK) {
        reply_error(s, fd, h->unique, EIO);
        return 1;
    }
    struct fuse_write_out *wo = (void *)(out + sizeof(struct fuse_out_header));
    wo->size = w->size;
    wo->padding = 0;
    reply(s, fd, out, h->unique, sizeof *wo);
    return 1;
}

static int serve_punch(Server *s, int fd, const struct fuse_in_header *h, uint8_t *out)
{
    const struct fuse_fallocate_in *f = (const void *)(h + 1);
    Engine *e = &s->engine->e;
    discard_range(e, f->offset / PAGE_SIZE, (f->offset + f->length) / PAGE_SIZE);
    if (trim(e) < 0)
        __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
    reply(s, fd, out, h->unique, 0);
    return 1;
}

int serve_in_c(Server *s, int fd, const uint8_t *in, size_t n, uint8_t *out)
{
    const struct fuse_in_header *h = (const void *)in;
    switch (admit(s, h, n)) {
    case SERVE_READ:
        return serve_read(s, fd, h, out);
    case SERVE_WRITE:
        return serve_write(s, fd, h, out);
    case SERVE_PUNCH:
        return serve_punch(s, fd, h, out);
    default:
        return 0;
    }
}

void hand_up(Server *s, int fd, const uint8_t *in, size_t n)
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
        /* threads.py's callback catches everything; this is the last guard:
         * answer EIO rather than leave the request hanging. */
        PyErr_Clear();
        if (n >= sizeof(struct fuse_in_header))
            reply_error(s, fd, ((const struct fuse_in_header *)in)->unique, EIO);
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
}
