/* VHD footer and dynamic header: parsing and validation, open/close, describe.
 * Everything read here is hostile: each field is bounded before use, both checksums are checked. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "vhd.h"

#define FAIL(...)                                                                                                      \
    do {                                                                                                               \
        xb_seterr(err, __VA_ARGS__);                                                                                   \
        goto fail;                                                                                                     \
    } while (0)

uint32_t vhd_checksum(const uint8_t *b, size_t len, size_t csum_off)
{
    uint32_t sum = 0;
    for (size_t i = 0; i < len; i++)
        if (i < csum_off || i >= csum_off + 4)
            sum += b[i];
    return ~sum;
}

static void vhd_free(struct vhd *v)
{
    if (v->parent)
        v->parent->ops->close(v->parent);
    free(v->bat);
    free(v->full);
    free(v->bmbuf);
    free(v->bat_dirty);
    free(v->pend_bm);
    if (v->fd >= 0)
        close(v->fd);
    pthread_mutex_destroy(&v->lock);
    free(v);
}

void xb_vhd_close_impl(struct xb_image *img)
{
    struct vhd *v = VH(img);
    if (!v->ro)
        img->ops->flush(img);
    vhd_free(v);
}

struct xb_image *xb_vhd_backing(struct xb_image *img) { return VH(img)->parent; }

/* 0 if b holds a footer we can use: cookie, checksum, version, a disk type we know. */
static const char *footer_problem(const uint8_t *b)
{
    if (memcmp(b + VF_COOKIE, "conectix", 8))
        return "no footer cookie";
    if (vhd_be32(b + VF_CHECKSUM) != vhd_checksum(b, VHD_FOOTER_LEN, VF_CHECKSUM))
        return "footer checksum mismatch";
    if (vhd_be32(b + VF_VERSION) >> 16 != 1)
        return "unsupported footer version";
    uint32_t t = vhd_be32(b + VF_TYPE);
    if (t != VHD_TYPE_FIXED && t != VHD_TYPE_DYNAMIC && t != VHD_TYPE_DIFF)
        return "unknown disk type";
    return NULL;
}

/* Dynamic and differencing disks: the header, the BAT (each entry bounded: a block lies between
 * the footer copy and the footer, clear of the header and the BAT) and the parent. */
