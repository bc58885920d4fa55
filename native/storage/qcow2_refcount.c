/* Refcounts, cluster allocation and the ordered metadata flush.
 *
 * Ordering that keeps a crash to leaks: a refcount increment reaches the disk
 * before any L2/L1 entry that points at the cluster, and a decrement only after
 * the metadata that dropped the reference is durable (frees are deferred to the
 * end of a flush). Deferred frees are also what pins clusters with direct I/O
 * in flight: a pending free of a cluster some map()ped extent still covers is
 * kept back until that extent is unmapped.
 *
 * A guest need not flush for its frees to come back: when an allocation would
 * grow the file while frees are pending, or too many are pending, the driver
 * runs the same ordered flush itself (qc_reclaim) and then applies them. And
 * the file never grows past virtual size + metadata + a small slack: beyond,
 * an allocation fails with EDQUOT (the guest's write fails, the host's disk is
 * not filled by one guest). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "qcow2.h"

static uint64_t rc_read(struct qcow2 *q, const uint8_t *b, uint64_t i)
{
    unsigned bits = 1u << q->rc_order;
    if (bits < 8)
        return (b[i * bits / 8] >> (i * bits % 8)) & ((1u << bits) - 1);
    uint64_t v = 0;
    for (unsigned k = 0; k < bits / 8; k++)
        v = (v << 8) | b[i * (bits / 8) + k];
    return v;
}

static void rc_write(struct qcow2 *q, uint8_t *b, uint64_t i, uint64_t v)
{
    unsigned bits = 1u << q->rc_order;
    if (bits < 8) {
        unsigned sh = (unsigned)(i * bits % 8), mask = ((1u << bits) - 1) << sh;
        b[i * bits / 8] = (uint8_t)((b[i * bits / 8] & ~mask) | ((v << sh) & mask));
        return;
    }
    for (unsigned k = bits / 8; k-- > 0;) {
        b[i * (bits / 8) + k] = (uint8_t)v;
        v >>= 8;
    }
}

static int refblock_off(struct qcow2 *q, uint64_t blk, uint64_t *off)
{
    *off = blk < q->rt_entries ? q->rt[blk] & QC_OFFSET_MASK : 0;
    if (*off && qc_check_offset(q, *off))
        return -EIO;
    return 0;
}

int qc_rc_get(struct qcow2 *q, uint64_t cluster, uint64_t *val)
{
    uint64_t off;
    int r = refblock_off(q, cluster >> q->rb_bits, &off);
    *val = 0;
    if (r || !off)
        return r;
    uint8_t *b = qc_cache_get(q, &q->rbc, off, 0, &r);
    if (!b)
        return r;
    *val = rc_read(q, b, cluster & ((1ULL << q->rb_bits) - 1));
    return 0;
}

/* The reftable moves to a bigger copy at the end of the file; it is written
 * and the header switched over at the next refcount flush. */
static int grow_reftable(struct qcow2 *q, uint64_t need)
{
    uint64_t entries = (need > q->rt_entries ? need : q->rt_entries) * 2, nclus;
    for (;;) {
        nclus = (entries * 8 + q->cs - 1) / q->cs;
        uint64_t last = (q->file_end >> q->cluster_bits) + nclus + 4;
        if ((last >> q->rb_bits) < entries)
            break;
        entries *= 2;
    }
    entries = nclus * q->cs / 8;
    if (nclus * q->cs > (64ULL << 20))
        return -EFBIG;
    uint64_t *nt = calloc(entries, 8);
    if (!nt)
        return -ENOMEM;
    memcpy(nt, q->rt, q->rt_entries * 8);
    if (!q->rt_moved) { /* the table on disk (the header's) is freed once the header points elsewhere */
        q->rt_old_off = q->rt_off;
        q->rt_old_clusters = (q->rt_entries * 8 + q->cs - 1) / q->cs;
    } else { /* a table never made durable: nothing on disk refers to it */
        for (uint64_t i = 0; i < (q->rt_entries * 8 + q->cs - 1) / q->cs; i++) {
            int r = qc_pend_free(q, q->rt_off + i * q->cs);
            if (r) {
                free(nt);
                return r;
            }
        }
    }
    uint64_t off = q->file_end;
    q->file_end += nclus * q->cs;
    free(q->rt);
    q->rt = nt;
    q->rt_entries = entries;
    q->rt_off = off;
    q->rt_dirty = q->rt_moved = 1;
    for (uint64_t i = 0; i < nclus; i++) {
        int r = qc_rc_set(q, (off >> q->cluster_bits) + i, 1);
        if (r)
            return r;
    }
    return 0;
}

