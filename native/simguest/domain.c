/* The simulated guest's view of its domain: its memory and its grant table, both shared with the backend. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "sg_int.h"

struct xb_sg_domain *xb_sg_domain_open(int mem_fd, uint64_t mem_pages, int gnttab_fd, uint32_t gnttab_entries,
                                       char *err)
{
    struct stat st;
    if (fstat(mem_fd, &st) < 0 || (uint64_t)st.st_size < mem_pages * XB_PAGE_SIZE) {
        xb_seterr(err, "guest memory file is smaller than %llu pages", (unsigned long long)mem_pages);
        return NULL;
    }
    if (fstat(gnttab_fd, &st) < 0 || (uint64_t)st.st_size < (uint64_t)gnttab_entries * sizeof(struct xb_grant_entry_v1)) {
        xb_seterr(err, "grant table file is smaller than %u entries", gnttab_entries);
        return NULL;
    }
    struct xb_sg_domain *d = calloc(1, sizeof(*d));
    if (!d) {
        xb_seterr(err, "out of memory");
        return NULL;
    }
    d->mem_pages = mem_pages;
    d->gnttab_entries = gnttab_entries;
    d->mem = mmap(NULL, mem_pages * XB_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (d->mem == MAP_FAILED) {
        xb_seterr(err, "mapping guest memory: %s", strerror(errno));
        free(d);
        return NULL;
    }
    d->gnttab = mmap(NULL, (size_t)gnttab_entries * sizeof(struct xb_grant_entry_v1), PROT_READ | PROT_WRITE,
                     MAP_SHARED, gnttab_fd, 0);
    if (d->gnttab == MAP_FAILED) {
        xb_seterr(err, "mapping the grant table: %s", strerror(errno));
        munmap(d->mem, mem_pages * XB_PAGE_SIZE);
        free(d);
        return NULL;
    }
    return d;
}

void xb_sg_domain_close(struct xb_sg_domain *d)
{
    if (!d)
        return;
    munmap(d->gnttab, (size_t)d->gnttab_entries * sizeof(struct xb_grant_entry_v1));
    munmap(d->mem, d->mem_pages * XB_PAGE_SIZE);
    free(d);
}

void sg_grant(struct xb_sg_domain *d, uint32_t ref, uint64_t frame, uint16_t domid, int readonly)
{
    struct xb_grant_entry_v1 *e = &d->gnttab[ref];
    __atomic_store_n(&e->frame, (uint32_t)frame, __ATOMIC_RELAXED);
    __atomic_store_n(&e->domid, domid, __ATOMIC_RELAXED);
    uint16_t flags = XB_GTF_permit_access | (readonly ? XB_GTF_readonly : 0);
    __atomic_store_n(&e->flags, flags, __ATOMIC_RELEASE);
}

void sg_revoke(struct xb_sg_domain *d, uint32_t ref)
{
    __atomic_store_n(&d->gnttab[ref].flags, (uint16_t)0, __ATOMIC_RELEASE);
}

void xb_sg_revoke_all(struct xb_sg_domain *d)
{
    for (uint32_t r = 0; r < d->gnttab_entries; r++)
        sg_revoke(d, r);
}
