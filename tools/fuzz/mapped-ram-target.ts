// The `mapped-ram` fuzz target: small mapped-ram files (src/stream/mapped-ram.ts; reference §3),
// made in memory the way QEMU lays them out (compactly: pages page-aligned rather than at 1 MiB,
// which QEMU's loader also accepts), some behind a libvirt header of format sparse, mutated
// mostly in their structure (file header, configuration, block entries, bitmaps) and fed to
// `create --from` (createImage), then loaded when that succeeds.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writer } from '../../src/bytes.js'
import { createImage } from '../../src/create.js'
import { loadImage } from '../../src/load.js'
import { withCapability } from '../../src/stream/configuration.js'
import * as C from '../../src/stream/constants.js'
import * as enc from '../../src/stream/encoder.js'
import { makeLibvirtHeader } from '../../src/stream/libvirt.js'
import { bitmapSize, blockEntry, planMappedRam, setBit } from '../../src/stream/mapped-ram.js'
import { StreamParser } from '../../src/stream/parser.js'
import type { DeviceState, RamBlockDecl } from '../../src/types.js'
import { caseRng, int, mutateSome, type Rand } from './mutate.js'
import type { Classify, Target } from './targets.js'
import { FIXTURE } from './targets.js'

const PAGE = C.TARGET_PAGE_SIZE

export const MAPPED_BLOCKS: RamBlockDecl[] = [
  { name: 'pc.ram', size: 40 * PAGE },
  { name: 'pc.bios', size: 3 * PAGE },
  { name: '/rom@etc/acpi/rsdp', size: PAGE },
]

export interface SynthMappedRam {
  file: Buffer
  /** RAM as a restore must give it, per block; null where the page is zero */
  pages: Array<Array<Buffer | null>>
  /** where the structure is: up to the end of the last bitmap */
  structureEnd: number
}

export function fixtureDevice(): DeviceState {
  const parser = new StreamParser({ blocks() {}, zero() {}, page() {}, xbzrle() {} })
  parser.push(readFileSync(FIXTURE))
  return parser.end()
}

/** A mapped-ram file of MAPPED_BLOCKS: some pages with data, some set bits over zero bytes, the rest clear. */
export function synthMappedRam(seed: number, device: DeviceState, opts: { libvirt?: boolean; align?: number; prefix?: number } = {}): SynthMappedRam {
  const rand: Rand = caseRng(seed, 0)
  const prefix = opts.libvirt ? makeLibvirtHeader('<domain type="kvm"><name>fuzz</name></domain>', { format: C.QEMU_SAVE_FORMAT_SPARSE, padding: 100 }) : Buffer.alloc(0)
  const ids = { sectionId: device.ramSectionId, instanceId: device.ramInstanceId, version: device.ramVersion }
  const total = MAPPED_BLOCKS.reduce((a, b) => a + b.size, 0)
  const start = Writer.alloc(64)
  start.u8(C.QEMU_VM_SECTION_START).u32(ids.sectionId).str8(C.RAM_SECTION_IDSTR).u32(ids.instanceId).u32(ids.version).u64(total + C.RAM_SAVE_FLAG_MEM_SIZE)
  const head = Buffer.concat([prefix, enc.fileHeader(withCapability(device.config, C.MAPPED_RAM_CAPABILITY, true)), start.done()])
  const plan = planMappedRam(MAPPED_BLOCKS, head.length, opts.align ?? PAGE)
  const tail = Buffer.concat([
    enc.eosFooter(ids.sectionId), enc.sectionPartHeader(ids.sectionId), enc.eosFooter(ids.sectionId),
    enc.sectionEndHeader(ids.sectionId), enc.eosFooter(ids.sectionId), device.deviceSections, device.streamEnd,
  ])
  const file = Buffer.alloc(plan.end + tail.length)
  head.copy(file, 0)
  tail.copy(file, plan.end)
  let at = head.length
  const pages: SynthMappedRam['pages'] = []
  for (const b of plan.blocks) {
    blockEntry(b).copy(file, at)
    const bitmap = Buffer.alloc(bitmapSize(b.size / PAGE))
    const ram: Array<Buffer | null> = []
    for (let p = 0; p < b.size / PAGE; p++) {
      const r = rand()
      if (r < 0.5) {
        const data = Buffer.alloc(PAGE, 1 + int(rand, 255))
        for (let i = 0, n = int(rand, 32); i < n; i++) data[int(rand, PAGE)] = int(rand, 256)
        data.copy(file, b.pagesOffset + p * PAGE)
        setBit(bitmap, p)
        ram.push(data)
      } else {
        if (r < 0.6) setBit(bitmap, p) // a page written as zeroes
        else if (r < 0.7) file.fill(0xee, b.pagesOffset + p * PAGE, b.pagesOffset + (p + 1) * PAGE) // stale bytes under a clear bit
        ram.push(null)
      }
    }
    bitmap.copy(file, b.bitmapOffset)
    pages.push(ram)
    at = b.pagesOffset + b.size
  }
  return { file, pages, structureEnd: plan.blocks[plan.blocks.length - 1].bitmapOffset + 16 }
}

export function mappedRamTarget(classify: Classify): Target {
  const device = fixtureDevice()
  const corpus = [synthMappedRam(1, device), synthMappedRam(2, device, { libvirt: true }), synthMappedRam(3, device)]
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-fuzz-mapped-'))
  return {
    prepare(n, rand) {
      const base = int(rand, corpus.length)
      // Mostly the structure: header, configuration, block entries and bitmaps.
      const m = mutateSome(corpus[base].file, rand, 3, () => (rand() < 0.7 ? { start: 0, end: corpus[base].structureEnd } : undefined))
      return { input: m.out, what: `file ${base}: ${m.what}` }
    },
    async run(p, _rand, n) {
      const from = join(dir, `in-${n}`)
      const image = join(dir, `img-${n}.snap`)
      writeFileSync(from, p.input)
      try {
        await createImage(image, { from, force: true })
      } catch (e) {
        return [classify('create', e)]
      } finally {
        rmSync(from, { force: true })
      }
      try {
        await loadImage(image, { to: join(dir, `out-${n}`), force: true, index: false })
        return ['ok', 'ok']
      } catch (e) {
        return ['ok', classify('load', e)]
      } finally {
        rmSync(image, { force: true })
        rmSync(join(dir, `out-${n}`), { force: true })
      }
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
