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

export async function receiveOverSocket(writer: ImageWriter, opts: ListenOptions): Promise<ListenResult> {
  const timeoutMs = channelTimeout(opts.timeoutMs)
  const filter = new EpochFilter()
  const channels: Array<{ parser: MultifdChannelParser; init: MultifdInit | null }> = []
  const sockets = new Set<Socket>()
  let flushes = 0
  let blocks: RamBlockDecl[] | null = null
  let bytesIn = 0
  let failure: unknown = null
  let mainSeen = false
  const scratch = Buffer.alloc(4096)

  const sink: RamSink = {
    blocks: (list) => {
      writer.setBlocks(list)
      filter.setBlocks(list)
      blocks = list
      for (const c of channels) c.parser.setBlocks(list)
    },
    zero: (b, p) => filter.admit(b, p, flushes) && writer.putZero(b, p),
    page: (b, p, data) => filter.admit(b, p, flushes) && writer.putPage(b, p, data),
    xbzrle: (b, p, encoded) => {
      if (!filter.admit(b, p, flushes)) return
      writer.readPage(b, p, scratch)
      xbzrleDecode(encoded, scratch)
      writer.putPage(b, p, scratch)
    },
    multifdFlush: () => void flushes++,
  }
  const parser = new StreamParser(sink)

  let fail: (e: unknown) => void = () => {}
  const failed = new Promise<never>((_, reject) => (fail = (e) => reject(e)))
  failed.catch(() => {})
  const stop = (e: unknown): void => {
    if (failure) return
    failure = e
    for (const s of sockets) s.destroy()
    fail(e)
  }
  const onAbort = (): void => stop(new SnapError('SNAP_ABORTED', 'interrupted'))
  opts.signal?.addEventListener('abort', onAbort, { once: true })

  const pump = async (conn: IncomingConnection, push: (b: Buffer) => void): Promise<void> => {
    for await (const chunk of conn.chunks) {
      if (failure) return
      bytesIn += chunk.length
      push(chunk)
      if (writer.needsDrain()) await writer.drain()
      opts.onProgress?.(bytesIn)
    }
  }

  let mainDone!: () => void
  const mainEnded = new Promise<void>((r) => (mainDone = r))
  let firstConnection!: () => void
  const connected = new Promise<void>((r) => (firstConnection = r))
  let mainConnected!: () => void
  const mainArrived = new Promise<void>((r) => (mainConnected = r))
  const pumps: Array<Promise<void>> = []

  const serve = async (socket: Socket): Promise<void> => {
    const conn = await classify(socket, timeoutMs)
    if (conn.kind === 'main') {
      if (mainSeen) throw new SnapError('SNAP_MULTIFD_CORRUPT', 'a second main migration channel connected')
      mainSeen = true
      mainConnected()
      await pump(conn, (b) => parser.push(b))
      if (failure) return
      mainDone()
      return
    }
    const id = channels.length
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
      { what: `multifd channel ${id}` },
    )
    channels.push(entry)
    if (blocks) entry.parser.setBlocks(blocks)
    await pump(conn, (b) => entry.parser.push(b))
    if (failure) return
    entry.parser.end()
  }

  const listener = await MigrationListener.listen(opts.listen, (socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
    firstConnection()
    if (failure) return void socket.destroy()
    const p = serve(socket).catch((e) => stop(e))
    pumps.push(p)
  })
  try {
    opts.onListening?.(listener.path)
    throwIfAborted(opts.signal)
    // QEMU connects the main channel first, then the others; it writes nothing on the main
    // channel before all are connected, so a channel that never connects shows as silence.
    await Promise.race([within(connected, timeoutMs, 'no migration connected'), failed])
    await Promise.race([within(mainArrived, timeoutMs, 'the main migration channel did not connect'), failed])
    await Promise.race([mainEnded, failed])
    await listener.close()
    const device = parser.end()
    // QEMU closes every channel right after the main one: each must end cleanly, soon.
    await Promise.race([within(Promise.all(pumps), timeoutMs, 'a multifd channel did not close after the main channel ended'), failed])
    if (failure) throw failure
    if (flushes > 0) {
      if (channels.length === 0) throw new SnapError('SNAP_MULTIFD_TRUNCATED', `the main channel synchronised multifd channels ${flushes} times, but no channel connected`)
      for (const [i, c] of channels.entries()) {
        // Every FLUSH pairs with one SYNC on every channel: fewer means the channel stopped early.
        if (c.parser.counters.syncs !== flushes) {
          throw new SnapError('SNAP_MULTIFD_TRUNCATED', `multifd channel ${c.init?.id ?? i} sent ${c.parser.counters.syncs} SYNC packets for the main channel's ${flushes} flushes: it closed early`)
        }
      }
    }
    const counters: StreamCounters = { ...parser.counters }
    for (const c of channels) {
      counters.pages += c.parser.counters.pages
      counters.zeroPages += c.parser.counters.zeroPages
    }
    counters.resentPages += filter.resent + filter.stale
    counters.bytesIn = bytesIn
    return { device, counters, bytesIn, channels: channels.length, epochs: flushes }
  } catch (e) {
    stop(e)
    throw failure ?? e
  } finally {
    opts.signal?.removeEventListener('abort', onAbort)
    for (const s of sockets) s.destroy()
    await listener.close().catch(() => {})
  }
}
