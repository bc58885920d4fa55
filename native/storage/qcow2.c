#include "storage_int.h"
#include <errno.h>
struct xb_image *xb_qcow2_open(const char *path, unsigned flags, int depth, char *err) { (void)flags; (void)depth; xb_seterr(err, "%s: qcow2 not yet supported", path); return NULL; }
int xb_qcow2_check(struct xb_image *img, struct xb_check_result *out, char *err) { (void)img; (void)out; (void)err; return -ENOSYS; }
int xb_qcow2_describe(struct xb_image *img, struct xb_image_desc *d) { (void)img; (void)d; return 0; }
struct xb_image *xb_image_backing(struct xb_image *img) { (void)img; return NULL; }
