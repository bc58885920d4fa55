/*
 * libFuzzer target: a fuzzed file opened as a VHD image through the storage driver, then read,
 * written (partial sectors, across blocks), mapped, discarded, zeroed, flushed and checked. The
 * driver may refuse the image or fail any operation; it must never crash, read or write out of
 * bounds, or hang. Everything in the footer, the dynamic header, the BAT, the bitmaps and the parent
 * locators comes from the input.
 *
 * Each input is written to a private directory (img/) that also holds the parent the seed corpus's
 * differencing disks name (parent.vhd: a dynamic disk with 4 KiB blocks and unique id 0x11 x 16, made
 * here) and traps: a FIFO, a symlink to a file outside, a subdirectory. Parent names are whatever the
 * input's locators say: the callback opens them as xenblk does (xb_open_beneath: beneath img/, no
 * symlinks, non-blocking) and aborts if it ever got an fd of something outside img/. The input's last
 * byte picks read-only (bit 0) and metadata write-through (bit 2).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_api.h"

#define READ_SPAN (256u << 10)

static char root[] = "/tmp/xb-fuzz-vhd-XXXXXX";
static char dir[300];
static char image_path[400];
static int dirfd_img = -1;
static struct stat outside_st, target_st;

static int open_parent(void *ctx, const char *parent, const char *name, const char *fmt, char *resolved, char *err)
{
    (void)ctx, (void)parent, (void)fmt;
    int fd = xb_open_beneath(dirfd_img, name, O_RDONLY | O_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, XB_ERRLEN, "parent %s: %s", name, strerror(-fd));
        return fd;
    }
    struct stat st;
    if (fstat(fd, &st) || (st.st_dev == outside_st.st_dev && st.st_ino == outside_st.st_ino) ||
        (st.st_dev == target_st.st_dev && st.st_ino == target_st.st_ino)) {
        fprintf(stderr, "fuzz_vhd: parent name '%s' reached a file outside the directory\n", name);
        abort();
    }
    snprintf(resolved, XB_PATHLEN, "%s/%s", dir, name);
    return fd;
}

static void write_file(const char *path, const uint8_t *data, size_t size)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size)) {
        perror(path);
        abort();
    }
    close(fd);
}

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

/* parent.vhd: 64 KiB dynamic, 4 KiB blocks, unique id 0x11 x 16, blocks 0 and 3 allocated. */
static void make_parent(const char *path)
{
    enum { SZ = 65536, BS = 4096, NB = SZ / BS, DATA = 2048 };
    static uint8_t f[DATA + 2 * (512 + BS) + 512];
    memset(f, 0, sizeof(f));
    uint8_t foot[512] = {0}, *h = f + 512;
    memcpy(foot, "conectix", 8);
    be32(foot + 8, 2);
    be32(foot + 12, 0x10000);
    be32(foot + 20, 512);
    be32(foot + 44, SZ);
    be32(foot + 52, SZ);
    be32(foot + 60, 3);
    memset(foot + 68, 0x11, 16);
    uint32_t s = 0;
    for (int i = 0; i < 512; i++)
        s += foot[i];
    be32(foot + 64, ~s);
    memcpy(h, "cxsparse", 8);
    memset(h + 8, 0xff, 8);
    be32(h + 20, 1536);
    be32(h + 24, 0x10000);
    be32(h + 28, NB);
    be32(h + 32, BS);
    s = 0;
    for (int i = 0; i < 1024; i++)
        s += h[i];
    be32(h + 36, ~s);
    memset(f + 1536, 0xff, 512);
    for (int k = 0; k < 2; k++) {
        uint32_t at = DATA + (uint32_t)k * (512 + BS);
        be32(f + 1536 + 4 * (k ? 3 : 0), at / 512);
        memset(f + at, 0xff, 1);          /* sectors 0-7 of the block */
        memset(f + at + 512, 0x5a + k, BS);
    }
    memcpy(f, foot, 512);
    memcpy(f + sizeof(f) - 512, foot, 512);
    write_file(path, f, sizeof(f));
}

