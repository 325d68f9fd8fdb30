// The lazy-restore session: the setup QEMU needs before it can run the VM, then the page
// scheduler, which answers each page request ahead of the background push of every other page
// (format-spec and src/postcopy.ts describe the stream). No page is sent twice (a `sent` byte
// per page), and no page is sent before its cluster passed its checks and agreed with the page
// map. The session sees the transport only as a StreamSink and a ReturnPathReader.
import { getPriority, setPriority } from 'node:os'
import type { DecodedCluster } from '../container/reader.js'
import type { RestoreImage } from '../container/chain.js'
import { PageFetcher } from './page-fetcher.js'
import { LOC_NEVER_SENT, LOC_ZERO, type PageLocator, type RunLocator } from '../container/locator.js'
import { SnapError } from '../errors.js'
import * as enc from '../stream/encoder.js'
import type { RpMessage } from '../stream/return-path.js'
import type { StreamSink } from '../transport/types.js'
import { percentiles } from './latency.js'
import type { ReturnPathReader } from './return-path-reader.js'
import { applyReceivedBitmap } from './received.js'
import { RECORD_OVERHEAD, SectionBuilder } from './sections.js'

const PING_ADVISED = 2
const PING_PACKAGE = 3
/** bytes of background pages per section: small keeps request latency low */
const CHUNK_BYTES = 256 << 10
/** a background section's buffer: CHUNK_BYTES and the records' overhead (recycled, bgWriter) */
const BG_CAPACITY = CHUNK_BYTES + (32 << 10)

export interface SessionOptions {
  log?: (msg: string) => void
  /** how long to wait for the destination's answers during setup and at the end */
  timeoutMs: number
  /** per block: target pages per destination host page (1, or 512 for 2 MiB huge pages) */
  hostPages: number[]
  /**
   * The postcopy-preempt channel (a socket transport): connected once the destination has
   * answered on the return path, before the device state; answers to page requests go there,
   * the background push stays on the main channel. Absent: answers jump the main queue.
   */
  openPreempt?: () => Promise<StreamSink>
  /** Called once EOF is out: closes the stream (a socket's half-close) so the destination sees its end. */
  endStream?: () => Promise<void>
  /** the image's working set, (block, page) pairs: pushed first, in this order */
  workingSet?: Uint32Array | null
  /** record the pages the guest asks for, in order, until the push has finished (recorded()) */
  record?: boolean
  /**
   * With record: for this long after the device state is out, no background push; only the
   * pages asked for go out (not the rest of their clusters), so that every page the guest
   * touches in that time is asked for, and recorded. Then the push, as without it.
   */
  recordWindowMs?: number
  /**
   * At most this many pages of the working set are sent before the device state, as precopy
   * RAM pages: the destination writes them into RAM before LISTEN, so they are there when the
   * guest first runs (reference §5.4, step 6). The rest of the working set goes first after it.
   */
  precopyPages?: number
  /**
   * Continue a lazy restore the destination paused (postcopy-paused, then migrate-recover):
   * no setup; the received bitmaps, POSTCOPY_RESUME, then every page it does not have.
   */
  recover?: boolean
  /** bytes per second of the background push at most (answers to requests are never held back); absent: as fast as it goes */
  pushRate?: number
  /**
   * Once part of the working set was precopied, this process's nice value goes up by this much
   * for the rest: the guest has what it works on, and the push should take only the CPU it leaves.
   */
  pushNice?: number
}

