/*
 * The Ceph RBD driver: an image reached through librbd's C API, behind the same `struct xb_image`
 * as the file drivers. Its own cffi module (xenblk._rbd, build_rbd.py) so that hosts without
 * librbd still load xenblk._storage; the pointer it returns is the whole interface, as for files.
 *
 * The data plane's I/O is asynchronous (ops->aio_submit): rbd_aio_readv/writev/flush/discard
 * with completions that librbd queues on the image and signals on an eventfd
 * (rbd_set_image_notification); the queue threads poll that fd with their others and collect the
 * completions with rbd_poll_io_events. No callback runs our code on librbd's threads and no thread
 * waits per request. The synchronous ops (Python, tests, the rare FLUSH carrying data) use
 * librbd's synchronous calls, which never land on the event queue.
 *
 * librbd's cache is switched off (rbd_cache=false): a write acknowledged to the guest is on the
 * OSDs, and a flush acknowledged is durable. A read-write image takes the exclusive lock in
 * EXCLUSIVE mode (xb_rbd_lock): until it holds it, every write is refused with EROFS, and librbd
 * itself never hands it over while we hold it (no transparent lock transitions in that mode).
 */
#include <errno.h>
#include <inttypes.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "rbd_api.h"

struct rbd_priv {
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    int owner; /* atomic: holds the exclusive lock (read-write images only write then) */
    int snapshot;
    uint64_t update_handle;
    int update_fd; /* eventfd: the image header changed (resize); -1 without a watch */
    char name[sizeof(((struct xb_rbd_opts *)0)->pool) + sizeof(((struct xb_rbd_opts *)0)->image) + 256 + 8];
};

static struct rbd_priv *P(struct xb_image *img) { return img->priv; }

static int writable(struct xb_image *img)
{
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    return __atomic_load_n(&P(img)->owner, __ATOMIC_ACQUIRE) ? 0 : -EROFS;
}

static int r_map(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext)
{
    (void)img, (void)off, (void)len, (void)for_write, (void)ext;
    return 0; /* no host fd: everything goes through aio_submit or the synchronous calls */
}

static void r_unmap(struct xb_image *img, const struct xb_extent *ext) { (void)img, (void)ext; }

/* librbd's synchronous calls take one buffer: one call per iovec entry, a short transfer is EIO. */
static ssize_t rw_each(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off, int write)
{
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++) {
        ssize_t n = write ? rbd_write2(P(img)->image, off + total, iov[i].iov_len, iov[i].iov_base, 0)
                          : rbd_read2(P(img)->image, off + total, iov[i].iov_len, iov[i].iov_base, 0);
        if (n < 0)
            return n;
        if ((size_t)n != iov[i].iov_len)
            return -EIO;
        total += (size_t)n;
    }
    return (ssize_t)total;
}

static ssize_t r_preadv(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return rw_each(img, iov, iovcnt, off, 0);
}

static ssize_t r_pwritev(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    int w = writable(img);
    return w ? w : rw_each(img, iov, iovcnt, off, 1);
}

static int r_flush(struct xb_image *img) { return rbd_flush(P(img)->image); }

static int r_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    if (secure)
        return -EOPNOTSUPP; /* a discarded RBD extent is not guaranteed gone from every OSD's disk */
    int w = writable(img);
    if (w)
        return w;
    return rbd_discard(P(img)->image, off, len);
}

static int r_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    int w = writable(img);
    if (w)
        return w;
    return rbd_write_zeroes(P(img)->image, off, len, 0, 0);
}

static int64_t r_refresh_size(struct xb_image *img)
{
    uint64_t size;
    int rc = rbd_get_size(P(img)->image, &size);
    if (rc < 0)
        return rc;
    img->size = size;
    return (int64_t)size;
}

static int r_aio_submit(struct xb_image *img, struct xb_aio *a)
{
    rbd_image_t im = P(img)->image;
    if (a->op == XB_AIO_WRITE || a->op == XB_AIO_DISCARD) {
        int w = writable(img);
        if (w)
            return w;
    }
    rbd_completion_t c;
    /* No callback: the completion is queued on the image and signalled on the eventfd. */
    int rc = rbd_aio_create_completion(a, NULL, &c);
    if (rc < 0)
        return rc;
    switch (a->op) {
    case XB_AIO_READ:
        rc = rbd_aio_readv(im, a->iov, a->iovcnt, a->off, c);
        break;
    case XB_AIO_WRITE:
        rc = rbd_aio_writev(im, a->iov, a->iovcnt, a->off, c);
        break;
    case XB_AIO_FLUSH:
        rc = rbd_aio_flush(im, c);
        break;
    case XB_AIO_DISCARD:
        rc = rbd_aio_discard(im, a->off, a->len, c);
        break;
    default:
        rc = -EINVAL;
    }
    if (rc < 0)
        rbd_aio_release(c);
    return rc < 0 ? rc : 0;
}

