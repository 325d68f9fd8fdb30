// mapped-ram (src/stream/mapped-ram.ts, configuration.ts; reference §3, §1.3): exact bytes of the
// block header and the configuration, QEMU's layout (the offsets verified on QEMU 10.0.2 in the
// reference), a synthetic file imported with create --from and restored page for page, and
// hostile files refused with stable codes.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Reader } from '../../src/bytes.js'
import { createImage } from '../../src/create.js'
import { isSnapError } from '../../src/errors.js'
import { loadImage } from '../../src/load.js'
import { decodeConfiguration, encodeConfiguration, withCapability } from '../../src/stream/configuration.js'
import { decodeMappedRamFile, decodeMappedRamHeader, encodeMappedRamHeader, planMappedRam, type RandomAccess } from '../../src/stream/mapped-ram.js'
import { StreamParser } from '../../src/stream/parser.js'
import { fixtureDevice, MAPPED_BLOCKS, synthMappedRam } from '../../tools/fuzz/mapped-ram-target.js'
import { readFileSync } from 'node:fs'

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s/g, ''), 'hex')
const mem = (b: Buffer): RandomAccess => ({ size: b.length, read: async (pos, len) => Buffer.from(b.subarray(pos, Math.min(b.length, pos + len))) })
const dir = mkdtempSync(join(tmpdir(), 'snapctl-mapped-unit-'))
test.after(() => rmSync(dir, { recursive: true, force: true }))

test('MappedRamHeader: the bytes QEMU 10.0.2 wrote for pc.ram, and back', () => {
  const h = { version: 1, pageSize: 4096, bitmapOffset: 0x8e, pagesOffset: 0x100000 }
  const b = encodeMappedRamHeader(h)
  assert.equal(b, hex('00000001 0000000000001000 000000000000008e 0000000000100000'))
  const r = new Reader(b)
  assert.equal(decodeMappedRamHeader(r), h)
  assert.is(r.left, 0)
  assert.throws(() => decodeMappedRamHeader(new Reader(b.subarray(0, 27))), (e: unknown) => isSnapError(e, 'SNAP_TRUNCATED'))
})

test('configuration with the capabilities subsection: exact bytes; mapped-ram added and taken out', () => {
  const plain = encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] })
  assert.equal(plain, Buffer.concat([hex('07 0000000e'), Buffer.from('pc-i440fx-10.0')]))
  const withCap = withCapability(plain, 'mapped-ram', true)
  assert.equal(withCap, Buffer.concat([plain, hex('05 1a'), Buffer.from('configuration/capabilities'), hex('00000001 00000001 0a'), Buffer.from('mapped-ram')]))
  assert.equal(withCapability(withCap, 'mapped-ram', false), plain)
  assert.is(withCapability(withCap, 'mapped-ram', true), withCap)
  const cfg = { machine: 'virt-10.0', targetPageBits: 12, capabilities: ['mapped-ram'], uuid: Buffer.alloc(16, 7) }
  const r = new Reader(encodeConfiguration(cfg))
  assert.equal(decodeConfiguration(r), cfg)
  assert.is(r.left, 0)
})

test('planMappedRam: the offsets of QEMU 10.0.2 pc-i440fx -m 16M (reference §3.3)', () => {
  const blocks = [
    { name: 'pc.ram', size: 0x1000000 }, { name: '/rom@etc/acpi/tables', size: 0x20000 }, { name: 'pc.bios', size: 0x40000 },
    { name: 'pc.rom', size: 0x20000 }, { name: '/rom@etc/table-loader', size: 0x1000 }, { name: '/rom@etc/acpi/rsdp', size: 0x1000 },
  ]
  // header 8 + configuration with mapped-ram 66 = START at 0x4a; START header 17 + MEM_SIZE word 8
  const p = planMappedRam(blocks, 0x4a + 25)
  assert.is(p.blocks[0].bitmapOffset, 0x8e)
  assert.is(p.blocks[0].pagesOffset, 0x100000)
  assert.is(p.blocks[1].bitmapOffset, 0x1100039)
  assert.is(p.blocks[1].pagesOffset, 0x1200000)
  assert.is(p.blocks[2].bitmapOffset, 0x122002c)
  assert.is(p.blocks[2].pagesOffset, 0x1300000)
  assert.is(p.blocks[5].pagesOffset, 0x1600000)
  assert.is(p.end, 0x1601000)
})

