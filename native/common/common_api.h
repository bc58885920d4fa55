#ifndef XB_COMMON_API_H
#define XB_COMMON_API_H
#define XB_NATIVE_ABI_VERSION 1
int xb_native_abi_version(void);
#endif
