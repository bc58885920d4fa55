/* The storage API Python calls (storage_api.h): opening beneath a directory, format dispatch and the
 * synchronous wrappers. The helpers the drivers share are in util.c. */
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "storage_int.h"

#ifndef SYS_openat2
#define SYS_openat2 437 /* the same number on every architecture */
#endif

/* The openat2-less walk: each directory component opened with O_PATH|O_NOFOLLOW from the
 * previous one, so no symlink is ever followed; `..` is refused outright (the caller passes a
 * path it normalized, so a `..` left in it would leave the directory anyway). */
static int open_beneath_walk(int dirfd, const char *rel, int oflags)
{
    char buf[XB_PATHLEN];
    if (strlen(rel) >= sizeof(buf))
        return -ENAMETOOLONG;
    strcpy(buf, rel);
    int cur = dirfd, ret = -ENOENT;
    char *save = NULL, *comp = strtok_r(buf, "/", &save);
    while (comp) {
        char *next = strtok_r(NULL, "/", &save);
        if (!strcmp(comp, "..")) {
            ret = -EXDEV;
            break;
        }
        if (!strcmp(comp, ".")) {
            if (next) {
                comp = next;
                continue;
            }
            comp = "."; /* `dir/.`: the directory itself, as openat2 would give */
        }
        int fd = openat(cur, comp, next ? O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC : oflags);
        if (fd < 0) {
            ret = -errno;
            struct stat st;
            /* O_PATH|O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR: name the real reason */
            if (ret == -ENOTDIR && !fstatat(cur, comp, &st, AT_SYMLINK_NOFOLLOW) && S_ISLNK(st.st_mode))
                ret = -ELOOP;
            break;
        }
        if (cur != dirfd)
            close(cur);
        cur = fd;
        if (!next) {
            return fd;
        }
        comp = next;
    }
    if (cur != dirfd)
        close(cur);
    return ret;
}

int xb_open_beneath(int dirfd, const char *rel, int oflags, unsigned how_flags)
{
    if (!rel[0])
        return -ENOENT;
    if (rel[0] == '/')
        return -EXDEV;
    /* openat2 refuses O_PATH with other flags; O_NOFOLLOW also makes a final symlink ELOOP in the walk */
    oflags |= O_CLOEXEC | O_NOFOLLOW | ((oflags & O_PATH) ? 0 : O_NOCTTY);
    if (!(how_flags & XB_BENEATH_WALK)) {
        struct open_how how = {
            .flags = (uint64_t)oflags,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        long fd = syscall(SYS_openat2, dirfd, rel, &how, sizeof(how));
        if (fd >= 0)
            return (int)fd;
        /* ENOSYS: Linux < 5.6; EPERM: a seccomp filter that does not know openat2 */
        if (errno != ENOSYS && errno != EPERM)
            return -errno;
    }
    return open_beneath_walk(dirfd, rel, oflags);
}

int xb_ofd_lock(int fd)
{
    /* An OFD lock belongs to the open file description: it conflicts with every other open of the
     * file, in this process too (two devices of one daemon), and goes away only when the last fd of
     * that description is closed (xb_image_close) or its process dies. POSIX (F_SETLK) locks would
     * not conflict within a process and would drop when any fd of the file is closed. */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    short type = (fl & O_ACCMODE) == O_RDONLY ? F_RDLCK : F_WRLCK;
    struct flock lk = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd, F_OFD_SETLK, &lk) == 0)
        return 0;
    if (errno != EAGAIN && errno != EACCES)
        return -errno;
    /* Who is in the way: a writer, or (for our write lock) readers only. The holder may let go
     * between the two calls: then it is reported as a reader, and the caller's retry succeeds. */
    struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd, F_OFD_GETLK, &q) == 0 && q.l_type == F_WRLCK)
        return XB_LOCK_HELD_WRITE;
    return XB_LOCK_HELD_READ;
}

struct xb_image *xb_image_open_fd(int fd, const char *name, int format, unsigned flags, xb_backing_fn backing,
                                  void *ctx, char *err)
{
    if (err)
        err[0] = 0;
    switch (format) {
    case XB_FMT_RAW:
    case XB_FMT_BLOCK:
        return xb_raw_open_fd(fd, name, format == XB_FMT_BLOCK, flags, err);
    case XB_FMT_QCOW2:
        return xb_qcow2_open_fd(fd, name, flags, 0, backing, ctx, err);
    case XB_FMT_VHD:
        return xb_vhd_open_fd(fd, name, flags, 0, backing, ctx, err);
    default:
        close(fd);
        xb_seterr(err, "unknown image format %d", format);
        return NULL;
    }
}

struct xb_image *xb_image_open(const char *path, int format, unsigned flags, char *err)
{
    int base = O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK;
    int fd = open(path, base | (flags & XB_OPEN_RDONLY ? O_RDONLY : O_RDWR));
    if (fd < 0 && !(flags & XB_OPEN_RDONLY) && (errno == EACCES || errno == EROFS))
        fd = open(path, base | O_RDONLY);
    if (fd < 0) {
        xb_seterr(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    return xb_image_open_fd(fd, path, format, flags, NULL, NULL, err);
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
    if (img->format == XB_FMT_VHD)
        return xb_vhd_check(img, out, err);
    return 0;
}

int xb_image_repair_leaks(struct xb_image *img, struct xb_check_result *out, char *err)
{
    memset(out, 0, sizeof(*out));
    if (err)
        err[0] = 0;
    if (img->format == XB_FMT_QCOW2)
        return xb_qcow2_repair_leaks(img, out, err);
    return 0;
}

int xb_image_describe(struct xb_image *img, struct xb_image_desc *out)
{
    memset(out, 0, sizeof(*out));
    out->format = img->format;
    out->virtual_size = img->size;
    if (img->format == XB_FMT_QCOW2)
        return xb_qcow2_describe(img, out);
    if (img->format == XB_FMT_VHD)
        return xb_vhd_describe(img, out);
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
