/*
 * QoS token buckets (native/dataplane/qos.c) on a simulated clock: the long-run rate is the limit, the
 * burst is what it says, unlimited costs nothing, huge limits and costs neither overflow nor wrap, a
 * changed limit applies at once, and two limiters (a disk and its group) are checked and charged together.
 */
#include <stdio.h>
#include <stdlib.h>
#include "qos.h"
#include "slowpath.h"

static int failures;
static const char *ctx = "";
#define CHECK(c)                                                                                                       \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "%s:%d: %s: failed: %s\n", __FILE__, __LINE__, ctx, #c);                                  \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

#define SEC 1000000000ull
#define T0 (1000 * SEC) /* a clock that has run a while */

/* Requests of `cost` started as soon as the bucket allows, over [t0, t0 + span): how many. */
static uint64_t run(struct xb_bucket *b, uint64_t cost, uint64_t t0, uint64_t span)
{
    uint64_t t = t0, n = 0;
    for (;;) {
        t += xb_bucket_wait(b, t);
        if (t >= t0 + span)
            return n;
        xb_bucket_charge(b, cost, t);
        n++;
    }
}

static void rates(void)
{
    static const uint64_t r[] = {1, 7, 100, 333, 4096, 1000000, 123456789};
    for (unsigned i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        ctx = "rate";
        struct xb_bucket b = {0};
        xb_bucket_set(&b, r[i], 1, T0);
        /* 10 s: the limit exactly, plus the burst (1) and the first request (which finds the bucket full) */
        uint64_t n = run(&b, 1, T0, 10 * SEC);
        CHECK(n >= r[i] * 10 && n <= r[i] * 10 + 2);
        if (!(n >= r[i] * 10 && n <= r[i] * 10 + 2))
            fprintf(stderr, "  rate %llu: %llu in 10 s\n", (unsigned long long)r[i], (unsigned long long)n);
    }
    ctx = "bytes";
    struct xb_bucket b = {0};
    xb_bucket_set(&b, 1000000, 65536, T0); /* 1 MB/s, 64 KiB burst, 4 KiB requests */
    uint64_t n = run(&b, 4096, T0, 10 * SEC);
    CHECK(n * 4096 <= 10 * 1000000ull + 65536 + 4096);
    CHECK(n * 4096 >= 10 * 1000000ull);
}

static void burst(void)
{
    ctx = "burst";
    struct xb_bucket b = {0};
    xb_bucket_set(&b, 100, 20, T0);
    /* after idleness: the burst (20) and one more at once, then one per 10 ms */
    CHECK(run(&b, 1, T0, 1) == 21);
    CHECK(xb_bucket_wait(&b, T0) == 10000000ull);
    /* idle for long: refills to the burst, not beyond */
    CHECK(run(&b, 1, T0 + 100 * SEC, 1) == 21);
    ctx = "default burst";
    xb_bucket_set(&b, 0, 0, T0);
    xb_bucket_set(&b, 1000, 0, T0); /* a tenth of the rate: 100 */
    CHECK(run(&b, 1, T0, 1) == 101);
    ctx = "request larger than the burst";
    xb_bucket_set(&b, 0, 0, T0);
    xb_bucket_set(&b, 1000, 10, T0);
    CHECK(xb_bucket_wait(&b, T0) == 0);
    xb_bucket_charge(&b, 1000000, T0); /* goes at once; the next waits until it is paid */
    CHECK(xb_bucket_wait(&b, T0) == 1000 * SEC - 10000000ull);
}

static void unlimited(void)
{
    ctx = "unlimited";
    struct xb_bucket b = {0};
    xb_bucket_set(&b, 0, 12345, T0);
    for (int i = 0; i < 1000; i++)
        xb_bucket_charge(&b, UINT64_MAX, T0);
    CHECK(xb_bucket_wait(&b, T0) == 0);
    CHECK(b.tat == 0);
    /* limited, then unlimited again: the debt is gone */
    xb_bucket_set(&b, 10, 1, T0);
    xb_bucket_charge(&b, 1000, T0);
    CHECK(xb_bucket_wait(&b, T0) > 0);
    xb_bucket_set(&b, 0, 0, T0);
    CHECK(xb_bucket_wait(&b, T0) == 0);
}

static void huge(void)
{
    ctx = "huge";
    struct xb_bucket b = {0};
    xb_bucket_set(&b, XB_QOS_MAX_RATE, XB_QOS_MAX_RATE, T0);
    xb_bucket_charge(&b, UINT64_MAX, T0);
    uint64_t w = xb_bucket_wait(&b, T0);
    CHECK(w > 0 && w < UINT64_MAX / 2);
    xb_bucket_set(&b, UINT64_MAX, UINT64_MAX, T0); /* clamped to the maximum */
    CHECK(b.rate == XB_QOS_MAX_RATE);
    struct xb_bucket s = {0};
    xb_bucket_set(&s, 1, 0, T0); /* 1 B/s, a 2^64-byte request: saturates, never wraps to "now" */
    xb_bucket_charge(&s, UINT64_MAX, T0);
    xb_bucket_charge(&s, UINT64_MAX, T0);
    CHECK(xb_bucket_wait(&s, T0) >= UINT64_MAX / 8);
    CHECK(xb_bucket_wait(&s, UINT64_MAX - 1) == 0 || s.tat <= UINT64_MAX / 4);
    /* a clock near its end */
    struct xb_bucket e = {0};
    xb_bucket_set(&e, 1000, 10, UINT64_MAX / 4 - SEC);
    CHECK(xb_bucket_wait(&e, UINT64_MAX / 4 - SEC) == 0);
}

