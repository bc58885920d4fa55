/*
 * xb_parse_request / xb_parse_indirect: every validation rule, in both ABIs,
 * and the operation each response echoes (an indirect request's indirect_op),
 * on ring entries built byte by byte with the explicit layouts of xb_blkif.h.
 * Built with ASan+UBSan: a parse that reads past the entry or an indirect page
 * fails here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "parse.h"

static int failures;

#define EXPECT(cond)                                                                                                   \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: %s: expected %s\n", __FILE__, __LINE__, abi_name, #cond);                         \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

static const char *abi_name;
static enum xb_abi abi;

static const struct xb_parse_limits base_lim = {
    .size_sectors = 2048, /* 1 MiB */
    .logical_sectors = 1,
    .max_indirect_segments = 64,
    .readonly = 0,
    .secure_discard = 0,
    .can_flush = 1,
    .can_discard = 1,
};

/* A ring entry exactly as large as the ABI's, on the heap so ASan sees any read past it. */
static uint8_t *entry(void)
{
    uint8_t *e = calloc(1, xb_ring_entry_size(abi));
    return e;
}

static uint8_t *rw(uint8_t op, unsigned nseg, uint64_t id, uint64_t sector, const struct xb_blkif_segment *segs,
                   unsigned nsegs_written)
{
    uint8_t *e = entry();
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_rw r = {.operation = op, .nr_segments = (uint8_t)nseg, .id = id,
                                               .sector_number = sector};
        memcpy(r.seg, segs, nsegs_written * sizeof(*segs));
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_rw r = {.operation = op, .nr_segments = (uint8_t)nseg, .id = id,
                                               .sector_number = sector};
        memcpy(r.seg, segs, nsegs_written * sizeof(*segs));
        memcpy(e, &r, sizeof(r));
    }
    return e;
}

static uint8_t *discard(uint64_t id, uint64_t sector, uint64_t n, uint8_t flag)
{
    uint8_t *e = entry();
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_discard r = {.operation = XB_OP_DISCARD, .flag = flag, .id = id,
                                                    .sector_number = sector, .nr_sectors = n};
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_discard r = {.operation = XB_OP_DISCARD, .flag = flag, .id = id,
                                                    .sector_number = sector, .nr_sectors = n};
        memcpy(e, &r, sizeof(r));
    }
    return e;
}

static uint8_t *indirect(uint8_t iop, uint16_t nseg, uint64_t id, uint64_t sector, xb_grant_ref_t gref)
{
    uint8_t *e = entry();
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_indirect r = {.operation = XB_OP_INDIRECT, .indirect_op = iop,
                                                     .nr_segments = nseg, .id = id, .sector_number = sector};
        r.indirect_grefs[0] = gref;
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_indirect r = {.operation = XB_OP_INDIRECT, .indirect_op = iop,
                                                     .nr_segments = nseg, .id = id, .sector_number = sector};
        r.indirect_grefs[0] = gref;
        memcpy(e, &r, sizeof(r));
    }
    return e;
}

static uint8_t *other(uint8_t op, uint64_t id)
{
    uint8_t *e = entry();
    if (abi == XB_ABI_X86_64) {
        struct xb_blkif_x86_64_request_other r = {.operation = op, .id = id};
        memcpy(e, &r, sizeof(r));
    } else {
        struct xb_blkif_x86_32_request_other r = {.operation = op, .id = id};
        memcpy(e, &r, sizeof(r));
    }
    return e;
}

static struct xb_parsed_req out;

/* Parse and free; returns the result, `out` holds the parse. */
static int parse(uint8_t *e, const struct xb_parse_limits *lim)
{
    memset(&out, 0xa5, sizeof(out));
    int r = xb_parse_request(abi, e, lim, &out);
    free(e);
    return r;
}

static int refused(int r, enum xb_refusal why, int16_t status, uint64_t id, uint8_t op)
{
    return r == XB_PARSE_REFUSED && out.refusal == why && out.rsp_status == status && out.id == id &&
           out.operation == op;
}

static struct xb_blkif_segment seg(xb_grant_ref_t g, uint8_t f, uint8_t l)
{
    struct xb_blkif_segment s = {.gref = g, .first_sect = f, .last_sect = l};
    return s;
}

