/*
 * Inside the platform layer: the two implementations (sim, real) fill in an
 * ops table; the public xb_* functions in platform.c dispatch through it.
 */
#ifndef XB_PLATFORM_INT_H
#define XB_PLATFORM_INT_H

#include <stdio.h>
#include "xb_platform.h" /* and xb_blkif.h: XB_PAGE_SIZE, XB_PAGE_SHIFT */

/* A single map call is one contiguous region; this bounds what a guest can make us reserve. */
#define XB_MAP_MAX_PAGES 4096u

/* Per-segment copy status, the same values as Xen's GNTST_* (checked in native/tests). */
#define XB_GNTST_okay 0
#define XB_GNTST_general_error (-1)
#define XB_GNTST_bad_domain (-2)
#define XB_GNTST_bad_gntref (-3)
#define XB_GNTST_permission_denied (-8)
#define XB_GNTST_bad_page (-9)
#define XB_GNTST_bad_copy_arg (-10)

struct xb_platform_ops {
    void (*close)(struct xb_platform *p);
    void *(*map)(struct xb_platform *p, uint16_t domid, const xb_grant_ref_t *refs, unsigned n, int writable,
                 struct xb_gmap **handle, char *err);
    void (*unmap)(struct xb_platform *p, struct xb_gmap *handle);
    int (*copy)(struct xb_platform *p, struct xb_copy_seg *segs, unsigned n);
    int (*still_valid)(struct xb_platform *p, struct xb_gmap *handle, uint16_t domid, xb_grant_ref_t ref);
};

/* Each implementation embeds this as its first member. */
struct xb_platform {
    const struct xb_platform_ops *ops;
    uint16_t self_domid;
    int is_sim;
};

struct xb_evtchn_ops {
    int (*ack)(struct xb_evtchn *ch);
    int (*notify)(struct xb_evtchn *ch);
    void (*close)(struct xb_evtchn *ch);
};

struct xb_evtchn {
    const struct xb_evtchn_ops *ops;
    int fd; /* pollable: readable when the other side notified us */
    uint32_t local_port;
};

/* The copy-segment checks that do not depend on the grant (offset/len within a page, a direction, a buffer). */
static inline int xb_copy_seg_args_ok(const struct xb_copy_seg *s)
{
    return s->local != NULL && s->len > 0 && (unsigned)s->offset + s->len <= XB_PAGE_SIZE &&
           (s->dir == XB_COPY_FROM_GUEST || s->dir == XB_COPY_TO_GUEST);
}

#endif
