/* qcow2 driver internals, split by concern like the on-disk format:
 * qcow2.c (header, open/close), qcow2_cache.c (L2 and refcount block cache),
 * qcow2_refcount.c (refcounts, allocation, ordered metadata flush),
 * qcow2_io.c (cluster mapping, reads, writes, discard), qcow2_check.c. */
#ifndef XB_QCOW2_H
#define XB_QCOW2_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include "storage_int.h"

#define QC_OFLAG_COPIED (1ULL << 63)
#define QC_OFLAG_COMPRESSED (1ULL << 62)
#define QC_OFLAG_ZERO 1ULL
#define QC_OFFSET_MASK 0x00fffffffffffe00ULL
#define QC_CACHE_ENTRIES 32
#define QC_RESERVE_MAX 64
#define QC_RESERVE_BYTES (4ULL << 20)
/* Frees pending (not yet applied) that force a reclaim even while the file need not grow: bounds
 * the pending list of a guest that discards without ever flushing. */
#define QC_PENDING_MAX 4096
/* Clusters the file may hold beyond its computed bound (virtual size + metadata + reserve). */
#define QC_CAP_SLACK_CLUSTERS 8

/* The qcow2 header (QEMU's docs/interop/qcow2.txt): the layout is the file's, so offsetof() names a
 * field's place on disk; the values are in host byte order once qc_header_decode() read them. */
struct qc_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size; /* virtual size, bytes */
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* version 3 (a version 2 header ends here: QC_HEADER_V2_LEN) */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type; /* only with QCOW2_INCOMPAT_COMPRESSION and header_length > 104 */
} __attribute__((packed));
#define QC_HEADER_V2_LEN 72u
#define QC_HEADER_V3_MIN_LEN 104u /* a version 3 header without compression_type */
_Static_assert(offsetof(struct qc_header, refcount_table_offset) == 48, "qcow2 header layout");
_Static_assert(offsetof(struct qc_header, incompatible_features) == QC_HEADER_V2_LEN, "qcow2 header layout");
_Static_assert(offsetof(struct qc_header, autoclear_features) == 88, "qcow2 header layout");
_Static_assert(offsetof(struct qc_header, compression_type) == QC_HEADER_V3_MIN_LEN, "qcow2 header layout");

/* Incompatible features: a reader that does not know a bit set here must not open the image. */
#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)       /* refcounts may be stale (lazy refcounts, not closed cleanly) */
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)     /* metadata known to be inconsistent */
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)   /* guest data lives in an external data file */
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3) /* compression_type is set (0 zlib, 1 zstd) */
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)       /* extended L2 entries (subclusters) */
/* Compatible features: safe to ignore. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
/* Autoclear features: a writer that does not maintain what they describe clears them all at open. */
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)       /* persistent dirty bitmaps are consistent */
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ULL << 1) /* the external data file is a valid raw image */

struct qc_cache_ent {
    uint64_t off; /* host offset of the cached cluster; 0 = unused slot */
    uint8_t *buf;
    int dirty;
    uint64_t lru;
};

struct qc_cache {
    struct qc_cache_ent e[QC_CACHE_ENTRIES];
    uint64_t tick;
    int is_l2; /* evicting a dirty L2 table first makes the refcounts durable */
};

enum qc_type { QC_UNALLOC, QC_NORMAL, QC_ZERO, QC_COMPRESSED };

