/*
 * The simulated hypervisor's grant side, as the backend sees it: each simulated
 * guest's memory and grant table are shared memory files from the sim broker.
 * Every grant is checked the way Xen checks it before a page is mapped or
 * copied; the grant entry is read once (one 8-byte atomic load) because the
 * guest can rewrite it at any moment. A mapped grant is an mmap of the guest
 * page itself, so unmapping really removes it.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "platform_int.h"
#include "xb_grant.h"

struct sim_domain {
    uint16_t domid;
    int mem_fd; /* our own dup: mapped grants are mmaps of it */
    uint64_t mem_pages;
    uint8_t *mem; /* all of the guest's memory, for grant copy */
    const uint64_t *gnttab; /* read-only view of struct xb_grant_entry_v1[entries] */
    uint32_t entries;
};

struct sim_platform {
    struct xb_platform base;
    pthread_rwlock_t lock; /* domains: read by map/copy (queue threads), written by add/remove */
    struct sim_domain **doms;
    unsigned ndoms, cap;
};

struct xb_gmap {
    void *addr;
    unsigned n;
    int writable;
    uint32_t frame0; /* the frame page 0 was mapped from (what a persistent grant must still name) */
};

static struct sim_platform *sim_of(struct xb_platform *p)
{
    return (struct sim_platform *)p;
}

static struct sim_domain *find_domain(struct sim_platform *sp, uint16_t domid, unsigned *index)
{
    for (unsigned i = 0; i < sp->ndoms; i++) {
        if (sp->doms[i]->domid == domid) {
            if (index)
                *index = i;
            return sp->doms[i];
        }
    }
    return NULL;
}

static const char *gntst_name(int st)
{
    switch (st) {
    case XB_GNTST_bad_domain:
        return "unknown domain";
    case XB_GNTST_bad_gntref:
        return "grant reference out of range";
    case XB_GNTST_permission_denied:
        return "not granted to us (or read-only)";
    case XB_GNTST_bad_page:
        return "granted frame outside the guest's memory";
    case XB_GNTST_bad_copy_arg:
        return "copy crosses the page";
    default:
        return "grant failure";
    }
}

/* Xen's checks for one use of a grant; on success *frame is the page to touch. */
static int check_grant(const struct sim_domain *d, uint16_t self, xb_grant_ref_t ref, int write, uint32_t *frame)
{
    if (ref >= d->entries)
        return XB_GNTST_bad_gntref;
    /* The one and only read of the entry: everything below uses this snapshot. */
    uint64_t raw = __atomic_load_n(&d->gnttab[ref], __ATOMIC_ACQUIRE);
    struct xb_grant_entry_v1 e;
    memcpy(&e, &raw, sizeof e);
    if ((e.flags & XB_GTF_type_mask) != XB_GTF_permit_access || e.domid != self)
        return XB_GNTST_permission_denied;
    if (write && (e.flags & XB_GTF_readonly))
        return XB_GNTST_permission_denied;
    if (e.frame >= d->mem_pages)
        return XB_GNTST_bad_page;
    *frame = e.frame;
    return XB_GNTST_okay;
}

static void *sim_map(struct xb_platform *p, uint16_t domid, const xb_grant_ref_t *refs, unsigned n, int writable,
                     struct xb_gmap **handle, char *err)
{
    struct sim_platform *sp = sim_of(p);
    size_t len = (size_t)n * XB_PAGE_SIZE;
    struct xb_gmap *h = malloc(sizeof *h);
    if (!h) {
        xb_seterr(err, "grant map: out of memory");
        return NULL;
    }
    /* Reserve the whole range first so the pages land contiguously and nothing else can take the gaps. */
    uint8_t *region = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
        xb_seterr(err, "grant map: cannot reserve %u pages: %s", n, strerror(errno));
        free(h);
        return NULL;
    }
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    pthread_rwlock_rdlock(&sp->lock);
    struct sim_domain *d = find_domain(sp, domid, NULL);
    if (!d) {
        xb_seterr(err, "grant map: domain %u is not attached", domid);
        goto fail;
    }
    for (unsigned i = 0; i < n; i++) {
        uint32_t frame;
        int st = check_grant(d, p->self_domid, refs[i], writable, &frame);
        if (st != XB_GNTST_okay) {
            xb_seterr(err, "grant map: domain %u ref %u: %s", domid, refs[i], gntst_name(st));
            goto fail;
        }
        void *page = mmap(region + (size_t)i * XB_PAGE_SIZE, XB_PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, d->mem_fd,
                          (off_t)frame << XB_PAGE_SHIFT);
        if (page == MAP_FAILED) {
            xb_seterr(err, "grant map: domain %u ref %u: mmap: %s", domid, refs[i], strerror(errno));
            goto fail;
        }
        if (i == 0)
            h->frame0 = frame;
    }
    pthread_rwlock_unlock(&sp->lock);
    h->addr = region;
    h->n = n;
    h->writable = writable;
    *handle = h;
    return region;
