/*
 * libFuzzer target: a fuzzed file opened as a qcow2 image through the storage
 * driver, then read, written, discarded, flushed and checked. The driver may
 * refuse the image or fail any operation; it must never crash, read or write
 * out of bounds, or hang. (test_storage_fuzz.c is the fixed-seed mutation test
 * of qemu-img made images; this one lets libFuzzer steer the mutations.)
 *
 * Each input is written to a private directory (img/) that also holds the
 * backing files the seed corpus refers to (backing.qcow2, backing.raw) and
 * traps: a FIFO, a symlink to a file outside, a subdirectory; next to img/ lies
 * outside.raw. Backing names are whatever the input says: the backing callback
 * opens them the way xenblk does (xb_open_beneath: beneath img/, no symlinks,
 * non-blocking; the input's last byte picks openat2 or the fallback walk) and
 * aborts if it ever got an fd of something outside img/; the driver must refuse
 * every non-regular file the callback hands it (the FIFO) without blocking.
 *
 * The input's last byte also picks metadata write-through (how the daemon opens
 * qcow2) and a second thread that discards and flushes while the first one
 * reads, writes and maps (the driver's lock against I/O racing flush and
 * discard). Whatever the image, its file must not grow past what the driver
 * promises: virtual size + metadata + the reserve + slack, or its size at open
 * + the slack (issue 14).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_api.h"

#define READ_SPAN (256u << 10)

static char root[] = "/tmp/xb-fuzz-qcow2-XXXXXX";
static char dir[300];
static char image_path[400];
static int dirfd_img = -1;
static unsigned walk_flag; /* XB_BENEATH_WALK for this input, or 0 */
static struct stat outside_st, target_st;

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* The driver's backing callback, as xenblk's is: beneath img/ only (an absolute name is
 * refused by xb_open_beneath itself), read-only, non-blocking. The driver checks the type. */
static int open_backing(void *ctx, const char *parent, const char *name, const char *fmt, char *resolved, char *err)
{
    (void)ctx, (void)parent, (void)fmt;
    int fd = xb_open_beneath(dirfd_img, name, O_RDONLY | O_NONBLOCK, walk_flag);
    if (fd < 0) {
        snprintf(err, XB_ERRLEN, "backing %s: %s", name, strerror(-fd));
        return fd;
    }
    struct stat st;
    if (fstat(fd, &st) || (st.st_dev == outside_st.st_dev && st.st_ino == outside_st.st_ino) ||
        (st.st_dev == target_st.st_dev && st.st_ino == target_st.st_ino)) {
        fprintf(stderr, "fuzz_qcow2: backing name '%s' reached a file outside the directory\n", name);
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

static void make_backing_files(void)
{
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "cd %s && qemu-img create -q -f qcow2 -o cluster_size=512 backing.qcow2 1M && "
             "qemu-io -f qcow2 -c 'write -P 0x5a 0 8k' backing.qcow2 >/dev/null && "
             "head -c 65536 /dev/urandom > backing.raw",
             dir);
    if (system(cmd) != 0)
        fprintf(stderr, "fuzz_qcow2: no qemu-img: inputs with a backing file fail to open\n");
    /* the traps */
    char p[512], q[512];
    snprintf(p, sizeof(p), "%s/outside.raw", root);
    write_file(p, (const uint8_t *)"outside", 7);
    snprintf(p, sizeof(p), "%s/pipe", dir);
    if (mkfifo(p, 0600))
        perror(p);
    snprintf(p, sizeof(p), "%s/link", dir);
    snprintf(q, sizeof(q), "%s/target.raw", root);
    write_file(q, (const uint8_t *)"target", 6);
    if (symlink(q, p))
        perror(p);
    snprintf(p, sizeof(p), "%s/sub", dir);
    if (mkdir(p, 0700))
        perror(p);
    snprintf(p, sizeof(p), "%s/outside.raw", root);
    if (stat(p, &outside_st) || stat(q, &target_st))
        abort();
}

static void remove_dir(void)
{
    const char *files[] = {"img/image.qcow2", "img/backing.qcow2", "img/backing.raw", "img/pipe", "img/link",
                           "outside.raw", "target.raw"};
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
    snprintf(image_path, sizeof(image_path), "%s/image.qcow2", dir);
    make_backing_files();
    dirfd_img = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd_img < 0)
        abort();
    return 0;
}

