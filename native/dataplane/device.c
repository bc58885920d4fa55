/* Devices and their queues as the control plane drives them (xb_dataplane.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include "journal.h"
#include "qos.h"
#include "queue.h"
#include "slowpath.h"

struct xb_device *xb_device_new(struct xb_platform *p, struct xb_image *img, const struct xb_device_config *cfg,
                                char *err)
{
    if (!p || !img || !cfg) {
        xb_seterr(err, "device: missing platform, image or config");
        return NULL;
    }
    if (cfg->abi != XB_ABI_X86_64 && cfg->abi != XB_ABI_X86_32) {
        xb_seterr(err, "device %u: unknown ABI %d", cfg->handle, (int)cfg->abi);
        return NULL;
    }
    if (cfg->ring_pages < 1 || cfg->ring_pages > XB_MAX_RING_PAGES || (cfg->ring_pages & (cfg->ring_pages - 1))) {
        xb_seterr(err, "device %u: ring of %u pages (allowed: a power of two, 1..%u)", cfg->handle, cfg->ring_pages,
               XB_MAX_RING_PAGES);
        return NULL;
    }
    if (cfg->nr_queues < 1 || cfg->nr_queues > XB_MAX_QUEUES) {
        xb_seterr(err, "device %u: %u queues (allowed 1..%u)", cfg->handle, cfg->nr_queues, XB_MAX_QUEUES);
        return NULL;
    }
    if (cfg->max_indirect_segments > XB_MAX_INDIRECT_SEGMENTS) {
        xb_seterr(err, "device %u: max_indirect_segments %u (allowed 0..%u)", cfg->handle, cfg->max_indirect_segments,
               XB_MAX_INDIRECT_SEGMENTS);
        return NULL;
    }
    if (cfg->max_persistent_grants > XB_MAX_PERSISTENT_GRANTS) {
        xb_seterr(err, "device %u: max_persistent_grants %u (allowed 0..%u)", cfg->handle, cfg->max_persistent_grants,
                  XB_MAX_PERSISTENT_GRANTS);
        return NULL;
    }
    uint32_t lb = img->logical_block >> XB_SECTOR_SHIFT;
    if (lb == 0 || (lb & (lb - 1)) || lb > XB_PAGE_SIZE >> XB_SECTOR_SHIFT) {
        xb_seterr(err, "device %u: unsupported logical block size %u", cfg->handle, img->logical_block);
        return NULL;
    }
    struct xb_device *d = calloc(1, sizeof(*d));
    if (!d) {
        xb_seterr(err, "device %u: out of memory", cfg->handle);
        return NULL;
    }
    d->fail_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->fail_fd < 0) {
        xb_seterr(err, "device %u: eventfd: %s", cfg->handle, strerror(errno));
        free(d);
        return NULL;
    }
    d->p = p;
    d->img = img;
    d->cfg = *cfg;
    d->max_work = cfg->max_work_per_wake ? cfg->max_work_per_wake : XB_DEFAULT_WORK_PER_WAKE;
    d->lim.size_sectors = img->size >> XB_SECTOR_SHIFT;
    d->lim.logical_sectors = lb;
    d->lim.max_indirect_segments = cfg->max_indirect_segments;
    d->lim.readonly = cfg->readonly || (img->caps & XB_CAP_READONLY);
    d->lim.secure_discard = cfg->secure_discard && (img->caps & XB_CAP_SECURE_DISCARD);
    d->lim.can_flush = (img->caps & XB_CAP_FLUSH) != 0;
    d->lim.can_discard = (img->caps & XB_CAP_DISCARD) != 0;
    pthread_mutex_init(&d->lock, NULL);
    pthread_mutex_init(&d->pool.mu, NULL);
    pthread_cond_init(&d->pool.cv, NULL);
    for (unsigned i = 0; i < XB_MAX_QUEUES; i++) {
        d->q[i].dev = d;
        d->q[i].idx = i;
        d->q[i].cq_fd = -1;
        d->q[i].stop_fd = -1;
        d->q[i].slow_fd = -1;
        d->q[i].qos_timer = -1;
        pthread_mutex_init(&d->q[i].done_mu, NULL);
    }
    return d;
}

/* Undo what queue_setup did (the thread is not running). */
static void queue_teardown(struct xb_queue *q)
{
    struct xb_device *d = q->dev;
    if (q->uring_ok) {
        io_uring_queue_exit(&q->uring);
        q->uring_ok = 0;
    }
    if (q->cq_fd >= 0)
        close(q->cq_fd);
    if (q->stop_fd >= 0)
        close(q->stop_fd);
    if (q->slow_fd >= 0)
        close(q->slow_fd);
    if (q->qos_timer >= 0)
        close(q->qos_timer);
    q->cq_fd = q->stop_fd = q->slow_fd = q->qos_timer = -1;
    if (q->reqs) {
        for (uint32_t i = 0; i < q->ring_size; i++)
            free(q->reqs[i].buf);
        free(q->reqs);
        q->reqs = NULL;
    }
    free(q->indirect_buf);
    q->indirect_buf = NULL;
    xb_pgnt_destroy(q); /* disconnect: every persistent grant unmapped */
    if (q->ring_map)
        xb_grant_unmap(d->p, q->ring_map);
    q->ring_map = NULL;
    q->sring = NULL;
    xb_journal_detach(q); /* journal hook: the file stays (xenblk removes it once the device closed) */
    /* The channel stays the caller's (xenblk.dataplane closes it after the stop, telling the sim broker). */
    q->ch = NULL;
}