static int r_aio_reap(struct xb_image *img, struct xb_aio **done, int max)
{
    rbd_completion_t comps[64];
    if (max > 64)
        max = 64;
    int n = rbd_poll_io_events(P(img)->image, comps, max);
    if (n < 0)
        return n;
    for (int i = 0; i < n; i++) {
        struct xb_aio *a = rbd_aio_get_arg(comps[i]);
        a->result = rbd_aio_get_return_value(comps[i]);
        rbd_aio_release(comps[i]);
        done[i] = a;
    }
    return n;
}

static void disconnect(struct rbd_priv *r)
{
    if (r->image) {
        if (r->update_fd >= 0)
            rbd_update_unwatch(r->image, r->update_handle);
        if (__atomic_load_n(&r->owner, __ATOMIC_ACQUIRE))
            rbd_lock_release(r->image);
        rbd_close(r->image);
    }
    if (r->io)
        rados_ioctx_destroy(r->io);
    if (r->cluster)
        rados_shutdown(r->cluster);
    if (r->update_fd >= 0)
        close(r->update_fd);
}

static void r_close(struct xb_image *img)
{
    struct rbd_priv *r = P(img);
    /* Everything acknowledged reached the OSDs (no cache); flush for what the guest never flushed. */
    rbd_flush(r->image);
    disconnect(r);
    if (img->aio_fd >= 0)
        close(img->aio_fd);
    free(r);
    free(img);
}

static const struct xb_image_ops rbd_ops = {
    .map = r_map,
    .unmap = r_unmap,
    .preadv = r_preadv,
    .pwritev = r_pwritev,
    .flush = r_flush,
    .discard = r_discard,
    .write_zeroes = r_write_zeroes,
    .refresh_size = r_refresh_size,
    .close = r_close,
    .aio_submit = r_aio_submit,
    .aio_reap = r_aio_reap,
};

/* librbd's thread: the header changed (resize, snapshot, lock owner). Python re-reads the size. */
static void on_update(void *arg)
{
    struct rbd_priv *r = arg;
    uint64_t one = 1;
    if (write(r->update_fd, &one, sizeof(one)) < 0) {
        /* counter overflow only: the reader is due to wake anyway */
    }
}

static int conf(rados_t c, const char *k, const char *v, char *err)
{
    int rc = rados_conf_set(c, k, v);
    if (rc < 0)
        xb_seterr(err, "ceph option %s=%s: %s", k, v, strerror(-rc));
    return rc;
}

