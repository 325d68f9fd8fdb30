// Push parser for a QEMU 10 precopy migration stream (reference §1, §2). It hands RAM page
// records to a RamSink as they arrive and keeps everything after the RAM (device sections, EOF,
// VM description) byte for byte. A state machine over whatever chunks arrive: each state needs a
// fixed number of bytes, read in place from the chunk when they are there (page data is then a
// view into the input), else gathered in a small stash.

import { SnapError } from '../errors.js'
import type { DeviceState, RamBlockDecl, RamSink, StreamCounters } from '../types.js'
import * as C from './constants.js'
import { checkDeviceTail } from './device-tail.js'

const PAGE = C.TARGET_PAGE_SIZE
const MAX_MACHINE_NAME = 256
const MAX_CAPS = 64
const MAX_BLOCKS = 1024
/** 16 TiB of guest RAM: beyond this a MEM_SIZE total is taken as garbage. */
const MAX_RAM = 2 ** 44
/** one bitset chunk per 2^18 pages (1 GiB) keeps the re-send tracking lazy */
const SENT_CHUNK_BITS = 18

// Parser states: what the next `need` bytes are. Each is declared with the part of the stream
// it reads (for error messages, WHERE[state]): numbers keep the hot switch cheap, and the
// declaration order makes them, so nothing has to be kept aligned by hand.
const WHERE: string[] = []
const state = (where: string): number => WHERE.push(where) - 1
const S_MAGIC = state('the file header')
const S_FIRST = state('the configuration element')
const S_TOP = state('a top-level element')
const S_CFG_LEN = state('the configuration')
const S_CFG_NAME = state('the configuration')
const S_CFG_NEXT = state('the configuration')
const S_SUB_LEN = state('a configuration subsection')
const S_SUB_NAME = state('a configuration subsection')
const S_SUB_VER = state('a configuration subsection')
const S_SUB_TPB = state('a configuration subsection')
const S_CAPS_COUNT = state('a configuration subsection')
const S_CAP_LEN = state('a configuration subsection')
const S_CAP_NAME = state('a configuration subsection')
const S_UUID = state('a configuration subsection')
const S_CMD = state('a command')
const S_START_HDR = state('a section header')
const S_START_NAME = state('a section header')
const S_PARTEND = state('a section header')
const S_WORD = state('a ram record')
const S_REC_LEN = state('a ram record')
const S_REC_NAME = state('a ram record')
const S_ZERO = state('a ram ZERO record')
const S_PAGE = state('a ram PAGE record')
const S_XBZ_HDR = state('a ram XBZRLE record')
const S_XBZ_DATA = state('a ram XBZRLE record')
const S_MEM_LEN = state('the RAM block list')
const S_MEM_NAME = state('the RAM block list')
const S_FOOTER = state('a section footer')
const S_TAIL = state('the device state')

const RETURN_PATH_HINT =
  'return path / postcopy capability on the source is not supported by create; turn off capabilities return-path and postcopy-ram'

export interface StreamParserOptions {
  /** cap on the device state kept after the RAM (default 256 MiB) */
  maxDeviceBytes?: number
}

export class StreamParser {
  readonly counters: StreamCounters = { pages: 0, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 }
  private readonly maxDeviceBytes: number

  // input: the current chunk, and the stash that gathers a value split across chunks
  private buf: Buffer = Buffer.alloc(0)
  private pos = 0
  private base = 0 // stream offset of buf[0]
  private readonly stash = Buffer.allocUnsafe(2 * PAGE)
  private stashLen = 0
  private rb: Buffer = this.stash // where the bytes `need` got are: rb[rp ...]
  private rp = 0

  private state = S_MAGIC
  private n = 0 // length for the variable-length states
  private failed: unknown = null
  private result: DeviceState | null = null

  private machine = ''
  private configParts: Buffer[] = []
  private config: Buffer | null = null
  private subName = ''
  private capsLeft = 0

  private ramId = -1
  private ramInstance = 0
  private ramVersion = 0
  private inStart = false
  private ramEnd = false
  private switchoverStart = false

  private blocks: RamBlockDecl[] | null = null
  private pending: RamBlockDecl[] = []
  private byName = new Map<string, number>()
  private memTotal = 0
  private memSum = 0
  private sent: Array<Array<Uint8Array | undefined>> = []

  private lastBlock = -1
  private recType = 0
  private recAddr = 0
  private recBlock = 0

