/* Format dispatch and the synchronous wrappers Python calls. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_int.h"

const char *xb_storage_version(void) { return "2"; }

void xb_seterr(char *err, const char *fmt, ...)
{
    if (!err)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, XB_ERRLEN, fmt, ap);
    va_end(ap);
}

ssize_t xb_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            memset((char *)buf + done, 0, len - done);
            break;
        }
        done += (size_t)r;
    }
    return (ssize_t)len;
}

ssize_t xb_pread_known(int fd, void *buf, size_t len, uint64_t off, uint64_t known_end)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            if (off + done < known_end)
                return -EIO; /* the file shrank under us: that data is gone, not zeros */
            memset((char *)buf + done, 0, len - done);
            break;
        }
        done += (size_t)r;
    }
    return (ssize_t)len;
}

ssize_t xb_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (size_t)r;
    }
    return (ssize_t)len;
}

size_t xb_iov_len(const struct iovec *iov, int iovcnt)
{
    size_t n = 0;
    for (int i = 0; i < iovcnt; i++)
        n += iov[i].iov_len;
    return n;
}

static void iov_copy(const struct iovec *iov, int iovcnt, size_t skip, char *buf, size_t len, int to_buf)
{
    for (int i = 0; i < iovcnt && len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - skip;
        if (n > len)
            n = len;
        if (to_buf)
            memcpy(buf, (char *)iov[i].iov_base + skip, n);
        else
            memcpy((char *)iov[i].iov_base + skip, buf, n);
        buf += n;
        len -= n;
        skip = 0;
    }
}

void xb_iov_to_buf(const struct iovec *iov, int iovcnt, size_t skip, void *buf, size_t len)
{
    iov_copy(iov, iovcnt, skip, buf, len, 1);
}

void xb_buf_to_iov(const struct iovec *iov, int iovcnt, size_t skip, const void *buf, size_t len)
{
    iov_copy(iov, iovcnt, skip, (char *)buf, len, 0);
}

struct xb_image *xb_image_open(const char *path, int format, unsigned flags, char *err)
{
    if (err)
        err[0] = 0;
    switch (format) {
    case XB_FMT_RAW:
    case XB_FMT_BLOCK:
        return xb_raw_open(path, format == XB_FMT_BLOCK, flags, err);
    case XB_FMT_QCOW2:
        return xb_qcow2_open(path, flags, 0, err);
    default:
        xb_seterr(err, "unknown image format %d", format);
        return NULL;
    }
}

/* Python's buffers and offsets are arbitrary; with O_DIRECT they go through an
 * aligned bounce buffer covering the enclosing aligned range. */
#define XB_DIO_ALIGN 4096u

static ssize_t direct_rw(struct xb_image *img, void *buf, size_t len, uint64_t off, int write)
{
    uint64_t a = off & ~(uint64_t)(XB_DIO_ALIGN - 1);
    uint64_t e = (off + len + XB_DIO_ALIGN - 1) & ~(uint64_t)(XB_DIO_ALIGN - 1);
    size_t blen = (size_t)(e - a);
    void *b;
    if (posix_memalign(&b, XB_DIO_ALIGN, blen))
        return -ENOMEM;
    struct iovec iov = {b, blen};
    ssize_t r = 0;
    if (!write || a != off || e != off + len) {
        /* The aligned range may run past a file whose size is not block aligned. */
        memset(b, 0, blen);
        r = img->ops->preadv(img, &iov, 1, a);
    }
    if (r >= 0 && !write)
        memcpy(buf, (char *)b + (off - a), len);
    if (r >= 0 && write) {
        memcpy((char *)b + (off - a), buf, len);
        r = img->ops->pwritev(img, &iov, 1, a);
    }
    free(b);
    return r < 0 ? r : (ssize_t)len;
}

static int check_range(struct xb_image *img, size_t len, uint64_t off)
{
    if (off > img->size || len > img->size - off)
        return -EINVAL;
    return 0;
}

ssize_t xb_image_read(struct xb_image *img, void *buf, size_t len, uint64_t off)
{
    int r = check_range(img, len, off);
    if (r)
        return r;
    if (img->direct)
        return direct_rw(img, buf, len, off, 0);
    struct iovec iov = {buf, len};
    return img->ops->preadv(img, &iov, 1, off);
}

ssize_t xb_image_write(struct xb_image *img, const void *buf, size_t len, uint64_t off)
{
    int r = check_range(img, len, off);
    if (r)
        return r;
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    if (img->direct)
        return direct_rw(img, (void *)buf, len, off, 1);
    struct iovec iov = {(void *)buf, len};
    return img->ops->pwritev(img, &iov, 1, off);
}

int xb_image_flush(struct xb_image *img) { return img->ops->flush(img); }

int xb_image_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    int r = check_range(img, len, off);
    if (r)
        return r;
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    return img->ops->discard(img, off, len, secure);
}

int xb_image_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    int r = check_range(img, len, off);
    if (r)
        return r;
    if (img->caps & XB_CAP_READONLY)
        return -EROFS;
    return img->ops->write_zeroes(img, off, len);
}

int64_t xb_image_refresh_size(struct xb_image *img) { return img->ops->refresh_size(img); }

void xb_image_close(struct xb_image *img)
{
    if (img)
        img->ops->close(img);
}

int xb_image_check(struct xb_image *img, struct xb_check_result *out, char *err)
{
    memset(out, 0, sizeof(*out));
    if (err)
        err[0] = 0;
    if (img->format == XB_FMT_QCOW2)
        return xb_qcow2_check(img, out, err);
    return 0;
}

int xb_image_describe(struct xb_image *img, struct xb_image_desc *out)
{
    memset(out, 0, sizeof(*out));
    out->format = img->format;
    out->virtual_size = img->size;
    if (img->format == XB_FMT_QCOW2)
        return xb_qcow2_describe(img, out);
    if (img->format == XB_FMT_RAW) {
        struct stat st;
        int fd = *(int *)img->priv; /* raw keeps its fd first */
        if (fstat(fd, &st) == 0)
            out->allocated_bytes = (uint64_t)st.st_blocks * 512;
    } else {
        out->allocated_bytes = img->size;
    }
    return 0;
}
