// The trailer and its records: format-spec/container.md, "The trailer" (records 1-7) and
// "Reading an image" step 4. Bodies of records 4-6 (device state) are kept as raw bytes.
// The subpaths, not 'msgpackr': its Node entry also loads its stream classes and the optional
// native string extractor (msgpackr-extract), ~2x the CPU to load, for the few small records of
// a trailer; every command that opens an image (a lazy restore before its device state) pays it.
import { pack } from 'msgpackr/pack'
import { unpack } from 'msgpackr/unpack'
import { Reader, Writer, roundUp } from '../bytes.js'
import { SnapError } from '../errors.js'
import type { RamBlock, StreamCounters } from '../types.js'

export const REC_STREAM_INFO = 1
export const REC_BLOCK_TABLE = 2
export const REC_PAGE_MAP = 3
export const REC_CONFIG = 4
export const REC_DEVICE_SECTIONS = 5
export const REC_STREAM_END = 6
export const REC_CLUSTER_DIRECTORY = 7
export const RECORD_HEADER = 16
export const MAX_BLOCKS = 4096
/** page_map `cluster` of a run of zero pages */
export const ZERO_CLUSTER = 0xffffffff
/** page_map `cluster` of a run of pages an incremental image takes from its base */
export const BASE_CLUSTER = 0xfffffffe
export const REC_BASE_IMAGE = 8
const RUN_SIZE = 20
const BLOCK_ENTRY_MIN = 17

const corrupt = (msg: string, details: Record<string, unknown> = {}): never => {
  throw new SnapError('SNAP_CORRUPT', msg, details)
}
const tooLarge = (msg: string): never => {
  throw new SnapError('SNAP_TOO_LARGE', msg)
}

// ---- records -------------------------------------------------------------------------------

export interface TrailerRecord {
  type: number
  body: Buffer
}

export function trailerSize(records: TrailerRecord[]): number {
  let n = 0
  for (const r of records) n = roundUp(n, 8) + RECORD_HEADER + r.body.length
  return n
}

export function encodeTrailer(records: TrailerRecord[]): Buffer {
  const w = new Writer(Buffer.alloc(trailerSize(records)))
  for (const r of records) {
    w.zeros(roundUp(w.pos, 8) - w.pos)
    w.u32(r.type).u32(0).u64(r.body.length).bytes(r.body)
  }
  return w.buf
}

/**
 * Split the trailer into records by type; `offset` is the trailer's file offset. `at` gets each
 * kept record's file offset (its 16-byte record header).
 */
export function decodeTrailer(buf: Buffer, offset = 0, at?: Map<number, number>): Map<number, Buffer> {
  const out = new Map<number, Buffer>()
  const r = new Reader(buf, 0, buf.length, 'SNAP_CORRUPT', offset)
  while (r.left > 0) {
    r.pos = Math.min(roundUp(r.pos, 8), r.end)
    if (r.left === 0) break
    const type = r.u32('record type')
    r.u32('record flags')
    const start = offset + r.pos - 8
    const length = r.u64('record length', 'SNAP_CORRUPT')
    if (length > r.left) corrupt(`trailer record ${type} runs past the trailer end`, { offset: offset + r.pos })
    const body = r.bytes(length)
    if (type >= REC_STREAM_INFO && type <= REC_BASE_IMAGE && out.has(type)) corrupt(`trailer record ${type} appears twice`)
    if (!out.has(type)) {
      out.set(type, body)
      at?.set(type, start)
    }
  }
  for (let t = REC_STREAM_INFO; t <= REC_STREAM_END; t++) if (!out.has(t)) corrupt(`the trailer lacks record type ${t}`)
  return out
}

// ---- stream_info (1) ---------------------------------------------------------------------

export interface StreamInfo {
  v: number
  ramSectionId: number
  ramInstanceId: number
  ramVersion: number
  switchoverStart: boolean
  ramEnd: boolean
  source: 'qemu' | 'libvirt'
  libvirtHeader?: Buffer
  creator: string
  counters: Partial<StreamCounters>
  /** the full machine type name (the header keeps at most 62 bytes) */
  machine?: string
  [key: string]: unknown
}

