/* The parent of a differencing VHD: its name from the header's parent locators, opened through the
 * caller's backing callback (the same one, and so the same rules, as a qcow2 backing file: xenblk
 * accepts only regular files beneath storage.backing_dirs, no symlinks), its footer's unique id
 * checked against the one the child recorded, the chain's depth bounded.
 *
 * Locators as the writers in use make them: W2ru (relative path) and W2ku (absolute path) in
 * UTF-16LE with backslashes (vhd-util, Hyper-V, libvhdi), MacX as a UTF-8 file:// URL (vhd-util).
 * Relative names are tried first (an image set copied elsewhere still resolves), then absolute
 * ones, then the header's parent name (UTF-16BE) beside the child. A Windows drive path is skipped. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vhd.h"

#define PLAT_W2RU 0x57327275u
#define PLAT_W2KU 0x57326b75u
#define PLAT_MACX 0x4d616358u

/* UTF-16 (le: little-endian) of n units to UTF-8 in out (cap bytes); stops at a NUL unit (writers
 * pad). Returns the length, or -1 for an unpaired surrogate or no room. */
static int utf16_to_utf8(const uint8_t *in, size_t n, int le, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = le ? (uint32_t)(in[2 * i] | in[2 * i + 1] << 8) : (uint32_t)(in[2 * i] << 8 | in[2 * i + 1]);
        if (c == 0)
            break;
        if (c >= 0xd800 && c < 0xdc00) {
            if (++i >= n)
                return -1;
            uint32_t lo = le ? (uint32_t)(in[2 * i] | in[2 * i + 1] << 8) : (uint32_t)(in[2 * i] << 8 | in[2 * i + 1]);
            if (lo < 0xdc00 || lo >= 0xe000)
                return -1;
            c = 0x10000 + ((c - 0xd800) << 10) + (lo - 0xdc00);
        } else if (c >= 0xdc00 && c < 0xe000) {
            return -1;
        }
        uint8_t u[4];
        size_t k;
        if (c < 0x80) {
            u[0] = (uint8_t)c;
            k = 1;
        } else if (c < 0x800) {
            u[0] = (uint8_t)(0xc0 | c >> 6), u[1] = (uint8_t)(0x80 | (c & 0x3f));
            k = 2;
        } else if (c < 0x10000) {
            u[0] = (uint8_t)(0xe0 | c >> 12), u[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3f));
            u[2] = (uint8_t)(0x80 | (c & 0x3f));
            k = 3;
        } else {
            u[0] = (uint8_t)(0xf0 | c >> 18), u[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3f));
            u[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3f)), u[3] = (uint8_t)(0x80 | (c & 0x3f));
            k = 4;
        }
        if (o + k >= cap)
            return -1;
        memcpy(out + o, u, k);
        o += k;
    }
    out[o] = 0;
    return (int)o;
}

/* A locator's bytes to a path the callback can judge: backslashes to slashes, a file:// prefix
 * dropped. 0, or -1 if it names nothing usable here (empty, a NUL inside, a drive letter). */
static int locator_path(uint32_t code, const uint8_t *data, size_t len, char *out, size_t cap)
{
    if (code == PLAT_MACX) {
        if (len >= cap || memchr(data, 0, len))
            return -1;
        memcpy(out, data, len);
        out[len] = 0;
        if (!strncmp(out, "file://", 7))
            memmove(out, out + 7, len - 7 + 1);
    } else if (utf16_to_utf8(data, len / 2, 1, out, cap) < 0) {
        return -1;
    }
    for (char *p = out; *p; p++)
        if (*p == '\\')
            *p = '/';
    if (!out[0] || (out[1] == ':' && ((out[0] | 0x20) >= 'a' && (out[0] | 0x20) <= 'z')))
        return -1;
    return 0;
}

/* Opens `name` as the parent of v: the callback judges and opens it; it must be a regular file,
 * a VHD whose footer carries the unique id v recorded. 0, or -errno with err set; *opened once the
 * callback gave a file: then its verdict is final (trying the other names of a disk that fails
 * deeper down would retry its whole chain for each, exponentially in the chain's depth). */
static int try_parent(struct vhd *v, const char *name, unsigned flags, int depth, xb_backing_fn backing, void *ctx,
                      int *opened, char *err)
{
    char sub[XB_ERRLEN], resolved[XB_PATHLEN];
    int fd = xb_backing_open(v->path, name, "vhd", backing, ctx, resolved, err);
    if (fd < 0)
        return fd; /* nothing opened, nothing nested: the next name may be tried */
    *opened = 1;
    unsigned pflags = XB_OPEN_RDONLY | (flags & XB_OPEN_WRITETHROUGH_META);
    struct xb_image *p = xb_vhd_open_fd(fd, resolved, pflags, depth + 1, backing, ctx, sub);
    if (!p) {
        xb_seterr(err, "%s", sub); /* it names its image already */
        return -EIO;
    }
    if (memcmp(VH(p)->uuid, v->parent_uuid, 16)) {
        xb_seterr(err, "%s: parent %s has another unique id than the one this disk was made from", v->path,
                  resolved);
        p->ops->close(p);
        return -ESTALE;
    }
    v->parent = p;
    snprintf(v->parent_name, sizeof(v->parent_name), "%s", resolved);
    return 0;
}

int vhd_open_parent(struct vhd *v, const uint8_t *hdr, unsigned flags, int depth, xb_backing_fn backing, void *ctx,
                    char *err)
{
    if (!backing) {
        xb_seterr(err, "%s: is a differencing disk but parent images are not allowed here", v->path);
        return -EPERM;
    }
    if (depth + 1 >= XB_MAX_BACKING_DEPTH) {
        xb_seterr(err, "parent chain deeper than %d (a loop?) at %s", XB_MAX_BACKING_DEPTH, v->path);
        return -ELOOP;
    }
    static const uint32_t order[] = {PLAT_W2RU, PLAT_MACX, PLAT_W2KU};
    char name[VHD_MAX_LOCATOR * 2];
    uint8_t *data = malloc(VHD_MAX_LOCATOR);
    if (!data) {
        xb_seterr(err, "out of memory");
        return -ENOMEM;
    }
    int rc = -ENOENT, tried = 0, opened = 0;
    for (unsigned k = 0; k < sizeof(order) / sizeof(order[0]) && rc && !opened; k++) {
        for (unsigned i = 0; i < VHD_NLOC && rc && !opened; i++) {
            const uint8_t *e = hdr + VH_LOCATORS + 24 * i;
            if (vhd_be32(e) != order[k])
                continue;
            uint32_t len = vhd_be32(e + 8);
            uint64_t off = vhd_be64(e + 16);
            /* the locator's data lies in the file, before the footer, and is a sane path's length */
            if (!len || len > VHD_MAX_LOCATOR || off < VHD_FOOTER_LEN || off > v->footer_off ||
                len > v->footer_off - off || xb_pread_full(v->fd, data, len, off) < 0 ||
                locator_path(order[k], data, len, name, sizeof(name)))
                continue;
            tried = 1;
            rc = try_parent(v, name, flags, depth, backing, ctx, &opened, err);
        }
    }
    if (rc && !opened && utf16_to_utf8(hdr + VH_PARENT_NAME, 256, 0, name, sizeof(name)) > 0 && !strchr(name, '\\') &&
        !strchr(name, '/')) {
        tried = 1;
        rc = try_parent(v, name, flags, depth, backing, ctx, &opened, err);
    }
    free(data);
    if (rc && !tried)
        xb_seterr(err, "%s: differencing disk without a usable parent locator", v->path);
    return rc;
}
