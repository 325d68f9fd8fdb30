// Shared by the stream-*.test.ts suites: a sink that records every call, a helper that feeds
// the same input whole and in 1-, 7- and 4093-byte pieces and insists on identical results,
// and a builder of synthetic streams made with the encoder.

import { createHash } from 'node:crypto'
import * as assert from 'uvu/assert'
import { SnapError } from '../../src/errors.js'
import type { DeviceState, RamBlockDecl, RamSink, StreamCounters } from '../../src/types.js'
import { StreamParser, type StreamParserOptions } from '../../src/stream/parser.js'
import { xbzrleDecode } from '../../src/stream/xbzrle.js'
import {
  PageRecordWriter,
  eosFooter,
  fileHeader,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from '../../src/stream/encoder.js'

export const PIECES = [0, 1, 7, 4093] // 0 = the whole input at once

const hash = (b: Uint8Array): string => createHash('sha1').update(b).digest('hex').slice(0, 16)

/** Records every call (page data by hash) and rebuilds the RAM, applying XBZRLE in order. */
export class MemorySink implements RamSink {
  calls: string[] = []
  blockList: RamBlockDecl[] = []
  ram: Buffer[] = []
  /** page views that pointed into the pushed input (zero-copy) */
  views = 0
  input: Buffer | null = null

  blocks(list: RamBlockDecl[]): void {
    this.blockList = list
    this.ram = list.map((b) => Buffer.alloc(b.size))
    this.calls.push(`blocks ${list.map((b) => `${b.name}:${b.size}`).join(',')}`)
  }
  zero(block: number, page: number): void {
    this.ram[block].fill(0, page * 4096, page * 4096 + 4096)
    this.calls.push(`zero ${block} ${page}`)
  }
  page(block: number, page: number, data: Uint8Array): void {
    if (this.input && data.buffer === this.input.buffer) this.views++
    this.ram[block].set(data, page * 4096)
    this.calls.push(`page ${block} ${page} ${hash(data)}`)
  }
  xbzrle(block: number, page: number, encoded: Uint8Array): void {
    xbzrleDecode(encoded, this.ram[block].subarray(page * 4096, page * 4096 + 4096))
    this.calls.push(`xbzrle ${block} ${page} ${hash(encoded)}`)
  }
}

export interface Outcome {
  calls: string[]
  ram: string[]
  counters?: StreamCounters
  state?: DeviceState
  /** the error's code and offset, compared across piece sizes; the message only where a test asks */
  error?: { code: string; message: string; offset?: number }
  sink: MemorySink
}

/** Parse `input` fed in pieces of `piece` bytes (0 = whole). Never lets a non-SnapError through. */
export function parseWith(input: Buffer, piece: number, opts?: StreamParserOptions): Outcome {
  const sink = new MemorySink()
  const p = new StreamParser(sink, opts)
  const out: Outcome = { calls: sink.calls, ram: [], sink }
  try {
    if (piece === 0) {
      sink.input = input
      p.push(input)
    } else {
      for (let i = 0; i < input.length; i += piece) p.push(input.subarray(i, i + piece))
    }
    out.state = p.end()
    out.counters = { ...p.counters }
  } catch (err) {
    if (!(err instanceof SnapError)) throw new Error(`raw exception from the parser: ${String(err)}`, { cause: err })
    out.error = { code: err.code, message: err.message, offset: err.context.offset }
  }
  out.ram = sink.ram.map(hash)
  return out
}

/** Parse whole and in every piece size; all results must be identical. Returns the whole one. */
export function parseAll(input: Buffer, opts?: StreamParserOptions): Outcome {
  const results = PIECES.map((n) => parseWith(input, n, opts))
  const strip = (o: Outcome) => ({ calls: o.calls, ram: o.ram, counters: o.counters, state: o.state, error: o.error })
  for (let i = 1; i < results.length; i++) {
    assert.equal(strip(results[i]), strip(results[0]), `pieces of ${PIECES[i]} bytes differ from the whole input`)
  }
  return results[0]
}

/**
 * Parses `input` (whole and in pieces, which must fail alike, at the same offset) and asserts
 * the error's code. `which` names the check only where the code alone is ambiguous
 * (SNAP_STREAM_CORRUPT and SNAP_STREAM_UNSUPPORTED cover many checks): a word of the message,
 * a second check that may need updating when messages change; codes may not change.
 */
export function expectError(input: Buffer, code: string, which?: RegExp): Outcome {
  const o = parseAll(input)
  assert.ok(o.error, `expected ${code}, but the stream parsed`)
  assert.is(o.error.code, code, o.error.message)
  if (which) assert.match(o.error.message, which)
  return o
}

export function configElement(machine = 'pc-i440fx-10.0', subsections: Buffer[] = []): Buffer {
  const name = Buffer.from(machine, 'latin1')
  const head = Buffer.alloc(5)
  head[0] = 0x07
  head.writeUInt32BE(name.length, 1)
  return Buffer.concat([head, name, ...subsections])
}

export function subsection(name: string, version: number, body: Buffer): Buffer {
  const n = Buffer.from(name, 'latin1')
  const v = Buffer.alloc(4)
  v.writeUInt32BE(version)
  return Buffer.concat([Buffer.from([0x05, n.length]), n, v, body])
}

export const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(v >>> 0)
  return b
}
export const u64 = (hi: number, lo: number): Buffer => Buffer.concat([u32(hi), u32(lo)])

