/* Request parsing and validation (see parse.h): pure, no shared memory. */
#include <stddef.h>
#include <string.h>
#include "parse.h"

static int refuse(struct xb_parsed_req *out, enum xb_refusal why, int16_t status)
{
    out->refusal = why;
    out->rsp_status = status;
    return XB_PARSE_REFUSED;
}

static int is_write_op(uint8_t op)
{
    return op == XB_OP_WRITE || op == XB_OP_WRITE_BARRIER || op == XB_OP_FLUSH_DISKCACHE || op == XB_OP_DISCARD;
}

/* Checks one segment and adds its length; 0 or a refusal reason + 1. */
static int check_seg(const struct xb_seg *s, uint32_t logical_sectors, uint64_t *total)
{
    if (s->last_sect >= (XB_PAGE_SIZE >> XB_SECTOR_SHIFT) || s->first_sect > s->last_sect)
        return XB_REFUSE_SECT + 1;
    unsigned nsec = (unsigned)s->last_sect - s->first_sect + 1u;
    /* Whole logical blocks only, as blkback: the private buffer packs segments back to back. */
    if (nsec & (logical_sectors - 1))
        return XB_REFUSE_ALIGN + 1;
    *total += nsec;
    return 0;
}

/* Range and alignment of [sector, sector + nr) against the disk. */
static int check_range(struct xb_parsed_req *out, const struct xb_parse_limits *lim)
{
    if (out->sector & (lim->logical_sectors - 1))
        return refuse(out, XB_REFUSE_ALIGN, XB_RSP_ERROR);
    uint64_t end = out->sector + out->nr_sectors;
    if (end < out->sector || end > lim->size_sectors)
        return refuse(out, XB_REFUSE_RANGE, XB_RSP_ERROR);
    return XB_PARSE_OK;
}

static int check_segs(struct xb_parsed_req *out, const struct xb_parse_limits *lim)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < out->nseg; i++) {
        int r = check_seg(&out->seg[i], lim->logical_sectors, &total);
        if (r)
            return refuse(out, (enum xb_refusal)(r - 1), XB_RSP_ERROR);
    }
    out->nr_sectors = total;
    /* A flush or barrier without data names no sectors: like blkback, its sector_number is not
     * looked at (Linux sends an empty flush with sector_number (sector_t)-1). */
    if (out->nseg == 0)
        return XB_PARSE_OK;
    return check_range(out, lim);
}

/* The fields of each request kind, read from the ABI's layout into plain values. */
struct raw_fields {
    uint8_t operation;
    uint8_t byte1; /* nr_segments (rw), flag (discard), indirect_op (indirect) */
    uint16_t indirect_nseg;
    uint64_t id;
    uint64_t sector;
    uint64_t discard_nr_sectors;
    const struct xb_blkif_segment *seg; /* rw segments, inside the caller's private copy */
    const void *indirect_grefs; /* unaligned: only memcpy from it */
};

static void read_fields(enum xb_abi abi, const void *raw, struct raw_fields *f)
{
    if (abi == XB_ABI_X86_32) {
        const union xb_blkif_x86_32_request *r = raw;
        f->operation = r->operation;
        f->byte1 = r->rw.nr_segments;
        f->id = r->rw.id;
        f->sector = r->rw.sector_number;
        f->discard_nr_sectors = r->discard.nr_sectors;
        f->indirect_nseg = r->indirect.nr_segments;
        f->seg = r->rw.seg;
        f->indirect_grefs = (const uint8_t *)raw + offsetof(struct xb_blkif_x86_32_request_indirect, indirect_grefs);
        if (f->operation == XB_OP_INDIRECT) {
            f->id = r->indirect.id;
            f->sector = r->indirect.sector_number;
        }
    } else {
        const union xb_blkif_x86_64_request *r = raw;
        f->operation = r->operation;
        f->byte1 = r->rw.nr_segments;
        f->id = r->rw.id;
        f->sector = r->rw.sector_number;
        f->discard_nr_sectors = r->discard.nr_sectors;
        f->indirect_nseg = r->indirect.nr_segments;
        f->seg = r->rw.seg;
        f->indirect_grefs = (const uint8_t *)raw + offsetof(struct xb_blkif_x86_64_request_indirect, indirect_grefs);
        if (f->operation == XB_OP_INDIRECT) {
            f->id = r->indirect.id;
            f->sector = r->indirect.sector_number;
        }
    }
}

static int parse_rw(const struct raw_fields *f, const struct xb_parse_limits *lim, struct xb_parsed_req *out)
{
    unsigned nseg = f->byte1;
    int flush = out->op == XB_OP_FLUSH_DISKCACHE || out->op == XB_OP_WRITE_BARRIER;
    if (is_write_op(out->op) && lim->readonly)
        return refuse(out, XB_REFUSE_READONLY, XB_RSP_ERROR);
    if (flush && !lim->can_flush)
        return refuse(out, XB_REFUSE_UNSUPPORTED, XB_RSP_EOPNOTSUPP);
    /* A flush or barrier may come without data; a read or write may not. */
    if ((nseg == 0 && !flush) || nseg > XB_MAX_SEGMENTS_PER_REQUEST)
        return refuse(out, XB_REFUSE_NSEG, XB_RSP_ERROR);
    out->nseg = (uint16_t)nseg;
    out->sector = f->sector;
    for (unsigned i = 0; i < nseg; i++) {
        struct xb_blkif_segment s;
        memcpy(&s, &f->seg[i], sizeof(s));
        out->seg[i].gref = s.gref;
        out->seg[i].first_sect = s.first_sect;
        out->seg[i].last_sect = s.last_sect;
    }
    return check_segs(out, lim);
}

