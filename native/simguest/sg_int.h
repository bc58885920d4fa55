/* Internals of the simulated blkfront shared by its source files. */
#ifndef XB_SG_INT_H
#define XB_SG_INT_H

#include <stdint.h>
#include <stdio.h>
#include "simguest_api.h"
#include "xb_blkif.h"
#include "xb_grant.h"

struct xb_sg_domain {
    uint8_t *mem;
    uint64_t mem_pages;
    struct xb_grant_entry_v1 *gnttab;
    uint32_t gnttab_entries;
};

static inline void *sg_page(struct xb_sg_domain *d, uint64_t frame)
{
    return d->mem + frame * XB_PAGE_SIZE;
}

/* Grant `frame` to the backend as a PV guest does: frame and domid first, flags last (release). */
void sg_grant(struct xb_sg_domain *d, uint32_t ref, uint64_t frame, uint16_t domid, int readonly);
void sg_revoke(struct xb_sg_domain *d, uint32_t ref);

unsigned sg_hist_index(uint64_t ns);

/* A bijection of [0, n) chosen by key: Feistel rounds over the next power of four, cycle-walking. */
struct sg_perm {
    uint64_t n;
    unsigned half_bits;
    uint64_t half_mask;
    uint64_t keys[4];
};
void sg_perm_init(struct sg_perm *p, uint64_t n, uint64_t key);
uint64_t sg_perm_apply(const struct sg_perm *p, uint64_t i);

uint64_t sg_mix64(uint64_t x);

#endif
