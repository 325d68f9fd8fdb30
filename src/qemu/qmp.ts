// A small QMP client: JSON lines over a unix socket (QEMU's `-qmp unix:PATH,server=on,wait=off`).
// Every command carries an id, so several may be in flight and replies are matched by id rather
// than by order. `snapctl save` and `restore` drive QEMU with it; tools/ and the tests use the
// same one (tools/qmp.ts re-exports it).
//
// Failures are SnapErrors: QEMU refused a command (QmpError, SNAP_QMP, with QEMU's error class),
// no answer in time or no QMP server at the path (SNAP_QMP), QEMU closed the connection or
// exited (SNAP_QEMU_GONE).
import { EventEmitter } from 'node:events'
import { connect as netConnect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { SnapError } from '../errors.js'

export interface QmpEvent {
  event: string
  data?: Record<string, unknown>
  timestamp?: { seconds: number; microseconds: number }
}

/** QEMU answered a command with {"error": ...}; `qmpClass` is QEMU's class, e.g. GenericError. */
export class QmpError extends SnapError {
  readonly qmpClass: string
  readonly desc: string
  readonly command: string
  constructor(command: string, qmpClass: string, desc: string) {
    super('SNAP_QMP', `QEMU refused ${command}: ${desc}`, { command, qmpClass })
    this.name = 'QmpError'
    this.command = command
    this.qmpClass = qmpClass
    this.desc = desc
  }
}

interface Pending {
  command: string
  resolve: (v: unknown) => void
  reject: (e: Error) => void
  timer: NodeJS.Timeout
}

const DEFAULT_TIMEOUT_MS = 10_000

export class QmpClient extends EventEmitter {
  readonly greeting: Record<string, unknown>
  private readonly sock: Socket
  private readonly pending = new Map<number, Pending>()
  private readonly timeoutMs: number
  private nextId = 1
  private buf = ''
  private closedError: Error | null = null
  private readonly recent: QmpEvent[] = []

  /**
   * Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket, retrying for up to
   * waitForSocketMs (default timeoutMs) until QEMU has created it (QEMU may still be starting),
   * then reads the greeting and enters command mode.
   */
  static async connect(socketPath: string, opts: { timeoutMs?: number; waitForSocketMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS
    const started = Date.now()
    const deadline = started + Math.min(timeoutMs, opts.waitForSocketMs ?? timeoutMs)
    let lastErr: unknown
    for (;;) {
      try {
        const { sock, greeting, rest } = await openAndGreet(socketPath, Math.max(100, started + timeoutMs - Date.now()))
        const client = new QmpClient(sock, greeting, timeoutMs, rest)
        await client.execute('qmp_capabilities')
        return client
      } catch (err) {
        lastErr = err
        const code = (err as NodeJS.ErrnoException).code
        // ENOENT/ECONNREFUSED: the socket is not there or not listening yet.
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() >= deadline) break
        await sleep(20)
      }
    }
    const why = (lastErr as NodeJS.ErrnoException)?.code === 'ENOENT' ? 'no such socket' : (lastErr as Error)?.message ?? String(lastErr)
    throw new SnapError('SNAP_QMP', `cannot talk to QEMU's QMP socket ${socketPath} (after ${Date.now() - started} ms): ${why}`, { cause: lastErr })
  }

  private constructor(sock: Socket, greeting: Record<string, unknown>, timeoutMs: number, rest: string) {
    super()
    this.sock = sock
    this.greeting = greeting
    this.timeoutMs = timeoutMs
    this.buf = rest
    // Events with no listener must not throw ('error' is special in EventEmitter).
    this.on('error', () => {})
    sock.setEncoding('utf8')
    sock.resume()
    sock.on('data', (chunk: string) => this.onData(chunk))
    sock.on('error', (err) => this.fail(err))
    sock.on('close', () => this.fail(new SnapError('SNAP_QEMU_GONE', 'QMP connection closed (QEMU exited?)')))
    if (rest) queueMicrotask(() => this.onData(''))
  }

  /** Runs a QMP command; resolves with its `return` value. Rejects on QMP errors, timeouts and disconnects. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedError) return Promise.reject(gone(command, this.closedError))
    const id = this.nextId++
    const msg: Record<string, unknown> = { execute: command, id }
    if (args !== undefined) msg.arguments = args
    return new Promise<T>((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? this.timeoutMs
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new SnapError('SNAP_QMP', `QMP ${command}: no answer from QEMU within ${timeoutMs} ms`))
      }, timeoutMs)
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer })
      this.sock.write(JSON.stringify(msg) + '\n')
    })
  }

  /**
   * Resolves with the next event named `name` (or one already seen since the last call that
   * matched, so an event racing ahead of the wait is not lost), rejects after timeoutMs.
   */
  waitEvent(name: string, timeoutMs = this.timeoutMs, match: (e: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    const i = this.recent.findIndex((e) => e.event === name && match(e))
    if (i >= 0) return Promise.resolve(this.recent.splice(i, 1)[0]!)
    if (this.closedError) return Promise.reject(gone(`waiting for ${name}`, this.closedError))
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event !== name || !match(e)) return
        cleanup()
        const j = this.recent.indexOf(e)
        if (j >= 0) this.recent.splice(j, 1)
        resolve(e)
      }
      const onClose = (err: Error) => {
        cleanup()
        reject(gone(`waiting for ${name}`, err))
      }
      const timer = setTimeout(() => {
        cleanup()
        reject(new SnapError('SNAP_QMP', `QMP event ${name} not seen within ${timeoutMs} ms`))
      }, timeoutMs)
      const cleanup = () => {
        clearTimeout(timer)
        this.off('event', onEvent)
        this.off('closed', onClose)
      }
      this.on('event', onEvent)
      this.on('closed', onClose)
    })
  }

  /** Closes the connection; pending commands reject. */
  close(): void {
    this.fail(new SnapError('SNAP_QMP', 'QMP client closed'))
    this.sock.destroy()
  }

  get closed(): boolean {
    return this.closedError !== null
  }

  private onData(chunk: string): void {
    this.buf += chunk
    let nl: number
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim()
      this.buf = this.buf.slice(nl + 1)
      if (line) this.onLine(line)
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>
    try {
      msg = JSON.parse(line)
    } catch {
      this.emit('error', new Error(`QMP: unparsable line: ${line.slice(0, 200)}`))
      return
    }
    if (typeof msg.event === 'string') {
      const e = msg as unknown as QmpEvent
      // Keep a short history for waitEvent callers that start waiting after the fact.
      this.recent.push(e)
      if (this.recent.length > 256) this.recent.shift()
      this.emit('event', e)
      this.emit(e.event, e)
      return
    }
    const id = msg.id
    const p = typeof id === 'number' ? this.pending.get(id) : undefined
    if (!p) return // a reply to a command that timed out
    this.pending.delete(id as number)
    clearTimeout(p.timer)
    if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string }
      p.reject(new QmpError(p.command, err.class ?? 'Unknown', err.desc ?? JSON.stringify(err)))
    } else {
      p.resolve(msg.return)
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return
    this.closedError = err
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer)
      p.reject(gone(p.command, err))
      this.pending.delete(id)
    }
    this.emit('closed', err)
  }
}

