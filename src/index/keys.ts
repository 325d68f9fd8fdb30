// The whole LevelDB key layout of the page index: format-spec/index.md, "Keys". Numbers are
// big-endian fixed width so that byte order sorts like number order; every value starts with
// a version byte.
import { pack, unpack } from 'msgpackr'
import { Reader, Writer } from '../bytes.js'
import { SnapError } from '../errors.js'
import { BASE_CLUSTER, ZERO_CLUSTER, type PageRun } from '../container/trailer.js'

export const INDEX_VERSION = 1
export const P_META = 0x00
export const P_RUN = 0x01
export const P_CLUSTER = 0x02
export const P_NAME = 0x03
export const META_KEY = Buffer.from([P_META, 0x6d, 0x65, 0x74, 0x61])
export const KIND_ZERO = 1
export const KIND_DATA = 2
/** an incremental image's run of pages taken from its base */
export const KIND_BASE = 3
/** a data run with the shared bit (container.md "Shared slots") */
export const KIND_SHARED = 4

const bad = (what: string): never => {
  throw new SnapError('SNAP_INDEX_CORRUPT', `the page index holds a malformed ${what}`)
}
const prefixRange = (p: number) => ({ gte: Buffer.from([p]), lt: Buffer.from([p + 1]) })
export const RUNS_RANGE = prefixRange(P_RUN)
export const CLUSTERS_RANGE = prefixRange(P_CLUSTER)
export const NAMES_RANGE = prefixRange(P_NAME)

// ---- 01: runs ------------------------------------------------------------------------------

export function runKey(blockId: number, byteOffset: number): Buffer {
  return new Writer(Buffer.alloc(13)).u8(P_RUN).u32(blockId).u64(byteOffset).buf
}

/** Every run key of one block, for a reverse seek: keys ≤ runKey(block, offset) within it. */
export function blockRunsUpTo(blockId: number, byteOffset: number): { gte: Buffer; lte: Buffer } {
  return { gte: runKey(blockId, 0), lte: runKey(blockId, byteOffset) }
}

export function decodeRunKey(key: Buffer): { blockId: number; byteOffset: number } {
  // Hot in loadAll: plain reads once the length is known.
  if (key.length !== 13 || key[0] !== P_RUN || key.readUInt32BE(5) >= 0x200000) bad('run key')
  return { blockId: key.readUInt32BE(1), byteOffset: key.readUInt32BE(5) * 0x100000000 + key.readUInt32BE(9) }
}

export interface RunValue {
  kind: typeof KIND_ZERO | typeof KIND_DATA | typeof KIND_BASE | typeof KIND_SHARED
  pageCount: number
  cluster: number
  firstSlot: number
}

export function encodeRunValue(v: RunValue): Buffer {
  return new Writer(Buffer.alloc(14)).u8(INDEX_VERSION).u8(v.kind).u32(v.pageCount).u32(v.cluster).u32(v.firstSlot).buf
}

export function decodeRunValue(b: Buffer): RunValue {
  if (b.length !== 14 || b[0] !== INDEX_VERSION || (b[1] !== KIND_ZERO && b[1] !== KIND_DATA && b[1] !== KIND_BASE && b[1] !== KIND_SHARED)) bad('run value')
  return { kind: b[1] as RunValue['kind'], pageCount: b.readUInt32BE(2), cluster: b.readUInt32BE(6), firstSlot: b.readUInt32BE(10) }
}

/** A page_map run as the index stores it (format-spec/index.md: a zero run has kind 1, cluster and slot 0xFFFFFFFF/0 as written). */
export function runEntry(r: PageRun, pageSize: number): [Buffer, Buffer] {
  const kind = r.cluster === ZERO_CLUSTER ? KIND_ZERO : r.cluster === BASE_CLUSTER ? KIND_BASE : r.shared ? KIND_SHARED : KIND_DATA
  return [runKey(r.blockId, r.firstPage * pageSize), encodeRunValue({ kind, pageCount: r.pageCount, cluster: r.cluster, firstSlot: r.firstSlot })]
}

