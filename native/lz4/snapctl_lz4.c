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
//   crc32(src) -> CRC-32 (zlib's) of src: by carry-less multiplication where the CPU has it
//     (PCLMULQDQ: 4 times the speed of Node's zlib.crc32 here), else zlib's crc32
//   version -> liblz4's version string
//   encodeFramesAsync(src, dst, frameBytes, frames) -> Promise of the bytes written to dst: src cut
//     in frames of frameBytes, each stored as compressBlock does behind its u32 LE raw length (the
//     codec 1 form, format-spec/container.md "Frames") when that is shorter than the frame, else
//     the frame as it is; frames[2i] = frame i's stored length, frames[2i+1] = its CRC-32. The same
//     bytes as src/container/cluster.ts encodeFrames, but on a libuv pool thread: the calling
//     thread goes on while it runs. src, dst and frames are held (not copied) until the promise
//     settles, and must not be changed meanwhile. dst must hold src.length bytes.
//   writeSegments(fd, bufs, segs) -> byte ranges of buffers written by writev(2): see writev.c
//
// src and dst are any typed arrays (a Buffer, a subarray of one); a dst is written, never kept
// (encodeFramesAsync: until its promise settles).
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <lz4.h>
#include <node_api.h>
#include <zlib.h>
#include <immintrin.h>

#include "writev.h"

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

// CRC-32 by folding with carry-less multiplication: Gopal et al., "Fast CRC Computation for
// Generic Polynomials Using PCLMULQDQ Instruction" (Intel, 2009), the bit-reflected form and its
// constants for zlib's polynomial 0x04C11DB7 (the same as Linux's crc32-pclmul). Folds 64 bytes
// at a time in four lanes, then 16, then reduces 128 -> 64 -> 32 bits (Barrett); takes and
// returns the pre- and post-conditioned register as zlib's crc32 does inside. len >= 64, a
// multiple of 16.
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_fold(const unsigned char *buf, size_t len, uint32_t crc) {
  const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);
  const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
  const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124);
  const __m128i poly = _mm_set_epi64x(0x01f7011641, 0x01db710641);
  const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
  __m128i x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
  __m128i x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
  __m128i x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
  __m128i x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
  buf += 64;
  len -= 64;
  while (len >= 64) {
    __m128i x5 = _mm_clmulepi64_si128(x1, k1k2, 0x00), x6 = _mm_clmulepi64_si128(x2, k1k2, 0x00);
    __m128i x7 = _mm_clmulepi64_si128(x3, k1k2, 0x00), x8 = _mm_clmulepi64_si128(x4, k1k2, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
    x2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
    x3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
    x4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
    x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
    x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
    x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
    buf += 64;
    len -= 64;
  }
  // The four lanes into one, then the 16-byte blocks left.
  __m128i x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
  x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), x2), x5);
  x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
  x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), x3), x5);
  x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
  x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), x4), x5);
  while (len >= 16) {
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), _mm_loadu_si128((const __m128i *)buf)), x5);
    buf += 16;
    len -= 16;
  }
  // 128 -> 64 bits.
  x2 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
  x2 = _mm_srli_si128(x1, 4);
  x1 = _mm_and_si128(x1, mask32);
  x1 = _mm_xor_si128(_mm_clmulepi64_si128(x1, k5k0, 0x00), x2);
  // Barrett reduction to 32 bits.
  x2 = _mm_and_si128(x1, mask32);
  x2 = _mm_clmulepi64_si128(x2, poly, 0x10);
  x2 = _mm_and_si128(x2, mask32);
  x2 = _mm_clmulepi64_si128(x2, poly, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int have_pclmul;

static uint32_t crc32_any(const unsigned char *buf, size_t len) {
  if (!have_pclmul || len < 64) return (uint32_t)crc32_z(0, buf, len);
  size_t body = len & ~(size_t)15;
  uint32_t c = ~crc32_fold(buf, body, ~0u);
  return body == len ? c : (uint32_t)crc32_z(c, buf + body, len - body);
}

static napi_value crc32_call(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char *src;
  int len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_type_error(env, NULL, "expected (src: Uint8Array)");
    return NULL;
  }
  if (!bytes_of(env, argv[0], "src must be a Uint8Array of at most 2 GiB", &src, &len)) return NULL;
  napi_value out;
  CHECK(napi_create_uint32(env, crc32_any((const unsigned char *)src, (size_t)len), &out));
  return out;
}

// encodeFramesAsync: what the pool thread needs, and the references that keep the arrays alive.
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[3];
  const char *src;
  char *dst;
  uint32_t *frames;
  int src_len, frame_bytes, out;
} frames_job;

