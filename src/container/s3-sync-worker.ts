// The thread that does every ranged GET of an S3Source (s3-source.ts), so that the thread that
// reads the image never blocks its own HTTP: a lazy restore's page request waits on this thread
// (Atomics.wait) while it fetches, and read-ahead goes on here meanwhile.
//
// In (parentPort): { op: 'init', data } first when no workerData was given; { op: 'head', id } or { op: 'first', id } (the first block, unpinned) find the
// object's ETag and size; { op: 'pin', etag } pins every later GET to it (If-Match) and opens
// the block cache; { op: 'get', id, start, end, block, lane } queues a range (block >= 0: a whole
// block, through the shared block cache when there is one); { op: 'urgent', id } moves a queued
// one to the front; { op: 'drop' } forgets everything queued (each answered as dropped).
// Lanes: 0 = a reader waits for it (started at once, beside whatever runs, never behind it);
// 1 = the blocks after a page request's; 2 = the working set's, in its order; 3 = ahead of a
// reader in file order. Lanes 1 to 3 run `parallel` at a time, a lower lane first, each in the
// order given; consecutive blocks of lanes 2 and 3 go up to GROUP at a time in one GET (runGroup).
// Out (the port given in workerData): { id, buf (transferred), etag?, total? } or { id, error }, then
// Atomics.add + notify on `signal[0]`, so a waiting thread wakes and takes it with
// receiveMessageOnPort.
import { parentPort, workerData, type MessagePort } from 'node:worker_threads'
import { SnapError } from '../errors.js'
import { withRetry, type S3Location } from '../s3/client.js'
import { getFirst, getPieces, getRange, headObject } from '../s3/get.js'
import { BlockCache } from './s3-cache.js'
import { BLOCK } from './s3-source.js'

export interface FetchJob {
  op: 'get'
  id: number
  start: number
  end: number
  /** the block number when [start, end) is a whole block (cached), else -1 */
  block: number
  lane: 0 | 1 | 2 | 3
}

export type FetchRequest = FetchJob | { op: 'init'; data: FetchWorkerData } | { op: 'head' | 'first'; id: number } | { op: 'pin'; etag: string; cache: { dir: string; object: string; max: number } | null } | { op: 'urgent'; id: number } | { op: 'drop' }

export type FetchReply = { id: number; buf: Buffer; etag?: string; total?: number } | { id: number; error: { code: SnapError['code']; message: string; context: Record<string, unknown> } | null }

export interface FetchWorkerData {
  loc: S3Location
  port: MessagePort
  signal: SharedArrayBuffer
  parallel: number
}


// Given as workerData, or by the first message (a thread started before the image was named: startFetchThread()).
let { loc, port, signal, parallel } = (workerData ?? {}) as FetchWorkerData
let seq = signal ? new Int32Array(signal) : new Int32Array(1)
let etag: string | undefined
let cache: BlockCache | null = null
const lanes: FetchJob[][] = [[], [], []]
let running = 0
/** blocks ahead of a reader in file order fetched by one GET, at most */
const GROUP = 8

function reply(m: FetchReply): void {
  if ('buf' in m) {
    // Transferred, not copied: a whole ArrayBuffer of its own (a pooled or larger one is copied first).
    const own = m.buf.byteOffset === 0 && m.buf.buffer.byteLength === m.buf.length ? m.buf : Buffer.from(m.buf)
    port.postMessage({ ...m, buf: own }, [own.buffer as ArrayBuffer])
  } else port.postMessage(m)
  Atomics.add(seq, 0, 1)
  Atomics.notify(seq, 0)
}

async function fetchRange(j: FetchJob): Promise<Buffer> {
  const got = await withRetry(loc, `reading ${loc.url} at ${j.start}`, () => getRange(loc, j.start, j.end, etag))
  if (got.etag !== undefined && got.etag !== etag) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url} was replaced while it was being read: its ETag changed`, { offset: j.start })
  if (got.buf.length !== j.end - j.start) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url}: a ranged GET at ${j.start} returned ${got.buf.length} bytes, not ${j.end - j.start}`, { offset: j.start })
  return got.buf
}

async function run(j: FetchJob | { op: 'head' | 'first'; id: number }): Promise<void> {
  try {
    if (j.op !== 'get') reply(j.op === 'head' ? { id: j.id, buf: Buffer.alloc(0), ...(await headObject(loc)) } : { id: j.id, ...(await getFirst(loc, BLOCK)) })
    else if (j.block >= 0 && cache) {
      reply({ id: j.id, buf: (await cache.obtain(j.block, j.end - j.start, () => fetchRange(j))).buf })
    } else reply({ id: j.id, buf: await fetchRange(j) })
  } catch (e) {
    failed(j.id, e)
  }
}

