// writeSegments: byte ranges of several buffers written to an fd in order by writev(2), for
// load's stream (src/transport/output-thread-worker.ts). A page record is its 8-byte header and
// the 4 KiB page where the decoded cluster holds it: written as two iovecs, the page is never
// copied into a stream buffer first (1 GiB restore: 780 MB less memcpy, and no stream buffers
// to fault in).
//
//   writeSegments(fd, bufs, segs) -> bytes written (all of them)
//     bufs: Uint8Arrays; segs: Int32Array of (index into bufs, offset, length) triples.
//     Writes IOV_MAX iovecs at a time, goes on after short writes and EINTR, and waits with
//     poll(2) while a non-blocking fd is full (EAGAIN). A failed write throws an Error whose
//     code is the errno's name (EPIPE, ENOSPC, ...); a segment outside its buffer a RangeError.
//
// It blocks: call it on a thread of its own, never on the main thread.
#include <errno.h>
#include <limits.h>
#include <node_api.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <uv.h>

#include "writev.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#define MAX_BUFS 64

static napi_value fail(napi_env env, const char *code, const char *msg, int range) {
  if (range) napi_throw_range_error(env, code, msg);
  else napi_throw_error(env, code, msg);
  return NULL;
}

napi_value snapctl_write_segments(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) {
    return fail(env, NULL, "expected (fd: number, bufs: Uint8Array[], segs: Int32Array)", 0);
  }
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) return fail(env, NULL, "fd must be a file descriptor", 0);

  uint32_t nbufs;
  bool is_array;
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &nbufs) != napi_ok ||
      nbufs > MAX_BUFS) {
    return fail(env, NULL, "bufs must be an array of at most 64 Uint8Arrays", 0);
  }
  char *base[MAX_BUFS];
  size_t size[MAX_BUFS];
  for (uint32_t i = 0; i < nbufs; i++) {
    napi_value v;
    bool is;
    napi_typedarray_type type;
    void *p;
    if (napi_get_element(env, argv[1], i, &v) != napi_ok || napi_is_typedarray(env, v, &is) != napi_ok || !is ||
        napi_get_typedarray_info(env, v, &type, &size[i], &p, NULL, NULL) != napi_ok || type != napi_uint8_array) {
      return fail(env, NULL, "bufs must be an array of at most 64 Uint8Arrays", 0);
    }
    base[i] = p;
  }

  bool is;
  napi_typedarray_type type;
  size_t nwords;
  void *sp;
  if (napi_is_typedarray(env, argv[2], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, argv[2], &type, &nwords, &sp, NULL, NULL) != napi_ok || type != napi_int32_array ||
      nwords % 3 != 0) {
    return fail(env, NULL, "segs must be an Int32Array of (buffer, offset, length) triples", 0);
  }
  const int32_t *segs = sp;
  size_t nsegs = nwords / 3;
  // Every segment is checked before anything is written.
  for (size_t s = 0; s < nsegs; s++) {
    int32_t b = segs[3 * s], off = segs[3 * s + 1], len = segs[3 * s + 2];
    if (b < 0 || (uint32_t)b >= nbufs || off < 0 || len < 0 || (size_t)off + (size_t)len > size[b]) {
      return fail(env, NULL, "a segment lies outside its buffer", 1);
    }
  }

  struct iovec iov[IOV_MAX];
  size_t s = 0;      // first segment not yet fully written
  size_t skip = 0;   // bytes of segment s already written
  double total = 0;
  while (s < nsegs) {
    int n = 0;
    for (size_t t = s; t < nsegs && n < IOV_MAX; t++) {
      size_t len = (size_t)segs[3 * t + 2] - (t == s ? skip : 0);
      if (len == 0) continue;
      iov[n].iov_base = base[segs[3 * t]] + segs[3 * t + 1] + (t == s ? skip : 0);
      iov[n].iov_len = len;
      n++;
    }
    if (n == 0) break;
    ssize_t w = writev(fd, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        poll(&pfd, 1, 1000);
        continue;
      }
      int e = errno;
      char msg[128];
      snprintf(msg, sizeof msg, "%s, write", strerror(e));
      return fail(env, uv_err_name(-e), msg, 0);
    }
    total += (double)w;
    size_t left = (size_t)w;
    while (left > 0 && s < nsegs) {
      size_t rest = (size_t)segs[3 * s + 2] - skip;
      if (left < rest) {
        skip += left;
        left = 0;
      } else {
        left -= rest;
        s++;
        skip = 0;
      }
    }
    while (s < nsegs && (size_t)segs[3 * s + 2] == skip) {
      s++;
      skip = 0;
    }
  }
  napi_value out;
  if (napi_create_double(env, total, &out) != napi_ok) return fail(env, NULL, "napi_create_double failed", 0);
  return out;
}

