/*
 * Crash points of the VHD driver: the driver's file writes are cut off after the N-th one (pwrite,
 * fallocate, ftruncate: linked with -Wl,--wrap so that every later one fails and nothing more
 * reaches the file, as when the process is killed), for every N until the workload completes.
 * After each cut the image must open, pass the driver's check, end with a valid footer (the driver
 * moves it before anything else), and every sector must hold either what the last completed flush
 * left there or one of the values written to it after that flush. With XB_OPEN_WRITETHROUGH_META
 * (how the daemon opens an image whose ring journal replays acknowledged writes) the bar is higher:
 * every completed write is there, only the interrupted one may be partial.
 * Dynamic and differencing disks (the parent opened through a backing callback), 4 KiB blocks so a
 * short workload allocates often.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include "storage_api.h"

#define SIZE (256u * 1024)
#define BS 4096u
#define NSEC (SIZE / 512)
#define MAXV 64 /* values one sector may have taken after a flush */

static long budget = -1; /* writes still allowed; -1: unlimited */
static int cut;

static int allow(void)
{
    if (budget < 0)
        return 1;
    if (budget == 0) {
        cut = 1;
        return 0;
    }
    budget--;
    return 1;
}

ssize_t __real_pwrite(int fd, const void *buf, size_t n, off_t off);
int __real_fallocate(int fd, int mode, off_t off, off_t len);
int __real_ftruncate(int fd, off_t len);
ssize_t __wrap_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (!allow()) {
        errno = EIO;
        return -1;
    }
    return __real_pwrite(fd, buf, n, off);
}
int __wrap_fallocate(int fd, int mode, off_t off, off_t len)
{
    if (!allow()) {
        errno = EIO;
        return -1;
    }
    return __real_fallocate(fd, mode, off, len);
}
int __wrap_ftruncate(int fd, off_t len)
{
    if (!allow()) {
        errno = EIO;
        return -1;
    }
    return __real_ftruncate(fd, len);
}

#define CHECK(c, ...)                                                                                                  \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "test_vhd_crash: %s:%d: ", __FILE__, __LINE__);                                            \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, "\n");                                                                                     \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}
static void be64(uint8_t *p, uint64_t v)
{
    be32(p, (uint32_t)(v >> 32));
    be32(p + 4, (uint32_t)v);
}
static void csum(uint8_t *b, size_t len, size_t at)
{
    uint32_t s = 0;
    for (size_t i = 0; i < len; i++)
        s += b[i];
    be32(b + at, ~s);
}

/* An empty dynamic (puid NULL) or differencing disk: footer copy, header, BAT, locator, footer. */
static void make_vhd(const char *path, const uint8_t uid[16], const uint8_t *puid)
{
    uint8_t f[512] = {0}, h[1024] = {0}, bat[512], loc[512] = {0};
    memcpy(f, "conectix", 8);
    be32(f + 8, 2);
    be32(f + 12, 0x10000);
    be64(f + 16, 512);
    memcpy(f + 28, "tap", 4);
    be64(f + 40, SIZE);
    be64(f + 48, SIZE);
    be32(f + 60, puid ? 4 : 3);
    memcpy(f + 68, uid, 16);
    csum(f, 512, 64);
    memcpy(h, "cxsparse", 8);
    be64(h + 8, ~0ull);
    be64(h + 16, 1536);
    be32(h + 24, 0x10000);
    be32(h + 28, SIZE / BS);
    be32(h + 32, BS);
    if (puid) {
        memcpy(h + 40, puid, 16);
        const char *name = "parent.vhd"; /* W2ru: UTF-16LE */
        for (size_t i = 0; name[i]; i++)
            loc[2 * i] = (uint8_t)name[i];
        memcpy(h + 576, "W2ru", 4);
        be32(h + 580, 512);
        be32(h + 584, (uint32_t)(2 * strlen(name)));
        be64(h + 592, 2048);
    }
    csum(h, 1024, 36);
    memset(bat, 0xff, sizeof(bat)); /* 64 entries */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(fd >= 0, "%s: %s", path, strerror(errno));
    CHECK(__real_pwrite(fd, f, 512, 0) == 512 && __real_pwrite(fd, h, 1024, 512) == 1024 &&
              __real_pwrite(fd, bat, 512, 1536) == 512 && __real_pwrite(fd, loc, 512, 2048) == 512 &&
              __real_pwrite(fd, f, 512, 2560) == 512,
          "write %s", path);
    close(fd);
}

