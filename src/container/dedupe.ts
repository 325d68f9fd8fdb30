// Which stored slot may already hold a page's bytes (format-spec/container.md, "Shared slots").
// A lossy table of fingerprints, in typed arrays (10 bytes an entry, at most 2^20 entries: 10 MiB
// for a VM of 4 GiB or more), that only *proposes* a slot: the writer compares the page byte for
// byte with the slot before it shares it. The fingerprint samples 19 words of the page instead of
// hashing all of it: measured here, 0.18 µs a page against 1.3 µs for zlib's crc32 (the whole
// page); pages that agree on the samples and differ elsewhere cost one failed comparison.

/** Entries: a power of two, at least this many... */
const MIN_ENTRIES = 4096
/** ...and at most this many (10 MiB). */
const MAX_ENTRIES = 1 << 20
/** Words between samples: 17 samples over 1024 words, at offsets no power-of-two structure repeats on. */
const STRIDE = 61
/**
 * Copies of slots pages were shared into (2 MiB): the same content keeps coming back (a page of
 * a pattern, a buffer copied again and again) and its first slot has long left the writer's
 * cache of decoded clusters. Without them the bench's 1 GiB mix decoded a cluster per 32 shared
 * pages and create took 2.3x the CPU time.
 */
const HOT_PAGES = 512
const PAGE = 4096

export interface DedupeStats {
  /** pages the table proposed a slot for */
  proposed: number
  /** proposals the bytes confirmed (pages stored in another page's slot) */
  confirmed: number
  /** clusters decoded from the file to confirm a proposal (not in memory any more) */
  clusterReads: number
  /** of those, reads that confirmed their proposal */
  readsPaid: number
}

export class SlotFinder {
  private readonly keys: Uint32Array
  /** cluster + 1 (0: empty) */
  private readonly clusters: Uint32Array
  private readonly slots: Uint16Array
  private readonly mask: number
  private readonly hotBytes = Buffer.alloc(HOT_PAGES * PAGE)
  /** cluster + 1 (0: empty) and slot of each hot copy */
  private readonly hotCluster = new Uint32Array(HOT_PAGES)
  private readonly hotSlot = new Uint16Array(HOT_PAGES)
  readonly stats: DedupeStats = { proposed: 0, confirmed: 0, clusterReads: 0, readsPaid: 0 }

  /** `pages`: every page of the RAM blocks (the table need not be larger). */
  constructor(pages: number) {
    let n = MIN_ENTRIES
    while (n < pages && n < MAX_ENTRIES) n *= 2
    this.keys = new Uint32Array(n)
    this.clusters = new Uint32Array(n)
    this.slots = new Uint16Array(n)
    this.mask = n - 1
  }

  /** The page's fingerprint (4096-byte pages; any 32-bit value). */
  static fingerprint(d: Uint8Array): number {
    // words 1 and 2 too: pages often differ only in a header at their start
    let h = Math.imul(0x811c9dc5 ^ (d[4] | (d[5] << 8) | (d[6] << 16) | (d[7] << 24)), 0x01000193)
    h = Math.imul(h ^ (d[8] | (d[9] << 8) | (d[10] << 16) | (d[11] << 24)), 0x01000193)
    for (let w = 0; w < 1024; w += STRIDE) {
      const i = 4 * w
      h = Math.imul(h ^ (d[i] | (d[i + 1] << 8) | (d[i + 2] << 16) | (d[i + 3] << 24)), 0x01000193)
    }
    return (h ^ (h >>> 15)) >>> 0
  }

  /** The slot last remembered under this fingerprint, as cluster and slot; null if none. */
  propose(fp: number): { cluster: number; slot: number } | null {
    const i = fp & this.mask
    if (this.clusters[i] === 0 || this.keys[i] !== fp) return null
    this.stats.proposed++
    return { cluster: this.clusters[i] - 1, slot: this.slots[i] }
  }

  remember(fp: number, cluster: number, slot: number): void {
    const i = fp & this.mask
    this.keys[i] = fp
    this.clusters[i] = cluster + 1
    this.slots[i] = slot
  }

  /**
   * Whether a proposal may be confirmed by decoding its cluster from the file (a cluster, 1 MiB by
   * default): 16 reads to start with, then only while at least half of the reads confirmed their
   * proposal and at most one for every 32 pages shared so far. Pages that agree on the samples and
   * differ elsewhere (text pages, tables) cannot cost a decode each: on the bench's 256 MiB mix,
   * before this rule, 335 reads (1 s of LZ4 decoding) confirmed nothing.
   */
  mayRead(): boolean {
    const s = this.stats
    return s.clusterReads < 16 || (2 * s.readsPaid >= s.clusterReads && s.clusterReads < 16 + s.confirmed / 32)
  }

  /** The copy kept of slot `slot` of `cluster` (a slot a page was shared into: never changed), or null. */
  hot(cluster: number, slot: number): Buffer | null {
    const i = hotIndex(cluster, slot)
    return this.hotCluster[i] === cluster + 1 && this.hotSlot[i] === slot ? this.hotBytes.subarray(i * PAGE, (i + 1) * PAGE) : null
  }

  /** Keep a copy of a slot's bytes once a page was shared into it (its bytes never change after that). */
  keep(cluster: number, slot: number, bytes: Uint8Array): void {
    const i = hotIndex(cluster, slot)
    if (this.hotCluster[i] === cluster + 1 && this.hotSlot[i] === slot) return
    this.hotBytes.set(bytes, i * PAGE)
    this.hotCluster[i] = cluster + 1
    this.hotSlot[i] = slot
  }

  /** Forget every slot (the image is rewritten into a new file: compaction). */
  clear(): void {
    this.clusters.fill(0)
    this.hotCluster.fill(0)
  }
}

function hotIndex(cluster: number, slot: number): number {
  return (Math.imul(cluster, 0x9e3779b1) ^ Math.imul(slot, 0x85ebca6b)) >>> 23 & (HOT_PAGES - 1)
}
