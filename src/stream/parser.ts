// Push parser for a QEMU 10 precopy migration stream (reference §1, §2). It hands RAM page
// records to a RamSink as they arrive and keeps everything after the RAM (device sections, EOF,
// VM description) byte for byte. A state machine over whatever chunks arrive: each state needs a
// fixed number of bytes, read in place from the chunk when they are there (page data is then a
// view into the input), else gathered in a small stash (chunk-reader.ts). Each wire structure's
// decoding and checks live in its own module, beside its encoder: file-header.ts (header and
// configuration), section.ts, command.ts, ram-record.ts (record word, block list), page-record.ts.

import { SnapError } from '../errors.js'
import type { DeviceState, RamBlockDecl, RamSink, StreamCounters } from '../types.js'
import { ChunkReader } from './chunk-reader.js'
import { decodeCommand } from './command.js'
import * as C from './constants.js'
import { checkDeviceTail } from './device-tail.js'
import { HeaderDecoder } from './file-header.js'
import { checkZeroFill, decodeXbzrleHeader } from './page-record.js'
import { BlockListDecoder, recordError } from './ram-record.js'
import { checkFooter, checkRamVersion, decodeStartName } from './section.js'

const PAGE = C.TARGET_PAGE_SIZE
/** one bitset chunk per 2^18 pages (1 GiB) keeps the re-send tracking lazy */
const SENT_CHUNK_BITS = 18

// Parser states: what the next bytes are. Each is declared with the part of the stream it reads
// (for "cut short" errors, WHERE[state]): numbers keep the hot switch cheap, and the declaration
// order makes them, so nothing has to be kept aligned by hand.
const WHERE: string[] = []
const state = (where: string): number => WHERE.push(where) - 1
const S_HEADER = state('the file header') // HeaderDecoder says where inside
const S_TOP = state('a top-level element')
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

export interface StreamParserOptions {
  /** cap on the device state kept after the RAM (default 256 MiB) */
  maxDeviceBytes?: number
}

export class StreamParser {
  readonly counters: StreamCounters = { pages: 0, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 }
  private readonly maxDeviceBytes: number
  private readonly r = new ChunkReader(2 * PAGE)

  private state = S_HEADER
  private n = 0 // length for the variable-length states
  private failed: unknown = null
  private result: DeviceState | null = null

  private readonly header = new HeaderDecoder()
  private ramId = -1
  private ramInstance = 0
  private ramVersion = 0
  private inStart = false
  private ramEnd = false
  private switchoverStart = false

