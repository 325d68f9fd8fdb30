// Reading a pipe on a thread of its own, for create's standard input. Read on the main thread,
// the pipe is only drained while the main thread is free: whenever it is busy parsing, copying
// and checksumming pages, QEMU's side of the 64 KiB pipe fills up and QEMU waits, so a save
// takes the sum of both sides' work instead of the larger. Here a worker reads back to back
// with blocking reads and hands over buffers of at least 256 KiB, up to 4 MiB ahead.
import { closeSync, constants, fstatSync, openSync, writeSync } from 'node:fs'
import { Worker } from 'node:worker_threads'
import { fromSystemError } from '../errors.js'

const AHEAD = 4 << 20

type FromWorker = { buffer: ArrayBuffer; length: number } | { eof: true } | { error: string; code?: string }

export async function* readThreaded(fd: number, what: string): AsyncGenerator<Buffer> {
  // [0]: bytes handed over and not yet consumed; [1]: set to stop the worker
  const queued = new Int32Array(new SharedArrayBuffer(8))
  // stdout/stderr: true keeps Node from opening the parent's stdio streams for the worker.
  const worker = new Worker(new URL('./input-thread-worker.js', import.meta.url), {
    workerData: { fd, queued: queued.buffer, limit: AHEAD },
    execArgv: [],
    stdout: true,
    stderr: true,
  })
  const inbox: FromWorker[] = []
  let wake: (() => void) | null = null
  const deliver = (m: FromWorker): void => {
    inbox.push(m)
    wake?.()
  }
  worker.on('message', deliver)
  worker.on('error', (e) => deliver({ error: e.message }))
  try {
    for (;;) {
      while (inbox.length === 0) await new Promise<void>((r) => (wake = r))
      wake = null
      const m = inbox.shift()!
      if ('eof' in m) return
      if ('error' in m) throw fromSystemError(Object.assign(new Error(m.error), { code: m.code }), what)
      yield Buffer.from(m.buffer, 0, m.length)
      Atomics.sub(queued, 0, m.length)
      Atomics.notify(queued, 0)
    }
  } finally {
    worker.removeAllListeners()
    worker.unref()
    Atomics.store(queued, 1, 1)
    Atomics.notify(queued, 0)
    wakeReader(fd)
    void worker.terminate()
  }
}

/**
 * A worker blocked in read() on a pipe that stays open and silent cannot be terminated, and the
 * process cannot exit while it runs: an exec: create that refuses a stream (a return path QEMU
 * then waits on, holding the pipe open) hung instead of exiting, and so did QEMU's migration.
 * One byte written into the same pipe (Linux opens a pipe's write end through /proc) wakes the
 * read; the worker then sees the stop flag and ends. Not a pipe (a file, a socket): nothing to do
 * or nothing that can be done here.
 */
function wakeReader(fd: number): void {
  let w = -1
  try {
    if (!fstatSync(fd).isFIFO()) return
    w = openSync(`/proc/self/fd/${fd}`, constants.O_WRONLY | constants.O_NONBLOCK)
    writeSync(w, Buffer.alloc(1))
  } catch {
    // a full pipe (EAGAIN) has data to read anyway; no /proc: the old behaviour
  } finally {
    if (w >= 0) closeSync(w)
  }
}
