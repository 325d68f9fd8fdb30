// The file header and the configuration element (reference §1.1, §1.3): magic, version 3, then
// 0x07, the machine type and the configuration's subsections (target page bits, capabilities,
// uuid). fileHeader() writes them; HeaderDecoder reads them from a ChunkReader, keeps the
// configuration element byte for byte, and refuses what create cannot store.

import { Writer } from '../bytes.js'
import type { ChunkReader } from './chunk-reader.js'
import * as C from './constants.js'

const MAX_MACHINE_NAME = 256
const MAX_CAPS = 64

/** §1.1: magic, version 3, then the configuration element (0x07 ...) verbatim. */
export function fileHeader(config: Buffer): Buffer {
  const w = Writer.alloc(8 + config.length)
  return w.u32(C.QEMU_VM_FILE_MAGIC).u32(C.QEMU_VM_FILE_VERSION).bytes(config).done()
}

// What the next bytes are, with the part of the stream they belong to (for "cut short" errors).
const WHERE: string[] = []
const state = (where: string): number => WHERE.push(where) - 1
const H_MAGIC = state('the file header')
const H_FIRST = state('the configuration element')
const H_CFG_LEN = state('the configuration')
const H_CFG_NAME = state('the configuration')
const H_CFG_NEXT = state('the configuration')
const H_SUB_LEN = state('a configuration subsection')
const H_SUB_NAME = state('a configuration subsection')
const H_SUB_VER = state('a configuration subsection')
const H_SUB_TPB = state('a configuration subsection')
const H_CAPS_COUNT = state('a configuration subsection')
const H_CAP_LEN = state('a configuration subsection')
const H_CAP_NAME = state('a configuration subsection')
const H_UUID = state('a configuration subsection')
const H_DONE = state('a top-level element')
const MORE = -1
const GO = -2

/** Reads the file header and configuration element; one instance per stream. */
export class HeaderDecoder {
  machine = ''
  /** the configuration element, byte for byte, once it is over */
  config: Buffer | null = null
  private state = H_MAGIC
  private n = 0
  private parts: Buffer[] = []
  private subName = ''

  get where(): string {
    return WHERE[this.state]
  }

  /**
   * Reads as far as the input goes. Returns -1 when it needs more, else the type byte of the
   * top-level element that follows the configuration (already taken from the input).
   */
  step(r: ChunkReader): number {
    for (;;) {
      const t = this.state <= H_CFG_NEXT ? this.element(r) : this.subsection(r)
      if (t !== GO) return t
    }
  }

  private keep(r: ChunkReader, n: number): void {
    this.parts.push(Buffer.from(r.rb.subarray(r.rp, r.rp + n)))
  }

  /** GO: go on; MORE: needs more input; else done, and this is the next element's type. */
  private element(r: ChunkReader): number {
    switch (this.state) {
      case H_MAGIC: {
        if (!r.need(8)) return MORE
        const version = r.rb.readUInt32BE(r.rp + 4)
        if (r.rb.readUInt32BE(r.rp) !== C.QEMU_VM_FILE_MAGIC) {
          throw r.fail('SNAP_STREAM_BAD_MAGIC', 'not a QEMU migration stream (no QEVM magic); if it is a libvirt or compressed save image, unpack it first')
        }
        if (version !== C.QEMU_VM_FILE_VERSION) {
          throw r.fail('SNAP_STREAM_VERSION', `migration stream version ${version}; only version 3 is supported${version === C.QEMU_VM_FILE_VERSION_COMPAT ? ' (version 2 is obsolete)' : ''}`)
        }
        this.state = H_FIRST
        return GO
      }
      case H_FIRST:
        if (!r.need(1)) return MORE
        if (r.rb[r.rp] !== C.QEMU_VM_CONFIGURATION) throw r.fail('SNAP_STREAM_UNSUPPORTED', 'stream without a configuration element (machine type <= 2.3 or Xen)')
        this.keep(r, 1)
        this.state = H_CFG_LEN
        return GO
      case H_CFG_LEN:
        if (!r.need(4)) return MORE
        this.n = r.rb.readUInt32BE(r.rp)
        if (this.n === 0 || this.n > MAX_MACHINE_NAME) throw r.fail('SNAP_STREAM_CORRUPT', `machine type name of ${this.n} bytes in the configuration`)
        this.keep(r, 4)
        this.state = H_CFG_NAME
        return GO
      case H_CFG_NAME:
        if (!r.need(this.n)) return MORE
        this.machine = r.str(this.n)
        this.keep(r, this.n)
        this.state = H_CFG_NEXT
        return GO
      default: {
        if (!r.need(1)) return MORE
        const t = r.rb[r.rp]
        if (t === C.QEMU_VM_SUBSECTION) {
          this.keep(r, 1)
          this.state = H_SUB_LEN
          return GO
        }
        this.config = Buffer.concat(this.parts)
        this.parts = []
        this.state = H_DONE
        return t
      }
    }
  }

