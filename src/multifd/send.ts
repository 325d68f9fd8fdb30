// `load --connect unix:PATH --channels N`: restore an image into a destination QEMU waiting in
// `migrate-incoming unix:PATH` with multifd on and multifd-channels N (qemu-multifd-peer.md
// §1.4, §4.3, §7.3). Whatever N the image was saved with: the image has no channels.
//
//   main:  QEVM 3 | config | ram START (blocks) FLUSH EOS | ram PART (zero pages) FLUSH EOS
//          | [SWITCHOVER_START] | ram END EOS | device sections | EOF, VMDESC   (then half-close)
//   ch i:  initial packet (id i) | SYNC | data packets ... | SYNC             (then close)
//
// The first SYNC on every channel pairs with the FLUSH in START (QEMU's channel threads apply
// pages as soon as they connect, before its load setup has run: without it the destination
// crashed); the last pairs with the FLUSH in PART, which holds the destination's main thread
// until every page is in, so the device state is loaded after the RAM. Zero pages go as ZERO
// records on the main channel: a packet's zero list does not clear pages a destination already
// holds. Each packet (≤128 pages of one block, usually one run of a cluster's raw bytes, sent
// without a copy) goes to the channel with the least queued. Clusters are decoded into a few
// buffers used over and over (no fresh memory per cluster: with lz4-napi's fresh buffers a 1 GiB
// restore faulted 215,000 pages and peaked at 260 MiB); a buffer goes back to the reader when
// the sockets have taken every packet that points into it, and no more than HELD_CLUSTERS are
// out at once: the image is not decoded faster than the sockets drain.

import type { Socket } from 'node:net'
import { unlessAborted } from '../abort.js'
import { openImage, topOf, type RestoreImage } from '../container/chain.js'
import { SnapError } from '../errors.js'
import { MULTIFD_PAGE_COUNT, RAM_SAVE_FLAG_MULTIFD_FLUSH, TARGET_PAGE_SIZE } from '../stream/constants.js'
import {
  PageRecordWriter, eosFooter, fileHeader, ramStartSection, sectionPartHeader, streamEnding,
} from '../stream/encoder.js'
import { SocketSink, channelTimeout, connectWith, unixPath, within } from '../transport/socket.js'
import { encodeInit, encodePacketHeader } from './packet.js'

const PAGE = TARGET_PAGE_SIZE
/** Decoded clusters whose packets may be queued on the sockets at once (each one cluster of RAM). */
const HELD_CLUSTERS = 8
/**
 * Bytes queued on all sockets beyond which the sender waits, whatever the number of clusters: a
 * page shared into many places (container.md "Shared slots") goes out once for each, so one
 * cluster can queue far more than its own size.
 */
const QUEUED_BYTES = 16 << 20

export interface ConnectOptions {
  /** read the image with O_DIRECT (container/direct-io.ts) */
  bypassCache?: boolean
  /** `unix:PATH` of the destination's migrate-incoming */
  connect: string
  /** the destination's multifd-channels (0: a plain `unix:` stream without multifd) */
  channels: number
  /** the destination VM's uuid (`-uuid`, query-uuid): its multifd channels require it; default all zero */
  uuid?: string
  /** bound on each wait for the destination, in ms (0: none; default $SNAPCTL_CHANNEL_TIMEOUT_MS, else 60 s) */
  timeoutMs?: number
  /** false: leave the page index alone */
  index?: boolean
  onProgress?: (pageBytesSent: number, pageBytesTotal: number) => void
  log?: (msg: string) => void
  signal?: AbortSignal
}

export interface ConnectResult {
  pages: number
  storedPages: number
  zeroPages: number
  pagesSent: number
  clusters: number
  /** multifd packets sent, over `channels` channels */
  packets: number
  channels: number
  bytesOut: number
  seconds: number
}

