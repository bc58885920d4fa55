/* qcow2 header parsing and validation, open/close, describe.
 * Everything read here is hostile: each field is bounded before use. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "qcow2.h"

extern const struct xb_image_ops xb_qcow2_ops;

#define QC_MAGIC 0x514649fbu
#define QC_EXT_BACKING_FORMAT 0xe2792acau
#define QC_MAX_L1_BYTES (32u << 20)
#define QC_MAX_RT_BYTES (8u << 20)
#define QC_MAX_SIZE (1ULL << 55)

static void qc_free(struct qcow2 *q)
{
    if (q->backing)
        q->backing->ops->close(q->backing);
    qc_cache_free(&q->l2c);
    qc_cache_free(&q->rbc);
    free(q->l1);
    free(q->rt);
    free(q->pending);
    free(q->infl);
    qc_codec_free(q);
    if (q->fd >= 0)
        close(q->fd);
    pthread_mutex_destroy(&q->lock);
    free(q);
}

void xb_qcow2_close_impl(struct xb_image *img)
{
    struct qcow2 *q = QC(img);
    pthread_mutex_lock(&q->lock);
    /* the second flush makes the frees deferred by the first durable */
    if (!q->ro && qc_flush_locked(q) == 0)
        qc_flush_locked(q);
    pthread_mutex_unlock(&q->lock);
    qc_free(q);
}

struct xb_image *xb_image_backing(struct xb_image *img)
{
    return img->format == XB_FMT_QCOW2 ? QC(img)->backing : NULL;
}

static int read_table(struct qcow2 *q, uint64_t off, uint64_t n, uint64_t **out)
{
    *out = calloc(n ? n : 1, 8);
    if (!*out)
        return -ENOMEM;
    if (!n)
        return 0;
    ssize_t r = xb_pread_full(q->fd, *out, n * 8, off);
    if (r < 0)
        return (int)r;
    for (uint64_t i = 0; i < n; i++)
        (*out)[i] = __builtin_bswap64((*out)[i]);
    return 0;
}

static const char *incompat_name(int bit)
{
    switch (bit) {
    case 0:
        return "dirty";
    case 1:
        return "corrupt";
    case 2:
        return "external data file";
    case 3:
        return "compression type";
    case 4:
        return "extended L2 entries";
    default:
        return "unknown";
    }
}

/* The backing file: its name comes from the header, which whoever made the image wrote, so the
 * caller's callback decides whether and how the name resolves and opens it (xenblk: only under
 * storage.backing_dirs, beneath the directory, no symlinks). Whatever it hands back must be a
 * regular file: a device, FIFO or socket is never read as someone's base image. */
static int open_backing(struct qcow2 *q, unsigned flags, int depth, xb_backing_fn backing, void *ctx, char *err)
{
    int is_qcow2 = !strcmp(q->backing_fmt, "qcow2");
    if (!is_qcow2 && q->backing_fmt[0] && strcmp(q->backing_fmt, "raw") && strcmp(q->backing_fmt, "file")) {
        xb_seterr(err, "%s: backing format '%s' is not supported", q->path, q->backing_fmt);
        return -ENOTSUP;
    }
    if (!backing) {
        xb_seterr(err, "%s: has a backing file (%s) but backing files are not allowed here", q->path,
                  q->backing_file);
        return -EPERM;
    }
    if (depth + 1 >= XB_MAX_BACKING_DEPTH) {
        xb_seterr(err, "backing chain deeper than %d (a loop?) at %s", XB_MAX_BACKING_DEPTH, q->path);
        return -ELOOP;
    }
    char sub[XB_ERRLEN], resolved[XB_PATHLEN];
    sub[0] = 0;
    resolved[0] = 0;
    int fd = backing(ctx, q->path, q->backing_file, is_qcow2 ? "qcow2" : "raw", resolved, sub);
    if (fd < 0) {
        if (sub[0])
            xb_seterr(err, "%s", sub);
        else
            xb_seterr(err, "%s: backing file %s: %s", q->path, q->backing_file, strerror(-fd));
        return fd;
    }
    resolved[sizeof(resolved) - 1] = 0;
    if (!resolved[0])
        snprintf(resolved, sizeof(resolved), "%s", q->backing_file);
    struct stat st;
    if (fstat(fd, &st)) {
        xb_seterr(err, "%s: backing file %s: %s", q->path, resolved, strerror(errno));
        close(fd);
        return -EIO;
    }
    if (!S_ISREG(st.st_mode)) {
        xb_seterr(err, "%s: backing file %s is %s (only regular files are backing files)", q->path, resolved,
                  xb_file_kind(st.st_mode));
        close(fd);
        return -EPERM;
    }
    unsigned bflags = XB_OPEN_RDONLY | (flags & XB_OPEN_DIRECT ? 0 : XB_OPEN_BUFFERED);
    if (is_qcow2)
        q->backing = xb_qcow2_open_fd(fd, resolved, bflags, depth + 1, backing, ctx, sub);
    else
        q->backing = xb_raw_open_fd(fd, resolved, 0, bflags & ~XB_OPEN_DIRECT, sub);
    if (!q->backing) {
        /* an error from deeper down already names its image (and nesting would only truncate it) */
        xb_seterr(err, "%s", sub);
        return -EIO;
    }
    return 0;
}

