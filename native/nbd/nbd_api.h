/*
 * The NBD export of an open image (docs/DESIGN.md, "NBD export"): a unix socket served by C threads
 * that never take the GIL, on the very `struct xb_image` the data plane uses (its ops are
 * thread-safe), so the ring and NBD clients share one image object, one cache and one lock.
 */
#ifndef XB_NBD_API_H
#define XB_NBD_API_H
#include <stdint.h>
#include "xb_err.h"
#include "xb_storage.h"

#define XB_NBD_WORKERS 16 /* threads per connection: requests of one client in flight at once (nbdkit's default too) */

struct xb_nbd_stats {
    uint64_t connections;     /* accepted and served */
    uint64_t refused;         /* closed at once: max_clients were connected */
    uint64_t active;          /* connected now */
    uint64_t requests;        /* commands answered (DISC excluded) */
    uint64_t read_bytes;
    uint64_t written_bytes;
    uint64_t errors;          /* commands answered with an error (refused or failed in storage) */
    uint64_t protocol_errors; /* connections closed for a malformed handshake or request */
};

struct xb_nbd_export;

/* An export of img (which must outlive it); nothing listens yet. readonly: every write is refused
 * (EPERM) and NBD_FLAG_READ_ONLY is advertised, whatever the image allows. */
struct xb_nbd_export *xb_nbd_export_new(struct xb_image *img, int readonly, unsigned max_clients, char *err);
/* Binds `path` (a stale socket there is replaced; anything else is refused), mode 0600, and starts
 * the thread that accepts clients. */
int xb_nbd_export_listen(struct xb_nbd_export *e, const char *path, char *err);
/* Serves one client on fd in the calling thread plus workers-1 more, until it goes; closes fd.
 * (The listener runs this per client; the fuzzer calls it directly.) */
void xb_nbd_serve_fd(struct xb_nbd_export *e, int fd, unsigned workers);
void xb_nbd_export_get_stats(struct xb_nbd_export *e, struct xb_nbd_stats *out);
/* Stops accepting, disconnects every client, waits until no request is in storage, removes the
 * socket and frees. After it returns nothing touches the image any more. */
void xb_nbd_export_free(struct xb_nbd_export *e);
#endif
