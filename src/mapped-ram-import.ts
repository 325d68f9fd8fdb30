// `create --from FILE` when FILE is a mapped-ram file (QEMU's `migrate file:` with capability
// mapped-ram, with or without multifd, optionally behind libvirt's header as its parallel save
// writes it): src/stream/mapped-ram.ts decodes the structure; the pages are read from each
// block's page array where its bitmap says, not from a stream; everything after the ram START
// section is an ordinary stream and goes through the StreamParser (device-tail.ts checks it).
//
//   FILE -> decodeMappedRamFile -> StreamParser(header, config without mapped-ram, START)
//        -> bitmap runs: clear = zero page, set = page read at pages_offset + i × 4096
//        -> StreamParser(the rest of the file) -> ImageWriter.finish
//
// The image keeps the configuration of a plain stream (mapped-ram taken out of the capabilities
// subsection), so that `load` feeds a destination with mapped-ram off; `load --format mapped-ram`
// puts it back (src/mapped-ram-export.ts).

import type { FileHandle } from 'node:fs/promises'
import { throwIfAborted } from './abort.js'
import { isAllZero } from './bytes.js'
import type { CreateOptions, CreateResult } from './create.js'
import type { ImageWriter } from './container/writer.js'
import { fromSystemError } from './errors.js'
import { withCapability } from './stream/configuration.js'
import { MAPPED_RAM_CAPABILITY, TARGET_PAGE_SIZE as PAGE } from './stream/constants.js'
import { fileHeader, ramStartSection } from './stream/encoder.js'
import { bitmapSize, decodeMappedRamFile, forEachRun, type MappedRamBlock, type RandomAccess } from './stream/mapped-ram.js'
import { StreamParser } from './stream/parser.js'
import { writerSink } from './ram-sink.js'
import { openInput } from './transport/input.js'

const READ = 4 << 20

/** Positional reads of an open file, short only at its end. */
export function fileAccess(fh: FileHandle, size: number, what: string): RandomAccess {
  return {
    size,
    async read(pos, len) {
      const n = Math.max(0, Math.min(len, size - pos))
      const b = Buffer.allocUnsafe(n)
      let got = 0
      try {
        while (got < n) {
          const { bytesRead } = await fh.read(b, got, n - got, pos + got)
          if (bytesRead === 0) break
          got += bytesRead
        }
      } catch (err) {
        throw fromSystemError(err, what)
      }
      return b.subarray(0, got)
    },
  }
}

/**
 * Fills `writer` from the mapped-ram file `from`; null (nothing done) when `from` is not one.
 * Errors propagate; the caller removes the partial image.
 */
export async function importMappedRam(writer: ImageWriter, from: string, opts: CreateOptions, started: number): Promise<CreateResult | null> {
  const fh = await openInput(from)
  try {
    const size = (await fh.stat()).size
    const src = fileAccess(fh, size, from)
    const file = await decodeMappedRamFile(src)
    if (file === null) return null

    const parser = new StreamParser(writerSink(writer))
    parser.push(fileHeader(withCapability(file.config, MAPPED_RAM_CAPABILITY, false)))
    parser.push(ramStartSection(file.ram, file.blocks))

    let bytesIn = file.tailOffset
    let dataPages = 0
    let zeroPages = 0
    for (let id = 0; id < file.blocks.length; id++) {
      const n = await readBlock(writer, src, file.blocks[id], id, opts, (bytes) => {
        bytesIn += bytes
        opts.onProgress?.(bytesIn, size)
      })
      dataPages += n.data
      zeroPages += n.zero
    }
    for (let pos = file.tailOffset; pos < size; pos += READ) {
      throwIfAborted(opts.signal)
      const chunk = await src.read(pos, READ)
      parser.push(chunk)
      bytesIn += chunk.length
    }
    const device = parser.end()
    const counters = parser.counters
    counters.pages += dataPages
    counters.zeroPages += zeroPages
    counters.bytesIn = bytesIn
    const source = file.libvirt ? 'libvirt' : 'qemu'
    const image = await writer.finish(device, { source, counters, libvirtHeader: file.libvirt?.header, compatibleFeatures: 0 })
    opts.onProgress?.(size, size)
    return { image, counters, source, bytesIn, bytesTotal: size, seconds: (performance.now() - started) / 1000 }
  } finally {
    await fh.close().catch(() => {})
  }
}

/** One block: a clear bit is a zero page; a set bit's page is read from the page array. */
async function readBlock(writer: ImageWriter, src: RandomAccess, b: MappedRamBlock, id: number, opts: CreateOptions, progress: (bytes: number) => void): Promise<{ data: number; zero: number }> {
  const pages = b.size / PAGE
  const bitmap = await src.read(b.bitmapOffset, bitmapSize(pages))
  const runs: Array<[number, number]> = []
  let data = 0
  let zero = 0
  forEachRun(bitmap, pages, (first, count, set) => {
    if (set) runs.push([first, count])
    else {
      for (let p = first; p < first + count; p++) writer.putZero(id, p)
      zero += count
    }
  })
  // Reads in pieces of up to 4 MiB, the next one under way while this one is stored.
  const pieces: Array<[number, number]> = []
  for (const [first, count] of runs) {
    for (let p = first; p < first + count; p += READ / PAGE) pieces.push([p, Math.min(READ / PAGE, first + count - p)])
  }
  const read = (k: number): Promise<Buffer> | null => (k < pieces.length ? src.read(b.pagesOffset + pieces[k][0] * PAGE, pieces[k][1] * PAGE) : null)
  let next = read(0)
  for (let k = 0; next !== null; k++) {
    throwIfAborted(opts.signal)
    const buf = await next
    next = read(k + 1)
    const [first] = pieces[k]
    for (let i = 0; i * PAGE < buf.length; i++) {
      const page = buf.subarray(i * PAGE, (i + 1) * PAGE)
      // A set bit over zero bytes (a hole, or a page written as zero): stored as a zero page.
      if (isAllZero(page)) {
        writer.putZero(id, first + i)
        zero++
      } else {
        writer.putPage(id, first + i, page)
        data++
      }
    }
    if (writer.needsDrain()) await writer.drain()
    progress(buf.length)
  }
  return { data, zero }
}
