/* The per-queue persistent grant cache (pgrant.h): a chained hash of grant refs over a fixed array
 * of at most `cap` mappings, blkback's bound, with blkback's purge of the entries unused since the
 * last purge. */
#include <errno.h>
#include <stdlib.h>
#include "pgrant.h"
#include "queue.h"

int xb_pgnt_init(struct xb_pgnt_cache *c, unsigned cap)
{
    *c = (struct xb_pgnt_cache){.free = -1};
    if (cap == 0)
        return 0;
    unsigned nb = 1;
    while (nb < cap * 2)
        nb <<= 1;
    c->e = calloc(cap, sizeof(*c->e));
    c->head = malloc(nb * sizeof(*c->head));
    if (!c->e || !c->head) {
        free(c->e);
        free(c->head);
        c->e = NULL;
        c->head = NULL;
        return -ENOMEM;
    }
    for (unsigned i = 0; i < nb; i++)
        c->head[i] = -1;
    for (unsigned i = cap; i-- > 0;) {
        c->e[i].next = c->free;
        c->free = (int32_t)i;
    }
    c->cap = cap;
    c->nbuckets = nb;
    return 0;
}

static unsigned bucket(const struct xb_pgnt_cache *c, xb_grant_ref_t gref)
{
    return (unsigned)((gref * 2654435761u) >> 7) & (c->nbuckets - 1);
}

/* Unlink entry i (whose chain is bucket b) and unmap it. */
static void drop(struct xb_queue *q, unsigned b, int32_t i)
{
    struct xb_pgnt_cache *c = &q->pgnt;
    int32_t *link = &c->head[b];
    while (*link != i)
        link = &c->e[*link].next;
    *link = c->e[i].next;
    xb_grant_unmap(q->dev->p, c->e[i].map);
    c->e[i].map = NULL;
    c->e[i].page = NULL;
    c->e[i].next = c->free;
    c->free = i;
    c->n--;
    ST_SET(q, persistent_mapped, c->n);
}

/* blkback's purge: unmap what was not used since the last purge (the working set stays mapped). */
static void purge(struct xb_queue *q)
{
    struct xb_pgnt_cache *c = &q->pgnt;
    unsigned purged = 0;
    for (unsigned b = 0; b < c->nbuckets; b++) {
        int32_t i = c->head[b];
        while (i >= 0) {
            int32_t next = c->e[i].next;
            if (c->e[i].last_use < c->purge_tick) {
                drop(q, b, i);
                purged++;
            }
            i = next;
        }
    }
    c->purge_tick = c->tick;
    ST_ADD(q, persistent_purged, purged);
}

uint8_t *xb_pgnt_page(struct xb_queue *q, xb_grant_ref_t gref)
{
    struct xb_pgnt_cache *c = &q->pgnt;
    if (!c->cap)
        return NULL;
    struct xb_platform *p = q->dev->p;
    uint16_t domid = q->dev->cfg.domid;
    unsigned b = bucket(c, gref);
    c->tick++;
    for (int32_t i = c->head[b]; i >= 0; i = c->e[i].next) {
        if (c->e[i].gref != gref)
            continue;
        if (xb_grant_map_still_valid(p, c->e[i].map, domid, gref) != 0) {
            /* revoked, or now naming another page: never served from the old mapping */
            drop(q, b, i);
            ST_ADD(q, persistent_invalidated, 1);
            break; /* map it again below: refused if revoked, the new page if re-pointed */
        }
        c->e[i].last_use = c->tick;
        ST_ADD(q, persistent_hits, 1);
        return c->e[i].page;
    }
    if (c->n == c->cap) {
        /* Full: purge at most once per cap lookups (the scan is O(cap)); until entries fall out of
         * use the segment goes by grant copy, as blkback maps it non-persistently then. */
        if (c->tick - c->purge_tick < c->cap)
            return NULL;
        purge(q);
        if (c->n == c->cap)
            return NULL;
    }
    struct xb_gmap *map = NULL;
    char err[XB_ERRLEN];
    /* Writable whatever the request: blkfront grants its persistent pages read-write and reuses
     * them for reads and writes (blkback maps them so too). A grant that cannot be mapped so
     * (read-only, revoked, bad) goes by grant copy, which checks it again. */
    uint8_t *page = xb_grant_map(p, domid, &gref, 1, 1, &map, err);
    if (!page)
        return NULL;
    int32_t i = c->free;
    c->free = c->e[i].next;
    c->e[i] = (struct xb_pgnt){.gref = gref, .next = c->head[b], .last_use = c->tick, .map = map, .page = page};
    c->head[b] = i;
    c->n++;
    ST_ADD(q, persistent_maps, 1);
    ST_SET(q, persistent_mapped, c->n);
    return page;
}

void xb_pgnt_destroy(struct xb_queue *q)
{
    struct xb_pgnt_cache *c = &q->pgnt;
    for (unsigned b = 0; c->head && b < c->nbuckets; b++)
        while (c->head[b] >= 0)
            drop(q, b, c->head[b]);
    free(c->e);
    free(c->head);
    *c = (struct xb_pgnt_cache){.free = -1};
}