  private tail: Buffer[] = []
  private tailLen = 0
  private tailBase = 0

  constructor(private readonly sink: RamSink, opts: StreamParserOptions = {}) {
    this.maxDeviceBytes = opts.maxDeviceBytes ?? 256 * 1024 * 1024
  }

  push(chunk: Buffer): void {
    if (this.failed) throw this.failed
    if (this.result) throw new SnapError('SNAP_INTERNAL', 'StreamParser.push after end()')
    this.counters.bytesIn += chunk.length
    this.buf = chunk
    this.pos = 0
    try {
      this.run()
    } catch (err) {
      this.failed = err
      throw err
    } finally {
      this.base += chunk.length
      this.buf = Buffer.alloc(0)
      this.pos = 0
    }
  }

  end(): DeviceState {
    if (this.failed) throw this.failed
    if (this.result) return this.result
    try {
      return (this.result = this.finish())
    } catch (err) {
      this.failed = err
      throw err
    }
  }

  private finish(): DeviceState {
    if (this.state !== S_TAIL) {
      const inside = this.stashLen > 0 || this.state !== S_TOP ? `inside ${WHERE[this.state]}` : 'before the device state'
      throw new SnapError('SNAP_STREAM_TRUNCATED', `the stream ends ${inside} at offset ${this.base}: it was cut short`, {
        offset: this.base,
      })
    }
    const tail = this.tail.length === 1 ? this.tail[0] : Buffer.concat(this.tail, this.tailLen)
    const layout = checkDeviceTail(tail, this.tailBase)
    this.counters.sections += layout.sections.length
    return {
      machine: this.machine,
      config: this.config as Buffer,
      ramSectionId: this.ramId,
      ramInstanceId: this.ramInstance,
      ramVersion: this.ramVersion,
      switchoverStart: this.switchoverStart,
      ramEnd: this.ramEnd,
      deviceSections: tail.subarray(0, layout.eof),
      streamEnd: tail.subarray(layout.eof),
    }
  }

  /** Make `n` bytes available at rb[rp]; false (everything taken into the stash) if the chunk ran out. */
  private need(n: number): boolean {
    const left = this.buf.length - this.pos
    if (this.stashLen === 0 && left >= n) {
      this.rb = this.buf
      this.rp = this.pos
      this.pos += n
      return true
    }
    const k = Math.min(n - this.stashLen, left)
    this.buf.copy(this.stash, this.stashLen, this.pos, this.pos + k)
    this.pos += k
    this.stashLen += k
    if (this.stashLen < n) return false
    this.stashLen = 0
    this.rb = this.stash
    this.rp = 0
    return true
  }

  private err(code: 'SNAP_STREAM_CORRUPT' | 'SNAP_STREAM_UNSUPPORTED' | 'SNAP_STREAM_TOO_LARGE' | 'SNAP_STREAM_VERSION' | 'SNAP_STREAM_BAD_MAGIC', msg: string): SnapError {
    return new SnapError(code, msg, { offset: this.base + this.pos })
  }

  private recordConfig(n: number): void {
    this.configParts.push(Buffer.from(this.rb.subarray(this.rp, this.rp + n)))
  }