/** `xxxxxxxx-xxxx-…` or 32 hex digits → 16 bytes. */
export function parseUuid(s: string | undefined): Buffer {
  if (s === undefined) return Buffer.alloc(16)
  const hex = s.replace(/-/g, '')
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new SnapError('SNAP_USAGE', `--uuid ${s}: not a uuid`)
  return Buffer.from(hex, 'hex')
}

export async function loadOverSocket(path: string, opts: ConnectOptions): Promise<ConnectResult> {
  const started = performance.now()
  const n = opts.channels
  if (!(Number.isInteger(n) && n >= 0 && n <= 255)) throw new SnapError('SNAP_USAGE', `--channels ${n}: from 1 to 255 (the destination's multifd-channels)`)
  const uuid = parseUuid(opts.uuid)
  const sockPath = unixPath(opts.connect)
  const timeoutMs = channelTimeout(opts.timeoutMs)
  const reader = await openImage(path, { whileCreating: 'refuse', bypassCache: opts.bypassCache })
  if (topOf(reader).source.note) opts.log?.(`note: ${topOf(reader).source.note}`)
  const sockets: Socket[] = []
  const work = (async (): Promise<ConnectResult> => {
    try {
      const d = reader.device
      // The first bytes go with connect(): a silent connection freezes the destination's main loop.
      const main = new SocketSink(await connectWith(sockPath, fileHeader(d.config), 'the main channel', timeoutMs), 'the main channel', timeoutMs)
      sockets.push(main.socket)
      const chans: SocketSink[] = []
      for (let i = 0; i < n; i++) {
        const s = await connectWith(sockPath, encodeInit({ uuid, id: i }), `multifd channel ${i}`, timeoutMs)
        sockets.push(s)
        chans.push(new SocketSink(s, `multifd channel ${i}`, timeoutMs))
      }
      // LevelDB is loaded and the index checked once every page is queued, while the destination
      // takes in the rest: before the first page it held a 1 GiB restore back 0.25-0.35 s.
      const refresh = opts.index === false ? undefined : async () => (await import('../index/refresh.js')).refreshIndex(topOf(reader), opts.log)
      const r = await new Sender(reader, main, chans, opts, timeoutMs, refresh).run()
      return { ...r, channels: n, seconds: (performance.now() - started) / 1000 }
    } finally {
      for (const s of sockets) s.destroy()
      await reader.close()
    }
  })()
  return unlessAborted(opts.signal, work, async () => {
    for (const s of sockets) s.destroy()
  })
}

const flushWord = (): Buffer => {
  const b = Buffer.alloc(8)
  b.writeUInt32BE(RAM_SAVE_FLAG_MULTIFD_FLUSH, 4)
  return b
}

/** One `load --connect`: the main channel's records, the channels' packets, and their order. */
class Sender {
  private readonly id: number
  private readonly multifd: boolean
  private readonly rec: PageRecordWriter
  private readonly mainWrites: Array<Promise<void>> = []
  private pages = 0
  private clusters = 0
  private packets = 0
  /** clusters whose buffers are still referenced by queued writes */
  private held = 0
  private onRelease: (() => void) | null = null

  constructor(
    private readonly reader: RestoreImage,
    private readonly main: SocketSink,
    private readonly chans: SocketSink[],
    private readonly opts: ConnectOptions,
    private readonly timeoutMs: number,
    /** side work for when every page is queued (the page index), awaited before run() returns */
    private readonly afterPages?: () => Promise<void>,
  ) {
    this.id = reader.device.ramSectionId
    this.multifd = chans.length > 0
    this.rec = new PageRecordWriter(reader.blocks)
    // A connection that closes wakes a wait for buffers: the loop then throws its error.
    for (const c of [main, ...chans]) c.socket.once('close', () => this.onRelease?.())
  }

