/* The public platform entry points: dispatch to the sim or real implementation. */
#include <errno.h>
#include "platform_int.h"

void xb_platform_close(struct xb_platform *p)
{
    if (p)
        p->ops->close(p);
}

void *xb_grant_map(struct xb_platform *p, uint16_t domid, const xb_grant_ref_t *refs, unsigned n, int writable,
                   struct xb_gmap **handle, char *err)
{
    *handle = NULL;
    if (n == 0 || n > XB_MAP_MAX_PAGES) {
        xb_seterr(err, "grant map of %u pages (allowed 1..%u)", n, XB_MAP_MAX_PAGES);
        return NULL;
    }
    return p->ops->map(p, domid, refs, n, writable, handle, err);
}

void xb_grant_unmap(struct xb_platform *p, struct xb_gmap *handle)
{
    if (handle)
        p->ops->unmap(p, handle);
}

int xb_grant_map_still_valid(struct xb_platform *p, struct xb_gmap *handle, uint16_t domid, xb_grant_ref_t ref)
{
    return p->ops->still_valid(p, handle, domid, ref);
}

int xb_grant_copy(struct xb_platform *p, struct xb_copy_seg *segs, unsigned n)
{
    if (n == 0)
        return 0;
    return p->ops->copy(p, segs, n);
}

int xb_evtchn_fd(struct xb_evtchn *ch)
{
    return ch->fd;
}

int xb_evtchn_ack(struct xb_evtchn *ch)
{
    return ch->ops->ack(ch);
}

int xb_evtchn_notify(struct xb_evtchn *ch)
{
    return ch->ops->notify(ch);
}

uint32_t xb_evtchn_local_port(struct xb_evtchn *ch)
{
    return ch->local_port;
}

void xb_evtchn_close(struct xb_evtchn *ch)
{
    if (ch)
        ch->ops->close(ch);
}
