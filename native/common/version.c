#include "common_api.h"

/* Bumped when a C struct shared with Python changes, so a stale build is caught at import. */
int xb_native_abi_version(void)
{
    return XB_NATIVE_ABI_VERSION;
}
