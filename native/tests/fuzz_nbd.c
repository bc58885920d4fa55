/*
 * libFuzzer target: the NBD server (native/nbd/) against a hostile client.
 *
 * 1. Every 28-byte window of the input, and the input as NBD_OPT_GO data, through the pure checks
 *    (xb_nbd_check_request, xb_nbd_parse_go) under limits taken from the input: an accepted request
 *    must fit everything the server relies on (range, alignment, payload bound, read-only).
 * 2. The input as a client's byte stream into the real server (handshake, then requests, 2 worker
 *    threads) over a socketpair, on a 1 MiB raw image in a memfd; a thread feeds the input and drains
 *    the replies. Beyond "no crash, no hang": the image never grows (nothing is written past the end),
 *    and a read-only export never changes a byte of it.
 *
 * Input: [0] bit0 read-only export, [1..] the client's stream (4 bytes of client flags, options, ...).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include "nbd_api.h"
#include "nbd_proto.h"
#include "storage_api.h"

#define IMG_SIZE (1u << 20)

static void check(int cond)
{
    if (!cond)
        abort();
}

static void check_pure(const uint8_t *data, size_t size)
{
    if (size < 8)
        return;
    struct xb_nbd_limits lim = {
        .size = xb_be64(data) >> (data[0] & 31),
        .min_block = 1u << (data[1] % 13),
        .max_payload = XB_NBD_MAX_PAYLOAD,
        .tflags = xb_be16(data + 2),
    };
    for (size_t i = 0; i + XB_NBD_REQ_LEN <= size; i++) {
        struct xb_nbd_req r;
        uint32_t err, skip;
        enum xb_nbd_verdict v = xb_nbd_check_request(data + i, &lim, &r, &err, &skip);
        check(v != XB_NBD_SERVE || err == 0);
        check(v == XB_NBD_SERVE || v == XB_NBD_DROP || err != 0);
        check(skip <= lim.max_payload);
        if (v != XB_NBD_SERVE || r.type == NBD_CMD_DISC || r.type == NBD_CMD_FLUSH)
            continue;
        check(r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE || r.type == NBD_CMD_TRIM ||
              r.type == NBD_CMD_WRITE_ZEROES);
        check(r.len > 0 && r.off <= lim.size && r.len <= lim.size - r.off);
        check(r.off % lim.min_block == 0 && r.len % lim.min_block == 0);
        check(r.type == NBD_CMD_READ || !(lim.tflags & NBD_FLAG_READ_ONLY));
        check((r.type != NBD_CMD_READ && r.type != NBD_CMD_WRITE) || r.len <= lim.max_payload);
    }
    struct xb_nbd_go go;
    if (size <= UINT32_MAX && xb_nbd_parse_go(data, (uint32_t)size, &go) == 0)
        check(6 + (uint64_t)go.namelen + 2 * (uint64_t)go.ninfo == size && go.name == data + 4);
}

struct feed {
    int fd;
    const uint8_t *data;
    size_t size;
};

/* Writes the stream while reading whatever comes back, so neither side can block the other. */
static void *feeder(void *arg)
{
    struct feed *f = arg;
    static uint8_t sink[1 << 16];
    size_t off = 0;
    int wr_open = 1;
    for (;;) {
        if (wr_open && off == f->size) {
            shutdown(f->fd, SHUT_WR);
            wr_open = 0;
        }
        struct pollfd p = {.fd = f->fd, .events = POLLIN | (wr_open ? POLLOUT : 0)};
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            break;
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(f->fd, sink, sizeof(sink), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                break; /* the server closed: done */
        }
        if (wr_open && (p.revents & POLLOUT)) {
            ssize_t n = send(f->fd, f->data + off, f->size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0)
                off += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != EINTR)
                wr_open = 0; /* the server stopped reading: only drain now */
        }
    }
    return NULL;
}

static struct xb_image *img;
static int img_fd = -1;
static uint8_t *before;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_pure(data, size);
    if (size < 1)
        return 0;
    if (!img) {
        img_fd = memfd_create("nbd-fuzz", MFD_CLOEXEC);
        check(img_fd >= 0 && ftruncate(img_fd, IMG_SIZE) == 0);
        char err[XB_ERRLEN];
        img = xb_image_open_fd(dup(img_fd), "nbd-fuzz", XB_FMT_RAW, 0, NULL, NULL, err);
        check(img != NULL);
        before = malloc(IMG_SIZE);
        check(before != NULL);
    }
    int readonly = data[0] & 1;
    check(pread(img_fd, before, IMG_SIZE, 0) == IMG_SIZE);
    char err[XB_ERRLEN];
    struct xb_nbd_export *e = xb_nbd_export_new(img, readonly, 4, err);
    check(e != NULL);
    int sv[2];
    check(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    struct feed f = {sv[1], data + 1, size - 1};
    pthread_t th;
    check(pthread_create(&th, NULL, feeder, &f) == 0);
    xb_nbd_serve_fd(e, sv[0], 2);
    pthread_join(th, NULL);
    close(sv[1]);
    xb_nbd_export_free(e);
    struct stat st;
    check(fstat(img_fd, &st) == 0 && st.st_size == IMG_SIZE);
    if (readonly) {
        uint8_t *now = malloc(IMG_SIZE);
        check(now && pread(img_fd, now, IMG_SIZE, 0) == IMG_SIZE && memcmp(now, before, IMG_SIZE) == 0);
        free(now);
    }
    return 0;
}
