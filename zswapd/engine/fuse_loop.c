/* The FUSE threads (as libfuse's fuse_loop_mt.c: the thread pool only).
 *
 * N threads read /dev/fuse, each its own fd, and give each request to
 * fuse_ops.c: served in C without the GIL (READ, WRITE and punch-hole of the
 * device file, once Python has answered INIT: enable()), or handed up to
 * the Python callback (FuseFS.handle behind zswapd/fuse/threads.py).  The
 * callback runs with the GIL, but the GIL does not serialize callbacks (the
 * engine releases it inside a read): threads.py gives them turns and hands
 * back a copy of the reply, since FuseFS builds READ replies in one buffer
 * of its own.  Per-thread buffers are allocated at thread start: nothing is
 * allocated per request.  This file knows no opcode, and takes none of the
 * engine's locks (fuse_ops.c and the page level do): its own state is
 * atomics (the reader token, the futex word, the counters) and, in Python's
 * calls (stats, enable, stop), the GIL.
 *
 * The fds.  A reply must be written on the fd its request was read from (the
 * kernel keeps a request in flight on that fd's own processing list).  The
 * supervisor makes one FUSE_DEV_IOC_CLONE of the connection per thread and
 * keeps them, so a request a dead worker had read stays on a live list and
 * FUSE_NOTIFY_RESEND (which walks every clone) hands it to the next worker;
 * a clone made here would end those requests with EIO as the worker died
 * (docs/design.md, "Concurrency").  A clone is its own open file description, so its
 * O_NONBLOCK is its own: the connection's fd stays non-blocking for the
 * Python session while a clone can sleep in read(2).  Without clones the
 * threads share the connection's fd.
 *
 * One reader at a time.  Only one idle thread waits for the next request
 * (the reader token): it spins for SPIN_NS after its last reply, then sleeps
 * in the kernel.  The other idle threads sleep on a futex, so a request
 * wakes no thread but the one that takes it (when every idle thread waited
 * in the kernel, each request also woke a thread that found nothing: 4 KiB
 * random reads at queue depth 1 took p50 11.5 us with two threads against
 * 9.0 with one; now 9.3 with two or four, docs/benchmarks.md).  The reader drops
 * the token as it takes a request, and if more requests are already queued,
 * or the one it took goes up to Python (where the GIL may hold it), it wakes
 * one follower, which becomes the reader: threads join in as the queue
 * deepens and nobody else moves at queue depth 1.  A thread that has served
 * takes the token back if it is free, else sleeps as a follower.  Since only
 * the reader reads, it may set O_NONBLOCK on its fd to spin and clear it to
 * sleep, even on a clone it shares (the state is kept per fd): non-blocking
 * reads spin faster than poll(2) then read(2), which took a third longer per
 * request at queue depth 1.  Each empty turn of a spin ends in
 * sched_yield(): whatever the scheduler put on the spinner's CPU (the
 * program, the loop device's worker) runs at once, not after the spin (two
 * threads on two CPUs without it: 0.5% of 4 KiB reads took exactly SPIN_NS).
 * A thread does not spin while another is serving.  On the connection's own
 * fd (O_NONBLOCK, shared with the Python session) the reader sleeps in
 * poll(2) instead of a read.
 *
 * Stopping.  stop() sets stop and wakes the threads: every follower through
 * the futex, the reader through the eventfd if it is in poll(2), or through
 * WAKE_SIGNAL (a handler that does nothing, so read(2) returns EINTR) if it
 * is in a blocking read, sent again every STOP_RETRY_NS until each thread is
 * joined, because one may enter read(2) just after the signal.  Each thread
 * finishes the request it holds.  When the connection is gone (ENODEV), the
 * reader says so (gone) and wakes every follower, which then end too.
 */
#include "fuse_server.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"

