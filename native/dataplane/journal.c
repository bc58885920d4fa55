/* The ring journal (journal.h): one MAP_SHARED file per queue, written by its queue thread. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "journal.h"
#include "queue.h"

#define XB_JOURNAL_MAGIC 0x4c4e524a424b4258ull /* "XBKBJRNL" */
#define XB_JOURNAL_VERSION 1u
#define XB_JOURNAL_HDR 4096u
#define XB_JRAW 112u /* the larger ring entry (x86_64) */

enum { XB_JSLOT_FREE = 0, XB_JSLOT_TAKEN = 1, XB_JSLOT_ANSWERED = 2 };

struct xb_jhdr {
    uint64_t magic; /* written last when a journal is created */
    uint32_t version;
    uint32_t abi;
    uint32_t ring_size;
    uint32_t slot_size;
    char ident[XB_JOURNAL_IDENT_LEN];
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
};

struct xb_jslot {
    uint32_t state;
    uint32_t idx;         /* ring index the request was taken from */
    uint32_t answered_at; /* ring index of its response, once ANSWERED */
    uint32_t pad;
    uint8_t raw[XB_JRAW]; /* the private copy of the ring entry */
};
_Static_assert(sizeof(struct xb_jslot) == 128, "journal slot layout");

struct xb_journal {
    char path[PATH_MAX];
    char ident[XB_JOURNAL_IDENT_LEN];
    int resume;
    uint8_t *map;
    size_t len;
    struct xb_jhdr *h;
    struct xb_jslot *slots;
    uint32_t *replay; /* request slots to execute again, in ring order */
    unsigned replay_n, replay_i;
    int published;
};

static int crash_point;
static unsigned crash_after;

void xb_journal_crash_at(int point, unsigned after)
{
    __atomic_store_n(&crash_after, after, __ATOMIC_RELAXED);
    __atomic_store_n(&crash_point, point, __ATOMIC_RELEASE);
}

static void maybe_crash(int point)
{
    if (__atomic_load_n(&crash_point, __ATOMIC_ACQUIRE) != point)
        return;
    if (__atomic_fetch_sub(&crash_after, 1, __ATOMIC_RELAXED) == 0)
        raise(SIGKILL);
}

int xb_device_set_journal(struct xb_device *d, unsigned qi, const char *path, const char *ident, int resume,
                          char *err)
{
    if (qi >= d->cfg.nr_queues) {
        xb_seterr(err, "device %u: no queue %u", d->cfg.handle, qi);
        return -1;
    }
    if (!path || strlen(path) >= PATH_MAX || !ident) {
        xb_seterr(err, "device %u queue %u: bad journal path", d->cfg.handle, qi);
        return -1;
    }
    pthread_mutex_lock(&d->lock);
    struct xb_queue *q = &d->q[qi];
    int rc = -1;
    if (q->started || d->stopped) {
        xb_seterr(err, "device %u queue %u: journal must be set before the queue starts", d->cfg.handle, qi);
        goto out;
    }
    if (!q->journal && !(q->journal = calloc(1, sizeof(*q->journal)))) {
        xb_seterr(err, "device %u queue %u: out of memory", d->cfg.handle, qi);
        goto out;
    }
    snprintf(q->journal->path, sizeof(q->journal->path), "%s", path);
    memset(q->journal->ident, 0, sizeof(q->journal->ident));
    strncpy(q->journal->ident, ident, sizeof(q->journal->ident) - 1);
    q->journal->resume = resume;
    rc = 0;
out:
    pthread_mutex_unlock(&d->lock);
    return rc;
}

static void unmap(struct xb_journal *j)
{
    if (j->map)
        munmap(j->map, j->len);
    j->map = NULL;
    free(j->replay);
    j->replay = NULL;
}

void xb_journal_detach(struct xb_queue *q)
{
    if (!q->journal)
        return;
    unmap(q->journal);
    free(q->journal);
    q->journal = NULL;
}

