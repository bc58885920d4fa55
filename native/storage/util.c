/* Helpers the image drivers share (storage_int.h): full-length I/O, iovec copies, fd checks, the
 * backing-file open both qcow2 and VHD use. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_int.h"

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

ssize_t xb_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    return xb_pread_known(fd, buf, len, off, 0); /* nothing known: every end of file reads as zeros */
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

int xb_fd_prepare(int fd, int *readonly)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if ((fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK))
        return -errno;
    *readonly = (fl & O_ACCMODE) == O_RDONLY;
    return 0;
}

const char *xb_file_kind(unsigned mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG:
        return "a regular file";
    case S_IFBLK:
        return "a block device";
    case S_IFCHR:
        return "a character device";
    case S_IFIFO:
        return "a FIFO";
    case S_IFSOCK:
        return "a socket";
    case S_IFDIR:
        return "a directory";
    case S_IFLNK:
        return "a symbolic link";
    default:
        return "not a regular file";
    }
}

int xb_backing_open(const char *image, const char *name, const char *fmt, xb_backing_fn backing, void *ctx,
                    char *resolved, char *err)
{
    char sub[XB_ERRLEN];
    sub[0] = 0;
    resolved[0] = 0;
    int fd = backing(ctx, image, name, fmt, resolved, sub);
    if (fd < 0) {
        if (sub[0])
            xb_seterr(err, "%s", sub);
        else
            xb_seterr(err, "%s: backing file %s: %s", image, name, strerror(-fd));
        return fd;
    }
    resolved[XB_PATHLEN - 1] = 0;
    if (!resolved[0])
        snprintf(resolved, XB_PATHLEN, "%s", name);
    struct stat st;
    if (fstat(fd, &st)) {
        xb_seterr(err, "%s: backing file %s: %s", image, resolved, strerror(errno));
        close(fd);
        return -EIO;
    }
    if (!S_ISREG(st.st_mode)) {
        xb_seterr(err, "%s: backing file %s is %s (only regular files are backing files)", image, resolved,
                  xb_file_kind(st.st_mode));
        close(fd);
        return -EPERM;
    }
    return fd;
}