/** Two FULL sections, EOF and a JSON description that describes them exactly. */
export function deviceTail(opts: { vmdesc?: boolean; firstId?: number } = {}): { deviceSections: Buffer; streamEnd: Buffer } {
  const id = opts.firstId ?? 2
  const full = (sid: number, name: string, instance: number, version: number, body: Buffer): Buffer =>
    Buffer.concat([Buffer.from([0x04]), u32(sid), Buffer.from([name.length]), Buffer.from(name), u32(instance), u32(version), body, Buffer.from([0x7e]), u32(sid)])
  const timerBody = Buffer.concat([
    u64(0, 0x1234),
    Buffer.from([1, 0, 2, 3, 0, 4]), // struct s {u8 x; u16 y} x 2
    subsection('timer/sub', 1, u32(7)),
  ])
  const gs = Buffer.alloc(36)
  gs.writeUInt32BE(8)
  gs.write('running', 4)
  const deviceSections = Buffer.concat([full(id, 'timer', 0, 2, timerBody), full(id + 1, 'globalstate', 0, 1, gs)])
  const desc = {
    configuration: { vmsd_name: 'configuration', version: 1, fields: [] },
    page_size: 4096,
    devices: [
      {
        name: 'timer', instance_id: 0, vmsd_name: 'timer', version: 2,
        fields: [
          { name: 'a', type: 'uint64', size: 8 },
          { name: 'b', type: 'struct', size: 3, array_len: 2, struct: { vmsd_name: 's', version: 1, fields: [{ name: 'x', type: 'uint8', size: 1 }, { name: 'y', type: 'uint16', size: 2 }] } },
        ],
        subsections: [{ vmsd_name: 'timer/sub', version: 1, fields: [{ name: 'z', type: 'uint32', size: 4 }] }],
      },
      {
        name: 'globalstate', instance_id: 0, vmsd_name: 'globalstate', version: 1,
        fields: [{ name: 'size', type: 'uint32', size: 4 }, { name: 'runstate', type: 'buffer', size: 32 }],
      },
    ],
  }
  const json = Buffer.from(JSON.stringify(desc))
  const streamEnd = opts.vmdesc === false ? Buffer.from([0]) : Buffer.concat([Buffer.from([0x00, 0x06]), u32(json.length), json])
  return { deviceSections, streamEnd }
}

export type Rec = ['zero', number, number] | ['page', number, number, Buffer] | ['xbzrle', number, number, Buffer] | ['raw', Buffer]

