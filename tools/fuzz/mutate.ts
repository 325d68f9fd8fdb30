// Deterministic mutations for the fuzz targets (tools/fuzz.ts). Every case draws from its own
// PRNG seeded by (seed, case number), so any one case can be replayed alone.

export type Rand = () => number

/** xorshift32 over a seed mixed from (seed, case): cheap, and good enough to pick mutations. */
export function caseRng(seed: number, n: number): Rand {
  let s = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(n + 1, 0xc2b2ae35)) >>> 0 || 1
  for (let i = 0; i < 4; i++) s = step(s)
  let state = s
  return () => {
    state = step(state)
    return state / 0x100000000
  }
}

function step(s: number): number {
  s ^= s << 13
  s >>>= 0
  s ^= s >>> 17
  s ^= s << 5
  return s >>> 0
}

export const int = (rand: Rand, n: number): number => Math.floor(rand() * n)
export const pick = <T>(rand: Rand, list: readonly T[]): T => list[int(rand, list.length)]

/** Values that tend to break length and offset checks. */
const INTERESTING32 = [0, 1, 2, 3, 4, 7, 8, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0x1001, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff]

export interface Region {
  start: number
  end: number
}

/**
 * 1 to `most` mutations in a row; `region()` says where each one aims (undefined: anywhere).
 * `what` lists them, for the failure report.
 */
export function mutateSome(buf: Buffer, rand: Rand, most: number, region: () => Region | undefined): { out: Buffer; what: string } {
  let out = buf
  const whats: string[] = []
  for (let i = 0, k = 1 + int(rand, most); i < k; i++) {
    const m = mutate(out, rand, region())
    out = m.out
    whats.push(m.what)
  }
  return { out, what: whats.join('; ') }
}

/**
 * One mutation of `buf` (a copy is returned; the input is not changed), inside `region` when
 * given. `what` names the mutation for the failure report.
 */
export function mutate(buf: Buffer, rand: Rand, region?: Region): { out: Buffer; what: string } {
  const start = Math.max(0, Math.min(region?.start ?? 0, buf.length))
  const end = Math.max(start, Math.min(region?.end ?? buf.length, buf.length))
  const span = end - start
  const at = (width = 1): number => start + int(rand, Math.max(1, span - width + 1))
  const out = Buffer.from(buf)
  const kind = int(rand, 11)
  if (span === 0 && kind < 8) return { out, what: 'none (empty region)' }
  switch (kind) {
    case 0: {
      const n = 1 + int(rand, 8)
      for (let i = 0; i < n; i++) {
        const p = at()
        out[p] ^= 1 << int(rand, 8)
      }
      return { out, what: `${n} bit flips in ${start}..${end}` }
    }
    case 1:
    case 2: {
      const p = at()
      const v = kind === 1 ? pick(rand, [0x00, 0xff]) : int(rand, 256)
      const n = Math.min(end - p, 1 + int(rand, 16))
      out.fill(v, p, p + n)
      return { out, what: `${n} bytes at ${p} set to 0x${v.toString(16)}` }
    }
    case 3:
    case 4: {
      // a big-endian length or offset field (both formats are big-endian) set to an edge value
      if (span < 4) return { out, what: 'none (short region)' }
      const p = at(4)
      const v = pick(rand, INTERESTING32)
      out.writeUInt32BE(v >>> 0, p)
      return { out, what: `u32 at ${p} = 0x${v.toString(16)}` }
    }
    case 5: {
      if (span < 8) return { out, what: 'none (short region)' }
      const p = at(8)
      const v = pick(rand, [0n, 1n, 0xffffffffn, 0x100000000n, 0x1fffffffffffffn, 0x20000000000000n, 0xffffffffffffffffn])
      out.writeBigUInt64BE(v, p)
      return { out, what: `u64 at ${p} = 0x${v.toString(16)}` }
    }
    case 6: {
      const p = at()
      const n = Math.min(end - p, 1 + int(rand, 64))
      for (let i = 0; i < n; i++) out[p + i] = int(rand, 256)
      return { out, what: `${n} random bytes at ${p}` }
    }
    case 7: {
      const p = at()
      const v = out[p]
      out[p] = v === 0 ? 1 : v === 255 ? 254 : v + (rand() < 0.5 ? 1 : -1)
      return { out, what: `byte at ${p} nudged` }
    }
    case 8: {
      const cut = start + int(rand, span + 1)
      return { out: out.subarray(0, cut), what: `truncated at ${cut}` }
    }
    case 9: {
      // a chunk duplicated (shifts everything after it)
      const p = at()
      const n = Math.min(buf.length - p, 1 + int(rand, rand() < 0.5 ? 16 : 8192))
      return { out: Buffer.concat([buf.subarray(0, p + n), buf.subarray(p, p + n), buf.subarray(p + n)]), what: `${n} bytes at ${p} duplicated` }
    }
    default: {
      const p = at()
      const n = Math.min(buf.length - p, 1 + int(rand, rand() < 0.5 ? 16 : 8192))
      return { out: Buffer.concat([buf.subarray(0, p), buf.subarray(p + n)]), what: `${n} bytes at ${p} deleted` }
    }
  }
}

/**
 * Split `buf` into pieces of random sizes (the parsers are push state machines). Tiny pieces
 * only over the first 8 KiB, where the small fields are; after that, larger ones.
 */
export function pieces(buf: Buffer, rand: Rand): Buffer[] {
  const mode = int(rand, 4)
  if (mode === 0 || buf.length === 0) return [buf]
  const max = mode === 1 ? 8 : mode === 2 ? 5000 : 70_000
  const out: Buffer[] = []
  for (let p = 0; p < buf.length; ) {
    const n = 1 + int(rand, p < 8192 ? max : Math.max(max, 5000))
    out.push(buf.subarray(p, p + n))
    p += n
  }
  return out
}
