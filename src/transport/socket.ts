// The unix socket transport (QEMU's `unix:` migration URI), with multifd channels: one main
// connection plus N channel connections to the same path. Both directions:
//
//   create --listen: QEMU connects. Connections are told apart by their first 4 bytes
//     ("QEVM" main, 11 22 33 44 multifd; qemu-multifd-peer.md §1.3), read concurrently.
//   load --connect:  we connect to a QEMU in `migrate-incoming unix:PATH` and write the
//     first bytes in the same breath as connect(): the destination peeks synchronously in its
//     main loop, and a silent connection freezes it (qemu-multifd-peer.md §1.4).
//
// Every wait on the peer is bounded (SNAP_CHANNEL_TIMEOUT): `timeoutMs`, else
// $SNAPCTL_CHANNEL_TIMEOUT_MS, else 60 s; 0 waits for ever.

import { chmod, lstat, rename, unlink } from 'node:fs/promises'
import { createConnection, createServer, type Server, type Socket } from 'node:net'
import { SnapError, fromSystemError } from '../errors.js'
import { looksMultifd } from '../multifd/packet.js'
import type { StreamSink } from './types.js'

export const DEFAULT_CHANNEL_TIMEOUT_MS = 60_000

export function channelTimeout(ms?: number): number {
  if (ms !== undefined) return ms
  const env = Number(process.env.SNAPCTL_CHANNEL_TIMEOUT_MS)
  return Number.isFinite(env) && env >= 0 && process.env.SNAPCTL_CHANNEL_TIMEOUT_MS !== '' ? env : DEFAULT_CHANNEL_TIMEOUT_MS
}

/** `unix:PATH` or a bare PATH → PATH. */
export function unixPath(uri: string): string {
  const path = uri.startsWith('unix:') ? uri.slice(5) : uri
  if (path === '' || /^[a-z]+:/.test(uri.replace(/^unix:/, 'x'))) {
    if (path === '' || !uri.startsWith('unix:')) throw new SnapError('SNAP_USAGE', `${uri}: give a unix socket as unix:PATH`)
  }
  return path
}

/** Races `p` against the timeout; on expiry runs `onTimeout` and rejects with SNAP_CHANNEL_TIMEOUT. */
export async function within<T>(p: Promise<T>, ms: number, what: string, onTimeout?: () => void): Promise<T> {
  if (ms <= 0) return p
  let timer: NodeJS.Timeout | undefined
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      onTimeout?.()
      reject(new SnapError('SNAP_CHANNEL_TIMEOUT', `${what} within ${ms} ms (--timeout, $SNAPCTL_CHANNEL_TIMEOUT_MS)`))
    }, ms)
  })
  try {
    return await Promise.race([p, expired])
  } finally {
    clearTimeout(timer)
  }
}

export interface IncomingConnection {
  kind: 'main' | 'multifd'
  socket: Socket
  /** the connection's bytes, from the first (the ones read to classify it included) */
  chunks: AsyncIterable<Buffer>
}

/** A listening unix socket (mode 0600: guest RAM passes through it). */
export class MigrationListener {
  private constructor(
    readonly path: string,
    private readonly server: Server,
  ) {}

  static async listen(uri: string, onConnection: (socket: Socket) => void): Promise<MigrationListener> {
    const path = unixPath(uri)
    // A socket file left by an earlier run would make listen() fail: remove it, but nothing else.
    const st = await lstat(path).catch(() => null)
    if (st && !st.isSocket()) throw new SnapError('SNAP_BAD_PATH', `--listen ${path} exists and is not a socket`)
    if (st) await unlink(path).catch(() => {})
    const server = createServer({ pauseOnConnect: false }, onConnection)
    // bind() makes the file and listen() follows as a second system call: a peer that connects
    // between the two, as soon as the file is there, is refused (seen under load: 2 runs in 45).
    // So the socket listens, and is made private, under a name of its own, then takes its name.
    const tmp = `${path}.${process.pid}.tmp`
    await unlink(tmp).catch(() => {})
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) => reject(fromSystemError(e, `listening on ${path}`)))
      server.listen({ path: tmp, backlog: 256 }, () => resolve())
    })
    server.on('error', () => {})
    try {
      await chmod(tmp, 0o600).catch(() => {})
      await rename(tmp, path)
    } catch (e) {
      server.close()
      await unlink(tmp).catch(() => {})
      throw fromSystemError(e, `listening on ${path}`)
    }
    return new MigrationListener(path, server)
  }

  /** Stop accepting and remove the socket file (open connections stay open). */
  async close(): Promise<void> {
    await new Promise<void>((r) => this.server.close(() => r()))
    await unlink(this.path).catch(() => {})
  }
}