// On a pool thread: no N-API calls here.
static void frames_execute(napi_env env, void *data) {
  (void)env;
  frames_job *j = data;
  int at = 0;
  for (int i = 0, start = 0; start < j->src_len; i++, start += j->frame_bytes) {
    int len = j->src_len - start < j->frame_bytes ? j->src_len - start : j->frame_bytes;
    // As compressLz4Into into len - 1 bytes: LZ4 only where it is shorter than the frame.
    int n = len - 1 > 4 ? LZ4_compress_default(j->src + start, j->dst + at + 4, len, len - 5) : 0;
    if (n > 0) {
      uint32_t raw = (uint32_t)len;
      unsigned char *p = (unsigned char *)j->dst + at;
      p[0] = raw & 0xff, p[1] = (raw >> 8) & 0xff, p[2] = (raw >> 16) & 0xff, p[3] = raw >> 24;
      n += 4;
    } else {
      memcpy(j->dst + at, j->src + start, (size_t)len);
      n = len;
    }
    j->frames[2 * i] = (uint32_t)n;
    j->frames[2 * i + 1] = crc32_any((const unsigned char *)j->dst + at, (size_t)n);
    at += n;
  }
  j->out = at;
}

static void frames_complete(napi_env env, napi_status status, void *data) {
  frames_job *j = data;
  napi_value v;
  if (status == napi_ok && napi_create_int32(env, j->out, &v) == napi_ok) {
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    napi_value msg, err;
    napi_create_string_utf8(env, "snapctl-lz4: encodeFramesAsync did not run", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, j->deferred, err);
  }
  for (int i = 0; i < 3; i++) napi_delete_reference(env, j->refs[i]);
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value encode_frames_async(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) {
    napi_throw_type_error(env, NULL, "expected (src: Uint8Array, dst: Uint8Array, frameBytes: number, frames: Uint32Array)");
    return NULL;
  }
  char *src, *dst;
  int src_len, dst_len;
  if (!bytes_of(env, argv[0], "src must be a Uint8Array of at most 2 GiB", &src, &src_len) ||
      !bytes_of(env, argv[1], "dst must be a Uint8Array of at most 2 GiB", &dst, &dst_len)) return NULL;
  int32_t frame_bytes = 0;
  if (napi_get_value_int32(env, argv[2], &frame_bytes) != napi_ok || frame_bytes < 1 || frame_bytes > LZ4_MAX_INPUT_SIZE) {
    napi_throw_range_error(env, NULL, "frameBytes must be 1 to LZ4_MAX_INPUT_SIZE");
    return NULL;
  }
  bool is;
  napi_typedarray_type type;
  size_t frames_len;
  void *frames;
  if (napi_is_typedarray(env, argv[3], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, argv[3], &type, &frames_len, &frames, NULL, NULL) != napi_ok || type != napi_uint32_array) {
    napi_throw_type_error(env, NULL, "frames must be a Uint32Array");
    return NULL;
  }
  size_t count = src_len == 0 ? 0 : ((size_t)src_len + (size_t)frame_bytes - 1) / (size_t)frame_bytes;
  if (dst_len < src_len || frames_len < 2 * count) {
    napi_throw_range_error(env, NULL, "dst must hold src.length bytes and frames 2 entries per frame");
    return NULL;
  }
  frames_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "SNAPCTL_LZ4", "snapctl-lz4: out of memory");
    return NULL;
  }
  j->src = src, j->dst = dst, j->frames = frames, j->src_len = src_len, j->frame_bytes = frame_bytes;
  napi_value promise, name;
  int made = 0;
  for (; made < 3; made++) {
    if (napi_create_reference(env, argv[made == 2 ? 3 : made], 1, &j->refs[made]) != napi_ok) break;
  }
  if (made < 3 || napi_create_string_utf8(env, "snapctl-lz4:encodeFrames", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, frames_execute, frames_complete, j, &j->work) != napi_ok) {
    for (int i = 0; i < made; i++) napi_delete_reference(env, j->refs[i]);
    free(j);
    napi_throw_error(env, "SNAPCTL_LZ4", "snapctl-lz4: cannot start encodeFramesAsync");
    return NULL;
  }
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok || napi_queue_async_work(env, j->work) != napi_ok) {
    // A promise made but not queued is never settled: nothing holds it but us.
    for (int i = 0; i < 3; i++) napi_delete_reference(env, j->refs[i]);
    napi_delete_async_work(env, j->work);
    free(j);
    napi_throw_error(env, "SNAPCTL_LZ4", "snapctl-lz4: cannot queue encodeFramesAsync");
    return NULL;
  }
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  __builtin_cpu_init();
  have_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  napi_property_descriptor props[7] = {
      {"decodeBlock", NULL, decode_block, NULL, NULL, NULL, napi_enumerable, NULL},
      {"compressBlock", NULL, compress_block, NULL, NULL, NULL, napi_enumerable, NULL},
      {"compressBound", NULL, compress_bound, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32", NULL, crc32_call, NULL, NULL, NULL, napi_enumerable, NULL},
      {"version", NULL, NULL, NULL, NULL, NULL, napi_enumerable, NULL},
      {"encodeFramesAsync", NULL, encode_frames_async, NULL, NULL, NULL, napi_enumerable, NULL},
      {"writeSegments", NULL, snapctl_write_segments, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_create_string_utf8(env, LZ4_versionString(), NAPI_AUTO_LENGTH, &props[4].value));
  CHECK(napi_define_properties(env, exports, 7, props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
