// `snapctl load --postcopy`: lazy restore. The destination QEMU gets the block list and the
// device state at once and starts the VM; every page it touches and does not have yet, it asks
// for on the return path (our stdin), and we answer ahead of the background push of the rest.
//
//   stdout: QEVM, config, OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE, PING 2, ram START,
//           PACKAGED[LISTEN, device sections, PING 3, RUN],
//           ram PART sections (answers to requests jump the queue), ram END, EOF
//   stdin:  PONG, REQ_PAGES_ID / REQ_PAGES, SHUT
//
// No page is sent twice (a `sent` byte per page), and no page is sent before its cluster passed
// its checks. CONTINUE is never used: sections are built independently and may interleave.

import { ImageReader, type DecodedCluster } from './container/reader.js'
import { refuseWhileCreating } from './container/lock.js'
import { SnapError } from './errors.js'
import { refreshIndex } from './load.js'
import { openOutput, type Output } from './output.js'
import { ThreadedOutput } from './output-thread.js'
import { PageTable } from './page-table.js'
import { ZERO_CLUSTER, type PageRun } from './container/trailer.js'
import * as enc from './stream/encoder.js'
import { ReturnPathParser, type RpMessage } from './stream/return-path.js'

export interface PostcopyOptions {
  log?: (msg: string) => void
  /** bytes of background pages per write; small keeps request latency low */
  chunkBytes?: number
  /** how long to wait for the destination's answers during setup and at the end
   * (default: $SNAPCTL_RETURN_PATH_TIMEOUT_MS, else 30 s) */
  timeoutMs?: number
  /**
   * The destination's page size of each hugepage-backed RAM block, by block name (e.g.
   * { mem: 2 MiB }); others are 4 KiB. Postcopy places whole host pages: ADVISE, the block list
   * and every page sent must agree with the destination (reference §2.3, §2.8).
   */
  hostPageSizes?: Record<string, number>
}

function defaultTimeout(): number {
  const env = Number(process.env.SNAPCTL_RETURN_PATH_TIMEOUT_MS)
  return Number.isFinite(env) && env > 0 ? env : 30_000
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
  seconds: number
}

const PING_ADVISED = 2
const PING_PACKAGE = 3

export async function loadPostcopy(path: string, opts: PostcopyOptions = {}): Promise<PostcopyStats> {
  const started = performance.now()
  await refuseWhileCreating(path)
  const reader = await ImageReader.open(path)
  let out: Output | undefined
  let writer: ThreadedOutput | undefined
  let rp: ReturnPath | undefined
  try {
    // Pages are served from the trailer's CRC-checked page map, held in memory. The LevelDB
    // index is only checked (and rebuilt if need be) once every page is out, so that the time
    // to resume does not grow with the size of the map.
    const table = new PageTable(reader.blocks, reader.runs)
    const hostPages = hostPagesPerBlock(reader.blocks, opts.hostPageSizes ?? {})
    out = await openOutput(undefined)
    // A small queue on the writer thread: the pipe never runs dry while the main thread builds
    // sections, and an urgent page waits behind at most this much background data.
    writer = new ThreadedOutput(out.fd, out.what, () => false, undefined, 128 << 10)
    rp = new ReturnPath(process.stdin)
    const session = new Session(reader, table, writer, rp, opts, hostPages)
    return await session.run(started, () => refreshIndex(reader, opts.log))
  } finally {
    writer?.abort()
    rp?.stop()
    await reader.close()
  }
}

class Session {
  private readonly pageSize: number
  private readonly ramId: number
  private readonly sent: Uint8Array[]
  private readonly cache = new Map<number, DecodedCluster>()
  private readonly urgent: Array<{ buf: Buffer; t0: number }> = []
  private readonly background: Buffer[] = []
  private pumping: Promise<void> | null = null
  private wakeProducer: (() => void) | null = null
  private failure: unknown = null
  private requestChain: Promise<void> = Promise.resolve()
  private lastBlock = -1
  /** the END section and EOF are queued: no more page records */
  private ended = false
  private readonly latencies: number[] = []
  private requests = 0
  private requestedPages = 0
  private requestsAlreadySent = 0
  private bytesPushed = 0
  private pages = 0