  private run(): void {
    for (;;) {
      switch (this.state) {
        case S_MAGIC: {
          if (!this.need(8)) return
          const magic = this.rb.readUInt32BE(this.rp)
          const version = this.rb.readUInt32BE(this.rp + 4)
          if (magic !== C.QEMU_VM_FILE_MAGIC) {
            throw this.err('SNAP_STREAM_BAD_MAGIC', 'not a QEMU migration stream (no QEVM magic); if it is a libvirt or compressed save image, unpack it first')
          }
          if (version !== C.QEMU_VM_FILE_VERSION) {
            throw this.err('SNAP_STREAM_VERSION', `migration stream version ${version}; only version 3 is supported${version === C.QEMU_VM_FILE_VERSION_COMPAT ? ' (version 2 is obsolete)' : ''}`)
          }
          this.state = S_FIRST
          break
        }
        case S_FIRST:
          if (!this.need(1)) return
          if (this.rb[this.rp] !== C.QEMU_VM_CONFIGURATION) {
            throw this.err('SNAP_STREAM_UNSUPPORTED', 'stream without a configuration element (machine type <= 2.3 or Xen)')
          }
          this.recordConfig(1)
          this.state = S_CFG_LEN
          break
        case S_CFG_LEN:
          if (!this.need(4)) return
          this.n = this.rb.readUInt32BE(this.rp)
          if (this.n === 0 || this.n > MAX_MACHINE_NAME) throw this.err('SNAP_STREAM_CORRUPT', `machine type name of ${this.n} bytes in the configuration`)
          this.recordConfig(4)
          this.state = S_CFG_NAME
          break
        case S_CFG_NAME:
          if (!this.need(this.n)) return
          this.machine = this.rb.toString('latin1', this.rp, this.rp + this.n)
          this.recordConfig(this.n)
          this.state = S_CFG_NEXT
          break
        case S_CFG_NEXT: {
          if (!this.need(1)) return
          const t = this.rb[this.rp]
          if (t === C.QEMU_VM_SUBSECTION) {
            this.recordConfig(1)
            this.state = S_SUB_LEN
            break
          }
          this.config = Buffer.concat(this.configParts)
          this.configParts = []
          this.topLevel(t)
          break
        }
        case S_SUB_LEN:
          if (!this.need(1)) return
          this.n = this.rb[this.rp]
          if (this.n === 0) throw this.err('SNAP_STREAM_CORRUPT', 'configuration subsection with an empty name')
          this.recordConfig(1)
          this.state = S_SUB_NAME
          break
        case S_SUB_NAME:
          if (!this.need(this.n)) return
          this.subName = this.rb.toString('latin1', this.rp, this.rp + this.n)
          this.recordConfig(this.n)
          this.state = S_SUB_VER
          break
        case S_SUB_VER:
          if (!this.need(4)) return
          this.recordConfig(4)
          if (this.subName === C.CONFIG_SUB_TARGET_PAGE_BITS) this.state = S_SUB_TPB
          else if (this.subName === C.CONFIG_SUB_CAPABILITIES) this.state = S_CAPS_COUNT
          else if (this.subName === C.CONFIG_SUB_UUID) this.state = S_UUID
          else throw this.err('SNAP_STREAM_UNSUPPORTED', `configuration subsection "${this.subName}" is not supported`)
          break
        case S_SUB_TPB: {
          if (!this.need(4)) return
          const bits = this.rb.readUInt32BE(this.rp)
          if (bits !== C.TARGET_PAGE_BITS) throw this.err('SNAP_STREAM_UNSUPPORTED', `target page size 2^${bits}: only 4096-byte target pages are supported`)
          this.recordConfig(4)
          this.state = S_CFG_NEXT
          break
        }
        case S_CAPS_COUNT:
          if (!this.need(4)) return
          this.capsLeft = this.rb.readUInt32BE(this.rp)
          if (this.capsLeft > MAX_CAPS) throw this.err('SNAP_STREAM_CORRUPT', `${this.capsLeft} capabilities in the configuration`)
          this.recordConfig(4)
          this.state = this.capsLeft === 0 ? S_CFG_NEXT : S_CAP_LEN
          break
        case S_CAP_LEN:
          if (!this.need(1)) return
          this.n = this.rb[this.rp]
          this.recordConfig(1)
          this.state = S_CAP_NAME
          break
        case S_CAP_NAME: {
          if (!this.need(this.n)) return
          const cap = this.rb.toString('latin1', this.rp, this.rp + this.n)
          const why = cap === 'mapped-ram' ? ' (pages are written at fixed file offsets); turn off capability mapped-ram'
            : cap === 'x-ignore-shared' ? ' (shared RAM is not in the stream); turn off capability x-ignore-shared' : ''
          throw this.err('SNAP_STREAM_UNSUPPORTED', `capability ${cap} on the source is not supported${why}`)
        }
        case S_UUID:
          if (!this.need(16)) return
          this.recordConfig(16)
          this.state = S_CFG_NEXT
          break
        case S_TOP:
          if (!this.need(1)) return
          this.topLevel(this.rb[this.rp])
          break
        case S_CMD:
          if (!this.need(4)) return
          this.command(this.rb.readUInt16BE(this.rp), this.rb.readUInt16BE(this.rp + 2))
          break
        case S_START_HDR:
          if (!this.need(5)) return
          this.ramId = this.rb.readUInt32BE(this.rp) // checked in S_START_NAME
          this.n = this.rb[this.rp + 4]
          this.state = S_START_NAME
          break
        case S_START_NAME:
          if (!this.need(this.n + 8)) return
          this.startSection(this.rb.toString('latin1', this.rp, this.rp + this.n), this.rb.readUInt32BE(this.rp + this.n), this.rb.readUInt32BE(this.rp + this.n + 4))
          break
        case S_PARTEND: {
          if (!this.need(4)) return
          const id = this.rb.readUInt32BE(this.rp)
          if (this.blocks === null || id !== this.ramId) throw this.err('SNAP_STREAM_CORRUPT', `PART/END of section ${id}, which no START opened`)
          if (this.ramEnd) throw this.err('SNAP_STREAM_CORRUPT', 'ram section data after its END section')
          if (this.n === C.QEMU_VM_SECTION_END) this.ramEnd = true
          this.counters.sections++
          this.state = S_WORD
          break
        }
        case S_WORD:
          if (!this.need(8)) return
          this.record(this.rb.readUInt32BE(this.rp), this.rb.readUInt32BE(this.rp + 4))
          break
        case S_REC_LEN:
          if (!this.need(1)) return
          this.n = this.rb[this.rp]
          this.state = S_REC_NAME
          break
        case S_REC_NAME: {
          if (!this.need(this.n)) return
          const name = this.rb.toString('latin1', this.rp, this.rp + this.n)
          const id = this.byName.get(name)
          if (id === undefined) throw this.err('SNAP_STREAM_CORRUPT', `page record for RAM block "${name}", which is not in the block list`)
          this.pageTarget(id)
          break
        }
        case S_ZERO:
          if (!this.need(1)) return
          if (this.rb[this.rp] !== 0) throw this.err('SNAP_STREAM_CORRUPT', `ZERO record with fill byte 0x${this.rb[this.rp].toString(16)} (QEMU >= 8.2 requires 0)`)
          this.counters.zeroPages++
          this.sink.zero(this.recBlock, this.recAddr / PAGE)
          this.state = S_WORD
          break
        case S_PAGE:
          if (!this.need(PAGE)) return
          this.counters.pages++
          this.sink.page(this.recBlock, this.recAddr / PAGE, this.rb.subarray(this.rp, this.rp + PAGE))
          this.state = S_WORD
          break
        case S_XBZ_HDR:
          if (!this.need(3)) return
          if (this.rb[this.rp] !== C.ENCODING_FLAG_XBZRLE) throw this.err('SNAP_STREAM_CORRUPT', `XBZRLE record with encoding flag ${this.rb[this.rp]}`)
          this.n = this.rb.readUInt16BE(this.rp + 1)
          if (this.n < 1 || this.n > PAGE) throw this.err('SNAP_STREAM_CORRUPT', `XBZRLE record of ${this.n} bytes`)
          this.state = S_XBZ_DATA
          break
        case S_XBZ_DATA:
          if (!this.need(this.n)) return
          this.counters.xbzrlePages++
          this.sink.xbzrle(this.recBlock, this.recAddr / PAGE, this.rb.subarray(this.rp, this.rp + this.n))
          this.state = S_WORD
          break
        case S_MEM_LEN:
          if (!this.need(1)) return
          this.n = this.rb[this.rp]
          if (this.n === 0) throw this.err('SNAP_STREAM_CORRUPT', 'RAM block with an empty name')
          this.state = S_MEM_NAME
          break
        case S_MEM_NAME:
          if (!this.need(this.n + 8)) return
          this.memBlock(this.rb.toString('latin1', this.rp, this.rp + this.n), this.rb.readUInt32BE(this.rp + this.n), this.rb.readUInt32BE(this.rp + this.n + 4))
          break
        case S_FOOTER:
          if (!this.need(5)) return
          if (this.rb[this.rp] !== C.QEMU_VM_SECTION_FOOTER || this.rb.readUInt32BE(this.rp + 1) !== this.ramId) {
            throw this.err('SNAP_STREAM_CORRUPT', `no footer for ram section ${this.ramId} after its EOS`)
          }
          this.state = S_TOP
          break
        case S_TAIL: {
          const k = this.buf.length - this.pos
          if (k === 0) return
          this.keepTail(this.buf.subarray(this.pos))
          this.pos += k
          return
        }
      }
    }
  }

