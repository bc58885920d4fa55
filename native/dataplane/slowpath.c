/*
 * The slow path: a small pool of worker threads per device runs the storage
 * driver's synchronous calls (preadv/pwritev for what ops->map cannot give as
 * a plain fd range, flush, discard), so a queue thread keeps answering
 * io_uring completions while qcow2 allocates or a disk flushes. A finished
 * request goes back to its own queue's done list and wakes that queue thread
 * through an eventfd; only the queue thread answers it.
 */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include "queue.h"
#include "slowpath.h"

static void run(struct xb_req *r)
{
    struct xb_image *img = r->q->dev->img;
    uint64_t off = r->p.sector << XB_SECTOR_SHIFT;
    struct iovec iov = {.iov_base = r->buf, .iov_len = r->len};
    ssize_t n;
    int rc;
    switch (r->slow_kind) {
    case XB_SLOW_READ:
    case XB_SLOW_WRITE:
        n = r->slow_kind == XB_SLOW_WRITE ? img->ops->pwritev(img, &iov, 1, off) : img->ops->preadv(img, &iov, 1, off);
        if (n < 0)
            r->err = (int)n;
        else if ((size_t)n != r->len)
            r->err = -EIO;
        break;
    case XB_SLOW_FLUSH:
        rc = img->ops->flush(img);
        r->err = rc < 0 ? rc : 0;
        break;
    case XB_SLOW_FLUSH_WRITE:
        /* A FLUSH or BARRIER carrying data: what was answered before is made durable first, then
         * the data is written and made durable too (preflush + FUA), like a journal commit needs. */
        rc = img->ops->flush(img);
        if (rc == 0) {
            n = img->ops->pwritev(img, &iov, 1, off);
            rc = n < 0 ? (int)n : (size_t)n != r->len ? -EIO : img->ops->flush(img);
        }
        r->err = rc < 0 ? rc : 0;
        break;
    case XB_SLOW_DISCARD:
        rc = img->ops->discard(img, off, r->p.nr_sectors << XB_SECTOR_SHIFT, (r->p.discard_flag & XB_DISCARD_SECURE) != 0);
        r->err = rc < 0 ? rc : 0;
        break;
    }
    r->t_storage_end = xb_now_ns();
}

void xb_slow_post(struct xb_req *r)
{
    struct xb_queue *q = r->q;
    pthread_mutex_lock(&q->done_mu);
    r->next_free = q->slow_done;
    q->slow_done = r;
    pthread_mutex_unlock(&q->done_mu);
    uint64_t one = 1;
    if (write(q->slow_fd, &one, sizeof(one)) < 0) {
        /* only on counter overflow, and then the queue thread is already due to wake */
    }
}

static void *worker(void *arg)
{
    struct xb_pool *pool = arg;
    for (;;) {
        pthread_mutex_lock(&pool->mu);
        while (!pool->pending && !pool->quit)
            pthread_cond_wait(&pool->cv, &pool->mu);
        if (!pool->pending) {
            pthread_mutex_unlock(&pool->mu);
            return NULL;
        }
        struct xb_req *r = NULL;
        for (unsigned k = 0; k < XB_MAX_QUEUES && !r; k++) { /* round-robin from where the last pick left */
            unsigned i = (pool->next + k) % XB_MAX_QUEUES;
            r = pool->jobs[i].head;
            if (r) {
                pool->jobs[i].head = r->next_free;
                if (!pool->jobs[i].head)
                    pool->jobs[i].tail = NULL;
                pool->next = (i + 1) % XB_MAX_QUEUES;
            }
        }
        pool->pending--;
        pthread_mutex_unlock(&pool->mu);
        run(r);
        xb_slow_post(r);
    }
}

int xb_pool_start(struct xb_pool *pool)
{
    if (pool->nthreads)
        return 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, XB_SLOW_STACK);
    int rc = 0;
    pool->quit = 0;
    while (pool->nthreads < XB_SLOW_WORKERS) {
        rc = pthread_create(&pool->th[pool->nthreads], &attr, worker, pool);
        if (rc)
            break;
        pool->nthreads++;
    }
    pthread_attr_destroy(&attr);
    if (rc && pool->nthreads == 0)
        return -rc;
    return 0; /* fewer workers than asked still serve */
}

void xb_pool_stop(struct xb_pool *pool)
{
    pthread_mutex_lock(&pool->mu);
    pool->quit = 1;
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (unsigned i = 0; i < pool->nthreads; i++)
        pthread_join(pool->th[i], NULL);
    pool->nthreads = 0;
}

void xb_slow_submit(struct xb_queue *q, struct xb_req *r, enum xb_slow_kind kind)
{
    struct xb_pool *pool = &q->dev->pool;
    r->slow_kind = kind;
    r->next_free = NULL;
    pthread_mutex_lock(&pool->mu);
    if (pool->jobs[q->idx].tail)
        pool->jobs[q->idx].tail->next_free = r;
    else
        pool->jobs[q->idx].head = r;
    pool->jobs[q->idx].tail = r;
    pool->pending++;
    pthread_cond_signal(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
}

struct xb_req *xb_slow_take_done(struct xb_queue *q)
{
    pthread_mutex_lock(&q->done_mu);
    struct xb_req *list = q->slow_done;
    q->slow_done = NULL;
    pthread_mutex_unlock(&q->done_mu);
    return list;
}
