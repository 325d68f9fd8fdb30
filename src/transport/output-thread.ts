// A pipe writer on its own thread, for `load`'s stream. With writes issued from the main
// thread, every gap between one write finishing and the next being issued (the main thread was
// busy checking and decoding a cluster) leaves QEMU's side of the pipe empty; QEMU then waits,
// and the restore takes the sum of both sides' work instead of the larger. Here a worker writes
// queued chunks back to back with blocking writes, while the main thread builds the next ones.
//
// Chunks the caller says it owns whole (`transferable`) are transferred, not copied, and handed
// back after they are written (for reuse); any other chunk is copied into the message.
// writeVector: segments of buffers in shared memory, written in place with writev (the pages of
// a decoded cluster between their record headers), so load never copies a page (write-segments.ts).

import { Worker } from 'node:worker_threads'
import { SnapError, fromSystemError } from '../errors.js'
import type { StreamSink } from './types.js'
import { nativeWriteSegments } from './write-segments.js'

/** Queued bytes beyond which write() waits: two 4 MiB chunks in the pipe's queue are plenty. */
const QUEUE_LIMIT = 12 << 20

type FromWorker = { written: number; buffer?: ArrayBuffer; length: number } | { error: string; code?: string }

export class ThreadedOutput implements StreamSink {
  bytes = 0
  private queued = 0
  private failure: SnapError | null = null
  private waiters: Array<() => void> = []
  private readonly worker: Worker
  /** per chunk posted, in order: what to call once the worker has written it */
  private readonly onWritten: Array<(() => void) | undefined> = []

  constructor(
    fd: number,
    readonly what: string,
    /** whether the chunk's whole ArrayBuffer may be handed to the writer thread */
    private readonly transferable: (chunk: Buffer) => boolean = () => false,
    /** gets back each transferred chunk once written */
    private readonly returned?: (chunk: Buffer) => void,
    /** queued bytes beyond which write() waits */
    private readonly queueLimit = QUEUE_LIMIT,
  ) {
    // stdout/stderr: true, or Node opens the parent's process.stdout to pipe the worker's into
    // it, which turns fd 1 non-blocking under us (measured: 10,000 EAGAINs in a 1 GiB restore).
    this.worker = new Worker(new URL('./output-thread-worker.js', import.meta.url), { workerData: { fd }, stdout: true, stderr: true, execArgv: [] })
    this.worker.on('message', (m: FromWorker) => this.onMessage(m))
    this.worker.on('error', (e) => this.fail(fromSystemError(e, this.what)))
  }

  private onMessage(m: FromWorker): void {
    if ('error' in m) {
      this.fail(
        m.code === 'EPIPE'
          ? new SnapError('SNAP_IO', `${this.what}: the reader closed the pipe (did the destination QEMU fail?)`)
          : fromSystemError(Object.assign(new Error(m.error), { code: m.code }), this.what),
      )
      return
    }
    this.queued -= m.length
    this.bytes += m.written
    this.onWritten.shift()?.()
    if (m.buffer) this.returned?.(Buffer.from(m.buffer, 0, m.buffer.byteLength))
    this.wake()
  }

  private fail(e: SnapError): void {
    this.failure ??= e
    this.wake()
  }

  private wake(): void {
    const w = this.waiters
    this.waiters = []
    for (const f of w) f()
  }

  /** Queues `chunk`; waits while more than the queue limit is queued. `onWritten` once it is out. */
  async write(chunk: Buffer, onWritten?: () => void): Promise<void> {
    if (this.failure) throw this.failure
    this.queued += chunk.length
    this.onWritten.push(onWritten)
    if (this.transferable(chunk)) {
      const ab = chunk.buffer as ArrayBuffer
      this.worker.postMessage({ buffer: ab, length: chunk.length }, [ab])
    } else {
      this.worker.postMessage({ buffer: chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length), length: chunk.length, copy: true })
    }
    while (this.queued > this.queueLimit && !this.failure) await new Promise<void>((r) => this.waiters.push(r))
    if (this.failure) throw this.failure
  }

  /** Whether writeVector can take `buf`: memory the writer thread shares, and the addon built. */
  canWriteVector(buf: Uint8Array): boolean {
    return buf.buffer instanceof SharedArrayBuffer && nativeWriteSegments() !== null
  }

  /**
   * Queues the segments (index into bufs, offset, length triples) of `bufs` (each passing
   * canWriteVector), `length` bytes in all, to be written in order without a copy: leave the
   * bytes alone until `onWritten`. Waits as write() does.
   */
  async writeVector(bufs: Uint8Array[], segs: Int32Array, length: number, onWritten?: () => void): Promise<void> {
    if (this.failure) throw this.failure
    this.queued += length
    this.onWritten.push(onWritten)
    this.worker.postMessage({ bufs, segs, length }, [segs.buffer as ArrayBuffer])
    while (this.queued > this.queueLimit && !this.failure) await new Promise<void>((r) => this.waiters.push(r))
    if (this.failure) throw this.failure
  }

  /** Waits until everything queued is written; throws the writer's error if it had one. */
  async flush(): Promise<void> {
    while (this.queued > 0 && !this.failure) await new Promise<void>((r) => this.waiters.push(r))
    if (this.failure) throw this.failure
  }

  /** flush(), then stop the writer thread. */
  async close(): Promise<void> {
    try {
      await this.flush()
    } finally {
      this.abort()
    }
  }

  /**
   * Stops the writer thread at once (also on error paths). Not awaited: a thread blocked writing
   * into a pipe nobody reads would never finish terminating; unref'd, it cannot keep the
   * process alive either.
   */
  abort(): void {
    this.worker.removeAllListeners()
    this.worker.on('error', () => {})
    this.worker.unref()
    void this.worker.terminate()
  }
}
