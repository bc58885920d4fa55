/* VHD guest I/O: the BAT and the per-block sector bitmaps, reads (through the parent chain for a
 * differencing disk), writes, block allocation, the ordered flush, discard, the fast-path map.
 *
 * Allocation and ordering. A new block goes where the footer was; the footer moves first: the
 * footer at the new end, then data, the block's bitmap over the old footer (a dynamic block's, all
 * ones, at the next flush; a differencing block's at once, its bits follow each write), and the BAT
 * entry (the only thing that makes the block part of the disk) only at the next flush, after an
 * fdatasync of all of that: data -> bitmap -> BAT, and the file's last 512 bytes are a valid footer
 * after every single write. A process killed anywhere leaves a readable image whose BAT points only
 * at complete blocks (at worst a block's worth of unreferenced space at the end); a power loss
 * loses nothing flushed. A write into an allocated block puts its data first and sets its bitmap
 * bits after, so a sector reads as its old content until both are there.
 * XB_OPEN_WRITETHROUGH_META writes the BAT entry at once (page cache, no sync: what the daemon uses
 * when its journal replays acknowledged writes after a kill -9, which the page cache survives). */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vhd.h"

void xb_vhd_close_impl(struct xb_image *img);

static int is_full(struct vhd *v, uint32_t b) { return v->full[b >> 3] >> (b & 7) & 1; }
static void set_full(struct vhd *v, uint32_t b, int on)
{
    if (on)
        v->full[b >> 3] |= (uint8_t)(1u << (b & 7));
    else
        v->full[b >> 3] &= (uint8_t)~(1u << (b & 7));
}
/* The bitmap's bit order is big-endian: sector 0 is the top bit of byte 0. */
static int bit(const uint8_t *bm, uint64_t s) { return bm[s >> 3] >> (7 - (s & 7)) & 1; }

int64_t vhd_block_off(struct vhd *v, uint32_t b)
{
    if (b >= v->bat_entries)
        return -EINVAL;
    uint32_t e = v->bat[b];
    if (e == VHD_BAT_FREE)
        return 0;
    uint64_t o = (uint64_t)e * VHD_SECTOR;
    if (o < VHD_FOOTER_LEN || o + v->bitmap_len + v->block_size > v->footer_off)
        return -EIO;
    return (int64_t)o;
}

static int load_bitmap(struct vhd *v, uint64_t bo)
{
    ssize_t r = xb_pread_known(v->fd, v->bmbuf, v->bitmap_len, bo, v->footer_off + VHD_FOOTER_LEN);
    return r < 0 ? (int)r : 0;
}

static int bitmap_all_ones(struct vhd *v)
{
    uint64_t sectors = v->block_size / VHD_SECTOR;
    for (uint64_t i = 0; i < sectors / 8; i++)
        if (v->bmbuf[i] != 0xff)
            return 0;
    for (uint64_t s = sectors / 8 * 8; s < sectors; s++)
        if (!bit(v->bmbuf, s))
            return 0;
    return 1;
}

/* What lies under the disk at pos: the parent's data (zeros past its end), or zeros. */
static int read_below(struct vhd *v, uint8_t *buf, size_t len, uint64_t pos)
{
    size_t n = 0;
    if (v->parent && pos < v->parent->size) {
        n = v->parent->size - pos < len ? (size_t)(v->parent->size - pos) : len;
        struct iovec iov = {buf, n};
        ssize_t r = v->parent->ops->preadv(v->parent, &iov, 1, pos);
        if (r < 0)
            return (int)r;
    }
    memset(buf + n, 0, len - n);
    return 0;
}

static int read_data(struct vhd *v, uint8_t *buf, size_t len, uint64_t host)
{
    ssize_t r = xb_pread_known(v->fd, buf, len, host, v->footer_off + VHD_FOOTER_LEN);
    return r < 0 ? (int)r : 0;
}

