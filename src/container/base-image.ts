// The base-image reference of an incremental image: format-spec/container.md, "base_image
// (type 8)". The codec only; resolving the chain (path, uuid, generation, loops) is chain.ts.
import { Reader, Writer } from '../bytes.js'
import { SnapError } from '../errors.js'

const VERSION = 1
const HEAD = 48
export const MAX_BASE_PATH = 4095

export interface BaseImageRef {
  /** the base's uuid, generation, file_length and trailer_crc when the child was made */
  uuid: Buffer
  generation: number
  fileLength: number
  trailerCrc: number
  /** the base's path, relative to the directory of the image that names it */
  path: string
}

export function encodeBaseImage(ref: BaseImageRef): Buffer {
  const path = Buffer.from(ref.path, 'utf8')
  if (path.length < 1 || path.length > MAX_BASE_PATH || path.includes(0)) {
    throw new SnapError('SNAP_USAGE', `a base path of ${path.length} bytes (1 to ${MAX_BASE_PATH}, no NUL)`)
  }
  const w = new Writer(Buffer.alloc(HEAD + path.length))
  w.u32(VERSION).u32(0).bytes(ref.uuid.subarray(0, 16)).u64(ref.generation).u64(ref.fileLength).u32(ref.trailerCrc).u16(0).u16(path.length).bytes(path)
  return w.buf
}

const corrupt = (msg: string): never => {
  throw new SnapError('SNAP_CORRUPT', msg)
}

export function decodeBaseImage(body: Buffer): BaseImageRef {
  const r = new Reader(body, 0, body.length, 'SNAP_CORRUPT')
  const version = r.u32('base_image version')
  if (version !== VERSION) corrupt(`a base_image record of version ${version}`)
  r.u32('base_image flags')
  const uuid = Buffer.from(r.bytes(16, 'base_uuid'))
  const generation = r.u64('base_generation', 'SNAP_CORRUPT')
  const fileLength = r.u64('base_file_length', 'SNAP_CORRUPT')
  const trailerCrc = r.u32('base_trailer_crc')
  r.u16('reserved')
  const n = r.u16('path_length')
  if (n < 1 || n > MAX_BASE_PATH || n !== r.left) corrupt(`base_image path_length ${n} in a record of ${body.length} bytes`)
  const raw = r.bytes(n, 'base path')
  const path = raw.toString('utf8')
  if (raw.includes(0) || !Buffer.from(path, 'utf8').equals(raw)) corrupt('the base_image path is not NUL-free UTF-8')
  if (generation < 1 || fileLength < 8192 || fileLength % 4096 !== 0) corrupt(`base_image names generation ${generation}, file_length ${fileLength}`)
  return { uuid, generation, fileLength, trailerCrc, path }
}