static char dir[] = "/tmp/xb-vhd-crash-XXXXXX";
static char base_path[128], parent_path[128], work_path[128];
static int dirfd_ = -1;

static int open_parent(void *ctx, const char *parent, const char *name, const char *fmt, char *resolved, char *err)
{
    (void)ctx, (void)parent, (void)fmt;
    int fd = xb_open_beneath(dirfd_, name, O_RDONLY, 0);
    if (fd < 0)
        snprintf(err, XB_ERRLEN, "%s: %s", name, strerror(-fd));
    else
        snprintf(resolved, XB_PATHLEN, "%s/%s", dir, name);
    return fd;
}

static void copy_file(const char *from, const char *to)
{
    static uint8_t b[1 << 20];
    int in = open(from, O_RDONLY | O_CLOEXEC), out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(in >= 0 && out >= 0, "copy %s", from);
    ssize_t n = read(in, b, sizeof(b));
    CHECK(n > 0 && n < (ssize_t)sizeof(b) && __real_pwrite(out, b, (size_t)n, 0) == n, "copy %s", from);
    close(in);
    close(out);
}

struct op {
    uint32_t off, len; /* len 0: flush */
};
/* Partial sectors, block-crossing writes, rewrites of allocated blocks, flushes between. */
static const struct op ops[] = {
    {100, 700},    {0, 0},     {4096 * 5 + 512, 4096}, {8000, 300}, {0, 0},      {4096 * 40, 512},
    {4096 * 5, 512}, {60000, 9000}, {0, 0},          {100, 50},   {4096 * 63 + 4000, 96}, {0, 0},
};
#define NOPS (sizeof(ops) / sizeof(ops[0]))

static uint8_t model[SIZE];              /* content after every completed write */
static uint8_t flushed[SIZE];            /* content at the last completed flush */
static uint8_t later[NSEC][MAXV];        /* first byte of each value a sector took since that flush */
static unsigned nlater[NSEC];

static void note_write(uint32_t off, uint32_t len, uint8_t v)
{
    for (uint32_t s = off / 512; s <= (off + len - 1) / 512; s++)
        if (nlater[s] < MAXV)
            later[s][nlater[s]++] = v;
}

