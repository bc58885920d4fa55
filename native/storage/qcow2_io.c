/* qcow2 guest I/O: cluster mapping, the fast-path map, reads (backing,
 * compressed, zero clusters), allocating/copy-on-write writes, discard. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include "qcow2.h"

int qc_check_offset(struct qcow2 *q, uint64_t host_off)
{
    /* Metadata and data clusters must be cluster aligned and inside what the
     * file holds (or what this driver has allocated and not yet written). */
    if (host_off & (q->cs - 1))
        return -EIO;
    if (host_off >= q->file_end)
        return -EIO;
    return 0;
}

enum qc_type qc_classify(struct qcow2 *q, uint64_t e)
{
    if (e & QC_OFLAG_COMPRESSED)
        return QC_COMPRESSED;
    if (q->version >= 3 && (e & QC_OFLAG_ZERO))
        return QC_ZERO;
    return (e & QC_OFFSET_MASK) ? QC_NORMAL : QC_UNALLOC;
}

void qc_compressed_range(struct qcow2 *q, uint64_t e, uint64_t *off, uint64_t *len)
{
    unsigned shift = 62 - (q->cluster_bits - 8);
    uint64_t nsec = ((e >> shift) & ((1ULL << (q->cluster_bits - 8)) - 1)) + 1;
    *off = e & ((1ULL << shift) - 1);
    *len = nsec * 512 - (*off & 511);
}

/* Finds the L2 table holding the entry for guest offset off; *l2 NULL if there
 * is none (unallocated) and alloc is 0. */
int qc_l2_entry(struct qcow2 *q, uint64_t off, int alloc, uint8_t **l2, uint32_t *idx)
{
    uint64_t l1i = off >> (q->cluster_bits + q->l2_bits);
    int r;
    *l2 = NULL;
    *idx = (uint32_t)((off >> q->cluster_bits) & ((1ULL << q->l2_bits) - 1));
    if (l1i >= q->l1_size)
        return -EIO;
    uint64_t l2off = q->l1[l1i] & QC_OFFSET_MASK;
    if (!l2off) {
        if (!alloc)
            return 0;
        int64_t n = qc_alloc_cluster(q);
        if (n < 0)
            return (int)n;
        if (!(*l2 = qc_cache_get(q, &q->l2c, (uint64_t)n, 1, &r)))
            return r;
        q->l1[l1i] = (uint64_t)n | QC_OFLAG_COPIED;
        q->l1_dirty = 1;
        q->wt_l1_idx = (int64_t)l1i;
        return 0;
    }
    if (qc_check_offset(q, l2off))
        return -EIO;
    if (!(*l2 = qc_cache_get(q, &q->l2c, l2off, 0, &r)))
        return r;
    return 0;
}

static int get_entry(struct qcow2 *q, uint64_t off, uint64_t *e)
{
    uint8_t *l2;
    uint32_t idx;
    int r = qc_l2_entry(q, off, 0, &l2, &idx);
    *e = (r || !l2) ? 0 : qc_be64(l2 + idx * 8);
    return r;
}

void qc_codec_free(struct qcow2 *q)
{
    if (q->zstd_dctx)
        ZSTD_freeDCtx(q->zstd_dctx);
    if (q->zlib_stream) {
        inflateEnd(q->zlib_stream);
        free(q->zlib_stream);
    }
    q->zstd_dctx = q->zlib_stream = NULL;
}

/* The image's zstd context: a compressed cluster inflates to one cluster, so a frame asking for a
 * larger window (up to 2 GiB, memory a guest-made image would make us allocate) is refused. */
static ZSTD_DCtx *zstd_ctx(struct qcow2 *q)
{
    if (!q->zstd_dctx) {
        ZSTD_DCtx *d = ZSTD_createDCtx();
        if (!d)
            return NULL;
        int wlog = (int)q->cluster_bits + 1 > 10 ? (int)q->cluster_bits + 1 : 10; /* zstd's minimum window: 1 KiB */
        if (ZSTD_isError(ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, wlog))) {
            ZSTD_freeDCtx(d);
            return NULL;
        }
        q->zstd_dctx = d;
    } else {
        ZSTD_DCtx_reset(q->zstd_dctx, ZSTD_reset_session_only); /* keeps the window limit */
    }
    return q->zstd_dctx;
}