  constructor(
    private readonly reader: ImageReader,
    private readonly table: PageTable,
    private readonly out: ThreadedOutput,
    private readonly rp: ReturnPath,
    private readonly opts: PostcopyOptions,
    /** per block: target pages per destination host page (1, or 512 for 2 MiB huge pages) */
    private readonly hostPages: number[],
  ) {
    this.pageSize = reader.header.pageSize
    this.ramId = reader.device.ramSectionId
    this.sent = reader.blocks.map((b) => new Uint8Array(b.size / b.pageSize))
  }

  async run(started: number, afterPush: () => Promise<void>): Promise<PostcopyStats> {
    const d = this.reader.device
    const timeout = this.opts.timeoutMs ?? defaultTimeout()
    const hostSizes = this.hostPages.map((n) => n * this.pageSize)
    // QEMU's ram_pagesize_summary(): the OR of every block's page size.
    const summary = hostSizes.reduce((a, b) => a | b, this.pageSize)
    await this.out.write(
      Buffer.concat([
        enc.fileHeader(d.config),
        enc.openReturnPath(),
        enc.ping(1),
        enc.postcopyAdvise(summary, this.pageSize),
        enc.ping(PING_ADVISED),
      ]),
    )
    // A destination without the postcopy-ram capability fails on ADVISE and closes the channel.
    await this.rp.waitPong(PING_ADVISED, timeout, (nothingCame) => nothingCame ? noDestination() :
      new SnapError('SNAP_POSTCOPY_SETUP', 'the destination refused POSTCOPY_ADVISE: turn the postcopy-ram capability on at the destination (migrate-set-capabilities) before migrate-incoming, and back its RAM with anonymous memory, tmpfs or hugetlbfs'),
    )
    const blob = Buffer.concat([enc.postcopyListen(), d.deviceSections, enc.ping(PING_PACKAGE), enc.postcopyRun()])
    await this.out.write(
      Buffer.concat([
        enc.ramStartSection({ sectionId: this.ramId, instanceId: d.ramInstanceId, version: d.ramVersion }, this.reader.blocks, hostSizes),
        // QEMU 10 goes ADVISE -> DISCARD on the first discard; LISTEN straight from ADVISE leaves
        // it in DISCARD and RUN is then refused. Discarding a page that never arrived is a no-op.
        enc.postcopyRamDiscard(this.reader.blocks[0].name, [[0, hostSizes[0]]]),
        enc.packaged(blob.length),
        blob,
      ]),
    )
    const deviceStateSeconds = (performance.now() - started) / 1000
    this.opts.log?.(`postcopy: device state sent after ${(deviceStateSeconds * 1000).toFixed(0)} ms; serving pages`)

    // Messages and a close that came while the device state was being written are replayed
    // here: a return path that closed or broke that early must fail the restore too.
    this.rp.listen(
      (m) => this.onMessage(m),
      (err) => this.fail(err ?? new SnapError('SNAP_RETURN_PATH', 'the return path closed before every page was sent: the destination QEMU stopped')),
    )
    await this.pushEverything()
    await this.requestChain
    this.check()
    this.rp.onClose = null
    // Every data page is out. A request from now on is for a zero page (never pushed) and
    // needs no answer: after EOF the destination stops trapping, and the page reads as zero.
    // Answering would write after EOF, into a pipe QEMU may already have closed.
    this.ended = true
    await this.enqueue(Buffer.concat([enc.sectionEndHeader(this.ramId), enc.eosFooter(this.ramId), Buffer.from([0])]))
    await this.drain()
    await afterPush()
    await this.rp.waitClosed(timeout, () => this.failure !== null)
    this.check()
    return {
      deviceStateSeconds,
      requests: this.requests,
      requestedPages: this.requestedPages,
      requestsAlreadySent: this.requestsAlreadySent,
      latencyMs: percentiles(this.latencies),
      bytesPushed: this.bytesPushed,
      bytesOut: this.out.bytes,
      ...imagePages(this.reader.runs),
      pagesSent: this.pages,
      seconds: (performance.now() - started) / 1000,
    }
  }

  private check(): void {
    if (this.failure) throw this.failure
  }

  private fail(err: unknown): void {
    this.failure ??= err
    this.wakeProducer?.()
    this.rp.wake()
  }

