/*
 * The simulated blkfront's data path (module `xenblk._simguest`).
 *
 * Python does the XenStore handshake and hands each negotiated queue to C: the
 * queue owns its shared ring (in the simulated domain's memory), a pool of
 * data/indirect pages with their grant references, and the event channel's two
 * eventfds. Its thread fills the ring in the negotiated ABI, notifies honouring
 * req_event, consumes responses, checks data and records latencies, without
 * the GIL. Everything Python reads back is in struct xb_sg_stats.
 */
#ifndef XB_SIMGUEST_API_H
#define XB_SIMGUEST_API_H
#include <stdint.h>
#include "common_api.h"
#include "xb_err.h"

/* XB_ERRLEN under the name xenblk/sim/guest_native.py reads. */
#define XB_SG_ERRLEN XB_ERRLEN

/* Latency histogram: exact below 32 ns, then 32 sub-buckets per power of two (<= 3% error). */
#define XB_SG_HIST_SUB 32
#define XB_SG_HIST_BUCKETS (XB_SG_HIST_SUB + (64 - 5) * XB_SG_HIST_SUB)
/* Guest grant references 0..7 are reserved (GNTTAB_NR_RESERVED_ENTRIES): console, xenstore. */
#define XB_SG_FIRST_FREE_GREF 8
#define XB_SG_MAX_BS (4u << 20)
#define XB_SG_MAX_IODEPTH 1024

enum xb_sg_rw {
    XB_SG_RW_READ = 0,
    XB_SG_RW_WRITE,
    XB_SG_RW_RANDREAD,
    XB_SG_RW_RANDWRITE,
    XB_SG_RW_RW,
    XB_SG_RW_RANDRW,
    XB_SG_RW_TRIM,
};

/* Misbehaving frontends, to show the backend survives them (the workload's own errors are then expected). */
enum xb_sg_hostile {
    XB_SG_HOSTILE_NONE = 0,
    XB_SG_HOSTILE_OVERFLOW, /* publish a request producer far past what the ring holds, then wait */
    XB_SG_HOSTILE_GARBAGE,  /* fill the ring with random requests: bad ops, segment counts, sectors, grants */
    XB_SG_HOSTILE_REVOKE,   /* the workload, with each request's data grants revoked before it is published */
    XB_SG_HOSTILE_NO_DRAIN, /* fill the ring once and never consume a response */
    XB_SG_HOSTILE_FLOOD,    /* kick the event channel in a tight loop with nothing to do */
    XB_SG_HOSTILE_REWRITE,  /* the workload, while a second thread keeps flipping published requests */
    /* keep the ring full of bs-sized writes (e.g. 1 MiB indirect) over one I/O's pages, each to the next
     * block of the region: the backend is asked to hold ring size x bs, whatever the guest's memory */
    XB_SG_HOSTILE_BIG_WRITES,
    /* write the region's first block, discard it, again, never flushing (one request at a time) */
    XB_SG_HOSTILE_DISCARD_LOOP,
};

struct xb_sg_domain;
struct xb_sg_queue;

struct xb_sg_queue_config {
    /* ring and channel */
    int abi;                  /* enum xb_abi */
    unsigned ring_pages;      /* 1..16 */
    uint64_t ring_frame;      /* ring_pages contiguous frames of guest memory */
    uint32_t ring_ref;        /* granted as ring_ref .. ring_ref+ring_pages-1 */
    int evt_recv_fd;          /* readable when the backend notified us (the queue closes it) */
    int evt_send_fd;          /* write 1 to notify the backend (the queue closes it) */
    uint16_t handle;          /* blkif handle: the device id's low 16 bits */
    uint16_t backend_domid;   /* the domain the grants are for */
    /* data page pool: one grant ref per page, ref = pool_ref + (frame - pool_frame) */
    uint64_t pool_frame;
    uint32_t pool_ref;
    uint64_t pool_pages;      /* >= xb_sg_pool_pages(cfg) */
    /* what the backend offered and we negotiated */
    unsigned max_segs;        /* segments per request: <= 11 direct, else indirect */
    int use_indirect;
    int persistent;
    int can_flush;
    int can_discard;
    unsigned sector_size;     /* logical sector size (bytes) */
    /* the workload */
    int rw;                   /* enum xb_sg_rw; -1: no I/O (idle) */
    uint32_t bs;
    unsigned iodepth;
    uint64_t region_start;    /* first block (units of bs) this queue owns */
    uint64_t region_blocks;
    uint64_t total_ios;       /* I/Os to issue (read/write/trim, not read-backs); 0 = until runtime */
    uint64_t runtime_ns;      /* 0 = until total_ios */
    int verify;
    uint64_t seed;
    unsigned rwmix_read;      /* percent of reads for rw/randrw */
    unsigned flush_every;     /* a FLUSH after every N writes; 0 = never */
    unsigned discard_every;   /* a DISCARD instead of every N-th I/O; 0 = never */
    uint64_t io_timeout_ns;   /* fail if in-flight I/O sees no response for this long */
    int hostile;              /* enum xb_sg_hostile */
};