/**
 * Consecutive whole blocks of a working set or ahead of a reader in file order, in one GET: per request, the SDK
 * (signing, URL encoding, parsing) and the store spend as much CPU as on a 1 MiB body. Each
 * block is still claimed, cached and answered on its own: those cached or claimed by another
 * process meanwhile go the single-block way (obtain() waits for the other's file), and the rest
 * is fetched in runs of consecutive blocks. The cache's file operations are done on this thread
 * (no trip through the libuv pool, which the reading thread uses, for each).
 */
async function runGroup(jobs: FetchJob[]): Promise<void> {
  const mine: FetchJob[] = []
  for (const j of jobs) {
    const len = j.end - j.start
    const hit = cache ? cache.getSync(j.block, len) : null
    if (hit) reply({ id: j.id, buf: hit })
    else if (!cache || cache.claimSync(j.block)) {
      const again = cache?.getSync(j.block, len)
      if (again) {
        cache!.release(j.block)
        reply({ id: j.id, buf: again })
      } else mine.push(j)
    } else void run(j)
  }
  for (let k = 0; k < mine.length; ) {
    let n = 1
    while (k + n < mine.length && mine[k + n].block === mine[k + n - 1].block + 1) n++
    const piece = mine.slice(k, k + n)
    k += n
    try {
      const got = await withRetry(loc, `reading ${loc.url} at ${piece[0].start}`, () => getPieces(loc, piece[0].start, piece.map((j) => j.end - j.start), etag!))
      if (got.etag !== undefined && got.etag !== etag) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url} was replaced while it was being read: its ETag changed`, { offset: piece[0].start })
      // Written by the libuv pool (this thread goes on with the other GETs), then handed over.
      await Promise.all(piece.map(async (j, q) => {
        await cache?.put(j.block, got.bufs[q], true)
        reply({ id: j.id, buf: got.bufs[q] })
      }))
    } catch (e) {
      for (const j of piece) {
        cache?.release(j.block)
        failed(j.id, e)
      }
    }
  }
}

function failed(id: number, e: unknown): void {
  const err = e instanceof SnapError ? e : new SnapError('SNAP_OBJECT_UNAVAILABLE', `${loc.url}: ${(e as Error)?.name ?? 'error'}`)
  reply({ id, error: { code: err.code, message: err.message, context: { ...err.context, cause: undefined } } })
}

function pump(): void {
  while (running < parallel) {
    const j = lanes[0].shift() ?? lanes[1].shift() ?? lanes[2].shift()
    if (!j) return
    running++
    let work: Promise<void>
    if (j.lane >= 2 && j.block >= 0 && etag !== undefined) {
      const lane = lanes[j.lane - 1]
      const group = [j]
      while (group.length < GROUP && lane[0]?.block === group[group.length - 1].block + 1) group.push(lane.shift()!)
      work = runGroup(group)
    } else work = run(j)
    void work.finally(() => {
      running--
      pump()
    })
  }
}

let pumpSoon = false

parentPort!.on('message', (m: FetchRequest) => {
  if (m.op === 'init') {
    ;({ loc, port, signal, parallel } = m.data)
    seq = new Int32Array(signal)
  } else if (m.op === 'head' || m.op === 'first') void run(m)
  else if (m.op === 'pin') {
    etag = m.etag
    cache = m.cache ? new BlockCache(m.cache.dir, m.cache.object, m.etag, m.cache.max) : null
  } else if (m.op === 'get') {
    if (m.lane === 0) void run(m) // a reader waits: beside the read-ahead, never behind it
    else lanes[m.lane - 1].push(m)
    if (m.lane === 1) pump()
    else if (!pumpSoon) {
      // once the reader's whole batch of read-ahead is in (messages come in batches), so that it goes in groups
      pumpSoon = true
      setImmediate(() => {
        pumpSoon = false
        pump()
      })
    }
  } else if (m.op === 'urgent') {
    for (const lane of lanes) {
      const k = lane.findIndex((j) => j.id === m.id)
      if (k >= 0) void run(lane.splice(k, 1)[0])
    }
  } else {
    for (const lane of lanes) for (const j of lane.splice(0)) reply({ id: j.id, error: null })
  }
})
