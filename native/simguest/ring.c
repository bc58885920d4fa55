/* The blkif ring from the frontend's side: requests written in the negotiated ABI, published with
 * one producer update and a notification only when the backend asked for one (req_event), and
 * responses consumed with RING_FINAL_CHECK_FOR_RESPONSES semantics. */
#include <string.h>
#include <unistd.h>
#include "queue_int.h"

void sg_put_request(struct xb_sg_queue *q, const void *req)
{
    memcpy(xb_ring_entry(q->sring, q->abi, q->req_prod_pvt, q->ring_size), req, xb_ring_entry_size(q->abi));
    q->req_prod_pvt++;
    q->st.requests++;
}

static void fill_segments(struct xb_sg_queue *q, struct slot *s, unsigned first_page, unsigned n,
                          struct xb_blkif_segment *seg)
{
    for (unsigned i = 0; i < n; i++) {
        unsigned page = first_page + i;
        uint64_t start = (uint64_t)page * XB_PAGE_SIZE;
        uint64_t len = q->cfg.bs - start < XB_PAGE_SIZE ? q->cfg.bs - start : XB_PAGE_SIZE;
        seg[i].gref = slot_ref(q, s, page);
        seg[i].first_sect = 0;
        seg[i].last_sect = (uint8_t)(len / 512 - 1);
        seg[i]._pad = 0;
    }
}

/* One read or write part: `n` data pages from `first_page`, direct or through indirect pages. */
void sg_push_rw(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx, unsigned part)
{
    unsigned per = q->cfg.max_segs;
    unsigned first_page = part * per;
    unsigned n = q->data_pages - first_page < per ? q->data_pages - first_page : per;
    uint8_t op = s->kind == K_WRITE ? XB_OP_WRITE : XB_OP_READ;
    uint64_t id = (uint64_t)slot_idx << 16 | part;
    uint64_t sector = (s->block * q->cfg.bs + (uint64_t)first_page * XB_PAGE_SIZE) >> XB_SECTOR_SHIFT;
    if (!q->cfg.persistent)
        for (unsigned i = 0; i < n; i++)
            sg_grant(q->d, slot_ref(q, s, first_page + i), slot_frame(q, s, first_page + i), q->cfg.backend_domid,
                         op == XB_OP_WRITE);
    uint8_t req[112] = {0};
    if (q->cfg.use_indirect) {
        unsigned ind0 = q->data_pages + part * q->ind_per_part;
        for (unsigned i = 0; i < q->ind_per_part; i++) {
            struct xb_blkif_segment *segs = sg_page(q->d, slot_frame(q, s, ind0 + i));
            unsigned from = i * XB_SEGS_PER_INDIRECT_FRAME;
            unsigned cnt = n - from < XB_SEGS_PER_INDIRECT_FRAME ? n - from : XB_SEGS_PER_INDIRECT_FRAME;
            fill_segments(q, s, first_page + from, cnt, segs);
            if (!q->cfg.persistent)
                sg_grant(q->d, slot_ref(q, s, ind0 + i), slot_frame(q, s, ind0 + i), q->cfg.backend_domid, 1);
        }
        if (q->abi == XB_ABI_X86_64) {
            struct xb_blkif_x86_64_request_indirect *r = (void *)req;
            r->operation = XB_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)n;
            r->id = id;
            r->sector_number = sector;
            r->handle = q->cfg.handle;
            for (unsigned i = 0; i < q->ind_per_part; i++)
                r->indirect_grefs[i] = slot_ref(q, s, ind0 + i);
        } else {
            struct xb_blkif_x86_32_request_indirect *r = (void *)req;
            r->operation = XB_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)n;
            r->id = id;
            r->sector_number = sector;
            r->handle = q->cfg.handle;
            for (unsigned i = 0; i < q->ind_per_part; i++)
                r->indirect_grefs[i] = slot_ref(q, s, ind0 + i);
        }
    } else if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw *r = (void *)req;
        r->operation = op;
        r->nr_segments = (uint8_t)n;
        r->handle = q->cfg.handle;
        r->id = id;
        r->sector_number = sector;
        fill_segments(q, s, first_page, n, r->seg);
    } else {
        struct xb_blkif_x86_32_request_rw *r = (void *)req;
        r->operation = op;
        r->nr_segments = (uint8_t)n;
        r->handle = q->cfg.handle;
        r->id = id;
        r->sector_number = sector;
        fill_segments(q, s, first_page, n, r->seg);
    }
    if (q->cfg.hostile == XB_SG_HOSTILE_REVOKE) /* the backend finds the data grants gone */
        for (unsigned i = 0; i < n; i++)
            sg_revoke(q->d, slot_ref(q, s, first_page + i));
    sg_put_request(q, req);
}

