/*
 * One queue of the simulated blkfront: a shared ring in guest memory, a pool of granted data pages,
 * an event channel, and a thread that runs the workload through them.
 *
 * The thread fills as many requests as the ring and the queue depth allow, publishes them with one
 * producer update and at most one notification (only if the backend asked for it through req_event),
 * then consumes responses until it has to wait; it sleeps in poll() on the event channel. Nothing
 * here touches Python.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "queue_int.h"

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

uint32_t xb_sg_ring_entries(int abi, unsigned ring_pages)
{
    return xb_ring_size(abi == XB_ABI_X86_32 ? XB_ABI_X86_32 : XB_ABI_X86_64, ring_pages);
}

static unsigned div_up(uint64_t a, uint64_t b)
{
    return (unsigned)((a + b - 1) / b);
}

/* Data pages per I/O, ring requests per I/O, indirect pages per request, for a config. */
static int geometry(const struct xb_sg_queue_config *c, unsigned *dp, unsigned *parts, unsigned *ipp, char *err)
{
    if (c->bs == 0 || c->bs % 512 || c->bs > XB_SG_MAX_BS) {
        xb_seterr(err, "block size %u must be a multiple of 512 up to %u", c->bs, XB_SG_MAX_BS);
        return -1;
    }
    if (c->sector_size == 0 || c->bs % c->sector_size) {
        xb_seterr(err, "block size %u is not a multiple of the disk's sector size %u", c->bs, c->sector_size);
        return -1;
    }
    unsigned max_segs = c->max_segs;
    if (max_segs == 0 || (!c->use_indirect && max_segs > XB_MAX_SEGMENTS_PER_REQUEST) ||
        max_segs > XB_MAX_INDIRECT_PAGES_PER_REQUEST * XB_SEGS_PER_INDIRECT_FRAME) {
        xb_seterr(err, "bad segment limit %u", max_segs);
        return -1;
    }
    *dp = div_up(c->bs, XB_PAGE_SIZE);
    *parts = div_up(*dp, max_segs);
    unsigned per = *dp < max_segs ? *dp : max_segs;
    *ipp = c->use_indirect ? div_up(per, XB_SEGS_PER_INDIRECT_FRAME) : 0;
    uint32_t ring = xb_sg_ring_entries(c->abi, c->ring_pages);
    if (*parts > ring) {
        xb_seterr(err, "block size %u needs %u requests per I/O, more than the ring's %u entries", c->bs, *parts, ring);
        return -1;
    }
    return 0;
}

uint64_t xb_sg_pool_pages(const struct xb_sg_queue_config *c, char *err)
{
    unsigned dp, parts, ipp;
    if (c->rw < 0)
        return 0;
    if (geometry(c, &dp, &parts, &ipp, err) < 0)
        return 0;
    if (c->iodepth == 0 || c->iodepth > XB_SG_MAX_IODEPTH) {
        xb_seterr(err, "queue depth %u out of 1..%u", c->iodepth, XB_SG_MAX_IODEPTH);
        return 0;
    }
    return (uint64_t)c->iodepth * (dp + (uint64_t)parts * ipp);
}

