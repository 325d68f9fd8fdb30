// Section headers and footers (reference §1.5, §1.6) and the ram START section with its MEM_SIZE
// block list (§2.3): the writer's encoders, and the checks the parser makes of what it reads.

import { SnapError } from '../errors.js'
import { Writer } from '../bytes.js'
import type { RamBlockDecl } from '../types.js'
import type { ChunkReader } from './chunk-reader.js'
import * as C from './constants.js'

export interface SectionIds {
  sectionId: number
  instanceId: number
  version: number
}

/**
 * §1.5 + §2.3: the ram START section: header, MEM_SIZE record and block list, EOS, footer.
 * `hostPageSizes[i]`: block i's page size at the destination, written after its used_length when
 * it is not the target page size (a postcopy destination expects it for hugepage-backed blocks,
 * reference §2.3); leave it out for a precopy stream.
 */
export function ramStartSection(ids: SectionIds, blocks: RamBlockDecl[], hostPageSizes?: number[]): Buffer {
  let total = 0
  let size = 1 + 4 + 1 + C.RAM_SECTION_IDSTR.length + 4 + 4 + 8 + 8 + 5
  for (const b of blocks) {
    if (b.size % C.TARGET_PAGE_SIZE !== 0) {
      throw new SnapError('SNAP_INTERNAL', `block ${b.name}: size ${b.size} is not a multiple of the page size`)
    }
    total += b.size
    size += 1 + Buffer.byteLength(b.name, 'latin1') + 16
  }
  const w = Writer.alloc(size)
  w.u8(C.QEMU_VM_SECTION_START).u32(ids.sectionId).str8(C.RAM_SECTION_IDSTR).u32(ids.instanceId).u32(ids.version)
  w.u64(total + C.RAM_SAVE_FLAG_MEM_SIZE)
  blocks.forEach((b, i) => {
    w.str8(b.name).u64(b.size)
    const hp = hostPageSizes?.[i] ?? C.TARGET_PAGE_SIZE
    if (hp !== C.TARGET_PAGE_SIZE) w.u64(hp)
  })
  w.u64(C.RAM_SAVE_FLAG_EOS)
  w.u8(C.QEMU_VM_SECTION_FOOTER).u32(ids.sectionId)
  return w.done()
}

export function sectionPartHeader(sectionId: number): Buffer {
  return Writer.alloc(5).u8(C.QEMU_VM_SECTION_PART).u32(sectionId).done()
}

export function sectionEndHeader(sectionId: number): Buffer {
  return Writer.alloc(5).u8(C.QEMU_VM_SECTION_END).u32(sectionId).done()
}

/** The EOS record that ends every ram section body, then the section footer. */
export function eosFooter(sectionId: number): Buffer {
  return Writer.alloc(13).u64(C.RAM_SAVE_FLAG_EOS).u8(C.QEMU_VM_SECTION_FOOTER).u32(sectionId).done()
}

/** The rest of a START header, at rb[rp]: idstr (`n` bytes), instance id, version; only ram v4 passes. */
export function decodeStartName(r: ChunkReader, n: number): { instance: number; version: number } {
  const idstr = r.str(n)
  const instance = r.rb.readUInt32BE(r.rp + n)
  const version = r.rb.readUInt32BE(r.rp + n + 4)
  if (idstr !== C.RAM_SECTION_IDSTR) {
    throw r.fail('SNAP_STREAM_UNSUPPORTED', `iterative section "${idstr}" is not supported (only ram); turn off what adds it (dirty-bitmaps, VFIO migration)`)
  }
  return { instance, version }
}

export function checkRamVersion(r: ChunkReader, version: number): void {
  if (version !== C.RAM_SECTION_VERSION) throw r.fail('SNAP_STREAM_UNSUPPORTED', `ram section version ${version} (only 4 is supported)`)
}

/** §1.6: the 5-byte footer at rb[rp] must close section `sectionId`. */
export function checkFooter(r: ChunkReader, sectionId: number): void {
  if (r.rb[r.rp] !== C.QEMU_VM_SECTION_FOOTER || r.rb.readUInt32BE(r.rp + 1) !== sectionId) {
    throw r.fail('SNAP_STREAM_CORRUPT', `no footer for ram section ${sectionId} after its EOS`)
  }
}
