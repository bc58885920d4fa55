/* A small LRU cache of metadata clusters (L2 tables, refcount blocks), kept in
 * on-disk byte order so a writeback is a plain pwrite. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "qcow2.h"

int qc_cache_init(struct qcow2 *q, struct qc_cache *c, int is_l2)
{
    memset(c, 0, sizeof(*c));
    c->is_l2 = is_l2;
    for (int i = 0; i < QC_CACHE_ENTRIES; i++) {
        c->e[i].buf = malloc(q->cs);
        if (!c->e[i].buf)
            return -ENOMEM;
    }
    return 0;
}

void qc_cache_free(struct qc_cache *c)
{
    for (int i = 0; i < QC_CACHE_ENTRIES; i++)
        free(c->e[i].buf);
}

static int write_ent(struct qcow2 *q, struct qc_cache_ent *e)
{
    ssize_t r = xb_pwrite_full(q->fd, e->buf, q->cs, e->off);
    if (r < 0)
        return (int)r;
    if (e->off + q->cs > q->disk_size)
        q->disk_size = e->off + q->cs;
    e->dirty = 0;
    return 0;
}

int qc_cache_writeback(struct qcow2 *q, struct qc_cache *c)
{
    for (int i = 0; i < QC_CACHE_ENTRIES; i++) {
        if (c->e[i].dirty) {
            int r = write_ent(q, &c->e[i]);
            if (r)
                return r;
        }
    }
    return 0;
}

uint8_t *qc_cache_get(struct qcow2 *q, struct qc_cache *c, uint64_t off, int fresh, int *rc)
{
    struct qc_cache_ent *victim = NULL;
    *rc = 0;
    for (int i = 0; i < QC_CACHE_ENTRIES; i++) {
        struct qc_cache_ent *e = &c->e[i];
        if (e->off == off && off) {
            e->lru = ++c->tick;
            if (fresh) {
                memset(e->buf, 0, q->cs);
                e->dirty = 1;
            }
            return e->buf;
        }
        if (!victim || e->lru < victim->lru)
            victim = e;
    }
    if (victim->dirty) {
        /* An L2 table may point at clusters whose refcounts are still only in memory. */
        if (c->is_l2 && (*rc = qc_flush_refcounts(q)))
            return NULL;
        if ((*rc = write_ent(q, victim)))
            return NULL;
    }
    victim->off = 0;
    if (fresh) {
        memset(victim->buf, 0, q->cs);
        victim->dirty = 1;
    } else {
        ssize_t r = xb_pread_known(q->fd, victim->buf, q->cs, off, q->disk_size);
        if (r < 0) {
            *rc = (int)r;
            return NULL;
        }
    }
    victim->off = off;
    victim->lru = ++c->tick;
    return victim->buf;
}

void qc_cache_mark_dirty(struct qc_cache *c, const uint8_t *buf)
{
    for (int i = 0; i < QC_CACHE_ENTRIES; i++)
        if (c->e[i].buf == buf)
            c->e[i].dirty = 1;
}

int qc_cache_write_buf(struct qcow2 *q, struct qc_cache *c, const uint8_t *buf)
{
    for (int i = 0; i < QC_CACHE_ENTRIES; i++)
        if (c->e[i].buf == buf && c->e[i].off)
            return c->e[i].dirty ? write_ent(q, &c->e[i]) : 0;
    return -EIO;
}