/** Keys as in README, "Output keys". */
export interface PostcopyStats {
  /** from start to the device state written (the destination can start the VM then) */
  deviceStateSeconds: number
  requests: number
  requestedPages: number
  /** requests for pages that were already on their way in the background */
  requestsAlreadySent: number
  latencyMs: { p50: number; p99: number; max: number }
  bytesPushed: number
  bytesOut: number
  /** pages the image holds (storedPages + zeroPages) */
  pages: number
  storedPages: number
  zeroPages: number
  /** page records written: every page with data, and the zero pages that were asked for */
  pagesSent: number
  /** pages written in answer to requests (on the preempt channel when there is one) */
  pagesServedOnRequest: number
  /** what requests had to read: single frames (framed clusters), whole clusters (the others, or the push's) */
  requestFramesRead: number
  requestClustersRead: number
  /** whether answers went on a postcopy-preempt channel */
  preempt: boolean
  /** pages of the image's recorded working set (0: none, or not used) */
  workingSetPages: number
  /** pages pushed ahead of everything else because they are in the working set (precopiedPages included) */
  prefetchedPages: number
  /** of those, the pages sent before the device state: in RAM before the VM could run */
  precopiedPages: number
  /**
   * working-set pages the guest asked for (it touched them; before the prefetch reached them, or
   * zero pages that prefetch does not send twice). A touch of a page that had already arrived
   * makes no request, so the source cannot count it: this is a lower bound of what was touched.
   */
  prefetchedTouched: number
  /** from start until the last page was written (the END section and EOF out) */
  lastPageSeconds: number
  /** a recovery (--recover): the pages the destination had before it (its received bitmaps); else 0 */
  pagesReceivedBefore: number
  seconds: number
  /**
   * When each step before the VM could run was done, in ms since this process started
   * (performance.now()): `started` (the load began: process start-up and imports), `imageOpen`,
   * `connected` (the transport), `advised` (the destination answered ADVISE), `deviceState`
   * (the device state written). `processStart` is the process's start as epoch ms, to align
   * them with another process's clock.
   */
  phasesMs: Record<string, number>
}

export class Session {
  private readonly pageSize: number
  private readonly ramId: number
  private readonly hostPages: number[]
  private readonly sent: Uint8Array[]
  private readonly byName: Map<string, number>
  private readonly fetch: PageFetcher
  private readonly urgent: Array<{ buf: Buffer; t0: number }> = []
  private readonly background: Buffer[] = []
  private pumping: Promise<void> | null = null
  private wakeProducer: (() => void) | null = null
  private failure: unknown = null
  private requestChain: Promise<void> = Promise.resolve()
  private lastBlock = -1
  /** the preempt channel, once open */
  private preempt: StreamSink | null = null
  /** clusters a request touched: the push moves on to them (and the next one) before going on in file order */
  private readonly follow: number[] = []
  /** clusters the push has gone through */
  private readonly pushed: Uint8Array
  private bg: SectionBuilder | null = null
  /** pushFollowed()'s read and decode buffers */
  private followScratch: { stored: Buffer; raw: Buffer } | null = null
  /** the background sections' records: its chunks are given back once written, not left to the GC */
  private readonly bgWriter: enc.PageRecordWriter
  /** per block, for --record and prefetchedTouched: 1 = asked for, 2 = in the working set, 3 = both */
  private readonly marks: Uint8Array[] | null
  private readonly asked: number[] = []
  /** the END section and EOF are queued: no more page records */
  private ended = false
  private readonly latencies: number[] = []
  private requests = 0
  private requestedPages = 0
  private requestsAlreadySent = 0
  private pagesServedOnRequest = 0
  private prefetchedPages = 0
  private precopiedPages = 0
  /** the working set's next (block, page) pair to push */
  private wsNext = 0
  /** ends the record window early (a failure) */
  private endWindow: (() => void) | null = null
  private prefetchedTouched = 0
  private workingSetPages = 0
  private bytesPushed = 0
  private pages = 0
  private pagesReceivedBefore = 0
  /** PostcopyStats.phasesMs: the caller's marks, then the session's */
  readonly phases: Record<string, number> = { processStart: performance.timeOrigin }
  /**
   * every page, O(1): a request is answered without a search. Built once the device state is
   * out (run()): nothing before needs it, and at 4 GiB it is a million entries the VM need not wait for.
   */
  private locator!: PageLocator

