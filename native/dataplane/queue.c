/*
 * The queue thread: consume the shared ring, validate, move data by grant
 * copy, do the storage I/O (io_uring on the driver's extents, else the
 * driver's synchronous slow path, inline on this thread), answer out of order
 * as requests complete, and notify the guest only when ring.h says it waits.
 */
#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include "journal.h"
#include "qos.h"
#include "queue.h"
#include "slowpath.h"

#define now_ns xb_now_ns

static unsigned lat_bucket(uint64_t ns)
{
    for (unsigned i = 0; i < XB_LAT_BUCKETS - 1; i++)
        if (ns <= xb_lat_bounds_ns[i])
            return i;
    return XB_LAT_BUCKETS - 1;
}

static void queue_fail(struct xb_queue *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void queue_fail(struct xb_queue *q, const char *fmt, ...)
{
    if (__atomic_load_n(&q->failed, __ATOMIC_RELAXED))
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->fail_msg, sizeof(q->fail_msg), fmt, ap);
    va_end(ap);
    ST_ADD(q, ring_protocol_errors, 1);
    __atomic_store_n(&q->failed, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(q->dev->fail_fd, &one, sizeof(one)) < 0) {
        /* only on counter overflow: it is readable anyway */
    }
}

/* ---- ring ---- */

