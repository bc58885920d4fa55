/* QoS limiters and their token buckets (qos.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qos.h"
#include "queue.h"
#include "slowpath.h"

#define NS 1000000000ull
#define TAT_MAX (UINT64_MAX / 4) /* tat saturates here: a cost of years at 1 B/s waits "forever", never wraps */

static uint64_t sat(unsigned __int128 v)
{
    return v > TAT_MAX ? TAT_MAX : (uint64_t)v;
}

void xb_bucket_set(struct xb_bucket *b, uint64_t rate, uint64_t burst, uint64_t now)
{
    if (rate > XB_QOS_MAX_RATE)
        rate = XB_QOS_MAX_RATE;
    if (burst > XB_QOS_MAX_RATE)
        burst = XB_QOS_MAX_RATE;
    if (rate && !burst)
        burst = rate / 10; /* 100 ms worth */
    /* Used of the old burst, in units x 10^9 (0: full, or newly limited). Carried as tokens left: a lower
     * limit does not forgive a debt, a higher one repays it faster, a smaller burst leaves at most the new
     * burst (a bucket emptied under a 4 s burst would otherwise stall 4 s under a 30 ms one). */
    unsigned __int128 used = 0;
    if (b->rate && b->tat > now)
        used = (unsigned __int128)(b->tat - now) * b->rate + b->rem;
    unsigned __int128 old_burst = (unsigned __int128)(b->rate ? b->burst : 0) * NS;
    unsigned __int128 new_burst = (unsigned __int128)burst * NS;
    if (b->rate) /* newly limited: the full burst is available */
        used = used + new_burst > old_burst ? used + new_burst - old_burst : 0;
    b->rate = rate;
    b->burst = rate ? burst : 0;
    if (!rate) {
        b->tau_ns = 0;
        b->tat = 0;
        b->rem = 0;
        return;
    }
    b->tau_ns = sat(new_burst / rate);
    b->tat = sat((unsigned __int128)now + used / rate);
    b->rem = (uint64_t)(used % rate);
}

uint64_t xb_bucket_wait(const struct xb_bucket *b, uint64_t now)
{
    if (!b->rate)
        return 0;
    if (b->tat <= b->tau_ns)
        return 0;
    uint64_t start = b->tat - b->tau_ns; /* the earliest a request may start */
    return start > now ? start - now : 0;
}

void xb_bucket_charge(struct xb_bucket *b, uint64_t cost, uint64_t now)
{
    if (!b->rate)
        return;
    if (b->tat < now) { /* idle: the bucket refilled (to its tolerance, not beyond) */
        b->tat = now;
        b->rem = 0;
    }
    unsigned __int128 t = (unsigned __int128)cost * NS + b->rem;
    b->tat = sat((unsigned __int128)b->tat + t / b->rate);
    b->rem = (uint64_t)(t % b->rate);
}

struct xb_qos *xb_qos_new(char *err)
{
    struct xb_qos *q = calloc(1, sizeof(*q));
    if (!q) {
        xb_seterr(err, "qos: out of memory");
        return NULL;
    }
    pthread_mutex_init(&q->mu, NULL);
    q->refs = 1;
    return q;
}

void xb_qos_ref(struct xb_qos *q)
{
    __atomic_add_fetch(&q->refs, 1, __ATOMIC_RELAXED);
}

