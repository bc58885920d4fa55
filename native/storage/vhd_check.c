/* The VHD consistency check: blocks that overlap each other or the metadata, a footer missing from
 * the end of the file (xenblk never leaves one so; see vhd_io.c) or a footer copy at offset 0 that
 * differs from it, allocation counts. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vhd.h"

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int xb_vhd_check(struct xb_image *img, struct xb_check_result *out, char *err)
{
    struct vhd *v = VH(img);
    out->total_clusters = v->type == VHD_TYPE_FIXED ? 0 : v->bat_entries;
    if (v->type == VHD_TYPE_FIXED)
        return 0;
    uint64_t *offs = malloc(((size_t)v->bat_entries + 1) * sizeof(*offs)), n = 0;
    if (!offs) {
        xb_seterr(err, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_lock(&v->lock);
    uint8_t tail[VHD_FOOTER_LEN];
    if (xb_pread_full(v->fd, tail, sizeof(tail), v->footer_off) < 0 || memcmp(tail, v->footer, sizeof(tail)))
        out->corruptions++; /* no footer where the last block ends */
    if (xb_pread_full(v->fd, tail, sizeof(tail), 0) < 0 || memcmp(tail, v->footer, sizeof(tail)))
        out->corruptions++; /* the footer copy at 0 (what QEMU reads first) differs from it */
    for (uint32_t b = 0; b < v->bat_entries; b++) {
        int64_t o = vhd_block_off(v, b);
        if (o < 0)
            out->corruptions++;
        else if (o)
            offs[n++] = (uint64_t)o;
    }
    pthread_mutex_unlock(&v->lock);
    out->allocated_clusters = n;
    qsort(offs, n, sizeof(*offs), cmp_u64);
    uint64_t span = (uint64_t)v->bitmap_len + v->block_size;
    for (uint64_t i = 1; i < n; i++) {
        if (offs[i] < offs[i - 1] + span)
            out->corruptions++; /* two blocks share host sectors */
        else if (offs[i] != offs[i - 1] + span)
            out->fragmented_clusters++;
    }
    free(offs);
    return 0;
}