  private subsection(r: ChunkReader): number {
    switch (this.state) {
      case H_SUB_LEN:
        if (!r.need(1)) return MORE
        this.n = r.rb[r.rp]
        if (this.n === 0) throw r.fail('SNAP_STREAM_CORRUPT', 'configuration subsection with an empty name')
        return this.kept(r, 1, H_SUB_NAME)
      case H_SUB_NAME:
        if (!r.need(this.n)) return MORE
        this.subName = r.str(this.n)
        return this.kept(r, this.n, H_SUB_VER)
      case H_SUB_VER:
        if (!r.need(4)) return MORE
        if (this.subName === C.CONFIG_SUB_TARGET_PAGE_BITS) return this.kept(r, 4, H_SUB_TPB)
        if (this.subName === C.CONFIG_SUB_CAPABILITIES) return this.kept(r, 4, H_CAPS_COUNT)
        if (this.subName === C.CONFIG_SUB_UUID) return this.kept(r, 4, H_UUID)
        throw r.fail('SNAP_STREAM_UNSUPPORTED', `configuration subsection "${this.subName}" is not supported`)
      case H_SUB_TPB: {
        if (!r.need(4)) return MORE
        const bits = r.rb.readUInt32BE(r.rp)
        if (bits !== C.TARGET_PAGE_BITS) throw r.fail('SNAP_STREAM_UNSUPPORTED', `target page size 2^${bits}: only 4096-byte target pages are supported`)
        return this.kept(r, 4, H_CFG_NEXT)
      }
      case H_CAPS_COUNT: {
        if (!r.need(4)) return MORE
        const caps = r.rb.readUInt32BE(r.rp)
        if (caps > MAX_CAPS) throw r.fail('SNAP_STREAM_CORRUPT', `${caps} capabilities in the configuration`)
        return this.kept(r, 4, caps === 0 ? H_CFG_NEXT : H_CAP_LEN)
      }
      case H_CAP_LEN:
        if (!r.need(1)) return MORE
        this.n = r.rb[r.rp]
        return this.kept(r, 1, H_CAP_NAME)
      case H_CAP_NAME: {
        if (!r.need(this.n)) return MORE
        const cap = r.str(this.n)
        const why = cap === 'mapped-ram' ? ' (pages are written at fixed file offsets); turn off capability mapped-ram'
          : cap === 'x-ignore-shared' ? ' (shared RAM is not in the stream); turn off capability x-ignore-shared' : ''
        throw r.fail('SNAP_STREAM_UNSUPPORTED', `capability ${cap} on the source is not supported${why}`)
      }
      default:
        if (!r.need(16)) return MORE
        return this.kept(r, 16, H_CFG_NEXT)
    }
  }

  private kept(r: ChunkReader, n: number, next: number): number {
    this.keep(r, n)
    this.state = next
    return GO
  }
}