int qc_rc_set(struct qcow2 *q, uint64_t cluster, uint64_t val)
{
    uint64_t blk = cluster >> q->rb_bits, off;
    int r;
    if (blk >= q->rt_entries && (r = grow_reftable(q, blk + 1)))
        return r;
    if ((r = refblock_off(q, blk, &off)))
        return r;
    if (!off) {
        /* A new refblock at the end of the file; its own refcount lands in
         * itself or in the next new block, so the recursion ends. */
        off = q->file_end;
        q->file_end += q->cs;
        q->rt[blk] = off;
        q->rt_dirty = 1;
        if (!qc_cache_get(q, &q->rbc, off, 1, &r))
            return r;
        if ((r = qc_rc_set(q, off >> q->cluster_bits, 1)))
            return r;
    }
    uint8_t *b = qc_cache_get(q, &q->rbc, off, 0, &r);
    if (!b)
        return r;
    rc_write(q, b, cluster & ((1ULL << q->rb_bits) - 1), val);
    qc_cache_mark_dirty(&q->rbc, b);
    return 0;
}

int qc_is_metadata(struct qcow2 *q, uint64_t host_off)
{
    uint64_t l1_end = q->l1_off + (((uint64_t)q->l1_size * 8 + q->cs - 1) & ~(q->cs - 1));
    uint64_t rt_end = q->rt_off + ((q->rt_entries * 8 + q->cs - 1) & ~(q->cs - 1));
    return host_off < q->cs || (host_off >= q->l1_off && host_off < l1_end) ||
           (host_off >= q->rt_off && host_off < rt_end) ||
           (q->rt_moved && host_off >= q->rt_old_off && host_off < q->rt_old_off + q->rt_old_clusters * q->cs);
}

/* An L2 table or refcount block at host_off (named by L1 or the reftable). A sane image gives
 * them refcount 1; a crafted one may say 0, and handing such a cluster out as data would let the
 * guest's data overwrite the table: it is skipped instead (it stays referenced, as a corrupt
 * refcount `qemu-img check` reports). Only called for clusters whose refcount reads 0. */
static int is_table(struct qcow2 *q, uint64_t host_off)
{
    for (uint32_t i = 0; i < q->l1_size; i++)
        if ((q->l1[i] & QC_OFFSET_MASK) == host_off)
            return 1;
    for (uint64_t i = 0; i < q->rt_entries; i++)
        if ((q->rt[i] & QC_OFFSET_MASK) == host_off)
            return 1;
    return 0;
}

static uint64_t reserve_target(struct qcow2 *q)
{
    uint64_t n = QC_RESERVE_BYTES >> q->cluster_bits;
    if (n > QC_RESERVE_MAX)
        n = QC_RESERVE_MAX;
    return n ? n : 1;
}

/* What the file may grow to: every guest cluster allocated once, its L2 tables, the L1, the
 * header, refcount blocks for all of that, the reftable (twice: a grown copy and the old one until
 * the next flush, and room for its doubling), the reserve of metadata write-through and a few
 * clusters. A file already larger at open (leaks, compressed data being rewritten, preallocation)
 * may grow by the slack. */
