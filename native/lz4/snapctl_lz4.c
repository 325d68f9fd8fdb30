// LZ4 block codec calls that write into a buffer the caller owns, on the system's liblz4 (Debian's
// liblz4-dev). lz4-napi, which snapctl also uses, returns a new Buffer per call; on a restore
// that is a fresh, page-faulting allocation per 128 KiB frame (glibc returns the freed memory to
// the kernel) and a copy into the caller's buffer. Here nothing is allocated: the decoded pages
// land where they are sent from. The block format is lz4's doc/lz4_Block_format.md.
//
//   decodeBlock(src, dst) -> bytes written to dst, or -1 when src is not a valid block or does
//     not fit in dst (LZ4_decompress_safe: never reads past src nor writes past dst)
//   compressBlock(src, dst) -> bytes written to dst, or 0 when it does not fit
//     (LZ4_compress_default, level 1)
//   compressBound(n) -> the largest block n bytes may compress to
//   version -> liblz4's version string
//
// src and dst are any typed arrays (a Buffer, a subarray of one); a dst is written, never kept.
#include <limits.h>
#include <lz4.h>
#include <node_api.h>

#define CHECK(call)                                                                   \
  do {                                                                                \
    if ((call) != napi_ok) {                                                          \
      napi_throw_error(env, "SNAPCTL_LZ4", "snapctl-lz4: " #call " failed");         \
      return NULL;                                                                    \
    }                                                                                 \
  } while (0)

// The bytes of a typed array argument; throws TypeError for anything else or one over INT_MAX.
static int bytes_of(napi_env env, napi_value v, const char *what, char **data, int *len) {
  bool is;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) {
    napi_throw_type_error(env, NULL, what);
    return 0;
  }
  napi_typedarray_type type;
  size_t length;
  void *p;
  size_t offset;
  if (napi_get_typedarray_info(env, v, &type, &length, &p, NULL, &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, what);
    return 0;
  }
  if (type != napi_uint8_array || length > INT_MAX) {
    napi_throw_type_error(env, NULL, what);
    return 0;
  }
  *data = p;  // already points at byte `offset` of the ArrayBuffer
  *len = (int)length;
  return 1;
}

static int two_arrays(napi_env env, napi_callback_info info, char **src, int *src_len, char **dst, int *dst_len) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) {
    napi_throw_type_error(env, NULL, "expected (src: Uint8Array, dst: Uint8Array)");
    return 0;
  }
  return bytes_of(env, argv[0], "src must be a Uint8Array of at most 2 GiB", src, src_len) &&
         bytes_of(env, argv[1], "dst must be a Uint8Array of at most 2 GiB", dst, dst_len);
}

static napi_value decode_block(napi_env env, napi_callback_info info) {
  char *src, *dst;
  int src_len, dst_len;
  if (!two_arrays(env, info, &src, &src_len, &dst, &dst_len)) return NULL;
  int n = src_len == 0 ? -1 : LZ4_decompress_safe(src, dst, src_len, dst_len);
  napi_value out;
  CHECK(napi_create_int32(env, n < 0 ? -1 : n, &out));
  return out;
}

static napi_value compress_block(napi_env env, napi_callback_info info) {
  char *src, *dst;
  int src_len, dst_len;
  if (!two_arrays(env, info, &src, &src_len, &dst, &dst_len)) return NULL;
  if (src_len > LZ4_MAX_INPUT_SIZE) {
    napi_throw_range_error(env, NULL, "src is larger than LZ4_MAX_INPUT_SIZE");
    return NULL;
  }
  int n = LZ4_compress_default(src, dst, src_len, dst_len);
  napi_value out;
  CHECK(napi_create_int32(env, n, &out));
  return out;
}

static napi_value compress_bound(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int64_t n = -1;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || napi_get_value_int64(env, argv[0], &n) != napi_ok || n < 0 || n > LZ4_MAX_INPUT_SIZE) {
    napi_throw_range_error(env, NULL, "compressBound(n): n must be 0 to LZ4_MAX_INPUT_SIZE");
    return NULL;
  }
  napi_value out;
  CHECK(napi_create_int32(env, LZ4_compressBound((int)n), &out));
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[4] = {
      {"decodeBlock", NULL, decode_block, NULL, NULL, NULL, napi_enumerable, NULL},
      {"compressBlock", NULL, compress_block, NULL, NULL, NULL, napi_enumerable, NULL},
      {"compressBound", NULL, compress_bound, NULL, NULL, NULL, napi_enumerable, NULL},
      {"version", NULL, NULL, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_create_string_utf8(env, LZ4_versionString(), NAPI_AUTO_LENGTH, &props[3].value));
  CHECK(napi_define_properties(env, exports, 4, props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