  private topLevel(t: number): void {
    switch (t) {
      case C.QEMU_VM_COMMAND:
        this.state = S_CMD
        return
      case C.QEMU_VM_SECTION_START:
        this.state = S_START_HDR
        return
      case C.QEMU_VM_SECTION_PART:
      case C.QEMU_VM_SECTION_END:
        this.n = t
        this.state = S_PARTEND
        return
      case C.QEMU_VM_SECTION_FULL:
      case C.QEMU_VM_EOF:
        if (this.blocks === null && t === C.QEMU_VM_EOF) throw this.err('SNAP_STREAM_CORRUPT', 'the stream ends (EOF) before its RAM')
        if (this.blocks === null) {
          throw this.err('SNAP_STREAM_UNSUPPORTED', 'a device section before the RAM (an early-setup device such as virtio-mem) is not supported')
        }
        // The RAM is over (a background snapshot has no END section): keep the rest verbatim.
        this.state = S_TAIL
        this.tailBase = this.base + this.pos - 1
        this.keepTail(Buffer.from([t]))
        return
      default:
        throw this.err('SNAP_STREAM_CORRUPT', `unknown top-level element type 0x${t.toString(16)}`)
    }
  }

  private command(cmd: number, len: number): void {
    if (cmd === C.MIG_CMD_SWITCHOVER_START) {
      if (len !== 0) throw this.err('SNAP_STREAM_CORRUPT', `SWITCHOVER_START command with ${len} payload bytes`)
      this.switchoverStart = true
      this.state = S_TOP
      return
    }
    const name = C.MIG_CMD_NAMES[cmd]
    if (name === undefined || cmd === C.MIG_CMD_INVALID) throw this.err('SNAP_STREAM_CORRUPT', `unknown command ${cmd}`)
    if (cmd === C.MIG_CMD_ENABLE_COLO) throw this.err('SNAP_STREAM_UNSUPPORTED', 'COLO (command ENABLE_COLO) is not supported')
    if (cmd === C.MIG_CMD_POSTCOPY_ADVISE && len === 0) {
      throw this.err('SNAP_STREAM_UNSUPPORTED', 'dirty-bitmap migration (capability dirty-bitmaps) is not supported by create; turn it off')
    }
    throw this.err('SNAP_STREAM_UNSUPPORTED', `command ${name}: ${RETURN_PATH_HINT}`)
  }

