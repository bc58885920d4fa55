/* The explicit x86_64 blkif layout must match the system's native <xen/io/blkif.h>. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/io/blkif.h>
#include "xb_blkif.h"

#define SAME(a, b) do { if ((a) != (b)) { fprintf(stderr, "layout mismatch: %s=%zu %s=%zu\n", #a, (size_t)(a), #b, (size_t)(b)); return 1; } } while (0)

int main(void)
{
    SAME(sizeof(union xb_blkif_x86_64_request), sizeof(union blkif_sring_entry));
    SAME(sizeof(struct xb_blkif_x86_64_response), sizeof(struct blkif_response));
    SAME(offsetof(struct xb_blkif_x86_64_request_rw, id), offsetof(struct blkif_request, id));
    SAME(offsetof(struct xb_blkif_x86_64_request_rw, sector_number), offsetof(struct blkif_request, sector_number));
    SAME(offsetof(struct xb_blkif_x86_64_request_rw, seg), offsetof(struct blkif_request, seg));
    SAME(offsetof(struct xb_blkif_x86_64_request_discard, nr_sectors), offsetof(struct blkif_request_discard, nr_sectors));
    SAME(offsetof(struct xb_blkif_x86_64_request_indirect, nr_segments), offsetof(struct blkif_request_indirect, nr_segments));
    SAME(offsetof(struct xb_blkif_x86_64_request_indirect, id), offsetof(struct blkif_request_indirect, id));
    SAME(offsetof(struct xb_blkif_x86_64_request_indirect, handle), offsetof(struct blkif_request_indirect, handle));
    SAME(offsetof(struct xb_blkif_x86_64_request_indirect, indirect_grefs), offsetof(struct blkif_request_indirect, indirect_grefs));
    SAME(offsetof(struct xb_blkif_x86_64_response, status), offsetof(struct blkif_response, status));
    SAME(sizeof(struct xb_sring_header), offsetof(struct blkif_sring, ring));
    for (unsigned pages = 1; pages <= XB_MAX_RING_PAGES; pages *= 2)
        SAME(xb_ring_size(XB_ABI_X86_64, pages), __CONST_RING_SIZE(blkif, pages * XB_PAGE_SIZE));
    printf("blkif layout: x86_64 matches <xen/io/blkif.h>\n");
    return 0;
}