/* A freshly mapped ring: continue from the responses already published, nothing in flight yet. */
static void queue_reset(struct xb_device *d, struct xb_queue *q, unsigned nrefs)
{
    q->ring_size = xb_ring_size(d->cfg.abi, nrefs);
    /* BACK_RING_ATTACH: continue from the responses already published (a fresh ring has 0). */
    q->rsp_prod_pvt = __atomic_load_n(&q->sring->rsp_prod, __ATOMIC_ACQUIRE);
    q->req_cons = q->rsp_prod_pvt;
    q->in_flight = 0;
    q->barrier = NULL;
    q->mem_used = q->mem_cached = 0;
    q->mem_wait = q->mem_wait_tail = NULL;
    q->mem_released = 0;
    q->qos_wait = q->qos_wait_tail = NULL;
    q->qos_waiting = q->qos_mask = 0;
    /* The device's budget split between its queues, never below one largest request per
     * queue (else such a request could never run). */
    uint64_t budget = d->cfg.memory_budget ? d->cfg.memory_budget : XB_DEFAULT_MEMORY_BUDGET;
    unsigned segs = d->cfg.max_indirect_segments > XB_MAX_SEGMENTS_PER_REQUEST ? d->cfg.max_indirect_segments
                                                                              : XB_MAX_SEGMENTS_PER_REQUEST;
    uint64_t per = budget / d->cfg.nr_queues, biggest = (uint64_t)segs * XB_PAGE_SIZE;
    q->mem_limit = (size_t)(per > biggest ? per : biggest);
}

/* The request slots (one per ring entry, all on the free list), the indirect page buffer and the eventfds. */
static int queue_alloc(struct xb_device *d, struct xb_queue *q, unsigned qi, char *err)
{
    q->reqs = calloc(q->ring_size, sizeof(*q->reqs));
    if (posix_memalign((void **)&q->indirect_buf, XB_PAGE_SIZE,
                       (size_t)XB_MAX_INDIRECT_PAGES_PER_REQUEST * XB_PAGE_SIZE) != 0)
        q->indirect_buf = NULL;
    q->cq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->slow_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->qos_timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    q->slow_done = NULL;
    if (!q->reqs || !q->indirect_buf || q->cq_fd < 0 || q->stop_fd < 0 || q->slow_fd < 0 || q->qos_timer < 0) {
        xb_seterr(err, "device %u queue %u: out of memory or file descriptors", d->cfg.handle, qi);
        return -1;
    }
    if (d->cfg.feature_persistent) {
        unsigned cap = d->cfg.max_persistent_grants ? d->cfg.max_persistent_grants : XB_DEFAULT_PERSISTENT_GRANTS;
        if (xb_pgnt_init(&q->pgnt, cap) < 0) {
            xb_seterr(err, "device %u queue %u: out of memory", d->cfg.handle, qi);
            return -1;
        }
    }
    q->free_reqs = NULL;
    for (uint32_t i = q->ring_size; i-- > 0;) {
        q->reqs[i].q = q;
        q->reqs[i].next_free = q->free_reqs;
        q->free_reqs = &q->reqs[i];
    }
    return 0;
}