static void cap_init(struct qcow2 *q)
{
    if (q->max_file_end)
        return;
    uint64_t cs = q->cs, size = q->img.size;
    uint64_t n = (size + cs - 1) / cs;                              /* data */
    n += (size + (cs << q->l2_bits) - 1) / (cs << q->l2_bits);       /* L2 tables */
    n += ((uint64_t)q->l1_size * 8 + cs - 1) / cs + 1;               /* L1, header */
    uint64_t slack = reserve_target(q) + QC_CAP_SLACK_CLUSTERS;
    n += slack;
    uint64_t rb = (n >> q->rb_bits) + 2;                             /* refcount blocks */
    uint64_t rt = (rb * 8 + cs - 1) / cs;                            /* reftable clusters */
    n += rb + 4 * rt + 2;
    uint64_t cap = n << q->cluster_bits, initial = q->file_end + (slack << q->cluster_bits);
    q->max_file_end = cap > initial ? cap : initial;
}

/* grow 0: fail with -EAGAIN rather than extend the file (the caller reclaims first). */
static int64_t alloc_one(struct qcow2 *q, int grow)
{
    uint64_t end = q->file_end >> q->cluster_bits, c, v;
    int r;
    for (c = q->free_hint; c < end; c++) {
        if ((r = qc_rc_get(q, c, &v)))
            return r;
        if (v == 0 && !qc_is_metadata(q, c << q->cluster_bits) && !is_table(q, c << q->cluster_bits))
            break;
    }
    q->free_hint = c; /* everything below is in use */
    if (c >= end) {
        if (!grow)
            return -EAGAIN;
        if ((c + 1) << q->cluster_bits > q->max_file_end)
            return -EDQUOT;
        q->file_end += q->cs;
    }
    q->free_hint = c + 1;
    if ((r = qc_rc_set(q, c, 1)))
        return r;
    /* the refblock may have been appended after it */
    if ((c + 1) << q->cluster_bits > q->file_end)
        q->file_end = (c + 1) << q->cluster_bits;
    return (int64_t)(c << q->cluster_bits);
}

static int sync_fd(struct qcow2 *q);

/* One fdatasync makes a whole batch of refcounts durable; until handed out the clusters are
 * referenced by nothing, so a kill or host crash leaks them at worst. */
static int refill_reserve(struct qcow2 *q)
{
    uint64_t n = reserve_target(q);
    int r = 0;
    while (q->nreserve < n) {
        int64_t c = alloc_one(q, 1);
        if (c == -EDQUOT && q->nreserve) /* at the bound: a smaller reserve */
            break;
        if (c < 0) {
            r = (int)c;
            break;
        }
        q->reserve[q->nreserve++] = (uint64_t)c >> q->cluster_bits;
    }
    if (!r)
        r = qc_flush_refcounts(q);
    if (r) {
        qc_release_reserve(q);
        return r;
    }
    /* handed out from the end: lowest cluster first */
    for (unsigned i = 0; i < q->nreserve / 2; i++) {
        uint64_t t = q->reserve[i];
        q->reserve[i] = q->reserve[q->nreserve - 1 - i];
        q->reserve[q->nreserve - 1 - i] = t;
    }
    return 0;
}

static int reclaimable(struct qcow2 *q)
{
    return q->npending > q->pend_held;
}

/* The ordered flush, then the pending frees: a freed cluster is reused only once the L2/L1 update
 * that dropped it is durable (a host crash then finds the old reference gone, never two owners),
 * and with metadata write-through the reserve is returned and refilled by the caller. */
static int reclaim(struct qcow2 *q)
{
    return qc_flush_locked(q);
}

int qc_maybe_reclaim(struct qcow2 *q)
{
    if (q->npending - q->pend_held < QC_PENDING_MAX || q->ro)
        return 0;
    return reclaim(q);
}

int64_t qc_alloc_cluster(struct qcow2 *q)
{
    int r;
    cap_init(q);
    if ((r = qc_maybe_reclaim(q)))
        return r;
    if (!q->meta_wt) {
        int64_t c = alloc_one(q, !reclaimable(q));
        if (c != -EAGAIN)
            return c;
        if ((r = reclaim(q)))
            return r;
        return alloc_one(q, 1);
    }
    if (!q->nreserve) {
        if (reclaimable(q) && (r = reclaim(q)))
            return r;
        if ((r = refill_reserve(q)))
            return r;
    }
    return (int64_t)(q->reserve[--q->nreserve] << q->cluster_bits);
}