  private startSection(idstr: string, instance: number, version: number): void {
    if (idstr !== C.RAM_SECTION_IDSTR) {
      throw this.err('SNAP_STREAM_UNSUPPORTED', `iterative section "${idstr}" is not supported (only ram); turn off what adds it (dirty-bitmaps, VFIO migration)`)
    }
    if (this.blocks !== null || this.inStart) throw this.err('SNAP_STREAM_CORRUPT', 'a second ram START section')
    if (version !== C.RAM_SECTION_VERSION) throw this.err('SNAP_STREAM_UNSUPPORTED', `ram section version ${version} (only 4 is supported)`)
    this.ramInstance = instance
    this.ramVersion = version
    this.inStart = true
    this.counters.sections++
    this.state = S_WORD
  }

  /** One ram record word: `hi:lo` = page offset | flags (§2.1). */
  private record(hi: number, lo: number): void {
    const flags = lo & (PAGE - 1)
    const addr = hi * 0x100000000 + (lo - flags)
    const t = flags & ~C.RAM_SAVE_FLAG_CONTINUE
    switch (t) {
      case C.RAM_SAVE_FLAG_ZERO:
      case C.RAM_SAVE_FLAG_PAGE:
      case C.RAM_SAVE_FLAG_XBZRLE:
        if (this.blocks === null) throw this.err('SNAP_STREAM_CORRUPT', 'page record before the RAM block list')
        this.recType = t
        this.recAddr = addr
        if (flags & C.RAM_SAVE_FLAG_CONTINUE) {
          if (this.lastBlock < 0) throw this.err('SNAP_STREAM_CORRUPT', 'CONTINUE page record with no previous block')
          this.pageTarget(this.lastBlock)
        } else {
          this.state = S_REC_LEN
        }
        return
      case C.RAM_SAVE_FLAG_EOS:
        if (this.inStart && this.blocks === null) throw this.err('SNAP_STREAM_CORRUPT', 'ram START section without a block list')
        this.inStart = false
        this.state = S_FOOTER
        return
      case C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
        this.sink.multifdFlush?.() // a multifd barrier: the channels' pages after it are newer
        this.state = S_WORD
        return
      case C.RAM_SAVE_FLAG_MEM_SIZE:
        if (!this.inStart || this.blocks !== null || this.memTotal > 0) throw this.err('SNAP_STREAM_CORRUPT', 'MEM_SIZE record outside the ram START section')
        if (hi >= 0x200000 || addr > MAX_RAM) throw this.err('SNAP_STREAM_TOO_LARGE', `RAM total of ${hi >= 0x200000 ? 'over 2^53' : addr} bytes`)
        if (addr === 0) throw this.err('SNAP_STREAM_CORRUPT', 'MEM_SIZE record with a total of 0')
        this.memTotal = addr
        this.state = S_MEM_LEN
        return
      case C.RAM_SAVE_FLAG_COMPRESS_PAGE:
        throw this.err('SNAP_STREAM_UNSUPPORTED', 'compressed pages (capability compress, QEMU <= 9.0) are not supported; turn off capability compress')
      case C.RAM_SAVE_FLAG_HOOK:
        throw this.err('SNAP_STREAM_UNSUPPORTED', 'RDMA hook records (rdma: transport) are not supported')
      case C.RAM_SAVE_FLAG_FULL:
        throw this.err('SNAP_STREAM_CORRUPT', 'obsolete RAM_SAVE_FLAG_FULL record')
      default:
        throw this.err('SNAP_STREAM_CORRUPT', `ram record with flags 0x${flags.toString(16)}`)
    }
  }

