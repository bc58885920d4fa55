/* Issue 14 item 2 under ASan/UBSan: a qcow2 image file never grows past virtual size + metadata
 * + a small slack, whatever a guest does without flushing. Clusters with direct I/O in flight
 * (map()ped, not unmapped) cannot be reused when they are discarded, so a guest racing its own
 * I/O against discards is the one way to hold frees back: it must get EDQUOT at the bound, and
 * its clusters back (and `qemu-img check` clean) once the I/O is over. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_api.h"

#define CS 65536u
#define VSIZE (1u << 20)
#define ROUNDS 400

static char dir[] = "/tmp/xb-qcow2-bounds-XXXXXX";

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "test_qcow2_bounds: %s:%d: ", __FILE__, __LINE__);                                        \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fputc('\n', stderr);                                                                                       \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static uint64_t file_size(const char *path)
{
    struct stat st;
    CHECK(stat(path, &st) == 0, "stat %s", path);
    return (uint64_t)st.st_size;
}

static void pinned_discard_loop(unsigned flags)
{
    char path[256], cmd[512], err[XB_ERRLEN];
    snprintf(path, sizeof(path), "%s/pin-%u.qcow2", dir, flags);
    snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 -o cluster_size=%u %s %u", CS, path, VSIZE);
    CHECK(system(cmd) == 0, "%s", cmd);
    struct xb_image *img = xb_image_open(path, XB_FMT_QCOW2, flags, err);
    CHECK(img, "open: %s", err);
    static struct xb_extent ext[ROUNDS];
    static uint8_t buf[CS];
    unsigned pinned = 0;
    ssize_t w = 0;
    for (unsigned k = 0; k < ROUNDS; k++) {
        memset(buf, (int)k, sizeof(buf));
        w = xb_image_write(img, buf, CS, 0);
        if (w < 0)
            break;
        CHECK(img->ops->map(img, 0, CS, 1, &ext[pinned]) == 1, "map of an allocated cluster");
        pinned++;
        CHECK(xb_image_discard(img, 0, CS, 0) == 0, "discard");
    }
    CHECK(w == -EDQUOT, "after %u pinned clusters the write returned %zd, not EDQUOT", pinned, w);
    /* virtual size + header/L1/L2/refcounts (a few clusters) + the reserve of metadata write-through
     * (64 clusters) + the slack (8): the driver's bound is ~99 clusters here */
    uint64_t bound = VSIZE + (64u + 24u) * CS;
    CHECK(file_size(path) <= bound, "the file grew to %llu bytes (bound %llu)", (unsigned long long)file_size(path),
          (unsigned long long)bound);
    CHECK(pinned > VSIZE / CS, "only %u clusters before the bound", pinned);
    /* The I/O is over: the discarded clusters come back without a guest flush. */
    for (unsigned i = 0; i < pinned; i++)
        img->ops->unmap(img, &ext[i]);
    memset(buf, 0x5a, sizeof(buf));
    for (unsigned k = 0; k < 3 * VSIZE / CS; k++) {
        w = xb_image_write(img, buf, CS, (uint64_t)(k % (VSIZE / CS)) * CS);
        CHECK(w == CS, "write after the I/O ended: %zd", w);
    }
    CHECK(file_size(path) <= bound, "the file grew to %llu bytes", (unsigned long long)file_size(path));
    xb_image_close(img);
    snprintf(cmd, sizeof(cmd), "qemu-img check -q %s", path);
    CHECK(system(cmd) == 0, "qemu-img check %s not clean", path);
}

int main(void)
{
    CHECK(mkdtemp(dir), "mkdtemp");
    pinned_discard_loop(0);
    pinned_discard_loop(XB_OPEN_WRITETHROUGH_META);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        return 1;
    printf("test_qcow2_bounds: ok\n");
    return 0;
}
