/*
 * Hostile frontends: what a broken or malicious guest does to its ring, so tests can show the
 * backend refuses it cleanly, keeps its other devices serving and still tears down. Each mode runs
 * for the configured runtime; what happened is left in the statistics (requests, responses,
 * error_responses), and none of it is an error of the guest run itself.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "queue_int.h"

static int stopping(struct xb_sg_queue *q)
{
    return __atomic_load_n(&q->stop_requested, __ATOMIC_RELAXED) ||
           __atomic_load_n(&q->abort_requested, __ATOMIC_RELAXED);
}

static int64_t ms_until(uint64_t deadline)
{
    uint64_t now = now_ns();
    return now >= deadline ? 0 : (int64_t)((deadline - now) / 1000000u) + 1;
}

static void notify(struct xb_sg_queue *q)
{
    uint64_t one = 1;
    if (write(q->cfg.evt_send_fd, &one, sizeof(one)) == sizeof(one))
        q->st.notifies++;
}

/* Wait out the runtime without consuming anything. */
static void hold(struct xb_sg_queue *q)
{
    int64_t ms;
    while (!stopping(q) && (ms = ms_until(q->deadline_ns)) > 0)
        sg_wait(q, ms);
}

static void overflow(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = (struct xb_sring_header *)q->sring;
    uint32_t bogus = q->rsp_cons + 4 * q->ring_size + 7;
    q->st.requests += bogus - q->req_prod_pvt;
    q->req_prod_pvt = bogus;
    __atomic_store_n(&h->req_prod, bogus, __ATOMIC_RELEASE);
    notify(q);
    hold(q);
    /* Whatever the backend answered, it is counted, never trusted. */
    uint32_t rp = __atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE);
    q->st.responses = rp - q->rsp_cons;
}

/* A random request: any opcode 0..7 (4 and 7 are not ops), random segment counts, sectors, grant
 * references and sector ranges; only the id is ours, so responses can be told apart. */
static void garbage_request(struct xb_sg_queue *q, uint64_t k, uint8_t *req)
{
    uint64_t x = sg_mix64(q->cfg.seed ^ sg_mix64(k + 0x6a7ba6e));
    for (unsigned i = 0; i < 112; i += 8) {
        x = sg_mix64(x);
        memcpy(req + i, &x, 8);
    }
    req[0] = (uint8_t)(x % 8);
    memcpy(req + (q->abi == XB_ABI_X86_64 ? 8 : 4), &k, sizeof(k));
}

static void garbage(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = (struct xb_sring_header *)q->sring;
    uint64_t k = 0;
    q->last_progress_ns = now_ns();
    while (!stopping(q) && now_ns() < q->deadline_ns) {
        uint32_t before = q->req_prod_pvt;
        while (q->req_prod_pvt - q->rsp_cons < q->ring_size && (!q->cfg.total_ios || k < q->cfg.total_ios)) {
            uint8_t req[112];
            garbage_request(q, k++, req);
            sg_put_request(q, req);
        }
        if (q->req_prod_pvt != before) /* the backend's time to answer starts now */
            q->last_progress_ns = now_ns();
        sg_publish(q);
        uint32_t rp = __atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE);
        if ((uint32_t)(rp - q->rsp_cons) > q->req_prod_pvt - q->rsp_cons)
            break; /* a broken answer: stop looking at the ring */
        int answered = rp != q->rsp_cons;
        for (; q->rsp_cons != rp; q->rsp_cons++) {
            int16_t status;
            memcpy(&status, (uint8_t *)xb_ring_entry(q->sring, q->abi, q->rsp_cons, q->ring_size) + 10,
                   sizeof(status));
            q->st.responses++;
            q->st.error_responses += status != XB_RSP_OKAY;
            q->last_progress_ns = now_ns();
        }
        if (q->cfg.total_ios && k >= q->cfg.total_ios && q->rsp_cons == q->req_prod_pvt)
            break;
        if (answered)
            continue; /* room in the ring again: refill before sleeping */
        __atomic_store_n(&h->rsp_event, q->rsp_cons + 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE) != q->rsp_cons)
            continue;
        /* The backend may well have stopped this ring: that is an answer too. */
        if (now_ns() - q->last_progress_ns > q->cfg.io_timeout_ns)
            break;
        int64_t ms = ms_until(q->deadline_ns), idle = ms_until(q->last_progress_ns + q->cfg.io_timeout_ns);
        sg_wait(q, idle < ms ? idle : ms);
    }
}

static void no_drain(struct xb_sg_queue *q)
{
    sg_fill(q);
    hold(q);
}

/* Notifications with nothing behind them, as fast as the guest can send them: the backend must
 * not spend more than its share of a core on them, nor grow anything per notification. */
static void flood(struct xb_sg_queue *q)
{
    uint64_t one = 1;
    while (!stopping(q) && now_ns() < q->deadline_ns && (!q->cfg.total_ios || q->st.notifies < q->cfg.total_ios))
        for (unsigned i = 0; i < 1024; i++)
            if (write(q->cfg.evt_send_fd, &one, sizeof(one)) == sizeof(one))
                q->st.notifies++;
}

/* Counts the responses there are (the ids are not checked: these modes reuse one slot for every
 * request). 1 if there were some, 0 if none, -1 on a broken answer. */
