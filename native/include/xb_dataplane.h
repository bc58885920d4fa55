/*
 * The data plane as the control plane sees it (module `xenblk._dataplane`).
 *
 * A device owns 1..N queues; each queue is one shared ring + one event channel
 * served by its own thread, which never touches Python. The control plane
 * creates the device after the frontend is Initialised, starts each queue, reads
 * statistics at any time without stopping anything, and stops the device
 * (drain in-flight, answer, unmap, unbind) when the frontend closes.
 */
#ifndef XB_DATAPLANE_H
#define XB_DATAPLANE_H

#include <stdint.h>
#include "xb_blkif.h"
#include "xb_platform.h"
#include "xb_storage.h"

#define XB_MAX_QUEUES 16

/* Ops as counted in statistics. */
enum xb_stat_op { XB_STAT_READ = 0, XB_STAT_WRITE, XB_STAT_FLUSH, XB_STAT_DISCARD, XB_STAT_BARRIER, XB_STAT_OPS };

/* Why a request was refused before touching storage (validation) or failed. */
enum xb_refusal {
    XB_REFUSE_BAD_OP = 0,        /* opcode not in the whitelist */
    XB_REFUSE_NSEG,              /* 0 or too many segments */
    XB_REFUSE_SECT,              /* first_sect > last_sect or last_sect > 7 */
    XB_REFUSE_RANGE,             /* beyond the end of the disk / wraps */
    XB_REFUSE_ALIGN,             /* not aligned to the logical sector size */
    XB_REFUSE_READONLY,          /* write/flush/discard on a read-only device */
    XB_REFUSE_SECURE,            /* secure discard not advertised */
    XB_REFUSE_INDIRECT,          /* bad indirect op / indirect page count */
    XB_REFUSE_GRANT,             /* grant map/copy failed */
    XB_REFUSE_UNSUPPORTED,       /* valid but not supported by this image (EOPNOTSUPP) */
    XB_REFUSE_REASONS
};

/* XB_ERR_QUOTA: EDQUOT, the image reached its size bound (a qcow2 file never grows past virtual size +
 * metadata + slack) or a filesystem quota; XB_ERR_NOSPC: the host filesystem is full. */
enum xb_error_reason { XB_ERR_IO = 0, XB_ERR_NOSPC, XB_ERR_GRANT, XB_ERR_OTHER, XB_ERR_QUOTA, XB_ERR_REASONS };

/* Latency histogram: upper bounds in ns, 1-2-5 steps from 10 us to 10 s, then +Inf. */
#define XB_LAT_BUCKETS 20
#define XB_SEG_BUCKETS 10    /* segments per request: <=1,2,4,8,11,16,32,64,128, then up to 256 */
#define XB_RING_BUCKETS 8    /* ring occupancy at wake-up, fraction of ring: <=1/64 .. 1 */

struct xb_op_stats {
    uint64_t requests;
    uint64_t bytes;
    uint64_t errors;
    uint64_t lat_buckets[XB_LAT_BUCKETS];     /* request received -> response pushed (non-cumulative) */
    uint64_t lat_sum_ns;
    uint64_t storage_buckets[XB_LAT_BUCKETS]; /* time inside storage only */
    uint64_t storage_sum_ns;
};

struct xb_queue_stats {
    struct xb_op_stats op[XB_STAT_OPS];
    uint64_t refusals[XB_REFUSE_REASONS];
    uint64_t errors[XB_ERR_REASONS];
    uint64_t seg_buckets[XB_SEG_BUCKETS];
    uint64_t ring_buckets[XB_RING_BUCKETS];
    uint64_t grant_copy_failures;
    uint64_t grant_map_failures;
    uint64_t notifications_in;
    uint64_t notifications_out;
    uint64_t in_flight; /* gauge */
    uint64_t ring_protocol_errors; /* e.g. producer overflow: the queue stopped */
    uint64_t mem_bytes; /* gauge: request data buffers this queue holds (in flight and kept for reuse) */
    uint64_t mem_waits; /* times the queue stopped taking requests until buffers came back (budget spent) */
    uint64_t mem_peak;  /* the most mem_bytes ever was (at most the queue's share of the budget) */
    /* persistent grants (pgrant.h) */
    uint64_t persistent_mapped;      /* gauge: grants mapped now */
    uint64_t persistent_maps;        /* grants mapped (each once until purged, dropped or disconnect) */
    uint64_t persistent_hits;        /* segments served by a mapping made earlier */
    uint64_t persistent_purged;      /* unmapped by the purge of unused grants (cache at its bound) */
    uint64_t persistent_invalidated; /* mappings dropped because the guest revoked or re-pointed the grant */
    /* QoS (qos.h): requests that waited for a limit, the ns they waited in all, and those waiting now */
    uint64_t qos_throttled;
    uint64_t qos_throttled_ns;
    uint64_t qos_queued; /* gauge */
};

