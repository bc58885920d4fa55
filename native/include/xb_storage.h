/*
 * The storage driver interface: what the data plane needs from an image.
 *
 * Drivers (raw file, block device, qcow2) live in the `xenblk._storage` cffi
 * module; the data plane (`xenblk._dataplane`) is a separate module and only
 * ever reaches a driver through `struct xb_image` and its ops table, so the
 * pointer handed from one module to the other is the whole contract.
 *
 * Two paths:
 *  - fast: `map` translates a guest byte range to (fd, host offset); the data
 *    plane then does the I/O itself through io_uring, straight from/to its
 *    buffers, and calls `unmap` when that I/O has completed.
 *  - slow: the synchronous preadv/pwritev/flush/discard calls, for what
 *    cannot be a plain fd range (qcow2 allocation, copy-on-write from a backing
 *    file, compressed or zero clusters, holes in a backing chain).
 * All ops are thread-safe: several queue threads of one device call them at once.
 * Every op returns 0 / a byte count on success and a negative errno on failure.
 */
#ifndef XB_STORAGE_H
#define XB_STORAGE_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

enum xb_image_format { XB_FMT_RAW = 0, XB_FMT_BLOCK = 1, XB_FMT_QCOW2 = 2, XB_FMT_VHD = 3, XB_FMT_RBD = 4 };

/* xb_image_open flags */
#define XB_OPEN_RDONLY 0x1u
#define XB_OPEN_DIRECT 0x2u   /* O_DIRECT (cache=none); default for block devices */
#define XB_OPEN_BUFFERED 0x4u /* force page cache even for a block device */
/* qcow2: an allocating write puts its metadata in the file (pwrite, no sync) before it returns, so a
 * killed process loses nothing it acknowledged; refcounts come from a reserve made durable in batches. */
#define XB_OPEN_WRITETHROUGH_META 0x8u

/* xb_image.caps */
#define XB_CAP_FLUSH 0x1u
#define XB_CAP_DISCARD 0x2u
#define XB_CAP_SECURE_DISCARD 0x4u
#define XB_CAP_READONLY 0x8u /* the image cannot be written (ro file, ro device) */
#define XB_CAP_WRITE_ZEROES 0x10u

/* A directly addressable piece of a guest range, from ops->map. */
struct xb_extent {
    int fd;            /* host fd to do the I/O on */
    uint64_t host_off; /* byte offset in that fd */
    uint64_t len;      /* bytes, <= what was asked; may be shorter (cluster end) */
    uint64_t cookie;   /* driver-private, handed back to unmap */
};

struct xb_image;

/* One asynchronous storage operation (drivers with ops->aio_submit: rbd). The caller owns it
 * until it comes back from ops->aio_reap with `result` set. */
/* (blkif has no write-zeroes request: ops->write_zeroes stays synchronous) */
enum xb_aio_op { XB_AIO_READ = 1, XB_AIO_WRITE, XB_AIO_FLUSH, XB_AIO_DISCARD };
struct xb_aio {
    int op;                  /* enum xb_aio_op */
    const struct iovec *iov; /* READ/WRITE: the data */
    int iovcnt;
    uint64_t off, len;       /* bytes; len for DISCARD (READ/WRITE: the iovec's length) */
    int64_t result;          /* set when reaped: >= 0 done, or a negative errno */
};

struct xb_image_ops {
    /* Return 1 with *ext filled if [off, off+len) starts with a plain fd range
     * usable for direct I/O (for a write: already allocated, no COW needed);
     * 0 if the caller must use the slow path for this range; <0 on error. */
    int (*map)(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext);
    /* Called once the direct I/O on an extent from map() has completed. */
    void (*unmap)(struct xb_image *img, const struct xb_extent *ext);
    ssize_t (*preadv)(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off);
    ssize_t (*pwritev)(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off);
    int (*flush)(struct xb_image *img);
    int (*discard)(struct xb_image *img, uint64_t off, uint64_t len, int secure);
    int (*write_zeroes)(struct xb_image *img, uint64_t off, uint64_t len);
    /* Re-read the size (online resize); returns the new size in bytes or <0. */
    int64_t (*refresh_size)(struct xb_image *img);
    void (*close)(struct xb_image *img);
    /* Asynchronous drivers only (NULL elsewhere): the data plane submits every READ/WRITE/FLUSH/
     * DISCARD here instead of map()/the slow path, polls `aio_fd` (readable when something
     * completed; the poller drains it, non-blocking) and collects finished operations with
     * aio_reap (any thread may reap any operation: it returns whatever completed). aio_submit
     * returns 0 (submitted) or a negative errno (not submitted, will not be reaped). */
    int (*aio_submit)(struct xb_image *img, struct xb_aio *a);
    int (*aio_reap)(struct xb_image *img, struct xb_aio **done, int max);
};

struct xb_image {
    const struct xb_image_ops *ops;
    enum xb_image_format format;
    uint64_t size;             /* virtual size in bytes */
    uint32_t logical_block;    /* bytes; 512 or 4096 */
    uint32_t physical_block;   /* bytes */
    uint32_t discard_granularity; /* bytes; 0 if no discard */
    uint32_t discard_alignment;   /* bytes from the start of the disk to its first whole discard unit */
    uint32_t caps;             /* XB_CAP_* */
    int direct;                /* opened with O_DIRECT: buffers and offsets must be aligned */
    void *priv;                /* driver state */
    int aio_fd;                /* with ops->aio_submit: the completion eventfd */
};

#endif