  /**
   * Every cluster in file order, skipping what was requested. Zero pages are not pushed: ADVISE
   * made the destination discard all its RAM, so a page it never receives reads as zero after
   * postcopy ends; one it touches before then it asks for, and gets a ZERO record (serve()).
   */
  private async pushEverything(): Promise<void> {
    const chunk = this.opts.chunkBytes ?? 256 << 10
    // A section's records add up to ~265 bytes each (word, block name) beyond the page data.
    const capacity = chunk + (32 << 10)
    let section = this.newSection(capacity)
    const flushIfFull = async (): Promise<void> => {
      if (section.size() < chunk) return
      await this.enqueue(section.finish())
      section = this.newSection(capacity)
    }
    for await (const cluster of this.reader.clusters()) {
      this.check()
      this.cache.set(cluster.seq, cluster)
      this.trimCache()
      const list = cluster.pages
      for (let slot = 0; slot < list.length / 2; slot++) {
        const b = list[2 * slot]
        const p = list[2 * slot + 1]
        if (this.hostPages[b] > 1) continue // pushed whole host pages at a time, below
        if (this.sent[b][p] !== 0 || this.table.where(b, p) !== cluster.seq || this.table.slotOf(b, p) !== slot) continue
        this.sent[b][p] = 1
        section.page(b, p, cluster.raw.subarray(slot * this.pageSize, (slot + 1) * this.pageSize))
        this.pages++
        this.bytesPushed += this.pageSize
        await flushIfFull()
      }
    }
    // Pages QEMU never sent: the destination must not be left waiting on them if it asks,
    // but pushing them is not needed (postcopy's end leaves untouched memory zero).
    if (section.count > 0) await this.enqueue(section.finish())
    await this.pushHostPages()
  }

  /**
   * Hugepage-backed blocks: the destination places a host page once all its target pages have
   * come, one after the other, so each host page goes in one section, whole (zero pages as ZERO
   * records), and never split by an urgent answer. Host pages that are all zero stay unsent.
   */
  private async pushHostPages(): Promise<void> {
    for (const block of this.table.blocks) {
      const n = this.hostPages[block.id]
      if (n === 1) continue
      for (let first = 0; first < block.size / this.pageSize; first += n) {
        this.check()
        if (this.sent[block.id][first] !== 0 || !this.hasData(block.id, first, n)) continue
        const section = this.newSection(n * (this.pageSize + 300) + 64)
        this.addHostPage(section, block.id, first, n)
        this.bytesPushed += n * this.pageSize
        await this.enqueue(section.finish())
      }
    }
  }

  private hasData(b: number, first: number, n: number): boolean {
    for (let p = first; p < first + n; p++) if (this.table.where(b, p) >= 0) return true
    return false
  }

  /** Every target page of one host page, in order; marks them sent. */
  private addHostPage(section: SectionBuilder, b: number, first: number, n: number): void {
    for (let p = first; p < first + n; p++) {
      this.sent[b][p] = 1
      this.pages++
      this.addPage(section, b, p)
    }
  }

  /** `capacity`: bytes the section is expected to need (it grows past that if it must). */
  private newSection(capacity: number): SectionBuilder {
    return new SectionBuilder(this.ramId, this.table.blocks, capacity)
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

  private async serve(blockName: string | null, offset: number, length: number, t0: number): Promise<void> {
    if (this.failure || this.ended) return
    const b = blockName === null ? this.lastBlock : this.table.blockId(blockName)
    if (b < 0) throw new SnapError('SNAP_BAD_REQUEST', 'QEMU sent REQ_PAGES before naming a RAM block')
    this.lastBlock = b
    const block = this.table.blocks[b]
    if (offset % this.pageSize !== 0 || length <= 0 || length % this.pageSize !== 0 || offset + length > block.size) {
      throw new SnapError('SNAP_BAD_REQUEST', `QEMU asked for bytes ${offset}+${length} of RAM block "${block.name}" (${block.size} bytes): not whole pages inside the block`)
    }
    // Whole host pages (QEMU asks for them whole; a hugepage is sent whole or not at all).
    const n = this.hostPages[b]
    const from = Math.floor(offset / this.pageSize / n) * n
    const to = Math.ceil((offset + length) / this.pageSize / n) * n
    const section = this.newSection((to - from) * (this.pageSize + 300) + 64)
    this.requestedPages += length / this.pageSize
    for (let p = from; p < to; p += n) {
      if (this.sent[b][p] !== 0) continue
      this.addHostPage(section, b, p, n)
    }
    if (section.count === 0) {
      this.requestsAlreadySent++
      return
    }
    this.urgent.push({ buf: section.finish(), t0 })
    this.pump()
  }

  /** A page's record: its data, checked against its cluster's page list, or ZERO. */
  private addPage(section: SectionBuilder, b: number, p: number): void {
    const where = this.table.where(b, p)
    if (where < 0) {
      section.zero(b, p) // zero, or never sent by QEMU: the destination had zeroes there too
      return
    }
    const cluster = this.getCluster(where)
    const slot = this.table.slotOf(b, p)
    if (slot >= cluster.pages.length / 2 || cluster.pages[2 * slot] !== b || cluster.pages[2 * slot + 1] !== p) {
      throw new SnapError('SNAP_CORRUPT', `the page map puts page ${p} of block ${b} in slot ${slot} of cluster ${where}, which holds another page`, { cluster: where })
    }
    section.page(b, p, cluster.raw.subarray(slot * this.pageSize, (slot + 1) * this.pageSize))
  }

  /** Read on this thread: a request must not queue behind bulk I/O in the thread pool. */
  private getCluster(seq: number): DecodedCluster {
    let c = this.cache.get(seq)
    if (c === undefined) {
      c = this.reader.readClusterSync(seq)
      this.cache.set(seq, c)
      this.trimCache()
    }
    return c
  }

  private trimCache(): void {
    while (this.cache.size > 16) this.cache.delete(this.cache.keys().next().value as number)
  }

  /** Queue background bytes; waits while two chunks are already waiting. */
  private async enqueue(buf: Buffer): Promise<void> {
    this.background.push(buf)
    this.pump()
    while (this.background.length > 2 && !this.failure) {
      await new Promise<void>((resolve) => (this.wakeProducer = resolve))
    }
    this.check()
  }

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
          await this.out.write(bg)
        }
      } catch (err) {
        this.fail(err)
      } finally {
        this.pumping = null
        this.wakeProducer?.()
      }
    })()
  }

  private async drain(): Promise<void> {
    while (this.pumping) await this.pumping
    this.check()
    await this.out.flush()
  }
}