struct xb_sg_queue *xb_sg_queue_new(struct xb_sg_domain *d, const struct xb_sg_queue_config *cfg, char *err)
{
    struct xb_sg_queue_config c = *cfg;
    struct xb_sg_queue *q = NULL;
    if (c.ring_pages == 0 || c.ring_pages > XB_MAX_RING_PAGES || (c.ring_pages & (c.ring_pages - 1))) {
        xb_seterr(err, "ring of %u pages: must be a power of two up to %u", c.ring_pages, XB_MAX_RING_PAGES);
        goto fail;
    }
    if (c.abi != XB_ABI_X86_64 && c.abi != XB_ABI_X86_32) {
        xb_seterr(err, "unknown ABI %d", c.abi);
        goto fail;
    }
    if (c.ring_frame + c.ring_pages > d->mem_pages || (uint64_t)c.ring_ref + c.ring_pages > d->gnttab_entries) {
        xb_seterr(err, "ring pages or grant refs beyond the domain's memory or grant table");
        goto fail;
    }
    q = calloc(1, sizeof(*q));
    if (!q) {
        xb_seterr(err, "out of memory");
        goto fail;
    }
    q->d = d;
    q->cfg = c;
    q->cfg.rw = -1; /* no workload until xb_sg_queue_setup */
    q->abi = (enum xb_abi)c.abi;
    q->ring_size = xb_sg_ring_entries(c.abi, c.ring_pages);
    q->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->stop_fd < 0) {
        xb_seterr(err, "eventfd: %s", strerror(errno));
        q->cfg.evt_recv_fd = q->cfg.evt_send_fd = -1;
        xb_sg_queue_free(q);
        goto fail;
    }
    /* SHARED_RING_INIT: indexes zero, both event thresholds at 1; then grant it. */
    q->sring = sg_page(d, c.ring_frame);
    memset(q->sring, 0, (size_t)c.ring_pages * XB_PAGE_SIZE);
    struct xb_sring_header *h = (struct xb_sring_header *)q->sring;
    h->req_event = 1;
    h->rsp_event = 1;
    for (unsigned i = 0; i < c.ring_pages; i++)
        sg_grant(d, c.ring_ref + i, c.ring_frame + i, c.backend_domid, 0);
    return q;
fail:
    close_fd(&c.evt_recv_fd);
    close_fd(&c.evt_send_fd);
    return NULL;
}

/* A workload's config against the domain and the backend; returns the data pool pages it needs, 0 if refused. */
static uint64_t check_workload(const struct xb_sg_domain *d, const struct xb_sg_queue_config *c, char *err)
{
    if (c->rw > XB_SG_RW_TRIM) {
        xb_seterr(err, "unknown workload %d", c->rw);
        return 0;
    }
    uint64_t need = xb_sg_pool_pages(c, err);
    if (need == 0)
        return 0;
    if (need > c->pool_pages || c->pool_frame + c->pool_pages > d->mem_pages ||
        (uint64_t)c->pool_ref + c->pool_pages > d->gnttab_entries) {
        xb_seterr(err, "data pool of %llu pages does not fit (needs %llu)", (unsigned long long)c->pool_pages,
                (unsigned long long)need);
        return 0;
    }
    if (c->region_blocks == 0) {
        xb_seterr(err, "the disk is smaller than one block of %u bytes", c->bs);
        return 0;
    }
    if ((c->rw == XB_SG_RW_TRIM || c->discard_every) && !c->can_discard) {
        xb_seterr(err, "the backend does not offer discard");
        return 0;
    }
    if (c->flush_every && !c->can_flush) {
        xb_seterr(err, "the backend does not offer flush");
        return 0;
    }
    if (c->verify && c->region_blocks > (1ull << 28) && (c->rw == XB_SG_RW_RW || c->rw == XB_SG_RW_RANDRW)) {
        xb_seterr(err, "verifying a mixed workload over %llu blocks needs too much memory; use a larger bs",
                (unsigned long long)c->region_blocks);
        return 0;
    }
    return need;
}

