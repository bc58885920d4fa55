/*
 * The NBD server (nbd_api.h): one listening unix socket per export, one accept thread, and per
 * client XB_NBD_WORKERS threads in nbdkit's "parallel" model: a worker takes the receive lock,
 * reads one request (and a WRITE's payload), lets go, runs it on the image, and sends the reply
 * under the send lock. Replies may overtake each other, as NBD allows. No Python, no GIL.
 *
 * A client is hostile: the handshake and every request are checked (nbd_parse.c) before anything
 * reaches the image; a stream we can no longer follow (bad magic, a write larger than we accept)
 * closes that connection only. Payload memory per connection is bounded by XB_NBD_CONN_BUDGET: a
 * request that would pass it waits, holding the receive lock, so that client stops being read.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "nbd_api.h"
#include "nbd_proto.h"

#define XB_NBD_CONN_BUDGET (32u << 20) /* payload bytes one connection may hold (>= the largest request) */
#define XB_NBD_KEEP_BUF (256u << 10)   /* a worker keeps a buffer up to this size between requests */
#define XB_NBD_STACK (1u << 20) /* storage ops run on it, as on the data plane's slow-path workers (XB_SLOW_STACK) */
#define XB_NBD_ALIGN 4096u

struct conn {
    struct xb_nbd_export *e;
    int fd;
    uint64_t size; /* told the client at the handshake */
    struct xb_nbd_limits lim;
    pthread_mutex_t rx, tx, mu;
    pthread_cond_t cv;
    uint64_t mem; /* payload bytes held by its workers (mu) */
    atomic_int closing;
    pthread_t main;
    struct conn *next;
};

struct xb_nbd_export {
    struct xb_image *img;
    int readonly;
    unsigned max_clients;
    int lfd;
    atomic_int stopping;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    dev_t sdev;
    ino_t sino;
    pthread_t acceptor;
    int accepting;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct conn *live, *done; /* done: its threads ended, to be joined and freed */
    _Atomic uint64_t st[sizeof(struct xb_nbd_stats) / sizeof(uint64_t)];
};

#define ST(e, field) (e)->st[offsetof(struct xb_nbd_stats, field) / sizeof(uint64_t)]
#define ADD(e, field, n) atomic_fetch_add_explicit(&ST(e, field), (n), memory_order_relaxed)

/* -- bytes on the socket */

