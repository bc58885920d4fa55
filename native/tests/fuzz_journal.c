/*
 * libFuzzer target: journal recovery (journal.c, xb_journal_attach with resume) against hostile ring
 * indexes. After a kill, the restarted daemon reads a journal file (written by itself, but by a
 * process that died at any point) and the shared ring, whose req_prod and rsp_prod the guest writes
 * as it likes. The input picks the ABI and ring size, the ring's indexes, the journal's indexes and
 * every slot (state, ring index, answered-at index); the header is valid unless the input asks for a
 * corrupt one. Recovery may refuse (with a message, the ring untouched) but must never crash, and
 * when it accepts, what it hands the queue must hold:
 *   - req_cons - rsp_prod_pvt = the requests to execute again, at most the ring size;
 *   - the ring's indexes are within a ring of the recovered ones (nothing past what the guest saw);
 *   - every request slot to execute again is a distinct slot, off the free list until replayed, and
 *     replays come in ring order, oldest first (by age before req_cons: requests are answered out
 *     of order, so one taken long before the oldest unanswered response index may still be in
 *     flight); the free list then holds every slot exactly once.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* The data plane is built with gcc; clang warns that the packed ring header's indexes may be
 * misaligned for atomics (they are 4-byte aligned in every ring: the header starts a page). */
#pragma clang diagnostic ignored "-Watomic-alignment"
#include "../dataplane/journal.c"

static char root[] = "/tmp/xb-fuzz-journal-XXXXXX";
static char jpath[300];

/* No event channel here: recovery notifies the guest once; count it. */
static unsigned notified;
int xb_evtchn_notify(struct xb_evtchn *ch)
{
    (void)ch;
    notified++;
    return 0;
}

static void cleanup(void)
{
    unlink(jpath);
    rmdir(root);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (!mkdtemp(root))
        abort();
    snprintf(jpath, sizeof(jpath), "%s/q0.journal", root);
    atexit(cleanup);
    return 0;
}

struct cursor {
    const uint8_t *p;
    size_t n;
};

static uint32_t take32(struct cursor *c)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        v = v << 8 | (c->n ? *c->p : 0);
        if (c->n) {
            c->p++;
            c->n--;
        }
    }
    return v;
}

