// The multifd wire module (src/multifd/): exact bytes of the initial packet and the RAM packet
// header, round trips, every bad input with its code, and the channel parser fed whole and in
// 1-, 7- and 4093-byte pieces with identical results.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { createHash } from 'node:crypto'
import { SnapError } from '../../src/errors.js'
import { MultifdChannelParser, type ChannelSink } from '../../src/multifd/channel-parser.js'
import { decodeInit, decodePacketHeader, encodeInit, encodePacketHeader, looksMultifd, type MultifdPacketHeader } from '../../src/multifd/packet.js'
import type { RamBlockDecl } from '../../src/types.js'

const PAGE = 4096
const hex = (b: Buffer): string => b.toString('hex')
const code = (fn: () => unknown): string => {
  try {
    fn()
  } catch (e) {
    if (e instanceof SnapError) return e.code
    throw e
  }
  return 'ok'
}

test('initial packet: the bytes QEMU 10 sends for channel 1 without -uuid, and back', () => {
  const b = encodeInit({ uuid: Buffer.alloc(16), id: 1 })
  assert.is(hex(b), '1122334400000001' + '00'.repeat(16) + '01' + '00'.repeat(39))
  assert.ok(looksMultifd(b))
  assert.not.ok(looksMultifd(Buffer.from('QEVM')))
  const uuid = Buffer.from('6f1c2a9e00112233445566778899aabb', 'hex')
  const d = decodeInit(encodeInit({ uuid, id: 7 }))
  assert.is(hex(d.uuid), hex(uuid))
  assert.is(d.id, 7)
})

test('initial packet: wrong magic, wrong version, short', () => {
  const b = encodeInit({ uuid: Buffer.alloc(16), id: 0 })
  const magic = Buffer.from(b)
  magic[0] = 0x51
  assert.is(code(() => decodeInit(magic)), 'SNAP_MULTIFD_BAD_MAGIC')
  const version = Buffer.from(b)
  version[7] = 2
  assert.is(code(() => decodeInit(version)), 'SNAP_MULTIFD_BAD_MAGIC')
  assert.is(code(() => decodeInit(b.subarray(0, 63))), 'SNAP_MULTIFD_TRUNCATED')
})

const EXAMPLE: MultifdPacketHeader = {
  flags: 0, pagesAlloc: 128, normalPages: 2, nextPacketSize: 2 * PAGE, packetNum: 2n, zeroPages: 1, ramblock: 'mem',
  offsets: [0x7e000, 0x1000, 0x2_0000_0000],
}

test('packet header: exact bytes (as in QEMU 10, reference §3) and a round trip', () => {
  const b = encodePacketHeader(EXAMPLE)
  assert.is(b.length, 1344)
  assert.is(hex(b.subarray(0, 40)), '11223344' + '00000001' + '00000000' + '00000080' + '00000002' + '00002000' + '0000000000000002' + '00000001' + '00000000')
  assert.is(hex(b.subarray(40, 64)), '00'.repeat(24))
  assert.is(b.toString('latin1', 64, 67), 'mem')
  assert.is(hex(b.subarray(67, 320)), '00'.repeat(253))
  assert.is(hex(b.subarray(320, 344)), '000000000007e000' + '0000000000001000' + '0000000200000000')
  assert.is(hex(b.subarray(344)), '00'.repeat(1000))
  assert.equal(decodePacketHeader(b), EXAMPLE)
})

test('packet header: a SYNC as QEMU 10 sends it (pages_alloc 0, no block)', () => {
  const sync: MultifdPacketHeader = { flags: 1, pagesAlloc: 0, normalPages: 0, nextPacketSize: 0, packetNum: 5n, zeroPages: 0, ramblock: '', offsets: [] }
  const b = encodePacketHeader(sync)
  assert.is(hex(b.subarray(0, 36)), '11223344' + '00000001' + '00000001' + '00000000' + '00000000' + '00000000' + '0000000000000005' + '00000000')
  assert.equal(decodePacketHeader(b), sync)
})

