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
#include "sg_int.h"

enum slot_kind { K_READ, K_WRITE, K_FLUSH, K_DISCARD };

#define RECENT 1024

struct slot {
    int busy;
    int kind;            /* enum slot_kind */
    int readback;        /* a READ checking the WRITE this slot just did */
    int pending_readback;
    uint64_t block;      /* absolute block number (units of bs) */
    uint32_t gen;        /* written / expected generation; 0 = content unknown, not checked */
    unsigned nparts, parts_left;
    int16_t status;      /* first non-OK status of a part */
    uint64_t t0;
    uint64_t page0;      /* first pool page index of this slot */
    uint8_t *part_done;
};

struct xb_sg_queue {
    struct xb_sg_domain *d;
    struct xb_sg_queue_config cfg;
    enum xb_abi abi;
    uint8_t *sring;
    uint32_t ring_size;
    uint32_t req_prod_pvt, rsp_cons;
    unsigned data_pages;     /* pages holding one I/O's data */
    unsigned parts;          /* ring requests per read/write I/O */
    unsigned ind_per_part;   /* indirect pages per request */
    unsigned slot_pages;
    int mixed, random, verify_gens;
    struct slot *slots;
    unsigned *readbacks;     /* slots waiting to issue their read-back */
    unsigned nreadbacks;
    uint16_t *gens;          /* per block of the region: the generation last written (mixed + verify) */
    uint64_t recent[RECENT]; /* blocks written lately (mixed + verify): where reads go, to check them */
    unsigned recent_n, recent_pos;
    struct sg_perm perm;
    uint64_t perm_pass;
    uint64_t issued;         /* workload I/Os issued (not read-backs, flushes) */
    uint64_t writes_issued;
    int flush_pending;
    unsigned inflight;
    uint64_t deadline_ns;
    uint64_t last_progress_ns;
    int stop_fd;
    int stop_requested, abort_requested; /* atomics */
    int draining;
    pthread_t thread;
    int started, joined;
    struct xb_sg_stats st;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

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
        sg_errf(err, "block size %u must be a multiple of 512 up to %u", c->bs, XB_SG_MAX_BS);
        return -1;
    }
    if (c->sector_size == 0 || c->bs % c->sector_size) {
        sg_errf(err, "block size %u is not a multiple of the disk's sector size %u", c->bs, c->sector_size);
        return -1;
    }
    unsigned max_segs = c->max_segs;
    if (max_segs == 0 || (!c->use_indirect && max_segs > XB_MAX_SEGMENTS_PER_REQUEST) ||
        max_segs > XB_MAX_INDIRECT_PAGES_PER_REQUEST * XB_SEGS_PER_INDIRECT_FRAME) {
        sg_errf(err, "bad segment limit %u", max_segs);
        return -1;
    }
    *dp = div_up(c->bs, XB_PAGE_SIZE);
    *parts = div_up(*dp, max_segs);
    unsigned per = *dp < max_segs ? *dp : max_segs;
    *ipp = c->use_indirect ? div_up(per, XB_SEGS_PER_INDIRECT_FRAME) : 0;
    uint32_t ring = xb_sg_ring_entries(c->abi, c->ring_pages);
    if (*parts > ring) {
        sg_errf(err, "block size %u needs %u requests per I/O, more than the ring's %u entries", c->bs, *parts, ring);
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
        sg_errf(err, "queue depth %u out of 1..%u", c->iodepth, XB_SG_MAX_IODEPTH);
        return 0;
    }
    return (uint64_t)c->iodepth * (dp + (uint64_t)parts * ipp);
}

static int is_read_mode(int rw)
{
    return rw == XB_SG_RW_READ || rw == XB_SG_RW_RANDREAD;
}