export interface SynthOptions {
  config?: Buffer
  blocks?: RamBlockDecl[]
  /** ram PART sections (each a list of records); the END section is the last unless `noEnd` */
  parts: Rec[][]
  end?: Rec[]
  noEnd?: boolean
  switchover?: boolean
  tail?: { deviceSections: Buffer; streamEnd: Buffer }
  sectionId?: number
}

export const BLOCKS: RamBlockDecl[] = [
  { name: 'pc.ram', size: 16 * 4096 },
  { name: 'pc.bios', size: 2 * 4096 },
  { name: '/rom@etc/acpi/rsdp', size: 4096 },
]

/** A stream built with the encoder: header, config, ram START, PARTs, [SWITCHOVER], [END], tail. */
export function synthStream(o: SynthOptions): Buffer {
  const id = o.sectionId ?? 1
  const blocks = o.blocks ?? BLOCKS
  const w = new PageRecordWriter(blocks, { chunkSize: 64 * 1024 })
  w.raw(fileHeader(o.config ?? configElement()))
  w.raw(ramStartSection({ sectionId: id, instanceId: 0, version: 4 }, blocks))
  const body = (recs: Rec[]) => {
    for (const r of recs) {
      if (r[0] === 'zero') w.zero(r[1], r[2])
      else if (r[0] === 'page') w.page(r[1], r[2], r[3])
      else if (r[0] === 'xbzrle') w.xbzrle(r[1], r[2], r[3])
      else w.raw(r[1])
    }
  }
  for (const part of o.parts) {
    w.raw(sectionPartHeader(id))
    body(part)
    w.raw(eosFooter(id))
  }
  if (o.switchover ?? true) w.raw(switchoverStart())
  if (!o.noEnd) {
    w.raw(sectionEndHeader(id))
    body(o.end ?? [])
    w.raw(eosFooter(id))
  }
  const tail = o.tail ?? deviceTail()
  w.raw(tail.deviceSections)
  w.raw(tail.streamEnd)
  return Buffer.concat(w.flush())
}

/** A page of pseudo-random bytes (deterministic per seed). */
export function pageOf(seed: number): Buffer {
  const b = Buffer.alloc(4096)
  let x = seed * 2654435761 + 1
  for (let i = 0; i < 4096; i++) {
    x = (x * 1103515245 + 12345) >>> 0
    b[i] = x >>> 24
  }
  return b
}

/**
 * Writes a stream back from what the parser gave: header and configuration, ram START, one PART
 * with every page record the sink saw (in order), then `between` (more sections), then
 * [SWITCHOVER_START], an END section holding `endPages`, and the device state verbatim.
 */
export function replay(
  o: Outcome,
  opts: { between?: (w: PageRecordWriter, id: number) => void; endPages?: (w: PageRecordWriter) => void } = {},
): Buffer {
  const s = o.state!
  const blocks = o.sink.blockList
  const id = s.ramSectionId
  const w = new PageRecordWriter(blocks, { chunkSize: 1 << 20 })
  w.raw(fileHeader(s.config))
  w.raw(ramStartSection({ sectionId: id, instanceId: s.ramInstanceId, version: s.ramVersion }, blocks))
  w.raw(sectionPartHeader(id))
  for (const call of o.calls.slice(1)) {
    const [kind, b, p] = call.split(' ')
    const block = Number(b)
    const page = Number(p)
    if (kind === 'zero') w.zero(block, page)
    else w.page(block, page, o.sink.ram[block].subarray(page * 4096, (page + 1) * 4096))
  }
  w.raw(eosFooter(id))
  opts.between?.(w, id)
  if (s.switchoverStart) w.raw(switchoverStart())
  w.raw(sectionEndHeader(id))
  opts.endPages?.(w)
  w.raw(eosFooter(id))
  w.raw(s.deviceSections)
  w.raw(s.streamEnd)
  return Buffer.concat(w.flush())
}
