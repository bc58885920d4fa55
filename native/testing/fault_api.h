/* Test-only fault injection (fault.c, the module tests._xbfault): a wrapper image that forwards to
 * `inner` (and owns it: closing the wrapper closes it) and fails the ops matching a rule with -err.
 * Built apart from xenblk._storage so that the product cannot reach it; its Python face is
 * tests/fixtures/fault_image.py. */
#ifndef XB_FAULT_API_H
#define XB_FAULT_API_H
#include <stdint.h>
struct xb_image;
#define XB_FAULT_READ 0x1
#define XB_FAULT_WRITE 0x2 /* pwritev and write_zeroes */
#define XB_FAULT_FLUSH 0x4
#define XB_FAULT_DISCARD 0x8
#define XB_FAULT_ALL 0xf
#define XB_FAULT_MAX_RULES 16
struct xb_image *xb_fault_wrap(struct xb_image *inner);
/* A rule over [off, off+len) (len 0: to the end): the first `after` matching calls pass, the next
 * `count` fail (0: all). Returns the rule's index, or -EINVAL / -ENOSPC (too many rules). */
int xb_fault_add(struct xb_image *img, unsigned ops, int err, uint64_t off, uint64_t len, uint64_t after,
                 uint64_t count);
/* How many calls rule `rule` has failed so far. */
int64_t xb_fault_hits(struct xb_image *img, int rule);
int xb_fault_clear(struct xb_image *img);
#endif
