// Validation of a stream's device tail: everything from the first top-level FULL section (or EOF)
// after the RAM to the end of input. Device sections carry no length (reference §1.5), so a tail
// is proven whole by what can be proven of it, strongest first:
//   1. walked: the JSON VM description at the end (§1.8, §1.11) describes the section's fields
//      and subsections (or, for a legacy handler such as slirp, its byte size), and walking them
//      lands exactly on the section's footer;
//   2. chained ("taken on trust"): the description does not describe the section (custom
//      put/get, a legacy handler), or describes it wrongly, so its end is found as the footer
//      with its own section id that is followed by the next section's header (the one the
//      description names next: names, instances and order must always match) or by the EOF byte.
// With no description at all, every section is chained, with any well-formed FULL header next.
// QEMU itself never reads the description on load: whatever it accepts, we must accept, and the
// bytes are always kept as they are. A cut or garbled tail still fails: the chain must reach the
// EOF byte exactly.

import { SnapError } from '../errors.js'
import { Reader } from '../bytes.js'
import {
  QEMU_VM_EOF,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SUBSECTION,
  QEMU_VM_VMDESCRIPTION,
} from './constants.js'

/** One FULL section of the tail, and how its end was proven. */
export interface SectionCheck {
  name: string
  instance: number
  version: number
  /** index in the tail of the section's type byte */
  offset: number
  /** type byte through footer */
  length: number
  how: 'walked' | 'chained'
}

export interface TailLayout {
  /** index in the tail of the QEMU_VM_EOF byte */
  eof: number
  /** whether a VM description follows the EOF byte */
  vmdesc: boolean
  sections: SectionCheck[]
}

/** What `info` says of the device state. */
export interface DeviceCheck {
  description: boolean
  sections: number
  walked: number
  /** sections whose end was found by footer chaining only: "name/instance" */
  trusted: string[]
  /** why the stored bytes could not be checked (an image not written by create from a QEMU stream) */
  error?: string
}

const MAX_DEPTH = 32
/** chain positions tried before a tail counts as garbage (a real one needs one per section) */
const MAX_STEPS = 200_000

function corrupt(msg: string, offset?: number): SnapError {
  return new SnapError('SNAP_STREAM_CORRUPT', msg, offset === undefined ? {} : { offset })
}

/**
 * Find where the device sections end in `tail` and check they are whole. `baseOffset` is the
 * stream offset of tail[0], for messages. Throws SNAP_STREAM_TRUNCATED when the tail cannot be
 * the end of a finished stream, SNAP_STREAM_CORRUPT when its sections do not chain to EOF.
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
    const devices = isObj(desc) && Array.isArray(desc.devices) && desc.devices.every(isObj) ? (desc.devices as Desc[]) : null
    // A description that lists the devices (QEMU's always does, one entry per FULL section, in
    // order) must name them right; one without a usable list leaves the sections unnamed.
    const sections = new Chain(tail, p, devices).run()
    if (sections) return { eof: p, vmdesc: true, sections }
    firstError ??= corrupt(`the device sections do not chain from header to footer up to EOF at ${baseOffset + p}`, baseOffset)
  }
  if (firstError) throw firstError
  if (tail[tail.length - 1] === QEMU_VM_EOF) {
    const sections = new Chain(tail, tail.length - 1, null).run()
    if (sections) return { eof: tail.length - 1, vmdesc: false, sections }
  }
  throw new SnapError(
    'SNAP_STREAM_TRUNCATED',
    'the stream ends inside the device state (no EOF and VM description at the end): it was cut short',
    { offset: baseOffset + tail.length },
  )
}

/** The summary `info` prints: how each device section was checked. */
export function describeDeviceCheck(deviceSections: Buffer, streamEnd: Buffer): DeviceCheck {
  let layout: TailLayout
  try {
    layout = checkDeviceTail(Buffer.concat([deviceSections, streamEnd]), 0)
  } catch (e) {
    return { description: false, sections: 0, walked: 0, trusted: [], error: e instanceof SnapError ? `${e.code}: ${e.message}` : String(e) }
  }
  const trusted = layout.sections.filter((s) => s.how === 'chained').map((s) => `${s.name}/${s.instance}`)
  return { description: layout.vmdesc, sections: layout.sections.length, walked: layout.sections.length - trusted.length, trusted }
}

interface Header {
  id: number
  name: string
  instance: number
  version: number
  body: number
}

/** One section on the search stack: its header, where the description's walk ends, where to look for footers next. */
interface Frame extends Header {
  pos: number
  walkEnd: number | null
  walkTried: boolean
  scan: number
  end: number
}

