/* The latency histogram: exact below 32 ns, then 32 sub-buckets per power of two (log-linear, <= 3%
 * relative error), so percentiles need no sample array and merging queues is adding counts. */
#include "sg_int.h"

unsigned sg_hist_index(uint64_t ns)
{
    if (ns < XB_SG_HIST_SUB)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned shift = msb - 5;
    return XB_SG_HIST_SUB + (msb - 5) * XB_SG_HIST_SUB + (unsigned)((ns >> shift) & (XB_SG_HIST_SUB - 1));
}

uint64_t xb_sg_hist_lower_ns(unsigned idx)
{
    if (idx < XB_SG_HIST_SUB)
        return idx;
    unsigned g = (idx - XB_SG_HIST_SUB) / XB_SG_HIST_SUB, sub = (idx - XB_SG_HIST_SUB) % XB_SG_HIST_SUB;
    return (uint64_t)(XB_SG_HIST_SUB + sub) << g;
}

uint64_t xb_sg_hist_width_ns(unsigned idx)
{
    if (idx < XB_SG_HIST_SUB)
        return 1;
    return 1ull << ((idx - XB_SG_HIST_SUB) / XB_SG_HIST_SUB);
}
