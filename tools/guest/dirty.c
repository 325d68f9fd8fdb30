/*
 * A multiboot guest that never stops dirtying RAM, so live migrations have pages to re-send.
 *
 * Layout of guest-physical memory it touches:
 *   STATUS_ADDR (0x7000)         status block below, read by tests with QMP pmemsave
 *   [2 MiB, 2 MiB + HOT)         "hot" region: every pass rewrites one of 16 fixed words per page,
 *                                so however many passes run between two migration syncs a page
 *                                differs from its last sent copy in at most 16 words: XBZRLE food
 *   [2 MiB + HOT, top - 1 MiB)   swept slowly, SWEEP whole pages every EVERY passes, each rewritten
 *                                with a page-and-round dependent pattern (zero, one word, or noise)
 * top comes from the multiboot info (mem_upper) so one image fits any -m. The command line
 * (-append) may set "hot=<MiB> sweep=<pages> every=<passes>" (defaults 4, 1, 8) to tune the dirty
 * rate against a migration bandwidth limit; hot=0 leaves only the sweep. Under TCG a pass with
 * hot=4 takes roughly 0.5 ms, so the default sweep dirties about 1 MB/s.
 *
 * Build: tools/guest/build.sh (gcc -m32 -ffreestanding -nostdlib, linked at 1 MiB by link.ld).
 */
typedef unsigned int u32;

#define MB_HEADER_MAGIC 0x1BADB002u
#define MB_BOOT_MAGIC   0x2BADB002u
#define MB_FLAG_MEMINFO 0x00000002u /* ask the loader for mem_lower/mem_upper */

#define STATUS_ADDR 0x7000u
#define STATUS_MAGIC 0x59545244u /* "DRTY" little-endian */
#define HOT_START   0x200000u
#define HOT_MIB     4u
#define SWEEP_PAGES 1u
#define SWEEP_EVERY 8u
#define PAGE        4096u

/* Must sit in the first 8 KiB of the image, 4-byte aligned: link.ld puts .multiboot first. */
__attribute__((section(".multiboot"), aligned(4), used))
static const u32 multiboot_header[3] = {
  MB_HEADER_MAGIC, MB_FLAG_MEMINFO, (u32)-(MB_HEADER_MAGIC + MB_FLAG_MEMINFO),
};

struct status {
  u32 magic;      /* STATUS_MAGIC once running */
  u32 heartbeat;  /* pass number, +1 per pass over the hot region */
  u32 top;        /* first byte above the RAM the guest dirties */
  u32 sweep_page; /* next page of the sweep */
  u32 sweep_round;
  u32 boot_magic; /* eax at entry, 0x2BADB002 from a multiboot loader */
};

__attribute__((used, aligned(16))) static unsigned char stack[16384];

/* The loader enters in flat 32-bit protected mode with interrupts off; eax/ebx carry magic/info. */
__asm__(
  ".section .text.start,\"ax\"\n"
  ".global _start\n"
  "_start:\n"
  "  mov $stack + 16384, %esp\n"
  "  push %ebx\n"
  "  push %eax\n"
  "  call kmain\n"
  "1: hlt\n"
  "  jmp 1b\n"
  ".previous\n");

/* Value of "key=<decimal>" in the multiboot command line, or dflt. */
static u32 cmdline_arg(u32 boot_magic, const volatile u32 *info, const char *key, u32 dflt) {
  if (boot_magic != MB_BOOT_MAGIC || !(info[0] & 4u) || !info[4])
    return dflt;
  for (const volatile char *c = (const volatile char *)info[4]; *c; c++) {
    if (c != (const volatile char *)info[4] && c[-1] != ' ')
      continue;
    u32 k = 0;
    while (key[k] && c[k] == key[k]) k++;
    if (key[k] || c[k] != '=')
      continue;
    u32 v = 0;
    for (c += k + 1; *c >= '0' && *c <= '9'; c++) v = v * 10u + (u32)(*c - '0');
    return v;
  }
  return dflt;
}

static u32 ram_top(u32 boot_magic, const volatile u32 *info) {
  u32 top = 32u << 20; /* fallback when the loader gives no memory size */
  if (boot_magic == MB_BOOT_MAGIC && (info[0] & 1u))
    top = 0x100000u + info[2] * 1024u; /* mem_upper: KiB above 1 MiB up to the first hole */
  if (top > 0xC0000000u)
    top = 0xC0000000u;
  return top - (1u << 20);
}

__attribute__((used, noreturn)) void kmain(u32 boot_magic, const volatile u32 *info) {
  volatile struct status *st = (volatile struct status *)STATUS_ADDR;
  u32 top = ram_top(boot_magic, info);
  u32 hot_mib = cmdline_arg(boot_magic, info, "hot", HOT_MIB);
  u32 sweep_pages = cmdline_arg(boot_magic, info, "sweep", SWEEP_PAGES);
  u32 sweep_every = cmdline_arg(boot_magic, info, "every", SWEEP_EVERY);
  if (sweep_every == 0)
    sweep_every = 1;
  u32 hot_end = HOT_START + (hot_mib << 20);
  if (hot_end > top)
    hot_end = top;
  u32 sweep_first = hot_end / PAGE, sweep_end = top / PAGE;

  st->boot_magic = boot_magic;
  st->top = top;
  st->sweep_page = sweep_first;
  st->sweep_round = 0;
  st->heartbeat = 0;

  /* Give the hot region real content first, so XBZRLE deltas are small against nonzero pages. */
  for (u32 a = HOT_START; a < hot_end; a += 4)
    *(volatile u32 *)a = a * 2654435761u;
  st->magic = STATUS_MAGIC;

  for (u32 pass = 1;; pass++) {
    for (u32 page = HOT_START; page < hot_end; page += PAGE) {
      volatile u32 *p = (volatile u32 *)page;
      p[(pass & 15u) * 64u + (page >> 12 & 63u)] = pass;
    }
    for (u32 n = 0; pass % sweep_every == 0 && n < sweep_pages && sweep_first < sweep_end; n++) {
      u32 pg = st->sweep_page, round = st->sweep_round;
      volatile u32 *p = (volatile u32 *)(pg * PAGE);
      u32 kind = (pg ^ round) & 3u;
      u32 v = pg * 0x9E3779B9u + round;
      for (u32 i = 0; i < PAGE / 4; i++) {
        if (kind == 0) p[i] = 0;                           /* zero page */
        else if (kind == 1) p[i] = v;                      /* one repeated word */
        else { v ^= v << 13; v ^= v >> 17; v ^= v << 5; p[i] = v; } /* noise */
      }
      if (++pg >= sweep_end) { pg = sweep_first; st->sweep_round = round + 1; }
      st->sweep_page = pg;
    }
    st->heartbeat = pass;
  }
}