test('a synthetic mapped-ram file (plain and behind a libvirt sparse header): create --from, then load gives every page', async () => {
  const device = fixtureDevice()
  for (const libvirt of [false, true]) {
    const s = synthMappedRam(5, device, { libvirt, align: 1 << 20 })
    const f = await decodeMappedRamFile(mem(s.file))
    assert.ok(f)
    assert.equal(f!.blocks.map((b) => b.name), MAPPED_BLOCKS.map((b) => b.name))
    assert.is(f!.libvirt !== null, libvirt)
    const from = join(dir, `synth-${libvirt}`)
    writeFileSync(from, s.file)
    const image = join(dir, `synth-${libvirt}.snap`)
    const r = await createImage(image, { from })
    assert.is(r.source, libvirt ? 'libvirt' : 'qemu')
    assert.is(r.image.pages, r.image.ramPages)
    const out = join(dir, `synth-${libvirt}.stream`)
    await loadImage(image, { to: out, index: false })
    const got = MAPPED_BLOCKS.map((b) => Array.from({ length: b.size / 4096 }, () => 'never' as string | Buffer))
    const parser = new StreamParser({ blocks() {}, zero: (b, p) => void (got[b][p] = 'zero'), page: (b, p, d) => void (got[b][p] = Buffer.from(d)), xbzrle() {} })
    parser.push(readFileSync(out))
    const d = parser.end()
    assert.ok(!d.config.includes(Buffer.from('mapped-ram')), 'the image keeps the configuration of a plain stream')
    s.pages.forEach((blk, b) => blk.forEach((want, p) => assert.equal(got[b][p], want ?? 'zero', `block ${b} page ${p}`)))
  }
})

test('hostile files: cut short, regions outside the file or backwards, unknown header version, huge sizes', async () => {
  const device = fixtureDevice()
  const s = synthMappedRam(6, device)
  const f = (await decodeMappedRamFile(mem(s.file)))!
  const entry0 = f.blocks[0].bitmapOffset - 28 // the header of block 0
  const code = async (b: Buffer): Promise<string> => {
    try {
      await decodeMappedRamFile(mem(b))
      return 'ok'
    } catch (e) {
      return (e as { code?: string }).code ?? String(e)
    }
  }
  const set = (at: number, v: bigint | number, width: 4 | 8): Buffer => {
    const b = Buffer.from(s.file)
    if (width === 8) b.writeBigUInt64BE(BigInt(v), at)
    else b.writeUInt32BE(Number(v), at)
    return b
  }
  assert.is(await code(s.file.subarray(0, f.blocks[0].pagesOffset + 100)), 'SNAP_MAPPED_RAM_BOUNDS')
  assert.is(await code(s.file.subarray(0, f.tailOffset - 3)), 'SNAP_STREAM_TRUNCATED')
  assert.is(await code(s.file.subarray(0, entry0 + 10)), 'SNAP_STREAM_TRUNCATED')
  assert.is(await code(set(entry0 + 12, s.file.length + 4096, 8)), 'SNAP_MAPPED_RAM_BOUNDS') // bitmap past the end
  assert.is(await code(set(entry0 + 12, 10, 8)), 'SNAP_MAPPED_RAM_BOUNDS') // bitmap backwards, into the stream
  assert.is(await code(set(entry0 + 20, f.blocks[0].pagesOffset + 1, 8)), 'SNAP_MAPPED_RAM_BOUNDS') // pages not aligned
  assert.is(await code(set(entry0 + 20, 0, 8)), 'SNAP_MAPPED_RAM_BOUNDS') // pages over the bitmap
  assert.is(await code(set(entry0 + 20, 0xffffffffffff000n, 8)), 'SNAP_MAPPED_RAM_BOUNDS')
  assert.is(await code(set(entry0 + 12, 0xffffffffffffffffn, 8)), 'SNAP_MAPPED_RAM_BOUNDS')
  assert.is(await code(set(entry0, 2, 4)), 'SNAP_STREAM_UNSUPPORTED')
  assert.is(await code(set(entry0 + 4, 0x10000, 8)), 'SNAP_STREAM_UNSUPPORTED')
  assert.is(await code(set(entry0 - 8, 0xffffffffffffffffn, 8)), 'SNAP_STREAM_TOO_LARGE') // used_length
  assert.is(await code(set(entry0 - 8, 0x10000000n, 8)), 'SNAP_STREAM_CORRUPT') // more than the MEM_SIZE total
  // not mapped-ram: left to the stream parser
  assert.is(await decodeMappedRamFile(mem(withoutMappedRam(s.file))), null)
})

function withoutMappedRam(b: Buffer): Buffer {
  const out = Buffer.from(b)
  const at = out.indexOf('mapped-ram')
  out.write('mapped-rom', at)
  return out
}

test.run()