static int open_dynamic(struct vhd *v, uint64_t fsize, int end_ok, unsigned flags, int depth, xb_backing_fn backing,
                        void *ctx, char *err)
{
    uint8_t h[VHD_HEADER_LEN];
    uint64_t ho = vhd_be64(v->footer + VF_DATA_OFFSET);
    if (ho < VHD_FOOTER_LEN || ho > fsize || VHD_HEADER_LEN > fsize - ho) {
        xb_seterr(err, "%s: dynamic header offset 0x%llx outside the file", v->path, (unsigned long long)ho);
        return -EINVAL;
    }
    if (xb_pread_full(v->fd, h, sizeof(h), ho) < 0) {
        xb_seterr(err, "%s: cannot read the dynamic header", v->path);
        return -EIO;
    }
    if (memcmp(h + VH_COOKIE, "cxsparse", 8) || vhd_be32(h + VH_CHECKSUM) != vhd_checksum(h, sizeof(h), VH_CHECKSUM)) {
        xb_seterr(err, "%s: dynamic header: bad cookie or checksum", v->path);
        return -EINVAL;
    }
    if (vhd_be32(h + VH_VERSION) != 0x00010000u) {
        xb_seterr(err, "%s: dynamic header version 0x%x unsupported", v->path, vhd_be32(h + VH_VERSION));
        return -ENOTSUP;
    }
    uint32_t bs = vhd_be32(h + VH_BLOCK_SIZE), n = vhd_be32(h + VH_MAX_ENTRIES);
    if (bs < VHD_MIN_BLOCK || bs > VHD_MAX_BLOCK || (bs & (bs - 1))) {
        xb_seterr(err, "%s: block size %u unsupported (a power of two from 512 B to 256 MiB)", v->path, bs);
        return -EINVAL;
    }
    if (n > VHD_MAX_BAT_ENTRIES || (uint64_t)n * bs < v->img.size) {
        xb_seterr(err, "%s: %u BAT entries of %u bytes do not fit the virtual size (or too many)", v->path, n, bs);
        return -EINVAL;
    }
    v->header_off = ho;
    v->block_size = bs;
    v->block_bits = (unsigned)__builtin_ctz(bs);
    uint32_t sectors = bs / VHD_SECTOR;
    v->bitmap_len = ((sectors + 7) / 8 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    v->bat_entries = n;
    v->bat_off = vhd_be64(h + VH_TABLE_OFFSET);
    uint64_t bat_bytes = ((uint64_t)n * 4 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    if (v->bat_off < VHD_FOOTER_LEN || v->bat_off > fsize || bat_bytes > fsize - v->bat_off ||
        (v->bat_off < ho + VHD_HEADER_LEN && ho < v->bat_off + bat_bytes)) {
        xb_seterr(err, "%s: BAT offset 0x%llx invalid (outside the file or over the header)", v->path,
                  (unsigned long long)v->bat_off);
        return -EINVAL;
    }
    v->data_start = ho + VHD_HEADER_LEN > v->bat_off + bat_bytes ? ho + VHD_HEADER_LEN : v->bat_off + bat_bytes;
    v->bat = calloc(n ? n : 1, 4);
    v->full = calloc(n / 8 + 1, 1);
    v->bmbuf = malloc(v->bitmap_len);
    v->bat_dirty = calloc(n / 128 / 8 + 1, 1);
    if (!v->bat || !v->full || !v->bmbuf || !v->bat_dirty) {
        xb_seterr(err, "out of memory");
        return -ENOMEM;
    }
    if (n && xb_pread_full(v->fd, v->bat, (size_t)n * 4, v->bat_off) < 0) {
        xb_seterr(err, "%s: cannot read the BAT", v->path);
        return -EIO;
    }
    /* Where blocks may end: the footer, or (its copy at offset 0 was all we had) the file's end.
     * The end of the last block is where the footer belongs. */
    uint64_t limit = end_ok ? fsize - VHD_FOOTER_LEN : fsize, end = v->data_start;
    uint64_t span = (uint64_t)v->bitmap_len + bs;
    for (uint32_t i = 0; i < n; i++) {
        v->bat[i] = __builtin_bswap32(v->bat[i]);
        if (v->bat[i] == VHD_BAT_FREE)
            continue;
        uint64_t o = (uint64_t)v->bat[i] * VHD_SECTOR;
        int meta = (o < ho + VHD_HEADER_LEN && ho < o + span) || (o < v->bat_off + bat_bytes && v->bat_off < o + span);
        if (o < VHD_FOOTER_LEN || o + span > limit || meta) {
            xb_seterr(err, "%s: BAT entry %u points at 0x%llx, outside the data area", v->path, i,
                      (unsigned long long)o);
            return -EINVAL;
        }
        if (o + span > end)
            end = o + span;
    }
    if (end_ok) {
        v->footer_off = fsize - VHD_FOOTER_LEN;
    } else {
        /* The footer copy at 0 stood in for a lost or torn footer at the end (a tool that writes the
         * footer last, killed mid-allocation): the footer goes right after the last block. A writer
         * puts it back there now, cutting off whatever half-written block lay beyond — at most one
         * block: more than that is not what such a crash leaves, and is not cut. */
        v->footer_off = end;
        if (!v->ro && fsize > end + span + VHD_FOOTER_LEN) {
            xb_seterr(err, "%s: no footer at the end and %llu bytes beyond the last block: not cut (open it read-only)",
                      v->path, (unsigned long long)(fsize - end));
            return -EINVAL;
        }
        if (!v->ro && (ftruncate(v->fd, (off_t)(end + VHD_FOOTER_LEN)) ||
                       xb_pwrite_full(v->fd, v->footer, VHD_FOOTER_LEN, end) < 0 || fdatasync(v->fd))) {
            xb_seterr(err, "%s: cannot restore the footer at the end: %s", v->path, strerror(errno));
            return -EIO;
        }
    }
    if (v->footer_off < v->data_start) {
        xb_seterr(err, "%s: the footer lies inside the header or the BAT", v->path);
        return -EINVAL;
    }
    memcpy(v->parent_uuid, h + VH_PARENT_UUID, 16);
    v->parent_ts = vhd_be32(h + VH_PARENT_TS);
    if (v->type == VHD_TYPE_DIFF)
        return vhd_open_parent(v, h, flags, depth, backing, ctx, err);
    return 0;
}

static struct xb_image *make_image(struct vhd *v)
{
    struct xb_image *img = &v->img;
    img->ops = &xb_vhd_ops;
    img->priv = v;
    img->format = XB_FMT_VHD;
    img->logical_block = 512;
    img->physical_block = v->type == VHD_TYPE_FIXED || v->block_size >= 4096 ? 4096 : v->block_size;
    img->caps = XB_CAP_FLUSH;
    if (v->ro) {
        img->caps |= XB_CAP_READONLY;
    } else {
        img->caps |= XB_CAP_WRITE_ZEROES;
        /* A differencing disk cannot drop a sector (it would show the parent's data again). */
        if (v->type != VHD_TYPE_DIFF) {
            img->caps |= XB_CAP_DISCARD;
            img->discard_granularity = v->type == VHD_TYPE_FIXED ? 4096 : v->block_size;
        }
    }
    img->direct = 0; /* metadata I/O is unaligned: VHD always uses the page cache */
    return img;
}

struct xb_image *xb_vhd_open_fd(int fd, const char *path, unsigned flags, int depth, xb_backing_fn backing, void *ctx,
                                char *err)
{
    struct vhd *v = calloc(1, sizeof(*v));
    if (!v) {
        close(fd);
        xb_seterr(err, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&v->lock, NULL);
    v->fd = fd;
    snprintf(v->path, sizeof(v->path), "%s", path);
    struct stat st;
    if (xb_fd_prepare(fd, &v->ro) || fstat(fd, &st))
        FAIL("%s: %s", path, strerror(errno));
    if (flags & XB_OPEN_RDONLY)
        v->ro = 1;
    v->meta_wt = !!(flags & XB_OPEN_WRITETHROUGH_META);
    if (!S_ISREG(st.st_mode))
        FAIL("%s: is %s (VHD images are regular files)", path, xb_file_kind(st.st_mode));
    uint64_t fsize = (uint64_t)st.st_size;
    if (fsize < VHD_FOOTER_LEN)
        FAIL("%s: too short for a VHD footer (%llu bytes)", path, (unsigned long long)fsize);
    if (xb_pread_full(fd, v->footer, VHD_FOOTER_LEN, fsize - VHD_FOOTER_LEN) < 0)
        FAIL("%s: cannot read the footer", path);
    const char *why = footer_problem(v->footer);
    int end_ok = !why;
    if (!end_ok) {
        /* A dynamic disk keeps a copy of the footer at offset 0. */
        uint8_t copy[VHD_FOOTER_LEN];
        if (fsize < 2 * VHD_FOOTER_LEN || xb_pread_full(fd, copy, sizeof(copy), 0) < 0 || footer_problem(copy) ||
            vhd_be32(copy + VF_TYPE) == VHD_TYPE_FIXED)
            FAIL("%s: not a VHD image (%s at the end, and no valid footer copy at offset 0)", path, why);
        memcpy(v->footer, copy, sizeof(copy));
    }
    v->type = vhd_be32(v->footer + VF_TYPE);
    memcpy(v->uuid, v->footer + VF_UUID, 16);
    uint64_t size = vhd_be64(v->footer + VF_CUR_SIZE);
    if (size % VHD_SECTOR || size > VHD_MAX_SIZE)
        FAIL("%s: virtual size %llu is not a multiple of 512 or too large", path, (unsigned long long)size);
    v->img.size = size;
    if (v->type == VHD_TYPE_FIXED) {
        v->footer_off = fsize - VHD_FOOTER_LEN;
        if (size > v->footer_off)
            FAIL("%s: fixed disk of %llu bytes in a file of %llu", path, (unsigned long long)size,
                 (unsigned long long)fsize);
    } else if (open_dynamic(v, fsize, end_ok, flags, depth, backing, ctx, err)) {
        goto fail;
    }
    return make_image(v);
fail:
    vhd_free(v);
    return NULL;
}

int xb_vhd_describe(struct xb_image *img, struct xb_image_desc *d)
{
    struct vhd *v = VH(img);
    struct stat st;
    d->cluster_size = v->type == VHD_TYPE_FIXED ? 0 : v->block_size;
    d->vhd_disk_type = (int)v->type;
    if (fstat(v->fd, &st) == 0)
        d->allocated_bytes = (uint64_t)st.st_blocks * 512;
    if (v->parent) {
        size_t n = strnlen(v->parent_name, sizeof(d->backing_file) - 1); /* cut to the field */
        memcpy(d->backing_file, v->parent_name, n);
        d->backing_file[n] = 0;
        snprintf(d->backing_format, sizeof(d->backing_format), "vhd");
    }
    return 0;
}