/* One response, field by field: the padding of the entry is never written (XSA-216). */
static void put_response(struct xb_queue *q, uint64_t id, uint8_t operation, int16_t status)
{
    enum xb_abi abi = q->dev->cfg.abi;
    void *e = xb_ring_entry(q->sring, abi, q->rsp_prod_pvt, q->ring_size);
    if (abi == XB_ABI_X86_32) {
        struct xb_blkif_x86_32_response *r = e;
        r->id = id;
        r->operation = operation;
        r->status = status;
    } else {
        struct xb_blkif_x86_64_response *r = e;
        r->id = id;
        r->operation = operation;
        r->status = status;
    }
    q->rsp_prod_pvt++;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, then notify only if the guest asked to be woken. */
static void push_responses(struct xb_queue *q)
{
    uint32_t old = __atomic_load_n(&q->sring->rsp_prod, __ATOMIC_RELAXED);
    uint32_t now = q->rsp_prod_pvt;
    if (old == now)
        return;
    __atomic_store_n(&q->sring->rsp_prod, now, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = __atomic_load_n(&q->sring->rsp_event, __ATOMIC_RELAXED);
    if ((uint32_t)(now - ev) < (uint32_t)(now - old)) {
        xb_evtchn_notify(q->ch);
        ST_ADD(q, notifications_out, 1);
    }
}

static uint32_t unconsumed(struct xb_queue *q)
{
    uint32_t rp = __atomic_load_n(&q->sring->req_prod, __ATOMIC_ACQUIRE);
    uint32_t reqs = rp - q->req_cons;
    uint32_t room = q->ring_size - (q->req_cons - q->rsp_prod_pvt);
    return reqs < room ? reqs : room;
}

/* ---- requests ---- */

static void mem_gauge(struct xb_queue *q)
{
    ST_SET(q, mem_bytes, q->mem_used);
    if (q->mem_used > q->stats.mem_peak)
        ST_SET(q, mem_peak, q->mem_used);
}

static void free_buf(struct xb_queue *q, struct xb_req *r)
{
    free(r->buf);
    q->mem_used -= r->cap;
    r->buf = NULL;
    r->cap = 0;
    q->mem_released = 1;
}

static void release_req(struct xb_queue *q, struct xb_req *r)
{
    if (r->cap > XB_BUF_KEEP)
        free_buf(q, r);
    else if (r->buf) /* kept for the next request in this slot, still counted */
        q->mem_cached += r->cap;
    if (r->cap)
        q->mem_released = 1;
    mem_gauge(q);
    r->next_free = q->free_reqs;
    q->free_reqs = r;
}

/* Free slots give their kept buffers back (the budget is better spent on requests waiting). */
static void trim_cache(struct xb_queue *q)
{
    for (struct xb_req *r = q->free_reqs; r && q->mem_cached; r = r->next_free)
        if (r->buf) {
            q->mem_cached -= r->cap;
            free_buf(q, r);
        }
}

/* Answer an accepted request and account for it. */
static void finish(struct xb_queue *q, struct xb_req *r, int16_t status, int err_reason)
{
    put_response(q, r->p.id, r->p.operation, status);
    xb_journal_answered(q, r); /* journal hook */
    uint64_t lat = now_ns() - r->t_recv;
    unsigned op = r->stat_op;
    if (r->t_storage && r->t_storage_end >= r->t_storage) {
        uint64_t st = r->t_storage_end - r->t_storage;
        ST_ADD(q, op[op].storage_buckets[lat_bucket(st)], 1);
        ST_ADD(q, op[op].storage_sum_ns, st);
    }
    ST_ADD(q, op[op].requests, 1);
    if (status == XB_RSP_OKAY)
        ST_ADD(q, op[op].bytes, r->len);
    else {
        ST_ADD(q, op[op].errors, 1);
        if (err_reason >= 0)
            ST_ADD(q, errors[err_reason], 1);
    }
    ST_ADD(q, op[op].lat_buckets[lat_bucket(lat)], 1);
    ST_ADD(q, op[op].lat_sum_ns, lat);
    q->in_flight--;
    ST_SET(q, in_flight, q->in_flight);
    if (q->barrier == r)
        q->barrier = NULL;
    release_req(q, r);
}

/* An accepted request whose data could not be fetched from the guest (grant copy failed): answered
 * like a refusal, before storage saw anything. */
static void refuse_taken(struct xb_queue *q, struct xb_req *r, enum xb_refusal why)
{
    ST_ADD(q, refusals[why], 1);
    put_response(q, r->p.id, r->p.operation, XB_RSP_ERROR);
    xb_journal_answered(q, r); /* journal hook */
    q->in_flight--;
    ST_SET(q, in_flight, q->in_flight);
    if (q->barrier == r)
        q->barrier = NULL;
    release_req(q, r);
}

static int err_reason_of(int err)
{
    if (err == -EDQUOT) /* the image at its size bound (qcow2), or a filesystem quota */
        return XB_ERR_QUOTA;
    return err == -ENOSPC ? XB_ERR_NOSPC : XB_ERR_IO;
}

/* A data buffer of len bytes for r (a slot taken from the free list). -EAGAIN: the queue's memory
 * budget is spent by requests in flight; r waits until some are answered. A request is never made
 * to wait while nothing else holds memory, so the queue always progresses. */
static int ensure_buf(struct xb_queue *q, struct xb_req *r, size_t len)
{
    if (r->cap >= len && r->buf)
        return 0;
    if (r->buf)
        free_buf(q, r);
    size_t cap = (len + XB_PAGE_SIZE - 1) & ~((size_t)XB_PAGE_SIZE - 1);
    if (cap == 0)
        cap = XB_PAGE_SIZE;
    if (q->mem_used + cap > q->mem_limit) {
        trim_cache(q);
        if (q->mem_used && q->mem_used + cap > q->mem_limit)
            return -EAGAIN;
    }
    void *b;
    if (posix_memalign(&b, XB_PAGE_SIZE, cap) != 0)
        return -ENOMEM;
    r->buf = b;
    r->cap = cap;
    q->mem_used += cap;
    mem_gauge(q);
    return 0;
}

static void batch_run(struct xb_queue *q);

/* Queue the grant copy of every segment of r between the guest pages and its packed private
 * buffer; batch_run() does it, together with the other requests' copies, and moves r on. */
static void copy_later(struct xb_queue *q, struct xb_req *r, uint8_t dir)
{
    if (q->batch_n + r->p.nseg > XB_COPY_BATCH)
        batch_run(q);
    struct xb_copy_job *j = &q->jobs[q->jobs_n++];
    j->r = r;
    j->first = q->batch_n;
    j->n = r->p.nseg;
    j->dir = dir;
    size_t off = 0;
    for (unsigned i = 0; i < r->p.nseg; i++) {
        const struct xb_seg *s = &r->p.seg[i];
        struct xb_copy_seg *c = &q->batch[q->batch_n++];
        uint16_t len = (uint16_t)(((unsigned)s->last_sect - s->first_sect + 1u) << XB_SECTOR_SHIFT);
        c->gref = s->gref;
        c->domid = q->dev->cfg.domid;
        c->offset = (uint16_t)(s->first_sect << XB_SECTOR_SHIFT);
        c->len = len;
        c->dir = dir;
        c->status = 0;
        c->local = r->buf + off;
        off += len;
    }
}

static void storage_done(struct xb_queue *q, struct xb_req *r);
static void start_rw(struct xb_queue *q, struct xb_req *r, int write);

/* Move the data of n segments: through the persistent mappings where the frontend negotiated
 * them (memcpy), the rest in one grant copy call. Returns what xb_grant_copy says of the rest (0 if
 * every segment is done); each segment's status is set. */
static int copy_segments(struct xb_queue *q, struct xb_copy_seg *segs, unsigned n)
{
    if (!q->pgnt.cap)
        return xb_grant_copy(q->dev->p, segs, n);
    unsigned nr = 0;
    for (unsigned i = 0; i < n; i++) {
        struct xb_copy_seg *s = &segs[i];
        uint8_t *page = xb_pgnt_page(q, s->gref);
        if (page) {
            /* offset + len <= one page: parse.c checked first_sect <= last_sect <= 7 */
            if (s->dir == XB_COPY_TO_GUEST)
                memcpy(page + s->offset, s->local, s->len);
            else
                memcpy(s->local, page + s->offset, s->len);
            s->status = 0;
            continue;
        }
        q->rest[nr] = *s;
        q->rest_idx[nr++] = i;
    }
    if (nr == 0)
        return 0;
    int rc = xb_grant_copy(q->dev->p, q->rest, nr);
    for (unsigned k = 0; k < nr; k++)
        segs[q->rest_idx[k]].status = q->rest[k].status;
    return rc;
}

/* Run the gathered grant copies, then move each request on: a write to storage, a read to its
 * answer; a request whose copy failed is answered with an error (a write never reaches storage). */
static void batch_run(struct xb_queue *q)
{
    while (q->jobs_n) {
        unsigned nj = q->jobs_n, ns = q->batch_n;
        int rc = copy_segments(q, q->batch, ns);
        unsigned total = 0;
        for (unsigned k = 0; k < nj; k++) {
            struct xb_copy_job *j = &q->jobs[k];
            j->failed = 0;
            for (unsigned i = j->first; rc != 0 && i < j->first + j->n; i++)
                j->failed += q->batch[i].status != 0;
            total += j->failed;
        }
        for (unsigned k = 0; k < nj; k++) {
            struct xb_copy_job *j = &q->jobs[k];
            if (rc != 0 && total == 0)
                j->failed = j->n; /* the call failed without a per-segment status: trust nothing */
            if (j->failed)
                ST_ADD(q, grant_copy_failures, j->failed);
        }
        /* Moving requests on may queue new copies (a read answered at once): work on a snapshot. */
        memcpy(q->jobs_run, q->jobs, nj * sizeof(q->jobs[0]));
        q->jobs_n = 0;
        q->batch_n = 0;
        for (unsigned k = 0; k < nj; k++) {
            struct xb_copy_job *j = &q->jobs_run[k];
            if (j->dir == XB_COPY_FROM_GUEST) {
                if (j->failed) {
                    refuse_taken(q, j->r, XB_REFUSE_GRANT);
                } else if (j->r->flush_after) {
                    j->r->flush_after = 0;
                    j->r->t_storage = now_ns();
                    xb_slow_submit(q, j->r, XB_SLOW_FLUSH_WRITE);
                } else {
                    start_rw(q, j->r, 1);
                }
            } else {
                finish(q, j->r, j->failed ? XB_RSP_ERROR : XB_RSP_OKAY, j->failed ? XB_ERR_GRANT : -1);
            }
        }
    }
}

/* ---- asynchronous drivers (rbd): no extents, no workers; completions come on img->aio_fd ---- */

static void slow_finished(struct xb_queue *q, struct xb_req *r);

/* Hand r's storage operation to the driver; it comes back through reap_aio(). */
static void aio_start(struct xb_queue *q, struct xb_req *r, int op)
{
    struct xb_image *img = q->dev->img;
    r->t_storage = now_ns();
    r->err = 0;
    /* the discard answer rules of the slow path (EOPNOTSUPP) apply to the same op here */
    r->slow_kind = op == XB_AIO_DISCARD ? XB_SLOW_DISCARD : XB_SLOW_READ;
    r->aio_iov.iov_base = r->buf;
    r->aio_iov.iov_len = r->len;
    r->aio.op = op;
    r->aio.iov = &r->aio_iov;
    r->aio.iovcnt = 1;
    r->aio.off = r->p.sector << XB_SECTOR_SHIFT;
    r->aio.len = op == XB_AIO_DISCARD ? r->p.nr_sectors << XB_SECTOR_SHIFT : r->len;
    r->aio.result = 0;
    int rc = img->ops->aio_submit(img, &r->aio);
    if (rc < 0) {
        r->err = rc;
        r->t_storage_end = now_ns();
        slow_finished(q, r);
    }
}

/* Collect what the driver finished. The image's completions are one queue for all of a device's
 * queues: a request of another queue goes back to that queue (its done list, its eventfd). */
static void reap_aio(struct xb_queue *q)
{
    struct xb_image *img = q->dev->img;
    struct xb_aio *done[64];
    int n;
    do {
        n = img->ops->aio_reap(img, done, 64);
        for (int i = 0; i < n; i++) {
            struct xb_req *r = (struct xb_req *)((char *)done[i] - __builtin_offsetof(struct xb_req, aio));
            int64_t res = done[i]->result;
            r->err = res < 0 ? (int)res : 0;
            r->t_storage_end = now_ns();
            if (r->q == q)
                slow_finished(q, r);
            else
                xb_slow_post(r);
        }
    } while (n == 64);
    if (n < 0)
        queue_fail(q, "storage completion queue failed: %s", strerror(-n));
}

static void slow_io(struct xb_queue *q, struct xb_req *r, int write)
{
    xb_slow_submit(q, r, write ? XB_SLOW_WRITE : XB_SLOW_READ);
}

static int submit_extent(struct xb_queue *q, struct xb_req *r, unsigned i, int write)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->uring);
    if (!sqe) {
        io_uring_submit(&q->uring);
        sqe = io_uring_get_sqe(&q->uring);
        if (!sqe)
            return -EBUSY;
    }
    uint64_t done = r->ext_done[i];
    uint8_t *p = r->buf + r->ext_buf_off[i] + done;
    unsigned len = (unsigned)(r->ext[i].len - done);
    off_t off = (off_t)(r->ext[i].host_off + done);
    if (write)
        io_uring_prep_write(sqe, r->ext[i].fd, p, len, (uint64_t)off);
    else
        io_uring_prep_read(sqe, r->ext[i].fd, p, len, (uint64_t)off);
    io_uring_sqe_set_data64(sqe, ((uint64_t)(r - q->reqs) << 8) | i);
    return 0;
}

