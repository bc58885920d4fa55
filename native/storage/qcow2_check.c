/* Consistency check: recount every reference from the L1/L2 tables and the
 * metadata itself and compare with the stored refcounts (as qemu-img check). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

#define QC_CHECK_MAX_CLUSTERS (1ULL << 28)

struct counter {
    uint16_t *refs;
    uint64_t n;
    struct xb_check_result *out;
    uint64_t last_host; /* the previous data cluster, for fragmented_clusters */
};

static void ref(struct counter *c, uint64_t host, uint64_t cs)
{
    uint64_t i = host / cs;
    if (i >= c->n) {
        c->out->corruptions++;
        return;
    }
    if (c->refs[i] < UINT16_MAX)
        c->refs[i]++;
}

static void ref_range(struct counter *c, uint64_t off, uint64_t len, uint64_t cs)
{
    for (uint64_t a = off & ~(cs - 1); a < off + len; a += cs)
        ref(c, a, cs);
}

/* The header, the L1 and refcount tables and the refcount blocks. */
static void count_metadata(struct qcow2 *q, struct counter *c)
{
    ref(c, 0, q->cs);
    ref_range(c, q->l1_off, (uint64_t)q->l1_size * 8, q->cs);
    ref_range(c, q->rt_off, q->rt_entries * 8, q->cs);
    for (uint64_t b = 0; b < q->rt_entries; b++) {
        uint64_t o = q->rt[b] & QC_OFFSET_MASK;
        if (!o)
            continue;
        if (qc_check_offset(q, o))
            c->out->corruptions++;
        else
            ref(c, o, q->cs);
    }
}

/* The data clusters one L2 table references; fails only when the table cannot be read. */
static int count_l2(struct qcow2 *q, struct counter *c, uint64_t l2off)
{
    struct xb_check_result *out = c->out;
    int r = 0;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
        uint8_t *l2 = qc_cache_get(q, &q->l2c, l2off, 0, &r);
        if (!l2)
            return r;
        uint64_t e = qc_be64(l2 + j * 8), off, len;
        switch (qc_classify(q, e)) {
        case QC_COMPRESSED:
            qc_compressed_range(q, e, &off, &len);
            ref_range(c, off, len, q->cs);
            out->allocated_clusters++;
            break;
        case QC_NORMAL:
            out->allocated_clusters++;
            /* fall through */
        case QC_ZERO:
            off = e & QC_OFFSET_MASK;
            if (!off)
                break;
            if (off & (q->cs - 1))
                out->corruptions++;
            else
                ref(c, off, q->cs);
            if (c->last_host && off != c->last_host + q->cs)
                out->fragmented_clusters++;
            c->last_host = off;
            break;
        case QC_UNALLOC:
            break;
        }
    }
    return 0;
}

/* Every L2 table and what it references. */
static int count_data(struct qcow2 *q, struct counter *c)
{
    for (uint32_t i = 0; i < q->l1_size; i++) {
        uint64_t l2off = q->l1[i] & QC_OFFSET_MASK;
        if (!l2off)
            continue;
        if (qc_check_offset(q, l2off)) {
            c->out->corruptions++;
            continue;
        }
        ref(c, l2off, q->cs);
        int r = count_l2(q, c, l2off);
        if (r)
            return r;
    }
    return 0;
}

/* The stored refcounts against the counted ones: below is a corruption, above a leak. A refcount
 * block that cannot be read ends its own comparison only. With `repair`, a leak's refcount is
 * lowered to the count (the caller made sure nothing is in flight and nothing is corrupt). */
static int compare_refcounts(struct qcow2 *q, struct counter *c, int repair)
{
    for (uint64_t b = 0; b < q->rt_entries; b++) {
        if (!(q->rt[b] & QC_OFFSET_MASK) && (b << q->rb_bits) >= c->n)
            continue;
        for (uint64_t k = 0; k < (1ULL << q->rb_bits); k++) {
            uint64_t cl = (b << q->rb_bits) + k, v;
            if (!(q->rt[b] & QC_OFFSET_MASK))
                v = 0;
            else if (qc_rc_get(q, cl, &v))
                break;
            uint64_t want = cl < c->n ? c->refs[cl] : 0;
            if (v < want) {
                c->out->corruptions++;
            } else if (v > want) {
                c->out->leaks++;
                if (repair) {
                    int r = qc_rc_set(q, cl, want);
                    if (r)
                        return r;
                    if (!want && cl < q->free_hint)
                        q->free_hint = cl;
                }
            }
        }
    }
    return 0;
}

/* Counts every reference (under q->lock, after a flush so that memory and disk agree) and compares
 * with the refcounts; repairs leaks when asked and when nothing is corrupt. */
static int check_locked(struct qcow2 *q, struct xb_check_result *out, int repair, char *err)
{
    int r;
    if (q->nb_snapshots) {
        xb_seterr(err, "images with internal snapshots are not checked");
        return -ENOTSUP;
    }
    if (!q->ro && ((r = qc_flush_locked(q)) || (r = qc_flush_locked(q)))) {
        xb_seterr(err, "flush before check failed");
        return r;
    }
    struct counter c = {.n = q->file_end >> q->cluster_bits, .out = out};
    if (c.n > QC_CHECK_MAX_CLUSTERS) {
        xb_seterr(err, "image too large to check in memory");
        return -ENOMEM;
    }
    c.refs = calloc(c.n ? c.n : 1, sizeof(uint16_t));
    if (!c.refs)
        return -ENOMEM;
    out->total_clusters = (q->img.size + q->cs - 1) >> q->cluster_bits;
    count_metadata(q, &c);
    r = count_data(q, &c);
    if (!r)
        r = compare_refcounts(q, &c, 0);
    if (!r && repair && out->leaks && !out->corruptions) {
        uint64_t found = out->leaks;
        out->leaks = 0;
        if (!(r = compare_refcounts(q, &c, 1)) && !(r = qc_flush_refcounts(q)))
            out->leaks = found;
        else
            xb_seterr(err, "writing the repaired refcounts failed");
    }
    free(c.refs);
    return r;
}

int xb_qcow2_check(struct xb_image *img, struct xb_check_result *out, char *err)
{
    struct qcow2 *q = QC(img);
    pthread_mutex_lock(&q->lock);
    int r = check_locked(q, out, 0, err);
    pthread_mutex_unlock(&q->lock);
    return r;
}

/* A kill between a refcount increment and the L2 entry naming the cluster (refcount first is what
 * keeps a crash to leaks) leaves the cluster counted and unused, as does a killed writer's reserve
 * of write-through clusters. Only safe while no request is in flight: the caller opens the image,
 * repairs, then serves. Refuses an image with corruptions (refcounts below the references): that
 * needs an operator, not a silent fix. */
int xb_qcow2_repair_leaks(struct xb_image *img, struct xb_check_result *out, char *err)
{
    struct qcow2 *q = QC(img);
    int r;
    pthread_mutex_lock(&q->lock);
    if (q->ro) {
        xb_seterr(err, "image opened read-only");
        r = -EROFS;
    } else if (q->ninfl) {
        xb_seterr(err, "requests in flight: leaks are repaired before the image is served");
        r = -EBUSY;
    } else {
        r = check_locked(q, out, 1, err);
        if (!r && out->corruptions) {
            xb_seterr(err, "%llu clusters are referenced more often than counted: not repaired",
                      (unsigned long long)out->corruptions);
            r = -EUCLEAN;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return r;
}
