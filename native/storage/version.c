#include "storage_api.h"
const char *xb_storage_version(void) { return "1"; }