/* The queue's io_uring, its completions signalled on cq_fd; none (uring_ok 0) where io_uring is disabled. */
static int queue_uring_init(struct xb_device *d, struct xb_queue *q, unsigned qi, char *err)
{
    /* Room in the completion queue for every extent of every request the ring can hold, so
     * completions never overflow into the kernel's backlog. */
    unsigned cq = 4 * XB_URING_ENTRIES;
    while (cq < q->ring_size * XB_MAX_EXTENTS)
        cq *= 2;
    struct io_uring_params params;
    memset(&params, 0, sizeof(params));
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = cq;
    int urc = io_uring_queue_init_params(XB_URING_ENTRIES, &q->uring, &params);
    if (urc == -ENOSYS || urc == -EPERM) {
        /* io_uring disabled (kernel.io_uring_disabled, seccomp): every request takes the synchronous path. */
        q->uring_ok = 0;
        return 0;
    }
    if (urc < 0) {
        xb_seterr(err, "device %u queue %u: io_uring setup failed: %s", d->cfg.handle, qi, strerror(-urc));
        return -1;
    }
    q->uring_ok = 1;
    urc = io_uring_register_eventfd(&q->uring, q->cq_fd);
    if (urc < 0) {
        xb_seterr(err, "device %u queue %u: io_uring eventfd: %s", d->cfg.handle, qi, strerror(-urc));
        return -1;
    }
    return 0;
}

int xb_device_start_queue(struct xb_device *d, unsigned qi, const xb_grant_ref_t *refs, unsigned nrefs,
                          struct xb_evtchn *ch, char *err)
{
    pthread_mutex_lock(&d->lock);
    int rc = -1;
    if (d->stopped) {
        xb_seterr(err, "device %u: stopped", d->cfg.handle);
        goto out;
    }
    if (qi >= d->cfg.nr_queues || d->q[qi].started) {
        xb_seterr(err, "device %u: queue %u %s", d->cfg.handle, qi,
               qi >= d->cfg.nr_queues ? "does not exist" : "already started");
        goto out;
    }
    if (nrefs != d->cfg.ring_pages) {
        xb_seterr(err, "device %u queue %u: %u ring refs for a ring of %u pages", d->cfg.handle, qi, nrefs,
               d->cfg.ring_pages);
        goto out;
    }
    struct xb_queue *q = &d->q[qi];
    char merr[XB_ERRLEN] = "";
    q->sring = xb_grant_map(d->p, d->cfg.domid, refs, nrefs, 1, &q->ring_map, merr);
    if (!q->sring) {
        __atomic_store_n(&q->stats.grant_map_failures, q->stats.grant_map_failures + 1, __ATOMIC_RELAXED);
        xb_seterr(err, "device %u queue %u: cannot map the ring: %s", d->cfg.handle, qi, merr);
        goto out;
    }
    queue_reset(d, q, nrefs);
    if (queue_alloc(d, q, qi, err) < 0)
        goto fail;
    /* journal hook: a resumed ring continues from the journal's indexes (journal.c) */
    if (xb_journal_attach(q, err) < 0)
        goto fail;
    if (queue_uring_init(d, q, qi, err) < 0)
        goto fail;
    int wrc = xb_pool_start(&d->pool);
    if (wrc < 0) {
        xb_seterr(err, "device %u queue %u: cannot start storage workers: %s", d->cfg.handle, qi, strerror(-wrc));
        goto fail;
    }
    q->ch = ch;
    __atomic_store_n(&q->stopping, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&q->failed, 0, __ATOMIC_RELAXED);
    int prc = pthread_create(&q->thread, NULL, xb_queue_main, q);
    if (prc != 0) {
        xb_seterr(err, "device %u queue %u: cannot start thread: %s", d->cfg.handle, qi, strerror(prc));
        goto fail;
    }
    q->started = 1;
    rc = 0;
    goto out;
fail:
    queue_teardown(q);
out:
    pthread_mutex_unlock(&d->lock);
    return rc;
}

