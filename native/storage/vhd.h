/* VHD driver internals (Microsoft's Virtual Hard Disk Image Format Specification, 2006; as
 * qemu's vpc, libvhdi and blktap's vhd-util write it), split by concern:
 * vhd.c (footer and dynamic header, open/close, describe), vhd_parent.c (parent locators and the
 * differencing chain), vhd_io.c (BAT, sector bitmaps, reads, writes, block allocation, flush,
 * discard, the fast-path map), vhd_check.c (consistency check).
 *
 * On disk everything is big-endian. A fixed disk is the data followed by a footer; a dynamic or
 * differencing disk is a footer copy, the dynamic header, the BAT, blocks (a sector bitmap then the
 * block's data) and the footer, which is always the last 512 bytes of the file. */
#ifndef XB_VHD_H
#define XB_VHD_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include "storage_int.h"

#define VHD_SECTOR 512u
#define VHD_FOOTER_LEN 512u
#define VHD_HEADER_LEN 1024u
#define VHD_TYPE_FIXED 2u
#define VHD_TYPE_DYNAMIC 3u
#define VHD_TYPE_DIFF 4u
#define VHD_BAT_FREE 0xffffffffu
#define VHD_NO_OFFSET 0xffffffffffffffffULL
/* Bounds on what a header may ask of us: a block is a power of two in [512 B, 256 MiB]; the BAT
 * at most 2^24 entries (64 MiB of BAT, 2 PiB of disk with 2 MiB blocks; vhd-util stops at 2 TiB). */
#define VHD_MIN_BLOCK 512u
#define VHD_MAX_BLOCK (256u << 20)
#define VHD_MAX_BAT_ENTRIES (1u << 24)
#define VHD_MAX_SIZE (1ULL << 50)
#define VHD_NLOC 8
#define VHD_MAX_LOCATOR 4096u /* bytes of one parent locator's data (a path) */

/* Footer field offsets. */
#define VF_COOKIE 0
#define VF_FEATURES 8
#define VF_VERSION 12
#define VF_DATA_OFFSET 16
#define VF_TIMESTAMP 24
#define VF_CREATOR_APP 28
#define VF_ORIG_SIZE 40
#define VF_CUR_SIZE 48
#define VF_GEOMETRY 56
#define VF_TYPE 60
#define VF_CHECKSUM 64
#define VF_UUID 68
/* Dynamic header field offsets. */
#define VH_COOKIE 0
#define VH_DATA_OFFSET 8
#define VH_TABLE_OFFSET 16
#define VH_VERSION 24
#define VH_MAX_ENTRIES 28
#define VH_BLOCK_SIZE 32
#define VH_CHECKSUM 36
#define VH_PARENT_UUID 40
#define VH_PARENT_TS 56
#define VH_PARENT_NAME 64 /* 512 bytes, UTF-16BE */
#define VH_LOCATORS 576   /* 8 entries of 24 bytes */

struct vhd {
    int fd;
    int ro;
    struct xb_image img;
    pthread_mutex_t lock;
    char path[4096];
    unsigned type;
    uint8_t footer[VHD_FOOTER_LEN]; /* the footer as on disk (checksum valid) */
    uint8_t uuid[16];
    uint64_t footer_off; /* where the footer is now: the file's last 512 bytes */
    /* dynamic and differencing */
    uint64_t header_off;
    uint64_t bat_off;
    uint32_t bat_entries;
    uint32_t *bat; /* host byte order; sector offsets or VHD_BAT_FREE */
    uint32_t block_size;
    unsigned block_bits;
    uint32_t bitmap_len;  /* bytes of a block's sector bitmap, a multiple of 512 */
    uint64_t data_start;  /* first byte after the header and the BAT: blocks lie from here on */
    uint8_t *full;        /* a bit per block: its bitmap is known to be all ones (fast path) */
    uint8_t *bmbuf;       /* one bitmap, scratch (under lock) */
    uint8_t *bat_dirty;   /* a bit per 512-byte BAT sector whose entries the next flush writes */
    int any_dirty;
    int meta_wt; /* XB_OPEN_WRITETHROUGH_META: BAT entries written at allocation */
    /* New dynamic blocks whose all-ones bitmap the next flush writes (before the BAT entries that
     * publish them): an allocation then costs the footer and the data, not a third write. */
    uint64_t *pend_bm;
    size_t npend_bm, cap_pend_bm;
    uint8_t parent_uuid[16];
    uint32_t parent_ts;
    struct xb_image *parent; /* differencing: the parent image (owned), opened read-only */
    char parent_name[XB_PATHLEN]; /* the path the parent resolved to */
};

static inline struct vhd *VH(struct xb_image *img) { return img->priv; }

static inline uint64_t vhd_be64(const uint8_t *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}
static inline uint32_t vhd_be32(const uint8_t *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}
static inline void vhd_put_be32(uint8_t *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    __builtin_memcpy(p, &v, 4);
}

/* The one's complement of the byte sum, the checksum field counted as zero. */
uint32_t vhd_checksum(const uint8_t *b, size_t len, size_t csum_off);
/* Opens the parent of a differencing disk through the caller's backing callback (vhd_parent.c). */
int vhd_open_parent(struct vhd *v, const uint8_t *hdr, unsigned flags, int depth, xb_backing_fn backing, void *ctx,
                    char *err);
extern const struct xb_image_ops xb_vhd_ops;
/* The host byte offset of block b's bitmap, or 0 if unallocated; -EINVAL if the BAT entry points
 * outside the blocks' area (checked here, at each use, as well as at open). */
int64_t vhd_block_off(struct vhd *v, uint32_t b);
#endif
