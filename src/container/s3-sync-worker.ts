// The thread behind S3Source.readSync: does one pinned ranged GET per message into the shared
// buffer it was given ([state, length] then the bytes; state 1 = bytes, 2 = an error as JSON),
// then wakes the waiting thread with Atomics.notify.
import { parentPort, workerData } from 'node:worker_threads'
import { SnapError } from '../errors.js'
import { withRetry, type S3Location } from '../s3/client.js'
import { getRange } from './s3-source.js'

const { loc, etag } = workerData as { loc: S3Location; etag: string }

parentPort!.on('message', async (m: { start: number; end: number; sab: SharedArrayBuffer }) => {
  const state = new Int32Array(m.sab, 0, 2)
  const out = new Uint8Array(m.sab, 8)
  try {
    const got = await withRetry(loc, `reading ${loc.url} at ${m.start}`, () => getRange(loc, m.start, m.end, etag))
    if (got.etag !== undefined && got.etag !== etag) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url} was replaced while it was being read: its ETag changed`)
    if (got.buf.length > out.length) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url}: a ranged GET at ${m.start} returned ${got.buf.length} bytes`)
    out.set(got.buf)
    state[1] = got.buf.length
    state[0] = 1
  } catch (e) {
    const err = e instanceof SnapError ? e : new SnapError('SNAP_OBJECT_UNAVAILABLE', `${loc.url}: ${(e as Error)?.name ?? 'error'}`)
    const msg = Buffer.from(JSON.stringify({ code: err.code, message: err.message }))
    out.set(msg.subarray(0, out.length))
    state[1] = Math.min(msg.length, out.length)
    state[0] = 2
  }
  Atomics.notify(state, 0)
})