/** One ram PART section: header, ZERO/PAGE records (block name on every record), EOS, footer. */
class SectionBuilder {
  private readonly rec: enc.PageRecordWriter
  count = 0
  /** page payload bytes so far (records add a few bytes each) */
  private bytes = 0
  constructor(
    private readonly ramId: number,
    blocks: PageTable['blocks'],
    capacity: number,
  ) {
    // One allocation of about the section's size (an urgent section is often a single page).
    this.rec = new enc.PageRecordWriter(blocks, { chunkSize: capacity })
    this.rec.raw(enc.sectionPartHeader(ramId))
  }

  size(): number {
    return this.bytes
  }

  zero(b: number, p: number): void {
    this.rec.forgetBlock()
    this.rec.zero(b, p)
    this.count++
    this.bytes += 16
  }

  page(b: number, p: number, data: Uint8Array): void {
    this.rec.forgetBlock()
    this.rec.page(b, p, data)
    this.count++
    this.bytes += data.length
  }

  finish(): Buffer {
    this.rec.raw(enc.eosFooter(this.ramId))
    const parts = this.rec.flush()
    return parts.length === 1 ? parts[0] : Buffer.concat(parts)
  }
}

/** Reads and parses the return path (our stdin) as messages arrive. */
class ReturnPath {
  private onMessage: ((m: RpMessage) => void) | null = null
  onClose: ((err: unknown) => void) | null = null
  /** messages that came before listen() */
  private early: RpMessage[] = []
  private readonly parser = new ReturnPathParser()
  private readonly pongs = new Set<number>()
  private closed = false
  private closeError: unknown = null
  /** bytes that came on the return path: none at all means no QEMU is at the other end */
  private bytesIn = 0
  private waiters: Array<() => void> = []

  constructor(private readonly input: NodeJS.ReadStream) {
    input.on('data', this.onData)
    input.on('end', this.onEnd)
    input.on('error', this.onError)
  }

  private readonly onData = (chunk: Buffer): void => {
    this.bytesIn += chunk.length
    let msgs: RpMessage[]
    try {
      msgs = this.parser.push(chunk)
    } catch (err) {
      this.close(err)
      return
    }
    for (const m of msgs) {
      if (m.type === 'pong') this.pongs.add(m.value)
      if (this.onMessage) this.onMessage(m)
      else this.early.push(m)
    }
    this.wake()
  }

  private readonly onEnd = (): void => {
    let err: unknown = null
    try {
      this.parser.end()
    } catch (e) {
      err = e
    }
    this.close(err)
  }

  private readonly onError = (err: Error): void => this.close(new SnapError('SNAP_RETURN_PATH', `reading the return path: ${err.message}`, { cause: err }))