  /** The block of the current page record is known: check the page and go for its payload. */
  private pageTarget(block: number): void {
    const decl = (this.blocks as RamBlockDecl[])[block]
    if (this.recAddr >= decl.size) {
      throw this.err('SNAP_STREAM_CORRUPT', `page at 0x${this.recAddr.toString(16)} is past the end of block ${decl.name} (0x${decl.size.toString(16)} bytes)`)
    }
    this.lastBlock = block
    this.recBlock = block
    const page = this.recAddr / PAGE
    const chunks = this.sent[block]
    const c = page >>> SENT_CHUNK_BITS
    const bits = chunks[c] ?? (chunks[c] = new Uint8Array(Math.min(1 << (SENT_CHUNK_BITS - 3), Math.ceil((decl.size / PAGE - c * 2 ** SENT_CHUNK_BITS) / 8))))
    const i = page & ((1 << SENT_CHUNK_BITS) - 1)
    const m = 1 << (i & 7)
    if (bits[i >>> 3] & m) this.counters.resentPages++
    else bits[i >>> 3] |= m
    this.state = this.recType === C.RAM_SAVE_FLAG_ZERO ? S_ZERO : this.recType === C.RAM_SAVE_FLAG_PAGE ? S_PAGE : S_XBZ_HDR
  }

  private memBlock(name: string, hi: number, lo: number): void {
    if (hi >= 0x200000) throw this.err('SNAP_STREAM_TOO_LARGE', `RAM block ${name} of over 2^53 bytes`)
    const size = hi * 0x100000000 + lo
    if (size % PAGE !== 0) throw this.err('SNAP_STREAM_UNSUPPORTED', `RAM block ${name} of ${size} bytes is not a multiple of 4096-byte pages`)
    if (this.byName.has(name)) throw this.err('SNAP_STREAM_CORRUPT', `RAM block ${name} listed twice`)
    if (this.pending.length >= MAX_BLOCKS) throw this.err('SNAP_STREAM_CORRUPT', `more than ${MAX_BLOCKS} RAM blocks`)
    this.memSum += size
    if (this.memSum > this.memTotal) throw this.err('SNAP_STREAM_CORRUPT', `RAM block sizes add up to more than the MEM_SIZE total ${this.memTotal}`)
    this.byName.set(name, this.pending.length)
    this.pending.push({ name, size })
    this.sent.push([])
    if (this.memSum < this.memTotal) {
      this.state = S_MEM_LEN
      return
    }
    this.blocks = this.pending
    this.sink.blocks(this.blocks.map((b) => ({ ...b })))
    this.state = S_WORD
  }

  private keepTail(bytes: Buffer): void {
    if (this.tailLen + bytes.length > this.maxDeviceBytes) {
      throw this.err('SNAP_STREAM_TOO_LARGE', `device state after the RAM is over ${this.maxDeviceBytes} bytes`)
    }
    this.tail.push(Buffer.from(bytes))
    this.tailLen += bytes.length
  }
}