static int count_responses(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    uint32_t rp = __atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE);
    if ((uint32_t)(rp - q->rsp_cons) > q->req_prod_pvt - q->rsp_cons)
        return -1;
    if (rp == q->rsp_cons)
        return 0;
    for (; q->rsp_cons != rp; q->rsp_cons++) {
        int16_t status;
        memcpy(&status, (uint8_t *)xb_ring_entry(q->sring, q->abi, q->rsp_cons, q->ring_size) + 10, sizeof(status));
        q->st.responses++;
        q->st.error_responses += status != XB_RSP_OKAY;
    }
    q->last_progress_ns = now_ns();
    return 1;
}

/* Publish, then take the responses there are or sleep until the backend answers. 0: go on; -1: stop
 * (broken answer, stop asked, runtime over, or no answer for the io timeout). */
static int publish_and_wait(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    sg_publish(q);
    int r = count_responses(q);
    if (r)
        return r < 0 ? -1 : 0;
    if (q->rsp_cons == q->req_prod_pvt)
        return 0;
    __atomic_store_n(&h->rsp_event, q->rsp_cons + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE) != q->rsp_cons)
        return 0;
    if (stopping(q) || now_ns() >= q->deadline_ns || now_ns() - q->last_progress_ns > q->cfg.io_timeout_ns)
        return -1;
    int64_t ms = ms_until(q->deadline_ns), idle = ms_until(q->last_progress_ns + q->cfg.io_timeout_ns);
    sg_wait(q, idle < ms ? idle : ms);
    return 0;
}

static void push_write(struct xb_sg_queue *q, struct slot *s)
{
    s->kind = K_WRITE;
    for (unsigned part = 0; part < q->parts; part++)
        sg_push_rw(q, s, 0, part);
    q->st.writes++;
    q->st.bytes_written += q->cfg.bs;
}

static void big_writes(struct xb_sg_queue *q)
{
    struct slot *s = &q->slots[0];
    uint64_t k = 0;
    q->last_progress_ns = now_ns();
    while (!stopping(q) && now_ns() < q->deadline_ns) {
        while (ring_free(q) >= q->parts && (!q->cfg.total_ios || k < q->cfg.total_ios)) {
            s->block = q->cfg.region_start + k++ % q->cfg.region_blocks;
            push_write(q, s);
        }
        if (q->cfg.total_ios && k >= q->cfg.total_ios && q->rsp_cons == q->req_prod_pvt)
            break;
        if (publish_and_wait(q) < 0)
            break;
    }
}

static void discard_loop(struct xb_sg_queue *q)
{
    struct slot *s = &q->slots[0];
    s->block = q->cfg.region_start;
    q->last_progress_ns = now_ns();
    for (uint64_t k = 0; !q->cfg.total_ios || k < q->cfg.total_ios; k++) {
        push_write(q, s);
        while (q->rsp_cons != q->req_prod_pvt)
            if (publish_and_wait(q) < 0)
                return;
        sg_push_discard(q, s, 0);
        q->st.discards++;
        while (q->rsp_cons != q->req_prod_pvt)
            if (publish_and_wait(q) < 0)
                return;
        if (stopping(q) || now_ns() >= q->deadline_ns)
            return;
    }
}

void sg_hostile_run(struct xb_sg_queue *q)
{
    switch (q->cfg.hostile) {
    case XB_SG_HOSTILE_OVERFLOW: overflow(q); break;
    case XB_SG_HOSTILE_GARBAGE: garbage(q); break;
    case XB_SG_HOSTILE_NO_DRAIN: no_drain(q); break;
    case XB_SG_HOSTILE_FLOOD: flood(q); break;
    case XB_SG_HOSTILE_BIG_WRITES: big_writes(q); break;
    case XB_SG_HOSTILE_DISCARD_LOOP: discard_loop(q); break;
    default: break;
    }
}

struct sg_rewriter {
    struct xb_sg_queue *q;
    pthread_t thread;
    int stop; /* atomic */
};

/* Flip random bits of every ring entry past its first 16 bytes: the sector, segments and grant
 * references of requests already published (and being processed). The first 16 bytes are left
 * alone because a response reuses them (id, operation, status), and the guest must still be able
 * to read its answers: what is tested is that the backend acts on one copy of each request. */
static void *rewriter_main(void *arg)
{
    struct sg_rewriter *r = arg;
    struct xb_sg_queue *q = r->q;
    size_t esize = xb_ring_entry_size(q->abi);
    uint64_t x = sg_mix64(q->cfg.seed ^ 0x7e3a1d);
    while (!__atomic_load_n(&r->stop, __ATOMIC_RELAXED)) {
        for (unsigned i = 0; i < 4096; i++) {
            x = sg_mix64(x);
            uint8_t *e = xb_ring_entry(q->sring, q->abi, (uint32_t)x, q->ring_size);
            size_t off = 16 + (size_t)((x >> 32) % (esize - 16));
            __atomic_fetch_xor(e + off, (uint8_t)(1u << ((x >> 8) & 7)), __ATOMIC_RELAXED);
        }
    }
    return NULL;
}

struct sg_rewriter *sg_rewriter_start(struct xb_sg_queue *q)
{
    struct sg_rewriter *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->q = q;
    if (pthread_create(&r->thread, NULL, rewriter_main, r)) {
        free(r);
        return NULL;
    }
    return r;
}

void sg_rewriter_stop(struct sg_rewriter *r)
{
    if (!r)
        return;
    __atomic_store_n(&r->stop, 1, __ATOMIC_RELAXED);
    pthread_join(r->thread, NULL);
    free(r);
}