static void unmap_extents(struct xb_queue *q, struct xb_req *r)
{
    struct xb_image *img = q->dev->img;
    for (unsigned i = 0; i < r->nr_ext; i++)
        img->ops->unmap(img, &r->ext[i]);
    r->nr_ext = 0;
}

/* Start the data transfer of a READ or WRITE (the data is in r->buf for a write). */
static void start_rw(struct xb_queue *q, struct xb_req *r, int write)
{
    struct xb_image *img = q->dev->img;
    uint64_t off = r->p.sector << XB_SECTOR_SHIFT;
    if (img->ops->aio_submit) {
        aio_start(q, r, write ? XB_AIO_WRITE : XB_AIO_READ);
        return;
    }
    r->t_storage = now_ns();
    r->err = 0;
    r->nr_ext = 0;
    if (q->uring_ok) {
        uint64_t pos = 0;
        int fast = 1;
        while (pos < r->len) {
            if (r->nr_ext == XB_MAX_EXTENTS) {
                fast = 0;
                break;
            }
            struct xb_extent *e = &r->ext[r->nr_ext];
            int m = img->ops->map(img, off + pos, r->len - pos, write, e);
            if (m < 0) {
                unmap_extents(q, r);
                r->err = m;
                r->t_storage_end = now_ns();
                storage_done(q, r);
                return;
            }
            if (m == 0) {
                fast = 0;
                break;
            }
            r->nr_ext++;
            if (e->len == 0) {
                fast = 0;
                break;
            }
            if (e->len > r->len - pos)
                e->len = r->len - pos;
            r->ext_buf_off[r->nr_ext - 1] = (size_t)pos;
            r->ext_done[r->nr_ext - 1] = 0;
            pos += e->len;
        }
        if (fast) {
            r->pending = 0;
            for (unsigned i = 0; i < r->nr_ext; i++) {
                if (submit_extent(q, r, i, write) < 0) {
                    /* Only a full submission queue even after submitting: finish synchronously. */
                    r->err = -EBUSY;
                    break;
                }
                r->pending++;
            }
            if (r->pending)
                return; /* submitted with the rest of this pass by submit_pending(): one io_uring_enter per pass */
            unmap_extents(q, r);
            r->err = 0;
        } else {
            unmap_extents(q, r);
        }
    }
    slow_io(q, r, write);
}