int xb_sg_queue_setup(struct xb_sg_queue *q, const struct xb_sg_queue_config *cfg, char *err)
{
    struct xb_sg_domain *d = q->d;
    struct xb_sg_queue_config c = *cfg;
    if (q->slots || q->started) {
        xb_seterr(err, "queue already set up");
        return -1;
    }
    /* The ring half of the config stays what xb_sg_queue_new was given. */
    c.abi = q->cfg.abi;
    c.ring_pages = q->cfg.ring_pages;
    c.ring_frame = q->cfg.ring_frame;
    c.ring_ref = q->cfg.ring_ref;
    c.evt_recv_fd = q->cfg.evt_recv_fd;
    c.evt_send_fd = q->cfg.evt_send_fd;
    c.handle = q->cfg.handle;
    c.backend_domid = q->cfg.backend_domid;
    if (c.hostile < XB_SG_HOSTILE_NONE || c.hostile > XB_SG_HOSTILE_DISCARD_LOOP) {
        xb_seterr(err, "unknown hostile mode %d", c.hostile);
        return -1;
    }
    if (c.hostile && (c.verify || c.runtime_ns == 0)) {
        xb_seterr(err, "a hostile run needs a runtime and no verification");
        return -1;
    }
    if (c.rw < 0) {
        q->cfg = c;
        return 0;
    }
    uint64_t need = check_workload(d, &c, err);
    if (need == 0)
        return -1;
    unsigned dp, parts, ipp;
    geometry(&c, &dp, &parts, &ipp, err);
    struct slot *slots = calloc(c.iodepth, sizeof(*slots));
    unsigned *readbacks = calloc(c.iodepth, sizeof(*readbacks));
    unsigned *free_stack = calloc(c.iodepth, sizeof(*free_stack));
    int mixed = c.rw == XB_SG_RW_RW || c.rw == XB_SG_RW_RANDRW;
    uint16_t *gens = c.verify && mixed ? calloc(c.region_blocks, sizeof(*gens)) : NULL;
    int ok = slots && readbacks && free_stack && (gens || !(c.verify && mixed));
    for (unsigned i = 0; ok && i < c.iodepth; i++) {
        slots[i].page0 = (uint64_t)i * (dp + parts * ipp);
        slots[i].part_done = calloc(parts, 1);
        ok = slots[i].part_done != NULL;
    }
    if (!ok) {
        for (unsigned i = 0; slots && i < c.iodepth; i++)
            free(slots[i].part_done);
        free(slots);
        free(readbacks);
        free(free_stack);
        free(gens);
        xb_seterr(err, "out of memory");
        return -1;
    }
    q->cfg = c;
    q->data_pages = dp;
    q->parts = parts;
    q->ind_per_part = ipp;
    q->slot_pages = dp + parts * ipp;
    q->mixed = mixed;
    q->random = c.rw == XB_SG_RW_RANDREAD || c.rw == XB_SG_RW_RANDWRITE || c.rw == XB_SG_RW_RANDRW;
    q->verify_gens = gens != NULL;
    q->slots = slots;
    q->readbacks = readbacks;
    q->free_stack = free_stack;
    for (unsigned i = 0; i < c.iodepth; i++) /* slot 0 on top */
        free_stack[i] = c.iodepth - 1 - i;
    q->nfree = c.iodepth;
    q->gens = gens;
    if (c.persistent) /* granted once, writable, reused by every request */
        for (uint64_t i = 0; i < need; i++)
            sg_grant(d, c.pool_ref + (uint32_t)i, c.pool_frame + i, c.backend_domid, 0);
    return 0;
}

/* Sleep until the backend notifies us, stop is asked for, or timeout_ms passes (-1: no timeout). */
void sg_wait(struct xb_sg_queue *q, int64_t timeout_ms)
{
    struct pollfd pfd[2] = {{.fd = q->cfg.evt_recv_fd, .events = POLLIN}, {.fd = q->stop_fd, .events = POLLIN}};
    q->st.wakeups++;
    int r = poll(pfd, 2, timeout_ms > 60000 ? 60000 : (int)timeout_ms);
    if (r < 0 && errno != EINTR) {
        sg_fail(q, "poll: %s", strerror(errno));
        __atomic_store_n(&q->abort_requested, 1, __ATOMIC_RELAXED);
        return;
    }
    uint64_t v;
    if (r > 0 && (pfd[0].revents & POLLIN))
        (void)!read(q->cfg.evt_recv_fd, &v, sizeof(v));
}

static void wait_for_backend(struct xb_sg_queue *q)
{
    uint64_t now = now_ns();
    int64_t timeout_ms = -1;
    if (q->inflight && q->cfg.io_timeout_ns) {
        uint64_t until = q->last_progress_ns + q->cfg.io_timeout_ns;
        if (now >= until) {
            sg_fail(q, "no response from the backend for %.1f s with %u I/Os in flight",
                 (double)q->cfg.io_timeout_ns / 1e9, q->inflight);
            __atomic_store_n(&q->abort_requested, 1, __ATOMIC_RELAXED);
            return;
        }
        timeout_ms = (int64_t)((until - now) / 1000000u) + 1;
    }
    if (!q->draining && q->cfg.runtime_ns && q->deadline_ns > now) {
        int64_t t = (int64_t)((q->deadline_ns - now) / 1000000u) + 1;
        if (timeout_ms < 0 || t < timeout_ms)
            timeout_ms = t;
    }
    sg_wait(q, timeout_ms);
}

