/*
 * The sim platform under ASan+UBSan, where C speed matters: a guest thread
 * flips a grant entry between "frame 1 writable" and "frame 2 read-only" while
 * the backend copies to and maps it. Reading the entry more than once could
 * combine the permission of one with the frame of the other and write frame 2;
 * it must never be written. Plus: queue threads copying while domains are
 * attached and detached, and the real platform's refusal without /dev/xen.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "platform_int.h"
#include "xb_grant.h"

#define CHECK(c)                                                                \
    do {                                                                        \
        if (!(c)) {                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

#define PAGES 16
#define ENTRIES 32
#define GUEST 3

struct guest {
    int mem_fd, gnt_fd;
    uint8_t *mem;
    uint64_t *gnt; /* entries as 8-byte words: one store changes a whole entry */
};

static int sealed_memfd(size_t size)
{
    int fd = memfd_create("guest", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0);
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    return fd;
}

static void guest_init(struct guest *g)
{
    g->mem_fd = sealed_memfd(PAGES * XB_PAGE_SIZE);
    g->gnt_fd = sealed_memfd(ENTRIES * 8);
    g->mem = mmap(NULL, PAGES * XB_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g->mem_fd, 0);
    g->gnt = mmap(NULL, ENTRIES * 8, PROT_READ | PROT_WRITE, MAP_SHARED, g->gnt_fd, 0);
    CHECK(g->mem != MAP_FAILED && g->gnt != MAP_FAILED);
}

static uint64_t entry(uint16_t flags, uint16_t domid, uint32_t frame)
{
    struct xb_grant_entry_v1 e = {.flags = flags, .domid = domid, .frame = frame};
    uint64_t w;
    memcpy(&w, &e, sizeof w);
    return w;
}

static int page_is_zero(const struct guest *g, unsigned frame)
{
    for (unsigned i = 0; i < XB_PAGE_SIZE; i++)
        if (g->mem[frame * XB_PAGE_SIZE + i])
            return 0;
    return 1;
}

struct flipper {
    struct guest *g;
    volatile int stop;
};

static void *flip(void *arg)
{
    struct flipper *f = arg;
    uint64_t rw = entry(XB_GTF_permit_access, 0, 1);
    uint64_t ro = entry(XB_GTF_permit_access | XB_GTF_readonly, 0, 2);
    while (!f->stop) {
        __atomic_store_n(&f->g->gnt[1], rw, __ATOMIC_RELEASE);
        __atomic_store_n(&f->g->gnt[1], ro, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Lines of /proc/self/maps: a leaked grant mapping would add one per map. */
static unsigned count_mappings(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    CHECK(f);
    unsigned n = 0;
    int c;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

static void test_racing_guest(struct xb_platform *p, struct guest *g)
{
    unsigned mappings = count_mappings();
    struct flipper f = {.g = g};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, flip, &f) == 0);
    static uint8_t local[XB_PAGE_SIZE];
    memset(local, 0xee, sizeof local);
    unsigned ok = 0, denied = 0;
    for (unsigned i = 0; i < 200000; i++) {
        struct xb_copy_seg s = {.gref = 1, .domid = GUEST, .offset = 0, .len = XB_PAGE_SIZE,
                                .dir = XB_COPY_TO_GUEST, .local = local};
        xb_grant_copy(p, &s, 1);
        CHECK(s.status == XB_GNTST_okay || s.status == XB_GNTST_permission_denied);
        ok += s.status == XB_GNTST_okay;
        denied += s.status == XB_GNTST_permission_denied;
        if (i % 8 == 0) {
            struct xb_gmap *h;
            xb_grant_ref_t ref = 1;
            uint8_t *m = xb_grant_map(p, GUEST, &ref, 1, 1, &h, NULL);
            if (m) {
                m[0] = 0xaa; /* lands in whatever frame was mapped: must be frame 1 */
                xb_grant_unmap(p, h);
            }
        }
    }
    f.stop = 1;
    pthread_join(t, NULL);
    CHECK(page_is_zero(g, 2));
    CHECK(count_mappings() < mappings + 64); /* 25000 maps were made: a leak would add thousands */
    printf("racing guest: %u copies allowed, %u refused, frame 2 (read-only) untouched\n", ok, denied);
}

/* A kept (persistent) mapping is used only while the guest's entry still grants that frame,
 * writable: revoked, re-pointed or made read-only, it is not valid any more. */
static void test_persistent_still_valid(struct xb_platform *p, struct guest *g)
{
    xb_grant_ref_t ref = 5;
    __atomic_store_n(&g->gnt[ref], entry(XB_GTF_permit_access, 0, 4), __ATOMIC_RELEASE);
    struct xb_gmap *h;
    uint8_t *m = xb_grant_map(p, GUEST, &ref, 1, 1, &h, NULL);
    CHECK(m);
    m[7] = 0x5c;
    CHECK(g->mem[4 * XB_PAGE_SIZE + 7] == 0x5c);
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_okay);
    __atomic_store_n(&g->gnt[ref], entry(XB_GTF_permit_access, 0, 6), __ATOMIC_RELEASE); /* another page */
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_permission_denied);
    __atomic_store_n(&g->gnt[ref], entry(XB_GTF_permit_access | XB_GTF_readonly, 0, 4), __ATOMIC_RELEASE);
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_permission_denied);
    __atomic_store_n(&g->gnt[ref], entry(XB_GTF_permit_access, 7, 4), __ATOMIC_RELEASE); /* to another domain */
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_permission_denied);
    __atomic_store_n(&g->gnt[ref], 0, __ATOMIC_RELEASE); /* revoked */
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_permission_denied);
    __atomic_store_n(&g->gnt[ref], entry(XB_GTF_permit_access, 0, 4), __ATOMIC_RELEASE);
    CHECK(xb_grant_map_still_valid(p, h, GUEST, ref) == XB_GNTST_okay);
    CHECK(xb_grant_map_still_valid(p, h, GUEST + 1, ref) == XB_GNTST_bad_domain);
    xb_grant_unmap(p, h);
    __atomic_store_n(&g->gnt[ref], 0, __ATOMIC_RELEASE);
    memset(g->mem + 4 * XB_PAGE_SIZE, 0, XB_PAGE_SIZE);
    printf("persistent mapping: valid only while the entry grants the same frame writable\n");
}

