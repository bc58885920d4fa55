/*
 * Grants on real Xen through /dev/xen/gntdev: map = IOCTL_GNTDEV_MAP_GRANT_REF
 * then mmap of the returned offset (read-only maps are mapped PROT_READ, which
 * makes gntdev ask Xen for a read-only mapping); unmap = munmap then
 * IOCTL_GNTDEV_UNMAP_GRANT_REF; copy = batched IOCTL_GNTDEV_GRANT_COPY. Xen
 * itself checks the grants; the status it reports is passed through per segment.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "platform_int.h"
#include "real_uapi.h"

struct real_platform {
    struct xb_platform base;
    int gntdev_fd; /* shared by all threads; gntdev serialises internally */
};

struct xb_gmap {
    void *addr;
    unsigned n;
    uint64_t index; /* gntdev's offset for this mapping */
};

static struct real_platform *real_of(struct xb_platform *p)
{
    return (struct real_platform *)p;
}

static void gntdev_release(int fd, uint64_t index, unsigned n)
{
    struct ioctl_gntdev_unmap_grant_ref u = {.index = index, .count = n};
    /* Cannot fail for an index gntdev gave us; nothing useful to do if it did. */
    (void)ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &u);
}

static void *real_map(struct xb_platform *p, uint16_t domid, const xb_grant_ref_t *refs, unsigned n, int writable,
                      struct xb_gmap **handle, char *err)
{
    struct real_platform *rp = real_of(p);
    /* The ioctl struct ends in refs[1]: allocate room for n. */
    size_t sz = sizeof(struct ioctl_gntdev_map_grant_ref) + (size_t)(n - 1) * sizeof(struct ioctl_gntdev_grant_ref);
    struct ioctl_gntdev_map_grant_ref *m = calloc(1, sz);
    struct xb_gmap *h = malloc(sizeof *h);
    if (!m || !h) {
        xb_seterr(err, "grant map: out of memory");
        goto fail_free;
    }
    m->count = n;
    for (unsigned i = 0; i < n; i++) {
        m->refs[i].domid = domid;
        m->refs[i].ref = refs[i];
    }
    if (ioctl(rp->gntdev_fd, IOCTL_GNTDEV_MAP_GRANT_REF, m) != 0) {
        xb_seterr(err, "grant map: domain %u, %u refs (first %u): IOCTL_GNTDEV_MAP_GRANT_REF: %s", domid, n, refs[0],
                strerror(errno));
        goto fail_free;
    }
    size_t len = (size_t)n * XB_PAGE_SIZE;
    /* The grant hypercall happens here; a bad ref (not granted, read-only for a writable map) fails the mmap. */
    void *addr = mmap(NULL, len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, rp->gntdev_fd, (off_t)m->index);
    if (addr == MAP_FAILED) {
        int e = errno;
        gntdev_release(rp->gntdev_fd, m->index, n);
        xb_seterr(err, "grant map: domain %u, %u refs (first %u): mmap: %s", domid, n, refs[0], strerror(e));
        goto fail_free;
    }
    h->addr = addr;
    h->n = n;
    h->index = m->index;
    free(m);
    *handle = h;
    return addr;
fail_free:
    free(m);
    free(h);
    return NULL;
}

static void real_unmap(struct xb_platform *p, struct xb_gmap *h)
{
    struct real_platform *rp = real_of(p);
    munmap(h->addr, (size_t)h->n * XB_PAGE_SIZE);
    gntdev_release(rp->gntdev_fd, h->index, h->n);
    free(h);
}

/* Xen pins a mapped page until it is unmapped; the guest rewriting its grant entry meanwhile does
 * not change what the mapping shows (blkback's persistent grants rely on the same). */
static int real_still_valid(struct xb_platform *p, struct xb_gmap *h, uint16_t domid, xb_grant_ref_t ref)
{
    (void)p;
    (void)h;
    (void)domid;
    (void)ref;
    return 0;
}

static void to_ioctl_seg(const struct xb_copy_seg *s, struct ioctl_gntdev_grant_copy_segment *k)
{
    memset(k, 0, sizeof *k);
    k->len = s->len;
    if (s->dir == XB_COPY_FROM_GUEST) {
        k->flags = GNTCOPY_source_gref;
        k->source.foreign.ref = s->gref;
        k->source.foreign.offset = s->offset;
        k->source.foreign.domid = s->domid;
        k->dest.virt = s->local;
    } else {
        k->flags = GNTCOPY_dest_gref;
        k->dest.foreign.ref = s->gref;
        k->dest.foreign.offset = s->offset;
        k->dest.foreign.domid = s->domid;
        k->source.virt = s->local;
    }
}

/* One ioctl for up to XB_REAL_COPY_CHUNK segments whose arguments were already checked. */
static void copy_chunk(int fd, struct xb_copy_seg **segs, unsigned n)
{
    struct ioctl_gntdev_grant_copy_segment k[XB_REAL_COPY_CHUNK];
    for (unsigned i = 0; i < n; i++)
        to_ioctl_seg(segs[i], &k[i]);
    struct ioctl_gntdev_grant_copy c = {.count = n, .segments = k};
    if (ioctl(fd, IOCTL_GNTDEV_GRANT_COPY, &c) != 0) {
        /* The whole batch failed before Xen reported per segment (EFAULT, ENOMEM, ...). */
        for (unsigned i = 0; i < n; i++)
            segs[i]->status = XB_GNTST_general_error;
        return;
    }
    for (unsigned i = 0; i < n; i++)
        segs[i]->status = k[i].status;
}

static int real_copy(struct xb_platform *p, struct xb_copy_seg *segs, unsigned n)
{
    struct real_platform *rp = real_of(p);
    struct xb_copy_seg *batch[XB_REAL_COPY_CHUNK];
    unsigned nb = 0;
    int rc = 0;
    for (unsigned i = 0; i < n; i++) {
        if (!xb_copy_seg_args_ok(&segs[i])) {
            segs[i].status = XB_GNTST_bad_copy_arg;
            continue;
        }
        batch[nb++] = &segs[i];
        if (nb == XB_REAL_COPY_CHUNK) {
            copy_chunk(rp->gntdev_fd, batch, nb);
            nb = 0;
        }
    }
    if (nb)
        copy_chunk(rp->gntdev_fd, batch, nb);
    for (unsigned i = 0; i < n; i++)
        if (segs[i].status != GNTST_okay)
            rc = -EIO;
    return rc;
}

static void real_close(struct xb_platform *p)
{
    struct real_platform *rp = real_of(p);
    close(rp->gntdev_fd);
    free(rp);
}

static const struct xb_platform_ops real_ops = {
    .close = real_close,
    .map = real_map,
    .unmap = real_unmap,
    .copy = real_copy,
    .still_valid = real_still_valid,
};

struct xb_platform *xb_platform_open_real(char *err)
{
    int fd = open(XB_GNTDEV_PATH, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT)
            xb_seterr(err, "%s does not exist: not running in a Xen Dom0 (or the xen-gntdev module is not loaded); "
                         "use the simulated platform (--sim DIR) without Xen", XB_GNTDEV_PATH);
        else
            xb_seterr(err, "cannot open %s: %s", XB_GNTDEV_PATH, strerror(e));
        return NULL;
    }
    struct real_platform *rp = calloc(1, sizeof *rp);
    if (!rp) {
        close(fd);
        xb_seterr(err, "real platform: out of memory");
        return NULL;
    }
    rp->base.ops = &real_ops;
    rp->base.self_domid = 0; /* Xen knows who we are; grants are checked against our real domid */
    rp->gntdev_fd = fd;
    return &rp->base;
}