struct xb_sg_queue *xb_sg_queue_new(struct xb_sg_domain *d, const struct xb_sg_queue_config *cfg, char *err)
{
    struct xb_sg_queue_config c = *cfg;
    struct xb_sg_queue *q = NULL;
    if (c.ring_pages == 0 || c.ring_pages > XB_MAX_RING_PAGES || (c.ring_pages & (c.ring_pages - 1))) {
        sg_errf(err, "ring of %u pages: must be a power of two up to %u", c.ring_pages, XB_MAX_RING_PAGES);
        goto fail;
    }
    if (c.abi != XB_ABI_X86_64 && c.abi != XB_ABI_X86_32) {
        sg_errf(err, "unknown ABI %d", c.abi);
        goto fail;
    }
    if (c.ring_frame + c.ring_pages > d->mem_pages || (uint64_t)c.ring_ref + c.ring_pages > d->gnttab_entries) {
        sg_errf(err, "ring pages or grant refs beyond the domain's memory or grant table");
        goto fail;
    }
    q = calloc(1, sizeof(*q));
    if (!q) {
        sg_errf(err, "out of memory");
        goto fail;
    }
    q->d = d;
    q->cfg = c;
    q->cfg.rw = -1; /* no workload until xb_sg_queue_setup */
    q->abi = (enum xb_abi)c.abi;
    q->ring_size = xb_sg_ring_entries(c.abi, c.ring_pages);
    q->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->stop_fd < 0) {
        sg_errf(err, "eventfd: %s", strerror(errno));
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

int xb_sg_queue_setup(struct xb_sg_queue *q, const struct xb_sg_queue_config *cfg, char *err)
{
    struct xb_sg_domain *d = q->d;
    struct xb_sg_queue_config c = *cfg;
    if (q->slots || q->started) {
        sg_errf(err, "queue already set up");
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
    if (c.hostile != 0) {
        sg_errf(err, "hostile modes are not implemented");
        return -1;
    }
    if (c.rw < 0) {
        q->cfg = c;
        return 0;
    }
    if (c.rw > XB_SG_RW_TRIM) {
        sg_errf(err, "unknown workload %d", c.rw);
        return -1;
    }
    uint64_t need = xb_sg_pool_pages(&c, err);
    if (need == 0)
        return -1;
    if (need > c.pool_pages || c.pool_frame + c.pool_pages > d->mem_pages ||
        (uint64_t)c.pool_ref + c.pool_pages > d->gnttab_entries) {
        sg_errf(err, "data pool of %llu pages does not fit (needs %llu)", (unsigned long long)c.pool_pages,
                (unsigned long long)need);
        return -1;
    }
    if (c.region_blocks == 0) {
        sg_errf(err, "the disk is smaller than one block of %u bytes", c.bs);
        return -1;
    }
    if ((c.rw == XB_SG_RW_TRIM || c.discard_every) && !c.can_discard) {
        sg_errf(err, "the backend does not offer discard");
        return -1;
    }
    if (c.flush_every && !c.can_flush) {
        sg_errf(err, "the backend does not offer flush");
        return -1;
    }
    if (c.verify && c.region_blocks > (1ull << 28) && (c.rw == XB_SG_RW_RW || c.rw == XB_SG_RW_RANDRW)) {
        sg_errf(err, "verifying a mixed workload over %llu blocks needs too much memory; use a larger bs",
                (unsigned long long)c.region_blocks);
        return -1;
    }
    unsigned dp, parts, ipp;
    geometry(&c, &dp, &parts, &ipp, err);
    struct slot *slots = calloc(c.iodepth, sizeof(*slots));
    unsigned *readbacks = calloc(c.iodepth, sizeof(*readbacks));
    int mixed = c.rw == XB_SG_RW_RW || c.rw == XB_SG_RW_RANDRW;
    uint16_t *gens = c.verify && mixed ? calloc(c.region_blocks, sizeof(*gens)) : NULL;
    int ok = slots && readbacks && (gens || !(c.verify && mixed));
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
        free(gens);
        sg_errf(err, "out of memory");
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
    q->gens = gens;
    if (c.persistent) /* granted once, writable, reused by every request */
        for (uint64_t i = 0; i < need; i++)
            sg_grant(d, c.pool_ref + (uint32_t)i, c.pool_frame + i, c.backend_domid, 0);
    return 0;
}

/* ---- the ring ---- */

static struct xb_sring_header *hdr(struct xb_sg_queue *q)
{
    return (struct xb_sring_header *)q->sring;
}

static uint32_t ring_free(struct xb_sg_queue *q)
{
    return q->ring_size - (q->req_prod_pvt - q->rsp_cons);
}

static uint32_t slot_ref(struct xb_sg_queue *q, const struct slot *s, unsigned page)
{
    return q->cfg.pool_ref + (uint32_t)(s->page0 + page);
}

static uint64_t slot_frame(struct xb_sg_queue *q, const struct slot *s, unsigned page)
{
    return q->cfg.pool_frame + s->page0 + page;
}

static uint8_t *slot_buf(struct xb_sg_queue *q, const struct slot *s)
{
    return sg_page(q->d, slot_frame(q, s, 0));
}

static void put_request(struct xb_sg_queue *q, const void *req)
{
    memcpy(xb_ring_entry(q->sring, q->abi, q->req_prod_pvt, q->ring_size), req, xb_ring_entry_size(q->abi));
    q->req_prod_pvt++;
    q->st.requests++;
}

static void fill_segments(struct xb_sg_queue *q, struct slot *s, unsigned first_page, unsigned n,
                          struct xb_blkif_segment *seg)
{
    for (unsigned i = 0; i < n; i++) {
        unsigned page = first_page + i;
        uint64_t start = (uint64_t)page * XB_PAGE_SIZE;
        uint64_t len = q->cfg.bs - start < XB_PAGE_SIZE ? q->cfg.bs - start : XB_PAGE_SIZE;
        seg[i].gref = slot_ref(q, s, page);
        seg[i].first_sect = 0;
        seg[i].last_sect = (uint8_t)(len / 512 - 1);
        seg[i]._pad = 0;
    }
}

/* One read or write part: `n` data pages from `first_page`, direct or through indirect pages. */
static void push_rw(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx, unsigned part)
{
    unsigned per = q->cfg.max_segs;
    unsigned first_page = part * per;
    unsigned n = q->data_pages - first_page < per ? q->data_pages - first_page : per;
    uint8_t op = s->kind == K_WRITE ? XB_OP_WRITE : XB_OP_READ;
    uint64_t id = (uint64_t)slot_idx << 16 | part;
    uint64_t sector = (s->block * q->cfg.bs + (uint64_t)first_page * XB_PAGE_SIZE) >> XB_SECTOR_SHIFT;
    if (!q->cfg.persistent)
        for (unsigned i = 0; i < n; i++)
            sg_grant(q->d, slot_ref(q, s, first_page + i), slot_frame(q, s, first_page + i), q->cfg.backend_domid,
                         op == XB_OP_WRITE);
    uint8_t req[112] = {0};
    if (q->cfg.use_indirect) {
        unsigned ind0 = q->data_pages + part * q->ind_per_part;
        for (unsigned i = 0; i < q->ind_per_part; i++) {
            struct xb_blkif_segment *segs = sg_page(q->d, slot_frame(q, s, ind0 + i));
            unsigned from = i * XB_SEGS_PER_INDIRECT_FRAME;
            unsigned cnt = n - from < XB_SEGS_PER_INDIRECT_FRAME ? n - from : XB_SEGS_PER_INDIRECT_FRAME;
            fill_segments(q, s, first_page + from, cnt, segs);
            if (!q->cfg.persistent)
                sg_grant(q->d, slot_ref(q, s, ind0 + i), slot_frame(q, s, ind0 + i), q->cfg.backend_domid, 1);
        }
        if (q->abi == XB_ABI_X86_64) {
            struct xb_blkif_x86_64_request_indirect *r = (void *)req;
            r->operation = XB_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)n;
            r->id = id;
            r->sector_number = sector;
            r->handle = q->cfg.handle;
            for (unsigned i = 0; i < q->ind_per_part; i++)
                r->indirect_grefs[i] = slot_ref(q, s, ind0 + i);
        } else {
            struct xb_blkif_x86_32_request_indirect *r = (void *)req;
            r->operation = XB_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)n;
            r->id = id;
            r->sector_number = sector;
            r->handle = q->cfg.handle;
            for (unsigned i = 0; i < q->ind_per_part; i++)
                r->indirect_grefs[i] = slot_ref(q, s, ind0 + i);
        }
    } else if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw *r = (void *)req;
        r->operation = op;
        r->nr_segments = (uint8_t)n;
        r->handle = q->cfg.handle;
        r->id = id;
        r->sector_number = sector;
        fill_segments(q, s, first_page, n, r->seg);
    } else {
        struct xb_blkif_x86_32_request_rw *r = (void *)req;
        r->operation = op;
        r->nr_segments = (uint8_t)n;
        r->handle = q->cfg.handle;
        r->id = id;
        r->sector_number = sector;
        fill_segments(q, s, first_page, n, r->seg);
    }
    put_request(q, req);
}