/* The storage part of a request is over (r->err says how): copy out, answer. */
static void storage_done(struct xb_queue *q, struct xb_req *r)
{
    if (r->err) {
        finish(q, r, XB_RSP_ERROR, err_reason_of(r->err));
        return;
    }
    if (r->p.op == XB_OP_READ) {
        copy_later(q, r, XB_COPY_TO_GUEST);
        return;
    }
    finish(q, r, XB_RSP_OKAY, -1);
}

static void slow_finished(struct xb_queue *q, struct xb_req *r)
{
    if (r->slow_kind == XB_SLOW_DISCARD && r->err == -EOPNOTSUPP)
        finish(q, r, XB_RSP_EOPNOTSUPP, XB_ERR_OTHER);
    else
        storage_done(q, r);
}

/* Requests the slow-path workers (or another queue's reap_aio) finished for this queue. */
static void reap_slow(struct xb_queue *q)
{
    struct xb_req *r = xb_slow_take_done(q);
    while (r) {
        struct xb_req *next = r->next_free;
        slow_finished(q, r);
        r = next;
    }
}

static void reap_completions(struct xb_queue *q)
{
    struct io_uring_cqe *cqe;
    int resubmit = 0;
    while (io_uring_peek_cqe(&q->uring, &cqe) == 0) {
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&q->uring, cqe);
        struct xb_req *r = &q->reqs[ud >> 8];
        unsigned i = (unsigned)(ud & 0xff);
        int write = r->p.op != XB_OP_READ;
        if (res == -EAGAIN || res == -EINTR) {
            if (submit_extent(q, r, i, write) == 0) {
                resubmit = 1;
                continue;
            }
            res = -EIO;
        }
        if (res < 0) {
            if (!r->err)
                r->err = res;
        } else {
            r->ext_done[i] += (uint64_t)res;
            if (r->ext_done[i] < r->ext[i].len) {
                if (res == 0) {
                    /* End of file inside the extent: the image was cut under us (the drivers' slow
                     * path says EIO too); zeros would be silently wrong data. */
                    if (!r->err)
                        r->err = -EIO;
                } else if (submit_extent(q, r, i, write) == 0) {
                    resubmit = 1;
                    continue;
                } else if (!r->err) {
                    r->err = -EIO;
                }
            }
        }
        if (--r->pending == 0) {
            unmap_extents(q, r);
            r->t_storage_end = now_ns();
            storage_done(q, r);
        }
    }
    if (resubmit)
        io_uring_submit(&q->uring);
}