static int parse_discard(const struct raw_fields *f, const struct xb_parse_limits *lim, struct xb_parsed_req *out)
{
    if (lim->readonly)
        return refuse(out, XB_REFUSE_READONLY, XB_RSP_ERROR);
    if (!lim->can_discard)
        return refuse(out, XB_REFUSE_UNSUPPORTED, XB_RSP_EOPNOTSUPP);
    out->discard_flag = f->byte1;
    if ((out->discard_flag & XB_DISCARD_SECURE) && !lim->secure_discard)
        return refuse(out, XB_REFUSE_SECURE, XB_RSP_EOPNOTSUPP);
    out->sector = f->sector;
    out->nr_sectors = f->discard_nr_sectors;
    uint64_t end = out->sector + out->nr_sectors;
    if (end < out->sector || end > lim->size_sectors)
        return refuse(out, XB_REFUSE_RANGE, XB_RSP_ERROR);
    return XB_PARSE_OK;
}

static int parse_indirect(const struct raw_fields *f, const struct xb_parse_limits *lim, struct xb_parsed_req *out)
{
    if (lim->max_indirect_segments == 0)
        return refuse(out, XB_REFUSE_INDIRECT, XB_RSP_ERROR);
    out->op = f->byte1;
    if (out->op != XB_OP_READ && out->op != XB_OP_WRITE)
        return refuse(out, XB_REFUSE_INDIRECT, XB_RSP_ERROR);
    if (out->op == XB_OP_WRITE && lim->readonly)
        return refuse(out, XB_REFUSE_READONLY, XB_RSP_ERROR);
    unsigned nseg = f->indirect_nseg;
    if (nseg == 0 || nseg > lim->max_indirect_segments || nseg > XB_MAX_INDIRECT_SEGMENTS)
        return refuse(out, XB_REFUSE_NSEG, XB_RSP_ERROR);
    unsigned pages = (unsigned)((nseg + XB_SEGS_PER_INDIRECT_FRAME - 1) / XB_SEGS_PER_INDIRECT_FRAME);
    if (pages > XB_MAX_INDIRECT_PAGES_PER_REQUEST)
        return refuse(out, XB_REFUSE_INDIRECT, XB_RSP_ERROR);
    out->nseg = (uint16_t)nseg;
    out->sector = f->sector;
    out->nr_indirect_pages = pages;
    memcpy(out->indirect_grefs, f->indirect_grefs, pages * sizeof(xb_grant_ref_t));
    return XB_PARSE_NEED_INDIRECT;
}

int xb_parse_request(enum xb_abi abi, const void *raw, const struct xb_parse_limits *lim, struct xb_parsed_req *out)
{
    struct raw_fields f;
    read_fields(abi, raw, &f);
    out->id = f.id;
    /* Linux blkfront rejects (and disables the disk on) a response to an indirect request that
     * does not carry the indirect_op; blkback answers with it too, refusals included. */
    out->operation = f.operation == XB_OP_INDIRECT ? f.byte1 : f.operation;
    out->op = f.operation;
    out->discard_flag = 0;
    out->nseg = 0;
    out->sector = 0;
    out->nr_sectors = 0;
    out->nr_indirect_pages = 0;
    out->refusal = XB_REFUSE_REASONS;
    out->rsp_status = XB_RSP_OKAY;
    switch (f.operation) {
    case XB_OP_READ:
    case XB_OP_WRITE:
    case XB_OP_WRITE_BARRIER:
    case XB_OP_FLUSH_DISKCACHE:
        return parse_rw(&f, lim, out);
    case XB_OP_DISCARD:
        return parse_discard(&f, lim, out);
    case XB_OP_INDIRECT:
        return parse_indirect(&f, lim, out);
    default:
        return refuse(out, XB_REFUSE_BAD_OP, XB_RSP_EOPNOTSUPP);
    }
}

int xb_parse_indirect(struct xb_parsed_req *req, const void *pages, const struct xb_parse_limits *lim)
{
    const uint8_t *p = pages;
    for (unsigned i = 0; i < req->nseg; i++) {
        struct xb_blkif_segment s;
        memcpy(&s, p + (size_t)i * sizeof(s), sizeof(s));
        req->seg[i].gref = s.gref;
        req->seg[i].first_sect = s.first_sect;
        req->seg[i].last_sect = s.last_sect;
    }
    return check_segs(req, lim);
}

unsigned xb_seg_bucket(unsigned nseg)
{
    for (unsigned i = 0; i < XB_SEG_BUCKETS - 1; i++)
        if (nseg <= xb_seg_bounds[i])
            return i;
    return XB_SEG_BUCKETS - 1;
}
