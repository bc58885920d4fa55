/*
 * The whole data plane under ASan+UBSan: a C test guest (memory and grant
 * table as sealed memfds, event channels as eventfds, on the sim platform)
 * drives devices with real queue threads, io_uring and a raw image. Both ABIs,
 * 1- and 4-page rings, two queues; direct and indirect writes read back and
 * verified; hostile entries refused without touching the image; a producer
 * overflow stops only its queue; stop drains and is idempotent.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include "parse.h"
#include "queue.h"
#include "storage_api.h"
#include "xb_dataplane.h"
#include "xb_grant.h"

#define DOMID 3
#define PAGES 4096u
#define ENTRIES 4096u
#define DISK (4u << 20)

static int failures;
#define CHECK(c)                                                                                                       \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "%s:%d: %s: failed: %s\n", __FILE__, __LINE__, ctx, #c);                                  \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)
static const char *ctx = "setup";

/* ---- the guest ---- */
struct guest {
    int mem_fd, gnt_fd;
    uint8_t *mem;
    struct xb_grant_entry_v1 *gnt;
    uint32_t next_frame, next_ref;
};

static int sealed_memfd(const char *name, size_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0)
        abort();
    return fd;
}

static void guest_init(struct guest *g)
{
    g->mem_fd = sealed_memfd("guest-mem", (size_t)PAGES * XB_PAGE_SIZE);
    g->gnt_fd = sealed_memfd("guest-gnt", ENTRIES * sizeof(struct xb_grant_entry_v1));
    g->mem = mmap(NULL, (size_t)PAGES * XB_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g->mem_fd, 0);
    g->gnt = mmap(NULL, ENTRIES * sizeof(struct xb_grant_entry_v1), PROT_READ | PROT_WRITE, MAP_SHARED, g->gnt_fd, 0);
    if (g->mem == MAP_FAILED || g->gnt == MAP_FAILED)
        abort();
    g->next_frame = 0;
    g->next_ref = 8;
}

static uint32_t frame_alloc(struct guest *g)
{
    if (g->next_frame >= PAGES)
        abort();
    return g->next_frame++;
}

static uint8_t *frame_ptr(struct guest *g, uint32_t f) { return g->mem + (size_t)f * XB_PAGE_SIZE; }

