// The thread behind readThreaded (src/transport/input-thread.ts): blocking reads of the input fd into
// 1 MiB buffers, each handed to the main thread (transferred) once it holds 256 KiB or the
// input ended. `queued` (shared) counts bytes handed over and not yet consumed; past the limit
// this thread waits, so memory stays bounded.
import { readSync } from 'node:fs'
import { parentPort, workerData } from 'node:worker_threads'

const fd: number = workerData.fd
// [0]: bytes queued; [1]: 1 once the main thread wants no more (see readThreaded's finally)
const queued = new Int32Array(workerData.queued as SharedArrayBuffer)
const stopped = (): boolean => Atomics.load(queued, 1) !== 0
const LIMIT: number = workerData.limit
const CHUNK = 1 << 20
const HAND_OVER = 256 << 10
const pause = new Int32Array(new SharedArrayBuffer(4))

for (let eof = false; !eof && !stopped(); ) {
  for (let q = Atomics.load(queued, 0); q > LIMIT && !stopped(); q = Atomics.load(queued, 0)) Atomics.wait(queued, 0, q, 1000)
  const buf = Buffer.allocUnsafeSlow(CHUNK)
  let n = 0
  try {
    while (n < HAND_OVER) {
      let r: number
      try {
        r = readSync(fd, buf, n, CHUNK - n, null)
      } catch (e) {
        // an input someone switched to non-blocking mode: wait a moment for data
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e
        Atomics.wait(pause, 0, 0, 1)
        continue
      }
      if (r === 0) {
        eof = true
        break
      }
      n += r
      if (stopped()) break
    }
  } catch (e) {
    const err = e as NodeJS.ErrnoException
    parentPort!.postMessage({ error: err.message, code: err.code })
    break
  }
  if (stopped()) break
  if (n > 0) {
    Atomics.add(queued, 0, n)
    parentPort!.postMessage({ buffer: buf.buffer, length: n }, [buf.buffer])
  }
  if (eof) parentPort!.postMessage({ eof: true })
}