struct xb_sg_stats {
    uint64_t reads, writes, flushes, discards;
    uint64_t bytes_read, bytes_written;
    uint64_t errors, verify_errors;
    uint64_t verified_reads, unverified_reads;
    uint64_t requests;        /* ring requests pushed */
    uint64_t responses, error_responses; /* ring responses consumed, those with a non-OK status */
    uint64_t notifies;        /* notifications sent to the backend */
    uint64_t wakeups;         /* waits for the backend */
    uint64_t start_ns, end_ns;
    uint64_t lat_count, lat_sum_ns, lat_max_ns;
    uint64_t hist[XB_SG_HIST_BUCKETS];
    int failed;               /* the queue stopped on an error (message in error) */
    char error[XB_SG_ERRLEN];
};

struct xb_sg_domain *xb_sg_domain_open(int mem_fd, uint64_t mem_pages, int gnttab_fd, uint32_t gnttab_entries,
                                       char *err);
void xb_sg_domain_close(struct xb_sg_domain *d);
/* Revoke every grant of the domain (a fresh boot of the simulated guest). */
void xb_sg_revoke_all(struct xb_sg_domain *d);

uint32_t xb_sg_ring_entries(int abi, unsigned ring_pages);
/* Pages the queue's pool needs for this config (0 with an error in err if it cannot work). */
uint64_t xb_sg_pool_pages(const struct xb_sg_queue_config *cfg, char *err);

/* From the ring half of cfg (abi .. backend_domid): initialises and grants the ring, before the frontend
 * publishes it. Takes ownership of the event-channel fds, also on failure. */
struct xb_sg_queue *xb_sg_queue_new(struct xb_sg_domain *d, const struct xb_sg_queue_config *cfg, char *err);
/* From the rest of cfg, once the backend is connected: the page pool and the workload. */
int xb_sg_queue_setup(struct xb_sg_queue *q, const struct xb_sg_queue_config *cfg, char *err);
int xb_sg_queue_start(struct xb_sg_queue *q, char *err);
/* Waits for the thread (call without the GIL; cffi releases it). 0 ok, -1 the queue failed. */
int xb_sg_queue_join(struct xb_sg_queue *q);
/* From any thread: stop issuing and drain (abort = 0), or give up on in-flight I/O at once (abort = 1). */
void xb_sg_queue_stop(struct xb_sg_queue *q, int abort);
void xb_sg_queue_stats(struct xb_sg_queue *q, struct xb_sg_stats *out);
/* Revokes the queue's grants and closes its channel fds; the thread must be joined. */
void xb_sg_queue_free(struct xb_sg_queue *q);

uint64_t xb_sg_hist_lower_ns(unsigned idx);
uint64_t xb_sg_hist_width_ns(unsigned idx);

/* The data pattern: 512-byte sectors at byte offset `off`, generation `gen` (>= 1), seed. */
void xb_sg_pattern_fill(void *buf, uint64_t off, uint64_t len, uint64_t seed, uint32_t gen);
/* Returns the byte offset (relative to buf) of the first bad sector, or -1 if all match. */
int64_t xb_sg_pattern_check(const void *buf, uint64_t off, uint64_t len, uint64_t seed, uint32_t gen);

#endif