/** A command or wait cut short by the end of the connection: keeps the reason's code. */
function gone(what: string, err: Error): SnapError {
  const code = err instanceof SnapError ? err.code : 'SNAP_QEMU_GONE'
  return new SnapError(code, `QMP ${what}: ${err.message}`, { cause: err })
}

/** Opens the socket and reads the greeting line; returns whatever followed it in the same chunk. */
function openAndGreet(path: string, timeoutMs: number): Promise<{ sock: Socket; greeting: Record<string, unknown>; rest: string }> {
  return new Promise((resolve, reject) => {
    const sock = netConnect(path)
    let buf = ''
    // One client at a time per QMP socket: a second one waits, greeted only when the first leaves.
    const timer = setTimeout(() => done(new Error(`no QMP greeting within ${timeoutMs} ms (is another client connected to this socket?)`)), timeoutMs)
    const done = (err: Error | null, greeting?: Record<string, unknown>, rest = '') => {
      clearTimeout(timer)
      sock.off('data', onData)
      sock.off('error', onError)
      sock.off('close', onClose)
      if (err) {
        sock.destroy()
        reject(err)
      } else {
        sock.pause()
        resolve({ sock, greeting: greeting!, rest })
      }
    }
    const onData = (chunk: Buffer) => {
      buf += chunk.toString('utf8')
      const nl = buf.indexOf('\n')
      if (nl < 0) return
      try {
        const greeting = JSON.parse(buf.slice(0, nl))
        if (!greeting || typeof greeting !== 'object' || !('QMP' in greeting)) throw new Error(`not a QMP greeting: ${buf.slice(0, nl)}`)
        done(null, greeting, buf.slice(nl + 1))
      } catch (err) {
        done(err as Error)
      }
    }
    const onError = (err: Error) => done(err)
    const onClose = () => done(new Error('socket closed before the QMP greeting'))
    sock.on('data', onData)
    sock.on('error', onError)
    sock.on('close', onClose)
  })
}