void xb_qos_unref(struct xb_qos *q)
{
    if (!q || __atomic_sub_fetch(&q->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_destroy(&q->mu);
    free(q);
}

int xb_qos_set(struct xb_qos *q, const struct xb_qos_limits *lim, char *err)
{
    const uint64_t *v = (const uint64_t *)lim;
    for (size_t i = 0; i < sizeof(*lim) / sizeof(uint64_t); i++)
        if (v[i] > XB_QOS_MAX_RATE) {
            xb_seterr(err, "qos: limit %llu is beyond the maximum %llu", (unsigned long long)v[i],
                      (unsigned long long)XB_QOS_MAX_RATE);
            return -EINVAL;
        }
    uint64_t now = xb_now_ns();
    int active = 0;
    pthread_mutex_lock(&q->mu);
    q->lim = *lim;
    for (unsigned k = 0; k < XB_QOS_KINDS; k++) {
        xb_bucket_set(&q->iops[k], lim->iops[k], lim->iops_burst[k], now);
        xb_bucket_set(&q->bps[k], lim->bps[k], lim->bps_burst[k], now);
        active |= lim->iops[k] || lim->bps[k];
    }
    __atomic_store_n(&q->active, active, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&q->mu);
    return 0;
}

void xb_qos_get(struct xb_qos *q, struct xb_qos_limits *out)
{
    pthread_mutex_lock(&q->mu);
    *out = q->lim;
    pthread_mutex_unlock(&q->mu);
}

void xb_qos_get_stats(struct xb_qos *q, struct xb_qos_stats *out)
{
    const uint64_t *src = (const uint64_t *)&q->stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

static uint64_t max64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

/* ns before a request of this kind and size may start on q (0: now); q->mu held. */
static uint64_t wait_of(const struct xb_qos *q, unsigned kind, uint64_t bytes, uint64_t now)
{
    uint64_t w = max64(xb_bucket_wait(&q->iops[kind], now), xb_bucket_wait(&q->iops[XB_QOS_TOTAL], now));
    if (bytes) /* a request without data (flush, discard) only counts as an operation */
        w = max64(w, max64(xb_bucket_wait(&q->bps[kind], now), xb_bucket_wait(&q->bps[XB_QOS_TOTAL], now)));
    return w;
}

static void charge(struct xb_qos *q, unsigned kind, uint64_t bytes, uint64_t now)
{
    xb_bucket_charge(&q->iops[kind], 1, now);
    xb_bucket_charge(&q->iops[XB_QOS_TOTAL], 1, now);
    if (bytes) {
        xb_bucket_charge(&q->bps[kind], bytes, now);
        xb_bucket_charge(&q->bps[XB_QOS_TOTAL], bytes, now);
    }
    __atomic_add_fetch(&q->stats.admitted, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&q->stats.admitted_bytes, bytes, __ATOMIC_RELAXED);
}

uint64_t xb_qos_admit(struct xb_qos *a, struct xb_qos *b, unsigned kind, uint64_t bytes, uint64_t now,
                      unsigned *blocked)
{
    /* Unlimited limiters cost one relaxed load each, no lock. */
    if (a && !__atomic_load_n(&a->active, __ATOMIC_ACQUIRE))
        a = NULL;
    if (b && !__atomic_load_n(&b->active, __ATOMIC_ACQUIRE))
        b = NULL;
    if (!a && !b)
        return 0;
    if (kind != XB_QOS_READ)
        kind = XB_QOS_WRITE;
    /* Both locks at once (always a before b: a disk's own limiter, then its group's), so the check and
     * the charge of both are one step against the other queues sharing either. */
    if (a)
        pthread_mutex_lock(&a->mu);
    if (b)
        pthread_mutex_lock(&b->mu);
    uint64_t wa = a ? wait_of(a, kind, bytes, now) : 0;
    uint64_t wb = b ? wait_of(b, kind, bytes, now) : 0;
    if (!wa && !wb) {
        if (a)
            charge(a, kind, bytes, now);
        if (b)
            charge(b, kind, bytes, now);
    }
    if (b)
        pthread_mutex_unlock(&b->mu);
    if (a)
        pthread_mutex_unlock(&a->mu);
    if (blocked)
        *blocked = (wa ? 1u : 0u) | (wb ? 2u : 0u);
    return max64(wa, wb);
}

void xb_qos_queued(struct xb_qos *q, int delta, uint64_t waited_ns)
{
    if (delta > 0) {
        __atomic_add_fetch(&q->stats.queued, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&q->stats.throttled, 1, __ATOMIC_RELAXED);
    } else {
        __atomic_sub_fetch(&q->stats.queued, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&q->stats.throttled_ns, waited_ns, __ATOMIC_RELAXED);
    }
}
