/*
 * The blkif wire format, spelled out for each guest ABI.
 *
 * The contract is Xen's xen/include/public/io/blkif.h and io/ring.h. Those
 * headers describe the *compiler's native* layout; a backend must serve guests
 * of either word size, so every layout here is explicit: packed structs with
 * the padding the guest compiler inserts written out as fields. The x86_64
 * layout is checked against the system's <xen/io/blkif.h> in the tests.
 */
#ifndef XB_BLKIF_H
#define XB_BLKIF_H

#include <stddef.h>
#include <stdint.h>

#define XB_PAGE_SIZE 4096u
#define XB_PAGE_SHIFT 12
#define XB_SECTOR_SHIFT 9 /* blkif sector numbers are always 512-byte units */

#define XB_OP_READ 0
#define XB_OP_WRITE 1
#define XB_OP_WRITE_BARRIER 2
#define XB_OP_FLUSH_DISKCACHE 3
#define XB_OP_RESERVED_1 4
#define XB_OP_DISCARD 5
#define XB_OP_INDIRECT 6

#define XB_RSP_EOPNOTSUPP (-2)
#define XB_RSP_ERROR (-1)
#define XB_RSP_OKAY 0

#define XB_DISCARD_SECURE 0x1

#define XB_MAX_SEGMENTS_PER_REQUEST 11
#define XB_MAX_INDIRECT_PAGES_PER_REQUEST 8
/* What xenblk advertises in feature-max-indirect-segments. */
#define XB_MAX_INDIRECT_SEGMENTS 256
#define XB_SEGS_PER_INDIRECT_FRAME (XB_PAGE_SIZE / sizeof(struct xb_blkif_segment))
#define XB_MAX_RING_PAGE_ORDER 4
#define XB_MAX_RING_PAGES (1u << XB_MAX_RING_PAGE_ORDER)

enum xb_abi { XB_ABI_X86_64 = 0, XB_ABI_X86_32 = 1 };

typedef uint32_t xb_grant_ref_t;

/* One segment: the same 8 bytes in every ABI (also the indirect page entry). */
struct xb_blkif_segment {
    xb_grant_ref_t gref;
    uint8_t first_sect;
    uint8_t last_sect;
    uint16_t _pad;
} __attribute__((packed));

/* ---- x86_64 ABI: uint64_t is 8-byte aligned ---- */
struct xb_blkif_x86_64_request_rw {
    uint8_t operation;
    uint8_t nr_segments;
    uint16_t handle;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    struct xb_blkif_segment seg[XB_MAX_SEGMENTS_PER_REQUEST];
} __attribute__((packed));

struct xb_blkif_x86_64_request_discard {
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
} __attribute__((packed));

struct xb_blkif_x86_64_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t _pad2;
    xb_grant_ref_t indirect_grefs[XB_MAX_INDIRECT_PAGES_PER_REQUEST];
} __attribute__((packed));

struct xb_blkif_x86_64_request_other { /* flush, barrier-less ops: id only */
    uint8_t operation;
    uint8_t _pad1[7];
    uint64_t id;
} __attribute__((packed));

union xb_blkif_x86_64_request {
    uint8_t operation;
    struct xb_blkif_x86_64_request_rw rw;
    struct xb_blkif_x86_64_request_discard discard;
    struct xb_blkif_x86_64_request_indirect indirect;
    struct xb_blkif_x86_64_request_other other;
    uint8_t _size[112];
} __attribute__((packed));

struct xb_blkif_x86_64_response {
    uint64_t id;
    uint8_t operation;
    uint8_t _pad1;
    int16_t status;
    uint32_t _pad2;
} __attribute__((packed));

/* ---- x86_32 ABI: uint64_t is 4-byte aligned ---- */
struct xb_blkif_x86_32_request_rw {
    uint8_t operation;
    uint8_t nr_segments;
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    struct xb_blkif_segment seg[XB_MAX_SEGMENTS_PER_REQUEST];
} __attribute__((packed));

struct xb_blkif_x86_32_request_discard {
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
} __attribute__((packed));

struct xb_blkif_x86_32_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t _pad1;
    xb_grant_ref_t indirect_grefs[XB_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t _pad2;
} __attribute__((packed));

struct xb_blkif_x86_32_request_other {
    uint8_t operation;
    uint8_t _pad1[3];
    uint64_t id;
} __attribute__((packed));

union xb_blkif_x86_32_request {
    uint8_t operation;
    struct xb_blkif_x86_32_request_rw rw;
    struct xb_blkif_x86_32_request_discard discard;
    struct xb_blkif_x86_32_request_indirect indirect;
    struct xb_blkif_x86_32_request_other other;
    uint8_t _size[108];
} __attribute__((packed));

struct xb_blkif_x86_32_response {
    uint64_t id;
    uint8_t operation;
    uint8_t _pad1;
    int16_t status;
} __attribute__((packed));

_Static_assert(sizeof(struct xb_blkif_segment) == 8, "segment");
_Static_assert(sizeof(union xb_blkif_x86_64_request) == 112, "x86_64 request");
_Static_assert(sizeof(struct xb_blkif_x86_64_response) == 16, "x86_64 response");
_Static_assert(sizeof(union xb_blkif_x86_32_request) == 108, "x86_32 request");
_Static_assert(sizeof(struct xb_blkif_x86_32_response) == 12, "x86_32 response");
_Static_assert(offsetof(struct xb_blkif_x86_64_request_indirect, indirect_grefs) == 28, "x86_64 indirect");
_Static_assert(offsetof(struct xb_blkif_x86_32_request_indirect, indirect_grefs) == 24, "x86_32 indirect");

/*
 * Shared ring header (io/ring.h DEFINE_RING_TYPES): four indexes, then 48
 * bytes of private/padding space, then the entries. Each entry is a union of
 * request and response, so its size is the request size of the ABI.
 */
struct xb_sring_header {
    uint32_t req_prod;
    uint32_t req_event;
    uint32_t rsp_prod;
    uint32_t rsp_event;
    uint8_t _pad[48];
} __attribute__((packed));
_Static_assert(sizeof(struct xb_sring_header) == 64, "sring header");

static inline size_t xb_ring_entry_size(enum xb_abi abi)
{
    return abi == XB_ABI_X86_32 ? 108u : 112u;
}

/* Number of ring entries for a ring of `pages` pages: a power of two (ring.h __RD32). */
static inline uint32_t xb_ring_size(enum xb_abi abi, unsigned pages)
{
    uint32_t n = (uint32_t)((pages * XB_PAGE_SIZE - sizeof(struct xb_sring_header)) / xb_ring_entry_size(abi));
    uint32_t p = 1;
    while (p * 2 <= n)
        p *= 2;
    return p;
}

static inline void *xb_ring_entry(void *sring, enum xb_abi abi, uint32_t idx, uint32_t ring_size)
{
    return (uint8_t *)sring + sizeof(struct xb_sring_header) + (size_t)(idx & (ring_size - 1)) * xb_ring_entry_size(abi);
}

#endif
