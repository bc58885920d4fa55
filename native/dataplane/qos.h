/*
 * Per-disk and per-group QoS: token buckets the queue threads consult before starting a request
 * (docs/DESIGN.md, "QoS"). The arithmetic is GCRA (a token bucket kept as one "theoretical arrival
 * time"): no refill loop, exact in integers, and the time to wait falls out of it, so a throttled
 * queue arms one timer instead of polling. Only a queue whose request was refused sleeps on that timer;
 * a disk under its limits (or unlimited) takes no extra wake-up.
 */
#ifndef XB_QOS_H
#define XB_QOS_H

#include <pthread.h>
#include <stdint.h>
#include "xb_dataplane.h"

/* One bucket: `rate` units per second (0: unlimited), `burst` units, `tau_ns` the tolerance (burst / rate).
 * tat - now is what is used of the burst, in ns at the rate (0 or less: the bucket is full); rem the
 * fraction of a ns in units of 1/rate, so the long-run rate is exact whatever the rate. */
struct xb_bucket {
    uint64_t rate;
    uint64_t burst;
    uint64_t tau_ns;
    uint64_t tat;
    uint64_t rem;
};

/* Set rate and burst (units allowed at once after idleness on top of the rate; 0: rate / 10). What is
 * used of the burst carries over (the tokens left, at most the new burst; a debt stays a debt), at the
 * new rate: a change applies at once, in both directions. */
void xb_bucket_set(struct xb_bucket *b, uint64_t rate, uint64_t burst, uint64_t now);
/* ns until a request may start (0: now). A request may start while the bucket is not in debt beyond its
 * tolerance; its cost is then charged in full, so one request larger than the burst still goes. */
uint64_t xb_bucket_wait(const struct xb_bucket *b, uint64_t now);
void xb_bucket_charge(struct xb_bucket *b, uint64_t cost, uint64_t now);

/* A limiter: the buckets of one disk or one group, shared by queue threads of one or more devices. */
struct xb_qos {
    pthread_mutex_t mu; /* buckets and limits; never held while taking another limiter's lock except
                           disk -> group (xb_qos_admit), the one order, so no deadlock */
    int refs;           /* atomic */
    int active;         /* atomic: some limit is set (the lock is not taken otherwise) */
    struct xb_qos_limits lim;
    struct xb_bucket iops[XB_QOS_KINDS], bps[XB_QOS_KINDS];
    struct xb_qos_stats stats; /* atomic counters */
};

/* Whether a request of `kind` (XB_QOS_READ or XB_QOS_WRITE) and `bytes` may start now on both limiters
 * (either may be NULL), charging both if so; else the ns to wait, nothing charged, and `blocked` (if not
 * NULL) gets bit 0 for the first limiter, bit 1 for the second. */
uint64_t xb_qos_admit(struct xb_qos *a, struct xb_qos *b, unsigned kind, uint64_t bytes, uint64_t now,
                      unsigned *blocked);
void xb_qos_ref(struct xb_qos *q);
/* Whether q (may be NULL) has some limit set: one relaxed-enough load, no lock. */
static inline int xb_qos_active(struct xb_qos *q)
{
    return q && __atomic_load_n(&q->active, __ATOMIC_ACQUIRE);
}
/* Account one request that starts waiting (delta +1: counted as throttled once) or stops (-1, after
 * waiting `waited_ns`). */
void xb_qos_queued(struct xb_qos *q, int delta, uint64_t waited_ns);

#endif
