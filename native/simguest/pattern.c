/*
 * The data pattern: each 512-byte sector is a function of (seed, byte offset, generation), so the
 * same seed writes the same bytes at the same offsets on any disk, and a read can tell a stale or
 * misplaced sector from the right one. Word 0 holds the offset and word 1 the generation and the
 * seed's low bits in clear (for error messages); the rest is an xorshift stream keyed by all three.
 * Also the keyed permutation that gives the random block order of each pass.
 */
#include <string.h>
#include "sg_int.h"

#define SECTOR 512u
#define WORDS (SECTOR / 8)

uint64_t sg_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline void sector_words(uint64_t *w, uint64_t off, uint64_t seed, uint32_t gen)
{
    uint64_t x = sg_mix64(seed ^ sg_mix64(off ^ ((uint64_t)gen << 40))) | 1;
    w[0] = off;
    w[1] = (uint64_t)gen | (seed << 32);
    for (unsigned i = 2; i < WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
}

void xb_sg_pattern_fill(void *buf, uint64_t off, uint64_t len, uint64_t seed, uint32_t gen)
{
    uint8_t *p = buf;
    for (uint64_t done = 0; done + SECTOR <= len; done += SECTOR) {
        uint64_t w[WORDS];
        sector_words(w, off + done, seed, gen);
        memcpy(p + done, w, SECTOR);
    }
}

int64_t xb_sg_pattern_check(const void *buf, uint64_t off, uint64_t len, uint64_t seed, uint32_t gen)
{
    const uint8_t *p = buf;
    for (uint64_t done = 0; done + SECTOR <= len; done += SECTOR) {
        uint64_t w[WORDS];
        sector_words(w, off + done, seed, gen);
        if (memcmp(p + done, w, SECTOR) != 0)
            return (int64_t)done;
    }
    return -1;
}

/* ---- a keyed permutation of [0, n): the random block order of one pass ---- */

void sg_perm_init(struct sg_perm *p, uint64_t n, uint64_t key)
{
    p->n = n;
    unsigned bits = 2;
    while (bits < 64 && (1ull << bits) < n)
        bits += 2;
    p->half_bits = bits / 2;
    p->half_mask = (1ull << p->half_bits) - 1;
    for (unsigned r = 0; r < 4; r++)
        p->keys[r] = sg_mix64(key + r);
}

static uint64_t feistel(const struct sg_perm *p, uint64_t x)
{
    uint64_t l = x >> p->half_bits, r = x & p->half_mask;
    for (unsigned i = 0; i < 4; i++) {
        uint64_t f = sg_mix64(r ^ p->keys[i]) & p->half_mask;
        uint64_t nl = r;
        r = l ^ f;
        l = nl;
    }
    return (l << p->half_bits) | r;
}

uint64_t sg_perm_apply(const struct sg_perm *p, uint64_t i)
{
    uint64_t x = feistel(p, i);
    while (x >= p->n) /* the domain is < 4n, so this ends after a few steps on average */
        x = feistel(p, x);
    return x;
}