/* A cluster from qc_alloc_cluster that nothing came to reference (its data write failed). */
void qc_unalloc_cluster(struct qcow2 *q, uint64_t host_off)
{
    uint64_t cl = host_off >> q->cluster_bits;
    if (q->meta_wt && q->nreserve < QC_RESERVE_MAX) {
        q->reserve[q->nreserve++] = cl;
        return;
    }
    if (qc_rc_set(q, cl, 0) == 0 && cl < q->free_hint)
        q->free_hint = cl;
}

/* Unused reserved clusters go back to free (in memory; written by the next refcount flush). */
int qc_release_reserve(struct qcow2 *q)
{
    int r = 0;
    while (q->nreserve && !r) {
        uint64_t cl = q->reserve[--q->nreserve];
        if ((r = qc_rc_set(q, cl, 0)) == 0 && cl < q->free_hint)
            q->free_hint = cl;
    }
    return r;
}

static int write_l1(struct qcow2 *q)
{
    size_t bytes = (size_t)q->l1_size * 8;
    uint8_t *buf = malloc(bytes ? bytes : 1);
    if (!buf)
        return -ENOMEM;
    for (uint32_t i = 0; i < q->l1_size; i++)
        qc_put_be64(buf + i * 8, q->l1[i]);
    ssize_t w = xb_pwrite_full(q->fd, buf, bytes, q->l1_off);
    free(buf);
    return w < 0 ? (int)w : 0;
}

/* XB_OPEN_WRITETHROUGH_META, after an entry of the cached table l2 changed: the table (and the
 * L1, when it points at a new table) go to the page cache now, which a process kill cannot lose.
 * Every cluster they reference has a durable refcount (the reserve). A new table reaches the disk
 * before the L1 entry naming it, so a host crash never follows L1 into a stale cluster. */
int qc_write_through(struct qcow2 *q, uint8_t *l2)
{
    int r;
    if (!q->meta_wt)
        return 0;
    if ((r = qc_cache_write_buf(q, &q->l2c, l2)))
        return r;
    if (q->wt_l1_idx < 0)
        return 0;
    /* every new table, also one left dirty by a write that failed, before the L1 that names it */
    if ((r = qc_cache_writeback(q, &q->l2c)) || (r = sync_fd(q)) || (r = write_l1(q)))
        return r;
    q->wt_l1_idx = -1;
    return 0;
}

int qc_pend_free(struct qcow2 *q, uint64_t host_off)
{
    if (q->npending == q->cap_pending) {
        size_t n = q->cap_pending ? q->cap_pending * 2 : 64;
        uint64_t *p = realloc(q->pending, n * 8);
        if (!p)
            return -ENOMEM;
        q->pending = p;
        q->cap_pending = n;
    }
    q->pending[q->npending++] = host_off;
    return 0;
}

int qc_inflight_add(struct qcow2 *q, uint64_t host_off)
{
    if (q->ninfl == q->cap_infl) {
        size_t n = q->cap_infl ? q->cap_infl * 2 : 64;
        uint64_t *p = realloc(q->infl, n * 8);
        if (!p)
            return -ENOMEM;
        q->infl = p;
        q->cap_infl = n;
    }
    q->infl[q->ninfl++] = host_off;
    return 0;
}