fail:
    pthread_rwlock_unlock(&sp->lock);
    munmap(region, len);
    free(h);
    return NULL;
}

static void sim_unmap(struct xb_platform *p, struct xb_gmap *h)
{
    (void)p;
    munmap(h->addr, (size_t)h->n * XB_PAGE_SIZE);
    free(h);
}

/* The sim cannot pin a page or set GTF_reading/GTF_writing in the guest's entry (its view of the
 * table is read-only), so it checks the entry again at each use instead: a grant the guest revoked
 * or re-pointed is refused, and the caller drops its old mapping. */
static int sim_still_valid(struct xb_platform *p, struct xb_gmap *h, uint16_t domid, xb_grant_ref_t ref)
{
    struct sim_platform *sp = sim_of(p);
    int st;
    uint32_t frame = 0;
    pthread_rwlock_rdlock(&sp->lock);
    struct sim_domain *d = find_domain(sp, domid, NULL);
    if (!d)
        st = XB_GNTST_bad_domain;
    else
        st = check_grant(d, p->self_domid, ref, h->writable, &frame);
    pthread_rwlock_unlock(&sp->lock);
    if (st == XB_GNTST_okay && frame != h->frame0)
        st = XB_GNTST_permission_denied;
    return st;
}

static int copy_one(struct sim_platform *sp, struct sim_domain **cache, struct xb_copy_seg *s)
{
    if (!xb_copy_seg_args_ok(s))
        return XB_GNTST_bad_copy_arg;
    struct sim_domain *d = *cache;
    if (!d || d->domid != s->domid) {
        d = find_domain(sp, s->domid, NULL);
        if (!d)
            return XB_GNTST_bad_domain;
        *cache = d;
    }
    uint32_t frame;
    int to_guest = s->dir == XB_COPY_TO_GUEST;
    int st = check_grant(d, sp->base.self_domid, s->gref, to_guest, &frame);
    if (st != XB_GNTST_okay)
        return st;
    uint8_t *guest = d->mem + ((size_t)frame << XB_PAGE_SHIFT) + s->offset;
    if (to_guest)
        memcpy(guest, s->local, s->len);
    else
        memcpy(s->local, guest, s->len);
    return XB_GNTST_okay;
}

static int sim_copy(struct xb_platform *p, struct xb_copy_seg *segs, unsigned n)
{
    struct sim_platform *sp = sim_of(p);
    struct sim_domain *cache = NULL;
    int rc = 0;
    pthread_rwlock_rdlock(&sp->lock);
    for (unsigned i = 0; i < n; i++) {
        segs[i].status = (int16_t)copy_one(sp, &cache, &segs[i]);
        if (segs[i].status != XB_GNTST_okay)
            rc = -EIO;
    }
    pthread_rwlock_unlock(&sp->lock);
    return rc;
}

static void free_domain(struct sim_domain *d)
{
    if (d->mem)
        munmap(d->mem, d->mem_pages << XB_PAGE_SHIFT);
    if (d->gnttab)
        munmap((void *)d->gnttab, (size_t)d->entries * sizeof(struct xb_grant_entry_v1));
    if (d->mem_fd >= 0)
        close(d->mem_fd);
    free(d);
}

static void sim_close(struct xb_platform *p)
{
    struct sim_platform *sp = sim_of(p);
    for (unsigned i = 0; i < sp->ndoms; i++)
        free_domain(sp->doms[i]);
    free(sp->doms);
    pthread_rwlock_destroy(&sp->lock);
    free(sp);
}

static const struct xb_platform_ops sim_ops = {
    .close = sim_close,
    .map = sim_map,
    .unmap = sim_unmap,
    .copy = sim_copy,
    .still_valid = sim_still_valid,
};

struct xb_platform *xb_platform_open_sim(uint16_t self_domid, char *err)
{
    struct sim_platform *sp = calloc(1, sizeof *sp);
    if (!sp) {
        xb_seterr(err, "sim platform: out of memory");
        return NULL;
    }
    if (pthread_rwlock_init(&sp->lock, NULL) != 0) {
        xb_seterr(err, "sim platform: cannot create a lock");
        free(sp);
        return NULL;
    }
    sp->base.ops = &sim_ops;
    sp->base.self_domid = self_domid;
    sp->base.is_sim = 1;
    return &sp->base;
}

