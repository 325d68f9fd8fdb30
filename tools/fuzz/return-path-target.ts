// The `return-path` fuzz target: the return path of a postcopy recovery (reference §5.3:
// RECV_BITMAP with its bitmap outside the message length, RESUME_ACK, page requests, SHUT),
// made for two small blocks (one of 4-page host pages), mutated, fed to ReturnPathParser in
// random pieces, and every bitmap that parses checked and applied as load --recover does
// (src/postcopy/received.ts).
import { ReturnPathParser, encodeRpMessage, type RpMessage } from '../../src/stream/return-path.js'
import { applyReceivedBitmap, receivedBitmapBytes } from '../../src/postcopy/received.js'
import type { RamBlock } from '../../src/types.js'
import { caseRng, int, mutateSome, pieces, type Rand } from './mutate.js'
import type { Classify, Target } from './targets.js'

const PAGE = 4096
const BLOCKS: RamBlock[] = [
  { id: 0, name: 'mem', size: 200 * PAGE, pageSize: PAGE },
  { id: 1, name: 'pc.bios', size: 3 * PAGE, pageSize: PAGE },
]
/** target pages per host page: 'mem' as if on 16 KiB hugepages */
const HOST_PAGES = [4, 1]

function synthReturnPath(seed: number): Buffer {
  const rand = caseRng(seed, 0)
  const msgs: RpMessage[] = BLOCKS.map((b, i) => {
    const pages = b.size / PAGE
    const bitmap = Buffer.alloc(receivedBitmapBytes(pages))
    for (let p = 0; p < pages; p += HOST_PAGES[i]) {
      if (rand() < 0.4) for (let q = p; q < p + HOST_PAGES[i]; q++) bitmap[q >> 3] |= 1 << (q & 7)
    }
    return { type: 'recv-bitmap', block: b.name, bitmap }
  })
  msgs.push({ type: 'resume-ack', value: 1 })
  for (let i = int(rand, 5); i > 0; i--) msgs.push({ type: 'req', block: i % 2 ? 'mem' : null, offset: int(rand, 200) * PAGE, length: PAGE })
  msgs.push({ type: 'shut', status: 0 })
  return Buffer.concat(msgs.map(encodeRpMessage))
}

export function returnPathTarget(classify: Classify): Target {
  const corpus = [synthReturnPath(1), synthReturnPath(2), synthReturnPath(3)]
  return {
    prepare(_n, rand: Rand) {
      const base = int(rand, corpus.length)
      // Mostly the bitmap messages' heads: type, length, name, size.
      const m = mutateSome(corpus[base], rand, 3, () => (rand() < 0.6 ? { start: 0, end: 60 } : undefined))
      return { input: m.out, what: `return path ${base}: ${m.what}` }
    },
    async run(p, rand) {
      const parser = new ReturnPathParser()
      const msgs: RpMessage[] = []
      try {
        for (const piece of pieces(p.input, rand)) msgs.push(...parser.push(piece))
        parser.end()
      } catch (e) {
        return [classify('parse', e)]
      }
      try {
        for (const m of msgs) {
          if (m.type !== 'recv-bitmap') continue
          const b = BLOCKS.find((x) => x.name === m.block)
          if (b) applyReceivedBitmap(b, HOST_PAGES[b.id], m.bitmap, new Uint8Array(b.size / PAGE))
        }
        return ['ok', 'ok']
      } catch (e) {
        return ['ok', classify('apply', e)]
      }
    },
    cleanup() {},
  }
}