int xb_device_stop(struct xb_device *d)
{
    pthread_mutex_lock(&d->lock);
    if (d->stopped) {
        pthread_mutex_unlock(&d->lock);
        return 0;
    }
    d->stopped = 1;
    for (unsigned i = 0; i < d->cfg.nr_queues; i++) {
        struct xb_queue *q = &d->q[i];
        if (!q->started)
            continue;
        __atomic_store_n(&q->stopping, 1, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(q->stop_fd, &one, sizeof(one)) < 0) {
            /* an eventfd write only fails on counter overflow; the flag is set and the thread polls again */
        }
    }
    for (unsigned i = 0; i < d->cfg.nr_queues; i++) {
        struct xb_queue *q = &d->q[i];
        if (!q->started)
            continue;
        pthread_join(q->thread, NULL);
        q->started = 0;
        queue_teardown(q);
    }
    /* Every queue has drained, so no worker holds a request any more. */
    xb_pool_stop(&d->pool);
    pthread_mutex_unlock(&d->lock);
    return 0;
}

void xb_device_free(struct xb_device *d)
{
    if (!d)
        return;
    xb_device_stop(d);
    pthread_mutex_destroy(&d->lock);
    pthread_mutex_destroy(&d->pool.mu);
    pthread_cond_destroy(&d->pool.cv);
    for (unsigned i = 0; i < XB_MAX_QUEUES; i++) {
        pthread_mutex_destroy(&d->q[i].done_mu);
        xb_journal_detach(&d->q[i]); /* journal hook: set but never started */
    }
    close(d->fail_fd);
    xb_qos_unref(d->qos[0]);
    xb_qos_unref(d->qos[1]);
    free(d);
}

int xb_device_set_qos(struct xb_device *d, struct xb_qos *disk, struct xb_qos *group, char *err)
{
    pthread_mutex_lock(&d->lock);
    for (unsigned i = 0; i < d->cfg.nr_queues; i++)
        if (d->q[i].started || d->stopped) {
            /* queue threads read d->qos without a lock: it is fixed while they run */
            pthread_mutex_unlock(&d->lock);
            xb_seterr(err, "device %u: QoS limiters are set before the queues start", d->cfg.handle);
            return -EBUSY;
        }
    struct xb_qos *set[2] = {disk, group};
    for (unsigned i = 0; i < 2; i++) {
        if (set[i])
            xb_qos_ref(set[i]);
        xb_qos_unref(d->qos[i]);
        d->qos[i] = set[i];
    }
    pthread_mutex_unlock(&d->lock);
    return 0;
}

void xb_device_qos_changed(struct xb_device *d)
{
    /* The queues' eventfds stay open while the lock is held. Held by someone else means a start or a stop
     * in progress: a stop drains without limits, and the control plane tells a device of changes only
     * once its queues are started, so nothing waits on a missed wake-up; never block the caller on a drain. */
    if (pthread_mutex_trylock(&d->lock) != 0)
        return;
    uint64_t one = 1;
    for (unsigned i = 0; i < d->cfg.nr_queues; i++)
        if (d->q[i].started && write(d->q[i].slow_fd, &one, sizeof(one)) < 0) {
            /* only on counter overflow: the thread is due to wake anyway */
        }
    pthread_mutex_unlock(&d->lock);
}

int xb_device_get_stats(struct xb_device *d, unsigned qi, struct xb_queue_stats *out)
{
    if (qi >= d->cfg.nr_queues)
        return -EINVAL;
    const uint64_t *src = (const uint64_t *)&d->q[qi].stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    return 0;
}

int xb_device_queue_failed(struct xb_device *d, unsigned qi, char *err)
{
    if (qi >= d->cfg.nr_queues)
        return 0;
    if (!__atomic_load_n(&d->q[qi].failed, __ATOMIC_ACQUIRE))
        return 0;
    xb_seterr(err, "%s", d->q[qi].fail_msg);
    return 1;
}

int xb_device_fail_fd(struct xb_device *d)
{
    return d->fail_fd;
}

void xb_device_set_size(struct xb_device *d, uint64_t bytes)
{
    __atomic_store_n(&d->lim.size_sectors, bytes >> XB_SECTOR_SHIFT, __ATOMIC_RELAXED);
}

_Static_assert(sizeof(struct xb_queue_stats) % sizeof(uint64_t) == 0, "stats are read as an array of uint64_t");
