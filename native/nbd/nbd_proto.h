/*
 * The NBD wire protocol as xenblk serves it (https://github.com/NetworkBlockDevice/nbd, doc/proto.md):
 * fixed newstyle handshake, simple replies. Everything here is pure: it checks bytes a client sent
 * and says what to answer, so it is unit-fuzzed on its own (native/tests/fuzz_nbd.c) and nbd.c only
 * moves bytes and calls the image.
 */
#ifndef XB_NBD_PROTO_H
#define XB_NBD_PROTO_H
#include <stdint.h>

#define NBD_MAGIC 0x4e42444d41474943ULL       /* "NBDMAGIC" */
#define NBD_IHAVEOPT 0x49484156454f5054ULL    /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ULL
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u

/* handshake flags (server) and client flags */
#define NBD_FLAG_FIXED_NEWSTYLE 0x1u
#define NBD_FLAG_NO_ZEROES 0x2u
#define NBD_FLAG_C_FIXED_NEWSTYLE 0x1u
#define NBD_FLAG_C_NO_ZEROES 0x2u

/* transmission flags */
#define NBD_FLAG_HAS_FLAGS 0x1u
#define NBD_FLAG_READ_ONLY 0x2u
#define NBD_FLAG_SEND_FLUSH 0x4u
#define NBD_FLAG_SEND_FUA 0x8u
#define NBD_FLAG_SEND_TRIM 0x20u
#define NBD_FLAG_SEND_WRITE_ZEROES 0x40u
#define NBD_FLAG_CAN_MULTI_CONN 0x100u

/* options */
#define NBD_OPT_EXPORT_NAME 1u
#define NBD_OPT_ABORT 2u
#define NBD_OPT_LIST 3u
#define NBD_OPT_INFO 6u
#define NBD_OPT_GO 7u

/* option replies */
#define NBD_REP_ACK 1u
#define NBD_REP_SERVER 2u
#define NBD_REP_INFO 3u
#define NBD_REP_ERR_UNSUP 0x80000001u
#define NBD_REP_ERR_INVALID 0x80000003u
#define NBD_REP_ERR_UNKNOWN 0x80000006u
#define NBD_REP_ERR_TOO_BIG 0x80000009u

#define NBD_INFO_EXPORT 0u
#define NBD_INFO_NAME 1u
#define NBD_INFO_BLOCK_SIZE 3u

/* commands and their flags */
#define NBD_CMD_READ 0u
#define NBD_CMD_WRITE 1u
#define NBD_CMD_DISC 2u
#define NBD_CMD_FLUSH 3u
#define NBD_CMD_TRIM 4u
#define NBD_CMD_WRITE_ZEROES 6u
#define NBD_CMD_FLAG_FUA 0x1u
#define NBD_CMD_FLAG_NO_HOLE 0x2u

/* error values on the wire (not the host's errno numbers, though Linux's are the same) */
#define NBD_EPERM 1u
#define NBD_EIO 5u
#define NBD_ENOMEM 12u
#define NBD_EINVAL 22u
#define NBD_ENOSPC 28u
#define NBD_ENOTSUP 95u

#define XB_NBD_REQ_LEN 28          /* a request header */
#define XB_NBD_OPT_HDR_LEN 16      /* IHAVEOPT, option, length */
#define XB_NBD_OPT_MAX 8192        /* option data we read: a 4096-byte name and the info requests */
#define XB_NBD_MAX_PAYLOAD (32u << 20) /* the largest READ/WRITE: what the spec says every client may assume */

static inline uint64_t xb_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}
static inline uint32_t xb_be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static inline uint16_t xb_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void xb_put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}
static inline void xb_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}
static inline void xb_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }

/* What the export allows a request, fixed for a connection except `size` (the image may shrink). */
struct xb_nbd_limits {
    uint64_t size;        /* bytes: min(the size told at the handshake, the image's now) */
    uint32_t min_block;   /* offsets and lengths must be multiples (O_DIRECT images), else 1 */
    uint32_t max_payload; /* READ/WRITE length bound */
    uint16_t tflags;      /* the transmission flags advertised */
};

struct xb_nbd_req {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t off;
    uint32_t len;
};

enum xb_nbd_verdict {
    XB_NBD_SERVE = 0, /* do it */
    XB_NBD_REFUSE,    /* answer *err; read and drop *skip payload bytes first; carry on */
    XB_NBD_FATAL,     /* answer *err, then close: the payload cannot be skipped safely */
    XB_NBD_DROP,      /* close without an answer: not a request (bad magic), the stream is lost */
};

/* Checks a request header against the limits. SERVE: the request fits everything advertised (range,
 * alignment, read-only, flags); for a WRITE its payload (len bytes) follows. */
enum xb_nbd_verdict xb_nbd_check_request(const uint8_t h[XB_NBD_REQ_LEN], const struct xb_nbd_limits *lim,
                                         struct xb_nbd_req *r, uint32_t *err, uint32_t *skip);

/* NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, u16 info types. */
struct xb_nbd_go {
    uint32_t namelen;
    const uint8_t *name;
    uint16_t ninfo;
    int want_name; /* NBD_INFO_NAME asked for */
};
/* 0, or -1 if the lengths do not add up exactly to len. */
int xb_nbd_parse_go(const uint8_t *data, uint32_t len, struct xb_nbd_go *out);

#endif