  async run(): Promise<Omit<ConnectResult, 'channels' | 'seconds'>> {
    const { zeroPages, storedPages } = this.reader.locator.totals()
    this.prologue()
    for (const c of this.chans) void c.write(this.sync()).catch(() => {})
    await this.pushClusters(storedPages)
    for (const c of this.chans) void c.write(this.sync()).catch(() => {})
    const after = this.afterPages?.() ?? Promise.resolve()
    after.catch(() => {})
    try {
      // The channels stay open until the destination closes them: an EOF on a channel before the
      // main channel's last FLUSH fails the destination's load.
      await Promise.all(this.chans.map((c) => c.flush()))
      await this.epilogue()
    } catch (e) {
      await after.catch(() => {}) // the image stays open until it is done
      throw e
    }
    await after
    const bytesOut = this.main.bytes + this.chans.reduce((a, c) => a + c.bytes, 0)
    const pages = this.pages
    return { pages: pages + zeroPages, storedPages: pages, zeroPages, pagesSent: pages + zeroPages, clusters: this.clusters, packets: this.packets, bytesOut }
  }

  /** Main, up to the FLUSH that waits for the channels' last SYNC: not awaited until they are done. */
  private prologue(): void {
    const { rec, id, reader } = this
    const d = reader.device
    const start = ramStartSection({ sectionId: id, instanceId: d.ramInstanceId, version: d.ramVersion }, reader.blocks)
    if (this.multifd) {
      rec.raw(start.subarray(0, start.length - 13))
      rec.raw(flushWord())
      rec.raw(eosFooter(id))
    } else rec.raw(start)
    rec.raw(sectionPartHeader(id))
    reader.locator.forEachZero((b, p) => rec.zero(b, p))
    if (this.multifd) {
      rec.raw(flushWord()) // pairs with the channels' last SYNC
      rec.raw(eosFooter(id))
    }
    this.pushMain(this.multifd ? rec.flush() : rec.take())
  }

  private pushMain(bufs: Buffer[]): void {
    for (const b of bufs) {
      const w = this.main.write(b)
      w.catch(() => {})
      this.mainWrites.push(w)
    }
  }

  private sync(): Buffer {
    return encodePacketHeader({ flags: 1, pagesAlloc: 0, normalPages: 0, zeroPages: 0, packetNum: BigInt(this.packets++), ramblock: '', offsets: [] })
  }

  private async pushClusters(storedPages: number): Promise<void> {
    const { reader, chans, main } = this
    for await (const cluster of reader.clusters({ readAhead: 2, reuse: 'manual' })) {
      const slots = reader.locator.liveSlots(cluster.seq, cluster.pages, { offset: cluster.offset })
      // Pages stored once for several places (container.md "Shared slots"): (slot, block, page) triples.
      const shared = reader.locator.sharedPages(cluster.seq, cluster.pages, { offset: cluster.offset })
      if (slots.length === 0 && shared.length === 0) {
        cluster.release?.()
        continue
      }
      this.clusters++
      const list = cluster.pages
      // Every write into `raw` holds it; the last one written gives it back (one more hold for
      // the loop, so that a write done at once does not release it early).
      let holds = 1
      this.held++
      const done = (): void => {
        if (--holds > 0) return
        cluster.release?.()
        this.held--
        this.onRelease?.()
      }
      // Runs of one block, at most a packet's worth.
      for (let i = 0; i < slots.length; ) {
        const block = list[2 * slots[i]]
        let j = i + 1
        while (j < slots.length && j - i < MULTIFD_PAGE_COUNT && list[2 * slots[j]] === block) j++
        holds++
        const run = slots.slice(i, j)
        this.emit(block, cluster.raw, run, run.map((s) => list[2 * s + 1]), done)
        i = j
        await this.room()
      }
      for (let i = 0; i < shared.length; ) {
        const block = shared[i + 1]
        const run: number[] = []
        const pages: number[] = []
        for (; i < shared.length && run.length < MULTIFD_PAGE_COUNT && shared[i + 1] === block; i += 3) {
          run.push(shared[i])
          pages.push(shared[i + 2])
        }
        holds++
        this.emit(block, cluster.raw, run, pages, done)
        await this.room()
      }
      done()
      while (this.held >= HELD_CLUSTERS && !main.socket.destroyed) await this.released()
      this.pages += slots.length + shared.length / 3
      for (const c of [main, ...chans]) if (c.socket.destroyed) await c.flush() // throws the peer's error at once
      this.opts.onProgress?.(this.pages * PAGE, storedPages * PAGE)
    }
  }

