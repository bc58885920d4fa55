/* Mutation test of the qcow2 driver under ASan/UBSan: images made by qemu-img,
 * metadata bytes flipped at random, then open/read/write/discard/flush/check.
 * Any out-of-bounds access or crash fails; errors from the driver are fine. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_api.h"

static char dir[] = "/tmp/xb-storage-fuzz-XXXXXX";

static int sh(const char *cmd)
{
    int r = system(cmd);
    return r == 0 ? 0 : -1;
}

static void exercise(const char *path, unsigned seed)
{
    char err[XB_ERRLEN];
    struct xb_image *img = xb_image_open(path, XB_FMT_QCOW2, 0, err);
    if (!img)
        return;
    static char buf[1 << 20];
    for (uint64_t off = 0; off < img->size; off += sizeof(buf)) {
        size_t n = img->size - off < sizeof(buf) ? (size_t)(img->size - off) : sizeof(buf);
        xb_image_read(img, buf, n, off);
    }
    srand(seed);
    for (int i = 0; i < 20 && img->size > 8192; i++) {
        uint64_t off = (uint64_t)rand() % (img->size - 8192);
        memset(buf, i, 5000);
        xb_image_write(img, buf, 5000, off);
        if (i % 5 == 0)
            xb_image_discard(img, off & ~65535ULL, 65536 < img->size - (off & ~65535ULL) ? 65536 : 0, 0);
        if (i % 7 == 0)
            xb_image_flush(img);
        struct xb_extent ext;
        if (img->ops->map(img, off, 4096, i & 1, &ext) == 1)
            img->ops->unmap(img, &ext);
    }
    struct xb_check_result res;
    xb_image_check(img, &res, err);
    struct xb_image_desc d;
    xb_image_describe(img, &d);
    xb_image_close(img);
}

int main(void)
{
    if (!mkdtemp(dir))
        return 1;
    char cmd[1024], base[256], work[256];
    snprintf(base, sizeof(base), "%s/base.qcow2", dir);
    snprintf(work, sizeof(work), "%s/work.qcow2", dir);
    snprintf(cmd, sizeof(cmd),
             "qemu-img create -q -f qcow2 -o cluster_size=4096 %s 2M && "
             "qemu-io -f qcow2 -c 'write -P 0xab 0 300k' -c 'write -z 400k 64k' %s >/dev/null",
             base, base);
    if (sh(cmd)) {
        printf("test_storage_fuzz: qemu-img unavailable, skipped\n");
        return 0;
    }
    int fd = open(base, O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    size_t len = (size_t)st.st_size;
    unsigned char *orig = malloc(len), *m = malloc(len);
    if (read(fd, orig, len) != (ssize_t)len)
        return 1;
    close(fd);
    srand(1234);
    int iters = 400;
    for (int it = 0; it < iters; it++) {
        memcpy(m, orig, len);
        int flips = 1 + rand() % 6;
        for (int k = 0; k < flips; k++) {
            /* mostly metadata: header, L1, refcount table/blocks, L2 (first clusters) */
            size_t pos = (size_t)rand() % (len < 6 * 4096 ? len : 6 * 4096);
            m[pos] = (unsigned char)rand();
        }
        size_t wlen = (it % 10 == 9) ? (size_t)rand() % len : len; /* sometimes truncated */
        fd = open(work, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (write(fd, m, wlen) != (ssize_t)wlen)
            return 1;
        close(fd);
        exercise(work, (unsigned)it);
    }
    unlink(work);
    unlink(base);
    rmdir(dir);
    free(orig);
    free(m);
    printf("test_storage_fuzz: %d mutated images survived\n", iters);
    return 0;
}