/* 200 us: longer than the gap between a swap-in's reply and the next
 * request at queue depth 1 on this VM (tens of us), far shorter than a
 * scheduler tick, so an idle daemon stops burning a CPU at once. */
#define SPIN_NS 200000L
/* A real-time signal: CPython installs no handler for one, and a process
 * sending it to us by mistake finds it does nothing. */
#define WAKE_SIGNAL (SIGRTMIN + 3)
/* How often stop() re-sends WAKE_SIGNAL to a thread not yet joined. */
#define STOP_RETRY_NS 2000000L

static int stopping(Server *s) { return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE); }

static long ns_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000000000L + (now.tv_nsec - t->tv_nsec);
}

static int take_reader(Server *s)
{
    int free_ = 0;
    return __atomic_compare_exchange_n(&s->reader, &free_, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void drop_reader(Server *s) { __atomic_store_n(&s->reader, 0, __ATOMIC_SEQ_CST); }

static int ending(Server *s) { return stopping(s) || __atomic_load_n(&s->gone, __ATOMIC_ACQUIRE); }

static long futex(uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

/* Wake ``n`` followers (INT_MAX: all); no system call when none sleeps. */
static void wake_followers(Server *s, int n)
{
    __atomic_add_fetch(&s->wake, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->followers, __ATOMIC_SEQ_CST))
        futex(&s->wake, FUTEX_WAKE_PRIVATE, (uint32_t)n);
}

/* Sleep until woken, unless the reader token is free (then the caller takes
 * it).  The token is checked after the futex word is read, and a waker
 * drops the token before it bumps the word, so no wake is lost. */
static void follow(Server *s)
{
    uint32_t seen = __atomic_load_n(&s->wake, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&s->reader, __ATOMIC_SEQ_CST) || ending(s))
        return;
    __atomic_add_fetch(&s->followers, 1, __ATOMIC_SEQ_CST);
    futex(&s->wake, FUTEX_WAIT_PRIVATE, seen);
    __atomic_sub_fetch(&s->followers, 1, __ATOMIC_SEQ_CST);
}

/* Requests queued beyond the one just taken. */
static int more_queued(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* Spin on only while this thread served within SPIN_NS and no other thread
 * is serving: a request that comes while one is served wakes a sleeper
 * anyway, and the spin would only take a CPU from the program or the loop
 * device's worker. */
static int may_spin(Server *s, const struct timespec *last)
{
    return ns_since(last) < SPIN_NS && !__atomic_load_n(&s->busy, __ATOMIC_RELAXED);
}

/* O_NONBLOCK belongs to the open file description, which threads sharing
 * an fd share, and so does *t->nonblock, its cached value.  The reader
 * token orders the readers' changes, but a thread leaving (server_thread's
 * end) changes it outside the token: relaxed atomics.  A value that lags
 * costs at most a read that returns EAGAIN, which the loop retries. */
static void set_nonblock(Thread *t, int on)
{
    if (__atomic_load_n(t->nonblock, __ATOMIC_RELAXED) != on &&
        fcntl(t->fd, F_SETFL, t->flags | (on ? O_NONBLOCK : 0)) == 0)
        __atomic_store_n(t->nonblock, on, __ATOMIC_RELAXED);
}

/* The reader's wait for the next request: spin with non-blocking reads
 * while may_spin, then sleep (a blocking read on a clone, poll(2) on the
 * connection's O_NONBLOCK fd).  A request, or -1 with errno. */
static ssize_t next_request(Thread *t, uint8_t *in, const struct timespec *last)
{
    Server *s = t->s;
    for (;;) {
        if (ending(s)) {
            errno = EINTR;
            return -1;
        }
        if (may_spin(s, last)) {
            if (t->blocking)
                set_nonblock(t, 1);
            ssize_t n = read(t->fd, in, REQ_BUF);
            if (n >= 0 || errno != EAGAIN)
                return n;
            sched_yield();
            continue;
        }
        if (t->blocking) {
            set_nonblock(t, 0);
            return read(t->fd, in, REQ_BUF);
        }
        ssize_t n = read(t->fd, in, REQ_BUF);
        if (n >= 0 || errno != EAGAIN)
            return n;
        struct pollfd p[2] = {{.fd = t->fd, .events = POLLIN}, {.fd = s->efd, .events = POLLIN}};
        poll(p, 2, -1);
    }
}

static void wake_handler(int sig) { (void)sig; }

/* Process-directed signals go to the interpreter's threads, where CPython's
 * handlers want them; a FUSE thread takes only WAKE_SIGNAL (and the
 * synchronous ones, which cannot be blocked). */
static void server_sigmask(void)
{
    sigset_t m;
    sigfillset(&m);
    int keep[] = {WAKE_SIGNAL, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS};
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++)
        sigdelset(&m, keep[i]);
    pthread_sigmask(SIG_SETMASK, &m, NULL);
}

static void *server_thread(void *arg)
{
    Thread *t = arg;
    Server *s = t->s;
    server_sigmask();
    uint8_t *in = malloc(REQ_BUF), *out = malloc(sizeof(struct fuse_out_header) + MAX_IO);
    /* Touched now, so that read() and write() of /dev/fuse never fault on
     * them (and under mlockall they stay resident).  The kernel copies a
     * request into `in` and a reply out of `out` with the request taken
     * off its lists; a fault there is killable, and a worker SIGKILLed in
     * it fails the copy, which ends that request with EIO instead of
     * leaving it for the next worker's RESEND (fs/fuse/dev.c). */
    if (in)
        memset(in, 0, REQ_BUF);
    if (out)
        memset(out, 0, sizeof(struct fuse_out_header) + MAX_IO);
    ctx_get(&s->engine->e); /* this thread's codec context, before the first request */
    struct timespec last = {0, 0};
    while (in && out && !ending(s)) {
        if (!take_reader(s)) {
            follow(s);
            continue;
        }
        ssize_t n = next_request(t, in, &last);
        int err = errno;
        if (n >= 0) { /* serving: the next reader does not spin beside it */
            int b = __atomic_add_fetch(&s->busy, 1, __ATOMIC_RELAXED);
            int m = __atomic_load_n(&s->max_busy, __ATOMIC_RELAXED);
            while (b > m && !__atomic_compare_exchange_n(&s->max_busy, &m, b, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            }
        }
        drop_reader(s);
        if (n < 0) {
            if (err == EAGAIN || err == EINTR || err == ENOENT)
                continue;
            if (err == ENODEV) { /* unmounted: the connection is gone */
                __atomic_store_n(&s->gone, 1, __ATOMIC_RELEASE);
                break;
            }
            __atomic_add_fetch(&s->io_errors, 1, __ATOMIC_RELAXED);
            struct pollfd p = {.fd = s->efd, .events = POLLIN};
            poll(&p, 1, 10); /* as session.py: never end on a read error */
            continue;
        }
        /* Another reader while this one serves, when more requests wait:
         * at queue depth 1 everyone else stays asleep.  With no follower
         * asleep (one thread, or the others busy) there is nobody to wake,
         * and no poll(2) per request to pay. */
        int woke = __atomic_load_n(&s->followers, __ATOMIC_SEQ_CST) && more_queued(t->fd);
        if (woke)
            wake_followers(s, 1);
        if ((size_t)n >= sizeof(struct fuse_in_header) && serve_in_c(s, t->fd, in, (size_t)n, out)) {
            __atomic_add_fetch(&s->served_in_c, 1, __ATOMIC_RELAXED);
        } else {
            if (!woke)
                wake_followers(s, 1); /* Python's turn: the GIL may keep it */
            __atomic_add_fetch(&s->handed_up, 1, __ATOMIC_RELAXED);
            hand_up(s, t->fd, in, (size_t)n);
        }
        __atomic_sub_fetch(&s->busy, 1, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_MONOTONIC, &last);
    }
    wake_followers(s, INT_MAX); /* they end too, or one becomes the reader */
    if (t->blocking && t->nonblock == &t->nb)
        set_nonblock(t, 0); /* as the next server expects a clone */
    free(in);
    free(out);
    __atomic_sub_fetch(&s->alive, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void Server_join(Server *s)
{
    if (!s->started)
        return;
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    wake_followers(s, INT_MAX);
    uint64_t one = 1;
    if (write(s->efd, &one, sizeof one) < 0) {
        /* eventfd cannot fail here short of a bug; the threads still stop
         * at their next request */
    }
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < s->nthreads; i++) {
        Thread *t = &s->threads[i];
        for (;;) {
            if (t->blocking)
                pthread_kill(t->tid, WAKE_SIGNAL);
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += STOP_RETRY_NS;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            if (pthread_timedjoin_np(t->tid, NULL, &until) == 0)
                break;
        }
    }
    Py_END_ALLOW_THREADS
    s->started = 0;
}

static void Server_dealloc(Server *s)
{
    Server_join(s);
    if (s->efd >= 0)
        close(s->efd);
    Py_XDECREF(s->engine);
    Py_XDECREF(s->callback);
    Py_XDECREF(s->decide);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Server_stop(Server *s, PyObject *Py_UNUSED(a))
{
    Server_join(s);
    Py_RETURN_NONE;
}

static PyObject *Server_enable(Server *s, PyObject *args)
{
    unsigned int max_write;
    unsigned long long dev_size;
    if (!PyArg_ParseTuple(args, "IK", &max_write, &dev_size))
        return NULL;
    if (max_write > MAX_IO || dev_size > s->engine->e.npages * PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "max_write %u > %u or device size %llu beyond the engine's", max_write,
                     MAX_IO, dev_size);
        return NULL;
    }
    s->max_write = max_write;
    s->dev_size = dev_size;
    __atomic_store_n(&s->serving, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Server_stats(Server *s, PyObject *Py_UNUSED(a))
{
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:i,s:i,s:i,s:i,s:i,s:i}", "served_in_c",
        __atomic_load_n(&s->served_in_c, __ATOMIC_RELAXED), "handed_up",
        __atomic_load_n(&s->handed_up, __ATOMIC_RELAXED), "io_errors", __atomic_load_n(&s->io_errors, __ATOMIC_RELAXED),
        "errors", __atomic_load_n(&s->errors, __ATOMIC_RELAXED), "threads", s->nthreads, "fds", s->nfds, "clones",
        s->nblocking, "max_busy", __atomic_load_n(&s->max_busy, __ATOMIC_RELAXED), "serving",
        __atomic_load_n(&s->serving, __ATOMIC_ACQUIRE), "alive",
        __atomic_load_n(&s->alive, __ATOMIC_ACQUIRE));
}

static PyMethodDef Server_methods[] = {
    {"stop", (PyCFunction)Server_stop, METH_NOARGS, "stop and join the threads"},
    {"enable", (PyCFunction)Server_enable, METH_VARARGS, "enable(max_write, device_size): serve READ, WRITE and punches in C"},
    {"stats", (PyCFunction)Server_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zswapd._engine.Server",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "native FUSE threads over one engine",
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
};

/* WAKE_SIGNAL's handler, installed once; refused if something else owns it. */
static int install_wake_handler(void)
{
    struct sigaction old, sa;
    if (sigaction(WAKE_SIGNAL, NULL, &old) != 0)
        return -1;
    if (old.sa_handler == wake_handler)
        return 0;
    if (old.sa_handler != SIG_DFL || (old.sa_flags & SA_SIGINFO)) {
        errno = EBUSY;
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wake_handler; /* no SA_RESTART: read(2) must return EINTR */
    sigemptyset(&sa.sa_mask);
    return sigaction(WAKE_SIGNAL, &sa, NULL);
}

/* serve_fuse(engine, fds, hand_up, decide) -> Server: one thread per entry
 * of fds (an fd may repeat), running.  hand_up(request) -> reply | None
 * answers what C does not serve; decide(status, retried) -> bool is the
 * store's policy where a write stops. */
PyObject *serve_fuse(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *eng, *fdseq, *cb, *decide;
    if (!PyArg_ParseTuple(args, "O!OOO", &EngineType, &eng, &fdseq, &cb, &decide))
        return NULL;
    PyObject *fds = PySequence_Fast(fdseq, "fds must be a sequence of file descriptors");
    if (!fds)
        return NULL;
    Py_ssize_t nthreads = PySequence_Fast_GET_SIZE(fds);
    if (!PyCallable_Check(cb) || !PyCallable_Check(decide) || nthreads < 1 || nthreads > MAX_THREADS) {
        Py_DECREF(fds);
        PyErr_Format(PyExc_ValueError, "need two callables and 1..%d fds (one per thread)", MAX_THREADS);
        return NULL;
    }
    Server *s = PyObject_New(Server, &ServerType);
    if (!s) {
        Py_DECREF(fds);
        return NULL;
    }
    s->engine = (EngineObject *)eng;
    Py_INCREF(eng);
    s->callback = cb;
    Py_INCREF(cb);
    s->decide = decide;
    Py_INCREF(decide);
    s->nthreads = s->nfds = s->nblocking = 0;
    s->started = 0;
    s->stop = 0;
    s->serving = 0;
    s->reader = 0;
    s->busy = 0;
    s->max_busy = 0;
    s->gone = 0;
    s->wake = 0;
    s->followers = 0;
    s->max_write = 0;
    s->dev_size = 0;
    s->served_in_c = s->handed_up = s->io_errors = s->errors = 0;
    s->alive = 0;
    s->efd = -1;
    for (Py_ssize_t i = 0; i < nthreads; i++) {
        int fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        int fl = fd < 0 ? -1 : fcntl(fd, F_GETFL);
        if (PyErr_Occurred() || fl < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "fds[%zd] is not an open file descriptor", i);
            goto fail;
        }
        Thread *t = &s->threads[i];
        *t = (Thread){.s = s, .fd = fd, .blocking = !(fl & O_NONBLOCK), .flags = fl & ~O_NONBLOCK};
        t->nonblock = &t->nb;
        for (Py_ssize_t j = 0; j < i && t->nonblock == &t->nb; j++)
            if (s->threads[j].fd == fd)
                t->nonblock = s->threads[j].nonblock;
        if (t->nonblock == &t->nb) {
            s->nfds++;
            s->nblocking += s->threads[i].blocking;
        }
    }
    if (s->nblocking && install_wake_handler() != 0) {
        PyErr_Format(PyExc_OSError, "cannot install the FUSE threads' wake-up handler for signal %d: %s",
                     WAKE_SIGNAL, strerror(errno));
        goto fail;
    }
    s->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    Py_DECREF(fds);
    s->started = 1;
    for (Py_ssize_t i = 0; i < nthreads; i++) {
        __atomic_add_fetch(&s->alive, 1, __ATOMIC_RELEASE);
        if (pthread_create(&s->threads[i].tid, NULL, server_thread, &s->threads[i]) != 0) {
            __atomic_sub_fetch(&s->alive, 1, __ATOMIC_RELEASE);
            Server_join(s);
            Py_DECREF(s);
            PyErr_SetString(PyExc_OSError, "pthread_create failed");
            return NULL;
        }
        s->nthreads++;
    }
    return (PyObject *)s;
fail:
    Py_DECREF(fds);
    Py_DECREF(s);
    return NULL;
}

int fuse_threads_ready(PyObject *Py_UNUSED(module)) { return PyType_Ready(&ServerType); }