static void remove_dir(void)
{
    const char *files[] = {"img/image.vhd", "img/parent.vhd", "img/pipe", "img/link", "outside.vhd", "target.vhd"};
    const char *dirs[] = {"img/sub", "img", ""};
    char path[512];
    for (unsigned i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", root, files[i]);
        unlink(path);
    }
    for (unsigned i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", root, dirs[i]);
        rmdir(path);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (!mkdtemp(root))
        abort();
    atexit(remove_dir);
    snprintf(dir, sizeof(dir), "%s/img", root);
    if (mkdir(dir, 0700))
        abort();
    snprintf(image_path, sizeof(image_path), "%s/image.vhd", dir);
    char p[512], q[512];
    snprintf(p, sizeof(p), "%s/parent.vhd", dir);
    make_parent(p);
    snprintf(p, sizeof(p), "%s/outside.vhd", root);
    make_parent(p); /* a valid parent, with the right id, outside the directory: must never be reached */
    snprintf(p, sizeof(p), "%s/pipe", dir);
    if (mkfifo(p, 0600))
        perror(p);
    snprintf(p, sizeof(p), "%s/link", dir);
    snprintf(q, sizeof(q), "%s/target.vhd", root);
    make_parent(q);
    if (symlink(q, p))
        perror(p);
    snprintf(p, sizeof(p), "%s/sub", dir);
    if (mkdir(p, 0700))
        perror(p);
    snprintf(p, sizeof(p), "%s/outside.vhd", root);
    if (stat(p, &outside_st) || stat(q, &target_st))
        abort();
    dirfd_img = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd_img < 0)
        abort();
    return 0;
}

static uint64_t pick_of(const uint8_t *data, size_t size)
{
    uint64_t v = 0;
    for (size_t i = size >= 9 ? size - 9 : 0; i + 1 < size; i++)
        v = v << 8 | data[i];
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_file(image_path, data, size);
    char err[XB_ERRLEN];
    unsigned flags = size && (data[size - 1] & 1) ? XB_OPEN_RDONLY : 0;
    if (size && (data[size - 1] & 4))
        flags |= XB_OPEN_WRITETHROUGH_META;
    int fd = open(image_path, O_CLOEXEC | (flags & XB_OPEN_RDONLY ? O_RDONLY : O_RDWR));
    if (fd < 0)
        abort();
    struct xb_image *img = xb_image_open_fd(fd, image_path, XB_FMT_VHD, flags, open_parent, NULL, err);
    if (!img)
        return 0;
    static uint8_t buf[READ_SPAN];
    uint64_t vsize = img->size, pick = pick_of(data, size);
    uint64_t offs[3] = {0, vsize > READ_SPAN ? vsize - READ_SPAN : 0, vsize ? pick % vsize : 0};
    for (int i = 0; i < 3; i++) {
        size_t n = vsize - offs[i] < READ_SPAN ? (size_t)(vsize - offs[i]) : READ_SPAN;
        if (offs[i] < vsize)
            xb_image_read(img, buf, n, offs[i]);
    }
    for (int i = 0; i < 3 && vsize >= 16384; i++) {
        uint64_t off = (offs[i] + (uint64_t)i * 777) % (vsize - 9000); /* unaligned, may cross a block */
        memset(buf, 0x11 * (i + 1), 9000);
        xb_image_write(img, buf, 9000, off);
        struct xb_extent ext;
        if (img->ops->map(img, off, 9000, i & 1, &ext) == 1) {
            if (ext.len == 0 || ext.len > 9000) {
                fprintf(stderr, "fuzz_vhd: map gave %llu bytes for 9000\n", (unsigned long long)ext.len);
                abort();
            }
            img->ops->unmap(img, &ext);
        }
        if (i == 1)
            xb_image_flush(img);
    }
    if (vsize > 65536) {
        uint64_t off = (pick >> 7) % (vsize - 65536);
        xb_image_discard(img, off, 65536, 0);
        xb_image_write_zeroes(img, off + 1000, 20000);
    }
    xb_image_flush(img);
    if (vsize)
        xb_image_read(img, buf, vsize < READ_SPAN ? (size_t)vsize : READ_SPAN, 0);
    struct xb_check_result res;
    xb_image_check(img, &res, err);
    struct xb_image_desc d;
    xb_image_describe(img, &d);
    xb_image_close(img);
    return 0;
}
