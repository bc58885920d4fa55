/*
 * Request parsing and validation: a pure function of the bytes a guest wrote
 * (already copied out of the shared ring) and the device's limits, so it can be
 * unit-tested and fuzzed on its own. No storage, no grants, no shared memory.
 *
 * The checks follow Linux xen-blkback: opcode whitelist, segment count bounds,
 * first_sect <= last_sect <= 7, sector range and wrap against the disk size,
 * logical-sector alignment, read-only devices, secure discard only when
 * advertised, indirect requests only for READ/WRITE with a bounded page count.
 */
#ifndef XB_PARSE_H
#define XB_PARSE_H

#include <stdint.h>
#include "xb_blkif.h"
#include "xb_dataplane.h"

struct xb_parse_limits {
    uint64_t size_sectors;          /* disk size in 512-byte sectors */
    uint32_t logical_sectors;       /* logical block size in 512-byte sectors (1, 2, 4 or 8) */
    unsigned max_indirect_segments; /* 0: indirect requests are not offered */
    int readonly;
    int secure_discard; /* discard-secure advertised */
    int can_flush;      /* the image can flush (feature-flush-cache / feature-barrier) */
    int can_discard;    /* the image can discard (feature-discard) */
};

/* One data segment: a granted page and the sectors [first, last] of it. */
struct xb_seg {
    xb_grant_ref_t gref;
    uint8_t first_sect;
    uint8_t last_sect;
};

struct xb_parsed_req {
    /* Always set, even for a refused request: what the response carries. */
    uint64_t id;
    uint8_t operation; /* the wire opcode; for an indirect request its indirect_op, as blkfront expects */
    /* Valid when the request is accepted. */
    uint8_t op;        /* effective XB_OP_*: the indirect_op for an indirect request */
    uint8_t discard_flag;
    uint16_t nseg;
    uint64_t sector;     /* first 512-byte sector */
    uint64_t nr_sectors; /* rw: sum over segments; discard: as requested */
    unsigned nr_indirect_pages;
    xb_grant_ref_t indirect_grefs[XB_MAX_INDIRECT_PAGES_PER_REQUEST];
    struct xb_seg seg[XB_MAX_INDIRECT_SEGMENTS];
    /* Set when refused. */
    enum xb_refusal refusal;
    int16_t rsp_status; /* XB_RSP_ERROR or XB_RSP_EOPNOTSUPP */
};

#define XB_PARSE_OK 0
#define XB_PARSE_NEED_INDIRECT 1 /* fetch nr_indirect_pages pages of indirect_grefs, then xb_parse_indirect() */
#define XB_PARSE_REFUSED 2       /* refusal and rsp_status say why */

/* Parse one ring entry (xb_ring_entry_size(abi) bytes). */
int xb_parse_request(enum xb_abi abi, const void *raw, const struct xb_parse_limits *lim, struct xb_parsed_req *out);

/* Second step of an indirect request: `pages` holds a private copy of the
 * nr_indirect_pages indirect pages (nr_indirect_pages * XB_PAGE_SIZE bytes).
 * Reads each segment descriptor once, validates them and the range. */
int xb_parse_indirect(struct xb_parsed_req *req, const void *pages, const struct xb_parse_limits *lim);

/* The statistics bucket of a request by segment count. */
unsigned xb_seg_bucket(unsigned nseg);

#endif