/* A FLUSH or BARRIER, or the data part of one, now that nothing else is in the way. */
static void start_flush(struct xb_queue *q, struct xb_req *r)
{
    r->started = 1;
    if (r->p.nseg) {
        r->flush_after = 1;
        copy_later(q, r, XB_COPY_FROM_GUEST);
        return;
    }
    if (q->dev->img->ops->aio_submit) {
        aio_start(q, r, XB_AIO_FLUSH);
        return;
    }
    r->t_storage = now_ns();
    xb_slow_submit(q, r, XB_SLOW_FLUSH);
}

static int fetch_indirect(struct xb_queue *q, struct xb_req *r)
{
    unsigned left = r->p.nseg;
    for (unsigned k = 0; k < r->p.nr_indirect_pages; k++) {
        unsigned n = left < XB_SEGS_PER_INDIRECT_FRAME ? left : (unsigned)XB_SEGS_PER_INDIRECT_FRAME;
        struct xb_copy_seg *c = &q->copy[k];
        c->gref = r->p.indirect_grefs[k];
        c->domid = q->dev->cfg.domid;
        c->offset = 0;
        c->len = (uint16_t)(n * sizeof(struct xb_blkif_segment));
        c->dir = XB_COPY_FROM_GUEST;
        c->status = 0;
        c->local = q->indirect_buf + (size_t)k * XB_PAGE_SIZE;
        left -= n;
    }
    if (copy_segments(q, q->copy, r->p.nr_indirect_pages) == 0)
        return 0;
    ST_ADD(q, grant_copy_failures, 1);
    return -EIO;
}

static uint8_t stat_op_of(uint8_t op)
{
    switch (op) {
    case XB_OP_READ:
        return XB_STAT_READ;
    case XB_OP_WRITE:
        return XB_STAT_WRITE;
    case XB_OP_FLUSH_DISKCACHE:
        return XB_STAT_FLUSH;
    case XB_OP_DISCARD:
        return XB_STAT_DISCARD;
    default:
        return XB_STAT_BARRIER;
    }
}

/* The memory budget is spent: r waits, and the ring is not read further until it could start (a
 * guest filling its rings with large requests holds at most the budget, not ring size x 1 MiB). */
static void wait_for_memory(struct xb_queue *q, struct xb_req *r)
{
    if (!q->mem_wait)
        ST_ADD(q, mem_waits, 1);
    r->next_free = NULL;
    if (q->mem_wait_tail)
        q->mem_wait_tail->next_free = r;
    else
        q->mem_wait = r;
    q->mem_wait_tail = r;
}

static void dispatch(struct xb_queue *q, struct xb_req *r);

static void refuse(struct xb_queue *q, struct xb_req *r)
{
    ST_ADD(q, refusals[r->p.refusal], 1);
    put_response(q, r->p.id, r->p.operation, r->p.rsp_status);
    xb_journal_answered(q, r); /* journal hook */
    release_req(q, r);
}

/* ---- QoS (qos.h) ---- */