static void change(void)
{
    ctx = "change";
    struct xb_bucket b = {0};
    xb_bucket_set(&b, 1, 1, T0);
    xb_bucket_charge(&b, 1, T0);
    xb_bucket_charge(&b, 1, T0);
    xb_bucket_charge(&b, 1, T0); /* 3 s of debt at 1/s, 1 s tolerated: wait 2 s */
    CHECK(xb_bucket_wait(&b, T0) == 2 * SEC);
    xb_bucket_set(&b, 1000, 1, T0); /* the same debt at 1000/s: 3 ms, 1 ms tolerated */
    CHECK(xb_bucket_wait(&b, T0) == 2000000ull);
    xb_bucket_set(&b, 1, 1, T0); /* and back: it is not forgiven */
    CHECK(xb_bucket_wait(&b, T0) == 2 * SEC);
    ctx = "smaller burst";
    struct xb_bucket c = {0};
    xb_bucket_set(&c, 100, 1000, T0);
    xb_bucket_charge(&c, 1000, T0); /* the whole burst used: 10 s of the rate */
    CHECK(xb_bucket_wait(&c, T0) == 0);
    xb_bucket_set(&c, 100, 10, T0); /* empty under the new burst, not 10 s in debt */
    CHECK(xb_bucket_wait(&c, T0) == 0);
    xb_bucket_charge(&c, 1, T0);
    CHECK(xb_bucket_wait(&c, T0) == 10000000ull);
    ctx = "larger burst";
    struct xb_bucket d = {0};
    xb_bucket_set(&d, 100, 10, T0); /* full: 10 tokens, still 10 after the burst grows */
    xb_bucket_set(&d, 100, 1000, T0);
    CHECK(run(&d, 1, T0, 1) == 11);
}

static void limiters(void)
{
    ctx = "limiters";
    char err[256];
    struct xb_qos *disk = xb_qos_new(err), *group = xb_qos_new(err);
    CHECK(disk && group);
    if (!disk || !group)
        return;
    struct xb_qos_limits lim = {0};
    CHECK(xb_qos_admit(disk, group, XB_QOS_READ, 4096, T0, NULL) == 0); /* nothing set: unlimited */
    lim.iops[XB_QOS_TOTAL] = XB_QOS_MAX_RATE + 1;
    CHECK(xb_qos_set(disk, &lim, err) < 0);
    lim.iops[XB_QOS_TOTAL] = 0;
    lim.bps[XB_QOS_WRITE] = 1000;
    lim.bps_burst[XB_QOS_WRITE] = 1;
    CHECK(xb_qos_set(disk, &lim, err) == 0);
    struct xb_qos_limits g = {0};
    g.iops[XB_QOS_READ] = 10;
    g.iops_burst[XB_QOS_READ] = 1;
    CHECK(xb_qos_set(group, &g, err) == 0);
    uint64_t now = xb_now_ns();
    unsigned blocked = 9;
    /* reads: only the group's read limit */
    CHECK(xb_qos_admit(disk, group, XB_QOS_READ, 4096, now, &blocked) == 0 && blocked == 0);
    CHECK(xb_qos_admit(disk, group, XB_QOS_READ, 4096, now, &blocked) == 0);
    CHECK(xb_qos_admit(disk, group, XB_QOS_READ, 4096, now, &blocked) > 0 && blocked == 2);
    /* writes: the disk's byte limit, not the group's read limit; a flush (no bytes) is not held by bytes */
    CHECK(xb_qos_admit(disk, group, XB_QOS_WRITE, 4096, now, &blocked) == 0);
    CHECK(xb_qos_admit(disk, group, XB_QOS_WRITE, 4096, now, &blocked) > 0 && blocked == 1);
    CHECK(xb_qos_admit(disk, group, XB_QOS_WRITE, 0, now, &blocked) == 0);
    struct xb_qos_stats st;
    xb_qos_get_stats(disk, &st);
    CHECK(st.admitted == 4 && st.admitted_bytes == 3 * 4096); /* 2 reads, a write, a flush */
    xb_qos_get_stats(group, &st);
    CHECK(st.admitted == 4);
    xb_qos_queued(group, 1, 0);
    xb_qos_queued(group, -1, 500);
    xb_qos_get_stats(group, &st);
    CHECK(st.throttled == 1 && st.queued == 0 && st.throttled_ns == 500);
    struct xb_qos_limits back;
    xb_qos_get(disk, &back);
    CHECK(back.bps[XB_QOS_WRITE] == 1000);
    xb_qos_unref(disk);
    xb_qos_unref(group);
}

int main(void)
{
    rates();
    burst();
    unlimited();
    huge();
    change();
    limiters();
    if (failures) {
        fprintf(stderr, "test_qos: %d failures\n", failures);
        return 1;
    }
    printf("test_qos: ok\n");
    return 0;
}