struct xb_image *xb_rbd_open(const struct xb_rbd_opts *o, char *err)
{
    if (err)
        err[0] = 0;
    struct xb_image *img = calloc(1, sizeof(*img));
    struct rbd_priv *r = calloc(1, sizeof(*r));
    if (!img || !r) {
        free(img);
        free(r);
        xb_seterr(err, "out of memory");
        return NULL;
    }
    r->update_fd = -1;
    img->aio_fd = -1;
    snprintf(r->name, sizeof(r->name), "rbd:%s/%s%s%s", o->pool, o->image, o->snap[0] ? "@" : "", o->snap);
    int readonly = (o->flags & XB_OPEN_RDONLY) || o->snap[0];
    char num[32];
    int rc = rados_create(&r->cluster, o->client_id[0] ? o->client_id : NULL);
    if (rc < 0) {
        xb_seterr(err, "%s: rados_create(client.%s): %s", r->name, o->client_id, strerror(-rc));
        r->cluster = NULL;
        goto fail;
    }
    if (o->conf_file[0] && (rc = rados_conf_read_file(r->cluster, o->conf_file)) < 0) {
        xb_seterr(err, "%s: reading %s: %s", r->name, o->conf_file, strerror(-rc));
        goto fail;
    }
    if (o->keyring[0] && (rc = conf(r->cluster, "keyring", o->keyring, err)) < 0)
        goto fail;
    if ((rc = conf(r->cluster, "rbd_cache", "false", err)) < 0)
        goto fail;
    snprintf(num, sizeof(num), "%u", o->connect_timeout);
    if ((rc = conf(r->cluster, "client_mount_timeout", num, err)) < 0)
        goto fail;
    /* 0: an operation waits for the cluster as long as it takes (the default of librados) */
    snprintf(num, sizeof(num), "%u", o->op_timeout);
    if ((rc = conf(r->cluster, "rados_osd_op_timeout", num, err)) < 0 ||
        (rc = conf(r->cluster, "rados_mon_op_timeout", num, err)) < 0)
        goto fail;
    if ((rc = rados_connect(r->cluster)) < 0) {
        xb_seterr(err, "%s: cannot connect to the Ceph cluster (conf %s, client.%s): %s", r->name,
                  o->conf_file[0] ? o->conf_file : "default", o->client_id[0] ? o->client_id : "admin",
                  strerror(-rc));
        goto fail;
    }
    if ((rc = rados_ioctx_create(r->cluster, o->pool, &r->io)) < 0) {
        r->io = NULL;
        xb_seterr(err, "%s: pool %s: %s", r->name, o->pool, strerror(-rc));
        goto fail;
    }
    rc = readonly ? rbd_open_read_only(r->io, o->image, &r->image, o->snap[0] ? o->snap : NULL)
                  : rbd_open(r->io, o->image, &r->image, NULL);
    if (rc < 0) {
        r->image = NULL;
        xb_seterr(err, "%s: cannot open the image: %s", r->name, strerror(-rc));
        goto fail;
    }
    rbd_image_info_t info;
    if ((rc = rbd_stat(r->image, &info, sizeof(info))) < 0) {
        xb_seterr(err, "%s: rbd_stat: %s", r->name, strerror(-rc));
        goto fail;
    }
    if (!readonly) {
        uint64_t features = 0;
        rbd_get_features(r->image, &features);
        if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
            rc = -EINVAL;
            xb_seterr(err,
                      "%s: refused read-write: the image lacks the exclusive-lock feature, so nothing keeps a"
                      " second writer out (rbd feature enable %s/%s exclusive-lock)",
                      r->name, o->pool, o->image);
            goto fail;
        }
    }
    img->aio_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (img->aio_fd < 0) {
        rc = -errno;
        xb_seterr(err, "%s: eventfd: %s", r->name, strerror(errno));
        goto fail;
    }
    if ((rc = rbd_set_image_notification(r->image, img->aio_fd, EVENT_TYPE_EVENTFD)) < 0) {
        xb_seterr(err, "%s: rbd_set_image_notification: %s", r->name, strerror(-rc));
        goto fail;
    }
    if (!o->snap[0]) {
        r->update_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (r->update_fd >= 0 && rbd_update_watch(r->image, &r->update_handle, on_update, r) < 0) {
            close(r->update_fd);
            r->update_fd = -1;
        }
    }
    img->ops = &rbd_ops;
    img->priv = r;
    img->format = XB_FMT_RBD;
    img->size = info.size;
    img->logical_block = 512;
    img->physical_block = 4096;
    img->discard_granularity = 4096;
    img->caps = XB_CAP_FLUSH | XB_CAP_DISCARD | XB_CAP_WRITE_ZEROES | (readonly ? XB_CAP_READONLY : 0);
    return img;
fail:
    disconnect(r);
    if (img->aio_fd >= 0)
        close(img->aio_fd);
    free(r);
    free(img);
    return NULL;
}

static void owners_of(rbd_image_t im, char *out, size_t outlen)
{
    char *owners[8];
    size_t n = 8;
    rbd_lock_mode_t mode;
    out[0] = 0;
    if (rbd_lock_get_owners(im, &mode, owners, &n) < 0)
        return;
    size_t used = 0;
    for (size_t i = 0; i < n && used + 1 < outlen; i++) {
        int w = snprintf(out + used, outlen - used, "%s%s", i ? "," : "", owners[i]);
        if (w < 0)
            break;
        used += (size_t)w;
    }
    rbd_lock_get_owners_cleanup(owners, n);
}

int xb_rbd_lock(struct xb_image *img, char *prev_owner, char *err)
{
    struct rbd_priv *r = P(img);
    if (err)
        err[0] = 0;
    if (img->caps & XB_CAP_READONLY)
        return 0;
    if (__atomic_load_n(&r->owner, __ATOMIC_ACQUIRE))
        return 0;
    /* Who holds it now: if our acquire succeeds anyway, librbd found that holder dead (its watch
     * gone), blocklisted it and broke its lock; the caller logs that. */
    owners_of(r->image, prev_owner, XB_RBD_NAMELEN);
    int rc = rbd_lock_acquire(r->image, RBD_LOCK_MODE_EXCLUSIVE);
    if (rc == 0) {
        int is_owner = 0;
        rc = rbd_is_exclusive_lock_owner(r->image, &is_owner);
        if (rc == 0 && !is_owner)
            rc = -EROFS;
    }
    if (rc < 0) {
        if (rc == -EROFS || rc == -EBUSY)
            owners_of(r->image, prev_owner, XB_RBD_NAMELEN);
        xb_seterr(err, "%s: exclusive lock %s: %s%s%s", r->name, rc == -EROFS || rc == -EBUSY ? "held elsewhere" : "failed",
                  strerror(-rc), prev_owner[0] ? ", held by " : "", prev_owner);
        return rc;
    }
    __atomic_store_n(&r->owner, 1, __ATOMIC_RELEASE);
    return 0;
}

int xb_rbd_update_fd(struct xb_image *img) { return P(img)->update_fd; }