static void start_taken(struct xb_queue *q, struct xb_req *r);

/* Wake the thread in `ns` (at least 1: 0 would disarm the timer). */
static void qos_arm(struct xb_queue *q, uint64_t ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    if (!ns)
        ns = 1;
    its.it_value.tv_sec = (time_t)(ns / 1000000000ull);
    its.it_value.tv_nsec = (long)(ns % 1000000000ull);
    if (timerfd_settime(q->qos_timer, 0, &its, NULL) < 0)
        queue_fail(q, "qos timer: %s", strerror(errno));
}

static void qos_enqueue(struct xb_queue *q, struct xb_req *r, uint64_t now)
{
    r->t_qos = now;
    r->qos_mask = (uint8_t)q->qos_mask;
    r->next_free = NULL;
    if (q->qos_wait_tail)
        q->qos_wait_tail->next_free = r;
    else
        q->qos_wait = r;
    q->qos_wait_tail = r;
    q->qos_waiting++;
    ST_SET(q, qos_queued, q->qos_waiting);
    ST_ADD(q, qos_throttled, 1);
    for (unsigned i = 0; i < 2; i++)
        if (r->qos_mask & (1u << i))
            xb_qos_queued(q->dev->qos[i], 1, 0);
}

static unsigned qos_kind(const struct xb_req *r)
{
    return r->p.op == XB_OP_READ ? XB_QOS_READ : XB_QOS_WRITE;
}

/* 1 if a limit holds r back (it waits on qos_wait, behind any request already waiting), 0 if it may
 * start now (and was charged). No limiter, or none active: no clock read, no lock. */
static int qos_hold(struct xb_queue *q, struct xb_req *r)
{
    struct xb_device *d = q->dev;
    if (!q->qos_wait && !xb_qos_active(d->qos[0]) && !xb_qos_active(d->qos[1]))
        return 0;
    uint64_t now = now_ns();
    if (!q->qos_wait) {
        unsigned blocked = 0;
        uint64_t w = xb_qos_admit(d->qos[0], d->qos[1], qos_kind(r), r->len, now, &blocked);
        if (!w)
            return 0;
        q->qos_mask = blocked;
        qos_arm(q, w);
    }
    qos_enqueue(q, r, now);
    return 1;
}

/* Start the waiting requests the limits allow now, in order; re-arm the timer for the first that must
 * wait on. halt: the queue stops, so everything taken runs now (a drain is never held by a limit). */
static void qos_resume(struct xb_queue *q, int halt)
{
    struct xb_device *d = q->dev;
    while (q->qos_wait) {
        struct xb_req *r = q->qos_wait;
        uint64_t now = now_ns();
        if (!halt) {
            unsigned blocked = 0;
            uint64_t w = xb_qos_admit(d->qos[0], d->qos[1], qos_kind(r), r->len, now, &blocked);
            if (w) {
                q->qos_mask = blocked;
                qos_arm(q, w);
                return;
            }
        }
        q->qos_wait = r->next_free;
        if (!q->qos_wait)
            q->qos_wait_tail = NULL;
        q->qos_waiting--;
        uint64_t waited = now - r->t_qos;
        ST_SET(q, qos_queued, q->qos_waiting);
        ST_ADD(q, qos_throttled_ns, waited);
        for (unsigned i = 0; i < 2; i++)
            if (r->qos_mask & (1u << i))
                xb_qos_queued(d->qos[i], -1, waited);
        start_taken(q, r);
    }
}

/* Take one request (a private copy of its ring entry) through validation and start it. */
static void handle_request(struct xb_queue *q, const void *raw)
{
    struct xb_req *r = q->free_reqs;
    if (!r) { /* cannot happen: consume() never takes more than ring_size unanswered requests */
        queue_fail(q, "internal error: no free request slot");
        return;
    }
    q->free_reqs = r->next_free;
    q->mem_cached -= r->cap;
    r->t_recv = now_ns();
    struct xb_parse_limits lim = q->dev->lim;
    lim.size_sectors = __atomic_load_n(&q->dev->lim.size_sectors, __ATOMIC_RELAXED);
    int pr = xb_parse_request(q->dev->cfg.abi, raw, &lim, &r->p);
    if (pr == XB_PARSE_NEED_INDIRECT) {
        if (fetch_indirect(q, r) < 0) {
            r->p.refusal = XB_REFUSE_GRANT;
            r->p.rsp_status = XB_RSP_ERROR;
            pr = XB_PARSE_REFUSED;
        } else {
            pr = xb_parse_indirect(&r->p, q->indirect_buf, &lim);
        }
    }
    if (pr == XB_PARSE_REFUSED) {
        refuse(q, r);
        return;
    }
    r->stat_op = stat_op_of(r->p.operation == XB_OP_WRITE_BARRIER ? XB_OP_WRITE_BARRIER : r->p.op);
    r->len = r->p.op == XB_OP_DISCARD ? 0 : (size_t)(r->p.nr_sectors << XB_SECTOR_SHIFT);
    r->flush_after = 0;
    r->err = 0;
    r->nr_ext = 0;
    r->t_storage = 0;
    r->started = 0;
    r->t_storage_end = 0;
    q->in_flight++;
    ST_SET(q, in_flight, q->in_flight);
    if (r->p.nseg)
        ST_ADD(q, seg_buckets[xb_seg_bucket(r->p.nseg)], 1);
    if (qos_hold(q, r))
        return;
    start_taken(q, r);
}

