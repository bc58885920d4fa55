#ifndef XB_STORAGE_API_H
#define XB_STORAGE_API_H
#include "xb_storage.h"
const char *xb_storage_version(void);
#endif