/* A shared file the guest also holds must not shrink under our mappings (that would SIGBUS us). */
static int check_shared_file(int fd, uint64_t need, const char *what, uint16_t domid, char *err)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        xb_seterr(err, "domain %u %s: %s", domid, what, strerror(e));
        return -e;
    }
    if ((uint64_t)st.st_size < need) {
        xb_seterr(err, "domain %u %s is %lld bytes, needs %llu", domid, what, (long long)st.st_size,
                (unsigned long long)need);
        return -EINVAL;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        xb_seterr(err, "domain %u %s is not sealed against shrinking (F_SEAL_SHRINK)", domid, what);
        return -EINVAL;
    }
    return 0;
}

static int map_domain_files(struct sim_domain *d, int mem_fd, int gnttab_fd, char *err)
{
    uint64_t mem_len = d->mem_pages << XB_PAGE_SHIFT;
    size_t gnt_len = (size_t)d->entries * sizeof(struct xb_grant_entry_v1);
    int rc = check_shared_file(mem_fd, mem_len, "memory", d->domid, err);
    if (rc == 0)
        rc = check_shared_file(gnttab_fd, gnt_len, "grant table", d->domid, err);
    if (rc)
        return rc;
    d->mem_fd = fcntl(mem_fd, F_DUPFD_CLOEXEC, 0);
    if (d->mem_fd < 0) {
        int e = errno;
        xb_seterr(err, "domain %u memory: dup: %s", d->domid, strerror(e));
        return -e;
    }
    void *mem = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, mem_fd, 0);
    if (mem == MAP_FAILED) {
        int e = errno;
        xb_seterr(err, "domain %u memory: mmap of %llu pages: %s", d->domid, (unsigned long long)d->mem_pages,
                strerror(e));
        return -e;
    }
    d->mem = mem;
    void *gnt = mmap(NULL, gnt_len, PROT_READ, MAP_SHARED, gnttab_fd, 0);
    if (gnt == MAP_FAILED) {
        int e = errno;
        xb_seterr(err, "domain %u grant table: mmap: %s", d->domid, strerror(e));
        return -e;
    }
    d->gnttab = gnt;
    return 0;
}

int xb_platform_sim_add_domain(struct xb_platform *p, uint16_t domid, int mem_fd, uint64_t mem_pages, int gnttab_fd,
                               uint32_t gnttab_entries, char *err)
{
    if (!p->is_sim) {
        xb_seterr(err, "domain %u: simulated domains exist only on the sim platform", domid);
        return -EINVAL;
    }
    /* Bound by what the offsets can express: frame * 4096 must fit off_t and the address space. */
    if (mem_pages == 0 || mem_pages > (1ull << 32) || gnttab_entries == 0) {
        xb_seterr(err, "domain %u: bad sizes (%llu pages, %u grant entries)", domid, (unsigned long long)mem_pages,
                gnttab_entries);
        return -EINVAL;
    }
    struct sim_platform *sp = sim_of(p);
    struct sim_domain *d = calloc(1, sizeof *d);
    if (!d) {
        xb_seterr(err, "domain %u: out of memory", domid);
        return -ENOMEM;
    }
    d->domid = domid;
    d->mem_fd = -1;
    d->mem_pages = mem_pages;
    d->entries = gnttab_entries;
    int rc = map_domain_files(d, mem_fd, gnttab_fd, err);
    if (rc) {
        free_domain(d);
        return rc;
    }
    pthread_rwlock_wrlock(&sp->lock);
    if (find_domain(sp, domid, NULL)) {
        rc = -EEXIST;
        xb_seterr(err, "domain %u is already attached", domid);
    } else if (sp->ndoms == sp->cap) {
        unsigned cap = sp->cap ? sp->cap * 2 : 8;
        struct sim_domain **doms = realloc(sp->doms, cap * sizeof *doms);
        if (!doms) {
            rc = -ENOMEM;
            xb_seterr(err, "domain %u: out of memory", domid);
        } else {
            sp->doms = doms;
            sp->cap = cap;
        }
    }
    if (rc == 0)
        sp->doms[sp->ndoms++] = d;
    pthread_rwlock_unlock(&sp->lock);
    if (rc)
        free_domain(d);
    return rc;
}

int xb_platform_sim_remove_domain(struct xb_platform *p, uint16_t domid)
{
    if (!p->is_sim)
        return -EINVAL;
    struct sim_platform *sp = sim_of(p);
    unsigned i;
    pthread_rwlock_wrlock(&sp->lock);
    struct sim_domain *d = find_domain(sp, domid, &i);
    if (d)
        sp->doms[i] = sp->doms[--sp->ndoms];
    pthread_rwlock_unlock(&sp->lock);
    if (!d)
        return -ENOENT;
    /* Grants still mapped stay valid (their mmaps hold the file), as in Xen until they are unmapped. */
    free_domain(d);
    return 0;
}
