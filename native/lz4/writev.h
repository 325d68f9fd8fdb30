// See writev.c.
#include <node_api.h>
napi_value snapctl_write_segments(napi_env env, napi_callback_info info);