static void push_flush(struct xb_sg_queue *q, unsigned slot_idx)
{
    /* Like blkfront: a FLUSH_DISKCACHE is a read/write request without segments. */
    uint8_t req[112] = {0};
    if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw *r = (void *)req;
        r->operation = XB_OP_FLUSH_DISKCACHE;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
    } else {
        struct xb_blkif_x86_32_request_rw *r = (void *)req;
        r->operation = XB_OP_FLUSH_DISKCACHE;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
    }
    put_request(q, req);
}

static void push_discard(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx)
{
    uint8_t req[112] = {0};
    uint64_t sector = s->block * q->cfg.bs >> XB_SECTOR_SHIFT, n = q->cfg.bs >> XB_SECTOR_SHIFT;
    if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_discard *r = (void *)req;
        r->operation = XB_OP_DISCARD;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
        r->sector_number = sector;
        r->nr_sectors = n;
    } else {
        struct xb_blkif_x86_32_request_discard *r = (void *)req;
        r->operation = XB_OP_DISCARD;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
        r->sector_number = sector;
        r->nr_sectors = n;
    }
    put_request(q, req);
}

/* Returns 1 if notified. RING_PUSH_REQUESTS_AND_CHECK_NOTIFY. */
static void publish(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    uint32_t old = __atomic_load_n(&h->req_prod, __ATOMIC_RELAXED), new = q->req_prod_pvt;
    if (old == new)
        return;
    __atomic_store_n(&h->req_prod, new, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = __atomic_load_n(&h->req_event, __ATOMIC_RELAXED);
    if ((uint32_t)(new - ev) < (uint32_t)(new - old)) {
        uint64_t one = 1;
        if (write(q->cfg.evt_send_fd, &one, sizeof(one)) == sizeof(one))
            q->st.notifies++;
    }
}

/* ---- the workload ---- */

static void fail(struct xb_sg_queue *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct xb_sg_queue *q, const char *fmt, ...)
{
    if (!q->st.failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(q->st.error, sizeof(q->st.error), fmt, ap);
        va_end(ap);
    }
    q->st.failed = 1;
    q->draining = 1;
}

static int work_left(struct xb_sg_queue *q, uint64_t now)
{
    if (q->draining)
        return 0;
    if (q->cfg.total_ios && q->issued >= q->cfg.total_ios)
        return 0;
    if (q->cfg.runtime_ns && now >= q->deadline_ns)
        return 0;
    return 1;
}

static uint64_t block_of(struct xb_sg_queue *q, uint64_t k)
{
    uint64_t n = q->cfg.region_blocks, pass = k / n, i = k % n;
    if (!q->random)
        return q->cfg.region_start + i;
    if (pass != q->perm_pass || q->perm.n == 0) {
        sg_perm_init(&q->perm, n, q->cfg.seed ^ sg_mix64(pass + 0x5157));
        q->perm_pass = pass;
    }
    return q->cfg.region_start + sg_perm_apply(&q->perm, i);
}

static int block_busy(struct xb_sg_queue *q, uint64_t block)
{
    for (unsigned i = 0; i < q->cfg.iodepth; i++) {
        struct slot *s = &q->slots[i];
        if ((s->busy || s->pending_readback) && (s->kind == K_READ || s->kind == K_WRITE || s->kind == K_DISCARD) &&
            s->block == block)
            return 1;
    }
    return 0;
}

static int free_slot(struct xb_sg_queue *q)
{
    for (unsigned i = 0; i < q->cfg.iodepth; i++)
        if (!q->slots[i].busy && !q->slots[i].pending_readback)
            return (int)i;
    return -1;
}

static void start_slot(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    s->busy = 1;
    s->status = XB_RSP_OKAY;
    s->t0 = now;
    q->inflight++;
    if (s->kind == K_FLUSH) {
        s->nparts = s->parts_left = 1;
        push_flush(q, idx);
        return;
    }
    if (s->kind == K_DISCARD) {
        s->nparts = s->parts_left = 1;
        push_discard(q, s, idx);
        return;
    }
    s->nparts = s->parts_left = q->parts;
    memset(s->part_done, 0, q->parts);
    for (unsigned p = 0; p < q->parts; p++)
        push_rw(q, s, idx, p);
}

/* Choose and start the next workload I/O in slot idx. Returns 0 if it must wait (block in flight). */
static int issue_next(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    const struct xb_sg_queue_config *c = &q->cfg;
    uint64_t k = q->issued;
    uint64_t block = block_of(q, k);
    int kind;
    if (c->rw == XB_SG_RW_TRIM || (c->discard_every && (k + 1) % c->discard_every == 0))
        kind = K_DISCARD;
    else if (q->mixed)
        kind = sg_mix64(c->seed ^ sg_mix64(k ^ 0xa11ce)) % 100 < c->rwmix_read ? K_READ : K_WRITE;
    else
        kind = is_read_mode(c->rw) ? K_READ : K_WRITE;
    uint32_t need = kind == K_DISCARD ? 1 : q->parts;
    if (ring_free(q) < need)
        return 0;
    if (c->verify && block_busy(q, block))
        return 0; /* deterministic order: wait for the block rather than skip it */
    if (kind == K_READ && q->verify_gens && q->recent_n) {
        /* Read something this run wrote, so the read has an expected content to be checked against. */
        block = q->recent[sg_mix64(c->seed ^ sg_mix64(k ^ 0xbeef)) % q->recent_n];
        if (block_busy(q, block))
            return 0;
    }
    s->kind = kind;
    s->block = block;
    s->readback = 0;
    uint64_t rel = block - c->region_start;
    if (kind == K_WRITE) {
        uint32_t gen = 1;
        if (q->verify_gens)
            gen = q->gens[rel] == UINT16_MAX ? 1 : q->gens[rel] + 1u;
        s->gen = gen;
        xb_sg_pattern_fill(slot_buf(q, s), block * c->bs, c->bs, c->seed, gen);
    } else if (kind == K_READ) {
        s->gen = !c->verify ? 0 : q->verify_gens ? q->gens[rel] : 1;
        if (c->verify)
            memset(slot_buf(q, s), 0xdb, c->bs); /* a read that returns nothing must not pass */
    }
    q->issued++;
    start_slot(q, idx, now);
    if (kind == K_WRITE && c->flush_every && ++q->writes_issued % c->flush_every == 0)
        q->flush_pending = 1;
    return 1;
}

static void fill(struct xb_sg_queue *q)
{
    uint64_t now = now_ns();
    while (q->nreadbacks && !q->draining && ring_free(q) >= q->parts) {
        unsigned idx = q->readbacks[--q->nreadbacks];
        struct slot *s = &q->slots[idx];
        s->pending_readback = 0;
        s->kind = K_READ;
        s->readback = 1;
        memset(slot_buf(q, s), 0xdb, q->cfg.bs);
        start_slot(q, idx, now);
    }
    for (;;) {
        if (q->draining)
            break;
        if (q->flush_pending) {
            int idx = free_slot(q);
            if (idx < 0 || ring_free(q) < 1)
                break;
            q->flush_pending = 0;
            q->slots[idx].kind = K_FLUSH;
            start_slot(q, (unsigned)idx, now);
            continue;
        }
        if (!work_left(q, now))
            break;
        int idx = free_slot(q);
        if (idx < 0 || !issue_next(q, (unsigned)idx, now))
            break;
    }
    publish(q);
}

static const char *kind_name(int kind)
{
    static const char *names[] = {"read", "write", "flush", "discard"};
    return names[kind];
}

struct sector_text {
    char text[128];
};

/* What a sector that failed verification holds, for the error message. */
static struct sector_text describe_sector(const uint8_t *p)
{
    struct sector_text t;
    int zero = 1, poison = 1;
    for (unsigned i = 0; i < 512; i++) {
        zero &= p[i] == 0;
        poison &= p[i] == 0xdb;
    }
    uint64_t w[2];
    memcpy(w, p, sizeof(w));
    if (zero)
        snprintf(t.text, sizeof(t.text), "found zeros");
    else if (poison)
        snprintf(t.text, sizeof(t.text), "the buffer was not written by the backend");
    else
        snprintf(t.text, sizeof(t.text), "found a sector tagged offset %llu seed %llu generation %u",
                 (unsigned long long)w[0], (unsigned long long)(w[1] >> 32), (unsigned)(w[1] & 0xffffffffu));
    return t;
}

static void complete(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    const struct xb_sg_queue_config *c = &q->cfg;
    uint64_t lat = now - s->t0;
    q->st.lat_count++;
    q->st.lat_sum_ns += lat;
    if (lat > q->st.lat_max_ns)
        q->st.lat_max_ns = lat;
    q->st.hist[sg_hist_index(lat)]++;
    s->busy = 0;
    q->inflight--;
    if (!c->persistent && (s->kind == K_READ || s->kind == K_WRITE))
        for (unsigned p = 0; p < q->slot_pages; p++)
            sg_revoke(q->d, slot_ref(q, s, p));
    uint64_t rel = s->block - c->region_start, off = s->block * c->bs;
    switch (s->kind) {
    case K_READ: q->st.reads++; q->st.bytes_read += c->bs; break;
    case K_WRITE: q->st.writes++; q->st.bytes_written += c->bs; break;
    case K_FLUSH: q->st.flushes++; break;
    default: q->st.discards++; break;
    }
    if (s->status != XB_RSP_OKAY) {
        q->st.errors++;
        if (s->kind == K_FLUSH)
            fail(q, "flush failed: status %d", s->status);
        else
            fail(q, "%s of %u bytes at offset %llu failed: status %d", kind_name(s->kind), c->bs,
                 (unsigned long long)off, s->status);
        if (q->verify_gens && s->kind != K_READ && s->kind != K_FLUSH)
            q->gens[rel] = 0;
        return;
    }
    if (s->kind == K_WRITE) {
        if (q->verify_gens) {
            q->gens[rel] = (uint16_t)s->gen;
            q->recent[q->recent_pos] = s->block;
            q->recent_pos = (q->recent_pos + 1) % RECENT;
            if (q->recent_n < RECENT)
                q->recent_n++;
        }
        else if (c->verify) { /* write/randwrite: read the block back before the slot is free */
            s->pending_readback = 1;
            q->readbacks[q->nreadbacks++] = idx;
        }
    } else if (s->kind == K_DISCARD) {
        if (q->verify_gens)
            q->gens[rel] = 0; /* discarded content is unspecified */
    } else if (s->kind == K_READ) {
        if (s->gen == 0) {
            q->st.unverified_reads++;
            return;
        }
        int64_t bad = xb_sg_pattern_check(slot_buf(q, s), off, c->bs, c->seed, s->gen);
        if (bad < 0) {
            q->st.verified_reads++;
            return;
        }
        q->st.verify_errors++;
        fail(q, "verify error at byte offset %llu (%s, seed %llu generation %u expected): %s",
             (unsigned long long)(off + (uint64_t)bad), s->readback ? "read-back of a write" : "read",
             (unsigned long long)c->seed, s->gen, describe_sector(slot_buf(q, s) + bad).text);
    }
}

/* Consume every available response. Returns the number consumed, -1 on a protocol error. */
static int consume(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    int n = 0;
    uint64_t now = 0;
    for (;;) {
        uint32_t rp = __atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE);
        if ((uint32_t)(rp - q->rsp_cons) > (uint32_t)(q->req_prod_pvt - q->rsp_cons)) {
            fail(q, "backend protocol error: response producer %u beyond the %u requests outstanding", rp,
                 q->req_prod_pvt - q->rsp_cons);
            return -1;
        }
        if (rp == q->rsp_cons) {
            /* RING_FINAL_CHECK_FOR_RESPONSES: ask for a notification, then look once more. */
            __atomic_store_n(&h->rsp_event, q->rsp_cons + 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE) == q->rsp_cons)
                return n;
            continue;
        }
        if (!now)
            now = now_ns();
        for (; q->rsp_cons != rp; q->rsp_cons++) {
            const uint8_t *e = xb_ring_entry(q->sring, q->abi, q->rsp_cons, q->ring_size);
            uint64_t id;
            int16_t status;
            memcpy(&id, e, sizeof(id)); /* id at 0, status at 10, in both ABIs */
            memcpy(&status, e + 10, sizeof(status));
            uint64_t idx = id >> 16, part = id & 0xffff;
            struct slot *s = idx < q->cfg.iodepth ? &q->slots[idx] : NULL;
            if (!s || !s->busy || part >= s->nparts || (s->kind <= K_WRITE && s->part_done[part])) {
                fail(q, "backend protocol error: response with unknown id %#llx", (unsigned long long)id);
                return -1;
            }
            if (s->kind <= K_WRITE)
                s->part_done[part] = 1;
            if (status != XB_RSP_OKAY && s->status == XB_RSP_OKAY)
                s->status = status;
            n++;
            if (--s->parts_left == 0)
                complete(q, (unsigned)idx, now);
        }
        q->last_progress_ns = now;
    }
}

