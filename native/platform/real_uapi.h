/*
 * The Linux Xen device UAPI (from libxen-dev): /dev/xen/gntdev and
 * /dev/xen/evtchn. These headers include nothing themselves; this is the one
 * place that supplies what they need, for real_*.c and the layout test.
 */
#ifndef XB_REAL_UAPI_H
#define XB_REAL_UAPI_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>         /* domid_t */
#include <xen/grant_table.h> /* GNTCOPY_*, GNTST_* */
#include <xen/sys/gntdev.h>
#include <xen/sys/evtchn.h>

#define XB_GNTDEV_PATH "/dev/xen/gntdev"
#define XB_EVTCHN_PATH "/dev/xen/evtchn"

/* Grant copies per IOCTL_GNTDEV_GRANT_COPY: bounds the on-stack batch (the kernel batches further itself). */
#define XB_REAL_COPY_CHUNK 64

#endif