/* n bytes at byte `in` of block b (within the block). Lock held. */
static int read_chunk(struct vhd *v, uint32_t b, uint64_t in, uint8_t *buf, size_t n)
{
    uint64_t pos = ((uint64_t)b << v->block_bits) + in;
    int64_t bo = vhd_block_off(v, b);
    if (bo < 0)
        return (int)bo;
    if (!bo)
        return read_below(v, buf, n, pos);
    uint64_t data = (uint64_t)bo + v->bitmap_len;
    if (is_full(v, b))
        return read_data(v, buf, n, data + in);
    int r = load_bitmap(v, (uint64_t)bo);
    if (r)
        return r;
    if (bitmap_all_ones(v)) {
        set_full(v, b, 1);
        return read_data(v, buf, n, data + in);
    }
    /* runs of sectors in the block (bit set) or below it (bit clear) */
    uint64_t p = in, end = in + n;
    while (p < end) {
        int on = bit(v->bmbuf, p / VHD_SECTOR);
        uint64_t q = p;
        while (q < end && bit(v->bmbuf, q / VHD_SECTOR) == on)
            q = (q / VHD_SECTOR + 1) * VHD_SECTOR;
        if (q > end)
            q = end;
        r = on ? read_data(v, buf + (p - in), (size_t)(q - p), data + p)
               : read_below(v, buf + (p - in), (size_t)(q - p), pos + (p - in));
        if (r)
            return r;
        p = q;
    }
    return 0;
}

static int write_bat_range(struct vhd *v, uint32_t first, uint32_t last)
{
    uint8_t buf[VHD_SECTOR];
    uint32_t cnt = last - first;
    for (uint32_t i = 0; i < cnt; i++)
        vhd_put_be32(buf + 4 * i, v->bat[first + i]);
    ssize_t r = xb_pwrite_full(v->fd, buf, (size_t)cnt * 4, v->bat_off + (uint64_t)first * 4);
    return r < 0 ? (int)r : 0;
}

/* The BAT's 512-byte sector holding entry b, written now. */
static int write_bat_sector(struct vhd *v, uint32_t b)
{
    uint32_t first = b / 128 * 128, last = first + 128 < v->bat_entries ? first + 128 : v->bat_entries;
    return write_bat_range(v, first, last);
}

#define VHD_PEND_MAX 4096 /* new blocks between flushes before the driver flushes by itself */

static int flush_locked(struct vhd *v);

