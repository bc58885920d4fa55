/* The synchronous API of xenblk._storage that Python calls (see api.cdef). */
#ifndef XB_STORAGE_API_H
#define XB_STORAGE_API_H
#include "xb_storage.h"

#define XB_ERRLEN 256

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
};

const char *xb_storage_version(void);
struct xb_image *xb_image_open(const char *path, int format, unsigned flags, char *err);
ssize_t xb_image_read(struct xb_image *img, void *buf, size_t len, uint64_t off);
ssize_t xb_image_write(struct xb_image *img, const void *buf, size_t len, uint64_t off);
int xb_image_flush(struct xb_image *img);
int xb_image_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure);
int xb_image_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len);
int64_t xb_image_refresh_size(struct xb_image *img);
void xb_image_close(struct xb_image *img);
int xb_image_check(struct xb_image *img, struct xb_check_result *out, char *err);
int xb_image_describe(struct xb_image *img, struct xb_image_desc *out);
/* The backing image of a qcow2 image (owned by it), or NULL. */
struct xb_image *xb_image_backing(struct xb_image *img);
/* Test-only fault injection (fault.c): a wrapper image that forwards to `inner` (and owns it:
 * closing the wrapper closes it) and fails the ops matching a rule with -err. Only Python test
 * code reaches these (xenblk.storage.FaultImage); nothing in the daemon calls them. */
#define XB_FAULT_READ 0x1
#define XB_FAULT_WRITE 0x2 /* pwritev and write_zeroes */
#define XB_FAULT_FLUSH 0x4
#define XB_FAULT_DISCARD 0x8
#define XB_FAULT_ALL 0xf
#define XB_FAULT_MAX_RULES 16
struct xb_image *xb_fault_wrap(struct xb_image *inner);
/* A rule over [off, off+len) (len 0: to the end): the first `after` matching calls pass, the next
 * `count` fail (0: all). Returns the rule's index, or -EINVAL / -ENOSPC (too many rules). */
int xb_fault_add(struct xb_image *img, unsigned ops, int err, uint64_t off, uint64_t len, uint64_t after,
                 uint64_t count);
/* How many calls rule `rule` has failed so far. */
int64_t xb_fault_hits(struct xb_image *img, int rule);
int xb_fault_clear(struct xb_image *img);
#endif