struct copier {
    struct xb_platform *p;
    unsigned frame;
};

static void *copy_loop(void *arg)
{
    struct copier *c = arg;
    uint8_t out[512], in[512];
    for (unsigned i = 0; i < 20000; i++) {
        memset(out, (int)(c->frame * 16 + i % 16), sizeof out);
        struct xb_copy_seg s[2] = {
            {.gref = c->frame + 8, .domid = GUEST, .offset = 512, .len = 512, .dir = XB_COPY_TO_GUEST, .local = out},
            {.gref = c->frame + 8, .domid = GUEST, .offset = 512, .len = 512, .dir = XB_COPY_FROM_GUEST, .local = in},
        };
        CHECK(xb_grant_copy(c->p, s, 2) == 0);
        CHECK(memcmp(in, out, sizeof in) == 0);
    }
    return NULL;
}

static void test_threads_with_attach_detach(struct xb_platform *p, struct guest *g)
{
    struct guest other;
    guest_init(&other);
    for (unsigned f = 3; f < 7; f++)
        __atomic_store_n(&g->gnt[f + 8], entry(XB_GTF_permit_access, 0, f), __ATOMIC_RELEASE);
    struct copier c[4];
    pthread_t t[4];
    for (unsigned i = 0; i < 4; i++) {
        c[i] = (struct copier){.p = p, .frame = 3 + i};
        CHECK(pthread_create(&t[i], NULL, copy_loop, &c[i]) == 0);
    }
    /* Another guest comes and goes while the queue threads copy. */
    for (unsigned i = 0; i < 200; i++) {
        char err[XB_ERRLEN];
        CHECK(xb_platform_sim_add_domain(p, GUEST + 1, other.mem_fd, PAGES, other.gnt_fd, ENTRIES, err) == 0);
        CHECK(xb_platform_sim_add_domain(p, GUEST + 1, other.mem_fd, PAGES, other.gnt_fd, ENTRIES, err) == -EEXIST);
        CHECK(xb_platform_sim_remove_domain(p, GUEST + 1) == 0);
        CHECK(xb_platform_sim_remove_domain(p, GUEST + 1) == -ENOENT);
    }
    for (unsigned i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    printf("4 copying threads while a domain was attached and detached 200 times: all copies verified\n");
}

static void test_real_without_xen(void)
{
    char err[XB_ERRLEN] = "";
    struct xb_platform *r = xb_platform_open_real(err);
    if (r) {
        printf("real platform: /dev/xen/gntdev opened (running under Xen)\n");
        xb_platform_close(r);
        return;
    }
    CHECK(strstr(err, "/dev/xen/gntdev") != NULL);
    printf("real platform without Xen: %s\n", err);
}

int main(void)
{
    struct guest g;
    guest_init(&g);
    char err[XB_ERRLEN];
    struct xb_platform *p = xb_platform_open_sim(0, err);
    CHECK(p);
    CHECK(xb_platform_sim_add_domain(p, GUEST, g.mem_fd, PAGES, g.gnt_fd, ENTRIES, err) == 0);
    test_racing_guest(p, &g);
    test_persistent_still_valid(p, &g);
    test_threads_with_attach_detach(p, &g);
    xb_platform_close(p);
    test_real_without_xen();
    return 0;
}