  private close(err: unknown): void {
    if (this.closed) return
    this.closed = true
    this.closeError = err
    this.onClose?.(err)
    this.wake()
  }

  /** Take messages from now on (and those that came before); `onClose` at once if closed already. */
  listen(onMessage: (m: RpMessage) => void, onClose: (err: unknown) => void): void {
    this.onMessage = onMessage
    this.onClose = onClose
    const early = this.early
    this.early = []
    for (const m of early) onMessage(m)
    if (this.closed) onClose(this.closeError)
  }

  wake(): void {
    const w = this.waiters
    this.waiters = []
    for (const f of w) f()
  }

  private async waitFor(cond: () => boolean, ms: number): Promise<boolean> {
    const deadline = Date.now() + ms
    while (!cond()) {
      const left = deadline - Date.now()
      if (left <= 0) return false
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left)
        this.waiters.push(() => {
          clearTimeout(t)
          resolve()
        })
      })
    }
    return true
  }

  /** `onClosed(nothingCame)`: the error for a return path closed before the PONG. */
  async waitPong(value: number, ms: number, onClosed: (nothingCame: boolean) => SnapError): Promise<void> {
    const ok = await this.waitFor(() => this.pongs.has(value) || this.closed, ms)
    if (this.pongs.has(value)) return
    if (this.closed) throw this.closeError ?? onClosed(this.bytesIn === 0)
    if (!ok) throw new SnapError('SNAP_RETURN_PATH', `no answer from the destination on the return path within ${ms} ms (is this running under migrate-incoming "exec:..."?)`)
  }

  /** Wait for the destination to close the return path, or until `abandon()` holds. */
  async waitClosed(ms: number, abandon: () => boolean = () => false): Promise<void> {
    if (!(await this.waitFor(() => this.closed || abandon(), ms))) {
      throw new SnapError('SNAP_RETURN_PATH', `the destination did not close the return path within ${ms} ms after the stream ended`)
    }
    if (this.closeError) throw this.closeError
  }

  stop(): void {
    this.input.off('data', this.onData)
    this.input.off('end', this.onEnd)
    this.input.off('error', this.onError)
    this.input.pause()
    this.input.destroy()
  }
}

/** Target pages per host page for each block; SNAP_USAGE for a size that cannot be or a block the image lacks. */
function hostPagesPerBlock(blocks: ImageReader['blocks'], sizes: Record<string, number>): number[] {
  for (const name of Object.keys(sizes)) {
    if (!blocks.some((b) => b.name === name)) throw new SnapError('SNAP_USAGE', `--host-page-size names RAM block "${name}", which the image does not have (it has ${blocks.map((b) => b.name).join(', ')})`)
  }
  return blocks.map((b) => {
    const size = sizes[b.name] ?? b.pageSize
    if (size < b.pageSize || (size & (size - 1)) !== 0 || size > 1 << 30 || b.size % size !== 0) {
      throw new SnapError('SNAP_USAGE', `--host-page-size ${b.name}=${size}: must be a power of two from ${b.pageSize} bytes to 1 GiB that divides the block's ${b.size} bytes`)
    }
    return size / b.pageSize
  })
}

/**
 * A destination QEMU answers the first PING before it looks at POSTCOPY_ADVISE (and fails it
 * without the capability): a return path that closes with nothing on it never had a QEMU.
 */
function noDestination(): SnapError {
  return new SnapError('SNAP_NO_DESTINATION', 'the return path (standard input) closed before anything came on it: no destination QEMU is there; run load --postcopy from the destination (migrate_incoming "exec:snapctl load --postcopy IMAGE")')
}

function imagePages(runs: readonly PageRun[]): { pages: number; storedPages: number; zeroPages: number } {
  let storedPages = 0
  let zeroPages = 0
  for (const r of runs) {
    if (r.cluster === ZERO_CLUSTER) zeroPages += r.pageCount
    else storedPages += r.pageCount
  }
  return { pages: storedPages + zeroPages, storedPages, zeroPages }
}

function percentiles(values: number[]): { p50: number; p99: number; max: number } {
  if (values.length === 0) return { p50: 0, p99: 0, max: 0 }
  const v = Float64Array.from(values).sort()
  const at = (q: number): number => v[Math.min(v.length - 1, Math.floor(q * v.length))]
  const round = (x: number): number => Math.round(x * 1000) / 1000
  return { p50: round(at(0.5)), p99: round(at(0.99)), max: round(v[v.length - 1]) }
}
