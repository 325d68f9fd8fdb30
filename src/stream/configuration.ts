// The configuration element (reference §1.3) as a whole structure: decode it from a buffer that
// holds it, encode it back, and change its validated capabilities. The streaming parser reads it
// with HeaderDecoder (file-header.ts); this codec serves mapped-ram files, whose configuration
// names the capability (a destination compares the set with its own, so an image keeps the
// configuration of a plain stream and mapped-ram is added on export and taken out on import).

import { Reader, Writer } from '../bytes.js'
import { SnapError } from '../errors.js'
import * as C from './constants.js'

const MAX_MACHINE_NAME = 256
const MAX_CAPS = 64
const SUB_VERSION = 1

export interface Configuration {
  machine: string
  /** configuration/target-page-bits, when present */
  targetPageBits?: number
  /** configuration/capabilities, in the order sent (absent and empty are the same) */
  capabilities: string[]
  /** configuration/uuid, 16 bytes, when present */
  uuid?: Buffer
}

/** Decodes the element (0x07 ...) at r.pos; r is left after its last subsection. */
export function decodeConfiguration(r: Reader): Configuration {
  if (r.u8('the configuration element') !== C.QEMU_VM_CONFIGURATION) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', 'stream without a configuration element (machine type <= 2.3 or Xen)', { offset: r.baseOffset + r.pos - 1 })
  }
  const n = r.u32('the configuration')
  if (n === 0 || n > MAX_MACHINE_NAME) throw new SnapError('SNAP_STREAM_CORRUPT', `machine type name of ${n} bytes in the configuration`)
  const cfg: Configuration = { machine: r.bytes(n, 'the configuration').toString('latin1'), capabilities: [] }
  while (r.left > 0 && r.buf[r.pos] === C.QEMU_VM_SUBSECTION) {
    r.pos++
    const name = r.str8('a configuration subsection')
    r.u32('a configuration subsection') // version_id
    if (name === C.CONFIG_SUB_TARGET_PAGE_BITS) cfg.targetPageBits = r.u32('configuration/target-page-bits')
    else if (name === C.CONFIG_SUB_UUID) cfg.uuid = Buffer.from(r.bytes(16, 'configuration/uuid'))
    else if (name === C.CONFIG_SUB_CAPABILITIES) {
      const count = r.u32('configuration/capabilities')
      if (count > MAX_CAPS) throw new SnapError('SNAP_STREAM_CORRUPT', `${count} capabilities in the configuration`)
      for (let i = 0; i < count; i++) cfg.capabilities.push(r.str8('configuration/capabilities'))
    } else {
      throw new SnapError('SNAP_STREAM_UNSUPPORTED', `configuration subsection "${name}" is not supported`)
    }
  }
  return cfg
}

function subsectionHeader(w: Writer, name: string): void {
  w.u8(C.QEMU_VM_SUBSECTION).str8(name).u32(SUB_VERSION)
}

/** The element, subsections in QEMU's order (target page bits, capabilities, uuid). */
export function encodeConfiguration(cfg: Configuration): Buffer {
  const str = (s: string): number => 1 + Buffer.byteLength(s, 'latin1')
  let size = 1 + 4 + Buffer.byteLength(cfg.machine, 'latin1')
  if (cfg.targetPageBits !== undefined) size += str(C.CONFIG_SUB_TARGET_PAGE_BITS) + 9
  if (cfg.capabilities.length > 0) size += str(C.CONFIG_SUB_CAPABILITIES) + 9 + cfg.capabilities.reduce((a, c) => a + str(c), 0)
  if (cfg.uuid !== undefined) size += str(C.CONFIG_SUB_UUID) + 5 + 16
  const w = Writer.alloc(size)
  const machine = Buffer.from(cfg.machine, 'latin1')
  w.u8(C.QEMU_VM_CONFIGURATION).u32(machine.length).bytes(machine)
  if (cfg.targetPageBits !== undefined) {
    subsectionHeader(w, C.CONFIG_SUB_TARGET_PAGE_BITS)
    w.u32(cfg.targetPageBits)
  }
  if (cfg.capabilities.length > 0) {
    subsectionHeader(w, C.CONFIG_SUB_CAPABILITIES)
    w.u32(cfg.capabilities.length)
    for (const c of cfg.capabilities) w.str8(c)
  }
  if (cfg.uuid !== undefined) {
    subsectionHeader(w, C.CONFIG_SUB_UUID)
    w.bytes(cfg.uuid)
  }
  return w.done()
}

/** `config` (a whole element) with capability `name` added or taken out; unchanged if already so. */
export function withCapability(config: Buffer, name: string, on: boolean): Buffer {
  const r = new Reader(config, 0, config.length, 'SNAP_STREAM_TRUNCATED')
  const cfg = decodeConfiguration(r)
  if (r.left !== 0) throw new SnapError('SNAP_STREAM_CORRUPT', `${r.left} bytes after the configuration's subsections`)
  const has = cfg.capabilities.includes(name)
  if (has === on) return config
  cfg.capabilities = on ? [...cfg.capabilities, name] : cfg.capabilities.filter((c) => c !== name)
  return encodeConfiguration(cfg)
}
