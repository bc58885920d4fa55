/* The synchronous API of xenblk._storage that Python calls (see api.cdef). */
#ifndef XB_STORAGE_API_H
#define XB_STORAGE_API_H
#include "common_api.h"
#include "xb_err.h"
#include "xb_storage.h"

struct xb_check_result {
    uint64_t corruptions;  /* references the refcounts do not cover, or metadata out of bounds */
    uint64_t leaks;        /* clusters with a refcount but no reference */
    uint64_t allocated_clusters;
    uint64_t total_clusters; /* clusters of the virtual disk */
    uint64_t fragmented_clusters;
};

struct xb_image_desc {
    int format;
    uint64_t virtual_size;
    uint32_t cluster_size;   /* 0 for raw/block */
    uint64_t allocated_bytes; /* host bytes in use */
    int qcow2_version;
    int refcount_bits;
    int compression_type;    /* 0 zlib, 1 zstd */
    char backing_file[1024];
    char backing_format[32];
    int vhd_disk_type; /* 2 fixed, 3 dynamic, 4 differencing */
};

/* Opens the backing file `name` of the image `parent`, for reading. `name` and `fmt` come from the
 * parent's header, i.e. from whoever wrote the image: the callback decides whether the name may be
 * opened (and how it resolves), opens it and returns the fd (the driver owns it from then on), or
 * returns -errno with the reason in err (XB_ERRLEN). It writes the path it opened into `resolved`
 * (XB_PATHLEN): the name of that image in messages and the base of its own relative backing name. */
#define XB_PATHLEN 4096
typedef int (*xb_backing_fn)(void *ctx, const char *parent, const char *name, const char *fmt, char *resolved,
                             char *err);

/* Opens an image on an fd the caller opened (and hands over: closed on failure too). The fd's
 * access mode decides read-write or read-only (XB_OPEN_RDONLY forces read-only); O_NONBLOCK is
 * cleared. raw and vhd need a regular file, block a block device, qcow2 either. A qcow2 backing file
 * (or a VHD parent) is opened only through `backing` (NULL: an image with a backing file is
 * refused), and only a regular file is accepted from it — never a device, FIFO or socket. */
struct xb_image *xb_image_open_fd(int fd, const char *name, int format, unsigned flags, xb_backing_fn backing,
                                  void *ctx, char *err);
/* C tests only: opens `path` (not following a symlink in its last component, not blocking on a
 * FIFO) then xb_image_open_fd without backing files. */
struct xb_image *xb_image_open(const char *path, int format, unsigned flags, char *err);
/* Opens `rel` beneath the directory `dirfd`: no absolute path, no `..` leaving it, no symlink
 * anywhere (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS; where openat2 is
 * missing or filtered, a walk one component at a time with O_NOFOLLOW that refuses `..`).
 * O_CLOEXEC|O_NOCTTY|O_NOFOLLOW are added. Returns the fd or -errno (ELOOP: a symlink; EXDEV:
 * leaves the directory). XB_BENEATH_WALK forces the walk (tests). */
#define XB_BENEATH_WALK 0x1u
int xb_open_beneath(int dirfd, const char *rel, int oflags, unsigned how);
/* Takes an OFD lock on the whole of `fd`'s file: a write lock if the fd is open for writing, else
 * a read lock (read-only users share). 0: locked; XB_LOCK_HELD_WRITE / XB_LOCK_HELD_READ: another
 * open file description holds a conflicting lock (a writer / readers only); -errno otherwise. */
#define XB_LOCK_HELD_READ 1
#define XB_LOCK_HELD_WRITE 2
int xb_ofd_lock(int fd);
ssize_t xb_image_read(struct xb_image *img, void *buf, size_t len, uint64_t off);
ssize_t xb_image_write(struct xb_image *img, const void *buf, size_t len, uint64_t off);
int xb_image_flush(struct xb_image *img);
int xb_image_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure);
int xb_image_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len);
int64_t xb_image_refresh_size(struct xb_image *img);
void xb_image_close(struct xb_image *img);
int xb_image_check(struct xb_image *img, struct xb_check_result *out, char *err);
/* The check, then leaked clusters given back (qcow2; nothing to do for the others). Call before any
 * request is in flight; refuses (-EUCLEAN) an image with corruptions. out->leaks = clusters freed. */
int xb_image_repair_leaks(struct xb_image *img, struct xb_check_result *out, char *err);
int xb_image_describe(struct xb_image *img, struct xb_image_desc *out);
/* The backing image of a qcow2 image or the parent of a differencing VHD (owned by it), or NULL. */
struct xb_image *xb_image_backing(struct xb_image *img);
#endif