export function encodeStreamInfo(info: StreamInfo): Buffer {
  const m: Record<string, unknown> = { ...info }
  for (const k of Object.keys(m)) if (m[k] === undefined) delete m[k]
  return pack(m)
}

export function decodeStreamInfo(body: Buffer): StreamInfo {
  let m: unknown
  try {
    m = unpack(body)
  } catch {
    return corrupt('stream_info is not valid MessagePack')
  }
  if (m === null || typeof m !== 'object' || Array.isArray(m) || m instanceof Uint8Array) return corrupt('stream_info is not a map')
  const s = m as Record<string, unknown>
  const int = (k: string) => {
    if (!Number.isSafeInteger(s[k]) || (s[k] as number) < 0) corrupt(`stream_info.${k} is not an integer`)
  }
  int('v')
  int('ramSectionId')
  int('ramInstanceId')
  int('ramVersion')
  if (typeof s.switchoverStart !== 'boolean' || typeof s.ramEnd !== 'boolean') corrupt('stream_info flags are not booleans')
  if (s.source !== 'qemu' && s.source !== 'libvirt') corrupt('stream_info.source is not qemu or libvirt')
  if (s.libvirtHeader !== undefined && !(s.libvirtHeader instanceof Uint8Array)) corrupt('stream_info.libvirtHeader is not bytes')
  if (s.libvirtHeader instanceof Uint8Array) s.libvirtHeader = Buffer.from(s.libvirtHeader)
  if (s.counters === undefined || s.counters === null || typeof s.counters !== 'object') s.counters = {}
  return s as unknown as StreamInfo
}

// ---- block_table (2) -----------------------------------------------------------------------

export function encodeBlockTable(blocks: RamBlock[]): Buffer {
  const names = blocks.map((b) => Buffer.from(b.name, 'latin1'))
  const w = new Writer(Buffer.alloc(4 + names.reduce((n, b) => n + BLOCK_ENTRY_MIN + b.length, 0)))
  w.u32(blocks.length)
  blocks.forEach((b, i) => w.u32(i).u64(b.size).u32(b.pageSize).u8(names[i].length).bytes(names[i]))
  return w.buf
}

export function decodeBlockTable(body: Buffer, pageSize: number): RamBlock[] {
  const r = new Reader(body, 0, body.length, 'SNAP_CORRUPT')
  const count = r.u32('block count')
  if (count * BLOCK_ENTRY_MIN > r.left) tooLarge(`block_table count ${count} is larger than its record`)
  if (count < 1 || count > MAX_BLOCKS) corrupt(`block_table count ${count} is out of range`)
  const blocks: RamBlock[] = []
  const seen = new Set<string>()
  for (let i = 0; i < count; i++) {
    const id = r.u32('block_id')
    const size = r.u64('block size', 'SNAP_CORRUPT')
    const ps = r.u32('block page_size')
    const nameLength = r.u8('name_length')
    const name = r.bytes(nameLength, 'block name').toString('latin1')
    if (id !== i) corrupt(`block_table entry ${i} has block_id ${id}`)
    if (ps !== pageSize) corrupt(`block ${name} has page_size ${ps}, the header says ${pageSize}`)
    if (size % pageSize !== 0 || size / pageSize > 0xffffffff) corrupt(`block ${name} has a bad size ${size}`)
    if (nameLength < 1 || seen.has(name)) corrupt(`block_table entry ${i} has an empty or repeated name`)
    seen.add(name)
    blocks.push({ id, name, size, pageSize: ps })
  }
  return blocks
}

// ---- page_map (3) --------------------------------------------------------------------------

export interface PageRun {
  blockId: number
  firstPage: number
  pageCount: number
  /** cluster sequence number, or ZERO_CLUSTER */
  cluster: number
  firstSlot: number
  /** a shared run (first_slot bit 31, container.md "Shared slots"): the slots' pages entries may name other pages */
  shared?: boolean
}

