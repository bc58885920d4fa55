/*
 * The ring journal: what a restarted daemon needs to carry a guest's ring on without the
 * guest noticing (docs/DESIGN.md, "Restart without guest impact").
 *
 * One file per queue, mmap'd MAP_SHARED and written by that queue's thread only. A process
 * kill loses no store already made to a shared file mapping (it is the page cache), so no
 * fsync: a host crash takes the guest down too.
 *
 * Order, per request (a kill between any two steps is recovered by xb_journal_attach):
 *   take:     slot := TAKEN + ring index + the private copy of the entry   (before acting)
 *   consumed: journal req_cons := req_cons
 *   answer:   the response is written into the shared ring at rsp_prod_pvt
 *             slot := ANSWERED at that index; journal rsp_prod_pvt++; slot := FREE
 *   the shared rsp_prod is only pushed after that, so the guest never sees a response the
 *   journal has not accounted.
 * Resume: a TAKEN slot is executed again from its private copy (never from the shared ring
 * slot, which may already hold a response: XSA-155) and answered at the next unaccounted
 * index; an ANSWERED slot at the journal's rsp_prod_pvt is counted (its response is in the
 * ring), one below it is freed.
 */
#ifndef XB_JOURNAL_H
#define XB_JOURNAL_H

#include <stdint.h>

struct xb_device;
struct xb_queue;
struct xb_req;

#define XB_JOURNAL_IDENT_LEN 64 /* what the journal belongs to, compared byte for byte on resume */

/* Python: before xb_device_start_queue(q). resume 0: a new journal (the file is created or
 * replaced); 1: continue from an existing one, which must have been written for the same
 * ident, ABI and ring size and agree with the ring, else -1 and why in err. */
int xb_device_set_journal(struct xb_device *d, unsigned q, const char *path, const char *ident, int resume,
                          char *err);

/* Test only: the queue thread kills its process (SIGKILL) at `point` (XB_JPOINT_*) the
 * `after`+1-th time it gets there; 0 disarms. Process-wide. */
void xb_journal_crash_at(int point, unsigned after);
enum {
    XB_JPOINT_TAKEN = 1,    /* slot written, req_cons not advanced */
    XB_JPOINT_CONSUMED,     /* req_cons advanced, request not acted on */
    XB_JPOINT_RSP_WRITTEN,  /* response in the ring, nothing accounted */
    XB_JPOINT_ANSWERED,     /* slot marked ANSWERED, rsp_prod_pvt not advanced */
    XB_JPOINT_COUNTED,      /* rsp_prod_pvt advanced, slot not freed yet */
};

/* ---- hooks the data plane calls (queue.c, device.c) ---- */
/* start_queue, once the ring is mapped and the free list built: sets req_cons/rsp_prod_pvt. */
int xb_journal_attach(struct xb_queue *q, char *err);
void xb_journal_detach(struct xb_queue *q);
/* consume(): before the entry at ring index idx is acted on (into the slot of the next free request). */
void xb_journal_take(struct xb_queue *q, const void *raw, uint32_t idx);
/* consume(): after req_cons was advanced. */
void xb_journal_consumed(struct xb_queue *q);
/* right after put_response() wrote r's response at rsp_prod_pvt - 1. */
void xb_journal_answered(struct xb_queue *q, struct xb_req *r);
/* Queue thread start: publish responses written before the kill, then hand out the requests to
 * execute again, in ring order: returns 1 with the private copy in raw (the request slot it is
 * journaled in is at the head of the free list), 0 when done. */
int xb_journal_next_replay(struct xb_queue *q, void *raw);

#endif
