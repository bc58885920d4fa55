/* Raw files and block devices: the guest offset is the host offset. */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include "storage_int.h"

struct raw {
    int fd; /* first: xb_image_describe reads it */
    int block;
    struct xb_image img;
};

static struct raw *R(struct xb_image *img) { return img->priv; }

static int raw_map(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext)
{
    (void)for_write;
    if (off >= img->size)
        return -EINVAL;
    ext->fd = R(img)->fd;
    ext->host_off = off;
    ext->len = len < img->size - off ? len : img->size - off;
    ext->cookie = 0;
    return 1;
}

static void raw_unmap(struct xb_image *img, const struct xb_extent *ext) { (void)img, (void)ext; }

static ssize_t raw_preadv(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    size_t total = xb_iov_len(iov, iovcnt), done = 0;
    while (done < total) {
        /* Rebuild the iovec tail after a short transfer. */
        struct iovec tmp[iovcnt];
        int n = 0;
        size_t skip = done;
        for (int i = 0; i < iovcnt; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            tmp[n].iov_base = (char *)iov[i].iov_base + skip;
            tmp[n++].iov_len = iov[i].iov_len - skip;
            skip = 0;
        }
        ssize_t r = preadv(R(img)->fd, tmp, n, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            /* The file shrank under us: what it held is gone, which is an error, not zeros.
             * Past the image's size (an O_DIRECT read rounded up to a block) it reads as zeros. */
            if (off + done < __atomic_load_n(&img->size, __ATOMIC_ACQUIRE))
                return -EIO;
            for (int i = 0; i < n; i++)
                memset(tmp[i].iov_base, 0, tmp[i].iov_len);
            break;
        }
        done += (size_t)r;
    }
    return (ssize_t)total;
}

