#include <stdarg.h>
#include <stdio.h>
#include "xb_err.h"

void xb_seterr(char *err, const char *fmt, ...)
{
    if (!err)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, XB_ERRLEN, fmt, ap);
    va_end(ap);
}
