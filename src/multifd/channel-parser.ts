// Push parser for one QEMU multifd channel (reference §4; qemu-multifd-peer.md §2-§4): the
// initial packet, then RAM packets (a 1344-byte header, then normal_pages × 4 KiB of pages).
// It hands each page to a ChannelSink with its epoch: the number of SYNC packets this channel
// had sent before it. Epoch k of every channel pairs with the main channel's k-th
// MULTIFD_FLUSH; a page of a later epoch is newer than any copy of an earlier one.
//
// A data packet names its RAM block, and the blocks come on the main channel (the ram START
// section). Until setBlocks() is called the parser stops before the first data packet and
// keeps what arrives (up to a cap): the channels run ahead of the main channel.

import { SnapError } from '../errors.js'
import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE, TARGET_PAGE_SIZE } from '../stream/constants.js'
import type { RamBlockDecl } from '../types.js'
import { checkPacketStart, decodeInit, decodePacketHeader, isSync, type MultifdInit, type MultifdPacketHeader } from './packet.js'

const PAGE = TARGET_PAGE_SIZE
/** Bytes a channel may hold while it waits for the main channel's block list. */
export const DEFAULT_WAIT_CAP = 256 << 20

export interface ChannelSink {
  init(init: MultifdInit): void
  page(block: number, page: number, data: Uint8Array, epoch: number): void
  zero(block: number, page: number, epoch: number): void
  /** the channel's `count`-th SYNC packet (count from 1) */
  sync(count: number): void
}

export interface ChannelCounters {
  bytesIn: number
  packets: number
  syncs: number
  pages: number
  zeroPages: number
}

const S_INIT = 0
const S_START = 1
const S_HEADER = 2
const S_PAGES = 3

export class MultifdChannelParser {
  readonly counters: ChannelCounters = { bytesIn: 0, packets: 0, syncs: 0, pages: 0, zeroPages: 0 }
  private blocks: Map<string, { id: number; pages: number }> | null = null
  private queue: Buffer[] = []
  private have = 0
  private state = S_INIT
  private header: MultifdPacketHeader | null = null
  private blockId = 0
  /** the next normal page of the current packet */
  private next = 0
  private failed: unknown = null

  constructor(
    private readonly sink: ChannelSink,
    private readonly opts: { waitCap?: number; what?: string } = {},
  ) {}

  /** The main channel's block list: data packets can be checked and applied from now on. */
  setBlocks(list: RamBlockDecl[]): void {
    this.blocks = new Map(list.map((b, id) => [b.name, { id, pages: b.size / PAGE }]))
    this.run()
  }

  push(chunk: Buffer): void {
    if (this.failed) throw this.failed
    if (chunk.length === 0) return
    this.counters.bytesIn += chunk.length
    this.queue.push(chunk)
    this.have += chunk.length
    this.run()
  }

  /** The channel closed: anything but a packet boundary is a cut. */
  end(): void {
    if (this.failed) throw this.failed
    if (this.state === S_INIT) throw this.err('SNAP_MULTIFD_TRUNCATED', 'closed before its initial packet')
    if (this.state !== S_START || this.have > 0) throw this.err('SNAP_MULTIFD_TRUNCATED', 'closed in the middle of a packet')
  }

  /** Between packets with nothing held (a clean place for the channel to end). */
  get atBoundary(): boolean {
    return this.state === S_START && this.have === 0
  }

  private err(code: 'SNAP_MULTIFD_TRUNCATED' | 'SNAP_MULTIFD_TOO_LARGE' | 'SNAP_MULTIFD_BAD_PAGE', msg: string): SnapError {
    return new SnapError(code, `${this.opts.what ?? 'multifd channel'}: ${msg}`, { offset: this.counters.bytesIn - this.have })
  }

  private run(): void {
    try {
      this.step()
    } catch (e) {
      this.failed = e
      throw e
    }
  }

  private step(): void {
    for (;;) {
      switch (this.state) {
        case S_INIT:
          if (this.have < MULTIFD_INIT_SIZE) return
          this.sink.init(decodeInit(this.take(MULTIFD_INIT_SIZE)))
          this.state = S_START
          break
        case S_START:
          if (this.have < 12) return
          checkPacketStart(this.peek(12))
          this.state = S_HEADER
          break
        case S_HEADER: {
          if (this.have < MULTIFD_PACKET_HEADER_SIZE) return
          const h = decodePacketHeader(this.peek(MULTIFD_PACKET_HEADER_SIZE))
          if (h.offsets.length > 0 && this.blocks === null) {
            if (this.have > (this.opts.waitCap ?? DEFAULT_WAIT_CAP)) this.fail('SNAP_MULTIFD_TOO_LARGE', `${this.have} bytes arrived before the main channel's RAM block list`)
            return // setBlocks() goes on from here
          }
          this.checkPages(h)
          this.skip(MULTIFD_PACKET_HEADER_SIZE)
          this.header = h
          this.next = 0
          this.counters.packets++
          this.state = S_PAGES
          break
        }
        case S_PAGES: {
          const h = this.header!
          const epoch = this.counters.syncs
          while (this.next < h.normalPages) {
            if (this.have < PAGE) return
            const off = h.offsets[this.next++]
            this.sink.page(this.blockId, off / PAGE, this.take(PAGE), epoch)
            this.counters.pages++
          }
          for (let i = h.normalPages; i < h.offsets.length; i++) this.sink.zero(this.blockId, h.offsets[i] / PAGE, epoch)
          this.counters.zeroPages += h.zeroPages
          if (isSync(h)) this.sink.sync(++this.counters.syncs)
          this.header = null
          this.state = S_START
          break
        }
      }
    }
  }

  private fail(code: 'SNAP_MULTIFD_TOO_LARGE' | 'SNAP_MULTIFD_BAD_PAGE', msg: string): never {
    throw this.err(code, msg)
  }

  /** Every page of the packet, before any is applied: a known block, offsets inside it, page-aligned. */
  private checkPages(h: MultifdPacketHeader): void {
    if (h.offsets.length === 0) return
    const b = this.blocks!.get(h.ramblock)
    if (!b) this.fail('SNAP_MULTIFD_BAD_PAGE', `packet names RAM block "${h.ramblock.slice(0, 60)}", which the main channel did not declare`)
    for (const off of h.offsets) {
      if (off % PAGE !== 0 || off / PAGE >= b.pages) {
        this.fail('SNAP_MULTIFD_BAD_PAGE', `page offset 0x${off.toString(16)} is ${off % PAGE ? 'not page-aligned' : 'past the end'} of RAM block ${h.ramblock} (${b.pages * PAGE} bytes)`)
      }
    }
    this.blockId = b.id
  }

  /** `n` contiguous bytes from the front, without consuming them (a view when one chunk has them). */
  private peek(n: number): Buffer {
    const first = this.queue[0]
    if (first.length >= n) return first.subarray(0, n)
    // Straddles chunks: copy just these n bytes (joining whole 64 KiB socket chunks here
    // doubled the bytes copied per channel).
    const out = Buffer.allocUnsafe(n)
    let got = 0
    for (let i = 0; got < n; i++) got += this.queue[i].copy(out, got, 0, Math.min(this.queue[i].length, n - got))
    return out
  }

  private skip(n: number): void {
    this.have -= n
    while (n > 0) {
      const first = this.queue[0]
      if (first.length > n) {
        this.queue[0] = first.subarray(n)
        return
      }
      n -= first.length
      this.queue.shift()
    }
  }

  private take(n: number): Buffer {
    const b = this.peek(n)
    this.skip(n)
    return b
  }
}