/* A request past validation and QoS: its data buffer (or a wait for memory), then its start. */
static void start_taken(struct xb_queue *q, struct xb_req *r)
{
    if (r->len) {
        /* behind a request already waiting for memory, unless this slot's kept buffer will do */
        int e = q->mem_wait && !(r->buf && r->cap >= r->len) ? -EAGAIN : ensure_buf(q, r, r->len);
        if (e == -EAGAIN) {
            wait_for_memory(q, r);
            return;
        }
        if (e < 0) {
            finish(q, r, XB_RSP_ERROR, XB_ERR_OTHER);
            return;
        }
    }
    dispatch(q, r);
}

/* Requests waiting for memory, in the order taken, as far as the budget allows now. */
static void resume_waiting(struct xb_queue *q)
{
    q->mem_released = 0;
    while (q->mem_wait) {
        struct xb_req *r = q->mem_wait;
        int e = ensure_buf(q, r, r->len);
        if (e == -EAGAIN)
            return;
        q->mem_wait = r->next_free;
        if (!q->mem_wait)
            q->mem_wait_tail = NULL;
        if (e < 0)
            finish(q, r, XB_RSP_ERROR, XB_ERR_OTHER);
        else
            dispatch(q, r);
    }
}

/* Start a validated request whose data buffer is ready. */
static void dispatch(struct xb_queue *q, struct xb_req *r)
{
    switch (r->p.op) {
    case XB_OP_READ:
        start_rw(q, r, 0);
        break;
    case XB_OP_WRITE:
        copy_later(q, r, XB_COPY_FROM_GUEST);
        break;
    case XB_OP_FLUSH_DISKCACHE:
        start_flush(q, r);
        break;
    case XB_OP_WRITE_BARRIER:
        /* Everything taken before the barrier completes first; the ring waits until it is done. */
        q->barrier = r;
        if (q->in_flight == 1)
            start_flush(q, r);
        break;
    case XB_OP_DISCARD:
        if (q->dev->img->ops->aio_submit && !(r->p.discard_flag & XB_DISCARD_SECURE)) {
            aio_start(q, r, XB_AIO_DISCARD);
            break;
        }
        r->t_storage = now_ns();
        xb_slow_submit(q, r, XB_SLOW_DISCARD);
        break;
    default: /* parse only accepts the ops above */
        finish(q, r, XB_RSP_ERROR, XB_ERR_OTHER);
        break;
    }
}

static unsigned ring_bucket(uint32_t pending, uint32_t ring_size)
{
    /* <= 1/128, 1/64, ..., 1/2, then the rest */
    for (unsigned k = 0; k < XB_RING_BUCKETS - 1; k++)
        if ((uint64_t)pending << (XB_RING_BUCKETS - 1 - k) <= ring_size)
            return k;
    return XB_RING_BUCKETS - 1;
}