static int recv_full(int fd, void *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = recv(fd, (char *)buf + done, n - done, MSG_WAITALL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static int send_iov(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        while (n > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

static int send_all(int fd, const void *buf, size_t n)
{
    struct iovec iov = {(void *)buf, n};
    return send_iov(fd, &iov, 1);
}

/* -- the handshake (fixed newstyle) */

static int opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
    uint8_t h[20];
    xb_put64(h, NBD_REP_MAGIC);
    xb_put32(h + 8, opt);
    xb_put32(h + 12, type);
    xb_put32(h + 16, len);
    struct iovec iov[2] = {{h, sizeof(h)}, {(void *)data, len}};
    return send_iov(fd, iov, len ? 2 : 1);
}

static int opt_error(int fd, uint32_t opt, uint32_t type, const char *msg)
{
    return opt_reply(fd, opt, type, msg, (uint32_t)strlen(msg));
}

static uint16_t transmission_flags(const struct xb_nbd_export *e)
{
    const struct xb_image *img = e->img;
    int ro = e->readonly || (img->caps & XB_CAP_READONLY);
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN; /* one image: a flush covers every connection */
    if (ro)
        return f | NBD_FLAG_READ_ONLY;
    f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    if (img->caps & XB_CAP_DISCARD)
        f |= NBD_FLAG_SEND_TRIM;
    if (img->caps & XB_CAP_WRITE_ZEROES)
        f |= NBD_FLAG_SEND_WRITE_ZEROES;
    return f;
}

static int send_info(struct conn *c, uint32_t opt, int want_name)
{
    uint8_t ex[12], bs[14], nm[2];
    xb_put16(ex, NBD_INFO_EXPORT);
    xb_put64(ex + 2, c->size);
    xb_put16(ex + 10, c->lim.tflags);
    const struct xb_image *img = c->e->img;
    uint32_t pref = img->physical_block > XB_NBD_ALIGN ? img->physical_block : XB_NBD_ALIGN;
    xb_put16(bs, NBD_INFO_BLOCK_SIZE);
    xb_put32(bs + 2, c->lim.min_block);
    xb_put32(bs + 6, pref);
    xb_put32(bs + 10, c->lim.max_payload);
    xb_put16(nm, NBD_INFO_NAME);
    if (opt_reply(c->fd, opt, NBD_REP_INFO, ex, sizeof(ex)) || opt_reply(c->fd, opt, NBD_REP_INFO, bs, sizeof(bs)))
        return -1;
    if (want_name && opt_reply(c->fd, opt, NBD_REP_INFO, nm, sizeof(nm)))
        return -1;
    return opt_reply(c->fd, opt, NBD_REP_ACK, NULL, 0);
}

/* 1: go on to transmission; 0: close (the client aborted or broke the protocol: counted). */
static int handshake(struct conn *c)
{
    struct xb_nbd_export *e = c->e;
    int fd = c->fd;
    uint8_t g[18];
    xb_put64(g, NBD_MAGIC);
    xb_put64(g + 8, NBD_IHAVEOPT);
    xb_put16(g + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    uint8_t cf[4];
    if (send_all(fd, g, sizeof(g)) || recv_full(fd, cf, sizeof(cf)))
        return 0;
    uint32_t cflags = xb_be32(cf);
    if (!(cflags & NBD_FLAG_C_FIXED_NEWSTYLE) || (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)))
        goto bad; /* unknown client flags: the spec says disconnect */
    int no_zeroes = !!(cflags & NBD_FLAG_C_NO_ZEROES);
    uint8_t *d = malloc(XB_NBD_OPT_MAX);
    if (!d)
        return 0;
    int ret = 0;
    for (;;) {
        uint8_t h[XB_NBD_OPT_HDR_LEN];
        if (recv_full(fd, h, sizeof(h)))
            break;
        uint32_t opt = xb_be32(h + 8), len = xb_be32(h + 12);
        if (xb_be64(h) != NBD_IHAVEOPT) {
            ADD(e, protocol_errors, 1);
            break;
        }
        if (len > XB_NBD_OPT_MAX) {
            opt_error(fd, opt, NBD_REP_ERR_TOO_BIG, "option data too large");
            ADD(e, protocol_errors, 1);
            break;
        }
        if (recv_full(fd, d, len))
            break;
        c->size = __atomic_load_n(&e->img->size, __ATOMIC_ACQUIRE);
        if (opt == NBD_OPT_EXPORT_NAME) {
            if (len) { /* no way to say "unknown" to this option but closing */
                ADD(e, protocol_errors, 1);
                break;
            }
            uint8_t r[10 + 124] = {0};
            xb_put64(r, c->size);
            xb_put16(r + 8, c->lim.tflags);
            ret = !send_all(fd, r, no_zeroes ? 10 : sizeof(r));
            break;
        }
        int rc;
        struct xb_nbd_go go;
        switch (opt) {
        case NBD_OPT_ABORT:
            opt_reply(fd, opt, NBD_REP_ACK, NULL, 0);
            goto out;
        case NBD_OPT_LIST: {
            uint8_t srv[4] = {0}; /* one export, the empty name */
            rc = len ? opt_error(fd, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                     : opt_reply(fd, opt, NBD_REP_SERVER, srv, sizeof(srv)) || opt_reply(fd, opt, NBD_REP_ACK, NULL, 0);
            break;
        }
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
            if (xb_nbd_parse_go(d, len, &go)) {
                rc = opt_error(fd, opt, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            } else if (go.namelen) {
                rc = opt_error(fd, opt, NBD_REP_ERR_UNKNOWN, "unknown export: this socket serves one, the empty name");
            } else {
                if (send_info(c, opt, go.want_name))
                    goto out;
                if (opt == NBD_OPT_GO) {
                    ret = 1;
                    goto out;
                }
                rc = 0;
            }
            break;
        default:
            rc = opt_error(fd, opt, NBD_REP_ERR_UNSUP, "option not supported");
        }
        if (rc)
            break;
    }
out:
    free(d);
    return ret;
bad:
    ADD(e, protocol_errors, 1);
    return 0;
}

/* -- transmission */

struct worker {
    struct conn *c;
    void *keep; /* reused payload buffer */
    size_t keep_len;
};

static uint32_t nbd_errno(int neg)
{
    switch (-neg) {
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case ENOSPC:
    case EDQUOT:
        return NBD_ENOSPC;
    case EINVAL:
        return NBD_EINVAL;
    case ENOMEM:
        return NBD_ENOMEM;
    case EOPNOTSUPP:
        return NBD_ENOTSUP;
    default:
        return NBD_EIO;
    }
}

static void *get_buf(struct worker *w, size_t n)
{
    if (n <= w->keep_len)
        return w->keep;
    void *b;
    size_t want = n <= XB_NBD_KEEP_BUF ? (n + 65535) & ~(size_t)65535 : n;
    if (posix_memalign(&b, XB_NBD_ALIGN, want))
        return NULL;
    if (want <= XB_NBD_KEEP_BUF) {
        free(w->keep);
        w->keep = b;
        w->keep_len = want;
    }
    return b;
}

static void put_buf(struct worker *w, void *b)
{
    if (b != w->keep)
        free(b);
}

static void mem_take(struct conn *c, uint64_t n)
{
    pthread_mutex_lock(&c->mu);
    while (c->mem && c->mem + n > XB_NBD_CONN_BUDGET)
        pthread_cond_wait(&c->cv, &c->mu);
    c->mem += n;
    pthread_mutex_unlock(&c->mu);
}

static void mem_give(struct conn *c, uint64_t n)
{
    pthread_mutex_lock(&c->mu);
    c->mem -= n;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Ends the connection for every worker: readers and writers blocked on the socket return. */
static void hang_up(struct conn *c)
{
    atomic_store(&c->closing, 1);
    shutdown(c->fd, SHUT_RDWR);
}

static int reply(struct conn *c, uint64_t cookie, uint32_t err, void *data, uint32_t len)
{
    uint8_t h[16];
    xb_put32(h, NBD_SIMPLE_REPLY_MAGIC);
    xb_put32(h + 4, err);
    xb_put64(h + 8, cookie);
    struct iovec iov[2] = {{h, sizeof(h)}, {data, len}};
    pthread_mutex_lock(&c->tx);
    int rc = send_iov(c->fd, iov, err || !len ? 1 : 2);
    pthread_mutex_unlock(&c->tx);
    if (rc)
        hang_up(c);
    return rc;
}

static int run(struct xb_image *img, const struct xb_nbd_req *r, void *buf)
{
    struct iovec iov = {buf, r->len};
    ssize_t n;
    int rc = 0;
    switch (r->type) {
    case NBD_CMD_READ:
        n = img->ops->preadv(img, &iov, 1, r->off);
        return n < 0 ? (int)n : (size_t)n != r->len ? -EIO : 0;
    case NBD_CMD_WRITE:
        n = img->ops->pwritev(img, &iov, 1, r->off);
        rc = n < 0 ? (int)n : (size_t)n != r->len ? -EIO : 0;
        break;
    case NBD_CMD_FLUSH:
        return img->ops->flush(img);
    case NBD_CMD_TRIM:
        rc = img->ops->discard(img, r->off, r->len, 0);
        break;
    case NBD_CMD_WRITE_ZEROES:
        rc = img->ops->write_zeroes(img, r->off, r->len);
        break;
    }
    if (rc == 0 && (r->flags & NBD_CMD_FLAG_FUA))
        rc = img->ops->flush(img); /* the image has no narrower flush: make everything durable */
    return rc;
}

/* One request: read (under rx), run, answer. 0 to go on, -1 when this worker is done. */
static int one_request(struct worker *w)
{
    struct conn *c = w->c;
    struct xb_nbd_export *e = c->e;
    uint8_t h[XB_NBD_REQ_LEN];
    pthread_mutex_lock(&c->rx);
    /* closing (a DISC, the client's end of stream): the other workers' replies still go out */
    if (atomic_load(&c->closing) || recv_full(c->fd, h, sizeof(h))) {
        atomic_store(&c->closing, 1);
        pthread_mutex_unlock(&c->rx);
        return -1;
    }
    struct xb_nbd_limits lim = c->lim;
    uint64_t now = __atomic_load_n(&e->img->size, __ATOMIC_ACQUIRE); /* shrunk by a resize: refuse past it */
    if (now < lim.size)
        lim.size = now;
    struct xb_nbd_req r;
    uint32_t err, skip;
    enum xb_nbd_verdict v = xb_nbd_check_request(h, &lim, &r, &err, &skip);
    if (v == XB_NBD_DROP || v == XB_NBD_FATAL) {
        ADD(e, protocol_errors, 1);
        atomic_store(&c->closing, 1);
        pthread_mutex_unlock(&c->rx);
        if (v == XB_NBD_FATAL)
            reply(c, r.cookie, err, NULL, 0);
        hang_up(c);
        return -1;
    }
    if (v == XB_NBD_SERVE && r.type == NBD_CMD_DISC) {
        /* no more requests; those in flight on the other workers are still answered */
        atomic_store(&c->closing, 1);
        shutdown(c->fd, SHUT_RD);
        pthread_mutex_unlock(&c->rx);
        return -1;
    }
    uint32_t payload = v == XB_NBD_SERVE && (r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE) ? r.len : 0;
    void *buf = NULL;
    if (payload) {
        mem_take(c, payload);
        buf = get_buf(w, payload);
        if (!buf) {
            mem_give(c, payload);
            v = XB_NBD_REFUSE;
            err = NBD_ENOMEM;
            skip = r.type == NBD_CMD_WRITE ? r.len : 0;
            payload = 0;
        }
    }
    int lost = 0;
    if (v == XB_NBD_SERVE && r.type == NBD_CMD_WRITE) {
        lost = recv_full(c->fd, buf, r.len);
    } else if (v == XB_NBD_REFUSE && skip) {
        /* a refused write's payload is read and dropped, so the next request is found */
        uint8_t *scratch = get_buf(w, 65536);
        while (!lost && skip && scratch) {
            uint32_t n = skip < 65536 ? skip : 65536;
            lost = recv_full(c->fd, scratch, n);
            skip -= n;
        }
        lost |= !scratch;
    }
    pthread_mutex_unlock(&c->rx);
    if (lost) { /* the client went away mid-payload: nothing of it reached the image */
        if (payload) {
            put_buf(w, buf);
            mem_give(c, payload);
        }
        hang_up(c);
        return -1;
    }
    if (v == XB_NBD_SERVE) {
        int rc = run(e->img, &r, buf);
        if (rc < 0)
            err = nbd_errno(rc);
        else if (r.type == NBD_CMD_READ)
            ADD(e, read_bytes, r.len);
        else if (r.type == NBD_CMD_WRITE)
            ADD(e, written_bytes, r.len);
    }
    ADD(e, requests, 1);
    if (err)
        ADD(e, errors, 1);
    int rc = reply(c, r.cookie, err, buf, r.type == NBD_CMD_READ ? r.len : 0);
    if (payload) {
        put_buf(w, buf);
        mem_give(c, payload);
    }
    return rc ? -1 : 0;
}

static void *worker_main(void *arg)
{
    struct worker w = {.c = arg};
    while (one_request(&w) == 0) {
    }
    free(w.keep);
    return NULL;
}

static void conn_init(struct conn *c, struct xb_nbd_export *e, int fd)
{
    memset(c, 0, sizeof(*c));
    c->e = e;
    c->fd = fd;
    pthread_mutex_init(&c->rx, NULL);
    pthread_mutex_init(&c->tx, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    const struct xb_image *img = e->img;
    c->lim.min_block = img->direct ? img->logical_block : 1; /* O_DIRECT: aligned offsets and lengths only */
    c->lim.max_payload = XB_NBD_MAX_PAYLOAD;
    c->lim.tflags = transmission_flags(e);
}

static void conn_destroy(struct conn *c)
{
    pthread_mutex_destroy(&c->rx);
    pthread_mutex_destroy(&c->tx);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
}

static void serve(struct conn *c, unsigned workers)
{
    if (!handshake(c))
        return;
    c->lim.size = c->size;
    ADD(c->e, connections, 1);
    pthread_t th[XB_NBD_WORKERS];
    unsigned n = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, XB_NBD_STACK);
    while (n + 1 < workers && n + 1 < XB_NBD_WORKERS && pthread_create(&th[n], &attr, worker_main, c) == 0)
        n++;
    pthread_attr_destroy(&attr);
    worker_main(c);
    for (unsigned i = 0; i < n; i++)
        pthread_join(th[i], NULL);
}

void xb_nbd_serve_fd(struct xb_nbd_export *e, int fd, unsigned workers)
{
    struct conn c;
    conn_init(&c, e, fd);
    serve(&c, workers);
    conn_destroy(&c);
    close(fd);
}

/* -- the listener */

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    struct xb_nbd_export *e = c->e;
    serve(c, XB_NBD_WORKERS);
    shutdown(c->fd, SHUT_RDWR); /* the fd is closed by whoever joins this thread */
    pthread_mutex_lock(&e->mu);
    for (struct conn **p = &e->live; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    c->next = e->done;
    e->done = c;
    ADD(e, active, (uint64_t)-1);
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* Joins and frees the connections that ended. Called with e->mu held. */
static void reap(struct xb_nbd_export *e)
{
    while (e->done) {
        struct conn *c = e->done;
        e->done = c->next;
        pthread_join(c->main, NULL);
        close(c->fd);
        conn_destroy(c);
        free(c);
    }
}

static void *accept_main(void *arg)
{
    struct xb_nbd_export *e = arg;
    for (;;) {
        /* xb_nbd_export_free shuts the listening socket down: poll then reports it at once (Linux) */
        struct pollfd p = {.fd = e->lfd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            break;
        if (atomic_load(&e->stopping))
            break;
        if (!(p.revents & POLLIN))
            continue;
        int fd = accept4(e->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of descriptors or memory: the pending client stays queued; do not spin on it */
                struct timespec ts = {0, 50 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        pthread_mutex_lock(&e->mu);
        reap(e);
        if (atomic_load_explicit(&ST(e, active), memory_order_relaxed) >= e->max_clients) {
            pthread_mutex_unlock(&e->mu);
            ADD(e, refused, 1);
            close(fd); /* the client sees the connection closed before any greeting */
            continue;
        }
        struct conn *c = malloc(sizeof(*c));
        if (!c) {
            pthread_mutex_unlock(&e->mu);
            close(fd);
            continue;
        }
        conn_init(c, e, fd);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, XB_NBD_STACK);
        if (pthread_create(&c->main, &attr, conn_main, c)) {
            pthread_mutex_unlock(&e->mu);
            conn_destroy(c);
            free(c);
            close(fd);
        } else {
            c->next = e->live;
            e->live = c;
            ADD(e, active, 1);
            pthread_mutex_unlock(&e->mu);
        }
        pthread_attr_destroy(&attr);
    }
    return NULL;
}

struct xb_nbd_export *xb_nbd_export_new(struct xb_image *img, int readonly, unsigned max_clients, char *err)
{
    struct xb_nbd_export *e = calloc(1, sizeof(*e));
    if (!e) {
        xb_seterr(err, "out of memory");
        return NULL;
    }
    e->img = img;
    e->readonly = readonly;
    e->max_clients = max_clients ? max_clients : 1;
    e->lfd = -1;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    return e;
}

int xb_nbd_export_listen(struct xb_nbd_export *e, const char *path, char *err)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (e->accepting) {
        xb_seterr(err, "%s: the export already listens on %s", path, e->path);
        return -EBUSY;
    }
    if (strlen(path) >= sizeof(a.sun_path)) {
        xb_seterr(err, "%s: too long for a unix socket (%zu bytes at most)", path, sizeof(a.sun_path) - 1);
        return -ENAMETOOLONG;
    }
    strcpy(a.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            xb_seterr(err, "%s: exists and is not a socket", path);
            return -EEXIST;
        }
        unlink(path); /* a socket a killed daemon left behind */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = fd < 0 ? -errno : 0;
    if (!rc && bind(fd, (struct sockaddr *)&a, sizeof(a)))
        rc = -errno;
    /* The directory is the daemon's own (0700); 0600 keeps the socket root's even if it is not. */
    if (!rc && (chmod(path, 0600) || lstat(path, &st) || listen(fd, 16)))
        rc = -errno;
    if (rc) {
        xb_seterr(err, "%s: %s", path, strerror(-rc));
        if (fd >= 0) {
            close(fd);
            unlink(path);
        }
        return rc;
    }
    e->lfd = fd;
    e->sdev = st.st_dev;
    e->sino = st.st_ino;
    strcpy(e->path, path);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, XB_NBD_STACK);
    rc = pthread_create(&e->acceptor, &attr, accept_main, e);
    pthread_attr_destroy(&attr);
    if (rc) {
        xb_seterr(err, "%s: cannot start the listener: %s", path, strerror(rc));
        close(fd);
        unlink(path);
        e->lfd = -1;
        e->path[0] = 0;
        return -rc;
    }
    e->accepting = 1;
    return 0;
}

void xb_nbd_export_get_stats(struct xb_nbd_export *e, struct xb_nbd_stats *out)
{
    uint64_t *o = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        o[i] = atomic_load_explicit(&e->st[i], memory_order_relaxed);
}

void xb_nbd_export_free(struct xb_nbd_export *e)
{
    if (!e)
        return;
    if (e->accepting) {
        atomic_store(&e->stopping, 1);
        shutdown(e->lfd, SHUT_RDWR);
        pthread_join(e->acceptor, NULL);
        close(e->lfd);
        struct stat st;
        /* only our socket: another daemon may have bound the path since (it then owns it) */
        if (lstat(e->path, &st) == 0 && st.st_dev == e->sdev && st.st_ino == e->sino)
            unlink(e->path);
    }
    pthread_mutex_lock(&e->mu);
    for (struct conn *c = e->live; c; c = c->next)
        hang_up(c);
    while (e->live)
        pthread_cond_wait(&e->cv, &e->mu);
    reap(e);
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}
