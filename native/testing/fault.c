/* A fault-injecting image for tests: forwards every op to a real image and fails the ones
 * that match a rule set at run time from Python (tests/fixtures/fault_image.py).
 *
 * Only test code creates one (xb_fault_wrap has no path from a config, XenStore or a guest).
 * Faults are real on the fast path too: map() refuses any range a live read or write rule
 * could hit, so that I/O goes through preadv/pwritev here and fails, and is counted. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "fault_api.h"
#include "xb_storage.h"

struct fault_rule {
    unsigned ops;   /* XB_FAULT_* */
    int err;        /* positive errno */
    uint64_t off;   /* byte range the rule covers; len 0: to the end */
    uint64_t len;
    uint64_t after; /* matching calls that still pass */
    uint64_t count; /* matching calls that fail after those; 0: all of them */
    uint64_t seen;  /* matching calls so far */
    uint64_t hits;  /* calls failed */
};

struct fault_image {
    struct xb_image img; /* first: the wrapper is handed out as a struct xb_image */
    struct xb_image *inner;
    pthread_mutex_t lock;
    struct fault_rule rules[XB_FAULT_MAX_RULES];
    unsigned nr_rules;
};

static struct fault_image *F(struct xb_image *img) { return img->priv; }

static uint64_t iov_len(const struct iovec *iov, int iovcnt)
{
    uint64_t n = 0;
    for (int i = 0; i < iovcnt; i++)
        n += iov[i].iov_len;
    return n;
}

static int overlaps(const struct fault_rule *r, unsigned op, uint64_t off, uint64_t len)
{
    if (op == XB_FAULT_FLUSH)
        return 1; /* a flush has no range */
    uint64_t end = r->len ? r->off + r->len : UINT64_MAX;
    return off < end && off + (len ? len : 1) > r->off;
}

static int live(const struct fault_rule *r) { return !r->count || r->seen < r->after + r->count; }

/* Counts the call against every matching rule; returns -errno of the first rule that fires. */
static int check(struct xb_image *img, unsigned op, uint64_t off, uint64_t len)
{
    struct fault_image *f = F(img);
    int ret = 0;
    pthread_mutex_lock(&f->lock);
    for (unsigned i = 0; i < f->nr_rules; i++) {
        struct fault_rule *r = &f->rules[i];
        if (!(r->ops & op) || !overlaps(r, op, off, len) || !live(r))
            continue;
        r->seen++;
        if (r->seen > r->after && !ret) {
            r->hits++;
            ret = -r->err;
        }
    }
    pthread_mutex_unlock(&f->lock);
    return ret;
}

static int would_fault(struct xb_image *img, unsigned op, uint64_t off, uint64_t len)
{
    struct fault_image *f = F(img);
    int hit = 0;
    pthread_mutex_lock(&f->lock);
    for (unsigned i = 0; i < f->nr_rules && !hit; i++)
        hit = (f->rules[i].ops & op) && overlaps(&f->rules[i], op, off, len) && live(&f->rules[i]);
    pthread_mutex_unlock(&f->lock);
    return hit;
}

static int f_map(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext)
{
    if (would_fault(img, for_write ? XB_FAULT_WRITE : XB_FAULT_READ, off, len))
        return 0;
    struct xb_image *in = F(img)->inner;
    return in->ops->map(in, off, len, for_write, ext);
}

static void f_unmap(struct xb_image *img, const struct xb_extent *ext)
{
    struct xb_image *in = F(img)->inner;
    in->ops->unmap(in, ext);
}

static ssize_t f_preadv(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    int r = check(img, XB_FAULT_READ, off, iov_len(iov, iovcnt));
    struct xb_image *in = F(img)->inner;
    return r ? r : in->ops->preadv(in, iov, iovcnt, off);
}

static ssize_t f_pwritev(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    int r = check(img, XB_FAULT_WRITE, off, iov_len(iov, iovcnt));
    struct xb_image *in = F(img)->inner;
    return r ? r : in->ops->pwritev(in, iov, iovcnt, off);
}

static int f_flush(struct xb_image *img)
{
    int r = check(img, XB_FAULT_FLUSH, 0, 0);
    struct xb_image *in = F(img)->inner;
    return r ? r : in->ops->flush(in);
}

static int f_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    int r = check(img, XB_FAULT_DISCARD, off, len);
    struct xb_image *in = F(img)->inner;
    return r ? r : in->ops->discard(in, off, len, secure);
}

static int f_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    int r = check(img, XB_FAULT_WRITE, off, len);
    struct xb_image *in = F(img)->inner;
    return r ? r : in->ops->write_zeroes(in, off, len);
}

static int64_t f_refresh_size(struct xb_image *img)
{
    struct xb_image *in = F(img)->inner;
    int64_t n = in->ops->refresh_size(in);
    if (n >= 0)
        img->size = in->size;
    return n;
}

static void f_close(struct xb_image *img)
{
    struct fault_image *f = F(img);
    f->inner->ops->close(f->inner);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

static const struct xb_image_ops fault_ops = {
    .map = f_map,
    .unmap = f_unmap,
    .preadv = f_preadv,
    .pwritev = f_pwritev,
    .flush = f_flush,
    .discard = f_discard,
    .write_zeroes = f_write_zeroes,
    .refresh_size = f_refresh_size,
    .close = f_close,
};

struct xb_image *xb_fault_wrap(struct xb_image *inner)
{
    struct fault_image *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->img = *inner;
    f->img.ops = &fault_ops;
    f->img.priv = f;
    f->inner = inner;
    pthread_mutex_init(&f->lock, NULL);
    return &f->img;
}

int xb_fault_add(struct xb_image *img, unsigned ops, int err, uint64_t off, uint64_t len, uint64_t after,
                 uint64_t count)
{
    if (img->ops != &fault_ops)
        return -EINVAL;
    if (!ops || (ops & ~(unsigned)XB_FAULT_ALL) || err <= 0)
        return -EINVAL;
    struct fault_image *f = F(img);
    int ret;
    pthread_mutex_lock(&f->lock);
    if (f->nr_rules == XB_FAULT_MAX_RULES) {
        ret = -ENOSPC;
    } else {
        ret = (int)f->nr_rules;
        f->rules[f->nr_rules++] = (struct fault_rule){ops, err, off, len, after, count, 0, 0};
    }
    pthread_mutex_unlock(&f->lock);
    return ret;
}

int64_t xb_fault_hits(struct xb_image *img, int rule)
{
    if (img->ops != &fault_ops)
        return -EINVAL;
    struct fault_image *f = F(img);
    int64_t n = -ENOENT;
    pthread_mutex_lock(&f->lock);
    if (rule >= 0 && (unsigned)rule < f->nr_rules)
        n = (int64_t)f->rules[rule].hits;
    pthread_mutex_unlock(&f->lock);
    return n;
}

int xb_fault_clear(struct xb_image *img)
{
    if (img->ops != &fault_ops)
        return -EINVAL;
    struct fault_image *f = F(img);
    pthread_mutex_lock(&f->lock);
    f->nr_rules = 0;
    pthread_mutex_unlock(&f->lock);
    return 0;
}