test('packet header: each bad field gets its code', () => {
  const good = encodePacketHeader(EXAMPLE)
  const bad = (at: number, v: number): Buffer => {
    const b = Buffer.from(good)
    b.writeUInt32BE(v, at)
    return b
  }
  assert.is(code(() => decodePacketHeader(bad(0, 0x11223345))), 'SNAP_MULTIFD_BAD_MAGIC')
  assert.is(code(() => decodePacketHeader(bad(4, 2))), 'SNAP_MULTIFD_BAD_MAGIC')
  assert.is(code(() => decodePacketHeader(bad(8, 0x04))), 'SNAP_STREAM_UNSUPPORTED') // zstd
  assert.is(code(() => decodePacketHeader(bad(8, 0x40))), 'SNAP_STREAM_UNSUPPORTED') // device state
  assert.is(code(() => decodePacketHeader(bad(8, 0x100))), 'SNAP_MULTIFD_CORRUPT')
  assert.is(code(() => decodePacketHeader(bad(12, 129))), 'SNAP_MULTIFD_TOO_LARGE') // pages_alloc
  assert.is(code(() => decodePacketHeader(bad(20, 0x80001))), 'SNAP_MULTIFD_TOO_LARGE') // next_packet_size
  assert.is(code(() => decodePacketHeader(bad(16, 129))), 'SNAP_MULTIFD_CORRUPT') // normal beyond alloc
  assert.is(code(() => decodePacketHeader(bad(32, 127))), 'SNAP_MULTIFD_CORRUPT') // zero beyond alloc - normal
  assert.is(code(() => decodePacketHeader(bad(12, 2))), 'SNAP_MULTIFD_CORRUPT') // 2+1 pages in room for 2
  assert.is(code(() => decodePacketHeader(bad(320, 0x00200000))), 'SNAP_MULTIFD_BAD_PAGE') // offset ≥ 2^53
  assert.is(code(() => decodePacketHeader(good.subarray(0, 1343))), 'SNAP_MULTIFD_TRUNCATED')
})

// ---- the channel parser --------------------------------------------------------------------

const BLOCKS: RamBlockDecl[] = [{ name: 'mem', size: 64 * PAGE }, { name: 'pc.bios', size: 2 * PAGE }]
const page = (seed: number): Buffer => Buffer.alloc(PAGE, seed & 0xff)
const hash = (b: Uint8Array): string => createHash('sha1').update(b).digest('hex').slice(0, 12)

function packet(ramblock: string, normal: number[], zero: number[], opts: { sync?: boolean; num?: number } = {}): Buffer {
  const h = encodePacketHeader({
    flags: opts.sync ? 1 : 0, pagesAlloc: normal.length + zero.length > 0 ? 128 : 0, normalPages: normal.length, zeroPages: zero.length,
    packetNum: BigInt(opts.num ?? 0), ramblock, offsets: [...normal, ...zero].map((p) => p * PAGE),
  })
  return Buffer.concat([h, ...normal.map((p) => page(p * 7 + 1))])
}

const channel = (id: number, ...packets: Buffer[]): Buffer => Buffer.concat([encodeInit({ uuid: Buffer.alloc(16, 0xab), id }), ...packets])

class Recorder implements ChannelSink {
  calls: string[] = []
  init(i: { uuid: Buffer; id: number }): void {
    this.calls.push(`init ${i.id} ${hex(i.uuid).slice(0, 4)}`)
  }
  page(b: number, p: number, d: Uint8Array, e: number): void {
    this.calls.push(`page ${b} ${p} ${hash(d)} e${e}`)
  }
  zero(b: number, p: number, e: number): void {
    this.calls.push(`zero ${b} ${p} e${e}`)
  }
  sync(n: number): void {
    this.calls.push(`sync ${n}`)
  }
}

function feed(input: Buffer, piece: number, blocksAt = 0): { calls: string[]; error?: string } {
  const r = new Recorder()
  const p = new MultifdChannelParser(r)
  try {
    if (blocksAt === 0) p.setBlocks(BLOCKS)
    for (let at = 0; at < input.length; at += piece || input.length) p.push(input.subarray(at, at + (piece || input.length)))
    if (blocksAt !== 0) p.setBlocks(BLOCKS)
    p.end()
  } catch (e) {
    if (!(e instanceof SnapError)) throw e
    return { calls: r.calls, error: e.code }
  }
  return { calls: r.calls }
}