static z_stream *zlib_ctx(struct qcow2 *q)
{
    if (!q->zlib_stream) {
        z_stream *s = calloc(1, sizeof(*s));
        if (!s)
            return NULL;
        if (inflateInit2(s, -15) != Z_OK) { /* raw deflate, 32 KiB window: qemu's format */
            free(s);
            return NULL;
        }
        q->zlib_stream = s;
        return s;
    }
    return inflateReset(q->zlib_stream) == Z_OK ? q->zlib_stream : NULL;
}

static int decompress(struct qcow2 *q, uint64_t e, uint8_t *out)
{
    uint64_t coff, clen;
    qc_compressed_range(q, e, &coff, &clen);
    if (coff >= q->disk_size || clen > 2 * q->cs)
        return -EIO;
    uint8_t *in = malloc(clen);
    if (!in)
        return -ENOMEM;
    ssize_t rr = xb_pread_known(q->fd, in, clen, coff, q->disk_size);
    int ret = rr < 0 ? (int)rr : -EIO;
    if (rr >= 0 && q->ctype == 0) {
        z_stream *s = zlib_ctx(q);
        if (s) {
            s->next_in = in;
            s->avail_in = (uInt)clen;
            s->next_out = out;
            s->avail_out = (uInt)q->cs;
            int z = inflate(s, Z_FINISH);
            if ((z == Z_STREAM_END || z == Z_BUF_ERROR) && s->avail_out == 0)
                ret = 0;
        }
    } else if (rr >= 0) {
        ZSTD_DCtx *d = zstd_ctx(q);
        if (d) {
            ZSTD_inBuffer ib = {in, clen, 0};
            ZSTD_outBuffer ob = {out, q->cs, 0};
            while (ob.pos < ob.size) {
                size_t z = ZSTD_decompressStream(d, &ob, &ib);
                if (ZSTD_isError(z) || (ib.pos == ib.size && ob.pos < ob.size && z != 0))
                    break;
                if (z == 0 && ob.pos < ob.size)
                    break;
            }
            if (ob.pos == ob.size)
                ret = 0;
        }
    }
    free(in);
    return ret;
}

static int read_backing(struct qcow2 *q, uint8_t *buf, size_t n, uint64_t off)
{
    memset(buf, 0, n);
    if (!q->backing)
        return 0;
    uint64_t bsize = q->backing->size;
    if (off >= bsize)
        return 0;
    size_t m = off + n > bsize ? (size_t)(bsize - off) : n;
    struct iovec iov = {buf, m};
    ssize_t r = q->backing->ops->preadv(q->backing, &iov, 1, off);
    return r < 0 ? (int)r : 0;
}

/* [off, off+n) lies within one cluster. */
static int read_chunk(struct qcow2 *q, uint8_t *buf, size_t n, uint64_t off)
{
    uint64_t e;
    int r = get_entry(q, off, &e);
    if (r)
        return r;
    uint64_t in = off & (q->cs - 1);
    switch (qc_classify(q, e)) {
    case QC_UNALLOC:
        return read_backing(q, buf, n, off);
    case QC_ZERO:
        memset(buf, 0, n);
        return 0;
    case QC_COMPRESSED: {
        uint8_t *c = malloc(q->cs);
        if (!c)
            return -ENOMEM;
        r = decompress(q, e, c);
        if (!r)
            memcpy(buf, c + in, n);
        free(c);
        return r;
    }
    case QC_NORMAL:
        if (qc_check_offset(q, e & QC_OFFSET_MASK))
            return -EIO;
        ssize_t rr = xb_pread_known(q->fd, buf, n, (e & QC_OFFSET_MASK) + in, q->disk_size);
        return rr < 0 ? (int)rr : 0;
    }
    return -EIO;
}

static int free_entry_clusters(struct qcow2 *q, uint64_t e)
{
    enum qc_type t = qc_classify(q, e);
    if (t == QC_COMPRESSED) {
        uint64_t coff, clen;
        qc_compressed_range(q, e, &coff, &clen);
        for (uint64_t c = coff & ~(q->cs - 1); c < coff + clen; c += q->cs) {
            int r = qc_pend_free(q, c);
            if (r)
                return r;
        }
        return 0;
    }
    if ((e & QC_OFFSET_MASK) && (t == QC_NORMAL || t == QC_ZERO))
        return qc_pend_free(q, e & QC_OFFSET_MASK);
    return 0;
}

static int writable_in_place(struct qcow2 *q, uint64_t e)
{
    uint64_t host = e & QC_OFFSET_MASK, rc;
    if (qc_classify(q, e) != QC_NORMAL || qc_check_offset(q, host) || qc_is_metadata(q, host))
        return 0;
    return qc_rc_get(q, host >> q->cluster_bits, &rc) == 0 && rc == 1;
}

