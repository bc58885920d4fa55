/*
 * libFuzzer target: the sim platform against a guest-controlled grant table.
 * The input is the table (GRANTS entries) then a list of operations (copy to or
 * from the guest, map read-only or writable). Each result is compared with a
 * model of Xen's rules computed from the same entry, and every byte the backend
 * writes must land in the frame the grant names: a grant the guest did not give
 * (or gave read-only) never lets the backend write.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "platform_int.h"
#include "xb_grant.h"

#define PAGES 8
#define GRANTS 64
#define GUEST 5
#define SELF 0

static struct xb_platform *plat;
static uint8_t *mem;             /* the guest's view of its memory */
static struct xb_grant_entry_v1 *gnt;
static uint8_t shadow[PAGES * XB_PAGE_SIZE]; /* what the memory must hold */

#define CHECK(c)                                                                    \
    do {                                                                            \
        if (!(c)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);   \
            abort();                                                                \
        }                                                                           \
    } while (0)

static int memfd(size_t size)
{
    int fd = memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    return fd;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    int mfd = memfd(PAGES * XB_PAGE_SIZE), gfd = memfd(GRANTS * sizeof(*gnt));
    mem = mmap(NULL, PAGES * XB_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    gnt = mmap(NULL, GRANTS * sizeof(*gnt), PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
    CHECK(mem != MAP_FAILED && gnt != MAP_FAILED);
    char err[XB_ERRLEN];
    plat = xb_platform_open_sim(SELF, err);
    CHECK(plat && xb_platform_sim_add_domain(plat, GUEST, mfd, PAGES, gfd, GRANTS, err) == 0);
    close(mfd);
    close(gfd);
    return 0;
}

/* Xen's verdict on using grant `ref` (writing to the guest if `write`). */
static int model(uint32_t ref, int write, uint32_t *frame)
{
    if (ref >= GRANTS)
        return XB_GNTST_bad_gntref;
    struct xb_grant_entry_v1 e = gnt[ref];
    if ((e.flags & XB_GTF_type_mask) != XB_GTF_permit_access || e.domid != SELF)
        return XB_GNTST_permission_denied;
    if (write && (e.flags & XB_GTF_readonly))
        return XB_GNTST_permission_denied;
    if (e.frame >= PAGES)
        return XB_GNTST_bad_page;
    *frame = e.frame;
    return XB_GNTST_okay;
}

struct op {
    uint8_t kind; /* 0 copy from guest, 1 copy to guest, 2 map ro, 3 map rw; high bits: wrong domid */
    uint8_t ref;
    uint16_t offset;
    uint16_t len;
    uint8_t fill;
    uint8_t pad;
};

static void do_copy(const struct op *o, int dir, uint16_t domid)
{
    static uint8_t local[XB_PAGE_SIZE];
    memset(local, o->fill, sizeof local);
    struct xb_copy_seg s = {.gref = o->ref, .domid = domid, .offset = o->offset, .len = o->len, .dir = (uint8_t)dir,
                            .local = local};
    int rc = xb_grant_copy(plat, &s, 1);
    uint32_t frame = 0;
    int expect;
    if (o->len == 0 || (unsigned)o->offset + o->len > XB_PAGE_SIZE)
        expect = XB_GNTST_bad_copy_arg;
    else if (domid != GUEST)
        expect = XB_GNTST_bad_domain;
    else
        expect = model(o->ref, dir == XB_COPY_TO_GUEST, &frame);
    CHECK(s.status == expect);
    CHECK((rc == 0) == (expect == XB_GNTST_okay));
    if (expect != XB_GNTST_okay)
        return;
    uint8_t *page = shadow + (size_t)frame * XB_PAGE_SIZE + o->offset;
    if (dir == XB_COPY_TO_GUEST)
        memset(page, o->fill, o->len);
    else
        CHECK(memcmp(local, page, o->len) == 0);
}

static void do_map(const struct op *o, int writable, uint16_t domid)
{
    struct xb_gmap *h;
    xb_grant_ref_t ref = o->ref;
    uint8_t *p = xb_grant_map(plat, domid, &ref, 1, writable, &h, NULL);
    uint32_t frame = 0;
    int expect = domid != GUEST ? XB_GNTST_bad_domain : model(o->ref, writable, &frame);
    CHECK((p != NULL) == (expect == XB_GNTST_okay));
    if (!p)
        return;
    CHECK(memcmp(p, shadow + (size_t)frame * XB_PAGE_SIZE, XB_PAGE_SIZE) == 0);
    if (writable) {
        unsigned at = o->offset % XB_PAGE_SIZE;
        p[at] = o->fill;
        shadow[(size_t)frame * XB_PAGE_SIZE + at] = o->fill;
    }
    xb_grant_unmap(plat, h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t table = GRANTS * sizeof(*gnt);
    if (size < table)
        return -1;
    memcpy(gnt, data, table);
    memset(mem, 0, PAGES * XB_PAGE_SIZE);
    memset(shadow, 0, sizeof shadow);
    for (size_t pos = table; pos + sizeof(struct op) <= size && pos < table + 64 * sizeof(struct op);
         pos += sizeof(struct op)) {
        struct op o;
        memcpy(&o, data + pos, sizeof o);
        uint16_t domid = (o.kind & 0x80) ? GUEST + 1 : GUEST;
        switch (o.kind & 3) {
        case 0:
            do_copy(&o, XB_COPY_FROM_GUEST, domid);
            break;
        case 1:
            do_copy(&o, XB_COPY_TO_GUEST, domid);
            break;
        default:
            do_map(&o, (o.kind & 3) == 3, domid);
            break;
        }
        CHECK(memcmp(mem, shadow, sizeof shadow) == 0); /* nothing written anywhere it was not allowed */
    }
    return 0;
}