  /** Until at most QUEUED_BYTES are queued on the sockets. */
  private async room(): Promise<void> {
    const queued = (): number => [this.main, ...this.chans].reduce((n, c) => n + c.socket.writableLength, 0)
    while (queued() > QUEUED_BYTES && !this.main.socket.destroyed) await this.released()
  }

  /** Until some cluster's buffer or queued copy is written; bounded, as every wait on the destination is. */
  private async released(): Promise<void> {
    const back = new Promise<void>((resolve) => (this.onRelease = resolve))
    await within(back, this.timeoutMs, 'the destination read nothing', () => {
      for (const c of [this.main, ...this.chans]) c.socket.destroy()
    })
    this.onRelease = null
  }

  /**
   * Pages `pages` of one block from slots `slots` of `raw`: PAGE records on main without channels,
   * else one packet on the least busy channel. `written` is called once the socket has taken the
   * pages (or failed).
   */
  private emit(block: number, raw: Buffer, slots: number[], pages: number[], written: () => void): void {
    if (!this.multifd) {
      slots.forEach((s, i) => this.rec.page(block, pages[i], raw.subarray(s * PAGE, (s + 1) * PAGE)))
      this.pushMain(this.rec.take())
      written() // the records hold copies
      return
    }
    const name = this.reader.blocks[block].name
    // The pages as views of `raw`, one per run of consecutive slots: a shared slot repeated in a
    // packet goes out as the same view again, never as a copy (copies of pages shared into many
    // places were garbage the collector freed late: 364 MiB for a 256 MiB VM of repeated pages).
    const parts: Buffer[] = []
    for (let i = 0; i < slots.length; ) {
      let j = i + 1
      while (j < slots.length && slots[j] === slots[j - 1] + 1) j++
      parts.push(raw.subarray(slots[i] * PAGE, (slots[j - 1] + 1) * PAGE))
      i = j
    }
    const header = encodePacketHeader({
      flags: 0, pagesAlloc: MULTIFD_PAGE_COUNT, normalPages: slots.length, zeroPages: 0, packetNum: BigInt(this.packets++), ramblock: name,
      offsets: pages.map((p) => p * PAGE),
    })
    let best = this.chans[0]
    for (const c of this.chans) if (c.socket.writableLength < best.socket.writableLength) best = c
    let once = true
    const took = (): void => {
      if (once) written()
      once = false
      this.onRelease?.() // room() waits for queued bytes to go
    }
    // Corked: the header and the views leave in one writev. The socket takes them in order, so
    // the last one's callback means the socket is done with `raw`.
    best.socket.cork()
    void best.write(header).catch(() => {})
    for (let k = 0; k < parts.length; k++) void best.write(parts[k], k === parts.length - 1 ? took : undefined).catch(took) // what fails is thrown by the next flush
    best.socket.uncork()
  }

  /** The rest of main: END, the device state; then half-close and wait for the destination to close. */
  private async epilogue(): Promise<void> {
    const { rec, id, main } = this
    const d = this.reader.device
    if (!this.multifd) rec.raw(eosFooter(id))
    for (const part of streamEnding(d)) rec.raw(part)
    this.pushMain(rec.flush())
    await Promise.all(this.mainWrites)
    // Half-close (the destination waits for more after the VMDESC otherwise), then wait for it to
    // close: it has read everything.
    await main.close()
    await within(
      new Promise<void>((resolve) => (main.socket.closed ? resolve() : main.socket.once('close', () => resolve()))),
      this.timeoutMs,
      'the destination did not finish the migration',
    )
  }
}