static int write_chunk(struct qcow2 *q, const uint8_t *buf, size_t n, uint64_t off)
{
    uint8_t *l2;
    uint32_t idx;
    int r = qc_l2_entry(q, off, 1, &l2, &idx);
    if (r)
        return r;
    uint64_t e = qc_be64(l2 + idx * 8), in = off & (q->cs - 1);
    if (writable_in_place(q, e)) {
        ssize_t w = xb_pwrite_full(q->fd, buf, n, (e & QC_OFFSET_MASK) + in);
        return w < 0 ? (int)w : 0;
    }
    enum qc_type t = qc_classify(q, e);
    int reads_zero = t == QC_ZERO || (t == QC_UNALLOC && (!q->backing || off - in >= q->backing->size));
    int64_t host = -1;
    ssize_t w;
    if (n < q->cs && reads_zero && (host = qc_alloc_cluster(q)) >= 0 && (uint64_t)host >= q->disk_size) {
        /* A first write to a cluster that reads as zeros, into a cluster past the end of the file:
         * nothing was ever written there, so only the guest's data is written, and zeros at the end
         * of the cluster (up to a sector, after the data) put the file's end past it; the rest
         * stays a hole, which reads as zeros. Crash-wise as a whole-cluster write: the L2 entry is
         * written after both. */
        static const uint8_t zero_sector[512];
        w = xb_pwrite_full(q->fd, buf, n, (uint64_t)host + in);
        size_t tail = q->cs - in - n < sizeof(zero_sector) ? (size_t)(q->cs - in - n) : sizeof(zero_sector);
        if (w >= 0 && tail) /* after the data, never over it */
            w = xb_pwrite_full(q->fd, zero_sector, tail, (uint64_t)host + q->cs - tail);
    } else {
        if (n < q->cs && reads_zero && host < 0)
            return (int)host;
        /* A reused cluster (its old contents must be overwritten), a whole cluster, or one whose
         * other bytes come from the old cluster or the backing file: the whole cluster is written. */
        uint8_t *c = malloc(q->cs);
        if (!c) {
            if (n < q->cs && reads_zero)
                qc_unalloc_cluster(q, (uint64_t)host);
            return -ENOMEM;
        }
        if (n < q->cs && reads_zero) {
            memset(c, 0, q->cs);
        } else {
            if (n < q->cs && (r = read_chunk(q, c, q->cs, off - in))) {
                free(c);
                return r;
            }
            host = qc_alloc_cluster(q);
            if (host < 0) {
                free(c);
                return (int)host;
            }
        }
        memcpy(c + in, buf, n);
        w = xb_pwrite_full(q->fd, c, q->cs, (uint64_t)host);
        free(c);
    }
    if (w < 0) {
        /* Nothing refers to the cluster yet: hand it back rather than leak it (ENOSPC on a full
         * filesystem would otherwise leak one cluster per failed write). */
        qc_unalloc_cluster(q, (uint64_t)host);
        return (int)w;
    }
    if ((uint64_t)host + q->cs > q->disk_size)
        q->disk_size = (uint64_t)host + q->cs;
    /* the allocation may have evicted the table: look it up again */
    if ((r = qc_l2_entry(q, off, 1, &l2, &idx)))
        return r;
    qc_put_be64(l2 + idx * 8, (uint64_t)host | QC_OFLAG_COPIED);
    qc_cache_mark_dirty(&q->l2c, l2);
    if ((r = free_entry_clusters(q, e)))
        return r;
    return qc_write_through(q, l2);
}

typedef int (*chunk_fn)(struct qcow2 *q, uint8_t *buf, size_t n, uint64_t off);

static ssize_t for_chunks(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off, int write)
{
    struct qcow2 *q = QC(img);
    size_t total = xb_iov_len(iov, iovcnt);
    if (off > img->size || total > img->size - off)
        return -EINVAL;
    if (write && q->ro)
        return -EROFS;
    uint8_t *flat = iovcnt == 1 ? iov[0].iov_base : malloc(total ? total : 1);
    if (!flat)
        return -ENOMEM;
    if (write && iovcnt != 1)
        xb_iov_to_buf(iov, iovcnt, 0, flat, total);
    int r = 0;
    pthread_mutex_lock(&q->lock);
    for (size_t done = 0; done < total && !r;) {
        uint64_t o = off + done, in = o & (q->cs - 1);
        size_t n = q->cs - in < total - done ? (size_t)(q->cs - in) : total - done;
        r = write ? write_chunk(q, flat + done, n, o) : read_chunk(q, flat + done, n, o);
        done += n;
    }
    pthread_mutex_unlock(&q->lock);
    if (!write && !r && iovcnt != 1)
        xb_buf_to_iov(iov, iovcnt, 0, flat, total);
    if (iovcnt != 1)
        free(flat);
    return r ? r : (ssize_t)total;
}

