/*
 * Persistent grants (feature-persistent): each grant the frontend uses is mapped once and kept,
 * so data moves by memcpy instead of one grant copy (a hypercall on real Xen) per segment. The
 * cache belongs to one queue and is used only by its thread, and only while a segment is being
 * copied: nothing outside the thread ever points into a mapping, so any entry can be dropped
 * between two copies.
 */
#ifndef XB_PGRANT_H
#define XB_PGRANT_H

#include <stdint.h>
#include "xb_blkif.h"

/* blkback's max_persistent_grants default: the bound per queue (ring) */
#define XB_DEFAULT_PERSISTENT_GRANTS 1056u
#define XB_MAX_PERSISTENT_GRANTS 65536u /* what a queue may be configured to keep mapped */

struct xb_gmap;
struct xb_queue;

struct xb_pgnt {
    xb_grant_ref_t gref;
    int32_t next;      /* hash chain, or the free list */
    uint64_t last_use; /* cache tick of the last use */
    struct xb_gmap *map;
    uint8_t *page;
};

struct xb_pgnt_cache {
    struct xb_pgnt *e; /* cap entries */
    int32_t *head;     /* hash buckets: first entry of each chain, -1 none */
    unsigned cap, n, nbuckets;
    int32_t free;
    uint64_t tick;       /* one per lookup */
    uint64_t purge_tick; /* tick of the last purge: entries not used since are the unused ones */
};

/* 0, or -ENOMEM; cap 0: persistent grants off (every call below is then a no-op / miss). */
int xb_pgnt_init(struct xb_pgnt_cache *c, unsigned cap);
/* The local page of `gref`, mapped now or earlier, still what the guest grants; NULL: use grant
 * copy for this segment (not mappable, revoked, or the cache is full of grants in recent use). */
uint8_t *xb_pgnt_page(struct xb_queue *q, xb_grant_ref_t gref);
/* Unmap everything (disconnect) and free the cache. */
void xb_pgnt_destroy(struct xb_queue *q);

#endif