static void test_abi(void)
{
    struct xb_parse_limits lim = base_lim;
    struct xb_blkif_segment segs[XB_MAX_SEGMENTS_PER_REQUEST];
    for (unsigned i = 0; i < XB_MAX_SEGMENTS_PER_REQUEST; i++)
        segs[i] = seg(100 + i, 0, 7);

    /* accepted requests */
    EXPECT(parse(rw(XB_OP_READ, 1, 0x1122334455667788ull, 8, segs, 1), &lim) == XB_PARSE_OK);
    EXPECT(out.id == 0x1122334455667788ull && out.op == XB_OP_READ && out.nseg == 1 && out.sector == 8 &&
           out.nr_sectors == 8 && out.seg[0].gref == 100);
    EXPECT(parse(rw(XB_OP_WRITE, 11, 2, 2048 - 88, segs, 11), &lim) == XB_PARSE_OK);
    EXPECT(out.nr_sectors == 88 && out.seg[10].gref == 110);
    struct xb_blkif_segment part[2] = {seg(7, 2, 4), seg(8, 7, 7)};
    EXPECT(parse(rw(XB_OP_WRITE, 2, 3, 0, part, 2), &lim) == XB_PARSE_OK);
    EXPECT(out.nr_sectors == 4 && out.seg[0].first_sect == 2 && out.seg[1].last_sect == 7);
    EXPECT(parse(rw(XB_OP_FLUSH_DISKCACHE, 0, 4, 0, segs, 0), &lim) == XB_PARSE_OK && out.nr_sectors == 0);
    EXPECT(parse(rw(XB_OP_WRITE_BARRIER, 0, 5, 0, segs, 0), &lim) == XB_PARSE_OK && out.op == XB_OP_WRITE_BARRIER);
    /* an empty flush names no sectors: Linux puts (sector_t)-1 there */
    EXPECT(parse(rw(XB_OP_FLUSH_DISKCACHE, 0, 4, UINT64_MAX, segs, 0), &lim) == XB_PARSE_OK && out.nr_sectors == 0);
    struct xb_parse_limits lim4 = base_lim;
    lim4.logical_sectors = 8;
    EXPECT(parse(rw(XB_OP_WRITE_BARRIER, 0, 5, 3, segs, 0), &lim4) == XB_PARSE_OK);
    EXPECT(refused(parse(rw(XB_OP_FLUSH_DISKCACHE, 1, 4, UINT64_MAX - 3, segs, 1), &lim), XB_REFUSE_RANGE,
                   XB_RSP_ERROR, 4, XB_OP_FLUSH_DISKCACHE));
    EXPECT(parse(discard(6, 100, 1948, 0), &lim) == XB_PARSE_OK && out.nr_sectors == 1948 && out.discard_flag == 0);

    /* opcode whitelist */
    EXPECT(refused(parse(other(XB_OP_RESERVED_1, 9), &lim), XB_REFUSE_BAD_OP, XB_RSP_EOPNOTSUPP, 9, 4));
    EXPECT(refused(parse(other(7, 10), &lim), XB_REFUSE_BAD_OP, XB_RSP_EOPNOTSUPP, 10, 7));
    EXPECT(refused(parse(other(0xff, 11), &lim), XB_REFUSE_BAD_OP, XB_RSP_EOPNOTSUPP, 11, 0xff));

    /* segment counts */
    EXPECT(refused(parse(rw(XB_OP_READ, 0, 12, 0, segs, 0), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 12, XB_OP_READ));
    EXPECT(refused(parse(rw(XB_OP_WRITE, 0, 12, 0, segs, 0), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 12, XB_OP_WRITE));
    EXPECT(refused(parse(rw(XB_OP_WRITE, 12, 13, 0, segs, 11), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 13, 1));
    EXPECT(refused(parse(rw(XB_OP_READ, 255, 13, 0, segs, 11), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 13, 0));
    EXPECT(refused(parse(rw(XB_OP_FLUSH_DISKCACHE, 12, 13, 0, segs, 11), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 13, 3));

    /* sectors within a segment */
    struct xb_blkif_segment bad[2] = {seg(1, 0, 7), seg(2, 5, 4)};
    EXPECT(refused(parse(rw(XB_OP_READ, 2, 14, 0, bad, 2), &lim), XB_REFUSE_SECT, XB_RSP_ERROR, 14, 0));
    bad[1] = seg(2, 0, 8);
    EXPECT(refused(parse(rw(XB_OP_WRITE, 2, 14, 0, bad, 2), &lim), XB_REFUSE_SECT, XB_RSP_ERROR, 14, 1));
    bad[1] = seg(2, 255, 255);
    EXPECT(refused(parse(rw(XB_OP_WRITE, 2, 14, 0, bad, 2), &lim), XB_REFUSE_SECT, XB_RSP_ERROR, 14, 1));

    /* range and wrap */
    EXPECT(refused(parse(rw(XB_OP_READ, 1, 15, 2048, segs, 1), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 15, 0));
    EXPECT(refused(parse(rw(XB_OP_READ, 2, 15, 2041, segs, 2), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 15, 0));
    EXPECT(refused(parse(rw(XB_OP_WRITE, 2, 15, UINT64_MAX - 7, segs, 2), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 15,
                   1));
    EXPECT(refused(parse(discard(16, 2047, 2, 0), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 16, XB_OP_DISCARD));
    EXPECT(refused(parse(discard(16, UINT64_MAX, 2, 0), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 16, XB_OP_DISCARD));
    EXPECT(refused(parse(discard(16, 1, UINT64_MAX, 0), &lim), XB_REFUSE_RANGE, XB_RSP_ERROR, 16, XB_OP_DISCARD));

    /* logical-sector alignment (4096-byte sectors) */
    struct xb_parse_limits lim4k = base_lim;
    lim4k.logical_sectors = 8;
    EXPECT(parse(rw(XB_OP_READ, 2, 17, 8, segs, 2), &lim4k) == XB_PARSE_OK);
    EXPECT(refused(parse(rw(XB_OP_READ, 1, 17, 1, segs, 1), &lim4k), XB_REFUSE_ALIGN, XB_RSP_ERROR, 17, 0));
    struct xb_blkif_segment half = seg(1, 0, 3);
    EXPECT(refused(parse(rw(XB_OP_WRITE, 1, 17, 0, &half, 1), &lim4k), XB_REFUSE_ALIGN, XB_RSP_ERROR, 17, 1));

    /* read-only */
    struct xb_parse_limits ro = base_lim;
    ro.readonly = 1;
    EXPECT(parse(rw(XB_OP_READ, 1, 18, 0, segs, 1), &ro) == XB_PARSE_OK);
    EXPECT(refused(parse(rw(XB_OP_WRITE, 1, 18, 0, segs, 1), &ro), XB_REFUSE_READONLY, XB_RSP_ERROR, 18, 1));
    EXPECT(refused(parse(rw(XB_OP_FLUSH_DISKCACHE, 0, 18, 0, segs, 0), &ro), XB_REFUSE_READONLY, XB_RSP_ERROR, 18, 3));
    EXPECT(refused(parse(rw(XB_OP_WRITE_BARRIER, 1, 18, 0, segs, 1), &ro), XB_REFUSE_READONLY, XB_RSP_ERROR, 18, 2));
    EXPECT(refused(parse(discard(18, 0, 8, 0), &ro), XB_REFUSE_READONLY, XB_RSP_ERROR, 18, XB_OP_DISCARD));
    EXPECT(refused(parse(indirect(XB_OP_WRITE, 4, 18, 0, 1), &ro), XB_REFUSE_READONLY, XB_RSP_ERROR, 18,
                   XB_OP_WRITE));

    /* what the image cannot do */
    struct xb_parse_limits noflush = base_lim;
    noflush.can_flush = 0;
    noflush.can_discard = 0;
    EXPECT(refused(parse(rw(XB_OP_FLUSH_DISKCACHE, 0, 19, 0, segs, 0), &noflush), XB_REFUSE_UNSUPPORTED,
                   XB_RSP_EOPNOTSUPP, 19, 3));
    EXPECT(refused(parse(discard(19, 0, 8, 0), &noflush), XB_REFUSE_UNSUPPORTED, XB_RSP_EOPNOTSUPP, 19, 5));

    /* secure discard */
    EXPECT(refused(parse(discard(20, 0, 8, XB_DISCARD_SECURE), &lim), XB_REFUSE_SECURE, XB_RSP_EOPNOTSUPP, 20, 5));
    struct xb_parse_limits sec = base_lim;
    sec.secure_discard = 1;
    EXPECT(parse(discard(20, 0, 8, XB_DISCARD_SECURE), &sec) == XB_PARSE_OK && out.discard_flag == XB_DISCARD_SECURE);

    /* indirect header */
    EXPECT(parse(indirect(XB_OP_READ, 64, 21, 16, 555), &lim) == XB_PARSE_NEED_INDIRECT);
    EXPECT(out.op == XB_OP_READ && out.operation == XB_OP_READ && out.id == 21 && out.sector == 16 &&
           out.nseg == 64 && out.nr_indirect_pages == 1 && out.indirect_grefs[0] == 555);
    EXPECT(refused(parse(indirect(XB_OP_READ, 65, 22, 0, 1), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 22, 0));
    EXPECT(refused(parse(indirect(XB_OP_READ, 0, 22, 0, 1), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 22, 0));
    EXPECT(refused(parse(indirect(XB_OP_WRITE, 0xffff, 22, 0, 1), &lim), XB_REFUSE_NSEG, XB_RSP_ERROR, 22, 1));
    EXPECT(refused(parse(indirect(XB_OP_FLUSH_DISKCACHE, 4, 23, 0, 1), &lim), XB_REFUSE_INDIRECT, XB_RSP_ERROR, 23,
                   XB_OP_FLUSH_DISKCACHE));
    EXPECT(refused(parse(indirect(XB_OP_INDIRECT, 4, 23, 0, 1), &lim), XB_REFUSE_INDIRECT, XB_RSP_ERROR, 23,
                   XB_OP_INDIRECT));
    EXPECT(refused(parse(indirect(XB_OP_DISCARD, 4, 23, 0, 1), &lim), XB_REFUSE_INDIRECT, XB_RSP_ERROR, 23,
                   XB_OP_DISCARD));
    struct xb_parse_limits noind = base_lim;
    noind.max_indirect_segments = 0;
    EXPECT(refused(parse(indirect(XB_OP_READ, 4, 24, 0, 1), &noind), XB_REFUSE_INDIRECT, XB_RSP_ERROR, 24, 0));
    struct xb_parse_limits maxind = base_lim;
    maxind.max_indirect_segments = XB_MAX_INDIRECT_SEGMENTS;
    EXPECT(parse(indirect(XB_OP_WRITE, 256, 25, 0, 9), &maxind) == XB_PARSE_NEED_INDIRECT &&
           out.nr_indirect_pages == 1);
    EXPECT(refused(parse(indirect(XB_OP_WRITE, 257, 25, 0, 9), &maxind), XB_REFUSE_NSEG, XB_RSP_ERROR, 25, 1));

    /* indirect segments, from a private page of exactly the size the parser may read */
    struct xb_blkif_segment *page = malloc(XB_PAGE_SIZE);
    for (unsigned i = 0; i < XB_SEGS_PER_INDIRECT_FRAME; i++)
        page[i] = seg(1000 + i, 0, 7);
    EXPECT(parse(indirect(XB_OP_WRITE, 64, 26, 0, 9), &lim) == XB_PARSE_NEED_INDIRECT);
    EXPECT(xb_parse_indirect(&out, page, &lim) == XB_PARSE_OK && out.nr_sectors == 512 && out.seg[63].gref == 1063);
    page[10] = seg(1, 6, 5);
    EXPECT(parse(indirect(XB_OP_WRITE, 64, 27, 0, 9), &lim) == XB_PARSE_NEED_INDIRECT);
    EXPECT(xb_parse_indirect(&out, page, &lim) == XB_PARSE_REFUSED && out.refusal == XB_REFUSE_SECT && out.id == 27);
    page[10] = seg(1, 0, 7);
    EXPECT(parse(indirect(XB_OP_READ, 64, 28, 2048 - 511, 9), &lim) == XB_PARSE_NEED_INDIRECT);
    EXPECT(xb_parse_indirect(&out, page, &lim) == XB_PARSE_REFUSED && out.refusal == XB_REFUSE_RANGE);
    page[3] = seg(1, 0, 3);
    EXPECT(parse(indirect(XB_OP_READ, 8, 29, 0, 9), &lim4k) == XB_PARSE_NEED_INDIRECT);
    EXPECT(xb_parse_indirect(&out, page, &lim4k) == XB_PARSE_REFUSED && out.refusal == XB_REFUSE_ALIGN);
    free(page);
}

int main(void)
{
    abi = XB_ABI_X86_64;
    abi_name = "x86_64";
    test_abi();
    abi = XB_ABI_X86_32;
    abi_name = "x86_32";
    test_abi();
    abi_name = "any";
    EXPECT(xb_seg_bucket(1) == 0 && xb_seg_bucket(11) == 4 && xb_seg_bucket(12) == 5 && xb_seg_bucket(256) == 9);
    if (failures) {
        fprintf(stderr, "ring parse: %d failures\n", failures);
        return 1;
    }
    printf("ring parse: every validation rule holds in both ABIs\n");
    return 0;
}