void qc_inflight_del(struct qcow2 *q, uint64_t host_off)
{
    for (size_t i = q->ninfl; i-- > 0;)
        if (q->infl[i] == host_off) {
            q->infl[i] = q->infl[--q->ninfl];
            break;
        }
    if (!q->pend_held)
        return;
    for (size_t i = 0; i < q->ninfl; i++)
        if (q->infl[i] == host_off)
            return; /* still pinned by another extent */
    /* A free the last reclaim kept back for this cluster may go now. */
    for (size_t i = 0; i < q->pend_held; i++)
        if (q->pending[i] == host_off) { /* held ones stay first: swap it out of them */
            uint64_t t = q->pending[--q->pend_held];
            q->pending[q->pend_held] = host_off;
            q->pending[i] = t;
            return;
        }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Host cluster c is covered by an extent with I/O in flight (sorted: infl, n). */
static int in_flight(struct qcow2 *q, const uint64_t *sorted, size_t n, uint64_t c)
{
    uint64_t off = c << q->cluster_bits;
    return n && bsearch(&off, sorted, n, 8, cmp_u64) != NULL;
}

int qc_apply_pending(struct qcow2 *q)
{
    uint64_t *sorted = NULL;
    size_t n = q->ninfl, kept = 0;
    int r = 0;
    if (n) {
        if (!(sorted = malloc(n * 8)))
            return -ENOMEM;
        memcpy(sorted, q->infl, n * 8);
        qsort(sorted, n, 8, cmp_u64);
    }
    size_t i;
    for (i = 0; i < q->npending; i++) {
        uint64_t c = q->pending[i] >> q->cluster_bits, v;
        if (in_flight(q, sorted, n, c)) {
            q->pending[kept++] = q->pending[i]; /* its direct I/O is not over: next time */
            continue;
        }
        if ((r = qc_rc_get(q, c, &v)))
            break;
        if (v == 0)
            continue; /* already free: a hostile image double-referenced it */
        if ((r = qc_rc_set(q, c, v - 1)))
            break;
        if (v == 1 && c < q->free_hint)
            q->free_hint = c;
    }
    /* on an error, what was not applied stays pending */
    for (; i < q->npending; i++)
        q->pending[kept++] = q->pending[i];
    q->npending = kept;
    q->pend_held = kept;
    free(sorted);
    return r;
}

static int sync_fd(struct qcow2 *q)
{
    return fdatasync(q->fd) ? -errno : 0;
}

int qc_flush_refcounts(struct qcow2 *q)
{
    int r;
    if ((r = sync_fd(q)) || (r = qc_cache_writeback(q, &q->rbc)))
        return r;
    if (!q->rt_dirty)
        return 0;
    if ((r = sync_fd(q)))
        return r;
    size_t bytes = ((q->rt_entries * 8 + q->cs - 1) / q->cs) * q->cs;
    uint8_t *buf = calloc(1, bytes);
    if (!buf)
        return -ENOMEM;
    for (uint64_t i = 0; i < q->rt_entries; i++)
        qc_put_be64(buf + i * 8, q->rt[i]);
    ssize_t w = xb_pwrite_full(q->fd, buf, bytes, q->rt_off);
    free(buf);
    if (w < 0)
        return (int)w;
    if (q->rt_off + bytes > q->disk_size)
        q->disk_size = q->rt_off + bytes;
    if (q->rt_moved) {
        uint8_t hdr[12]; /* refcount_table_offset and refcount_table_clusters */
        qc_put_be64(hdr, q->rt_off);
        uint32_t n = __builtin_bswap32((uint32_t)(bytes / q->cs));
        memcpy(hdr + 8, &n, 4);
        if ((r = sync_fd(q)))
            return r;
        if ((w = xb_pwrite_full(q->fd, hdr, 12, offsetof(struct qc_header, refcount_table_offset))) < 0)
            return (int)w;
        q->rt_moved = 0;
        for (uint64_t i = 0; i < q->rt_old_clusters; i++)
            if ((r = qc_pend_free(q, q->rt_old_off + i * q->cs)))
                return r;
    }
    q->rt_dirty = 0;
    return sync_fd(q);
}

int qc_flush_locked(struct qcow2 *q)
{
    int r;
    if (q->ro)
        return 0;
    if (q->meta_wt && (r = qc_release_reserve(q)))
        return r;
    if ((r = qc_flush_refcounts(q)) || (r = qc_cache_writeback(q, &q->l2c)))
        return r;
    if ((r = sync_fd(q)))
        return r;
    if (q->l1_dirty) {
        if ((r = write_l1(q)))
            return r;
        q->l1_dirty = 0;
        q->wt_l1_idx = -1;
        if ((r = sync_fd(q)))
            return r;
    }
    return qc_apply_pending(q);
}