static void exercise(struct xb_image *img, const uint8_t *data, size_t size)
{
    static uint8_t buf[READ_SPAN];
    uint64_t vsize = img->size;
    /* the start, the end, and a place the input picks */
    uint64_t pick = size >= 8 ? be64(data + size - 8) : 0;
    uint64_t offs[3] = {0, vsize > READ_SPAN ? vsize - READ_SPAN : 0, vsize ? pick % vsize : 0};
    for (int i = 0; i < 3; i++) {
        uint64_t off = offs[i] & ~511ull;
        size_t n = vsize - off < READ_SPAN ? (size_t)(vsize - off) : READ_SPAN;
        if (off < vsize)
            xb_image_read(img, buf, n, off);
    }
    for (int i = 0; i < 3 && vsize >= 8192; i++) {
        uint64_t off = (offs[i] % (vsize - 4096)) & ~511ull;
        memset(buf, 0x11 * (i + 1), 4096);
        xb_image_write(img, buf, 4096, off);
        struct xb_extent ext;
        if (img->ops->map(img, off, 4096, i & 1, &ext) == 1)
            img->ops->unmap(img, &ext);
    }
    /* A guest that never flushes: write and discard one cluster, again and again (issue 14 item 2;
     * unbounded, each round grew the file by a cluster). Small clusters only: cheap per round. Half the
     * inputs (every round costs the driver an ordered flush). */
    struct xb_image_desc d;
    if (size && (data[size - 1] & 16) && !(img->caps & XB_CAP_READONLY) && xb_image_describe(img, &d) == 0 &&
        d.cluster_size && d.cluster_size <= 65536 && vsize >= 2ull * d.cluster_size) {
        uint64_t cs = d.cluster_size, off = (pick % (vsize - cs)) / cs * cs;
        memset(buf, 0x77, 512);
        for (int k = 0; k < 128; k++) /* more rounds than the bound's slack has clusters */
            if (xb_image_write(img, buf, 512, off) < 0 || xb_image_discard(img, off, cs, 0) < 0)
                break;
    }
    if (vsize >= 65536)
        xb_image_discard(img, (pick % vsize) & ~65535ull, 65536 <= vsize - ((pick % vsize) & ~65535ull) ? 65536 : 0,
                         0);
    xb_image_write_zeroes(img, 0, vsize < 4096 ? vsize : 4096);
    xb_image_flush(img);
    if (vsize)
        xb_image_read(img, buf, vsize < READ_SPAN ? (size_t)vsize : READ_SPAN, 0);
}

struct racer {
    struct xb_image *img;
    uint64_t pick;
};

/* Discards and flushes while exercise() runs on the main thread. */
static void *race_main(void *arg)
{
    struct racer *r = arg;
    uint64_t vsize = r->img->size;
    for (int i = 0; i < 8 && vsize >= 65536; i++) {
        uint64_t off = ((r->pick + (uint64_t)i * 65536) % vsize) & ~65535ull;
        xb_image_discard(r->img, off, 65536 <= vsize - off ? 65536 : vsize - off, 0);
        if (i & 1)
            xb_image_flush(r->img);
    }
    return NULL;
}

static uint64_t file_size(void)
{
    struct stat st;
    if (stat(image_path, &st))
        abort();
    return (uint64_t)st.st_size;
}

/* Generous outer bound of the driver's size bound (qcow2_refcount.c cap_init): every guest cluster,
 * its L2 tables, L1, header, refcounts at 64 bits for all of it (twice: a moved reftable), the reserve
 * and 32 clusters more. */
static uint64_t size_bound(struct xb_image *img, uint64_t at_open)
{
    struct xb_image_desc d;
    if (xb_image_describe(img, &d) || !d.cluster_size)
        return UINT64_MAX;
    uint64_t cs = d.cluster_size, n = (img->size + cs - 1) / cs;
    n += (n * 8 + cs - 1) / cs * 2 + 1; /* L2 tables, L1, header */
    n += 64 + 32;                       /* reserve + slack */
    n += (n * 8 + cs - 1) / cs * 2 + 4; /* refcount blocks and reftables */
    uint64_t cap = n * cs, grown = at_open + 96 * cs;
    return cap > grown ? cap : grown;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_file(image_path, data, size);
    char err[XB_ERRLEN];
    /* The last byte's low bit (padding to the driver) picks read-only: images with snapshots open only so;
     * its next bit picks the openat2-less walk for backing files. */
    unsigned flags = size && (data[size - 1] & 1) ? XB_OPEN_RDONLY : 0;
    walk_flag = size && (data[size - 1] & 2) ? XB_BENEATH_WALK : 0;
    if (size && (data[size - 1] & 4))
        flags |= XB_OPEN_WRITETHROUGH_META;
    int race = size && (data[size - 1] & 8);
    int fd = open(image_path, O_CLOEXEC | (flags & XB_OPEN_RDONLY ? O_RDONLY : O_RDWR));
    if (fd < 0)
        abort();
    struct xb_image *img = xb_image_open_fd(fd, image_path, XB_FMT_QCOW2, flags, open_backing, NULL, err);
    if (!img)
        return 0;
    uint64_t at_open = file_size();
    struct racer rc = {img, size >= 16 ? be64(data + size - 16) : 0};
    pthread_t th;
    race = race && !(flags & XB_OPEN_RDONLY) && pthread_create(&th, NULL, race_main, &rc) == 0;
    exercise(img, data, size);
    if (race)
        pthread_join(th, NULL);
    if (file_size() > size_bound(img, at_open)) {
        fprintf(stderr, "fuzz_qcow2: the image grew from %llu to %llu bytes, past its bound %llu\n",
                (unsigned long long)at_open, (unsigned long long)file_size(),
                (unsigned long long)size_bound(img, at_open));
        abort();
    }
    struct xb_check_result res;
    xb_image_check(img, &res, err);
    struct xb_image_desc d;
    xb_image_describe(img, &d);
    xb_image_close(img);
    return 0;
}
