/* The pure checks of what an NBD client sends (nbd_proto.h): request headers and NBD_OPT_GO/INFO data. */
#include "nbd_proto.h"

enum xb_nbd_verdict xb_nbd_check_request(const uint8_t h[XB_NBD_REQ_LEN], const struct xb_nbd_limits *lim,
                                         struct xb_nbd_req *r, uint32_t *err, uint32_t *skip)
{
    *err = 0;
    *skip = 0;
    if (xb_be32(h) != NBD_REQUEST_MAGIC)
        return XB_NBD_DROP;
    r->flags = xb_be16(h + 4);
    r->type = xb_be16(h + 6);
    r->cookie = xb_be64(h + 8);
    r->off = xb_be64(h + 16);
    r->len = xb_be32(h + 24);
    uint16_t allowed = 0, need = 0;
    int writes = 0;
    switch (r->type) {
    case NBD_CMD_DISC:
        return XB_NBD_SERVE;
    case NBD_CMD_READ:
        /* The spec: with NBD_FLAG_SEND_FUA the server MUST accept FUA on every command (clients are known
         * to set it on reads); a read writes nothing, so it is ignored. */
        allowed = NBD_CMD_FLAG_FUA;
        break;
    case NBD_CMD_WRITE:
        if (r->len > lim->max_payload) {
            *err = NBD_EINVAL; /* we will not read that much to stay in step: answer, then close */
            return XB_NBD_FATAL;
        }
        *skip = r->len;
        allowed = NBD_CMD_FLAG_FUA;
        writes = 1;
        break;
    case NBD_CMD_FLUSH:
        /* offset and length must be 0; Linux's nbd client has sent other values: ignore them. FUA as
         * on a read: accepted where advertised, and a flush is already one. */
        if ((r->flags & ~NBD_CMD_FLAG_FUA) || !(lim->tflags & NBD_FLAG_SEND_FLUSH) ||
            ((r->flags & NBD_CMD_FLAG_FUA) && !(lim->tflags & NBD_FLAG_SEND_FUA))) {
            *err = NBD_EINVAL;
            return XB_NBD_REFUSE;
        }
        return XB_NBD_SERVE;
    case NBD_CMD_TRIM:
        allowed = NBD_CMD_FLAG_FUA;
        need = NBD_FLAG_SEND_TRIM;
        writes = 1;
        break;
    case NBD_CMD_WRITE_ZEROES:
        allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
        need = NBD_FLAG_SEND_WRITE_ZEROES;
        writes = 1;
        break;
    default: /* CACHE, BLOCK_STATUS, RESIZE and unknown ones: none advertised, none carries a payload */
        *err = NBD_EINVAL;
        return XB_NBD_REFUSE;
    }
    if (writes && (lim->tflags & NBD_FLAG_READ_ONLY)) {
        *err = NBD_EPERM;
        return XB_NBD_REFUSE;
    }
    if ((r->flags & ~allowed) || (need && !(lim->tflags & need)) ||
        ((r->flags & NBD_CMD_FLAG_FUA) && !(lim->tflags & NBD_FLAG_SEND_FUA))) {
        *err = NBD_EINVAL;
        return XB_NBD_REFUSE;
    }
    if (r->len == 0 || (r->type == NBD_CMD_READ && r->len > lim->max_payload) || r->off % lim->min_block ||
        r->len % lim->min_block) {
        *err = NBD_EINVAL;
        return XB_NBD_REFUSE;
    }
    if (r->off > lim->size || r->len > lim->size - r->off) {
        /* the spec's choice: a write past the end is "no space", anything else "invalid" */
        *err = r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
        return XB_NBD_REFUSE;
    }
    return XB_NBD_SERVE;
}

int xb_nbd_parse_go(const uint8_t *data, uint32_t len, struct xb_nbd_go *out)
{
    out->want_name = 0;
    if (len < 6)
        return -1;
    out->namelen = xb_be32(data);
    if (out->namelen > len - 6)
        return -1;
    out->name = data + 4;
    out->ninfo = xb_be16(data + 4 + out->namelen);
    if ((uint64_t)len != 6 + (uint64_t)out->namelen + 2 * (uint64_t)out->ninfo)
        return -1;
    for (unsigned i = 0; i < out->ninfo; i++)
        if (xb_be16(data + 6 + out->namelen + 2 * i) == NBD_INFO_NAME)
            out->want_name = 1;
    return 0;
}
