// `create --listen unix:PATH`: QEMU's migration over a unix socket, with or without multifd
// channels, into one image (qemu-multifd-peer.md §1.2, §4.4, §7.1).
//
//   main connection ---> StreamParser ----------------------+
//   channel 0 ---------> MultifdChannelParser --(epoch)--> EpochFilter --> ImageWriter
//   channel k ---------> MultifdChannelParser --(epoch)--+
//
// Every connection is read at once (QEMU writes nothing on the main channel until all its
// channels are connected, and stops writing to one we do not read). Pages are put in the
// order they arrive, from whichever connection: JavaScript runs one callback at a time, so the
// channels never contend for the writer's open cluster, and sealed clusters are compressed on
// the libuv pool while the connections go on. Re-sent pages are resolved by epoch rather than
// by arrival: a page carries its channel's SYNC count (main-channel records the number of
// MULTIFD_FLUSHes before them), and a copy from an earlier epoch that arrives after one from
// a later epoch is dropped. Within an epoch QEMU sends a page once.

import type { Socket } from 'node:net'
import { throwIfAborted } from '../abort.js'
import type { ImageWriter } from '../container/writer.js'
import { SnapError } from '../errors.js'
import { StreamParser } from '../stream/parser.js'
import { xbzrleDecode } from '../stream/xbzrle.js'
import { MigrationListener, channelTimeout, classify, within, type IncomingConnection } from '../transport/socket.js'
import type { DeviceState, RamBlockDecl, RamSink, StreamCounters } from '../types.js'
import { MultifdChannelParser } from './channel-parser.js'
import type { MultifdInit } from './packet.js'

export interface ListenOptions {
  /** `unix:PATH` */
  listen: string
  /** bound on each wait for the peer (ms; 0: none): see src/transport/socket.ts */
  timeoutMs?: number
  onProgress?: (bytesIn: number) => void
  /** told once the socket is listening (QEMU may be pointed at it from then on) */
  onListening?: (path: string) => void
  signal?: AbortSignal
}

export interface ListenResult {
  device: DeviceState
  counters: StreamCounters
  bytesIn: number
  /** multifd channels QEMU opened (0: a plain `unix:` migration) */
  channels: number
  /** SYNC epochs (the main channel's MULTIFD_FLUSH count) */
  epochs: number
}

/** Per page of every block: 1 + the epoch of the copy the writer holds (0: none yet). */
class EpochFilter {
  private epochs: Uint32Array[] = []
  /** copies dropped because a later epoch's copy had come first */
  stale = 0
  resent = 0

  setBlocks(list: RamBlockDecl[]): void {
    this.epochs = list.map((b) => new Uint32Array(b.size / 4096))
  }

  /** Whether a copy of epoch `epoch` is newer than (or as new as) what is held; records it if so. */
  admit(block: number, page: number, epoch: number): boolean {
    const e = this.epochs[block]
    if (e === undefined || !(page >= 0 && page < e.length)) return true // the writer reports it
    const held = e[page]
    if (held > epoch + 1) {
      this.stale++
      return false
    }
    if (held !== 0) this.resent++
    e[page] = epoch + 1
    return true
  }
}

/** A deferred promise: `done` settles it from outside. */
function signal(): { promise: Promise<void>; done: () => void } {
  let done!: () => void
  const promise = new Promise<void>((r) => (done = r))
  return { promise, done }
}

export async function receiveOverSocket(writer: ImageWriter, opts: ListenOptions): Promise<ListenResult> {
  return new Receiver(writer, opts).run()
}

/** One `create --listen`: the connections, their parsers, and the rules that tie them together. */
class Receiver {
  private readonly timeoutMs: number
  private readonly filter = new EpochFilter()
  private readonly channels: Array<{ parser: MultifdChannelParser; init: MultifdInit | null }> = []
  private readonly sockets = new Set<Socket>()
  private readonly pumps: Array<Promise<void>> = []
  private readonly parser: StreamParser
  private readonly scratch = Buffer.alloc(4096)
  private flushes = 0
  private blocks: RamBlockDecl[] | null = null
  private bytesIn = 0
  private failure: unknown = null
  private mainSeen = false
  private readonly connected = signal()
  private readonly mainArrived = signal()
  private readonly mainEnded = signal()
  private reject: (e: unknown) => void = () => {}
  /** rejects with the first failure of any connection */
  private readonly failed = new Promise<never>((_, reject) => (this.reject = reject))

  constructor(
    private readonly writer: ImageWriter,
    private readonly opts: ListenOptions,
  ) {
    this.timeoutMs = channelTimeout(opts.timeoutMs)
    this.failed.catch(() => {})
    this.parser = new StreamParser(this.mainSink())
  }

  /** The main channel's pages: epoch = the MULTIFD_FLUSHes seen before them. */
  private mainSink(): RamSink {
    const { writer, filter } = this
    return {
      blocks: (list) => {
        writer.setBlocks(list)
        filter.setBlocks(list)
        this.blocks = list
        for (const c of this.channels) c.parser.setBlocks(list)
      },
      zero: (b, p) => filter.admit(b, p, this.flushes) && writer.putZero(b, p),
      page: (b, p, data) => filter.admit(b, p, this.flushes) && writer.putPage(b, p, data),
      xbzrle: (b, p, encoded) => {
        if (!filter.admit(b, p, this.flushes)) return
        writer.readPage(b, p, this.scratch)
        xbzrleDecode(encoded, this.scratch)
        writer.putPage(b, p, this.scratch)
      },
      multifdFlush: () => void this.flushes++,
    }
  }