  constructor(
    private readonly reader: RestoreImage,
    /** the page map's runs by cluster: what the background push walks */
    private readonly runs: RunLocator,
    private readonly out: StreamSink,
    private readonly rp: ReturnPathReader,
    private readonly opts: SessionOptions,
  ) {
    this.pageSize = reader.header.pageSize
    this.ramId = reader.device.ramSectionId
    this.hostPages = opts.hostPages
    this.fetch = new PageFetcher(reader)
    this.bgWriter = new enc.PageRecordWriter(reader.blocks, { chunkSize: BG_CAPACITY })
    this.sent = reader.blocks.map((b) => new Uint8Array(b.size / b.pageSize))
    this.byName = new Map(reader.blocks.map((b) => [b.name, b.id]))
    this.pushed = new Uint8Array(reader.clusterOffsets.length)
    const ws = opts.workingSet ?? null
    this.marks = opts.record || ws ? reader.blocks.map((b) => new Uint8Array(b.size / b.pageSize)) : null
    if (ws && this.marks) {
      for (let i = 0; i < ws.length; i += 2) this.marks[ws[i]][ws[i + 1]] |= 2
      this.workingSetPages = ws.length / 2
      // --record over a working set adds to it: what the guest touched before stays, first.
      if (opts.record) for (const v of ws) this.asked.push(v)
    }
  }

  /** --record: the pages the guest asked for, (block, page) pairs in the order it asked, each once. */
  recorded(): Uint32Array {
    return Uint32Array.from(this.asked)
  }

  /** Notes each page of a request: the order (--record), and working-set pages the guest touched. */
  private note(b: number, offset: number, length: number): void {
    const m = this.marks?.[b]
    if (!m || this.ended) return
    for (let p = offset / this.pageSize; p < (offset + length) / this.pageSize && p < m.length; p++) {
      if (m[p] & 1) continue
      m[p] |= 1
      if (m[p] & 2) this.prefetchedTouched++
      if (this.opts.record && !(m[p] & 2)) this.asked.push(b, p)
    }
  }

  async run(started: number, afterPush: () => Promise<void>): Promise<PostcopyStats> {
    if (this.opts.recover) await this.resume()
    else await this.setup()
    const deviceStateSeconds = (performance.now() - started) / 1000
    this.phases.deviceState = performance.now()
    this.locator ??= this.runs.pageLocator()
    this.opts.log?.(this.opts.recover
      ? `postcopy: resumed after ${(deviceStateSeconds * 1000).toFixed(0)} ms (the destination had ${this.pagesReceivedBefore} pages); serving the rest`
      : `postcopy: device state sent after ${(deviceStateSeconds * 1000).toFixed(0)} ms; serving pages`)
    // Messages and a close that came while the device state was being written are replayed
    // here: a return path that closed or broke that early must fail the restore too.
    this.rp.listen(
      (m) => this.onMessage(m),
      (err) => this.fail(err ?? new SnapError('SNAP_RETURN_PATH', 'the return path closed before every page was sent: the destination QEMU stopped')),
    )
    if (this.precopiedPages > 0 && this.opts.pushNice) yieldCpu(this.opts.pushNice, this.opts.log)
    if (this.opts.record && this.opts.recordWindowMs) await this.recordWindow(this.opts.recordWindowMs)
    await this.pushEverything()
    await this.requestChain
    this.check()
    this.rp.onClose = null
    // Every page is out (queued ahead of the END): a request from now on is for a page on its
    // way and needs no answer. Answering would write after EOF, into a pipe QEMU may have closed.
    this.ended = true
    await this.enqueue(Buffer.concat([enc.sectionEndHeader(this.ramId), enc.eosFooter(this.ramId), Buffer.from([0])]))
    await this.drain()
    const lastPageSeconds = (performance.now() - started) / 1000
    await this.opts.endStream?.()
    await afterPush()
    await this.rp.waitClosed(this.opts.timeoutMs, () => this.failure !== null)
    this.check()
    return {
      deviceStateSeconds, requests: this.requests, requestedPages: this.requestedPages, requestsAlreadySent: this.requestsAlreadySent,
      latencyMs: percentiles(this.latencies), bytesPushed: this.bytesPushed, bytesOut: this.out.bytes,
      ...this.locator.totals(), pagesSent: this.pages, pagesServedOnRequest: this.pagesServedOnRequest,
      requestFramesRead: this.fetch.framesRead, requestClustersRead: this.fetch.clustersRead, preempt: this.preempt !== null,
      workingSetPages: this.workingSetPages, prefetchedPages: this.prefetchedPages, precopiedPages: this.precopiedPages, prefetchedTouched: this.prefetchedTouched,
      lastPageSeconds, pagesReceivedBefore: this.pagesReceivedBefore, seconds: (performance.now() - started) / 1000, phasesMs: this.phases,
    }
  }