static xb_grant_ref_t grant(struct guest *g, uint32_t frame, int readonly)
{
    xb_grant_ref_t r = g->next_ref++;
    if (r >= ENTRIES)
        abort();
    g->gnt[r].domid = 0;
    g->gnt[r].frame = frame;
    __atomic_store_n(&g->gnt[r].flags, (uint16_t)(XB_GTF_permit_access | (readonly ? XB_GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
    return r;
}

/* ---- one ring, the frontend side ---- */
struct gring {
    enum xb_abi abi;
    unsigned pages;
    uint32_t size, req_prod_pvt, rsp_cons;
    struct xb_sring_header *s;
    xb_grant_ref_t refs[XB_MAX_RING_PAGES];
    int to_back, to_guest; /* eventfds */
};

static void gring_init(struct guest *g, struct gring *r, enum xb_abi abi, unsigned pages)
{
    r->abi = abi;
    r->pages = pages;
    r->size = xb_ring_size(abi, pages);
    uint32_t first = frame_alloc(g);
    for (unsigned i = 1; i < pages; i++)
        frame_alloc(g);
    r->s = (struct xb_sring_header *)frame_ptr(g, first);
    memset(r->s, 0, pages * XB_PAGE_SIZE);
    r->s->req_event = 1;
    r->s->rsp_event = 1;
    for (unsigned i = 0; i < pages; i++)
        r->refs[i] = grant(g, first + i, 0);
    r->req_prod_pvt = r->rsp_cons = 0;
    r->to_back = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->to_guest = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

static void put(struct gring *r, const void *entry)
{
    memcpy(xb_ring_entry(r->s, r->abi, r->req_prod_pvt++, r->size), entry, xb_ring_entry_size(r->abi));
}

static void push(struct gring *r)
{
    uint32_t old = r->s->req_prod, now = r->req_prod_pvt;
    __atomic_store_n(&r->s->req_prod, now, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if ((uint32_t)(now - r->s->req_event) < (uint32_t)(now - old)) {
        uint64_t one = 1;
        if (write(r->to_back, &one, sizeof(one)) < 0)
            abort();
    }
}

struct rsp {
    uint64_t id;
    int16_t status;
};

/* A failure bound for waits on the data plane's threads: generous, so a loaded machine (a CPU hog, other
 * builds beside the test) is never taken for a missing response; an idle one answers in microseconds. */
#define WAIT_BOUND_NS (120ull * 1000000000ull)

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Collect n responses (sleeping on the event channel between checks); returns how many arrived. */
static unsigned collect(struct gring *r, struct rsp *out, unsigned n)
{
    unsigned got = 0;
    uint64_t deadline = mono_ns() + WAIT_BOUND_NS;
    while (got < n && mono_ns() < deadline) {
        uint32_t rp = __atomic_load_n(&r->s->rsp_prod, __ATOMIC_ACQUIRE);
        while (r->rsp_cons != rp && got < n) {
            const uint8_t *e = xb_ring_entry(r->s, r->abi, r->rsp_cons++, r->size);
            memcpy(&out[got].id, e, 8);
            memcpy(&out[got].status, e + 10, 2);
            got++;
        }
        __atomic_store_n(&r->s->rsp_event, r->rsp_cons + 1, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (got < n && __atomic_load_n(&r->s->rsp_prod, __ATOMIC_ACQUIRE) == r->rsp_cons) {
            struct pollfd pfd = {.fd = r->to_guest, .events = POLLIN};
            if (poll(&pfd, 1, 10) > 0) {
                uint64_t v;
                if (read(r->to_guest, &v, sizeof(v)) < 0 && errno != EAGAIN)
                    abort();
            }
        }
    }
    return got;
}

/* ---- request builders ---- */
static void rw_entry(enum xb_abi abi, uint8_t *e, uint8_t op, uint8_t nseg, uint64_t id, uint64_t sector,
                     const struct xb_blkif_segment *segs, unsigned nsegs)
{
    memset(e, 0, 112);
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw r = {.operation = op, .nr_segments = nseg, .id = id, .sector_number = sector};
        memcpy(r.seg, segs, nsegs * sizeof(*segs));
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_rw r = {.operation = op, .nr_segments = nseg, .id = id, .sector_number = sector};
        memcpy(r.seg, segs, nsegs * sizeof(*segs));
        memcpy(e, &r, sizeof(r));
    }
}

static void indirect_entry(enum xb_abi abi, uint8_t *e, uint8_t op, uint16_t nseg, uint64_t id, uint64_t sector,
                           xb_grant_ref_t page)
{
    memset(e, 0, 112);
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_indirect r = {.operation = XB_OP_INDIRECT, .indirect_op = op, .nr_segments = nseg,
                                                     .id = id, .sector_number = sector};
        r.indirect_grefs[0] = page;
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_indirect r = {.operation = XB_OP_INDIRECT, .indirect_op = op, .nr_segments = nseg,
                                                     .id = id, .sector_number = sector};
        r.indirect_grefs[0] = page;
        memcpy(e, &r, sizeof(r));
    }
}

static uint8_t pat(uint64_t off, unsigned seed) { return (uint8_t)((off * 2654435761u >> 7) ^ seed); }

/* ---- the scenario for one ABI and ring size ---- */
static void scenario(struct xb_platform *p, struct guest *g, const char *path, enum xb_abi abi, unsigned pages,
                     int persistent)
{
    char err[XB_ERRLEN] = "";
    struct xb_image *img = xb_image_open(path, XB_FMT_RAW, 0, err);
    CHECK(img != NULL);
    if (!img)
        return;
    struct xb_device_config cfg = {.domid = DOMID, .handle = 1, .abi = abi, .ring_pages = pages, .nr_queues = 2,
                                   .max_indirect_segments = 256, .max_work_per_wake = 8,
                                   /* a small bound: the grant cache fills, purges and remaps under ASan */
                                   .feature_persistent = persistent, .max_persistent_grants = 64};
    struct xb_device *d = xb_device_new(p, img, &cfg, err);
    CHECK(d != NULL);
    struct gring rings[2];
    struct xb_evtchn *chans[2];
    for (unsigned q = 0; q < 2; q++) {
        gring_init(g, &rings[q], abi, pages);
        chans[q] = xb_evtchn_sim(dup(rings[q].to_back), dup(rings[q].to_guest), q + 1, err);
        CHECK(chans[q] != NULL);
        CHECK(xb_device_start_queue(d, q, rings[q].refs, pages, chans[q], err) == 0);
    }
    CHECK(xb_device_start_queue(d, 0, rings[0].refs, pages, chans[0], err) < 0); /* twice: refused */

    /* direct writes of 1..11 pages on both queues at once, then read back */
    uint8_t e[112];
    unsigned nreq = rings[0].size < 24 ? rings[0].size : 24;
    uint32_t wframes[2][24][11];
    uint64_t off[2][24];
    unsigned nsegs[2][24];
    for (unsigned q = 0; q < 2; q++) {
        uint64_t pos = q * (DISK / 2);
        for (unsigned i = 0; i < nreq; i++) {
            struct xb_blkif_segment segs[11];
            nsegs[q][i] = 1 + (i * 7 + q) % 11;
            off[q][i] = pos;
            for (unsigned s = 0; s < nsegs[q][i]; s++) {
                uint32_t f = wframes[q][i][s] = frame_alloc(g);
                for (unsigned b = 0; b < XB_PAGE_SIZE; b++)
                    frame_ptr(g, f)[b] = pat(pos + s * XB_PAGE_SIZE + b, 1);
                segs[s] = (struct xb_blkif_segment){.gref = grant(g, f, 1), .first_sect = 0, .last_sect = 7};
            }
            rw_entry(abi, e, XB_OP_WRITE, (uint8_t)nsegs[q][i], 1000 * q + i, pos / 512, segs, nsegs[q][i]);
            put(&rings[q], e);
            pos += nsegs[q][i] * XB_PAGE_SIZE;
        }
        push(&rings[q]);
    }
    struct rsp rsps[64];
    for (unsigned q = 0; q < 2; q++) {
        CHECK(collect(&rings[q], rsps, nreq) == nreq);
        for (unsigned i = 0; i < nreq; i++)
            CHECK(rsps[i].status == XB_RSP_OKAY && rsps[i].id / 1000 == q);
    }
    for (unsigned q = 0; q < 2; q++) {
        for (unsigned i = 0; i < nreq; i++) {
            struct xb_blkif_segment segs[11];
            for (unsigned s = 0; s < nsegs[q][i]; s++) {
                memset(frame_ptr(g, wframes[q][i][s]), 0xee, XB_PAGE_SIZE);
                segs[s] = (struct xb_blkif_segment){.gref = grant(g, wframes[q][i][s], 0), .first_sect = 0,
                                                    .last_sect = 7};
            }
            rw_entry(abi, e, XB_OP_READ, (uint8_t)nsegs[q][i], 5000 + i, off[q][i] / 512, segs, nsegs[q][i]);
            put(&rings[q], e);
        }
        push(&rings[q]);
    }
    for (unsigned q = 0; q < 2; q++) {
        CHECK(collect(&rings[q], rsps, nreq) == nreq);
        for (unsigned i = 0; i < nreq; i++)
            CHECK(rsps[i].status == XB_RSP_OKAY);
        unsigned bad = 0;
        for (unsigned i = 0; i < nreq; i++)
            for (unsigned s = 0; s < nsegs[q][i]; s++)
                for (unsigned b = 0; b < XB_PAGE_SIZE; b++)
                    bad += frame_ptr(g, wframes[q][i][s])[b] != pat(off[q][i] + s * XB_PAGE_SIZE + b, 1);
        CHECK(bad == 0);
    }

    /* an indirect write of 200 segments, read back directly from the image */
    uint32_t ind = frame_alloc(g);
    struct xb_blkif_segment *desc = (struct xb_blkif_segment *)frame_ptr(g, ind);
    for (unsigned s = 0; s < 200; s++) {
        uint32_t f = frame_alloc(g);
        for (unsigned b = 0; b < XB_PAGE_SIZE; b++)
            frame_ptr(g, f)[b] = pat(s * XB_PAGE_SIZE + b, 2);
        desc[s] = (struct xb_blkif_segment){.gref = grant(g, f, 1), .first_sect = 0, .last_sect = 7};
    }
    indirect_entry(abi, e, XB_OP_WRITE, 200, 777, 1024, grant(g, ind, 1));
    put(&rings[0], e);
    push(&rings[0]);
    CHECK(collect(&rings[0], rsps, 1) == 1 && rsps[0].id == 777 && rsps[0].status == XB_RSP_OKAY);
    uint8_t *back = malloc(200 * XB_PAGE_SIZE);
    CHECK(xb_image_read(img, back, 200 * XB_PAGE_SIZE, 1024 * 512) == 200 * XB_PAGE_SIZE);
    unsigned bad = 0;
    for (unsigned b = 0; b < 200 * XB_PAGE_SIZE; b++)
        bad += back[b] != pat(b, 2);
    CHECK(bad == 0);

    /* hostile entries: refused, counted, the image untouched */
    uint8_t *before = malloc(DISK);
    CHECK(xb_image_read(img, before, DISK, 0) == DISK);
    struct xb_blkif_segment hs[12];
    for (unsigned s = 0; s < 12; s++)
        hs[s] = desc[s];
    rw_entry(abi, e, 9, 1, 1, 0, hs, 1); /* unknown op */
    put(&rings[0], e);
    rw_entry(abi, e, XB_OP_WRITE, 12, 2, 0, hs, 11); /* 12 segments */
    put(&rings[0], e);
    hs[0].first_sect = 6;
    hs[0].last_sect = 5;
    rw_entry(abi, e, XB_OP_WRITE, 1, 3, 0, hs, 1); /* first > last */
    put(&rings[0], e);
    hs[0].first_sect = 0;
    hs[0].last_sect = 7;
    rw_entry(abi, e, XB_OP_WRITE, 2, 4, UINT64_MAX - 7, hs, 2); /* wraps */
    put(&rings[0], e);
    indirect_entry(abi, e, XB_OP_FLUSH_DISKCACHE, 4, 5, 0, desc[0].gref); /* indirect flush */
    put(&rings[0], e);
    hs[0].gref = ENTRIES + 5; /* not a grant */
    rw_entry(abi, e, XB_OP_WRITE, 1, 6, 0, hs, 1);
    put(&rings[0], e);
    push(&rings[0]);
    CHECK(collect(&rings[0], rsps, 6) == 6);
    static const int16_t want[] = {XB_RSP_EOPNOTSUPP, XB_RSP_ERROR, XB_RSP_ERROR, XB_RSP_ERROR, XB_RSP_ERROR,
                                   XB_RSP_ERROR};
    for (unsigned i = 0; i < 6; i++)
        CHECK(rsps[i].id == i + 1 && rsps[i].status == want[i]);
    uint8_t *after = malloc(DISK);
    CHECK(xb_image_read(img, after, DISK, 0) == DISK);
    CHECK(memcmp(before, after, DISK) == 0);
    struct xb_queue_stats st;
    CHECK(xb_device_get_stats(d, 0, &st) == 0);
    CHECK(st.refusals[XB_REFUSE_BAD_OP] == 1 && st.refusals[XB_REFUSE_NSEG] == 1 && st.refusals[XB_REFUSE_SECT] == 1 &&
          st.refusals[XB_REFUSE_RANGE] == 1 && st.refusals[XB_REFUSE_INDIRECT] == 1 &&
          st.refusals[XB_REFUSE_GRANT] == 1);
    CHECK(st.op[XB_STAT_WRITE].requests == nreq + 1 && st.op[XB_STAT_READ].requests == nreq);
    CHECK(st.in_flight == 0);

    /* producer overflow on queue 1: only that queue stops */
    __atomic_store_n(&rings[1].s->req_prod, rings[1].rsp_cons + rings[1].size + 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    CHECK(write(rings[1].to_back, &one, sizeof(one)) == sizeof(one));
    char msg[XB_ERRLEN] = "";
    for (uint64_t until = mono_ns() + WAIT_BOUND_NS; !xb_device_queue_failed(d, 1, msg) && mono_ns() < until;)
        usleep(1000);
    CHECK(xb_device_queue_failed(d, 1, msg) && strstr(msg, "ring") != NULL);
    CHECK(!xb_device_queue_failed(d, 0, msg));
    struct xb_blkif_segment rd = {.gref = grant(g, frame_alloc(g), 0), .first_sect = 0, .last_sect = 7};
    rw_entry(abi, e, XB_OP_READ, 1, 4242, 0, &rd, 1);
    put(&rings[0], e);
    push(&rings[0]);
    CHECK(collect(&rings[0], rsps, 1) == 1 && rsps[0].id == 4242 && rsps[0].status == XB_RSP_OKAY);
    CHECK(xb_device_get_stats(d, 1, &st) == 0 && st.ring_protocol_errors == 1);
    /* the failure also made the device's eventfd readable (the daemon waits on it) */
    struct pollfd fpfd = {.fd = xb_device_fail_fd(d), .events = POLLIN};
    CHECK(poll(&fpfd, 1, 0) == 1);
    CHECK(xb_device_get_stats(d, 0, &st) == 0);
    /* with persistent grants the read-write grants were mapped (read-only ones went by copy), within the bound */
    CHECK(persistent ? st.persistent_maps > 0 && st.persistent_mapped <= 64 : st.persistent_maps == 0);

    CHECK(xb_device_stop(d) == 0);
    CHECK(xb_device_stop(d) == 0);
    CHECK(xb_device_get_stats(d, 0, &st) == 0 && st.persistent_mapped == 0); /* disconnect unmapped them */
    xb_device_free(d);
    for (unsigned q = 0; q < 2; q++) {
        xb_evtchn_close(chans[q]);
        close(rings[q].to_back);
        close(rings[q].to_guest);
    }
    free(before);
    free(after);
    free(back);
    xb_image_close(img);
}

/* ---- QoS: a limited disk is held to its rate (never faster: the elapsed time has a floor), a raised
 * limit frees the waiting requests at once, and a stop drains requests a limit still holds ---- */
static void reads(struct guest *g, struct gring *r, unsigned n, uint64_t id0)
{
    uint8_t e[112];
    for (unsigned i = 0; i < n; i++) {
        struct xb_blkif_segment rd = {.gref = grant(g, frame_alloc(g), 0), .first_sect = 0, .last_sect = 7};
        rw_entry(r->abi, e, XB_OP_READ, 1, id0 + i, (uint64_t)i * 8, &rd, 1);
        put(r, e);
    }
    push(r);
}

static void qos_scenario(struct xb_platform *p, struct guest *g, const char *path)
{
    char err[XB_ERRLEN] = "";
    struct xb_image *img = xb_image_open(path, XB_FMT_RAW, 0, err);
    CHECK(img != NULL);
    if (!img)
        return;
    struct xb_device_config cfg = {.domid = DOMID, .handle = 2, .abi = XB_ABI_X86_64, .ring_pages = 1,
                                   .nr_queues = 1, .max_indirect_segments = 0};
    struct xb_device *d = xb_device_new(p, img, &cfg, err);
    struct xb_qos *disk = xb_qos_new(err), *group = xb_qos_new(err);
    CHECK(d && disk && group);
    if (!d || !disk || !group)
        return;
    struct xb_qos_limits lim = {0};
    lim.iops[XB_QOS_TOTAL] = 100;
    lim.iops_burst[XB_QOS_TOTAL] = 1;
    CHECK(xb_qos_set(disk, &lim, err) == 0);
    CHECK(xb_device_set_qos(d, disk, group, err) == 0); /* the group unlimited: no effect */
    xb_qos_unref(group);                                 /* the device holds its own references */
    struct gring ring;
    gring_init(g, &ring, XB_ABI_X86_64, 1);
    struct xb_evtchn *ch = xb_evtchn_sim(dup(ring.to_back), dup(ring.to_guest), 9, err);
    CHECK(ch && xb_device_start_queue(d, 0, ring.refs, 1, ch, err) == 0);
    CHECK(xb_device_set_qos(d, disk, NULL, err) < 0); /* not while queues run */
    struct rsp rsps[32];
    uint64_t t0 = mono_ns();
    reads(g, &ring, 22, 100);
    CHECK(collect(&ring, rsps, 22) == 22);
    uint64_t took = mono_ns() - t0;
    for (unsigned i = 0; i < 22; i++)
        CHECK(rsps[i].status == XB_RSP_OKAY);
    /* 22 at 100/s with a burst of 1: the first two at once, then 10 ms each (a floor, never a ceiling) */
    CHECK(took >= 195000000ull);
    struct xb_queue_stats st;
    CHECK(xb_device_get_stats(d, 0, &st) == 0 && st.qos_throttled > 0 && st.qos_queued == 0 && st.qos_throttled_ns > 0);
    struct xb_qos_stats qs;
    xb_qos_get_stats(disk, &qs);
    CHECK(qs.throttled > 0 && qs.queued == 0 && qs.admitted == 22);

    /* 1 B/s: after the first 4 KiB read the second waits an hour, and the ring is not read further;
     * lifting the limit frees it at once, and the queue reads on */
    lim.iops[XB_QOS_TOTAL] = 0;
    lim.bps[XB_QOS_READ] = 1;
    CHECK(xb_qos_set(disk, &lim, err) == 0);
    reads(g, &ring, 3, 200);
    CHECK(collect(&ring, rsps, 1) == 1 && rsps[0].id == 200);
    for (uint64_t until = mono_ns() + WAIT_BOUND_NS; mono_ns() < until;) {
        xb_qos_get_stats(disk, &qs);
        if (qs.queued == 1)
            break;
        usleep(1000);
    }
    CHECK(qs.queued == 1);
    memset(&lim, 0, sizeof(lim));
    CHECK(xb_qos_set(disk, &lim, err) == 0);
    xb_device_qos_changed(d);
    CHECK(collect(&ring, rsps, 2) == 2 && rsps[0].id == 201 && rsps[1].id == 202);

    /* held by a limit when the device stops: answered by the stop, not left behind (the requests not
     * taken from the ring stay there, as without a limit) */
    lim.bps[XB_QOS_READ] = 1;
    CHECK(xb_qos_set(disk, &lim, err) == 0);
    reads(g, &ring, 4, 300);
    for (uint64_t until = mono_ns() + WAIT_BOUND_NS; mono_ns() < until;) {
        xb_device_get_stats(d, 0, &st);
        if (st.qos_queued == 1)
            break;
        usleep(1000);
    }
    CHECK(st.qos_queued == 1);
    CHECK(xb_device_stop(d) == 0);
    CHECK(collect(&ring, rsps, 2) == 2);
    CHECK(rsps[0].status == XB_RSP_OKAY && rsps[1].status == XB_RSP_OKAY && rsps[1].id == 301);
    CHECK(xb_device_get_stats(d, 0, &st) == 0 && st.qos_queued == 0);
    xb_qos_get_stats(disk, &qs);
    CHECK(qs.queued == 0);
    xb_device_free(d); /* drops its references: the group is freed here (ASan sees a leak otherwise) */
    xb_qos_unref(disk);
    xb_evtchn_close(ch);
    close(ring.to_back);
    close(ring.to_guest);
    xb_image_close(img);
}

/* ---- the slow path's fairness: a queue flooding the device's workers does not hold another queue's job
 * behind its whole backlog. An image whose discard records the order jobs start in and holds the first
 * two (both workers) until queue 0's backlog and queue 1's one job are all waiting: the next job a worker
 * takes is queue 1's (round-robin), not queue 0's third (first come, first served). ---- */
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;
static uint64_t started[64];
static unsigned nstarted;

static int gated_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    (void)img, (void)len, (void)secure;
    pthread_mutex_lock(&gate_mu);
    if (nstarted < 64)
        started[nstarted++] = off;
    pthread_cond_broadcast(&gate_cv);
    while (!gate_open)
        pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
    return 0;
}

static int no_map(struct xb_image *img, uint64_t off, uint64_t len, int w, struct xb_extent *e)
{
    (void)img, (void)off, (void)len, (void)w, (void)e;
    return 0;
}

static unsigned pool_pending(struct xb_device *d)
{
    pthread_mutex_lock(&d->pool.mu);
    unsigned n = d->pool.pending;
    pthread_mutex_unlock(&d->pool.mu);
    return n;
}

static void discards(struct gring *r, unsigned n, uint64_t sector, uint64_t id0)
{
    uint8_t e[112];
    for (unsigned i = 0; i < n; i++) {
        struct xb_blkif_x86_64_request_discard dr = {.operation = XB_OP_DISCARD, .id = id0 + i,
                                                     .sector_number = sector, .nr_sectors = 8};
        memset(e, 0, sizeof(e));
        memcpy(e, &dr, sizeof(dr));
        put(r, e);
    }
    push(r);
}

static void fairness_scenario(struct xb_platform *p, struct guest *g)
{
    static const struct xb_image_ops ops = {.map = no_map, .discard = gated_discard};
    struct xb_image img = {.ops = &ops, .size = DISK, .logical_block = 512, .physical_block = 512,
                           .discard_granularity = 4096, .caps = XB_CAP_DISCARD, .aio_fd = -1};
    char err[XB_ERRLEN] = "";
    struct xb_device_config cfg = {.domid = DOMID, .handle = 3, .abi = XB_ABI_X86_64, .ring_pages = 1, .nr_queues = 2};
    struct xb_device *d = xb_device_new(p, &img, &cfg, err);
    CHECK(d != NULL);
    if (!d)
        return;
    struct gring rings[2];
    struct xb_evtchn *chans[2];
    for (unsigned q = 0; q < 2; q++) {
        gring_init(g, &rings[q], XB_ABI_X86_64, 1);
        chans[q] = xb_evtchn_sim(dup(rings[q].to_back), dup(rings[q].to_guest), 20 + q, err);
        CHECK(chans[q] && xb_device_start_queue(d, q, rings[q].refs, 1, chans[q], err) == 0);
    }
    discards(&rings[0], 20, 0, 100); /* queue 0: sector 0, twenty of them */
    uint64_t until = mono_ns() + WAIT_BOUND_NS;
    while (pool_pending(d) < 18 && mono_ns() < until) /* two running (held), eighteen waiting */
        usleep(1000);
    discards(&rings[1], 1, 8, 900); /* queue 1: sector 8, one */
    while (pool_pending(d) < 19 && mono_ns() < until)
        usleep(1000);
    CHECK(pool_pending(d) == 19);
    pthread_mutex_lock(&gate_mu);
    gate_open = 1;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
    struct rsp rsps[32];
    CHECK(collect(&rings[0], rsps, 20) == 20);
    CHECK(collect(&rings[1], rsps, 1) == 1 && rsps[0].id == 900 && rsps[0].status == XB_RSP_OKAY);
    pthread_mutex_lock(&gate_mu);
    CHECK(nstarted == 21 && started[0] == 0 && started[1] == 0 && started[2] == 8 * 512);
    pthread_mutex_unlock(&gate_mu);
    CHECK(xb_device_stop(d) == 0);
    xb_device_free(d);
    for (unsigned q = 0; q < 2; q++) {
        xb_evtchn_close(chans[q]);
        close(rings[q].to_back);
        close(rings[q].to_guest);
    }
}

int main(void)
{
    char err[XB_ERRLEN] = "";
    char path[] = "/tmp/xb-ring-queue-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0 || ftruncate(fd, DISK) < 0)
        return 2;
    close(fd);
    struct xb_platform *p = xb_platform_open_sim(0, err);
    if (!p) {
        fprintf(stderr, "sim platform: %s\n", err);
        return 2;
    }
    struct guest g;
    guest_init(&g);
    CHECK(xb_platform_sim_add_domain(p, DOMID, g.mem_fd, PAGES, g.gnt_fd, ENTRIES, err) == 0);
    const char *names[2][3] = {{"x86_64 1 page", "x86_64 4 pages", "x86_64 1 page persistent"},
                               {"x86_32 1 page", "x86_32 4 pages", "x86_32 1 page persistent"}};
    for (int a = 0; a < 2; a++)
        for (int pg = 0; pg < 3; pg++) {
            ctx = names[a][pg];
            g.next_frame = 0;
            g.next_ref = 8;
            memset(g.gnt, 0, ENTRIES * sizeof(*g.gnt));
            scenario(p, &g, path, a ? XB_ABI_X86_32 : XB_ABI_X86_64, pg == 1 ? 4 : 1, pg == 2);
        }
    ctx = "qos";
    g.next_frame = 0;
    g.next_ref = 8;
    memset(g.gnt, 0, ENTRIES * sizeof(*g.gnt));
    qos_scenario(p, &g, path);
    ctx = "slow path fairness";
    g.next_frame = 0;
    g.next_ref = 8;
    memset(g.gnt, 0, ENTRIES * sizeof(*g.gnt));
    fairness_scenario(p, &g);
    xb_platform_sim_remove_domain(p, DOMID);
    xb_platform_close(p);
    unlink(path);
    if (failures) {
        fprintf(stderr, "ring queue: %d failures\n", failures);
        return 1;
    }
    printf("ring queue: both ABIs, 1/4-page rings, 2 queues, with and without persistent grants: verified I/O, "
           "refusals, overflow, stop; QoS held, lifted live, drained by stop; slow path round-robin over queues\n");
    return 0;
}