struct xb_device_config {
    uint16_t domid;          /* frontend domain */
    uint16_t handle;         /* vdev number, for logs */
    enum xb_abi abi;
    unsigned ring_pages;     /* 1..16, a power of two */
    unsigned nr_queues;      /* 1..XB_MAX_QUEUES */
    int readonly;            /* mode r, or the image is read-only */
    int feature_persistent;  /* negotiated persistent grants */
    unsigned max_indirect_segments; /* advertised; 0 = indirect not offered */
    int secure_discard;      /* advertised discard-secure */
    unsigned max_work_per_wake; /* requests consumed per wake-up before yielding; 0 = default */
    /* Bytes of request data buffers the device's queues may hold together (split evenly between
     * them, but never less than one largest request per queue); 0 = XB_DEFAULT_MEMORY_BUDGET. */
    uint64_t memory_budget;
    unsigned max_persistent_grants; /* per queue, with feature_persistent; 0 = blkback's default (1056) */
};
#define XB_DEFAULT_MEMORY_BUDGET (64ull << 20)

struct xb_device;

struct xb_device *xb_device_new(struct xb_platform *p, struct xb_image *img, const struct xb_device_config *cfg,
                                char *err);
/* Map the ring (refs[0..ring_pages)) and start the queue thread. */
int xb_device_start_queue(struct xb_device *d, unsigned q, const xb_grant_ref_t *refs, unsigned nrefs,
                          struct xb_evtchn *ch, char *err);
/* Stop every queue: stop taking requests, wait for in-flight I/O, answer it, unmap, close channels. */
int xb_device_stop(struct xb_device *d);
void xb_device_free(struct xb_device *d);
/* Snapshot the counters of queue q (no lock held by the queue thread is needed). */
int xb_device_get_stats(struct xb_device *d, unsigned q, struct xb_queue_stats *out);
/* Non-zero if queue q stopped on its own (protocol error from the guest); message in err. */
int xb_device_queue_failed(struct xb_device *d, unsigned q, char *err);
/* An eventfd (the device's) that becomes readable when a queue fails: the control plane waits on it
 * instead of polling every queue. Reading it is the caller's; xb_device_queue_failed says which. */
int xb_device_fail_fd(struct xb_device *d);
/* The image grew: new requests are checked against the new size. */
void xb_device_set_size(struct xb_device *d, uint64_t bytes);

/* QoS: limits of a disk or of a group of disks (docs/DESIGN.md, "QoS"). A limiter is shared by the
 * devices it is given to (refcounted) and changed live; each limit is per second, 0 = unlimited, and
 * a burst of 0 means a tenth of the rate. READ limits count reads, WRITE limits writes, flushes and
 * discards (these without bytes), TOTAL limits all of them. */
enum xb_qos_kind { XB_QOS_READ = 0, XB_QOS_WRITE, XB_QOS_TOTAL, XB_QOS_KINDS };
#define XB_QOS_MAX_RATE (1ull << 50) /* per limit and burst; more is refused (bounds the arithmetic) */
struct xb_qos_limits {
    uint64_t iops[XB_QOS_KINDS];
    uint64_t bps[XB_QOS_KINDS];
    uint64_t iops_burst[XB_QOS_KINDS];
    uint64_t bps_burst[XB_QOS_KINDS];
};
struct xb_qos_stats {
    uint64_t throttled;    /* requests that had to wait for this limiter */
    uint64_t throttled_ns; /* the time they waited, summed */
    uint64_t queued;       /* gauge: requests waiting for it now */
    uint64_t admitted;     /* requests it let through (all, limited or not once active) */
    uint64_t admitted_bytes;
};
struct xb_qos;
struct xb_qos *xb_qos_new(char *err); /* unlimited, one reference (the caller's) */
void xb_qos_unref(struct xb_qos *q);  /* freed with the last reference (a device holds one) */
int xb_qos_set(struct xb_qos *q, const struct xb_qos_limits *lim, char *err); /* any thread, any time */
void xb_qos_get(struct xb_qos *q, struct xb_qos_limits *out);
void xb_qos_get_stats(struct xb_qos *q, struct xb_qos_stats *out);
/* The disk's limiter and its group's (either NULL), before the first queue starts. */
int xb_device_set_qos(struct xb_device *d, struct xb_qos *disk, struct xb_qos *group, char *err);
/* Limits changed: throttled queues look again now instead of at the end of their current wait. Never
 * blocks (during a start or stop of the device it does nothing: a stop drains regardless of limits). */
void xb_device_qos_changed(struct xb_device *d);

/* The statistics' vocabulary (stats.c), the one copy the exporter (xenblk/metrics.py) reads: the label
 * of each op and reason, indexed by the enums above, and the histograms' finite upper bounds (the last
 * bucket of each is +Inf). */
extern const char *const xb_stat_op_names[XB_STAT_OPS];
extern const char *const xb_refusal_names[XB_REFUSE_REASONS];
extern const char *const xb_error_reason_names[XB_ERR_REASONS];
extern const uint64_t xb_lat_bounds_ns[XB_LAT_BUCKETS - 1]; /* ns */
extern const unsigned xb_seg_bounds[XB_SEG_BUCKETS - 1];    /* segments per request */

#endif
