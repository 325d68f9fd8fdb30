/*
 * memwork: the workload of the Linux test guest (/init starts it; tools/linux-guest/build.sh
 * builds it with gcc -O2 -static). It gives a live migration real work and lets the guest itself
 * say whether a restore brought its memory back:
 *
 *   data   `data` MiB of files in a tmpfs (DIR/d0000, d0001, ... one MiB each), seeded
 *          pseudo-random content (3 pages in 4 random, 1 in 4 text-like), so they live in the
 *          guest's page cache. The hash of each MiB is kept in memory; every tick re-reads
 *          `check` MiB of them (round robin) and compares.
 *   hot    `hot` MiB of anonymous memory, rewritten once every `pass` ms in small steps every
 *          2 ms: a step checks that the first 8 words of its pages hold what the last pass wrote
 *          and writes this pass's, so hot pages are dirtied all the time while a migration runs,
 *          each by a delta XBZRLE can encode. The other words of each page never change; a slice
 *          of them is checked every tick. pass=0: one whole pass per tick instead.
 *   tick   every `ms` milliseconds one line on stdout: `HB <counter> ok <sum>`, where sum is
 *          the hash of all data (fixed for a given seed and size), or `HB <counter> BAD <what>`
 *          from the first mismatch on (sticky). The counter lives in this process's memory, so
 *          after a restore it goes on from where the saved guest stopped.
 *
 * Arguments are key=value (what /init finds in /proc/cmdline as memwork.KEY=VALUE):
 *   dir=/data data=64 hot=8 ms=200 pass=100 check=8 seed=1
 * It prints `READY ...` once the data is written and the hot region filled, then ticks forever.
 * Nothing reads /dev/urandom: under TCG every instruction counts, so all content comes from a
 * xorshift generator and a splitmix finaliser.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)
#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8)
#define DYN_WORDS 8 /* words per hot page rewritten every pass */
#define STEP_MS 2u  /* a step of the hot rewrite every STEP_MS */

static const char *dir = "/data";
static unsigned data_mib = 64, hot_mib = 8, tick_ms = 200, pass_ms = 100, check_mib = 8;
static uint64_t seed = 1;

static uint64_t *chunk_sum; /* hash of each MiB of data, as written */
static uint64_t data_sum;   /* hash of all chunk_sum */
static uint64_t *hot;
static size_t hot_pages;
static uint64_t hot_pass;   /* pages before hot_pos hold this pass's words, the others the last pass's */
static size_t hot_pos;
static uint64_t counter;    /* heartbeat number: lives in guest RAM, so it survives a restore */
static unsigned next_chunk, next_static;
static char bad[160];       /* first mismatch, empty while all is well */
static unsigned char *buf;

static uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t hash_words(const uint64_t *w, size_t n) {
  uint64_t h = 0x84222325cbf29ce4ull;
  for (size_t i = 0; i < n; i++) {
    h = (h ^ w[i]) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return mix64(h ^ n);
}

static void fail(const char *fmt, ...) {
  if (bad[0]) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(bad, sizeof bad, fmt, ap);
  va_end(ap);
}

static void die(const char *what) {
  dprintf(1, "memwork: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void say(const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n > (int)sizeof line - 1) n = sizeof line - 1;
  /* One write per line, so a line is never split between two writers on the console. */
  (void)!write(1, line, (size_t)n);
}

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void sleep_until(uint64_t ns) {
  struct timespec t = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
}

/* Content of data MiB number c: a xorshift64 stream per MiB; every 4th page (by the stream's
 * pick) is text-like, so the guest's RAM is not all incompressible. */
static void gen_chunk(unsigned c, unsigned char *out) {
  uint64_t x = mix64(seed * 0x2545f4914f6cdd1dull + c) | 1;
  uint64_t *w = (uint64_t *)out;
  for (unsigned p = 0; p < MIB / PAGE; p++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    uint64_t *pw = w + p * WORDS_PER_PAGE;
    if ((x & 3) == 0) {
      for (unsigned i = 0; i < PAGE; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        unsigned r = x >> 59; /* 0..31 */
        out[p * PAGE + i] = r < 6 ? ' ' : (unsigned char)('a' + (r & 15));
      }
    } else {
      for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        pw[i] = x;
      }
    }
  }
}

static void chunk_path(unsigned c, char *path, size_t len) {
  snprintf(path, len, "%s/d%04u", dir, c);
}

static void write_data(void) {
  char path[256];
  uint64_t all = 0;
  for (unsigned c = 0; c < data_mib; c++) {
    gen_chunk(c, buf);
    chunk_sum[c] = hash_words((uint64_t *)buf, MIB / 8);
    all = mix64(all ^ chunk_sum[c]);
    chunk_path(c, path, sizeof path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die(path);
    for (size_t done = 0; done < MIB;) {
      ssize_t n = write(fd, buf + done, MIB - done);
      if (n <= 0) die(path);
      done += (size_t)n;
    }
    close(fd);
  }
  data_sum = all;
}

static void check_chunk(unsigned c) {
  char path[256];
  chunk_path(c, path, sizeof path);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    fail("data %s: open: %s", path, strerror(errno));
    return;
  }
  size_t done = 0;
  while (done < MIB) {
    ssize_t n = pread(fd, buf + done, MIB - done, (off_t)done);
    if (n <= 0) break;
    done += (size_t)n;
  }
  close(fd);
  if (done != MIB) {
    fail("data %s: short read (%zu bytes)", path, done);
    return;
  }
  uint64_t h = hash_words((uint64_t *)buf, MIB / 8);
  if (h != chunk_sum[c]) fail("data %s: hash %016llx, written %016llx", path, (unsigned long long)h, (unsigned long long)chunk_sum[c]);
}

static uint64_t hot_dyn(uint64_t gen, size_t p, unsigned i) {
  return mix64(seed ^ (gen << 24) ^ (p << 3) ^ i);
}

static uint64_t hot_static(size_t p, unsigned i) {
  return mix64(~seed ^ (p << 9) ^ i);
}

static void fill_hot(void) {
  for (size_t p = 0; p < hot_pages; p++) {
    uint64_t *pw = hot + p * WORDS_PER_PAGE;
    for (unsigned i = 0; i < DYN_WORDS; i++) pw[i] = hot_dyn(0, p, i);
    for (unsigned i = DYN_WORDS; i < WORDS_PER_PAGE; i++) pw[i] = hot_static(p, i);
  }
  hot_pass = 1;
  hot_pos = 0;
}

/* Rewrites the next n hot pages: checks the words the last pass wrote, writes this pass's. */
static void rewrite_hot(size_t n) {
  for (; n && hot_pages; n--) {
    size_t p = hot_pos;
    uint64_t *pw = hot + p * WORDS_PER_PAGE;
    for (unsigned i = 0; i < DYN_WORDS; i++) {
      if (pw[i] != hot_dyn(hot_pass - 1, p, i)) fail("hot page %zu word %u: not from pass %llu", p, i, (unsigned long long)hot_pass - 1);
      pw[i] = hot_dyn(hot_pass, p, i);
    }
    if (++hot_pos == hot_pages) hot_pos = 0, hot_pass++;
  }
}

/* The words that never change: one eighth of the pages per tick. */
static void check_hot_static(void) {
  size_t slice = hot_pages / 8 + 1;
  for (size_t k = 0; k < slice && hot_pages; k++) {
    size_t p = next_static++ % hot_pages;
    const uint64_t *pw = hot + p * WORDS_PER_PAGE;
    for (unsigned i = DYN_WORDS; i < WORDS_PER_PAGE; i++) {
      if (pw[i] != hot_static(p, i)) {
        fail("hot page %zu word %u: static word changed", p, i);
        break;
      }
    }
  }
}

static unsigned long parse_num(const char *key, const char *v) {
  char *end;
  errno = 0;
  unsigned long n = strtoul(v, &end, 10);
  if (errno || *end || end == v) {
    dprintf(1, "memwork: bad value for %s: %s\n", key, v);
    exit(2);
  }
  return n;
}

static void parse_args(int argc, char **argv) {
  for (int a = 1; a < argc; a++) {
    char *eq = strchr(argv[a], '=');
    if (!eq) {
      dprintf(1, "memwork: arguments are key=value, not %s\n", argv[a]);
      exit(2);
    }
    *eq = 0;
    const char *k = argv[a], *v = eq + 1;
    if (!strcmp(k, "dir")) dir = v;
    else if (!strcmp(k, "data")) data_mib = (unsigned)parse_num(k, v);
    else if (!strcmp(k, "hot")) hot_mib = (unsigned)parse_num(k, v);
    else if (!strcmp(k, "ms")) tick_ms = (unsigned)parse_num(k, v);
    else if (!strcmp(k, "pass")) pass_ms = (unsigned)parse_num(k, v);
    else if (!strcmp(k, "check")) check_mib = (unsigned)parse_num(k, v);
    else if (!strcmp(k, "seed")) seed = parse_num(k, v);
    else dprintf(1, "memwork: ignoring unknown key %s\n", k);
  }
  if (tick_ms == 0) tick_ms = 1;
  if (check_mib > data_mib) check_mib = data_mib;
}

int main(int argc, char **argv) {
  parse_args(argc, argv);
  uint64_t t0 = now_ns();
  buf = aligned_alloc(PAGE, MIB);
  chunk_sum = calloc(data_mib ? data_mib : 1, sizeof *chunk_sum);
  if (!buf || !chunk_sum) die("malloc");
  hot_pages = (size_t)hot_mib * MIB / PAGE;
  if (hot_pages) {
    hot = mmap(NULL, (size_t)hot_mib * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (hot == MAP_FAILED) die("mmap hot");
  }
  write_data();
  fill_hot();
  say("READY data=%uMiB hot=%uMiB ms=%u pass=%u check=%uMiB sum=%016llx in %.0f ms\n", data_mib, hot_mib, tick_ms, pass_ms, check_mib,
      (unsigned long long)data_sum, (double)(now_ns() - t0) / 1e6);

  /* Two clocks: the tick (heartbeat and checks) and, every STEP_MS in between, a step of the
   * hot rewrite, so that whenever a migration looks, hot pages were dirtied since it last did:
   * a live migration held to a small downtime limit never finds a quiet moment to finish in. */
  uint64_t tick_ns = (uint64_t)tick_ms * 1000000u, step_ns = STEP_MS * 1000000u;
  size_t per_step = pass_ms ? (hot_pages * STEP_MS + pass_ms - 1) / pass_ms : 0;
  uint64_t next_tick = now_ns() + tick_ns, next_step = per_step ? now_ns() + step_ns : UINT64_MAX;
  for (;;) {
    sleep_until(next_step < next_tick ? next_step : next_tick);
    uint64_t t = now_ns();
    if (t >= next_step) {
      rewrite_hot(per_step);
      /* Behind by more than a period (a stopped VM, a slow host): start again from now rather
       * than catch up in a burst. */
      next_step = t > next_step + step_ns ? t + step_ns : next_step + step_ns;
    }
    if (t < next_tick) continue;
    next_tick = t > next_tick + tick_ns ? t + tick_ns : next_tick + tick_ns;
    if (!per_step) rewrite_hot(hot_pages);
    counter++;
    check_hot_static();
    for (unsigned k = 0; k < check_mib; k++) check_chunk(next_chunk++ % data_mib);
    if (bad[0]) say("HB %llu BAD %s\n", (unsigned long long)counter, bad);
    else say("HB %llu ok %016llx\n", (unsigned long long)counter, (unsigned long long)data_sum);
  }
}
