/*
 * Inside the data plane: a device, its queues and the in-flight requests of a
 * queue. Everything in a queue (ring indexes, request slots, io_uring, stats)
 * belongs to that queue's thread; the control plane only reads the stats with
 * relaxed atomic loads, sets `stopping`, and reads `failed` with acquire.
 */
#ifndef XB_QUEUE_H
#define XB_QUEUE_H

#include <liburing.h>
#include <pthread.h>
#include <stdint.h>
#include "parse.h"
#include "pgrant.h"
#include "xb_dataplane.h"
#include "xb_platform.h"

/* Statistics: single writer (the queue thread), lock-free readers: relaxed loads and stores are enough. */
#define ST_ADD(q, field, n)                                                                                            \
    __atomic_store_n(&(q)->stats.field, __atomic_load_n(&(q)->stats.field, __ATOMIC_RELAXED) + (uint64_t)(n),     \
                     __ATOMIC_RELAXED)
#define ST_SET(q, field, v) __atomic_store_n(&(q)->stats.field, (uint64_t)(v), __ATOMIC_RELAXED)

#define XB_DEFAULT_WORK_PER_WAKE 64u
#define XB_MAX_EXTENTS 16u        /* storage extents per request on the fast path; more goes the slow path */
#define XB_URING_ENTRIES 256u
#define XB_BUF_KEEP (128u * 1024u) /* a slot keeps its data buffer up to this size between requests */
#define XB_COPY_BATCH 1024u         /* grant-copy segments gathered across requests into one call */
#define XB_SLOW_WORKERS 2u          /* per device: threads for the drivers' synchronous ops */
#define XB_SLOW_STACK (1u << 20)

/* What a slow-path worker does for a request. */
enum xb_slow_kind { XB_SLOW_READ = 1, XB_SLOW_WRITE, XB_SLOW_FLUSH, XB_SLOW_DISCARD, XB_SLOW_FLUSH_WRITE };

struct xb_queue;
struct xb_journal;

/* One request taken from the ring and not answered yet. */
struct xb_req {
    struct xb_parsed_req p;
    struct xb_queue *q;
    uint64_t t_recv;    /* CLOCK_MONOTONIC ns when copied out of the ring */
    uint64_t t_storage; /* when storage I/O began (0: not yet) */
    uint64_t t_storage_end; /* when the last storage step ended */
    uint8_t *buf;       /* private, page-aligned data buffer: the segments back to back */
    size_t cap;
    size_t len; /* bytes of data (nr_sectors * 512) */
    unsigned pending; /* io_uring operations outstanding */
    int err;          /* first failure, a negative errno */
    int flush_after;  /* FLUSH/BARRIER carrying data: once copied in, a worker flushes, writes, flushes */
    uint8_t stat_op;  /* XB_STAT_* */
    int started;      /* a barrier's own work has begun */
    unsigned nr_ext;
    struct xb_extent ext[XB_MAX_EXTENTS];
    size_t ext_buf_off[XB_MAX_EXTENTS];
    uint64_t ext_done[XB_MAX_EXTENTS];
    enum xb_slow_kind slow_kind;
    struct xb_aio aio;      /* an asynchronous driver's operation (ops->aio_submit) */
    struct iovec aio_iov;
    uint64_t t_qos;         /* when it began waiting for a QoS limit */
    uint8_t qos_mask;       /* the limiters it waits for (bit i: dev->qos[i]), for their queued gauges */
    struct xb_req *next_free; /* also links the slow-path job and done lists, the memory and QoS waits */
};

/* The device's slow-path workers: the drivers' synchronous calls (qcow2 allocation, flush,
 * discard, anything not mappable) run here so a queue thread never blocks on storage. Jobs wait per
 * queue and the workers take them round-robin over the queues, so a queue that floods the workers
 * (a ring full of allocating writes) delays another queue's job by at most one job per queue. */
struct xb_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct {
        struct xb_req *head, *tail;
    } jobs[XB_MAX_QUEUES];
    unsigned next;    /* the queue whose jobs come first at the next pick */
    unsigned pending; /* jobs in all the lists */
    int quit;
    unsigned nthreads;
    pthread_t th[XB_SLOW_WORKERS];
};

