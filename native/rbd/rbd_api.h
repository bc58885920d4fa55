/* xenblk._rbd: the Ceph RBD driver (rbd.c); the image it opens is a plain struct xb_image. */
#ifndef XB_RBD_API_H
#define XB_RBD_API_H
#include "common_api.h"
#include "xb_err.h"
#include "xb_storage.h"

#define XB_RBD_NAMELEN 512

struct xb_rbd_opts {
    char pool[128];
    char image[256];
    char snap[256];          /* "" for the image itself; a snapshot is always read-only */
    char conf_file[1024];    /* "" for librados' default search */
    char client_id[128];     /* "admin" when "" */
    char keyring[1024];      /* "" for the conf file's */
    unsigned connect_timeout; /* seconds for rados_connect (client_mount_timeout) */
    unsigned op_timeout;     /* seconds before an operation fails (ETIMEDOUT); 0: waits for the cluster */
    unsigned flags;          /* XB_OPEN_RDONLY */
};

/* Connects, opens the image (read-only for XB_OPEN_RDONLY or a snapshot) with rbd_cache=false and
 * its completions on an eventfd. A read-write image refuses writes (EROFS) until xb_rbd_lock. */
struct xb_image *xb_rbd_open(const struct xb_rbd_opts *o, char *err);
/* Takes the exclusive lock in EXCLUSIVE mode: 0, or -EROFS/-EBUSY while another client holds it
 * (its owner id in prev_owner, XB_RBD_NAMELEN). On success prev_owner names the holder librbd
 * found dead and broke (blocklisted) on the way, or is "". */
int xb_rbd_lock(struct xb_image *img, char *prev_owner, char *err);
/* Readable when the image's header changed (a resize): drain it and refresh the size. -1: no watch. */
int xb_rbd_update_fd(struct xb_image *img);
#endif