  private readonly list = new BlockListDecoder()
  private blocks: RamBlockDecl[] | null = null
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
    this.r.feed(chunk)
    try {
      this.run()
    } catch (err) {
      this.failed = err
      throw err
    } finally {
      this.r.release()
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
      const where = this.state === S_HEADER ? this.header.where : WHERE[this.state]
      const inside = this.r.partial || this.state !== S_TOP ? `inside ${where}` : 'before the device state'
      throw new SnapError('SNAP_STREAM_TRUNCATED', `the stream ends ${inside} at offset ${this.r.base}: it was cut short`, {
        offset: this.r.base,
      })
    }
    const tail = this.tail.length === 1 ? this.tail[0] : Buffer.concat(this.tail, this.tailLen)
    const layout = checkDeviceTail(tail, this.tailBase)
    this.counters.sections += layout.sections.length
    return {
      machine: this.header.machine,
      config: this.header.config as Buffer,
      ramSectionId: this.ramId,
      ramInstanceId: this.ramInstance,
      ramVersion: this.ramVersion,
      switchoverStart: this.switchoverStart,
      ramEnd: this.ramEnd,
      deviceSections: tail.subarray(0, layout.eof),
      streamEnd: tail.subarray(layout.eof),
    }
  }

  /** The page records here (the hot path), everything else in step(). */
  private run(): void {
    const r = this.r
    for (;;) {
      switch (this.state) {
        case S_WORD:
          if (!r.need(8)) return
          this.record(r.rb.readUInt32BE(r.rp), r.rb.readUInt32BE(r.rp + 4))
          break
        case S_PAGE:
          if (!r.need(PAGE)) return
          this.counters.pages++
          this.sink.page(this.recBlock, this.recAddr / PAGE, r.rb.subarray(r.rp, r.rp + PAGE))
          this.state = S_WORD
          break
        case S_ZERO:
          if (!r.need(1)) return
          checkZeroFill(r)
          this.counters.zeroPages++
          this.sink.zero(this.recBlock, this.recAddr / PAGE)
          this.state = S_WORD
          break
        case S_REC_LEN:
          if (!r.need(1)) return
          this.n = r.rb[r.rp]
          this.state = S_REC_NAME
          break
        case S_REC_NAME:
          if (!r.need(this.n)) return
          this.pageTarget(this.list.id(r, this.n))
          break
        case S_XBZ_HDR:
          if (!r.need(3)) return
          this.n = decodeXbzrleHeader(r)
          this.state = S_XBZ_DATA
          break
        case S_XBZ_DATA:
          if (!r.need(this.n)) return
          this.counters.xbzrlePages++
          this.sink.xbzrle(this.recBlock, this.recAddr / PAGE, r.rb.subarray(r.rp, r.rp + this.n))
          this.state = S_WORD
          break
        default:
          if (!this.step()) return
      }
    }
  }

  /** One state outside the page records; false when the input ran out. */
  private step(): boolean {
    const r = this.r
    switch (this.state) {
      case S_HEADER: {
        const t = this.header.step(r)
        if (t >= 0) this.topLevel(t)
        return t >= 0
      }
      case S_TOP:
        if (!r.need(1)) return false
        this.topLevel(r.rb[r.rp])
        return true
      case S_CMD:
        if (!r.need(4)) return false
        decodeCommand(r) // only SWITCHOVER_START gets through
        this.switchoverStart = true
        this.state = S_TOP
        return true
      case S_START_HDR:
        if (!r.need(5)) return false
        this.ramId = r.rb.readUInt32BE(r.rp) // checked with the idstr
        this.n = r.rb[r.rp + 4]
        this.state = S_START_NAME
        return true
      case S_START_NAME:
        if (!r.need(this.n + 8)) return false
        this.startSection()
        return true
      case S_PARTEND:
        if (!r.need(4)) return false
        this.partOrEnd(r.rb.readUInt32BE(r.rp))
        return true
      case S_MEM_LEN:
        if (!r.need(1)) return false
        this.n = r.rb[r.rp]
        if (this.n === 0) throw r.fail('SNAP_STREAM_CORRUPT', 'RAM block with an empty name')
        this.state = S_MEM_NAME
        return true
      case S_MEM_NAME:
        if (!r.need(this.n + 8)) return false
        this.memBlock()
        return true
      case S_FOOTER:
        if (!r.need(5)) return false
        checkFooter(r, this.ramId)
        this.state = S_TOP
        return true
      default: // S_TAIL: everything else is kept as it comes
        if (r.pos < r.buf.length) {
          this.keepTail(r.buf.subarray(r.pos))
          r.pos = r.buf.length
        }
        return false
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
        if (this.blocks === null && t === C.QEMU_VM_EOF) throw this.r.fail('SNAP_STREAM_CORRUPT', 'the stream ends (EOF) before its RAM')
        if (this.blocks === null) {
          throw this.r.fail('SNAP_STREAM_UNSUPPORTED', 'a device section before the RAM (an early-setup device such as virtio-mem) is not supported')
        }
        // The RAM is over (a background snapshot has no END section): keep the rest verbatim.
        this.state = S_TAIL
        this.tailBase = this.r.offset - 1
        this.keepTail(Buffer.from([t]))
        return
      default:
        throw this.r.fail('SNAP_STREAM_CORRUPT', `unknown top-level element type 0x${t.toString(16)}`)
    }
  }

  private startSection(): void {
    const { instance, version } = decodeStartName(this.r, this.n)
    if (this.blocks !== null || this.inStart) throw this.r.fail('SNAP_STREAM_CORRUPT', 'a second ram START section')
    checkRamVersion(this.r, version)
    this.ramInstance = instance
    this.ramVersion = version
    this.inStart = true
    this.counters.sections++
    this.state = S_WORD
  }

  /** A PART or END section header (its type in `n`) for section `id`. */
  private partOrEnd(id: number): void {
    if (this.blocks === null || id !== this.ramId) throw this.r.fail('SNAP_STREAM_CORRUPT', `PART/END of section ${id}, which no START opened`)
    if (this.ramEnd) throw this.r.fail('SNAP_STREAM_CORRUPT', 'ram section data after its END section')
    if (this.n === C.QEMU_VM_SECTION_END) this.ramEnd = true
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
        if (this.blocks === null) throw this.r.fail('SNAP_STREAM_CORRUPT', 'page record before the RAM block list')
        this.recType = t
        this.recAddr = addr
        if (flags & C.RAM_SAVE_FLAG_CONTINUE) {
          if (this.lastBlock < 0) throw this.r.fail('SNAP_STREAM_CORRUPT', 'CONTINUE page record with no previous block')
          this.pageTarget(this.lastBlock)
        } else {
          this.state = S_REC_LEN
        }
        return
      case C.RAM_SAVE_FLAG_EOS:
        if (this.inStart && this.blocks === null) throw this.r.fail('SNAP_STREAM_CORRUPT', 'ram START section without a block list')
        this.inStart = false
        this.state = S_FOOTER
        return
      case C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
        this.sink.multifdFlush?.() // a multifd barrier: the channels' pages after it are newer
        this.state = S_WORD
        return
      case C.RAM_SAVE_FLAG_MEM_SIZE:
        if (!this.inStart || this.blocks !== null || this.list.started) throw this.r.fail('SNAP_STREAM_CORRUPT', 'MEM_SIZE record outside the ram START section')
        this.list.start(this.r, hi, addr)
        this.state = S_MEM_LEN
        return
      default:
        throw recordError(this.r, t, flags)
    }
  }

  /** The block of the current page record is known: check the page and go for its payload. */
  private pageTarget(block: number): void {
    const decl = (this.blocks as RamBlockDecl[])[block]
    if (this.recAddr >= decl.size) {
      throw this.r.fail('SNAP_STREAM_CORRUPT', `page at 0x${this.recAddr.toString(16)} is past the end of block ${decl.name} (0x${decl.size.toString(16)} bytes)`)
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

  /** One (name, size) of the MEM_SIZE block list; when they add up, the sink learns the blocks. */
  private memBlock(): void {
    if (!this.list.add(this.r, this.n)) {
      this.state = S_MEM_LEN
      return
    }
    const blocks = this.list.blocks as RamBlockDecl[]
    this.blocks = blocks
    this.sent = blocks.map(() => [])
    this.sink.blocks(blocks.map((b) => ({ ...b })))
    this.state = S_WORD
  }

  private keepTail(bytes: Buffer): void {
    if (this.tailLen + bytes.length > this.maxDeviceBytes) {
      throw this.r.fail('SNAP_STREAM_TOO_LARGE', `device state after the RAM is over ${this.maxDeviceBytes} bytes`)
    }
    this.tail.push(Buffer.from(bytes))
    this.tailLen += bytes.length
  }
}