struct qcow2 {
    int fd;
    int ro;
    struct xb_image img;
    pthread_mutex_t lock;
    char path[4096];
    int version;
    unsigned cluster_bits, l2_bits;
    uint64_t cs;
    uint32_t header_len;
    uint64_t incompat, compat, autoclear;
    int ctype;
    uint32_t nb_snapshots;
    uint64_t l1_off;
    uint32_t l1_size;
    uint64_t *l1; /* host byte order */
    int l1_dirty;
    uint64_t rt_off;
    uint64_t rt_entries;
    uint64_t *rt; /* host byte order */
    int rt_dirty, rt_moved;
    uint64_t rt_old_off, rt_old_clusters;
    int rc_order;
    unsigned rb_bits; /* log2(refcount entries per block) */
    uint64_t file_end;  /* cluster-aligned end of what is allocated */
    uint64_t disk_size; /* bytes actually in the file */
    uint64_t free_hint; /* lowest cluster index that may be free */
    struct qc_cache l2c, rbc;
    uint64_t *pending; /* host clusters to decrement once the metadata dropping them is durable */
    size_t npending, cap_pending;
    /* Host clusters of the direct I/O extents handed out by map() and not yet unmapped (a
     * multiset): a pending free of one of them waits until its I/O is over. */
    uint64_t *infl;
    size_t ninfl, cap_infl;
    size_t pend_held; /* pending frees the last reclaim kept back (their cluster had I/O in flight) */
    /* The file never grows past this (virtual size + metadata + slack, or the size it had at open
     * plus the slack): an allocation beyond fails with EDQUOT. 0: not computed yet. */
    uint64_t max_file_end;
    /* XB_OPEN_WRITETHROUGH_META: clusters whose refcount 1 is already durable and that nothing
     * references yet; allocations come from here, so an L2/L1 entry may be written at once. */
    int meta_wt;
    uint64_t reserve[QC_RESERVE_MAX]; /* cluster indices */
    unsigned nreserve;
    int64_t wt_l1_idx; /* L1 entry of a new L2 table not yet written through; -1 none */
    /* Decompression state, made at the first compressed read and reused (under lock): one zstd
     * context (window limited to a cluster) and one zlib stream per image, not one per read. */
    void *zstd_dctx;
    void *zlib_stream;
    struct xb_image *backing;
    char backing_file[1024];
    char backing_fmt[32];
};

static inline struct qcow2 *QC(struct xb_image *img) { return img->priv; }

/* cache */
int qc_cache_init(struct qcow2 *q, struct qc_cache *c, int is_l2);
void qc_cache_free(struct qc_cache *c);
/* Returns the cached cluster at host offset off, reading it (or zeroing it when
 * fresh) on a miss; NULL with *rc set on error. */
uint8_t *qc_cache_get(struct qcow2 *q, struct qc_cache *c, uint64_t off, int fresh, int *rc);
void qc_cache_mark_dirty(struct qc_cache *c, const uint8_t *buf);
int qc_cache_writeback(struct qcow2 *q, struct qc_cache *c);
/* Writes one cached cluster (by its buffer) to the file now; no sync. */
int qc_cache_write_buf(struct qcow2 *q, struct qc_cache *c, const uint8_t *buf);

/* refcounts */
int qc_rc_get(struct qcow2 *q, uint64_t cluster, uint64_t *val);
int qc_rc_set(struct qcow2 *q, uint64_t cluster, uint64_t val);
int64_t qc_alloc_cluster(struct qcow2 *q);
int qc_pend_free(struct qcow2 *q, uint64_t host_off);
int qc_flush_refcounts(struct qcow2 *q);
int qc_apply_pending(struct qcow2 *q);
int qc_flush_locked(struct qcow2 *q);
int qc_is_metadata(struct qcow2 *q, uint64_t host_off);
/* Applies the pending frees after making the metadata that dropped them durable (an internal
 * flush), when enough are pending; a guest that never flushes still gets its clusters back. */
int qc_maybe_reclaim(struct qcow2 *q);
int qc_inflight_add(struct qcow2 *q, uint64_t host_cluster_off);
void qc_inflight_del(struct qcow2 *q, uint64_t host_cluster_off);
void qc_unalloc_cluster(struct qcow2 *q, uint64_t host_off);
int qc_release_reserve(struct qcow2 *q);
int qc_write_through(struct qcow2 *q, uint8_t *l2);

/* compressed clusters */
void qc_codec_free(struct qcow2 *q);

/* mapping */
int qc_l2_entry(struct qcow2 *q, uint64_t off, int alloc, uint8_t **l2, uint32_t *idx);
enum qc_type qc_classify(struct qcow2 *q, uint64_t e);
int qc_check_offset(struct qcow2 *q, uint64_t host_off);
void qc_compressed_range(struct qcow2 *q, uint64_t e, uint64_t *off, uint64_t *len);

static inline uint64_t qc_be64(const uint8_t *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}
static inline void qc_put_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    __builtin_memcpy(p, &v, 8);
}
static inline uint32_t qc_be32(const uint8_t *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}
#endif
