/* qcow2 header parsing and validation, open/close, describe.
 * Everything read here is hostile: each field is bounded before use. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
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
    if (img->format == XB_FMT_VHD)
        return xb_vhd_backing(img);
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

static const char *incompat_name(uint64_t feature)
{
    switch (feature) {
    case QCOW2_INCOMPAT_DIRTY:
        return "dirty";
    case QCOW2_INCOMPAT_CORRUPT:
        return "corrupt";
    case QCOW2_INCOMPAT_DATA_FILE:
        return "external data file";
    case QCOW2_INCOMPAT_COMPRESSION:
        return "compression type";
    case QCOW2_INCOMPAT_EXTL2:
        return "extended L2 entries";
    default:
        return "unknown";
    }
}

#define QC_FIELD(b, f) ((b) + offsetof(struct qc_header, f))

/* b holds at least the file's first sizeof(struct qc_header) bytes; the version 3 fields are read
 * whatever the version says (the caller looks at them only for version 3). */
static void qc_header_decode(const uint8_t *b, struct qc_header *h)
{
    h->magic = qc_be32(QC_FIELD(b, magic));
    h->version = qc_be32(QC_FIELD(b, version));
    h->backing_file_offset = qc_be64(QC_FIELD(b, backing_file_offset));
    h->backing_file_size = qc_be32(QC_FIELD(b, backing_file_size));
    h->cluster_bits = qc_be32(QC_FIELD(b, cluster_bits));
    h->size = qc_be64(QC_FIELD(b, size));
    h->crypt_method = qc_be32(QC_FIELD(b, crypt_method));
    h->l1_size = qc_be32(QC_FIELD(b, l1_size));
    h->l1_table_offset = qc_be64(QC_FIELD(b, l1_table_offset));
    h->refcount_table_offset = qc_be64(QC_FIELD(b, refcount_table_offset));
    h->refcount_table_clusters = qc_be32(QC_FIELD(b, refcount_table_clusters));
    h->nb_snapshots = qc_be32(QC_FIELD(b, nb_snapshots));
    h->snapshots_offset = qc_be64(QC_FIELD(b, snapshots_offset));
    h->incompatible_features = qc_be64(QC_FIELD(b, incompatible_features));
    h->compatible_features = qc_be64(QC_FIELD(b, compatible_features));
    h->autoclear_features = qc_be64(QC_FIELD(b, autoclear_features));
    h->refcount_order = qc_be32(QC_FIELD(b, refcount_order));
    h->header_length = qc_be32(QC_FIELD(b, header_length));
    h->compression_type = *QC_FIELD(b, compression_type);
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
    int fd = xb_backing_open(q->path, q->backing_file, is_qcow2 ? "qcow2" : "raw", backing, ctx, resolved, err);
    if (fd < 0)
        return fd;
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
    uint64_t o = q->version >= 3 ? q->header_len : QC_HEADER_V2_LEN;
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

/* In the helpers below: format the reason into err and give up (the caller frees what was made). */
#define REFUSE(...)                                                                                                    \
    do {                                                                                                               \
        xb_seterr(err, __VA_ARGS__);                                                                                   \
        return -EINVAL;                                                                                                \
    } while (0)

/* The fd as an image file: writable or not, a regular file (or the top image's block device), its size. */
static int open_file(struct qcow2 *q, const char *path, unsigned flags, int depth, uint64_t *fsize, char *err)
{
    int fd_ro = 0, rc = xb_fd_prepare(q->fd, &fd_ro);
    if (rc)
        REFUSE("%s: %s", path, strerror(-rc));
    q->ro = fd_ro || (flags & XB_OPEN_RDONLY);
    q->meta_wt = !q->ro && (flags & XB_OPEN_WRITETHROUGH_META);
    q->wt_l1_idx = -1;
    struct stat st;
    if (fstat(q->fd, &st))
        REFUSE("%s: %s", path, strerror(errno));
    /* a block device only as the top image (the caller named it); backing files are regular files */
    if (!S_ISREG(st.st_mode) && !(S_ISBLK(st.st_mode) && depth == 0))
        REFUSE("%s: not a regular file%s (it is %s)", path, depth ? "" : " or block device", xb_file_kind(st.st_mode));
    *fsize = (uint64_t)st.st_size;
    if (S_ISBLK(st.st_mode))
        *fsize = (uint64_t)lseek(q->fd, 0, SEEK_END);
    return 0;
}

/* The incompatible features: compression type is read, dirty and corrupt only allow reading
 * (which does not depend on refcounts), anything else is refused. */
static int check_incompat(struct qcow2 *q, const struct qc_header *h, const char *path, char *err)
{
    if (q->incompat & QCOW2_INCOMPAT_COMPRESSION) {
        if (q->header_len <= offsetof(struct qc_header, compression_type))
            REFUSE("%s: compression type bit set but header too short", path);
        q->ctype = h->compression_type;
        if (q->ctype > 1)
            REFUSE("%s: unknown compression type %d", path, q->ctype);
    }
    for (int bit = 0; bit < 64; bit++) {
        uint64_t feature = 1ULL << bit;
        if (!(q->incompat & feature) || feature == QCOW2_INCOMPAT_COMPRESSION)
            continue;
        if (feature == QCOW2_INCOMPAT_DIRTY || feature == QCOW2_INCOMPAT_CORRUPT) {
            if (!q->ro)
                REFUSE("%s: the image is marked %s; repair it with 'qemu-img check -r all' first (this driver does not "
                       "rebuild refcounts)", path, incompat_name(feature));
            continue; /* reads do not depend on refcounts */
        }
        REFUSE("%s: unsupported incompatible feature bit %d (%s)", path, bit, incompat_name(feature));
    }
    return 0;
}

/* The fixed header: version, geometry, features; each field bounded before use. */
static int parse_header(struct qcow2 *q, const struct qc_header *h, uint64_t fsize, const char *path, char *err)
{
    if (h->magic != QC_MAGIC)
        REFUSE("%s: not a qcow2 image (bad magic)", path);
    q->version = (int)h->version;
    if (q->version != 2 && q->version != 3)
        REFUSE("%s: qcow2 version %d is not supported", path, q->version);
    q->cluster_bits = h->cluster_bits;
    if (q->cluster_bits < 9 || q->cluster_bits > 21)
        REFUSE("%s: cluster_bits %u out of range 9..21", path, q->cluster_bits);
    q->cs = 1ULL << q->cluster_bits;
    q->l2_bits = q->cluster_bits - 3;
    if (h->size > QC_MAX_SIZE)
        REFUSE("%s: virtual size %llu too large", path, (unsigned long long)h->size);
    if (h->crypt_method != 0)
        REFUSE("%s: encrypted images are not supported (crypt_method %u)", path, h->crypt_method);
    q->l1_size = h->l1_size;
    q->l1_off = h->l1_table_offset;
    q->rt_off = h->refcount_table_offset;
    q->nb_snapshots = h->nb_snapshots;
    q->rc_order = 4;
    q->header_len = QC_HEADER_V2_LEN;
    if (q->version == 3) {
        q->incompat = h->incompatible_features;
        q->compat = h->compatible_features;
        q->autoclear = h->autoclear_features;
        q->rc_order = (int)h->refcount_order;
        q->header_len = h->header_length;
        if (q->header_len < QC_HEADER_V3_MIN_LEN || q->header_len > q->cs || q->header_len > fsize)
            REFUSE("%s: bad header length %u", path, q->header_len);
        if (check_incompat(q, h, path, err))
            return -EINVAL;
    }
    if (q->rc_order < 0 || q->rc_order > 6) /* read as int: a huge u32 is negative */
        REFUSE("%s: refcount_order %d out of range 0..6", path, q->rc_order);
    q->rb_bits = q->cluster_bits + 3 - (unsigned)q->rc_order;
    if (q->nb_snapshots && !q->ro)
        REFUSE("%s: images with internal snapshots can only be opened read-only", path);
    return 0;
}

/* The L1 and refcount tables: their size and place, within the file. */
static int check_tables(struct qcow2 *q, const struct qc_header *h, uint64_t fsize, const char *path, char *err)
{
    uint64_t l2_span = q->cs << q->l2_bits;
    uint64_t need_l1 = (h->size + l2_span - 1) / l2_span;
    if ((uint64_t)q->l1_size * 8 > QC_MAX_L1_BYTES)
        REFUSE("%s: L1 table too large (%u entries)", path, q->l1_size);
    if (q->l1_size < need_l1)
        REFUSE("%s: L1 table too small for the virtual size", path);
    if (q->l1_size && ((q->l1_off & (q->cs - 1)) || !q->l1_off || q->l1_off > fsize ||
                       (uint64_t)q->l1_size * 8 > fsize - q->l1_off))
        REFUSE("%s: L1 table offset 0x%llx invalid or past the end of the file", path, (unsigned long long)q->l1_off);
    uint32_t rt_clusters = h->refcount_table_clusters;
    if (!rt_clusters || (uint64_t)rt_clusters * q->cs > QC_MAX_RT_BYTES)
        REFUSE("%s: refcount table size (%u clusters) invalid", path, rt_clusters);
    if ((q->rt_off & (q->cs - 1)) || !q->rt_off || q->rt_off > fsize || (uint64_t)rt_clusters * q->cs > fsize - q->rt_off)
        REFUSE("%s: refcount table offset 0x%llx invalid or past the end of the file", path,
               (unsigned long long)q->rt_off);
    q->rt_entries = (uint64_t)rt_clusters * q->cs / 8;
    return 0;
}

/* The rest of the header cluster: the backing file name and the header extensions before it. */
static int read_header_cluster(struct qcow2 *q, const struct qc_header *h, uint64_t fsize, const char *path, char *err)
{
    uint64_t hlen = q->cs < fsize ? q->cs : fsize;
    uint8_t *buf = calloc(1, q->cs);
    if (!buf || xb_pread_full(q->fd, buf, hlen, 0) < 0) {
        free(buf);
        REFUSE("%s: cannot read header cluster", path);
    }
    uint64_t bf_off = h->backing_file_offset;
    uint32_t bf_len = h->backing_file_size;
    uint64_t ext_end = hlen;
    int rc = 0;
    if (bf_off) {
        if (bf_len == 0 || bf_len >= sizeof(q->backing_file) || bf_off > hlen || bf_len > hlen - bf_off) {
            xb_seterr(err, "%s: backing file name out of bounds", path);
            rc = -EINVAL;
            goto out;
        }
        memcpy(q->backing_file, buf + bf_off, bf_len);
        q->backing_file[bf_len] = 0;
        if (strlen(q->backing_file) != bf_len) {
            xb_seterr(err, "%s: backing file name contains NUL", path);
            rc = -EINVAL;
            goto out;
        }
        if (bf_off < ext_end)
            ext_end = bf_off;
    }
    rc = parse_extensions(q, buf, ext_end, err);
out:
    free(buf);
    return rc;
}

/* We do not maintain what autoclear features (bitmaps...) describe: a writer clears them. */
static int clear_autoclear(struct qcow2 *q, const char *path, char *err)
{
    uint8_t z[8] = {0};
    if (xb_pwrite_full(q->fd, z, 8, offsetof(struct qc_header, autoclear_features)) < 0 || fdatasync(q->fd))
        REFUSE("%s: cannot clear autoclear features: %s", path, strerror(errno));
    q->autoclear = 0;
    return 0;
}

static struct xb_image *make_image(struct qcow2 *q, uint64_t size)
{
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
    snprintf(q->path, sizeof(q->path), "%s", path);
    uint64_t fsize;
    if (open_file(q, path, flags, depth, &fsize, err))
        goto fail;
    uint8_t h0[112] = {0};
    if (fsize < QC_HEADER_V2_LEN)
        FAIL("%s: too short for a qcow2 header (%llu bytes)", path, (unsigned long long)fsize);
    if (xb_pread_full(q->fd, h0, sizeof(h0), 0) < 0)
        FAIL("%s: cannot read header", path);
    struct qc_header h;
    qc_header_decode(h0, &h);
    if (parse_header(q, &h, fsize, path, err) || check_tables(q, &h, fsize, path, err) ||
        read_header_cluster(q, &h, fsize, path, err))
        goto fail;
    q->file_end = (fsize + q->cs - 1) & ~(q->cs - 1);
    q->disk_size = fsize;
    if (read_table(q, q->l1_off, q->l1_size, &q->l1) || read_table(q, q->rt_off, q->rt_entries, &q->rt))
        FAIL("%s: cannot read L1/refcount tables", path);
    if (qc_cache_init(q, &q->l2c, 1) || qc_cache_init(q, &q->rbc, 0))
        FAIL("out of memory");
    if (q->backing_file[0] && open_backing(q, flags, depth, backing, ctx, err))
        goto fail;
    if (!q->ro && q->autoclear && clear_autoclear(q, path, err))
        goto fail;
    return make_image(q, h.size);
fail:
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
