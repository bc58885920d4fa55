/*
 * libFuzzer target: a fuzzed ring entry (either ABI, any device limits, and an
 * indirect page) through xb_parse_request / xb_parse_indirect. Beyond "no
 * crash, no out-of-bounds read" (the entry and the indirect pages are heap
 * buffers of exactly the size the parser may read), every accepted request
 * must satisfy the rules the data plane relies on before touching storage.
 *
 * Input: [0] flags (bit0 x86_32, bit1 read-only, bit2 secure discard,
 *        bit3 can flush, bit4 can discard), [1] log2 of the logical sector
 *        count (0..3), [2..3] max indirect segments (le16, capped at 256),
 *        [4..11] disk size in sectors (le64), then the ring entry, then the
 *        indirect page (zero-padded).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "parse.h"

#define HDR 12

static void check(int cond)
{
    if (!cond)
        abort();
}

static uint64_t le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

static void check_accepted(const struct xb_parsed_req *r, const struct xb_parse_limits *lim, int indirect)
{
    check(r->op == XB_OP_READ || r->op == XB_OP_WRITE || r->op == XB_OP_WRITE_BARRIER ||
          r->op == XB_OP_FLUSH_DISKCACHE || r->op == XB_OP_DISCARD);
    check(!lim->readonly || r->op == XB_OP_READ);
    uint64_t end = r->sector + r->nr_sectors;
    /* Only a flush or barrier without data may name no sectors, and then its sector is ignored. */
    int empty_flush = r->nr_sectors == 0 && r->nseg == 0 &&
                      (r->op == XB_OP_FLUSH_DISKCACHE || r->op == XB_OP_WRITE_BARRIER);
    check(empty_flush || (end >= r->sector && end <= lim->size_sectors));
    if (r->op == XB_OP_DISCARD) {
        check(lim->can_discard);
        check(!(r->discard_flag & XB_DISCARD_SECURE) || lim->secure_discard);
        return;
    }
    if (r->op == XB_OP_FLUSH_DISKCACHE || r->op == XB_OP_WRITE_BARRIER)
        check(lim->can_flush);
    else
        check(r->nseg > 0);
    unsigned max = indirect ? lim->max_indirect_segments : XB_MAX_SEGMENTS_PER_REQUEST;
    check(r->nseg <= max && r->nseg <= XB_MAX_INDIRECT_SEGMENTS);
    check(empty_flush || r->sector % lim->logical_sectors == 0);
    uint64_t sum = 0;
    for (unsigned i = 0; i < r->nseg; i++) {
        check(r->seg[i].first_sect <= r->seg[i].last_sect && r->seg[i].last_sect < 8);
        unsigned n = (unsigned)r->seg[i].last_sect - r->seg[i].first_sect + 1;
        check(n % lim->logical_sectors == 0);
        sum += n;
    }
    check(sum == r->nr_sectors);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < HDR)
        return 0;
    enum xb_abi abi = (data[0] & 1) ? XB_ABI_X86_32 : XB_ABI_X86_64;
    struct xb_parse_limits lim = {
        .size_sectors = le(data + 4, 8),
        .logical_sectors = 1u << (data[1] & 3),
        .max_indirect_segments = (unsigned)le(data + 2, 2),
        .readonly = (data[0] >> 1) & 1,
        .secure_discard = (data[0] >> 2) & 1,
        .can_flush = (data[0] >> 3) & 1,
        .can_discard = (data[0] >> 4) & 1,
    };
    if (lim.max_indirect_segments > XB_MAX_INDIRECT_SEGMENTS)
        lim.max_indirect_segments = XB_MAX_INDIRECT_SEGMENTS;
    size_t esz = xb_ring_entry_size(abi);
    uint8_t *entry = calloc(1, esz);
    size_t n = size - HDR < esz ? size - HDR : esz;
    memcpy(entry, data + HDR, n);
    struct xb_parsed_req *r = malloc(sizeof(*r));
    int res = xb_parse_request(abi, entry, &lim, r);
    check(res == XB_PARSE_OK || res == XB_PARSE_NEED_INDIRECT || res == XB_PARSE_REFUSED);
    /* The id the response will carry is the one the guest wrote, whatever else is wrong. */
    check(r->id == le(entry + (abi == XB_ABI_X86_64 ? 8 : 4), 8));
    /* The response echoes the opcode; for an indirect request its indirect_op (Linux blkfront checks). */
    int indirect = entry[0] == XB_OP_INDIRECT;
    check(r->operation == (indirect ? entry[1] : entry[0]));
    if (res == XB_PARSE_NEED_INDIRECT) {
        check(indirect);
        check(r->nr_indirect_pages >= 1 && r->nr_indirect_pages <= XB_MAX_INDIRECT_PAGES_PER_REQUEST);
        check((size_t)r->nseg <= (size_t)r->nr_indirect_pages * XB_SEGS_PER_INDIRECT_FRAME);
        size_t psz = (size_t)r->nr_indirect_pages * XB_PAGE_SIZE;
        uint8_t *pages = calloc(1, psz);
        size_t rest = size - HDR - n;
        memcpy(pages, data + HDR + n, rest < psz ? rest : psz);
        res = xb_parse_indirect(r, pages, &lim);
        check(res == XB_PARSE_OK || res == XB_PARSE_REFUSED);
        free(pages);
    }
    if (res == XB_PARSE_OK)
        check_accepted(r, &lim, indirect);
    else
        check(r->refusal < XB_REFUSE_REASONS && (r->rsp_status == XB_RSP_ERROR || r->rsp_status == XB_RSP_EOPNOTSUPP));
    free(r);
    free(entry);
    return 0;
}
