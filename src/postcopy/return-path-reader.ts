// The return path of a lazy restore (QEMU's answers: PONG, REQ_PAGES, SHUT), read from any
// Readable the transport gives (our stdin under `exec:`, a socket), parsed as it arrives.
import type { Readable } from 'node:stream'
import { SnapError } from '../errors.js'
import { ReturnPathParser, type RpMessage } from '../stream/return-path.js'

/** Reads and parses the return path as messages arrive. */
export class ReturnPathReader {
  private onMessage: ((m: RpMessage) => void) | null = null
  onClose: ((err: unknown) => void) | null = null
  /** messages that came before listen() */
  private early: RpMessage[] = []
  private readonly parser = new ReturnPathParser()
  private readonly pongs = new Set<number>()
  /** postcopy recovery: the received bitmaps by block name, in the order they came */
  readonly bitmaps = new Map<string, Buffer>()
  /** postcopy recovery: the value of RESUME_ACK, once it came */
  resumeAck: number | null = null
  private closed = false
  private closeError: unknown = null
  /** bytes that came on the return path: none at all means no QEMU is at the other end */
  private bytesIn = 0
  /** QEMU said SHUT(0): its incoming side finished well, so a close after it is the normal end */
  shutOk = false
  private waiters: Array<() => void> = []

  constructor(private readonly input: Readable) {
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
      if (m.type === 'shut' && m.status === 0) this.shutOk = true
      if (m.type === 'resume-ack') this.resumeAck ??= m.value
      if (m.type === 'recv-bitmap') {
        // Only asked for during recovery, once per block (checked against the image by the session).
        if (this.bitmaps.has(m.block)) {
          this.close(new SnapError('SNAP_RECV_BITMAP', `the destination sent the received bitmap of RAM block "${m.block}" twice`, { block: m.block }))
          return
        }
        this.bitmaps.set(m.block, m.bitmap)
        continue
      }
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

  /**
   * Postcopy recovery: waits until `count` received bitmaps, then RESUME_ACK (`ack`), came.
   * The error for a close or a timeout says which wait it was.
   */
  async waitRecovery(stage: 'bitmaps' | 'ack', count: number, ms: number): Promise<void> {
    const done = (): boolean => (stage === 'ack' ? this.resumeAck !== null : this.bitmaps.size >= count)
    const ok = await this.waitFor(() => done() || this.closed, ms)
    if (done()) return
    const what = stage === 'ack' ? 'RESUME_ACK after POSTCOPY_RESUME' : `the received bitmaps of ${count} RAM blocks (${this.bitmaps.size} came)`
    if (this.closed) {
      throw this.closeError ?? new SnapError('SNAP_RETURN_PATH', `the destination closed the return path while snapctl waited for ${what}: it refused the recovery (see its log; query-migrate tells its state)`)
    }
    if (!ok) throw new SnapError('SNAP_RETURN_PATH', `no ${what} from the destination within ${ms} ms`)
  }

  /** Wait for the destination to close the return path, or until `abandon()` holds. */
  async waitClosed(ms: number, abandon: () => boolean = () => false): Promise<void> {
    if (!(await this.waitFor(() => this.closed || abandon(), ms))) {
      throw new SnapError('SNAP_RETURN_PATH', `the destination did not close the return path within ${ms} ms after the stream ended`)
    }
    if (this.closeError) throw this.closeError
    // A destination that finished says SHUT(0) before it closes (reference §5.3); a close
    // without it, however late this process noticed it, is a destination that stopped.
    if (this.closed && !this.shutOk) {
      throw new SnapError('SNAP_RETURN_PATH', 'the return path closed without QEMU\'s SHUT: the destination stopped before the restore finished')
    }
  }

  stop(): void {
    this.input.off('data', this.onData)
    this.input.off('end', this.onEnd)
    this.input.off('error', this.onError)
    this.input.pause()
    this.input.destroy()
  }
}