  /** Everything before the VM can run: ADVISE (answered), the block list, the device state packaged. */
  private async setup(): Promise<void> {
    const d = this.reader.device
    const hostSizes = this.hostPages.map((n) => n * this.pageSize)
    // QEMU's ram_pagesize_summary(): the OR of every block's page size.
    const summary = hostSizes.reduce((a, b) => a | b, this.pageSize)
    await this.out.write(
      Buffer.concat([enc.fileHeader(d.config), enc.openReturnPath(), enc.ping(1), enc.postcopyAdvise(summary, this.pageSize), enc.ping(PING_ADVISED)]),
    )
    // A destination without the postcopy-ram capability fails on ADVISE and closes the channel.
    await this.rp.waitPong(PING_ADVISED, this.opts.timeoutMs, (nothingCame) => nothingCame ? noDestination() :
      new SnapError('SNAP_POSTCOPY_SETUP', 'the destination refused POSTCOPY_ADVISE: turn the postcopy-ram capability on at the destination (migrate-set-capabilities) before migrate-incoming, and back its RAM with anonymous memory, tmpfs or hugetlbfs'),
    )
    this.phases.advised = performance.now()
    // The destination answered on the main connection, so it took that one as main: the
    // preempt channel may connect now, and must before PACKAGED (QEMU waits for it there).
    if (this.opts.openPreempt) this.preempt = await this.opts.openPreempt()
    const blob = Buffer.concat([enc.postcopyListen(), d.deviceSections, enc.ping(PING_PACKAGE), enc.postcopyRun()])
    const start = enc.ramStartSection({ sectionId: this.ramId, instanceId: d.ramInstanceId, version: d.ramVersion }, this.reader.blocks, hostSizes)
    // QEMU 10 goes ADVISE -> DISCARD on the first discard; LISTEN straight from ADVISE leaves
    // it in DISCARD and RUN is then refused. Discarding a page that never arrived is a no-op.
    const discard = enc.postcopyRamDiscard(this.reader.blocks[0].name, [[0, hostSizes[0]]])
    const package_ = Buffer.concat([enc.packaged(blob.length), blob])
    const precopy = this.opts.workingSet && (this.opts.precopyPages ?? 0) > 0
    if (!precopy) {
      await this.out.write(Buffer.concat([start, discard, package_]))
      return
    }
    // The working set's first pages as precopy RAM sections: after the discard (which would
    // drop a page placed before it), before LISTEN (after it, pages are placed by userfaultfd).
    await this.out.write(Buffer.concat([start, discard]))
    this.locator = this.runs.pageLocator()
    await this.pushWorkingSet(this.opts.precopyPages)
    this.precopiedPages = this.prefetchedPages
    while (this.pumping) await this.pumping
    this.check()
    await this.out.write(package_)
  }

