// `load IMAGE --to FILE --format mapped-ram`: the image as the file QEMU's `migrate file:` writes
// with capability mapped-ram, for `migrate-incoming file:FILE` with mapped-ram on (with or without
// multifd: the file is the same). Layout as QEMU's mapped_ram_setup_ramblock (src/stream/mapped-ram.ts,
// planMappedRam): header, configuration naming mapped-ram, ram START with MEM_SIZE; per block its
// entry and header, its bitmap, its page array at the next 1 MiB offset; then EOS, the PART and
// END sections (EOS only) and the device state as saved.
//
// Page states: a page with data is written in place with its bit set. A page never sent gets a
// clear bit: QEMU's mapped-ram load reads only pages whose bit is set and leaves the others as
// the destination has them, which is what a page never sent means. A zero page also gets a clear
// bit (a hole, nothing read) in guest RAM, which a freshly started destination holds zeroed; in
// every other block (firmware and ROM blocks such as pc.bios, pc.rom, /rom@etc/..., which the
// destination pre-fills itself) it gets a set bit over a hole, so that QEMU reads zeroes there
// and overwrites what it pre-filled. Holes cost no disk space either way.

import { write } from 'node:fs'
import { promisify } from 'node:util'
import { unlessAborted, throwIfAborted } from './abort.js'
import { Writer } from './bytes.js'
import { openImage, type RestoreImage } from './container/chain.js'
import { SnapError, fromSystemError } from './errors.js'
import { checkOutputFile } from './paths.js'
import { withCapability } from './stream/configuration.js'
import * as C from './stream/constants.js'
import { eosFooter, fileHeader, sectionPartHeader, streamEnding } from './stream/encoder.js'
import { bitmapSize, blockEntry, planMappedRam, setBit } from './stream/mapped-ram.js'
import { openOutput } from './transport/output.js'
import type { RamBlock } from './types.js'

const PAGE = C.TARGET_PAGE_SIZE
const pwrite = promisify(write)
/** blocks this large are guest RAM (zeroed at a fresh destination), as is the largest block */
const GUEST_RAM_MIN = 64 << 20

export interface MappedRamExportOptions {
  to: string
  force?: boolean
  onProgress?: (pageBytesWritten: number, pageBytesTotal: number) => void
  signal?: AbortSignal
}

export interface MappedRamExportResult {
  pages: number
  storedPages: number
  zeroPages: number
  /** zero pages written as a set bit over a hole (blocks the destination pre-fills) */
  zeroPagesSet: number
  clusters: number
  /** the file's length (most of it holes) */
  fileBytes: number
  /** bytes written: pages, bitmaps and the stream */
  bytesOut: number
  seconds: number
}

/** Zero pages of this block get a clear bit (the destination has it zeroed). */
export function zeroedAtDestination(b: RamBlock, blocks: RamBlock[]): boolean {
  return b.size >= GUEST_RAM_MIN || b.size === Math.max(...blocks.map((x) => x.size))
}

export async function exportMappedRam(path: string, opts: MappedRamExportOptions): Promise<MappedRamExportResult> {
  const started = performance.now()
  const st = await checkOutputFile(opts.to, '--to')
  if (st && !st.isFile()) throw new SnapError('SNAP_BAD_PATH', `--to ${opts.to}: a mapped-ram file is written at offsets, so it must be a regular file`)
  const reader = await openImage(path, { whileCreating: 'refuse' })
  const opening = openOutput(opts.to, { force: opts.force })
  opening.catch(() => {})
  const work = (async () => {
    const out = await opening
    try {
      const r = await writeFile(reader, out.fd, opts, started)
      await out.close()
      return r
    } catch (err) {
      await out.discard()
      throw err
    }
  })()
  try {
    return await unlessAborted(opts.signal, work, async () => (await opening.catch(() => null))?.discard())
  } finally {
    await reader.close()
  }
}