static ssize_t qc_preadv(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return for_chunks(img, iov, iovcnt, off, 0);
}

static ssize_t qc_pwritev(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return for_chunks(img, iov, iovcnt, off, 1);
}

static int qc_map(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext)
{
    struct qcow2 *q = QC(img);
    if (off >= img->size)
        return -EINVAL;
    if (for_write && q->ro)
        return -EROFS;
    uint64_t e, in = off & (q->cs - 1);
    pthread_mutex_lock(&q->lock);
    int r = get_entry(q, off, &e), ok = 0;
    if (!r && qc_classify(q, e) == QC_NORMAL && !qc_check_offset(q, e & QC_OFFSET_MASK)) {
        uint64_t host = e & QC_OFFSET_MASK;
        ok = for_write ? writable_in_place(q, e) : host + q->cs <= q->disk_size;
        if (ok && (r = qc_inflight_add(q, host)))
            ok = 0;
        if (ok) {
            ext->fd = q->fd;
            ext->host_off = host + in;
            ext->len = len < q->cs - in ? len : q->cs - in;
            if (ext->len > img->size - off)
                ext->len = img->size - off;
            ext->cookie = host;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return r ? r : ok;
}

static void qc_unmap(struct xb_image *img, const struct xb_extent *ext)
{
    struct qcow2 *q = QC(img);
    pthread_mutex_lock(&q->lock);
    qc_inflight_del(q, ext->cookie);
    pthread_mutex_unlock(&q->lock);
}

static int qc_flush(struct xb_image *img)
{
    struct qcow2 *q = QC(img);
    pthread_mutex_lock(&q->lock);
    int r = qc_flush_locked(q);
    pthread_mutex_unlock(&q->lock);
    return r;
}

static int qc_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    struct qcow2 *q = QC(img);
    if (q->ro)
        return -EROFS;
    if (secure)
        return -EOPNOTSUPP;
    /* Only whole clusters can be dropped; a discard is a hint, the rest stays. */
    uint64_t s = (off + q->cs - 1) & ~(q->cs - 1), end = (off + len) & ~(q->cs - 1);
    if (off + len == img->size)
        end = (off + len + q->cs - 1) & ~(q->cs - 1);
    int r = 0;
    pthread_mutex_lock(&q->lock);
    for (uint64_t o = s; o < end && !r; o += q->cs) {
        uint8_t *l2;
        uint32_t idx;
        if ((r = qc_l2_entry(q, o, q->backing && q->version >= 3, &l2, &idx)) || !l2)
            continue;
        uint64_t e = qc_be64(l2 + idx * 8), ne;
        if (q->backing) {
            if (q->version < 3)
                continue; /* v2 cannot say "zeros" over a backing file */
            ne = QC_OFLAG_ZERO;
        } else {
            ne = 0;
        }
        if (e == ne)
            continue;
        qc_put_be64(l2 + idx * 8, ne);
        qc_cache_mark_dirty(&q->l2c, l2);
        if (!(r = free_entry_clusters(q, e)))
            r = qc_write_through(q, l2);
    }
    if (!r)
        r = qc_maybe_reclaim(q);
    pthread_mutex_unlock(&q->lock);
    return r;
}

static int qc_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    size_t chunk = 1u << 20;
    uint8_t *z = calloc(1, chunk);
    if (!z)
        return -ENOMEM;
    int r = 0;
    while (len && !r) {
        size_t n = len < chunk ? (size_t)len : chunk;
        struct iovec iov = {z, n};
        ssize_t w = qc_pwritev(img, &iov, 1, off);
        r = w < 0 ? (int)w : 0;
        off += n;
        len -= n;
    }
    free(z);
    return r;
}

static int64_t qc_refresh_size(struct xb_image *img) { return (int64_t)img->size; }

void xb_qcow2_close_impl(struct xb_image *img);

const struct xb_image_ops xb_qcow2_ops = {
    .map = qc_map,
    .unmap = qc_unmap,
    .preadv = qc_preadv,
    .pwritev = qc_pwritev,
    .flush = qc_flush,
    .discard = qc_discard,
    .write_zeroes = qc_write_zeroes,
    .refresh_size = qc_refresh_size,
    .close = xb_qcow2_close_impl,
};
