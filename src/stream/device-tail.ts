// Validation of a stream's device tail: everything from the first top-level FULL section (or EOF)
// after the RAM to the end of input. Device sections carry no length (reference §1.5), so the
// only way to know the tail is whole is the JSON VM description at its end (§1.8, §1.11): it
// describes every FULL section's fields and subsections, and walking them must land exactly on
// the EOF byte that precedes the description.

import { SnapError } from '../errors.js'
import { Reader } from '../bytes.js'
import {
  QEMU_VM_EOF,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SUBSECTION,
  QEMU_VM_VMDESCRIPTION,
} from './constants.js'

export interface TailLayout {
  /** index in the tail of the QEMU_VM_EOF byte */
  eof: number
  /** FULL sections found (from the JSON; 0 when there is none) */
  sections: number
  /** whether a VM description follows the EOF byte */
  vmdesc: boolean
}

const MAX_DEPTH = 32

function corrupt(msg: string, offset?: number): SnapError {
  return new SnapError('SNAP_STREAM_CORRUPT', msg, offset === undefined ? {} : { offset })
}

/**
 * Find where the device sections end in `tail` and check they are whole. `baseOffset` is the
 * stream offset of tail[0], for messages. Throws SNAP_STREAM_TRUNCATED when the tail cannot be
 * the end of a finished stream, SNAP_STREAM_CORRUPT when the description and the bytes disagree.
 */
export function checkDeviceTail(tail: Buffer, baseOffset: number): TailLayout {
  let firstError: SnapError | null = null
  // A description candidate: EOF, 0x06, a BE u32 length reaching exactly the end, then '{'.
  for (let p = tail.indexOf(QEMU_VM_EOF); p >= 0 && p + 6 < tail.length; p = tail.indexOf(QEMU_VM_EOF, p + 1)) {
    if (tail[p + 1] !== QEMU_VM_VMDESCRIPTION || tail[p + 6] !== 0x7b) continue
    if (p + 6 + tail.readUInt32BE(p + 2) !== tail.length) continue
    let desc: unknown
    try {
      desc = JSON.parse(tail.toString('utf8', p + 6))
    } catch {
      continue // not JSON: a coincidence inside device data
    }
    try {
      const sections = walkDevices(tail, p, desc, baseOffset)
      return { eof: p, sections, vmdesc: true }
    } catch (err) {
      firstError ??= err as SnapError
    }
  }
  if (firstError) throw firstError
  if (tail[tail.length - 1] === QEMU_VM_EOF && plausibleWithoutDesc(tail)) {
    return { eof: tail.length - 1, sections: 0, vmdesc: false }
  }
  throw new SnapError(
    'SNAP_STREAM_TRUNCATED',
    'the stream ends inside the device state (no EOF and VM description at the end): it was cut short',
    { offset: baseOffset + tail.length },
  )
}

/** No description (e.g. suppress-vmdesc): the tail must be a lone EOF, or FULL sections whose
 * last footer names a FULL section header found before it, then EOF. */
function plausibleWithoutDesc(tail: Buffer): boolean {
  const n = tail.length
  if (n === 1) return true
  if (tail[0] !== QEMU_VM_SECTION_FULL || n < 7 || tail[n - 6] !== QEMU_VM_SECTION_FOOTER) return false
  const id = tail.readUInt32BE(n - 5)
  for (let q = tail.lastIndexOf(QEMU_VM_SECTION_FULL, n - 7); q >= 0; q = q > 0 ? tail.lastIndexOf(QEMU_VM_SECTION_FULL, q - 1) : -1) {
    if (q + 6 > n - 6 || tail.readUInt32BE(q + 1) !== id) continue
    const len = tail[q + 5]
    if (len === 0 || q + 6 + len + 8 > n - 6) continue
    if (q !== 0 && tail[q - 5] !== QEMU_VM_SECTION_FOOTER) continue
    let printable = true
    for (let i = q + 6; i < q + 6 + len; i++) if (tail[i] < 0x20 || tail[i] > 0x7e) printable = false
    if (printable) return true
  }
  return false
}

interface Desc {
  [key: string]: unknown
}

function isObj(v: unknown): v is Desc {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function count(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw corrupt(`VM description: bad ${what}`)
  return v
}

/** Walk every FULL section the description lists; they must end exactly at `eof`. */
function walkDevices(tail: Buffer, eof: number, desc: unknown, base: number): number {
  if (!isObj(desc) || !Array.isArray(desc.devices)) throw corrupt('VM description: no "devices" list')
  const r = new Reader(tail, 0, eof, 'SNAP_STREAM_CORRUPT', base)
  for (const dev of desc.devices) {
    if (!isObj(dev)) throw corrupt('VM description: a device entry is not an object')
    const at = r.pos
    const name = String(dev.name)
    if (r.u8('section type') !== QEMU_VM_SECTION_FULL) {
      throw corrupt(`device section "${name}" expected (FULL, 0x04) where the description puts it`, base + at)
    }
    const id = r.u32('section id')
    const idstr = r.str8('section idstr')
    const instance = r.u32('instance id')
    const version = r.u32('version id')
    if (idstr !== name || instance !== count(dev.instance_id, 'instance_id') || version !== count(dev.version, 'version')) {
      throw corrupt(`device section ${idstr} ${instance} v${version} where the description has ${name} ${String(dev.instance_id)} v${String(dev.version)}`, base + at)
    }
    walkStruct(r, dev, 0, name)
    const fat = r.pos
    if (r.u8('section footer') !== QEMU_VM_SECTION_FOOTER || r.u32('footer id') !== id) {
      throw corrupt(`device section "${name}": no footer for section ${id} where the description ends it`, base + fat)
    }
  }
  if (r.pos !== eof) throw corrupt(`device sections end at ${base + r.pos}, but EOF is at ${base + eof}`, base + r.pos)
  return desc.devices.length
}

/** The fields of one vmstate description, then its subsections (as scripts/analyze-migration.py reads them). */
function walkStruct(r: Reader, d: Desc, depth: number, where: string): void {
  if (depth > MAX_DEPTH) throw corrupt(`VM description of ${where} nests too deep`)
  if (!Array.isArray(d.fields)) throw corrupt(`VM description of ${where}: no fields`)
  for (const f of d.fields) {
    if (!isObj(f)) throw corrupt(`VM description of ${where}: a field is not an object`)
    const n = f.array_len === undefined ? 1 : count(f.array_len, 'array_len')
    if (f.type === 'struct' && isObj(f.struct)) {
      for (let i = 0; i < n; i++) walkStruct(r, f.struct, depth + 1, `${where}.${String(f.name)}`)
    } else if (f.type === 'capability') {
      for (let i = 0; i < n; i++) r.str8('capability')
    } else {
      const size = count(f.size, 'field size') * n
      r.need(size, `${where}.${String(f.name)}`)
      r.pos += size
    }
  }
  if (d.subsections === undefined) return
  if (!Array.isArray(d.subsections)) throw corrupt(`VM description of ${where}: bad subsections`)
  for (const s of d.subsections) {
    if (!isObj(s)) throw corrupt(`VM description of ${where}: a subsection is not an object`)
    const at = r.pos
    const sname = r.u8('subsection marker') === QEMU_VM_SUBSECTION ? r.str8('subsection name') : null
    if (sname !== String(s.vmsd_name) || r.u32('subsection version') !== count(s.version, 'version')) {
      throw corrupt(`${where}: subsection "${String(s.vmsd_name)}" expected where the description puts it`, r.baseOffset + at)
    }
    walkStruct(r, s, depth + 1, sname)
  }
}