  private stop(e: unknown): void {
    if (this.failure) return
    this.failure = e
    for (const s of this.sockets) s.destroy()
    this.reject(e)
  }

  private race<T>(p: Promise<T>, what?: string): Promise<T> {
    return Promise.race([what === undefined ? p : within(p, this.timeoutMs, what), this.failed])
  }

  async run(): Promise<ListenResult> {
    const onAbort = (): void => this.stop(new SnapError('SNAP_ABORTED', 'interrupted'))
    this.opts.signal?.addEventListener('abort', onAbort, { once: true })
    const listener = await MigrationListener.listen(this.opts.listen, (socket) => this.accept(socket))
    try {
      this.opts.onListening?.(listener.path)
      throwIfAborted(this.opts.signal)
      // QEMU connects the main channel first, then the others; it writes nothing on the main
      // channel before all are connected, so a channel that never connects shows as silence.
      await this.race(this.connected.promise, 'no migration connected')
      await this.race(this.mainArrived.promise, 'the main migration channel did not connect')
      await this.race(this.mainEnded.promise)
      await listener.close()
      const device = this.parser.end()
      // QEMU closes every channel right after the main one: each must end cleanly, soon.
      await this.race(Promise.all(this.pumps), 'a multifd channel did not close after the main channel ended')
      if (this.failure) throw this.failure
      this.checkSyncs()
      return { device, counters: this.counters(), bytesIn: this.bytesIn, channels: this.channels.length, epochs: this.flushes }
    } catch (e) {
      this.stop(e)
      throw this.failure ?? e
    } finally {
      this.opts.signal?.removeEventListener('abort', onAbort)
      for (const s of this.sockets) s.destroy()
      await listener.close().catch(() => {})
    }
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket)
    socket.on('error', () => {})
    this.connected.done()
    if (this.failure) return void socket.destroy()
    this.pumps.push(this.serve(socket).catch((e) => this.stop(e)))
  }

  private async serve(socket: Socket): Promise<void> {
    const conn = await classify(socket, this.timeoutMs)
    if (conn.kind !== 'main') return this.serveChannel(conn)
    if (this.mainSeen) throw new SnapError('SNAP_MULTIFD_CORRUPT', 'a second main migration channel connected')
    this.mainSeen = true
    this.mainArrived.done()
    await this.pump(conn, (b) => this.parser.push(b))
    if (!this.failure) this.mainEnded.done()
  }

  private async serveChannel(conn: IncomingConnection): Promise<void> {
    const { filter, writer, channels } = this
    const entry: (typeof channels)[number] = { parser: null as unknown as MultifdChannelParser, init: null }
    entry.parser = new MultifdChannelParser(
      {
        init: (init) => {
          if (channels.some((c) => c.init && c.init.id === init.id)) throw new SnapError('SNAP_MULTIFD_CORRUPT', `two multifd channels with id ${init.id}`)
          const other = channels.find((c) => c.init)?.init
          if (other && !other.uuid.equals(init.uuid)) {
            throw new SnapError('SNAP_MULTIFD_UUID', `multifd channel ${init.id} carries VM uuid ${init.uuid.toString('hex')}, channel ${other.id} ${other.uuid.toString('hex')}`)
          }
          entry.init = init
        },
        page: (b, p, data, epoch) => filter.admit(b, p, epoch) && writer.putPage(b, p, data),
        zero: (b, p, epoch) => filter.admit(b, p, epoch) && writer.putZero(b, p),
        sync: () => {},
      },
      { what: `multifd channel ${channels.length}` },
    )
    channels.push(entry)
    if (this.blocks) entry.parser.setBlocks(this.blocks)
    await this.pump(conn, (b) => entry.parser.push(b))
    if (!this.failure) entry.parser.end()
  }

  private async pump(conn: IncomingConnection, push: (b: Buffer) => void): Promise<void> {
    for await (const chunk of conn.chunks) {
      if (this.failure) return
      this.bytesIn += chunk.length
      push(chunk)
      if (this.writer.needsDrain()) await this.writer.drain()
      this.opts.onProgress?.(this.bytesIn)
    }
  }

  /** Every FLUSH pairs with one SYNC on every channel: fewer means the channel stopped early. */
  private checkSyncs(): void {
    if (this.flushes === 0) return
    if (this.channels.length === 0) throw new SnapError('SNAP_MULTIFD_TRUNCATED', `the main channel synchronised multifd channels ${this.flushes} times, but no channel connected`)
    for (const [i, c] of this.channels.entries()) {
      if (c.parser.counters.syncs !== this.flushes) {
        throw new SnapError('SNAP_MULTIFD_TRUNCATED', `multifd channel ${c.init?.id ?? i} sent ${c.parser.counters.syncs} SYNC packets for the main channel's ${this.flushes} flushes: it closed early`)
      }
    }
  }

  private counters(): StreamCounters {
    const counters: StreamCounters = { ...this.parser.counters }
    for (const c of this.channels) {
      counters.pages += c.parser.counters.pages
      counters.zeroPages += c.parser.counters.zeroPages
    }
    counters.resentPages += this.filter.resent + this.filter.stale
    counters.bytesIn = this.bytesIn
    return counters
  }
}
