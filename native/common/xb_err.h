/* The error buffer every native call that can fail fills for Python: one size, one formatter. */
#ifndef XB_ERR_H
#define XB_ERR_H

#define XB_ERRLEN 256

/* Formats an error into err (XB_ERRLEN bytes) if err is not NULL. */
void xb_seterr(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