static uint8_t take8(struct cursor *c)
{
    uint8_t v = c->n ? *c->p : 0;
    if (c->n) {
        c->p++;
        c->n--;
    }
    return v;
}

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "fuzz_journal: invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor c = {data, size};
    uint8_t mode = take8(&c);
    enum xb_abi abi = mode & 1 ? XB_ABI_X86_32 : XB_ABI_X86_64;
    unsigned pages = 1u << ((mode >> 1) % 3); /* 1, 2, 4 pages */
    int corrupt_header = (mode >> 3) & 1;
    /* "small" indexes near the journal's make accepted recoveries likely; the rest is anything */
    int near = (mode >> 4) & 1;
    uint32_t base = take32(&c);

    struct xb_device *d = calloc(1, sizeof(*d));
    if (!d)
        abort();
    d->cfg.abi = abi;
    d->cfg.nr_queues = 1;
    pthread_mutex_init(&d->lock, NULL);
    struct xb_queue *q = &d->q[0];
    q->dev = d;
    q->ring_size = xb_ring_size(abi, pages);
    uint32_t rs = q->ring_size;
    void *ring = aligned_alloc(XB_PAGE_SIZE, (size_t)pages * XB_PAGE_SIZE);
    q->reqs = calloc(rs, sizeof(*q->reqs));
    if (!ring || !q->reqs)
        abort();
    memset(ring, 0, (size_t)pages * XB_PAGE_SIZE);
    q->sring = ring;
    for (uint32_t i = rs; i-- > 0;) {
        q->reqs[i].q = q;
        q->reqs[i].next_free = q->free_reqs;
        q->free_reqs = &q->reqs[i];
    }
    uint32_t ring_req = take32(&c), ring_rsp = take32(&c), jcons = take32(&c), jrsp = take32(&c);
    if (near) {
        ring_req = base + ring_req % (2 * rs);
        ring_rsp = base + ring_rsp % (2 * rs);
        jcons = base + jcons % (2 * rs);
        jrsp = base + jrsp % (2 * rs);
    }
    q->sring->req_prod = ring_req;
    q->sring->rsp_prod = ring_rsp;

    /* the journal file a killed daemon left */
    size_t len = XB_JOURNAL_HDR + (size_t)rs * sizeof(struct xb_jslot);
    uint8_t *file = calloc(1, len);
    if (!file)
        abort();
    struct xb_jhdr *h = (struct xb_jhdr *)file;
    h->magic = XB_JOURNAL_MAGIC;
    h->version = XB_JOURNAL_VERSION;
    h->abi = (uint32_t)abi;
    h->ring_size = rs;
    h->slot_size = sizeof(struct xb_jslot);
    strncpy(h->ident, "fuzz", sizeof(h->ident) - 1);
    h->req_cons = jcons;
    h->rsp_prod_pvt = jrsp;
    if (corrupt_header)
        file[take8(&c) % sizeof(*h)] ^= (uint8_t)(1u << (take8(&c) & 7));
    struct xb_jslot *slots = (struct xb_jslot *)(file + XB_JOURNAL_HDR);
    for (uint32_t i = 0; i < rs && c.n; i++) {
        uint8_t st = take8(&c);
        slots[i].state = st < 200 ? st % 3 : st;
        uint32_t idx = take32(&c), at = take32(&c);
        slots[i].idx = near ? base + idx % (2 * rs) : idx;
        slots[i].answered_at = near ? base + at % (2 * rs) : at;
        memcpy(slots[i].raw, &i, sizeof(i));
    }
    FILE *f = fopen(jpath, "wb");
    if (!f || fwrite(file, 1, len, f) != len || fclose(f))
        abort();
    free(file);

    char err[XB_ERRLEN] = "";
    if (xb_device_set_journal(d, 0, jpath, "fuzz", 1, err))
        abort();
    notified = 0;
    if (xb_journal_attach(q, err) < 0) {
        CHECK(err[0] != 0);
        CHECK(q->sring->rsp_prod == ring_rsp && q->sring->req_prod == ring_req); /* the ring untouched */
    } else {
        uint32_t inflight = q->req_cons - q->rsp_prod_pvt;
        CHECK(inflight <= rs);
        CHECK((uint32_t)(q->rsp_prod_pvt - ring_rsp) <= rs);
        CHECK((uint32_t)(ring_req - q->req_cons) <= rs);
        uint8_t *seen = calloc(rs, 1);
        if (!seen)
            abort();
        unsigned nfree = 0;
        for (struct xb_req *r = q->free_reqs; r; r = r->next_free) {
            CHECK(r >= q->reqs && r < q->reqs + rs && !seen[r - q->reqs]);
            seen[r - q->reqs] = 1;
            nfree++;
        }
        CHECK(nfree + inflight == rs); /* the slots to execute again are reserved, the rest free */
        uint8_t raw[sizeof(union xb_blkif_x86_64_request)];
        unsigned replays = 0;
        uint32_t prev = 0;
        while (xb_journal_next_replay(q, raw)) {
            struct xb_req *r = q->free_reqs; /* the slot it is journaled in, at the head */
            uint32_t slot = (uint32_t)(r - q->reqs), got;
            memcpy(&got, raw, sizeof(got));
            CHECK(got == slot && !seen[slot]);
            seen[slot] = 1;
            uint32_t pos = q->journal->slots[slot].idx - q->req_cons; /* wraps: older = smaller */
            CHECK(pos >= 0x80000000u && (replays == 0 || pos > prev)); /* taken before req_cons, in ring order */
            prev = pos;
            replays++;
        }
        CHECK(replays == inflight);
        CHECK(notified == 1 && q->sring->rsp_prod == q->rsp_prod_pvt); /* published once */
        free(seen);
    }
    xb_journal_detach(q);
    unlink(jpath);
    free(q->reqs);
    free(ring);
    pthread_mutex_destroy(&d->lock);
    free(d);
    return 0;
}
