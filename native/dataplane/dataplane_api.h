#ifndef XB_DATAPLANE_API_H
#define XB_DATAPLANE_API_H
#include "common_api.h"
#include "journal.h"
#endif