/* Consume up to max_work requests. Returns 1 if more may be waiting (do not sleep). */
static int consume(struct xb_queue *q)
{
    uint32_t rp = __atomic_load_n(&q->sring->req_prod, __ATOMIC_ACQUIRE);
    if ((uint32_t)(rp - q->rsp_prod_pvt) > q->ring_size) {
        queue_fail(q, "ring protocol error: guest produced past the ring (req_prod %u, responses %u, ring size %u)",
                   rp, q->rsp_prod_pvt, q->ring_size);
        return 0;
    }
    if (rp != q->req_cons)
        ST_ADD(q, ring_buckets[ring_bucket(rp - q->req_cons, q->ring_size)], 1);
    size_t esz = xb_ring_entry_size(q->dev->cfg.abi);
    unsigned n = 0;
    while (q->req_cons != rp && n < q->dev->max_work && !q->barrier && !q->mem_wait && !q->qos_wait) {
        if ((uint32_t)(q->req_cons - q->rsp_prod_pvt) >= q->ring_size)
            break;
        uint8_t raw[sizeof(union xb_blkif_x86_64_request)];
        /* The one read of this entry: everything after works on the private copy (XSA-155). */
        memcpy(raw, xb_ring_entry(q->sring, q->dev->cfg.abi, q->req_cons, q->ring_size), esz);
        xb_journal_take(q, raw, q->req_cons); /* journal hook: before the request is acted on */
        q->req_cons++;
        xb_journal_consumed(q); /* journal hook */
        n++;
        handle_request(q, raw);
    }
    if (q->barrier || q->mem_wait || q->qos_wait) /* resumed by the loop once the barrier, memory or limit allows */
        return 0;
    if (n == q->dev->max_work)
        return 1;
    /* RING_FINAL_CHECK_FOR_REQUESTS: ask for an event, then look once more. */
    if (unconsumed(q))
        return 1;
    __atomic_store_n(&q->sring->req_event, q->req_cons + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return unconsumed(q) ? 1 : 0;
}

/* Submit what is queued; 1 if some submissions are still waiting (the kernel said busy). */
static int submit_pending(struct xb_queue *q)
{
    if (!q->uring_ok || io_uring_sq_ready(&q->uring) == 0)
        return 0;
    io_uring_submit(&q->uring);
    return io_uring_sq_ready(&q->uring) != 0;
}

static void drain_fd(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        ;
}

void *xb_queue_main(void *arg)
{
    struct xb_queue *q = arg;
    struct xb_image *img = q->dev->img;
    int aio = img->ops->aio_submit != NULL;
    struct pollfd pfd[6] = {
        {.fd = xb_evtchn_fd(q->ch), .events = POLLIN},
        {.fd = q->cq_fd, .events = POLLIN},
        {.fd = q->stop_fd, .events = POLLIN},
        {.fd = q->slow_fd, .events = POLLIN},
        {.fd = aio ? img->aio_fd : -1, .events = POLLIN}, /* every queue of the device polls it */
        {.fd = q->qos_timer, .events = POLLIN},           /* armed only while a limit holds a request */
    };
    int busy = 1; /* look at the ring once before sleeping: the guest may have queued already */
    /* journal hook: after a daemon restart, the requests it took and did not answer, again */
    uint8_t replay[sizeof(union xb_blkif_x86_64_request)];
    while (xb_journal_next_replay(q, replay))
        handle_request(q, replay);
    for (;;) {
        int rc = poll(pfd, 6, busy ? 0 : -1);
        if (rc < 0 && errno != EINTR) {
            queue_fail(q, "poll failed: %s", strerror(errno));
            break;
        }
        if (rc > 0) {
            if (pfd[0].revents & POLLIN) {
                xb_evtchn_ack(q->ch);
                ST_ADD(q, notifications_in, 1);
            }
            if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                queue_fail(q, "event channel closed");
                pfd[0].fd = -1;
            }
            if (pfd[1].revents & POLLIN)
                drain_fd(q->cq_fd);
            if (pfd[2].revents & POLLIN)
                drain_fd(q->stop_fd);
            if (pfd[3].revents & POLLIN)
                drain_fd(q->slow_fd);
            if (pfd[4].revents & POLLIN)
                drain_fd(img->aio_fd); /* before polling the driver: a completion after this wakes us again */
            if (pfd[5].revents & POLLIN)
                drain_fd(q->qos_timer);
        }
        if (q->uring_ok)
            reap_completions(q);
        if (aio)
            reap_aio(q);
        reap_slow(q);
        if (q->mem_wait)
            resume_waiting(q);
        if (q->qos_wait)
            qos_resume(q, __atomic_load_n(&q->stopping, __ATOMIC_ACQUIRE) || __atomic_load_n(&q->failed, __ATOMIC_RELAXED));
        if (q->barrier && q->in_flight == 1 && !q->barrier->started)
            start_flush(q, q->barrier);
        batch_run(q);
        int halt = __atomic_load_n(&q->stopping, __ATOMIC_ACQUIRE) || __atomic_load_n(&q->failed, __ATOMIC_RELAXED);
        busy = 0;
        if (!halt)
            busy = consume(q);
        batch_run(q);
        push_responses(q);
        if (submit_pending(q))
            busy = 1;
        /* Buffers came back after the last try (reads answered by batch_run): try again before
         * sleeping, no event would come for them. */
        if (q->mem_wait && q->mem_released)
            busy = 1;
        halt = __atomic_load_n(&q->stopping, __ATOMIC_ACQUIRE) || __atomic_load_n(&q->failed, __ATOMIC_RELAXED);
        if (halt && q->in_flight == 0)
            break;
    }
    return NULL;
}