/* One run with the writes cut after n of them; returns 1 if the workload completed. */
static int run(long n, unsigned flags, int diff, const uint8_t *initial)
{
    copy_file(base_path, work_path);
    memcpy(model, initial, SIZE);
    memcpy(flushed, initial, SIZE);
    memset(nlater, 0, sizeof(nlater));
    char err[XB_ERRLEN];
    int fd = open(work_path, O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0, "open");
    struct xb_image *img = xb_image_open_fd(fd, work_path, XB_FMT_VHD, flags, diff ? open_parent : NULL, NULL, err);
    CHECK(img, "open: %s", err);
    static uint8_t buf[SIZE];
    budget = n;
    cut = 0;
    int inflight = -1;
    for (unsigned i = 0; i < NOPS && !cut; i++) {
        if (!ops[i].len) {
            if (xb_image_flush(img) == 0 && !cut) {
                memcpy(flushed, model, SIZE);
                memset(nlater, 0, sizeof(nlater));
            }
            continue;
        }
        uint8_t v = (uint8_t)(0x10 + i);
        memset(buf, v, ops[i].len);
        note_write(ops[i].off, ops[i].len, v);
        ssize_t r = xb_image_write(img, buf, ops[i].len, ops[i].off);
        if (r < 0 || cut) {
            inflight = (int)i;
            break;
        }
        memset(model + ops[i].off, v, ops[i].len);
    }
    int completed = !cut;
    xb_image_close(img); /* a cut run's close writes nothing more */
    budget = -1;
    /* the image as the next open finds it */
    fd = open(work_path, O_RDONLY | O_CLOEXEC);
    uint8_t foot[512];
    off_t end = lseek(fd, 0, SEEK_END);
    CHECK(pread(fd, foot, 512, end - 512) == 512 && !memcmp(foot, "conectix", 8), "cut %ld: no footer at the end", n);
    img = xb_image_open_fd(fd, work_path, XB_FMT_VHD, XB_OPEN_RDONLY, diff ? open_parent : NULL, NULL, err);
    CHECK(img, "cut %ld: the image does not open: %s", n, err);
    struct xb_check_result res;
    CHECK(xb_image_check(img, &res, err) == 0 && res.corruptions == 0, "cut %ld: %llu corruptions", n,
          (unsigned long long)res.corruptions);
    CHECK(xb_image_read(img, buf, SIZE, 0) == SIZE, "cut %ld: read", n);
    for (uint32_t s = 0; s < NSEC; s++) {
        const uint8_t *got = buf + s * 512;
        for (uint32_t k = 0; k < 512; k++) {
            uint8_t g = got[k];
            int ok;
            if (flags & XB_OPEN_WRITETHROUGH_META) {
                ok = g == model[s * 512 + k] ||
                     (inflight >= 0 && s * 512 + k >= ops[inflight].off &&
                      s * 512 + k < ops[inflight].off + ops[inflight].len && g == (uint8_t)(0x10 + inflight));
            } else {
                ok = g == flushed[s * 512 + k];
                for (unsigned j = 0; j < nlater[s] && !ok; j++)
                    ok = g == later[s][j];
            }
            CHECK(ok, "cut after %ld writes (%s, %s): byte %u holds 0x%02x (flushed 0x%02x, written 0x%02x)", n,
                  diff ? "differencing" : "dynamic", flags ? "write-through" : "flush", s * 512 + k, g,
                  flushed[s * 512 + k], model[s * 512 + k]);
        }
    }
    xb_image_close(img);
    return completed;
}

int main(void)
{
    CHECK(mkdtemp(dir), "mkdtemp");
    snprintf(base_path, sizeof(base_path), "%s/base.vhd", dir);
    snprintf(parent_path, sizeof(parent_path), "%s/parent.vhd", dir);
    snprintf(work_path, sizeof(work_path), "%s/work.vhd", dir);
    dirfd_ = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    static uint8_t zero[SIZE], pdata[SIZE];
    uint8_t uid[16], puid[16];
    for (int i = 0; i < 16; i++)
        uid[i] = (uint8_t)(i * 7 + 1), puid[i] = (uint8_t)(i * 13 + 5);
    /* the parent: a dynamic disk with a pattern in every other 4 KiB */
    make_vhd(parent_path, puid, NULL);
    char err[XB_ERRLEN];
    struct xb_image *p = xb_image_open(parent_path, XB_FMT_VHD, 0, err);
    CHECK(p, "parent: %s", err);
    for (uint32_t o = 0; o < SIZE; o += 8192) {
        memset(pdata + o, (int)(0xa0 + o / 8192 % 32), 4096);
        CHECK(xb_image_write(p, pdata + o, 4096, o) == 4096, "parent write");
    }
    CHECK(xb_image_flush(p) == 0, "parent flush");
    xb_image_close(p);
    unsigned total = 0;
    for (int diff = 0; diff < 2; diff++) {
        make_vhd(base_path, uid, diff ? puid : NULL);
        for (unsigned flags = 0; flags <= XB_OPEN_WRITETHROUGH_META; flags += XB_OPEN_WRITETHROUGH_META) {
            long n = 0;
            while (!run(n, flags, diff, diff ? pdata : zero))
                n++;
            total += (unsigned)n + 1;
        }
    }
    printf("test_vhd_crash: %u crash points, all consistent\n", total);
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : 1;
}
