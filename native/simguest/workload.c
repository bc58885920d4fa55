/* The workload: which block and operation comes next, the data pattern written and expected, and
 * what each completion means (statistics, verification, read-backs, generations). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "queue_int.h"

static int is_read_mode(int rw)
{
    return rw == XB_SG_RW_READ || rw == XB_SG_RW_RANDREAD;
}

void sg_fail(struct xb_sg_queue *q, const char *fmt, ...)
{
    if (!q->st.failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(q->st.error, sizeof(q->st.error), fmt, ap);
        va_end(ap);
    }
    q->st.failed = 1;
    q->draining = 1;
}

int sg_work_left(struct xb_sg_queue *q, uint64_t now)
{
    if (q->draining)
        return 0;
    if (q->cfg.total_ios && q->issued >= q->cfg.total_ios)
        return 0;
    if (q->cfg.runtime_ns && now >= q->deadline_ns)
        return 0;
    return 1;
}

static uint64_t block_of(struct xb_sg_queue *q, uint64_t k)
{
    uint64_t n = q->cfg.region_blocks, pass = k / n, i = k % n;
    if (!q->random)
        return q->cfg.region_start + i;
    if (pass != q->perm_pass || q->perm.n == 0) {
        sg_perm_init(&q->perm, n, q->cfg.seed ^ sg_mix64(pass + 0x5157));
        q->perm_pass = pass;
    }
    return q->cfg.region_start + sg_perm_apply(&q->perm, i);
}

static int block_busy(struct xb_sg_queue *q, uint64_t block)
{
    for (unsigned i = 0; i < q->cfg.iodepth; i++) {
        struct slot *s = &q->slots[i];
        if ((s->busy || s->pending_readback) && (s->kind == K_READ || s->kind == K_WRITE || s->kind == K_DISCARD) &&
            s->block == block)
            return 1;
    }
    return 0;
}

/* The slot the next I/O would use (the top of the free stack, taken by take_slot), or -1. */
static int free_slot(struct xb_sg_queue *q)
{
    return q->nfree ? (int)q->free_stack[q->nfree - 1] : -1;
}

static void take_slot(struct xb_sg_queue *q)
{
    q->nfree--;
}

static void start_slot(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    s->busy = 1;
    s->status = XB_RSP_OKAY;
    s->t0 = now;
    q->inflight++;
    if (s->kind == K_FLUSH) {
        s->nparts = s->parts_left = 1;
        sg_push_flush(q, idx);
        return;
    }
    if (s->kind == K_DISCARD) {
        s->nparts = s->parts_left = 1;
        sg_push_discard(q, s, idx);
        return;
    }
    s->nparts = s->parts_left = q->parts;
    memset(s->part_done, 0, q->parts);
    for (unsigned p = 0; p < q->parts; p++)
        sg_push_rw(q, s, idx, p);
}

/* Choose and start the next workload I/O in slot idx. Returns 0 if it must wait (block in flight). */
static int issue_next(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    const struct xb_sg_queue_config *c = &q->cfg;
    uint64_t k = q->issued;
    uint64_t block = block_of(q, k);
    int kind;
    if (c->rw == XB_SG_RW_TRIM || (c->discard_every && (k + 1) % c->discard_every == 0))
        kind = K_DISCARD;
    else if (q->mixed)
        kind = sg_mix64(c->seed ^ sg_mix64(k ^ 0xa11ce)) % 100 < c->rwmix_read ? K_READ : K_WRITE;
    else
        kind = is_read_mode(c->rw) ? K_READ : K_WRITE;
    uint32_t need = kind == K_DISCARD ? 1 : q->parts;
    if (ring_free(q) < need)
        return 0;
    if (kind == K_READ && q->verify_gens && q->recent_n) /* read something this run wrote: it can be checked */
        block = q->recent[sg_mix64(c->seed ^ sg_mix64(k ^ 0xbeef)) % q->recent_n];
    if (c->verify && block_busy(q, block))
        return 0; /* deterministic order: wait for the block rather than skip it */
    s->kind = kind;
    s->block = block;
    s->readback = 0;
    uint64_t rel = block - c->region_start;
    if (kind == K_WRITE) {
        uint32_t gen = 1;
        if (q->verify_gens)
            gen = q->gens[rel] == UINT16_MAX ? 1 : q->gens[rel] + 1u;
        s->gen = gen;
        xb_sg_pattern_fill(slot_buf(q, s), block * c->bs, c->bs, c->seed, gen);
    } else if (kind == K_READ) {
        s->gen = !c->verify ? 0 : q->verify_gens ? q->gens[rel] : 1;
        if (c->verify)
            memset(slot_buf(q, s), 0xdb, c->bs); /* a read that returns nothing must not pass */
    }
    q->issued++;
    start_slot(q, idx, now);
    if (kind == K_WRITE && c->flush_every && ++q->writes_issued % c->flush_every == 0)
        q->flush_pending = 1;
    return 1;
}