static int parse_extensions(struct qcow2 *q, const uint8_t *h, uint64_t end, char *err)
{
    uint64_t o = q->version >= 3 ? q->header_len : 72;
    while (o + 8 <= end) {
        uint32_t type = qc_be32(h + o), len = qc_be32(h + o + 4);
        if (type == 0)
            break;
        if (len > end - o - 8) {
            xb_seterr(err, "%s: header extension 0x%x runs past the header cluster", q->path, type);
            return -EINVAL;
        }
        if (type == QC_EXT_BACKING_FORMAT) {
            if (len >= sizeof(q->backing_fmt)) {
                xb_seterr(err, "%s: backing format name too long", q->path);
                return -EINVAL;
            }
            memcpy(q->backing_fmt, h + o + 8, len);
            q->backing_fmt[len] = 0;
        }
        o += 8 + (((uint64_t)len + 7) & ~7ULL);
    }
    return 0;
}

#define FAIL(...)                                                                                                      \
    do {                                                                                                               \
        xb_seterr(err, __VA_ARGS__);                                                                                   \
        goto fail;                                                                                                     \
    } while (0)

struct xb_image *xb_qcow2_open_fd(int fd, const char *path, unsigned flags, int depth, xb_backing_fn backing,
                                  void *ctx, char *err)
{
    struct qcow2 *q = calloc(1, sizeof(*q));
    if (!q) {
        close(fd);
        xb_seterr(err, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&q->lock, NULL);
    q->fd = fd;
    uint8_t *h = NULL;
    snprintf(q->path, sizeof(q->path), "%s", path);
    int fd_ro = 0, rc = xb_fd_prepare(fd, &fd_ro);
    if (rc)
        FAIL("%s: %s", path, strerror(-rc));
    q->ro = fd_ro || (flags & XB_OPEN_RDONLY);
    q->meta_wt = !q->ro && (flags & XB_OPEN_WRITETHROUGH_META);
    q->wt_l1_idx = -1;
    struct stat st;
    if (fstat(q->fd, &st))
        FAIL("%s: %s", path, strerror(errno));
    /* a block device only as the top image (the caller named it); backing files are regular files */
    if (!S_ISREG(st.st_mode) && !(S_ISBLK(st.st_mode) && depth == 0))
        FAIL("%s: not a regular file%s (it is %s)", path, depth ? "" : " or block device", xb_file_kind(st.st_mode));
    uint64_t fsize = (uint64_t)st.st_size;
    if (S_ISBLK(st.st_mode))
        fsize = (uint64_t)lseek(q->fd, 0, SEEK_END);
    uint8_t h0[112] = {0};
    if (fsize < 72)
        FAIL("%s: too short for a qcow2 header (%llu bytes)", path, (unsigned long long)fsize);
    if (xb_pread_full(q->fd, h0, sizeof(h0), 0) < 0)
        FAIL("%s: cannot read header", path);
    if (qc_be32(h0) != QC_MAGIC)
        FAIL("%s: not a qcow2 image (bad magic)", path);
    q->version = (int)qc_be32(h0 + 4);
    if (q->version != 2 && q->version != 3)
        FAIL("%s: qcow2 version %d is not supported", path, q->version);
    q->cluster_bits = qc_be32(h0 + 20);
    if (q->cluster_bits < 9 || q->cluster_bits > 21)
        FAIL("%s: cluster_bits %u out of range 9..21", path, q->cluster_bits);
    q->cs = 1ULL << q->cluster_bits;
    q->l2_bits = q->cluster_bits - 3;
    uint64_t size = qc_be64(h0 + 24);
    if (size > QC_MAX_SIZE)
        FAIL("%s: virtual size %llu too large", path, (unsigned long long)size);
    if (qc_be32(h0 + 32) != 0)
        FAIL("%s: encrypted images are not supported (crypt_method %u)", path, qc_be32(h0 + 32));
    q->l1_size = qc_be32(h0 + 36);
    q->l1_off = qc_be64(h0 + 40);
    q->rt_off = qc_be64(h0 + 48);
    uint32_t rt_clusters = qc_be32(h0 + 56);
    q->nb_snapshots = qc_be32(h0 + 60);
    q->rc_order = 4;
    q->header_len = 72;
    if (q->version == 3) {
        q->incompat = qc_be64(h0 + 72);
        q->compat = qc_be64(h0 + 80);
        q->autoclear = qc_be64(h0 + 88);
        q->rc_order = (int)qc_be32(h0 + 96);
        q->header_len = qc_be32(h0 + 100);
        if (q->header_len < 104 || q->header_len > q->cs || q->header_len > fsize)
            FAIL("%s: bad header length %u", path, q->header_len);
        if (q->incompat & (1ULL << 3)) {
            if (q->header_len < 105)
                FAIL("%s: compression type bit set but header too short", path);
            q->ctype = h0[104];
            if (q->ctype > 1)
                FAIL("%s: unknown compression type %d", path, q->ctype);
        }
        for (int bit = 0; bit < 64; bit++) {
            if (!(q->incompat & (1ULL << bit)) || bit == 3)
                continue;
            if (bit <= 1) {
                if (!q->ro)
                    FAIL("%s: the image is marked %s; repair it with 'qemu-img check -r all' first (this driver does not "
                         "rebuild refcounts)", path, incompat_name(bit));
                continue; /* reads do not depend on refcounts */
            }
            FAIL("%s: unsupported incompatible feature bit %d (%s)", path, bit, incompat_name(bit));
        }
    }
    if (q->rc_order < 0 || q->rc_order > 6) /* read as int: a huge u32 is negative */
        FAIL("%s: refcount_order %d out of range 0..6", path, q->rc_order);
    q->rb_bits = q->cluster_bits + 3 - (unsigned)q->rc_order;
    if (q->nb_snapshots && !q->ro)
        FAIL("%s: images with internal snapshots can only be opened read-only", path);
    /* L1 */
    uint64_t l2_span = q->cs << q->l2_bits;
    uint64_t need_l1 = (size + l2_span - 1) / l2_span;
    if ((uint64_t)q->l1_size * 8 > QC_MAX_L1_BYTES)
        FAIL("%s: L1 table too large (%u entries)", path, q->l1_size);
    if (q->l1_size < need_l1)
        FAIL("%s: L1 table too small for the virtual size", path);
    if (q->l1_size && ((q->l1_off & (q->cs - 1)) || !q->l1_off || q->l1_off > fsize ||
                       (uint64_t)q->l1_size * 8 > fsize - q->l1_off))
        FAIL("%s: L1 table offset 0x%llx invalid or past the end of the file", path, (unsigned long long)q->l1_off);
    /* refcount table */
    if (!rt_clusters || (uint64_t)rt_clusters * q->cs > QC_MAX_RT_BYTES)
        FAIL("%s: refcount table size (%u clusters) invalid", path, rt_clusters);
    if ((q->rt_off & (q->cs - 1)) || !q->rt_off || q->rt_off > fsize || (uint64_t)rt_clusters * q->cs > fsize - q->rt_off)
        FAIL("%s: refcount table offset 0x%llx invalid or past the end of the file", path,
             (unsigned long long)q->rt_off);
    q->rt_entries = (uint64_t)rt_clusters * q->cs / 8;
    /* header cluster: backing name and extensions */
    uint64_t hlen = q->cs < fsize ? q->cs : fsize;
    h = calloc(1, q->cs);
    if (!h || xb_pread_full(q->fd, h, hlen, 0) < 0)
        FAIL("%s: cannot read header cluster", path);
    uint64_t bf_off = qc_be64(h0 + 8);
    uint32_t bf_len = qc_be32(h0 + 16);
    uint64_t ext_end = hlen;
    if (bf_off) {
        if (bf_len == 0 || bf_len >= sizeof(q->backing_file) || bf_off > hlen || bf_len > hlen - bf_off)
            FAIL("%s: backing file name out of bounds", path);
        memcpy(q->backing_file, h + bf_off, bf_len);
        q->backing_file[bf_len] = 0;
        if (strlen(q->backing_file) != bf_len)
            FAIL("%s: backing file name contains NUL", path);
        if (bf_off < ext_end)
            ext_end = bf_off;
    }
    if (parse_extensions(q, h, ext_end, err))
        goto fail;
    free(h);
    h = NULL;
    q->file_end = (fsize + q->cs - 1) & ~(q->cs - 1);
    q->disk_size = fsize;
    if (read_table(q, q->l1_off, q->l1_size, &q->l1) || read_table(q, q->rt_off, q->rt_entries, &q->rt))
        FAIL("%s: cannot read L1/refcount tables", path);
    if (qc_cache_init(q, &q->l2c, 1) || qc_cache_init(q, &q->rbc, 0))
        FAIL("out of memory");
    if (q->backing_file[0] && open_backing(q, flags, depth, backing, ctx, err))
        goto fail;
    if (!q->ro && q->autoclear) {
        /* We do not maintain what autoclear features (bitmaps...) describe. */
        uint8_t z[8] = {0};
        if (xb_pwrite_full(q->fd, z, 8, 88) < 0 || fdatasync(q->fd))
            FAIL("%s: cannot clear autoclear features: %s", path, strerror(errno));
        q->autoclear = 0;
    }
    struct xb_image *img = &q->img;
    img->ops = &xb_qcow2_ops;
    img->priv = q;
    img->format = XB_FMT_QCOW2;
    img->size = size;
    img->logical_block = 512;
    img->physical_block = q->cs < 4096 ? (uint32_t)q->cs : 4096;
    img->caps = XB_CAP_FLUSH;
    if (q->ro) {
        img->caps |= XB_CAP_READONLY;
    } else {
        img->caps |= XB_CAP_DISCARD | XB_CAP_WRITE_ZEROES;
        img->discard_granularity = (uint32_t)q->cs;
    }
    img->direct = 0; /* metadata I/O is unaligned: qcow2 always uses the page cache */
    return img;
fail:
    free(h);
    qc_free(q);
    return NULL;
}

int xb_qcow2_describe(struct xb_image *img, struct xb_image_desc *d)
{
    struct qcow2 *q = QC(img);
    struct stat st;
    d->cluster_size = (uint32_t)q->cs;
    d->qcow2_version = q->version;
    d->refcount_bits = 1 << q->rc_order;
    d->compression_type = q->ctype;
    if (fstat(q->fd, &st) == 0)
        d->allocated_bytes = (uint64_t)st.st_blocks * 512;
    snprintf(d->backing_file, sizeof(d->backing_file), "%s", q->backing_file);
    snprintf(d->backing_format, sizeof(d->backing_format), "%s", q->backing_fmt);
    return 0;
}