async function writeFile(reader: RestoreImage, fd: number, opts: MappedRamExportOptions, started: number): Promise<MappedRamExportResult> {
  let bytesOut = 0
  const put = async (buf: Uint8Array, pos: number): Promise<void> => {
    for (let done = 0; done < buf.length;) {
      let n: number
      try {
        n = (await pwrite(fd, buf, done, buf.length - done, pos + done)).bytesWritten
      } catch (err) {
        throw fromSystemError(err, opts.to)
      }
      done += n
    }
    bytesOut += buf.length
  }
  const d = reader.device
  const blocks = reader.blocks
  const ids = { sectionId: d.ramSectionId, instanceId: d.ramInstanceId, version: d.ramVersion }
  const config = withCapability(d.config, C.MAPPED_RAM_CAPABILITY, true)
  const total = blocks.reduce((a, b) => a + b.size, 0)
  const startHdr = Writer.alloc(1 + 4 + 1 + C.RAM_SECTION_IDSTR.length + 8 + 8)
  startHdr.u8(C.QEMU_VM_SECTION_START).u32(ids.sectionId).str8(C.RAM_SECTION_IDSTR).u32(ids.instanceId).u32(ids.version)
  startHdr.u64(total + C.RAM_SAVE_FLAG_MEM_SIZE)
  const head = Buffer.concat([fileHeader(config), startHdr.done()])
  const plan = planMappedRam(blocks, head.length)
  await put(head, 0)
  let at = head.length
  for (const b of plan.blocks) {
    await put(blockEntry(b), at)
    at = b.pagesOffset + b.size
  }

  const bitmaps = blocks.map((b) => Buffer.alloc(bitmapSize(b.size / PAGE)))
  const locator = reader.locator
  const { zeroPages, storedPages } = locator.totals()
  const clear = blocks.map((b) => zeroedAtDestination(b, blocks))
  let zeroPagesSet = 0
  locator.forEachZero((b, p) => {
    if (clear[b]) return
    setBit(bitmaps[b], p)
    zeroPagesSet++
  })

  let pages = 0
  let clusters = 0
  for await (const cluster of reader.clusters()) {
    throwIfAborted(opts.signal)
    const slots = locator.liveSlots(cluster.seq, cluster.pages, { offset: cluster.offset })
    const shared = locator.sharedPages(cluster.seq, cluster.pages, { offset: cluster.offset })
    if (slots.length === 0 && shared.length === 0) continue
    clusters++
    const list = cluster.pages
    // Runs of slots that are consecutive pages of one block go out in one write.
    const writes: Promise<void>[] = []
    for (let i = 0; i < slots.length;) {
      const s0 = slots[i]
      const block = list[2 * s0]
      const page0 = list[2 * s0 + 1]
      let n = 1
      while (i + n < slots.length && slots[i + n] === s0 + n && list[2 * (s0 + n)] === block && list[2 * (s0 + n) + 1] === page0 + n) n++
      for (let k = 0; k < n; k++) setBit(bitmaps[block], page0 + k)
      writes.push(put(cluster.raw.subarray(s0 * PAGE, (s0 + n) * PAGE), plan.blocks[block].pagesOffset + page0 * PAGE))
      i += n
    }
    // A shared slot's bytes also go where each page stored once for several places is (container.md "Shared slots").
    for (let i = 0; i < shared.length; i += 3) {
      setBit(bitmaps[shared[i + 1]], shared[i + 2])
      writes.push(put(cluster.raw.subarray(shared[i] * PAGE, (shared[i] + 1) * PAGE), plan.blocks[shared[i + 1]].pagesOffset + shared[i + 2] * PAGE))
    }
    await Promise.all(writes)
    pages += slots.length + shared.length / 3
    opts.onProgress?.(pages * PAGE, storedPages * PAGE)
  }
  for (let b = 0; b < blocks.length; b++) await put(bitmaps[b], plan.blocks[b].bitmapOffset)

  const rest = Buffer.concat([eosFooter(ids.sectionId), sectionPartHeader(ids.sectionId), eosFooter(ids.sectionId), ...streamEnding(d)])
  await put(rest, plan.end)
  return {
    pages: pages + zeroPages,
    storedPages: pages,
    zeroPages,
    zeroPagesSet,
    clusters,
    fileBytes: plan.end + rest.length,
    bytesOut,
    seconds: (performance.now() - started) / 1000,
  }
}
