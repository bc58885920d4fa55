/* The slow-path worker pool (slowpath.c). */
#ifndef XB_SLOWPATH_H
#define XB_SLOWPATH_H
#include <time.h>
#include "queue.h"

static inline uint64_t xb_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Hand r to a worker; it comes back on q's done list (xb_slow_take_done) with r->err set. */
void xb_slow_submit(struct xb_queue *q, struct xb_req *r, enum xb_slow_kind kind);
/* Put a finished r (r->err set) on its own queue's done list and wake that queue thread. */
void xb_slow_post(struct xb_req *r);
/* The requests the workers finished for q since the last call (a list linked by next_free). */
struct xb_req *xb_slow_take_done(struct xb_queue *q);
#endif