/* One request's segments inside the queue's grant-copy batch. */
struct xb_copy_job {
    struct xb_req *r;
    unsigned first, n; /* its segments in the batch */
    unsigned failed;   /* filled in when the batch ran */
    uint8_t dir;       /* XB_COPY_* */
};

struct xb_device;

struct xb_queue {
    struct xb_device *dev;
    unsigned idx;
    int started;
    pthread_t thread;
    /* the shared ring */
    struct xb_sring_header *sring;
    struct xb_gmap *ring_map;
    uint32_t ring_size;
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
    struct xb_evtchn *ch;
    /* storage */
    struct io_uring uring;
    int uring_ok;
    int cq_fd;   /* eventfd: io_uring posted completions */
    int stop_fd; /* eventfd: the control plane asks the thread to stop */
    int slow_fd; /* eventfd: a slow-path worker finished a request of this queue */
    pthread_mutex_t done_mu;
    struct xb_req *slow_done; /* finished by workers, not yet answered (under done_mu) */
    /* requests */
    struct xb_req *reqs; /* ring_size slots: at most ring_size requests are unanswered */
    struct xb_req *free_reqs;
    unsigned in_flight;
    struct xb_req *barrier; /* a barrier waiting for the queue to drain, or running: the ring waits */
    /* Memory budget: bytes of data buffers held by this queue's request slots (in use or kept for
     * reuse), the part kept by free slots, and the limit. A request whose buffer would pass the
     * limit waits on mem_wait (the ring is not read further) until answered requests give theirs
     * back; mem_released says some did since the last try. */
    size_t mem_used, mem_cached, mem_limit;
    struct xb_req *mem_wait, *mem_wait_tail;
    int mem_released;
    /* QoS (qos.h): a request a limit holds back waits on qos_wait with those taken after it (the ring is
     * not read further, as for memory); qos_timer (a timerfd) wakes the thread when the limit allows the
     * first. qos_mask: which of the device's limiters held the first back (for their queued gauges). */
    struct xb_req *qos_wait, *qos_wait_tail;
    unsigned qos_waiting, qos_mask;
    int qos_timer;
    struct xb_copy_seg copy[XB_MAX_INDIRECT_PAGES_PER_REQUEST]; /* indirect pages */
    /* Data copies of all requests ready in one pass, done as one grant-copy call (one
     * hypercall on real Xen): writes before they go to storage, reads after. */
    struct xb_copy_seg batch[XB_COPY_BATCH];
    struct xb_copy_job jobs[XB_COPY_BATCH], jobs_run[XB_COPY_BATCH];
    unsigned batch_n, jobs_n;
    /* With persistent grants: the segments of the batch no mapping served, for the one grant copy. */
    struct xb_copy_seg rest[XB_COPY_BATCH];
    unsigned rest_idx[XB_COPY_BATCH];
    struct xb_pgnt_cache pgnt; /* persistent grants mapped for this queue (cap 0: not negotiated) */
    uint8_t *indirect_buf; /* XB_MAX_INDIRECT_PAGES_PER_REQUEST private pages */
    /* control */
    int stopping;               /* atomic */
    int failed;                 /* atomic; set once, with fail_msg */
    char fail_msg[XB_ERRLEN];
    struct xb_queue_stats stats; /* written by the queue thread only */
    struct xb_journal *journal;  /* journal hook: restart without guest impact (journal.c); NULL: none */
};

struct xb_device {
    struct xb_platform *p;
    struct xb_image *img;
    struct xb_device_config cfg;
    unsigned max_work;
    struct xb_parse_limits lim; /* size_sectors is read/written atomically (online resize) */
    pthread_mutex_t lock;       /* start/stop against each other */
    struct xb_pool pool;
    int stopped;
    int fail_fd; /* eventfd: written when a queue fails (xb_device_fail_fd) */
    struct xb_qos *qos[2]; /* the disk's limiter and its group's (each NULL: none), set before the queues start */
    struct xb_queue q[XB_MAX_QUEUES];
};

void *xb_queue_main(void *arg);
int xb_pool_start(struct xb_pool *pool);
void xb_pool_stop(struct xb_pool *pool);

#endif
