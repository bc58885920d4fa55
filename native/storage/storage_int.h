/* Internal helpers shared by the storage drivers (not part of the Python API). */
#ifndef XB_STORAGE_INT_H
#define XB_STORAGE_INT_H
#include <stdio.h>
#include "storage_api.h"

#define XB_MAX_BACKING_DEPTH 16

/* Full-length pread/pwrite: loop over short transfers; a read past EOF zero-fills. */
ssize_t xb_pread_full(int fd, void *buf, size_t len, uint64_t off);
/* The same, for a file known to hold at least known_end bytes: a read that meets the end of the
 * file before known_end fails with -EIO (truncated under us); past known_end it zero-fills. */
ssize_t xb_pread_known(int fd, void *buf, size_t len, uint64_t off, uint64_t known_end);
ssize_t xb_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
size_t xb_iov_len(const struct iovec *iov, int iovcnt);
/* Copy between an iovec and a flat buffer, starting `skip` bytes into the iovec. */
void xb_iov_to_buf(const struct iovec *iov, int iovcnt, size_t skip, void *buf, size_t len);
void xb_buf_to_iov(const struct iovec *iov, int iovcnt, size_t skip, const void *buf, size_t len);

/* Both take ownership of fd (closed on failure too); `name` is for messages and relative backing names. */
struct xb_image *xb_raw_open_fd(int fd, const char *name, int block, unsigned flags, char *err);
struct xb_image *xb_qcow2_open_fd(int fd, const char *name, unsigned flags, int depth, xb_backing_fn backing,
                                  void *ctx, char *err);
/* Clears O_NONBLOCK (opened so that a FIFO could not block us) and returns 1 if the fd was
 * opened read-only. */
int xb_fd_prepare(int fd, int *readonly);
/* The backing file (qcow2) or parent (VHD) `name` that `image`'s header names, opened through the
 * caller's callback (which judges the name: xenblk allows only storage.backing_dirs) and accepted
 * only if it is a regular file, never a device, FIFO or socket. Returns the fd (the caller owns it)
 * with the path it resolved to in `resolved` (XB_PATHLEN), or -errno with the reason in err. */
int xb_backing_open(const char *image, const char *name, const char *fmt, xb_backing_fn backing, void *ctx,
                    char *resolved, char *err);
/* "a block device", "a FIFO", ... for a message about st_mode. */
const char *xb_file_kind(unsigned mode);
struct xb_image *xb_vhd_open_fd(int fd, const char *name, unsigned flags, int depth, xb_backing_fn backing, void *ctx,
                                char *err);
struct xb_image *xb_vhd_backing(struct xb_image *img);
int xb_vhd_check(struct xb_image *img, struct xb_check_result *out, char *err);
int xb_vhd_describe(struct xb_image *img, struct xb_image_desc *d);
int xb_qcow2_check(struct xb_image *img, struct xb_check_result *out, char *err);
int xb_qcow2_repair_leaks(struct xb_image *img, struct xb_check_result *out, char *err);
int xb_qcow2_describe(struct xb_image *img, struct xb_image_desc *d);
#endif
