/*
 * Xen primitives the data plane needs, behind one small interface with two
 * implementations: real (/dev/xen/gntdev, /dev/xen/evtchn, kernel UAPI headers
 * from libxen-dev) and sim (the simulated hypervisor: guest memory and grant
 * table in shared memory files, event channels as eventfds).
 *
 * Lives in the `xenblk._dataplane` module. Thread-safety: a platform is shared
 * by all queue threads; each event channel belongs to one queue thread.
 */
#ifndef XB_PLATFORM_H
#define XB_PLATFORM_H

#include <stddef.h>
#include <stdint.h>
#include "xb_blkif.h"

struct xb_platform;
struct xb_gmap;     /* a set of mapped grant pages */
struct xb_evtchn;   /* one bound interdomain event channel */

/* One grant copy operation between a guest grant and local memory. */
#define XB_COPY_FROM_GUEST 0 /* guest page -> local (a WRITE request) */
#define XB_COPY_TO_GUEST 1   /* local -> guest page (a READ request) */
struct xb_copy_seg {
    xb_grant_ref_t gref;
    uint16_t domid;
    uint16_t offset; /* byte offset within the guest page */
    uint16_t len;    /* bytes, offset+len <= 4096 */
    uint8_t dir;     /* XB_COPY_* */
    int16_t status;  /* out: 0 ok, <0 a GNTST_*-like failure */
    void *local;
};

#include "xb_err.h"

/* Constructors (called from Python). err receives a message on failure. */
struct xb_platform *xb_platform_open_real(char *err);
struct xb_platform *xb_platform_open_sim(uint16_t self_domid, char *err);
void xb_platform_close(struct xb_platform *p);

/* sim only: make a simulated guest's memory and grant table known (fds from the sim broker). */
int xb_platform_sim_add_domain(struct xb_platform *p, uint16_t domid, int mem_fd, uint64_t mem_pages,
                               int gnttab_fd, uint32_t gnttab_entries, char *err);
int xb_platform_sim_remove_domain(struct xb_platform *p, uint16_t domid);

/* Map `n` grants of `domid` as one contiguous local region. NULL + err on failure. */
void *xb_grant_map(struct xb_platform *p, uint16_t domid, const xb_grant_ref_t *refs, unsigned n, int writable,
                   struct xb_gmap **handle, char *err);
void xb_grant_unmap(struct xb_platform *p, struct xb_gmap *handle);
/* A one-page writable map kept across requests (persistent grants): 0 if it still is the page
 * `ref` grants us, writable, else a GNTST_* value and the caller drops the mapping. real: always 0
 * (while mapped, Xen pins the page and rewriting the entry changes nothing for the mapping, as for
 * blkback). sim: the grant table decides again at every use (one 8-byte load), so a grant revoked
 * or pointed at another page is never used through an old mapping. */
int xb_grant_map_still_valid(struct xb_platform *p, struct xb_gmap *handle, uint16_t domid, xb_grant_ref_t ref);
/* Batched grant copy; per-segment status; returns 0 if all ok, else -EIO. */
int xb_grant_copy(struct xb_platform *p, struct xb_copy_seg *segs, unsigned n);

/* Event channels. real: bind_interdomain(domid, remote_port) on its own /dev/xen/evtchn fd.
 * sim: wrap the two eventfds handed out by the broker. */
struct xb_evtchn *xb_evtchn_bind_real(struct xb_platform *p, uint16_t domid, uint32_t remote_port, char *err);
struct xb_evtchn *xb_evtchn_sim(int recv_fd, int send_fd, uint32_t local_port, char *err);
int xb_evtchn_fd(struct xb_evtchn *ch);     /* pollable: readable when the guest notified us */
int xb_evtchn_ack(struct xb_evtchn *ch);    /* consume pending notifications, unmask */
int xb_evtchn_notify(struct xb_evtchn *ch); /* kick the guest */
uint32_t xb_evtchn_local_port(struct xb_evtchn *ch);
void xb_evtchn_close(struct xb_evtchn *ch);

#endif