  /**
   * Postcopy recovery, as QEMU's source does it (migration.c postcopy_do_resume): on the new main
   * channel (no file header: the destination's load loop goes on where it broke off) RECV_BITMAP
   * for each block, answered on the return path; the preempt channel, if any; POSTCOPY_RESUME,
   * answered by RESUME_ACK(1). Then the destination asks again for the pages its vCPUs were
   * waiting on. Every bitmap is checked before anything is resumed: a refusal leaves the
   * destination paused again once the channel closes.
   */
  private async resume(): Promise<void> {
    const blocks = this.reader.blocks
    await this.out.write(Buffer.concat(blocks.map((b) => enc.recvBitmap(b.name))))
    await this.rp.waitRecovery('bitmaps', blocks.length, this.opts.timeoutMs)
    for (const [name, bitmap] of this.rp.bitmaps) {
      const b = this.byName.get(name)
      if (b === undefined) throw new SnapError('SNAP_RECV_BITMAP', `the destination sent the received bitmap of RAM block "${name}", which snapctl did not ask for (the image has ${blocks.map((x) => x.name).join(', ')})`, { block: name })
      this.pagesReceivedBefore += applyReceivedBitmap(blocks[b], this.hostPages[b], bitmap, this.sent[b])
    }
    this.rp.bitmaps.clear()
    // QEMU's source connects it after the bitmaps, so the destination takes the main one first.
    if (this.opts.openPreempt) this.preempt = await this.opts.openPreempt()
    await this.out.write(enc.postcopyResume())
    await this.rp.waitRecovery('ack', 0, this.opts.timeoutMs)
    if (this.rp.resumeAck !== 1) throw new SnapError('SNAP_RETURN_PATH', `the destination answered POSTCOPY_RESUME with RESUME_ACK(${this.rp.resumeAck}), not 1`)
  }

  private check(): void {
    if (this.failure) throw this.failure
  }

  private fail(err: unknown): void {
    this.failure ??= err
    this.endWindow?.()
    this.wakeProducer?.()
    this.rp.wake()
  }

  /**
   * Every cluster in file order, skipping what was requested; after a request, the push goes on
   * with the requested page's cluster and the next one (the pages that follow it) first. Then
   * every page not sent yet as a ZERO record (zero pages, and pages QEMU never sent, which the
   * destination also had as zeroes): every page must be placed before the END, else a thread that
   * touches one after it faults with nobody to answer, and if that thread holds QEMU's big lock
   * (the main loop reading guest memory), the destination's end of postcopy waits for the lock
   * forever and the VM hangs. QEMU's own source sends every page for the same reason.
   */
  private async pushEverything(): Promise<void> {
    await this.pushWorkingSet()
    // Decoded into the reader's reused buffers, given back once pushed: a fresh megabyte per
    // cluster kept the garbage collector busy on the thread that answers requests (README, "Lazy restore").
    for await (const cluster of this.reader.clusters({ reuse: 'manual' })) {
      this.check()
      await this.pushFollowed()
      if (!this.pushed[cluster.seq]) await this.pushCluster(cluster)
      cluster.release?.()
    }
    await this.pushZeroPages()
    await this.flushBackground()
    await this.pushHostPages()
  }

  /** Every target-page-backed page not sent yet, as ZERO records (a few bytes each). */
  private async pushZeroPages(): Promise<void> {
    for (const block of this.reader.blocks) {
      if (this.hostPages[block.id] > 1) continue // whole host pages: pushHostPages()
      const sent = this.sent[block.id]
      for (let p = 0; p < sent.length; p++) {
        if (sent[p] !== 0) continue
        sent[p] = 1
        this.pages++
        this.bg ??= this.backgroundSection()
        this.bg.zero(block.id, p)
        if (this.bg.size() >= CHUNK_BYTES) await this.flushBackground()
      }
      this.check()
    }
  }

