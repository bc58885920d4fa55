/* The simulated blkfront's queue, shared by its source files: lifecycle (queue.c), ring protocol
 * (ring.c), workload (workload.c) and hostile modes (hostile.c). */
#ifndef XB_SG_QUEUE_INT_H
#define XB_SG_QUEUE_INT_H

#include <pthread.h>
#include <time.h>
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
    unsigned *free_stack;    /* idle slots; the top is used next */
    unsigned nfree;
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

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline struct xb_sring_header *hdr(struct xb_sg_queue *q)
{
    return (struct xb_sring_header *)q->sring;
}

static inline uint32_t ring_free(struct xb_sg_queue *q)
{
    return q->ring_size - (q->req_prod_pvt - q->rsp_cons);
}

static inline uint32_t slot_ref(struct xb_sg_queue *q, const struct slot *s, unsigned page)
{
    return q->cfg.pool_ref + (uint32_t)(s->page0 + page);
}

static inline uint64_t slot_frame(struct xb_sg_queue *q, const struct slot *s, unsigned page)
{
    return q->cfg.pool_frame + s->page0 + page;
}

static inline uint8_t *slot_buf(struct xb_sg_queue *q, const struct slot *s)
{
    return sg_page(q->d, slot_frame(q, s, 0));
}

/* ring.c: requests in the negotiated ABI, publication, responses */
void sg_put_request(struct xb_sg_queue *q, const void *req);
void sg_push_rw(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx, unsigned part);
void sg_push_flush(struct xb_sg_queue *q, unsigned slot_idx);
void sg_push_discard(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx);
void sg_publish(struct xb_sg_queue *q);
int sg_consume(struct xb_sg_queue *q);

/* hostile.c: the misbehaving modes that replace the workload loop */
void sg_hostile_run(struct xb_sg_queue *q);
/* REWRITE: a thread flipping the fields of published requests while the workload runs (NULL if it
 * could not start; stop accepts NULL). */
struct sg_rewriter;
struct sg_rewriter *sg_rewriter_start(struct xb_sg_queue *q);
void sg_rewriter_stop(struct sg_rewriter *r);
void sg_wait(struct xb_sg_queue *q, int64_t timeout_ms);

/* workload.c: what to issue next, and what a completion means */
void sg_fail(struct xb_sg_queue *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int sg_work_left(struct xb_sg_queue *q, uint64_t now);
void sg_fill(struct xb_sg_queue *q);
void sg_complete(struct xb_sg_queue *q, unsigned idx, uint64_t now);

#endif
