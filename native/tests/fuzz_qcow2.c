/*
 * libFuzzer target: a fuzzed file opened as a qcow2 image through the storage
 * driver, then read, written, discarded, flushed and checked. The driver may
 * refuse the image or fail any operation; it must never crash, read or write
 * out of bounds, or hang. (test_storage_fuzz.c is the fixed-seed mutation test
 * of qemu-img made images; this one lets libFuzzer steer the mutations.)
 *
 * Each input is written to a private directory that also holds the backing
 * files the seed corpus refers to (backing.qcow2, backing.raw). A backing name
 * that is not a plain file name in that directory is skipped: it could name a
 * device or a pipe and block the fuzzer, which would find nothing in the driver.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "storage_api.h"

#define READ_SPAN (256u << 10)

static char dir[] = "/tmp/xb-fuzz-qcow2-XXXXXX";
static char image_path[256];

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* 1 if the header names no backing file, or one that is a plain name inside our directory. */
static int backing_is_safe(const uint8_t *data, size_t size)
{
    if (size < 20)
        return 1;
    uint64_t off = be64(data + 8);
    uint32_t len = be32(data + 16);
    if (off == 0 || len == 0 || off >= size || len > size - off)
        return 1; /* the driver refuses it before any open: nothing outside data to reach */
    const uint8_t *name = data + off;
    if (len == 2 && name[0] == '.' && name[1] == '.')
        return 0;
    for (uint32_t i = 0; i < len; i++) {
        uint8_t c = name[i];
        if (!(c == '.' || c == '_' || c == '-' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
              (c >= 'A' && c <= 'Z')))
            return 0;
    }
    return 1;
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
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "cd %s && qemu-img create -q -f qcow2 -o cluster_size=512 backing.qcow2 1M && "
             "qemu-io -f qcow2 -c 'write -P 0x5a 0 8k' backing.qcow2 >/dev/null && "
             "head -c 65536 /dev/urandom > backing.raw",
             dir);
    if (system(cmd) != 0)
        fprintf(stderr, "fuzz_qcow2: no qemu-img: inputs with a backing file fail to open\n");
}

static void remove_dir(void)
{
    const char *names[] = {"image.qcow2", "backing.qcow2", "backing.raw"};
    char path[256];
    for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (!mkdtemp(dir))
        abort();
    atexit(remove_dir);
    snprintf(image_path, sizeof(image_path), "%s/image.qcow2", dir);
    make_backing_files();
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
    if (vsize >= 65536)
        xb_image_discard(img, (pick % vsize) & ~65535ull, 65536 <= vsize - ((pick % vsize) & ~65535ull) ? 65536 : 0,
                         0);
    xb_image_write_zeroes(img, 0, vsize < 4096 ? vsize : 4096);
    xb_image_flush(img);
    if (vsize)
        xb_image_read(img, buf, vsize < READ_SPAN ? (size_t)vsize : READ_SPAN, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!backing_is_safe(data, size))
        return -1; /* not added to the corpus */
    write_file(image_path, data, size);
    char err[XB_ERRLEN];
    /* The last byte's low bit (padding to the driver) picks read-only: images with snapshots open only so. */
    unsigned flags = size && (data[size - 1] & 1) ? XB_OPEN_RDONLY : 0;
    struct xb_image *img = xb_image_open(image_path, XB_FMT_QCOW2, flags, err);
    if (!img)
        return 0;
    exercise(img, data, size);
    struct xb_check_result res;
    xb_image_check(img, &res, err);
    struct xb_image_desc d;
    xb_image_describe(img, &d);
    xb_image_close(img);
    return 0;
}