static int allocate(struct vhd *v, uint32_t b, int64_t *bo)
{
    if (v->npend_bm >= VHD_PEND_MAX) {
        int r = flush_locked(v); /* a guest that never flushes: bound what waits for one */
        if (r)
            return r;
    }
    if (v->npend_bm == v->cap_pend_bm) {
        size_t cap = v->cap_pend_bm ? 2 * v->cap_pend_bm : 64;
        uint64_t *p = realloc(v->pend_bm, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        v->pend_bm = p;
        v->cap_pend_bm = cap;
    }
    uint64_t e = v->footer_off, span = (uint64_t)v->bitmap_len + v->block_size;
    if (e % VHD_SECTOR || e / VHD_SECTOR >= VHD_BAT_FREE)
        return -EFBIG; /* a BAT entry is a 32-bit sector number */
    uint64_t nf = e + span;
    ssize_t r = xb_pwrite_full(v->fd, v->footer, VHD_FOOTER_LEN, nf);
    if (r < 0)
        return (int)r;
    /* A dynamic block's data area lies past the old end of the file and reads as zeros: every
     * sector is valid at once, its bitmap all ones (written by the next flush; until then nothing
     * reads it: the block is marked full). A differencing block's sectors come from the parent
     * until written: its bitmap starts all zeros, now, as each write reads and updates it. */
    if (v->type == VHD_TYPE_DYNAMIC && !v->meta_wt) {
        v->pend_bm[v->npend_bm++] = e;
    } else {
        memset(v->bmbuf, v->type == VHD_TYPE_DYNAMIC ? 0xff : 0, v->bitmap_len);
        r = xb_pwrite_full(v->fd, v->bmbuf, v->bitmap_len, e);
        if (r < 0)
            return (int)r;
    }
    v->footer_off = nf;
    v->bat[b] = (uint32_t)(e / VHD_SECTOR);
    set_full(v, b, v->type == VHD_TYPE_DYNAMIC);
    *bo = (int64_t)e;
    if (v->meta_wt)
        return write_bat_sector(v, b);
    v->bat_dirty[b / 128 / 8] |= (uint8_t)(1u << (b / 128 % 8));
    v->any_dirty = 1;
    return 0;
}

/* n bytes at byte `in` of block b. Lock held. */
static int write_chunk(struct vhd *v, uint32_t b, uint64_t in, const uint8_t *buf, size_t n)
{
    uint64_t a0 = in / VHD_SECTOR * VHD_SECTOR, a1 = (in + n + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    uint8_t *tmp = NULL;
    int r = 0;
    if (a0 != in || a1 != in + n) {
        /* whole sectors only: the bitmap says where a sector is, not part of one */
        tmp = malloc((size_t)(a1 - a0));
        if (!tmp)
            return -ENOMEM;
        if (a0 != in)
            r = read_chunk(v, b, a0, tmp, VHD_SECTOR);
        if (!r && a1 != in + n && (a1 - a0 > VHD_SECTOR || a0 == in))
            r = read_chunk(v, b, a1 - VHD_SECTOR, tmp + (a1 - VHD_SECTOR - a0), VHD_SECTOR);
        if (r)
            goto out;
        memcpy(tmp + (in - a0), buf, n);
        buf = tmp;
    }
    int64_t bo = vhd_block_off(v, b);
    if (bo < 0) {
        r = (int)bo;
        goto out;
    }
    if (!bo && (r = allocate(v, b, &bo)))
        goto out;
    ssize_t w = xb_pwrite_full(v->fd, buf, (size_t)(a1 - a0), (uint64_t)bo + v->bitmap_len + a0);
    if (w < 0) {
        r = (int)w;
        goto out;
    }
    if (is_full(v, b))
        goto out;
    if ((r = load_bitmap(v, (uint64_t)bo)))
        goto out;
    uint64_t s0 = a0 / VHD_SECTOR, s1 = a1 / VHD_SECTOR, lo = UINT64_MAX, hi = 0;
    for (uint64_t s = s0; s < s1; s++) {
        if (bit(v->bmbuf, s))
            continue;
        v->bmbuf[s >> 3] |= (uint8_t)(0x80u >> (s & 7));
        lo = lo < (s >> 3) ? lo : (s >> 3);
        hi = (s >> 3) + 1;
    }
    if (hi) {
        /* the bitmap's changed 512-byte sectors */
        lo = lo / VHD_SECTOR * VHD_SECTOR;
        hi = (hi + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
        w = xb_pwrite_full(v->fd, v->bmbuf + lo, (size_t)(hi - lo), (uint64_t)bo + lo);
        if (w < 0) {
            r = (int)w;
            goto out;
        }
    }
    if (bitmap_all_ones(v))
        set_full(v, b, 1);
out:
    free(tmp);
    return r;
}

static ssize_t fixed_rw(struct vhd *v, const struct iovec *iov, int iovcnt, uint64_t off, int write)
{
    size_t total = xb_iov_len(iov, iovcnt), done = 0;
    for (int i = 0; i < iovcnt; i++) {
        ssize_t r = write ? xb_pwrite_full(v->fd, iov[i].iov_base, iov[i].iov_len, off + done)
                          : xb_pread_known(v->fd, iov[i].iov_base, iov[i].iov_len, off + done,
                                           v->footer_off + VHD_FOOTER_LEN);
        if (r < 0)
            return r;
        done += iov[i].iov_len;
    }
    return (ssize_t)total;
}

static ssize_t vhd_rw(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off, int write)
{
    struct vhd *v = VH(img);
    size_t total = xb_iov_len(iov, iovcnt);
    if (off > img->size || total > img->size - off)
        return -EINVAL;
    if (write && v->ro)
        return -EROFS;
    if (v->type == VHD_TYPE_FIXED)
        return fixed_rw(v, iov, iovcnt, off, write);
    uint8_t *flat = iovcnt == 1 ? iov[0].iov_base : malloc(total ? total : 1);
    if (!flat)
        return -ENOMEM;
    if (write && iovcnt != 1)
        xb_iov_to_buf(iov, iovcnt, 0, flat, total);
    int r = 0;
    pthread_mutex_lock(&v->lock);
    for (size_t done = 0; done < total && !r;) {
        uint64_t pos = off + done, in = pos & (v->block_size - 1);
        uint32_t b = (uint32_t)(pos >> v->block_bits);
        size_t n = total - done < v->block_size - in ? total - done : (size_t)(v->block_size - in);
        r = write ? write_chunk(v, b, in, flat + done, n) : read_chunk(v, b, in, flat + done, n);
        done += n;
    }
    pthread_mutex_unlock(&v->lock);
    if (!r && !write && iovcnt != 1)
        xb_buf_to_iov(iov, iovcnt, 0, flat, total);
    if (iovcnt != 1)
        free(flat);
    return r ? r : (ssize_t)total;
}

static ssize_t vhd_preadv(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return vhd_rw(img, iov, iovcnt, off, 0);
}

static ssize_t vhd_pwritev(struct xb_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return vhd_rw(img, iov, iovcnt, off, 1);
}

/* data and bitmaps durable, then the BAT entries that point at them, then durable again. */
static int flush_locked(struct vhd *v)
{
    if (v->npend_bm) {
        memset(v->bmbuf, 0xff, v->bitmap_len);
        for (size_t i = 0; i < v->npend_bm; i++) {
            ssize_t r = xb_pwrite_full(v->fd, v->bmbuf, v->bitmap_len, v->pend_bm[i]);
            if (r < 0)
                return (int)r;
        }
        v->npend_bm = 0;
    }
    if (fdatasync(v->fd))
        return -errno;
    if (!v->any_dirty)
        return 0;
    uint32_t nsec = (v->bat_entries + 127) / 128;
    for (uint32_t s = 0; s < nsec; s++) {
        if (!(v->bat_dirty[s / 8] >> (s % 8) & 1))
            continue;
        int r = write_bat_sector(v, s * 128);
        if (r)
            return r;
        v->bat_dirty[s / 8] &= (uint8_t)~(1u << (s % 8));
    }
    v->any_dirty = 0;
    return fdatasync(v->fd) ? -errno : 0;
}

static int vhd_flush(struct xb_image *img)
{
    struct vhd *v = VH(img);
    if (v->ro)
        return 0;
    pthread_mutex_lock(&v->lock);
    int r = flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

/* Zeros over [host, host+len) of the file: a hole where the file system can punch one. */
static int zero_host(struct vhd *v, uint64_t host, uint64_t len)
{
    if (!len)
        return 0;
    if (!fallocate(v->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)host, (off_t)len))
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    static const uint8_t z[65536];
    for (uint64_t d = 0; d < len;) {
        size_t n = len - d < sizeof(z) ? (size_t)(len - d) : sizeof(z);
        ssize_t r = xb_pwrite_full(v->fd, z, n, host + d);
        if (r < 0)
            return (int)r;
        d += n;
    }
    return 0;
}

/* The whole sectors of [off, off+len) read as zeros afterwards: a fixed disk punches the file, a
 * dynamic disk the data areas of allocated blocks (an unallocated block already reads as zeros, a
 * clear bitmap bit too), and no metadata changes, so no crash point can show anything else than
 * the old data or zeros. A differencing disk cannot: a hole in the child would show the parent. */
static int zero_sectors(struct vhd *v, uint64_t off, uint64_t len)
{
    uint64_t a0 = (off + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR, a1 = (off + len) / VHD_SECTOR * VHD_SECTOR;
    if (a0 >= a1)
        return 0;
    if (v->type == VHD_TYPE_FIXED)
        return zero_host(v, a0, a1 - a0);
    int r = 0;
    pthread_mutex_lock(&v->lock);
    for (uint64_t pos = a0; pos < a1 && !r;) {
        uint32_t b = (uint32_t)(pos >> v->block_bits);
        uint64_t in = pos & (v->block_size - 1), n = a1 - pos < v->block_size - in ? a1 - pos : v->block_size - in;
        int64_t bo = vhd_block_off(v, b);
        if (bo < 0)
            r = (int)bo;
        else if (bo)
            r = zero_host(v, (uint64_t)bo + v->bitmap_len + in, n);
        pos += n;
    }
    pthread_mutex_unlock(&v->lock);
    return r;
}

static int vhd_discard(struct xb_image *img, uint64_t off, uint64_t len, int secure)
{
    (void)secure;
    struct vhd *v = VH(img);
    if (v->ro)
        return -EROFS;
    if (off > img->size || len > img->size - off)
        return -EINVAL;
    /* Discard is a hint: a differencing disk keeps its data (never a parent's stale sectors). */
    if (v->type == VHD_TYPE_DIFF)
        return 0;
    return zero_sectors(v, off, len);
}

static int write_zero_bytes(struct xb_image *img, uint64_t off, uint64_t len)
{
    static const uint8_t z[65536];
    for (uint64_t d = 0; d < len;) {
        size_t n = len - d < sizeof(z) ? (size_t)(len - d) : sizeof(z);
        struct iovec iov = {(void *)z, n};
        ssize_t r = vhd_rw(img, &iov, 1, off + d, 1);
        if (r < 0)
            return (int)r;
        d += n;
    }
    return 0;
}

static int vhd_write_zeroes(struct xb_image *img, uint64_t off, uint64_t len)
{
    struct vhd *v = VH(img);
    if (v->ro)
        return -EROFS;
    if (off > img->size || len > img->size - off)
        return -EINVAL;
    if (v->type == VHD_TYPE_DIFF)
        return write_zero_bytes(img, off, len);
    uint64_t a0 = (off + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR, a1 = (off + len) / VHD_SECTOR * VHD_SECTOR;
    if (a0 >= a1)
        return write_zero_bytes(img, off, len);
    int r = write_zero_bytes(img, off, a0 - off);
    if (!r)
        r = zero_sectors(v, a0, a1 - a0);
    if (!r)
        r = write_zero_bytes(img, a1, off + len - a1);
    return r;
}

static int vhd_map(struct xb_image *img, uint64_t off, uint64_t len, int for_write, struct xb_extent *ext)
{
    struct vhd *v = VH(img);
    if (off >= img->size)
        return -EINVAL;
    if (for_write && v->ro)
        return -EROFS;
    uint64_t max = img->size - off;
    if (v->type == VHD_TYPE_FIXED) {
        ext->fd = v->fd;
        ext->host_off = off;
        ext->len = len < max ? len : max;
        ext->cookie = 0;
        return 1;
    }
    uint32_t b = (uint32_t)(off >> v->block_bits);
    uint64_t in = off & (v->block_size - 1);
    int ok = 0;
    pthread_mutex_lock(&v->lock);
    int64_t bo = vhd_block_off(v, b);
    if (bo > 0 && !is_full(v, b) && !load_bitmap(v, (uint64_t)bo) && bitmap_all_ones(v))
        set_full(v, b, 1);
    if (bo > 0 && is_full(v, b)) {
        /* every sector of the block is in it: a plain file range (blocks are never freed) */
        ext->fd = v->fd;
        ext->host_off = (uint64_t)bo + v->bitmap_len + in;
        ext->len = len < v->block_size - in ? len : v->block_size - in;
        if (ext->len > max)
            ext->len = max;
        ext->cookie = 0;
        ok = 1;
    }
    pthread_mutex_unlock(&v->lock);
    return bo < 0 ? (int)bo : ok;
}

static void vhd_unmap(struct xb_image *img, const struct xb_extent *ext) { (void)img, (void)ext; }

static int64_t vhd_refresh_size(struct xb_image *img) { return (int64_t)img->size; }

const struct xb_image_ops xb_vhd_ops = {
    .map = vhd_map,
    .unmap = vhd_unmap,
    .preadv = vhd_preadv,
    .pwritev = vhd_pwritev,
    .flush = vhd_flush,
    .discard = vhd_discard,
    .write_zeroes = vhd_write_zeroes,
    .refresh_size = vhd_refresh_size,
    .close = xb_vhd_close_impl,
};
