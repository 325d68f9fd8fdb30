// The working set of an image: the pages a guest asked for first after a lazy restore, in that
// order (format-spec/container.md, "working_set (type 9)" and "Storing a working set"). The
// codec, and the one change snapctl makes to a finished image: adding or replacing this record,
// on a copy renamed into place, so that a crash never leaves a damaged image.
import { constants as fsc } from 'node:fs'
import { chmod, copyFile, open, rename, unlink } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { crc32 } from 'node:zlib'
import { Reader, Writer } from '../bytes.js'
import { SnapError, fromSystemError } from '../errors.js'
import { PAGE_DATA, type RamBlock } from '../types.js'
import { encodeFooter, FOOTER_SIZE } from './footer.js'
import { ALIGN, encodeHeader } from './header.js'
import { ImageReader } from './reader.js'
import { encodeTrailer, type TrailerRecord } from './trailer.js'

export const REC_WORKING_SET = 9
export const COMPAT_WORKING_SET = 1n << 1n
const VERSION = 1
const HEAD = 16

export interface WorkingSet {
  /** (block_id, page_index) pairs, in the order the guest asked */
  pages: Uint32Array
  /** ms since the epoch */
  recordedTime: number
}

export function encodeWorkingSet(ws: WorkingSet): Buffer {
  const count = ws.pages.length / 2
  const w = new Writer(Buffer.alloc(HEAD + 8 * count))
  w.u32(VERSION).u32(count).u64(ws.recordedTime)
  for (let i = 0; i < ws.pages.length; i++) w.u32(ws.pages[i])
  return w.buf
}

/** Checks everything the spec says: version, count against the body, each entry in its block, no repeats. */
export function decodeWorkingSet(body: Buffer, blocks: RamBlock[]): WorkingSet {
  const r = new Reader(body, 0, body.length, 'SNAP_CORRUPT', 0)
  const version = r.u32('working_set version')
  if (version !== VERSION) throw new SnapError('SNAP_CORRUPT', `a working_set record of version ${version}`)
  const count = r.u32('working_set count')
  const recordedTime = r.u64('recorded_time', 'SNAP_CORRUPT')
  const total = blocks.reduce((n, b) => n + b.size / b.pageSize, 0)
  if (count > total || body.length !== HEAD + 8 * count) throw new SnapError('SNAP_CORRUPT', `a working_set record of ${count} pages in ${body.length} bytes (the image has ${total} pages)`)
  const pages = new Uint32Array(2 * count)
  const seen = blocks.map((b) => new Uint8Array(b.size / b.pageSize))
  for (let i = 0; i < count; i++) {
    const b = r.u32('block_id')
    const p = r.u32('page_index')
    if (b >= blocks.length || p >= seen[b].length) throw new SnapError('SNAP_CORRUPT', `working_set entry ${i} names page ${p} of block ${b}, which the image does not have`)
    if (seen[b][p]) throw new SnapError('SNAP_CORRUPT', `working_set entry ${i} repeats page ${p} of block ${b}`)
    seen[b][p] = 1
    pages[2 * i] = b
    pages[2 * i + 1] = p
  }
  return { pages, recordedTime }
}

/** The image's working set, or null (none, or one that fails its checks: `onBad` says why). */
export function workingSetOf(reader: ImageReader, onBad?: (err: unknown) => void): WorkingSet | null {
  const body = reader.records.get(REC_WORKING_SET)
  if (!body) return null
  try {
    return decodeWorkingSet(body, reader.blocks)
  } catch (e) {
    onBad?.(e)
    return null
  }
}

/**
 * Where the working set's pages lie in the image, as (offset, length) ranges of whole clusters,
 * each cluster once, in the order of its first page in the set: for a source that can fetch them
 * ahead of need (ByteSource.prefetch, an image in object storage). Pages the image takes from its
 * base, or holds as zero, have none.
 */
export function workingSetRanges(reader: ImageReader, pages: Uint32Array): Array<[number, number]> {
  const out: Array<[number, number]> = []
  const seen = new Uint8Array(reader.clusterOffsets.length)
  for (let i = 0; i < pages.length; i += 2) {
    const l = reader.locate(pages[i], pages[i + 1])
    if (l.state !== PAGE_DATA || l.cluster === undefined || seen[l.cluster]) continue
    seen[l.cluster] = 1
    const next = l.cluster + 1 < seen.length ? reader.clusterOffsets[l.cluster + 1] : reader.header.trailerOffset
    out.push([reader.clusterOffsets[l.cluster], next - reader.clusterOffsets[l.cluster]])
  }
  return out
}

/** Adds (or replaces) the working set of a finished local image: container.md, "Storing a working set". */
export async function storeWorkingSet(path: string, ws: WorkingSet): Promise<{ generation: number; fileLength: number }> {
  const reader = await ImageReader.open(path, { whileCreating: 'refuse' })
  const h = reader.header
  const records: TrailerRecord[] = [...reader.records].filter(([t]) => t !== REC_WORKING_SET).map(([type, body]) => ({ type, body }))
  const clusterCount = reader.clusterOffsets.length
  await reader.close()
  records.push({ type: REC_WORKING_SET, body: encodeWorkingSet(ws) })
  const trailer = encodeTrailer(records)
  const generation = h.generation + 1
  const fileLength = Math.ceil((h.trailerOffset + trailer.length + FOOTER_SIZE) / ALIGN) * ALIGN
  const tail = Buffer.alloc(fileLength - h.trailerOffset)
  trailer.copy(tail, 0)
  encodeFooter({ uuid: h.uuid, trailerOffset: h.trailerOffset, trailerLength: trailer.length, trailerCrc: crc32(trailer), clusterCount, generation }).copy(tail, tail.length - FOOTER_SIZE)
  const header = encodeHeader({ ...h, generation, trailerLength: trailer.length, fileLength, compatibleFeatures: h.compatibleFeatures | COMPAT_WORKING_SET })

  const tmp = join(dirname(path), `.${basename(path)}.ws-${process.pid}`)
  try {
    await copyFile(path, tmp, fsc.COPYFILE_EXCL | fsc.COPYFILE_FICLONE)
    await chmod(tmp, 0o600)
    const fh = await open(tmp, 'r+')
    try {
      await fh.write(tail, 0, tail.length, h.trailerOffset)
      await fh.truncate(fileLength)
      await fh.datasync()
      await fh.write(header, 0, header.length, 0)
      await fh.datasync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (e) {
    await unlink(tmp).catch(() => {})
    throw fromSystemError(e, `storing the working set in ${path}`)
  }
  const dir = await open(dirname(path), 'r').catch(() => null)
  await dir?.sync().catch(() => {})
  await dir?.close()
  return { generation, fileLength }
}