static int map_file(struct xb_journal *j, struct xb_queue *q, char *err)
{
    j->len = XB_JOURNAL_HDR + (size_t)q->ring_size * sizeof(struct xb_jslot);
    int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | (j->resume ? 0 : O_CREAT | O_TRUNC);
    int fd = open(j->path, flags, 0600);
    if (fd < 0) {
        xb_seterr(err, "journal %s: %s", j->path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || (!j->resume && ftruncate(fd, (off_t)j->len) < 0)) {
        xb_seterr(err, "journal %s: %s", j->path, strerror(errno));
        close(fd);
        return -1;
    }
    if (j->resume && (!S_ISREG(st.st_mode) || (size_t)st.st_size != j->len)) {
        xb_seterr(err, "journal %s: %lld bytes, expected %zu for a ring of %u", j->path, (long long)st.st_size, j->len,
               q->ring_size);
        close(fd);
        return -1;
    }
    void *m = mmap(NULL, j->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        xb_seterr(err, "journal %s: mmap: %s", j->path, strerror(errno));
        return -1;
    }
    j->map = m;
    j->h = m;
    j->slots = (struct xb_jslot *)(j->map + XB_JOURNAL_HDR);
    return 0;
}

static void free_list_remove(struct xb_queue *q, struct xb_req *r)
{
    for (struct xb_req **p = &q->free_reqs; *p; p = &(*p)->next_free)
        if (*p == r) {
            *p = r->next_free;
            return;
        }
}

/* What a killed daemon left: count a response already in the ring, find the requests to run again. */
static int recover(struct xb_journal *j, struct xb_queue *q, char *err)
{
    struct xb_jhdr *h = j->h;
    if (h->magic != XB_JOURNAL_MAGIC || h->version != XB_JOURNAL_VERSION || h->abi != (uint32_t)q->dev->cfg.abi ||
        h->ring_size != q->ring_size || h->slot_size != sizeof(struct xb_jslot) ||
        memcmp(h->ident, j->ident, sizeof(h->ident)) != 0) {
        xb_seterr(err, "journal %s was written for another ring or image", j->path);
        return -1;
    }
    uint32_t cons = __atomic_load_n(&h->req_cons, __ATOMIC_ACQUIRE);
    uint32_t rsp = __atomic_load_n(&h->rsp_prod_pvt, __ATOMIC_ACQUIRE);
    /* A response written and marked but not counted yet is in the ring at rsp: count it. */
    for (uint32_t i = 0; i < q->ring_size; i++)
        if (j->slots[i].state == XB_JSLOT_ANSWERED && j->slots[i].answered_at == rsp) {
            rsp++;
            break;
        }
    uint32_t taken = 0;
    for (uint32_t i = 0; i < q->ring_size; i++) {
        struct xb_jslot *s = &j->slots[i];
        if (s->state == XB_JSLOT_TAKEN) {
            taken++;
            if ((uint32_t)(s->idx - cons) < 0x80000000u) /* taken, req_cons not advanced yet */
                cons = s->idx + 1;
        } else if (s->state != XB_JSLOT_FREE && s->state != XB_JSLOT_ANSWERED) {
            xb_seterr(err, "journal %s: slot %u in unknown state %u", j->path, i, s->state);
            return -1;
        }
    }
    uint32_t ring_rsp = __atomic_load_n(&q->sring->rsp_prod, __ATOMIC_ACQUIRE);
    uint32_t ring_req = __atomic_load_n(&q->sring->req_prod, __ATOMIC_ACQUIRE);
    if (cons - rsp != taken || (uint32_t)(rsp - ring_rsp) > q->ring_size || (uint32_t)(ring_req - cons) > q->ring_size ||
        (uint32_t)(ring_req - rsp) > q->ring_size) {
        xb_seterr(err,
               "journal %s does not fit the ring (journal: consumed %u, answered %u, in flight %u; ring: requests %u, "
               "responses %u)",
               j->path, cons, rsp, taken, ring_req, ring_rsp);
        return -1;
    }
    j->replay = calloc(taken ? taken : 1, sizeof(*j->replay));
    if (!j->replay) {
        xb_seterr(err, "journal %s: out of memory", j->path);
        return -1;
    }
    /* Ring order: a barrier is the last request taken (nothing is taken while one waits). Ordered by
     * age before req_cons, not from rsp: requests are answered out of order, so one taken long before
     * (a slow flush while ring_size others completed) may still be in flight and comes first. */
    j->replay_n = 0;
    for (uint32_t i = 0; i < q->ring_size; i++) {
        if (j->slots[i].state != XB_JSLOT_TAKEN)
            continue;
        if ((uint32_t)(cons - 1 - j->slots[i].idx) >= 0x80000000u) {
            xb_seterr(err, "journal %s: request slot %u names ring index %u, not taken before %u", j->path, i,
                   j->slots[i].idx, cons);
            return -1;
        }
        unsigned k = j->replay_n++;
        while (k > 0 && (uint32_t)(j->slots[j->replay[k - 1]].idx - cons) > (uint32_t)(j->slots[i].idx - cons)) {
            j->replay[k] = j->replay[k - 1];
            k--;
        }
        j->replay[k] = i;
    }
    /* Each ring index was taken once (a journal that says otherwise was not written in this order). */
    for (unsigned k = 1; k < j->replay_n; k++)
        if (j->slots[j->replay[k]].idx == j->slots[j->replay[k - 1]].idx) {
            xb_seterr(err, "journal %s: ring index %u taken twice", j->path, j->slots[j->replay[k]].idx);
            return -1;
        }
    for (unsigned k = 0; k < j->replay_n; k++)
        free_list_remove(q, &q->reqs[j->replay[k]]);
    __atomic_store_n(&h->rsp_prod_pvt, rsp, __ATOMIC_RELEASE);
    __atomic_store_n(&h->req_cons, cons, __ATOMIC_RELEASE);
    for (uint32_t i = 0; i < q->ring_size; i++)
        if (j->slots[i].state == XB_JSLOT_ANSWERED)
            __atomic_store_n(&j->slots[i].state, XB_JSLOT_FREE, __ATOMIC_RELEASE);
    q->req_cons = cons;
    q->rsp_prod_pvt = rsp;
    return 0;
}

int xb_journal_attach(struct xb_queue *q, char *err)
{
    struct xb_journal *j = q->journal;
    if (!j)
        return 0;
    if (map_file(j, q, err) < 0)
        return -1;
    j->replay_n = j->replay_i = 0;
    j->published = 0;
    if (j->resume) {
        if (recover(j, q, err) < 0) {
            unmap(j);
            return -1;
        }
        return 0;
    }
    struct xb_jhdr *h = j->h;
    h->version = XB_JOURNAL_VERSION;
    h->abi = (uint32_t)q->dev->cfg.abi;
    h->ring_size = q->ring_size;
    h->slot_size = sizeof(struct xb_jslot);
    memcpy(h->ident, j->ident, sizeof(h->ident));
    h->req_cons = q->req_cons;
    h->rsp_prod_pvt = q->rsp_prod_pvt;
    __atomic_store_n(&h->magic, XB_JOURNAL_MAGIC, __ATOMIC_RELEASE);
    j->published = 1; /* nothing to publish or execute again */
    return 0;
}

void xb_journal_take(struct xb_queue *q, const void *raw, uint32_t idx)
{
    struct xb_journal *j = q->journal;
    if (!j || !q->free_reqs)
        return;
    struct xb_jslot *s = &j->slots[q->free_reqs - q->reqs];
    memset(s->raw, 0, sizeof(s->raw));
    memcpy(s->raw, raw, xb_ring_entry_size(q->dev->cfg.abi));
    s->idx = idx;
    __atomic_store_n(&s->state, XB_JSLOT_TAKEN, __ATOMIC_RELEASE);
    maybe_crash(XB_JPOINT_TAKEN);
}

void xb_journal_consumed(struct xb_queue *q)
{
    struct xb_journal *j = q->journal;
    if (!j)
        return;
    __atomic_store_n(&j->h->req_cons, q->req_cons, __ATOMIC_RELEASE);
    maybe_crash(XB_JPOINT_CONSUMED);
}

void xb_journal_answered(struct xb_queue *q, struct xb_req *r)
{
    struct xb_journal *j = q->journal;
    if (!j)
        return;
    maybe_crash(XB_JPOINT_RSP_WRITTEN);
    struct xb_jslot *s = &j->slots[r - q->reqs];
    uint32_t at = q->rsp_prod_pvt - 1;
    __atomic_store_n(&s->answered_at, at, __ATOMIC_RELEASE);
    __atomic_store_n(&s->state, XB_JSLOT_ANSWERED, __ATOMIC_RELEASE);
    maybe_crash(XB_JPOINT_ANSWERED);
    __atomic_store_n(&j->h->rsp_prod_pvt, q->rsp_prod_pvt, __ATOMIC_RELEASE);
    maybe_crash(XB_JPOINT_COUNTED);
    __atomic_store_n(&s->state, XB_JSLOT_FREE, __ATOMIC_RELEASE);
}

int xb_journal_next_replay(struct xb_queue *q, void *raw)
{
    struct xb_journal *j = q->journal;
    if (!j)
        return 0;
    if (!j->published) {
        /* Responses the killed daemon wrote and counted but did not push: the guest sees them now. */
        j->published = 1;
        __atomic_store_n(&q->sring->rsp_prod, q->rsp_prod_pvt, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        xb_evtchn_notify(q->ch);
    }
    if (j->replay_i == j->replay_n)
        return 0;
    uint32_t i = j->replay[j->replay_i++];
    struct xb_req *r = &q->reqs[i];
    free_list_remove(q, r);
    r->next_free = q->free_reqs;
    q->free_reqs = r;
    memcpy(raw, j->slots[i].raw, xb_ring_entry_size(q->dev->cfg.abi));
    return 1;
}