static void *queue_main(void *arg)
{
    struct xb_sg_queue *q = arg;
    q->st.start_ns = q->last_progress_ns = now_ns();
    q->deadline_ns = q->st.start_ns + q->cfg.runtime_ns;
    if (q->cfg.hostile && q->cfg.hostile != XB_SG_HOSTILE_REVOKE && q->cfg.hostile != XB_SG_HOSTILE_REWRITE) {
        sg_hostile_run(q);
        q->st.end_ns = now_ns();
        return NULL;
    }
    struct sg_rewriter *rw = q->cfg.hostile == XB_SG_HOSTILE_REWRITE ? sg_rewriter_start(q) : NULL;
    for (;;) {
        if (__atomic_load_n(&q->stop_requested, __ATOMIC_RELAXED))
            q->draining = 1;
        if (__atomic_load_n(&q->abort_requested, __ATOMIC_RELAXED))
            break;
        if (q->cfg.rw >= 0)
            sg_fill(q);
        int got = sg_consume(q);
        if (got < 0)
            break;
        uint64_t now = now_ns();
        int more = q->cfg.rw >= 0 && (sg_work_left(q, now) || q->flush_pending || q->nreadbacks);
        if (!q->inflight && (!more || q->draining))
            break;
        if (got > 0)
            continue;
        wait_for_backend(q);
    }
    sg_rewriter_stop(rw);
    q->st.end_ns = now_ns();
    return NULL;
}

int xb_sg_queue_start(struct xb_sg_queue *q, char *err)
{
    if (q->started) {
        xb_seterr(err, "queue already started");
        return -1;
    }
    if (q->cfg.rw >= 0 && !q->slots) {
        xb_seterr(err, "queue has no workload (xb_sg_queue_setup)");
        return -1;
    }
    int rc = pthread_create(&q->thread, NULL, queue_main, q);
    if (rc) {
        xb_seterr(err, "pthread_create: %s", strerror(rc));
        return -1;
    }
    q->started = 1;
    return 0;
}

int xb_sg_queue_join(struct xb_sg_queue *q)
{
    if (q->started && !q->joined) {
        pthread_join(q->thread, NULL);
        q->joined = 1;
    }
    return q->st.failed ? -1 : 0;
}

void xb_sg_queue_stop(struct xb_sg_queue *q, int abort)
{
    __atomic_store_n(abort ? &q->abort_requested : &q->stop_requested, 1, __ATOMIC_RELAXED);
    uint64_t one = 1;
    (void)!write(q->stop_fd, &one, sizeof(one));
}

void xb_sg_queue_stats(struct xb_sg_queue *q, struct xb_sg_stats *out)
{
    *out = q->st;
}

void xb_sg_queue_free(struct xb_sg_queue *q)
{
    if (!q)
        return;
    if (q->started && !q->joined) {
        xb_sg_queue_stop(q, 1);
        xb_sg_queue_join(q);
    }
    if (q->sring)
        for (unsigned i = 0; i < q->cfg.ring_pages; i++)
            sg_revoke(q->d, q->cfg.ring_ref + i);
    if (q->slots)
        for (uint64_t i = 0; i < (uint64_t)q->cfg.iodepth * q->slot_pages; i++)
            sg_revoke(q->d, q->cfg.pool_ref + (uint32_t)i);
    if (q->slots)
        for (unsigned i = 0; i < q->cfg.iodepth; i++)
            free(q->slots[i].part_done);
    free(q->slots);
    free(q->readbacks);
    free(q->free_stack);
    free(q->gens);
    close_fd(&q->stop_fd);
    close_fd(&q->cfg.evt_recv_fd);
    close_fd(&q->cfg.evt_send_fd);
    free(q);
}