/** first_slot bit 31: a shared run (only with incompatible bit 4, shared_slots). */
export const SHARED_RUN = 0x80000000

export function encodePageMap(runs: PageRun[]): Buffer {
  const w = new Writer(Buffer.alloc(4 + RUN_SIZE * runs.length))
  w.u32(runs.length)
  for (const r of runs) w.u32(r.blockId).u32(r.firstPage).u32(r.pageCount).u32(r.cluster).u32(r.shared ? (r.firstSlot | SHARED_RUN) >>> 0 : r.firstSlot)
  return w.buf
}

/**
 * Decode and check the page map against the block table and the cluster count: sorted,
 * not overlapping, inside its block, slots inside a cluster's largest page count. Base runs
 * (BASE_CLUSTER) only in an image with a base (`hasBase`), shared runs only in one with
 * incompatible bit 4 (`sharedSlots`).
 */
export function decodePageMap(body: Buffer, blocks: RamBlock[], clusterCount: number, maxPages: number, hasBase = false, sharedSlots = false): PageRun[] {
  const r = new Reader(body, 0, body.length, 'SNAP_CORRUPT')
  const count = r.u32('run_count')
  // Check before allocating: a count of 0xFFFFFFFF must cost nothing.
  if (count * RUN_SIZE > r.left) tooLarge(`page_map run_count ${count} is larger than its record`)
  if (count * RUN_SIZE !== r.left) corrupt('page_map has bytes after its last run')
  const runs: PageRun[] = new Array(count)
  let prevBlock = -1
  let prevEnd = 0
  for (let i = 0; i < count; i++) {
    const run: PageRun = { blockId: r.u32(), firstPage: r.u32(), pageCount: r.u32(), cluster: r.u32(), firstSlot: r.u32() }
    if (run.firstSlot >= SHARED_RUN && sharedSlots && run.cluster !== ZERO_CLUSTER && run.cluster !== BASE_CLUSTER) {
      run.firstSlot -= SHARED_RUN
      run.shared = true
    }
    const b = blocks[run.blockId]
    if (!b) corrupt(`page_map run ${i} names block ${run.blockId}, which is not in the block table`)
    if (run.pageCount < 1 || run.firstPage + run.pageCount > b.size / b.pageSize) corrupt(`page_map run ${i} is outside block ${b.name}`)
    if (run.blockId < prevBlock || (run.blockId === prevBlock && run.firstPage < prevEnd)) corrupt(`page_map run ${i} is out of order or overlaps`)
    if (run.cluster === ZERO_CLUSTER || (run.cluster === BASE_CLUSTER && hasBase)) {
      if (run.firstSlot !== 0) corrupt(`page_map zero or base run ${i} has first_slot ${run.firstSlot}`)
    } else if (run.cluster >= clusterCount || run.firstSlot + run.pageCount > maxPages) {
      corrupt(`page_map run ${i} points outside the data clusters`)
    }
    prevBlock = run.blockId
    prevEnd = run.firstPage + run.pageCount
    runs[i] = run
  }
  return runs
}

// ---- cluster_directory (7) -----------------------------------------------------------------

export function encodeClusterDirectory(offsets: number[]): Buffer {
  const w = new Writer(Buffer.alloc(4 + 8 * offsets.length))
  w.u32(offsets.length)
  for (const o of offsets) w.u64(o)
  return w.buf
}

export function decodeClusterDirectory(body: Buffer): number[] {
  const r = new Reader(body, 0, body.length, 'SNAP_CORRUPT')
  const count = r.u32('cluster count')
  if (count * 8 > r.left) tooLarge(`cluster_directory count ${count} is larger than its record`)
  const offsets: number[] = new Array(count)
  for (let i = 0; i < count; i++) offsets[i] = r.u64('cluster offset', 'SNAP_CORRUPT')
  return offsets
}