function same(input: Buffer): { calls: string[]; error?: string } {
  const whole = feed(input, 0)
  for (const piece of [1, 7, 4093]) assert.equal(feed(input, piece), whole, `in ${piece}-byte pieces`)
  return whole
}

test('channel: pages and zero pages with their epochs, SYNC counted, whole and in pieces', () => {
  const input = channel(2, packet('', [], [], { sync: true }), packet('mem', [5, 1, 63], [2, 3]), packet('pc.bios', [1], []), packet('', [], [], { sync: true }), packet('mem', [5], [1]), packet('', [], [], { sync: true }))
  const r = same(input)
  assert.is(r.error, undefined)
  assert.equal(r.calls, [
    'init 2 abab', 'sync 1',
    `page 0 5 ${hash(page(36))} e1`, `page 0 1 ${hash(page(8))} e1`, `page 0 63 ${hash(page(442))} e1`, 'zero 0 2 e1', 'zero 0 3 e1',
    `page 1 1 ${hash(page(8))} e1`, 'sync 2',
    `page 0 5 ${hash(page(36))} e2`, 'zero 0 1 e2', 'sync 3',
  ])
})

test('channel: data before the block list waits for it, then goes on', () => {
  const input = channel(0, packet('', [], [], { sync: true }), packet('mem', [4], []))
  const early = feed(input, 100, 1)
  assert.equal(early, feed(input, 0))
})

test('channel: bad peers get their codes, in every piece size', () => {
  const sync = packet('', [], [], { sync: true })
  assert.is(same(channel(0, sync, packet('nope', [1], []))).error, 'SNAP_MULTIFD_BAD_PAGE') // unknown block
  assert.is(same(channel(0, sync, packet('pc.bios', [2], []))).error, 'SNAP_MULTIFD_BAD_PAGE') // past the end
  assert.is(same(channel(0, sync, packet('pc.bios', [], [2]))).error, 'SNAP_MULTIFD_BAD_PAGE') // a zero page past the end
  const unaligned = packet('mem', [1], [])
  unaligned.writeUInt32BE(0x1001, 324)
  assert.is(same(channel(0, sync, unaligned)).error, 'SNAP_MULTIFD_BAD_PAGE')
  const counts = packet('mem', [1], [])
  counts.writeUInt32BE(129, 16)
  assert.is(same(channel(0, counts)).error, 'SNAP_MULTIFD_CORRUPT')
  const huge = packet('mem', [1], [])
  huge.writeUInt32BE(0xffffffff, 12)
  assert.is(same(channel(0, huge)).error, 'SNAP_MULTIFD_TOO_LARGE')
  const cut = channel(0, sync, packet('mem', [1, 2], []))
  assert.is(same(cut.subarray(0, cut.length - 100)).error, 'SNAP_MULTIFD_TRUNCATED')
  assert.is(same(cut.subarray(0, 64 + 1344 + 500)).error, 'SNAP_MULTIFD_TRUNCATED')
  assert.is(same(cut.subarray(0, 30)).error, 'SNAP_MULTIFD_TRUNCATED')
  const wrong = channel(0, sync)
  wrong[0] = 0x51
  assert.is(same(wrong).error, 'SNAP_MULTIFD_BAD_MAGIC')
})

test('channel: what waits for the block list is capped', () => {
  const r = new Recorder()
  const p = new MultifdChannelParser(r, { waitCap: 8192 })
  p.push(channel(0, packet('', [], [], { sync: true })))
  assert.is(code(() => p.push(Buffer.concat([packet('mem', [1, 2], []), packet('mem', [3], [])]))), 'SNAP_MULTIFD_TOO_LARGE')
  assert.is(code(() => p.push(Buffer.alloc(1))), 'SNAP_MULTIFD_TOO_LARGE') // stays failed
})

test.run()
