/*
 * Grant table entry layout (Xen public/grant_table.h, version 1), used by the
 * simulated hypervisor: the simulated guest writes these into its grant table
 * exactly as a real PV guest does, and the sim platform checks them the way Xen
 * does before any page is mapped or copied.
 */
#ifndef XB_GRANT_H
#define XB_GRANT_H
#include <stdint.h>

#define XB_GTF_invalid 0u
#define XB_GTF_permit_access 1u
#define XB_GTF_type_mask 3u
#define XB_GTF_readonly (1u << 2)

struct xb_grant_entry_v1 {
    uint16_t flags;  /* XB_GTF_* */
    uint16_t domid;  /* domain allowed to use the grant */
    uint32_t frame;  /* guest page frame number (page index in sim guest memory) */
} __attribute__((packed));
_Static_assert(sizeof(struct xb_grant_entry_v1) == 8, "grant entry");

#endif
