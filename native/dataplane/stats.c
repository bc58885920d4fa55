/* The statistics' vocabulary (xb_dataplane.h): what each counter index and histogram bucket means.
 * The exporter (xenblk/metrics.py) reads these tables from the module instead of keeping its own copy;
 * the names are indexed by the enums, so a new op or reason without a name is an empty slot that
 * tests/test_metrics_vocabulary.py catches. */
#include "xb_dataplane.h"

const char *const xb_stat_op_names[XB_STAT_OPS] = {
    [XB_STAT_READ] = "read",       [XB_STAT_WRITE] = "write",     [XB_STAT_FLUSH] = "flush",
    [XB_STAT_DISCARD] = "discard", [XB_STAT_BARRIER] = "barrier",
};

const char *const xb_refusal_names[XB_REFUSE_REASONS] = {
    [XB_REFUSE_BAD_OP] = "bad_op",     [XB_REFUSE_NSEG] = "nseg",         [XB_REFUSE_SECT] = "sect",
    [XB_REFUSE_RANGE] = "range",       [XB_REFUSE_ALIGN] = "align",       [XB_REFUSE_READONLY] = "readonly",
    [XB_REFUSE_SECURE] = "secure",     [XB_REFUSE_INDIRECT] = "indirect", [XB_REFUSE_GRANT] = "grant",
    [XB_REFUSE_UNSUPPORTED] = "unsupported",
};

const char *const xb_error_reason_names[XB_ERR_REASONS] = {
    [XB_ERR_IO] = "io", [XB_ERR_NOSPC] = "nospc", [XB_ERR_GRANT] = "grant", [XB_ERR_OTHER] = "other",
    [XB_ERR_QUOTA] = "quota",
};

const uint64_t xb_lat_bounds_ns[XB_LAT_BUCKETS - 1] = {
    10000ull,      20000ull,      50000ull,      100000ull,     200000ull,      500000ull,     1000000ull,
    2000000ull,    5000000ull,    10000000ull,   20000000ull,   50000000ull,    100000000ull,  200000000ull,
    500000000ull,  1000000000ull, 2000000000ull, 5000000000ull, 10000000000ull,
};

const unsigned xb_seg_bounds[XB_SEG_BUCKETS - 1] = {1, 2, 4, 8, 11, 16, 32, 64, 128};