static void wait_for_backend(struct xb_sg_queue *q)
{
    uint64_t now = now_ns();
    int64_t timeout_ms = -1;
    if (q->inflight && q->cfg.io_timeout_ns) {
        uint64_t until = q->last_progress_ns + q->cfg.io_timeout_ns;
        if (now >= until) {
            fail(q, "no response from the backend for %.1f s with %u I/Os in flight",
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
    struct pollfd pfd[2] = {{.fd = q->cfg.evt_recv_fd, .events = POLLIN}, {.fd = q->stop_fd, .events = POLLIN}};
    q->st.wakeups++;
    int r = poll(pfd, 2, timeout_ms > 60000 ? 60000 : (int)timeout_ms);
    if (r < 0 && errno != EINTR) {
        fail(q, "poll: %s", strerror(errno));
        __atomic_store_n(&q->abort_requested, 1, __ATOMIC_RELAXED);
        return;
    }
    uint64_t v;
    if (r > 0 && (pfd[0].revents & POLLIN))
        (void)!read(q->cfg.evt_recv_fd, &v, sizeof(v));
}

static void *queue_main(void *arg)
{
    struct xb_sg_queue *q = arg;
    q->st.start_ns = q->last_progress_ns = now_ns();
    q->deadline_ns = q->st.start_ns + q->cfg.runtime_ns;
    for (;;) {
        if (__atomic_load_n(&q->stop_requested, __ATOMIC_RELAXED))
            q->draining = 1;
        if (__atomic_load_n(&q->abort_requested, __ATOMIC_RELAXED))
            break;
        if (q->cfg.rw >= 0)
            fill(q);
        int got = consume(q);
        if (got < 0)
            break;
        uint64_t now = now_ns();
        int more = q->cfg.rw >= 0 && (work_left(q, now) || q->flush_pending || q->nreadbacks);
        if (!q->inflight && (!more || q->draining))
            break;
        if (got > 0)
            continue;
        wait_for_backend(q);
    }
    q->st.end_ns = now_ns();
    return NULL;
}

int xb_sg_queue_start(struct xb_sg_queue *q, char *err)
{
    if (q->started) {
        sg_errf(err, "queue already started");
        return -1;
    }
    if (q->cfg.rw >= 0 && !q->slots) {
        sg_errf(err, "queue has no workload (xb_sg_queue_setup)");
        return -1;
    }
    int rc = pthread_create(&q->thread, NULL, queue_main, q);
    if (rc) {
        sg_errf(err, "pthread_create: %s", strerror(rc));
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
    free(q->gens);
    close_fd(&q->stop_fd);
    close_fd(&q->cfg.evt_recv_fd);
    close_fd(&q->cfg.evt_send_fd);
    free(q);
}