/** Reads a new connection's first bytes (within the timeout) and says what it is. */
export async function classify(socket: Socket, timeoutMs: number): Promise<IncomingConnection> {
  const it = socket[Symbol.asyncIterator]() as AsyncIterator<Buffer>
  const head: Buffer[] = []
  let got = 0
  while (got < 4) {
    const r = await within(it.next(), timeoutMs, 'a connection sent no migration header', () => socket.destroy())
    if (r.done) throw new SnapError('SNAP_MULTIFD_TRUNCATED', `a connection closed after ${got} bytes, before it said what it is`)
    head.push(r.value)
    got += r.value.length
  }
  const first = Buffer.concat(head)
  let kind: 'main' | 'multifd'
  if (first.readUInt32BE(0) === 0x5145564d) kind = 'main'
  else if (looksMultifd(first)) kind = 'multifd'
  else {
    socket.destroy()
    throw new SnapError('SNAP_MULTIFD_CORRUPT', `a connection began with ${first.subarray(0, 4).toString('hex')}: neither a migration stream (QEVM) nor a multifd channel (11223344)`)
  }
  async function* chunks(): AsyncGenerator<Buffer> {
    yield first
    for (;;) {
      const r = await it.next()
      if (r.done) return
      yield r.value
    }
  }
  return { kind, socket, chunks: chunks() }
}

/** A connected socket as a StreamSink: writes in order, waits while the kernel and Node's queue hold too much. */
export class SocketSink implements StreamSink {
  bytes = 0
  private failure: SnapError | null = null
  private closed = false

  constructor(
    readonly socket: Socket,
    readonly what: string,
    private readonly stallMs: number,
  ) {
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (this.ending && (e.code === 'EPIPE' || e.code === 'ECONNRESET')) return // lastQueued(): the end
      this.failure ??= peerError(e, what)
    })
    socket.on('close', () => (this.closed = true))
  }

  private ending = false

  /**
   * A destination that read the last bytes may close at once, before Node has run the last write's
   * callback: a flush then found bytes "waiting" on a closed socket (or wrote into it and got EPIPE)
   * and failed a restore that QEMU completed (postcopy-socket, once under load).
   */
  lastQueued(): void {
    this.ending = true
  }

  private check(): void {
    if (this.failure) throw this.failure
    if (this.closed && !this.ending) throw new SnapError('SNAP_IO', `${this.what}: the destination closed the connection (did the destination QEMU fail?)`)
  }

  async write(chunk: Buffer, onWritten?: () => void): Promise<void> {
    this.check()
    const n = chunk.length
    const ok = this.socket.write(chunk, () => {
      this.bytes += n
      onWritten?.()
    })
    if (!ok) await this.drained()
  }

  private waiting: Promise<void> | null = null

  /** One wait for 'drain' shared by every writer that found the buffer full. */
  private drained(): Promise<void> {
    this.waiting ??= this.waitDrain().finally(() => (this.waiting = null))
    return this.waiting
  }

  private waitDrain(): Promise<void> {
    return within(
      new Promise<void>((resolve, reject) => {
        const done = (): void => {
          this.socket.off('drain', done)
          this.socket.off('close', done)
          this.socket.off('error', done)
          if (this.failure) reject(this.failure)
          else if (this.closed) reject(new SnapError('SNAP_IO', `${this.what}: the destination closed the connection (did the destination QEMU fail?)`))
          else resolve()
        }
        this.socket.on('drain', done)
        this.socket.on('close', done)
        this.socket.on('error', done)
      }),
      this.stallMs,
      `${this.what}: the destination read nothing`,
      () => this.socket.destroy(),
    )
  }

  /**
   * Wait until everything written is in the kernel. A connection the destination has closed is
   * an error only while bytes are still waiting: once the last ones (the stream's EOF) are out,
   * QEMU completes and closes its channels, which is how a restore ends, and a flush that came
   * a moment later used to fail such a restore with SNAP_IO. Whether the stream was taken whole
   * is the return path's word (SHUT 0), not the socket's.
   */
  async flush(): Promise<void> {
    if (this.failure) throw this.failure
    if (this.socket.writableLength === 0) return
    if (this.ending && (this.closed || this.socket.destroyed || this.socket.writableEnded)) return
    this.check()
    // 'drain' comes only after a write that filled the buffer: wait for an empty write's callback.
    const out = new Promise<void>((r) => this.socket.write(Buffer.alloc(0), () => r()))
    await within(out, this.stallMs, `${this.what}: the destination read nothing`, () => this.socket.destroy())
    if (this.failure) throw this.failure
    if (this.socket.writableLength > 0) this.check()
  }

  /** flush, then half-close: the destination sees the end of the stream. */
  async close(): Promise<void> {
    await this.flush()
    this.ending = true
    if (this.closed || this.socket.destroyed) return // the destination took everything and closed first
    await new Promise<void>((r) => this.socket.end(() => r()))
  }

  abort(): void {
    this.socket.destroy()
  }
}

function peerError(e: NodeJS.ErrnoException, what: string): SnapError {
  if (e.code === 'EPIPE' || e.code === 'ECONNRESET') return new SnapError('SNAP_IO', `${what}: the destination closed the connection (did the destination QEMU fail?)`, { cause: e })
  return fromSystemError(e, what)
}

/** Connects to a unix socket and writes `first` at once; rejects with SNAP_CHANNEL_TIMEOUT or the system error. */
export async function connectWith(path: string, first: Buffer, what: string, timeoutMs: number): Promise<Socket> {
  const socket = createConnection({ path })
  socket.setNoDelay?.(true)
  socket.write(first)
  await within(
    new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve())
      socket.once('error', (e) => reject(fromSystemError(e, `connecting ${what} to ${path}`)))
    }),
    timeoutMs,
    `${what} could not connect to ${path}`,
    () => socket.destroy(),
  )
  return socket
}