void sg_push_flush(struct xb_sg_queue *q, unsigned slot_idx)
{
    /* Like blkfront: a FLUSH_DISKCACHE is a read/write request without segments. */
    uint8_t req[112] = {0};
    if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw *r = (void *)req;
        r->operation = XB_OP_FLUSH_DISKCACHE;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
    } else {
        struct xb_blkif_x86_32_request_rw *r = (void *)req;
        r->operation = XB_OP_FLUSH_DISKCACHE;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
    }
    sg_put_request(q, req);
}

void sg_push_discard(struct xb_sg_queue *q, struct slot *s, unsigned slot_idx)
{
    uint8_t req[112] = {0};
    uint64_t sector = s->block * q->cfg.bs >> XB_SECTOR_SHIFT, n = q->cfg.bs >> XB_SECTOR_SHIFT;
    if (q->abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_discard *r = (void *)req;
        r->operation = XB_OP_DISCARD;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
        r->sector_number = sector;
        r->nr_sectors = n;
    } else {
        struct xb_blkif_x86_32_request_discard *r = (void *)req;
        r->operation = XB_OP_DISCARD;
        r->handle = q->cfg.handle;
        r->id = (uint64_t)slot_idx << 16;
        r->sector_number = sector;
        r->nr_sectors = n;
    }
    sg_put_request(q, req);
}

/* Returns 1 if notified. RING_PUSH_REQUESTS_AND_CHECK_NOTIFY. */
void sg_publish(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    uint32_t old = __atomic_load_n(&h->req_prod, __ATOMIC_RELAXED), new = q->req_prod_pvt;
    if (old == new)
        return;
    __atomic_store_n(&h->req_prod, new, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = __atomic_load_n(&h->req_event, __ATOMIC_RELAXED);
    if ((uint32_t)(new - ev) < (uint32_t)(new - old)) {
        uint64_t one = 1;
        if (write(q->cfg.evt_send_fd, &one, sizeof(one)) == sizeof(one))
            q->st.notifies++;
    }
}

/* Consume every available response. Returns the number consumed, -1 on a protocol error. */
int sg_consume(struct xb_sg_queue *q)
{
    struct xb_sring_header *h = hdr(q);
    int n = 0;
    uint64_t now;
    for (;;) {
        uint32_t rp = __atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE);
        if ((uint32_t)(rp - q->rsp_cons) > (uint32_t)(q->req_prod_pvt - q->rsp_cons)) {
            sg_fail(q, "backend protocol error: response producer %u beyond the %u requests outstanding", rp,
                 q->req_prod_pvt - q->rsp_cons);
            return -1;
        }
        if (rp == q->rsp_cons) {
            /* RING_FINAL_CHECK_FOR_RESPONSES: ask for a notification, then look once more. */
            __atomic_store_n(&h->rsp_event, q->rsp_cons + 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&h->rsp_prod, __ATOMIC_ACQUIRE) == q->rsp_cons)
                return n;
            continue;
        }
        now = now_ns(); /* one clock read per batch of responses */
        for (; q->rsp_cons != rp; q->rsp_cons++) {
            /* One copy of the entry, then only the copy: the backend may rewrite the ring meanwhile. */
            uint8_t e[16];
            memcpy(e, xb_ring_entry(q->sring, q->abi, q->rsp_cons, q->ring_size), sizeof(e));
            uint64_t id;
            int16_t status;
            memcpy(&id, e, sizeof(id)); /* id at 0, operation at 8, status at 10, in both ABIs */
            memcpy(&status, e + 10, sizeof(status));
            uint64_t idx = id >> 16, part = id & 0xffff;
            struct slot *s = idx < q->cfg.iodepth ? &q->slots[idx] : NULL;
            if (!s || !s->busy || part >= s->nparts || (s->kind <= K_WRITE && s->part_done[part])) {
                sg_fail(q, "backend protocol error: response with unknown id %#llx", (unsigned long long)id);
                return -1;
            }
            /* Like Linux blkfront: the operation must be the one asked for (for an indirect
             * request its indirect_op), else the disk is unusable. */
            static const uint8_t want_op[] = {XB_OP_READ, XB_OP_WRITE, XB_OP_FLUSH_DISKCACHE, XB_OP_DISCARD};
            if (e[8] != want_op[s->kind]) {
                sg_fail(q, "backend protocol error: response %#llx has operation %u instead of %u",
                        (unsigned long long)id, e[8], want_op[s->kind]);
                return -1;
            }
            if (s->kind <= K_WRITE)
                s->part_done[part] = 1;
            q->st.responses++;
            if (status != XB_RSP_OKAY) {
                q->st.error_responses++;
                if (s->status == XB_RSP_OKAY)
                    s->status = status;
            }
            n++;
            if (--s->parts_left == 0)
                sg_complete(q, (unsigned)idx, now);
        }
        q->last_progress_ns = now;
    }
}