/** The page_map run an index entry stands for. */
export function runFromEntry(key: Buffer, value: Buffer, pageSize: number): PageRun {
  const k = decodeRunKey(key)
  const v = decodeRunValue(value)
  const cluster = v.kind === KIND_ZERO ? ZERO_CLUSTER : v.kind === KIND_BASE ? BASE_CLUSTER : v.cluster
  const run: PageRun = { blockId: k.blockId, firstPage: k.byteOffset / pageSize, pageCount: v.pageCount, cluster, firstSlot: v.kind === KIND_DATA || v.kind === KIND_SHARED ? v.firstSlot : 0 }
  if (v.kind === KIND_SHARED) run.shared = true
  return run
}

// ---- 02: clusters --------------------------------------------------------------------------

export function clusterKey(seq: number): Buffer {
  return new Writer(Buffer.alloc(5)).u8(P_CLUSTER).u32(seq).buf
}

export function decodeClusterKey(key: Buffer): number {
  if (key.length !== 5 || key[0] !== P_CLUSTER) bad('cluster key')
  return key.readUInt32BE(1)
}

export interface ClusterValue {
  offset: number
  storedLength: number
  codec: number
  pageCount: number
}

export function encodeClusterValue(v: ClusterValue): Buffer {
  return new Writer(Buffer.alloc(18)).u8(INDEX_VERSION).u64(v.offset).u32(v.storedLength).u8(v.codec).u32(v.pageCount).buf
}

export function decodeClusterValue(b: Buffer): ClusterValue {
  if (b.length !== 18 || b[0] !== INDEX_VERSION) bad('cluster value')
  const r = new Reader(b, 1, 18, 'SNAP_INDEX_CORRUPT')
  return { offset: r.u64('offset', 'SNAP_INDEX_CORRUPT'), storedLength: r.u32(), codec: r.u8(), pageCount: r.u32() }
}

// ---- 03: names -----------------------------------------------------------------------------

export function nameKey(name: string): Buffer {
  return Buffer.concat([Buffer.from([P_NAME]), Buffer.from(name, 'latin1')])
}

export function decodeNameKey(key: Buffer): string {
  if (key.length < 2 || key[0] !== P_NAME) bad('name key')
  return key.subarray(1).toString('latin1')
}

export function encodeNameValue(blockId: number): Buffer {
  return new Writer(Buffer.alloc(5)).u8(INDEX_VERSION).u32(blockId).buf
}

export function decodeNameValue(b: Buffer): number {
  if (b.length !== 5 || b[0] !== INDEX_VERSION) bad('name value')
  return b.readUInt32BE(1)
}

// ---- 00 meta -------------------------------------------------------------------------------

export interface IndexMeta {
  uuid: Buffer
  generation: number
  fileLength: number
  trailerCrc: number
  runs: number
  clusters: number
  blocks: number
}

export function encodeMeta(m: IndexMeta): Buffer {
  const body = pack({ uuid: m.uuid, generation: m.generation, fileLength: m.fileLength, trailerCrc: m.trailerCrc, runs: m.runs, clusters: m.clusters, blocks: m.blocks })
  return Buffer.concat([Buffer.from([INDEX_VERSION]), body])
}

export function decodeMeta(b: Buffer): IndexMeta {
  if (b.length < 2 || b[0] !== INDEX_VERSION) bad('meta value')
  let m: Record<string, unknown>
  try {
    m = unpack(b.subarray(1)) as Record<string, unknown>
  } catch {
    return bad('meta value')
  }
  if (!m || typeof m !== 'object' || !(m.uuid instanceof Uint8Array)) bad('meta value')
  for (const k of ['generation', 'fileLength', 'trailerCrc', 'runs', 'clusters', 'blocks']) if (!Number.isSafeInteger(m[k])) bad('meta value')
  return { ...(m as unknown as IndexMeta), uuid: Buffer.from(m.uuid as Uint8Array) }
}
