#ifndef XB_SIMGUEST_API_H
#define XB_SIMGUEST_API_H
#include "common_api.h"
#endif