/**
 * A depth-first search for the chain of FULL sections from tail[0] to `eof`, with an explicit
 * stack (a garbled tail may offer many candidate ends). With `devices`, the i-th section must be
 * the i-th device of the description; without, any well-formed header will do. Failures are
 * remembered per (position, device), so a garbled tail costs at most positions x devices steps,
 * and MAX_STEPS bounds even that.
 */
class Chain {
  private readonly failed = new Set<number>()
  private steps = 0

  constructor(
    private readonly tail: Buffer,
    private readonly eof: number,
    private readonly devices: Desc[] | null,
  ) {}

  run(): SectionCheck[] | null {
    const stack: Frame[] = []
    let pos = 0
    for (;;) {
      if (pos === this.eof && (this.devices === null || stack.length === this.devices.length)) {
        return stack.map((f) => ({
          name: f.name, instance: f.instance, version: f.version, offset: f.pos, length: f.end + 5 - f.pos,
          how: f.end === f.walkEnd ? 'walked' : 'chained',
        }))
      }
      const entered = this.enter(pos, stack.length)
      if (entered) stack.push(entered)
      for (;;) {
        const top = stack[stack.length - 1]
        if (!top) return null
        const end = this.nextEnd(top)
        if (end !== null) {
          top.end = end
          pos = end + 5
          break
        }
        stack.pop()
        this.failed.add(this.key(top.pos, stack.length))
      }
    }
  }

  private key(pos: number, i: number): number {
    return this.devices === null ? pos : pos * 65536 + Math.min(i, 65535)
  }

  private enter(pos: number, i: number): Frame | null {
    if (this.devices !== null && i >= this.devices.length) return null
    if (this.failed.has(this.key(pos, i))) return null
    if (++this.steps > MAX_STEPS) throw corrupt('the device state is too ambiguous to check (too many candidate section ends)')
    const dev = this.devices?.[i]
    const h = this.header(pos, dev)
    if (!h) return null
    return { ...h, pos, walkEnd: this.walk(h, dev), walkTried: false, scan: h.body, end: -1 }
  }

  /** The next place where this section may end: the description's walk first, then each footer with its id. */
  private nextEnd(f: Frame): number | null {
    if (!f.walkTried) {
      f.walkTried = true
      if (f.walkEnd !== null && this.footerAt(f.walkEnd, f.id)) return f.walkEnd
    }
    for (let q = this.tail.indexOf(QEMU_VM_SECTION_FOOTER, f.scan); q >= 0 && q + 5 <= this.eof; q = this.tail.indexOf(QEMU_VM_SECTION_FOOTER, q + 1)) {
      f.scan = q + 1
      if (q !== f.walkEnd && this.footerAt(q, f.id)) {
        if (++this.steps > MAX_STEPS) throw corrupt('the device state is too ambiguous to check (too many candidate section ends)')
        return q
      }
    }
    f.scan = this.eof
    return null
  }

  private footerAt(q: number, id: number): boolean {
    return q + 5 <= this.eof && this.tail[q] === QEMU_VM_SECTION_FOOTER && this.tail.readUInt32BE(q + 1) === id
  }

  /** A FULL section header at `pos` (matching `dev` when given), or null. */
  private header(pos: number, dev: Desc | undefined): Header | null {
    const t = this.tail
    if (t[pos] !== QEMU_VM_SECTION_FULL || pos + 6 > this.eof) return null
    const len = t[pos + 5]
    const body = pos + 6 + len + 8
    if (len === 0 || body > this.eof) return null
    for (let k = pos + 6; k < pos + 6 + len; k++) if (t[k] < 0x20 || t[k] > 0x7e) return null
    const h = { id: t.readUInt32BE(pos + 1), name: t.toString('latin1', pos + 6, pos + 6 + len), instance: t.readUInt32BE(pos + 6 + len), version: t.readUInt32BE(pos + 10 + len), body }
    if (dev === undefined) return h
    // Legacy handlers are described without a version: the header's own is then taken.
    if (h.name !== dev.name || h.instance !== dev.instance_id) return null
    if (typeof dev.version === 'number' && h.version !== dev.version) return null
    return h
  }

  /** Where the body ends per the description, or null where it does not say or does not fit. */
  private walk(h: Header, dev: Desc | undefined): number | null {
    if (dev === undefined || !Array.isArray(dev.fields)) return null
    const r = new Reader(this.tail, h.body, this.eof, 'SNAP_STREAM_CORRUPT', 0)
    try {
      walkStruct(r, dev, 0, h.name)
    } catch {
      return null
    }
    return r.pos
  }
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
    const sname = r.u8('subsection marker') === QEMU_VM_SUBSECTION ? r.str8('subsection name') : null
    if (sname !== String(s.vmsd_name) || r.u32('subsection version') !== count(s.version, 'version')) {
      throw corrupt(`${where}: subsection "${String(s.vmsd_name)}" expected where the description puts it`)
    }
    walkStruct(r, s, depth + 1, sname)
  }
}