void sg_fill(struct xb_sg_queue *q)
{
    uint64_t now = now_ns();
    while (q->nreadbacks && !q->draining && ring_free(q) >= q->parts) {
        unsigned idx = q->readbacks[--q->nreadbacks];
        struct slot *s = &q->slots[idx];
        s->pending_readback = 0;
        s->kind = K_READ;
        s->readback = 1;
        memset(slot_buf(q, s), 0xdb, q->cfg.bs);
        start_slot(q, idx, now);
    }
    for (;;) {
        if (q->draining)
            break;
        if (q->flush_pending) {
            int idx = free_slot(q);
            if (idx < 0 || ring_free(q) < 1)
                break;
            q->flush_pending = 0;
            take_slot(q);
            q->slots[idx].kind = K_FLUSH;
            start_slot(q, (unsigned)idx, now);
            continue;
        }
        if (!sg_work_left(q, now))
            break;
        int idx = free_slot(q);
        if (idx < 0 || !issue_next(q, (unsigned)idx, now))
            break;
        take_slot(q);
    }
    sg_publish(q);
}

static const char *kind_name(int kind)
{
    static const char *names[] = {"read", "write", "flush", "discard"};
    return names[kind];
}

struct sector_text {
    char text[128];
};

/* What a sector that failed verification holds, for the error message. */
static struct sector_text describe_sector(const uint8_t *p)
{
    struct sector_text t;
    int zero = 1, poison = 1;
    for (unsigned i = 0; i < 512; i++) {
        zero &= p[i] == 0;
        poison &= p[i] == 0xdb;
    }
    uint64_t w[2];
    memcpy(w, p, sizeof(w));
    if (zero)
        snprintf(t.text, sizeof(t.text), "found zeros");
    else if (poison)
        snprintf(t.text, sizeof(t.text), "the buffer was not written by the backend");
    else
        snprintf(t.text, sizeof(t.text), "found a sector tagged offset %llu seed %llu generation %u",
                 (unsigned long long)w[0], (unsigned long long)(w[1] >> 32), (unsigned)(w[1] & 0xffffffffu));
    return t;
}

static void account(struct xb_sg_queue *q, unsigned idx, uint64_t now);

void sg_complete(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    account(q, idx, now);
    if (!q->slots[idx].pending_readback)
        q->free_stack[q->nfree++] = idx;
}

/* Statistics, verification and what comes next for the I/O that just completed in slot idx. */
static void account(struct xb_sg_queue *q, unsigned idx, uint64_t now)
{
    struct slot *s = &q->slots[idx];
    const struct xb_sg_queue_config *c = &q->cfg;
    uint64_t lat = now - s->t0;
    q->st.lat_count++;
    q->st.lat_sum_ns += lat;
    if (lat > q->st.lat_max_ns)
        q->st.lat_max_ns = lat;
    q->st.hist[sg_hist_index(lat)]++;
    s->busy = 0;
    q->inflight--;
    if (!c->persistent && (s->kind == K_READ || s->kind == K_WRITE))
        for (unsigned p = 0; p < q->slot_pages; p++)
            sg_revoke(q->d, slot_ref(q, s, p));
    uint64_t rel = s->block - c->region_start, off = s->block * c->bs;
    switch (s->kind) {
    case K_READ: q->st.reads++; q->st.bytes_read += c->bs; break;
    case K_WRITE: q->st.writes++; q->st.bytes_written += c->bs; break;
    case K_FLUSH: q->st.flushes++; break;
    default: q->st.discards++; break;
    }
    if (s->status != XB_RSP_OKAY) {
        q->st.errors++;
        if (q->cfg.hostile) /* failures are what a hostile run provokes */
            return;
        if (s->kind == K_FLUSH)
            sg_fail(q, "flush failed: status %d", s->status);
        else
            sg_fail(q, "%s of %u bytes at offset %llu failed: status %d", kind_name(s->kind), c->bs,
                 (unsigned long long)off, s->status);
        if (q->verify_gens && s->kind != K_READ && s->kind != K_FLUSH)
            q->gens[rel] = 0;
        return;
    }
    if (s->kind == K_WRITE) {
        if (q->verify_gens) {
            q->gens[rel] = (uint16_t)s->gen;
            q->recent[q->recent_pos] = s->block;
            q->recent_pos = (q->recent_pos + 1) % RECENT;
            if (q->recent_n < RECENT)
                q->recent_n++;
        }
        else if (c->verify) { /* write/randwrite: read the block back before the slot is free */
            s->pending_readback = 1;
            q->readbacks[q->nreadbacks++] = idx;
        }
    } else if (s->kind == K_DISCARD) {
        if (q->verify_gens)
            q->gens[rel] = 0; /* discarded content is unspecified */
    } else if (s->kind == K_READ) {
        if (s->gen == 0) {
            q->st.unverified_reads++;
            return;
        }
        int64_t bad = xb_sg_pattern_check(slot_buf(q, s), off, c->bs, c->seed, s->gen);
        if (bad < 0) {
            q->st.verified_reads++;
            return;
        }
        q->st.verify_errors++;
        sg_fail(q, "verify error at byte offset %llu (%s, seed %llu generation %u expected): %s",
             (unsigned long long)(off + (uint64_t)bad), s->readback ? "read-back of a write" : "read",
             (unsigned long long)c->seed, s->gen, describe_sector(slot_buf(q, s) + bad).text);
    }
}