  /** --record-window: no push for `ms` (answers to requests go out meanwhile), or until a failure. */
  private async recordWindow(ms: number): Promise<void> {
    this.opts.log?.(`postcopy: recording: only requested pages for ${ms} ms, then the rest`)
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms)
      this.endWindow = () => (clearTimeout(timer), resolve())
    })
    this.endWindow = null
    this.check()
  }

  /**
   * The recorded working set, in its order (whole host pages; zero pages as ZERO records, since
   * the guest is known to touch them), ahead of everything else but the answers to requests; at
   * most `maxPages` pages (the precopy before the device state), going on from where it stopped.
   */
  private async pushWorkingSet(maxPages = Infinity): Promise<void> {
    const ws = this.opts.workingSet
    if (!ws) return
    const before = this.prefetchedPages
    for (; this.wsNext < ws.length && this.prefetchedPages - before < maxPages; this.wsNext += 2) {
      const i = this.wsNext
      const b = ws[i]
      const n = this.hostPages[b]
      const first = Math.floor(ws[i + 1] / n) * n
      if (this.sent[b][first] !== 0) continue
      this.bg ??= this.newSection(CHUNK_BYTES + n * (this.pageSize + RECORD_OVERHEAD) + (32 << 10))
      this.addHostPage(this.bg, b, first, n)
      this.prefetchedPages += n
      this.bytesPushed += n * this.pageSize
      if (this.bg.size() >= CHUNK_BYTES) await this.flushBackground()
      this.check()
    }
    await this.flushBackground()
  }

  /**
   * The clusters requests asked for, and the one after each, if not pushed yet: read on the pool,
   * so that the requests that come meanwhile are answered at once, and decoded here into one
   * reused buffer (lz4-napi's decoding on the pool cost 0.4-0.6 CPU-s more per 1-2 GiB restore
   * with ~500-1,100 requests: fresh memory for every frame).
   */
  private async pushFollowed(): Promise<void> {
    while (this.follow.length > 0) {
      const seq = this.follow.shift()!
      for (const s of [seq, seq + 1]) {
        if (s >= this.pushed.length || this.pushed[s]) continue
        this.followScratch ??= this.reader.clusterScratch()
        const cluster = await this.reader.readCluster(s, this.followScratch)
        if (!this.pushed[s]) await this.pushCluster(cluster)
      }
      this.check()
    }
  }

  /** Every live page of a cluster not sent yet, into background sections. */
  private async pushCluster(cluster: DecodedCluster): Promise<void> {
    this.pushed[cluster.seq] = 1
    const list = cluster.pages
    for (const slot of this.runs.liveSlots(cluster.seq, list, { offset: cluster.offset })) {
      if (this.pushSlot(cluster.raw, slot, list[2 * slot], list[2 * slot + 1])) await this.flushBackground()
    }
    // Pages stored once for several places (container.md "Shared slots"), from the same decoded cluster.
    const shared = this.runs.sharedPages(cluster.seq, list, { offset: cluster.offset })
    for (let i = 0; i < shared.length; i += 3) {
      if (this.pushSlot(cluster.raw, shared[i], shared[i + 1], shared[i + 2])) await this.flushBackground()
    }
  }

  /** Page (b, p) from slot `slot` of decoded pages into the background section, unless sent already: whether that section is full. */
  private pushSlot(raw: Buffer, slot: number, b: number, p: number): boolean {
    if (this.hostPages[b] > 1 || this.sent[b][p] !== 0) return false // hugepages: whole host pages, pushHostPages()
    this.sent[b][p] = 1
    this.bg ??= this.backgroundSection()
    this.bg.page(b, p, raw.subarray(slot * this.pageSize, (slot + 1) * this.pageSize))
    this.pages++
    this.bytesPushed += this.pageSize
    return this.bg.size() >= CHUNK_BYTES
  }

  private async flushBackground(): Promise<void> {
    const section = this.bg
    this.bg = null
    if (section && section.count > 0) await this.enqueue(section.finish())
  }

  /** A written background buffer: back to bgWriter if it is one of its chunks. */
  private recycle(buf: Buffer): void {
    if (this.bgWriter.owns(buf)) this.bgWriter.recycle(buf)
  }

  /**
   * Hugepage-backed blocks: the destination places a host page once all its target pages have
   * come, one after the other, so each host page goes in one section, whole (zero pages as ZERO
   * records), and never split by an urgent answer; host pages that are all zero too (see
   * pushEverything()).
   */
  private async pushHostPages(): Promise<void> {
    for (const block of this.reader.blocks) {
      const n = this.hostPages[block.id]
      if (n === 1) continue
      for (let first = 0; first < block.size / this.pageSize; first += n) {
        this.check()
        if (this.sent[block.id][first] !== 0) continue
        const section = this.newSection(n * (this.pageSize + RECORD_OVERHEAD) + 64)
        this.addHostPage(section, block.id, first, n)
        this.bytesPushed += n * this.pageSize
        await this.enqueue(section.finish())
      }
    }
  }

  /** Every target page of one host page, in order; marks them sent. */
  private addHostPage(section: SectionBuilder, b: number, first: number, n: number): void {
    for (let p = first; p < first + n; p++) {
      this.sent[b][p] = 1
      this.pages++
      this.addPage(section, b, p)
    }
  }

  private newSection(capacity: number): SectionBuilder {
    return new SectionBuilder(this.ramId, this.reader.blocks, capacity, false)
  }

  /** A background section in one of bgWriter's recycled chunks. */
  private backgroundSection(): SectionBuilder {
    return new SectionBuilder(this.ramId, this.reader.blocks, BG_CAPACITY, false, this.bgWriter)
  }

  private onMessage(m: RpMessage): void {
    if (m.type === 'req') {
      const t0 = performance.now()
      this.requests++
      this.requestChain = this.requestChain.then(() => this.serve(m.block, m.offset, m.length, t0)).catch((err) => this.fail(err))
    } else if (m.type === 'shut' && m.status !== 0) {
      this.fail(new SnapError('SNAP_RETURN_PATH', `the destination QEMU reported an error (SHUT ${m.status}); see its log`))
    }
  }

  private blockOf(name: string | null): number {
    if (name === null) {
      if (this.lastBlock < 0) throw new SnapError('SNAP_BAD_REQUEST', 'QEMU sent REQ_PAGES before naming a RAM block')
      return this.lastBlock
    }
    const b = this.byName.get(name)
    if (b === undefined) throw new SnapError('SNAP_BAD_REQUEST', `QEMU asked for a page of RAM block "${name}", which the image does not have`)
    return (this.lastBlock = b)
  }

  private async serve(blockName: string | null, offset: number, length: number, t0: number): Promise<void> {
    if (this.failure) return
    const b = this.blockOf(blockName)
    const block = this.reader.blocks[b]
    if (offset % this.pageSize !== 0 || length <= 0 || length % this.pageSize !== 0 || offset + length > block.size) {
      throw new SnapError('SNAP_BAD_REQUEST', `QEMU asked for bytes ${offset}+${length} of RAM block "${block.name}" (${block.size} bytes): not whole pages inside the block`)
    }
    // A bad request is an error even after the end is queued; a good one then needs no answer.
    if (this.ended) return
    this.note(b, offset, length)
    // Whole host pages (QEMU asks for them whole; a hugepage is sent whole or not at all).
    const n = this.hostPages[b]
    const from = Math.floor(offset / this.pageSize / n) * n
    const to = Math.ceil((offset + length) / this.pageSize / n) * n
    // On the preempt channel, bare page records (no section); else a PART section on main.
    const section = new SectionBuilder(this.ramId, this.reader.blocks, (to - from) * (this.pageSize + RECORD_OVERHEAD) + 64, this.preempt !== null)
    this.requestedPages += length / this.pageSize
    for (let p = from; p < to; p += n) {
      if (this.sent[b][p] === 0) this.addHostPage(section, b, p, n)
    }
    this.pagesServedOnRequest += section.count
    const l = this.locator.where(b, from)
    if (l !== LOC_NEVER_SENT && l !== LOC_ZERO && !this.pushed[l - 1]) this.follow.push(l - 1)
    if (section.count === 0) {
      this.requestsAlreadySent++
      return
    }
    if (this.preempt) {
      await this.preempt.write(section.finish(), () => this.latencies.push(performance.now() - t0))
      return
    }
    this.urgent.push({ buf: section.finish(), t0 })
    this.pump()
  }

  /** A page's record: its data, checked against its cluster's page list, or ZERO. */
  private addPage(section: SectionBuilder, b: number, p: number): void {
    const l = this.locator.where(b, p)
    if (l === LOC_NEVER_SENT || l === LOC_ZERO) {
      section.zero(b, p) // zero, or never sent by QEMU: the destination had zeroes there too
      return
    }
    section.page(b, p, this.fetch.page(l - 1, this.locator.slotOf(b, p), b, p, this.locator.isShared(b, p)))
  }

  /** Queue background bytes; waits while two chunks are already waiting. */
  private async enqueue(buf: Buffer): Promise<void> {
    this.background.push(buf)
    this.pump()
    // The producer waits, not the writer: answers to requests go out meanwhile.
    await this.throttle(buf.length)
    while (this.background.length > 2 && !this.failure) {
      await new Promise<void>((resolve) => (this.wakeProducer = resolve))
    }
    this.check()
  }

  /** Writes urgent answers first, then background sections, one at a time. */
  private pump(): void {
    if (this.pumping) return
    this.pumping = (async () => {
      try {
        for (;;) {
          const u = this.urgent.shift()
          if (u) {
            await this.out.write(u.buf, () => this.latencies.push(performance.now() - u.t0))
            continue
          }
          const bg = this.background.shift()
          if (!bg) break
          this.wakeProducer?.()
          await this.out.write(bg, () => this.recycle(bg))
        }
      } catch (err) {
        this.fail(err)
      } finally {
        this.pumping = null
        this.wakeProducer?.()
      }
    })()
  }

  private pushedAt = { t0: 0, bytes: 0 }

  /** With pushRate: waits until the background bytes so far fit the rate. */
  private async throttle(bytes: number): Promise<void> {
    const rate = this.opts.pushRate
    if (!rate) return
    if (this.pushedAt.t0 === 0) this.pushedAt.t0 = performance.now()
    this.pushedAt.bytes += bytes
    const wait = this.pushedAt.t0 + (this.pushedAt.bytes / rate) * 1000 - performance.now()
    if (wait > 0) await new Promise((r) => setTimeout(r, wait))
  }

  private async drain(): Promise<void> {
    while (this.pumping) await this.pumping
    this.check()
    // EOF is out: whether the destination took it all is the return path's word (SHUT 0).
    this.preempt?.lastQueued?.()
    this.out.lastQueued?.()
    await this.preempt?.flush()
    await this.out.flush()
  }
}

/**
 * Raises the nice value by `by` (lowering a priority needs no privilege); a refusal is only
 * logged. On Linux it is this thread's: the one that reads, checks and queues every page (under
 * exec: the pipe's writer threads keep theirs).
 */
function yieldCpu(by: number, log?: (msg: string) => void): void {
  try {
    setPriority(Math.min(19, getPriority() + by))
  } catch (e) {
    log?.(`the push keeps its CPU priority: ${(e as Error).message}`)
  }
}

/**
 * A destination QEMU answers the first PING before it looks at POSTCOPY_ADVISE (and fails it
 * without the capability): a return path that closes with nothing on it never had a QEMU.
 */
function noDestination(): SnapError {
  return new SnapError('SNAP_NO_DESTINATION', 'the return path (standard input) closed before anything came on it: no destination QEMU is there; run load --postcopy from the destination (migrate_incoming "exec:snapctl load --postcopy IMAGE")')
}
