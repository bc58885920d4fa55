/*
 * The real platform speaks to the kernel through the UAPI headers of libxen-dev
 * (native/platform/real_uapi.h). Check that those headers have the layout and
 * ioctl numbers of the Linux ABI (independently written down here from the
 * kernel's include/uapi/xen/{gntdev,evtchn}.h for x86_64), that our copy
 * segment fits the kernel's, and that the sim's grant entry and statuses are Xen's.
 */
#include <stddef.h>
#include <stdio.h>
#include "platform_int.h"
#include "real_uapi.h"
#include "xb_grant.h"

static int failures;

#define SAME(a, b)                                                                                     \
    do {                                                                                               \
        if ((unsigned long long)(a) != (unsigned long long)(b)) {                                      \
            fprintf(stderr, "platform layout mismatch: %s=%llu, expected %s=%llu\n", #a,              \
                    (unsigned long long)(a), #b, (unsigned long long)(b));                             \
            failures++;                                                                                \
        }                                                                                              \
    } while (0)

#define FIELD(type, member) (sizeof(((type *)0)->member))

/* _IOC(_IOC_NONE, type, nr, size) on x86: dir 0, size in bits 16..29, type 8..15, nr 0..7 */
#define ABI_IOC(type, nr, size) (((unsigned long)(size) << 16) | ((unsigned long)(type) << 8) | (nr))

static void gntdev(void)
{
    SAME(sizeof(struct ioctl_gntdev_grant_ref), 8);
    SAME(offsetof(struct ioctl_gntdev_grant_ref, domid), 0);
    SAME(offsetof(struct ioctl_gntdev_grant_ref, ref), 4);

    SAME(sizeof(struct ioctl_gntdev_map_grant_ref), 24);
    SAME(offsetof(struct ioctl_gntdev_map_grant_ref, count), 0);
    SAME(offsetof(struct ioctl_gntdev_map_grant_ref, index), 8);
    SAME(offsetof(struct ioctl_gntdev_map_grant_ref, refs), 16);
    SAME(IOCTL_GNTDEV_MAP_GRANT_REF, ABI_IOC('G', 0, 24));

    SAME(sizeof(struct ioctl_gntdev_unmap_grant_ref), 16);
    SAME(offsetof(struct ioctl_gntdev_unmap_grant_ref, index), 0);
    SAME(offsetof(struct ioctl_gntdev_unmap_grant_ref, count), 8);
    SAME(IOCTL_GNTDEV_UNMAP_GRANT_REF, ABI_IOC('G', 1, 16));

    typedef struct ioctl_gntdev_grant_copy_segment seg_t;
    SAME(sizeof(seg_t), 24);
    SAME(offsetof(seg_t, source), 0);
    SAME(offsetof(seg_t, dest), 8);
    SAME(offsetof(seg_t, source.foreign.ref), 0);
    SAME(offsetof(seg_t, source.foreign.offset), 4);
    SAME(offsetof(seg_t, source.foreign.domid), 6);
    SAME(offsetof(seg_t, dest.foreign.ref), 8);
    SAME(offsetof(seg_t, dest.foreign.offset), 12);
    SAME(offsetof(seg_t, dest.foreign.domid), 14);
    SAME(offsetof(seg_t, len), 16);
    SAME(offsetof(seg_t, flags), 18);
    SAME(offsetof(seg_t, status), 20);
    SAME(sizeof(struct ioctl_gntdev_grant_copy), 16);
    SAME(offsetof(struct ioctl_gntdev_grant_copy, count), 0);
    SAME(offsetof(struct ioctl_gntdev_grant_copy, segments), 8);
    SAME(IOCTL_GNTDEV_GRANT_COPY, ABI_IOC('G', 8, 16));
    SAME(GNTCOPY_source_gref, 1);
    SAME(GNTCOPY_dest_gref, 2);

    /* What real_grant.c puts into a kernel segment must fit without truncation. */
    SAME(FIELD(struct xb_copy_seg, gref), FIELD(seg_t, source.foreign.ref));
    SAME(FIELD(struct xb_copy_seg, offset), FIELD(seg_t, source.foreign.offset));
    SAME(FIELD(struct xb_copy_seg, domid), FIELD(seg_t, source.foreign.domid));
    SAME(FIELD(struct xb_copy_seg, len), FIELD(seg_t, len));
    SAME(FIELD(struct xb_copy_seg, status), FIELD(seg_t, status));
    SAME(FIELD(struct xb_copy_seg, gref), FIELD(struct ioctl_gntdev_grant_ref, ref));
}

static void evtchn(void)
{
    SAME(sizeof(struct ioctl_evtchn_bind_interdomain), 8);
    SAME(offsetof(struct ioctl_evtchn_bind_interdomain, remote_domain), 0);
    SAME(offsetof(struct ioctl_evtchn_bind_interdomain, remote_port), 4);
    SAME(IOCTL_EVTCHN_BIND_INTERDOMAIN, ABI_IOC('E', 1, 8));
    SAME(sizeof(struct ioctl_evtchn_unbind), 4);
    SAME(IOCTL_EVTCHN_UNBIND, ABI_IOC('E', 3, 4));
    SAME(sizeof(struct ioctl_evtchn_notify), 4);
    SAME(IOCTL_EVTCHN_NOTIFY, ABI_IOC('E', 4, 4));
    SAME(FIELD(struct ioctl_evtchn_notify, port), sizeof(uint32_t)); /* xb_evtchn local ports */
}

static void sim_matches_xen(void)
{
    SAME(sizeof(struct xb_grant_entry_v1), sizeof(grant_entry_v1_t));
    SAME(offsetof(struct xb_grant_entry_v1, flags), offsetof(grant_entry_v1_t, flags));
    SAME(offsetof(struct xb_grant_entry_v1, domid), offsetof(grant_entry_v1_t, domid));
    SAME(offsetof(struct xb_grant_entry_v1, frame), offsetof(grant_entry_v1_t, frame));
    SAME(XB_GTF_permit_access, GTF_permit_access);
    SAME(XB_GTF_type_mask, GTF_type_mask);
    SAME(XB_GTF_readonly, GTF_readonly);
    SAME(XB_GNTST_okay, GNTST_okay);
    SAME(XB_GNTST_general_error, GNTST_general_error);
    SAME(XB_GNTST_bad_domain, GNTST_bad_domain);
    SAME(XB_GNTST_bad_gntref, GNTST_bad_gntref);
    SAME(XB_GNTST_permission_denied, GNTST_permission_denied);
    SAME(XB_GNTST_bad_page, GNTST_bad_page);
    SAME(XB_GNTST_bad_copy_arg, GNTST_bad_copy_arg);
}

int main(void)
{
    gntdev();
    evtchn();
    sim_matches_xen();
    if (failures)
        return 1;
    printf("platform layout: gntdev/evtchn UAPI match the Linux ABI; sim grant entries and statuses match Xen\n");
    return 0;
}
