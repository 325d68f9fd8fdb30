// See writev.c.
#include <node_api.h>
napi_value snapctl_write_segments(napi_env env, napi_callback_info info);
napi_value snapctl_advise_huge_pages(napi_env env, napi_callback_info info);
