// The thread behind ThreadedOutput (src/transport/output-thread.ts): writes each chunk it is sent to the
// fd with blocking writes, in order, and reports back (handing transferred buffers back). A vector
// (views of shared buffers and their segments) is written with writev, nothing copied.
import { writeSync } from 'node:fs'
import { parentPort, workerData } from 'node:worker_threads'
import { nativeWriteSegments } from './write-segments.js'

const fd: number = workerData.fd
const pause = new Int32Array(new SharedArrayBuffer(4))

type Message = { buffer: ArrayBuffer; length: number; copy?: boolean } | { bufs: Uint8Array[]; segs: Int32Array; length: number }

parentPort!.on('message', (m: Message) => {
  if ('segs' in m) {
    try {
      const written = nativeWriteSegments()!(fd, m.bufs, m.segs)
      parentPort!.postMessage({ written, length: m.length })
    } catch (e) {
      const err = e as NodeJS.ErrnoException
      parentPort!.postMessage({ error: err.message, code: err.code })
    }
    return
  }
  const buf = Buffer.from(m.buffer, 0, m.length)
  let off = 0
  try {
    while (off < buf.length) {
      try {
        off += writeSync(fd, buf, off, buf.length - off)
      } catch (e) {
        // A pipe someone switched to non-blocking mode: wait a moment for room.
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e
        Atomics.wait(pause, 0, 0, 1)
      }
    }
  } catch (e) {
    const err = e as NodeJS.ErrnoException
    parentPort!.postMessage({ error: err.message, code: err.code })
    return
  }
  if (m.copy) parentPort!.postMessage({ written: off, length: m.length })
  else parentPort!.postMessage({ written: off, length: m.length, buffer: m.buffer }, [m.buffer])
})