static ssize_t raw_pwritev(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    size_t total = xb_iov_len(iov, iovcnt), done = 0;
    while (done < total) {
        struct iovec tmp[iovcnt];
        int n = 0;
        size_t skip = done;
        for (int i = 0; i < iovcnt; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            tmp[n].iov_base = (char *)iov[i].iov_base + skip;
            tmp[n++].iov_len = iov[i].iov_len - skip;
            skip = 0;
        }
        ssize_t r = pwritev(R(img)->fd, tmp, n, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (size_t)r;
    }
    return (ssize_t)total;
}

static int raw_flush(struct xb_image *img)
{
    return fdatasync(R(img)->fd) ? -errno : 0;
}

static int write_zero_bytes(struct xb_image *img, uint64_t off, uint64_t len)
{
    size_t chunk = 1u << 20;
    void *z;
    if (posix_memalign(&z, 4096, chunk))
        return -ENOMEM;
    memset(z, 0, chunk);
    int ret = 0;
    while (len) {
        size_t n = len < chunk ? (size_t)len : chunk;
        ssize_t r = xb_pwrite_full(R(img)->fd, z, n, off);
        if (r < 0) {
            ret = (int)r;
            break;
        }
        off += n;
        len -= n;
    }
    free(z);
    return ret;
}

static int raw_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    struct raw *r = R(img);
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    if (r->block) {
        uint64_t range[2] = {off, len};
        if (secure && !(img->caps & XB_CAP_SECURE_DISCARD))
            return -EOPNOTSUPP;
        return ioctl(r->fd, secure ? BLKSECDISCARD : BLKDISCARD, range) ? -errno : 0;
    }
    if (secure)
        return -EOPNOTSUPP;
    if (fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    /* A discard is a hint: a file system without hole punching keeps the data. */
    return errno == EOPNOTSUPP ? 0 : -errno;
}

static int raw_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    struct raw *r = R(img);
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    if (r->block) {
        uint64_t range[2] = {off, len};
        if (ioctl(r->fd, BLKZEROOUT, range) == 0)
            return 0;
    } else if (fallocate(r->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0) {
        return 0;
    }
    return write_zero_bytes(img, off, len);
}

static int64_t raw_refresh_size(struct xb_image *img)
{
    struct raw *r = R(img);
    uint64_t size;
    if (r->block) {
        if (ioctl(r->fd, BLKGETSIZE64, &size))
            return -errno;
    } else {
        struct stat st;
        if (fstat(r->fd, &st))
            return -errno;
        size = (uint64_t)st.st_size;
    }
    __atomic_store_n(&img->size, size, __ATOMIC_RELEASE);
    return (int64_t)size;
}

static void raw_close(struct xb_image *img)
{
    struct raw *r = R(img);
    close(r->fd);
    free(r);
}

static const struct xb_image_ops raw_ops = {
    .map = raw_map,
    .unmap = raw_unmap,
    .preadv = raw_preadv,
    .pwritev = raw_pwritev,
    .flush = raw_flush,
    .discard = raw_discard,
    .write_zeroes = raw_write_zeroes,
    .refresh_size = raw_refresh_size,
    .close = raw_close,
};

/* A number from the device's sysfs directory; -1 if the attribute is not there. */
static int64_t sysfs_attr(dev_t dev, const char *attr)
{
    char p[160], buf[64];
    snprintf(p, sizeof(p), "/sys/dev/block/%u:%u/%s", major(dev), minor(dev), attr);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return (int64_t)strtoull(buf, NULL, 10);
}

/* A queue limit. A partition has no queue/ of its own: it shares its disk's (the parent directory). */
static uint64_t sysfs_u64(dev_t dev, const char *attr)
{
    char a[64];
    snprintf(a, sizeof(a), "queue/%s", attr);
    int64_t v = sysfs_attr(dev, a);
    if (v < 0) {
        snprintf(a, sizeof(a), "../queue/%s", attr);
        v = sysfs_attr(dev, a);
    }
    return v < 0 ? 0 : (uint64_t)v;
}

static void setup_block(struct xb_image *img, struct stat *st)
{
    int fd = R(img)->fd, ssz = 512;
    unsigned int pbsz = 0;
    int ro = 0;
    if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
        img->logical_block = (uint32_t)ssz;
    if (ioctl(fd, BLKPBSZGET, &pbsz) == 0 && pbsz > 0)
        img->physical_block = pbsz;
    if (ioctl(fd, BLKROGET, &ro) == 0 && ro)
        img->caps |= XB_CAP_READONLY;
    img->caps |= XB_CAP_WRITE_ZEROES;
    /* The kernel sets discard_max_bytes to 0 for devices without discard; a
     * device without sysfs is probed. */
    uint64_t dmax = sysfs_u64(st->st_rdev, "discard_max_bytes");
    uint64_t gran = sysfs_u64(st->st_rdev, "discard_granularity");
    if (dmax) {
        img->caps |= XB_CAP_DISCARD;
        img->discard_granularity = gran ? (uint32_t)gran : img->logical_block;
    } else {
        uint64_t range[2] = {0, 0};
        if (!(img->caps & XB_CAP_READONLY) && ioctl(fd, BLKDISCARD, range) == 0) {
            img->caps |= XB_CAP_DISCARD;
            img->discard_granularity = img->logical_block;
        }
    }
    /* Where the first whole discard unit starts: not 0 for a partition or a dm-linear target that does
     * not begin on a granularity boundary (the kernel computes it per device, as blkback publishes it). */
    int64_t align = sysfs_attr(st->st_rdev, "discard_alignment");
    if ((img->caps & XB_CAP_DISCARD) && align > 0 && (uint64_t)align < img->discard_granularity)
        img->discard_alignment = (uint32_t)align;
    if (sysfs_u64(st->st_rdev, "secure_erase") && (img->caps & XB_CAP_DISCARD))
        img->caps |= XB_CAP_SECURE_DISCARD;
}

struct xb_image *xb_raw_open_fd(int fd, const char *path, int block, unsigned flags, char *err)
{
    int ro = 0;
    struct stat st;
    int rc = xb_fd_prepare(fd, &ro);
    if (rc || fstat(fd, &st)) {
        xb_seterr(err, "%s: %s", path, strerror(rc ? -rc : errno));
        close(fd);
        return NULL;
    }
    ro |= !!(flags & XB_OPEN_RDONLY);
    if (block && !S_ISBLK(st.st_mode)) {
        xb_seterr(err, "%s: not a block device (it is %s)", path, xb_file_kind(st.st_mode));
        close(fd);
        return NULL;
    }
    if (!block && !S_ISREG(st.st_mode)) {
        xb_seterr(err, "%s: not a regular file (it is %s)%s", path, xb_file_kind(st.st_mode),
                  S_ISBLK(st.st_mode) ? "; use format 'block' for a device" : "");
        close(fd);
        return NULL;
    }
    int direct = (flags & XB_OPEN_DIRECT) || (block && !(flags & XB_OPEN_BUFFERED));
    if (direct) {
        /* O_DIRECT can be set on an open fd: the caller opened it without, to check it first */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_DIRECT)) {
            xb_seterr(err, "%s: %s%s", path, strerror(errno), errno == EINVAL ? " (O_DIRECT unsupported?)" : "");
            close(fd);
            return NULL;
        }
    }
    struct raw *r = calloc(1, sizeof(*r));
    if (!r) {
        close(fd);
        xb_seterr(err, "out of memory");
        return NULL;
    }
    r->fd = fd;
    r->block = block;
    struct xb_image *img = &r->img;
    img->ops = &raw_ops;
    img->priv = r;
    img->format = block ? XB_FMT_BLOCK : XB_FMT_RAW;
    img->logical_block = 512;
    img->physical_block = block ? 512 : 4096;
    img->direct = direct;
    img->caps = XB_CAP_FLUSH | (ro ? XB_CAP_READONLY : 0);
    if (block) {
        setup_block(img, &st);
    } else {
        img->caps |= XB_CAP_DISCARD | XB_CAP_WRITE_ZEROES;
        img->discard_granularity = 4096;
    }
    if (img->caps & XB_CAP_READONLY)
        img->caps &= ~(XB_CAP_DISCARD | XB_CAP_SECURE_DISCARD | XB_CAP_WRITE_ZEROES);
    if (!(img->caps & XB_CAP_DISCARD))
        img->discard_granularity = 0;
    int64_t sz = raw_refresh_size(img);
    if (sz < 0) {
        xb_seterr(err, "%s: cannot read size: %s", path, strerror((int)-sz));
        raw_close(img);
        return NULL;
    }
    return img;
}
