// Reads of an object (issue 16): a ranged GET into one buffer, and a HEAD. Used by the fetch
// thread of an s3:// image (src/container/s3-sync-worker.ts): the thread that restores never
// loads the AWS SDK (about 0.3 s of CPU) for reading.
import { appendFileSync } from 'node:fs'
import { SnapError } from '../errors.js'
import { s3Client, withRetry, type S3Location } from './client.js'
import { sdk } from './sdk.js'

const { GetObjectCommand, HeadObjectCommand } = sdk

/** A GET's body as one Buffer, and what the object said about itself. */
export async function getRange(loc: S3Location, start: number, end: number, etag: string | undefined): Promise<{ buf: Buffer; etag?: string; total?: number }> {
  // Tests count what is fetched: one line per GET (O_APPEND, so processes can share the file).
  if (process.env.SNAPCTL_S3_GET_LOG) appendFileSync(process.env.SNAPCTL_S3_GET_LOG, `${start}-${end}\n`)
  const r = await s3Client().send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key, Range: `bytes=${start}-${end - 1}`, IfMatch: etag }))
  const buf = await collect(r.Body as unknown as AsyncIterable<Uint8Array>, end - start)
  const m = /\/(\d+)$/.exec(r.ContentRange ?? '')
  return { buf, etag: r.ETag, total: m ? Number(m[1]) : r.ContentLength }
}

/**
 * One GET of consecutive pieces of the object (`lens` bytes each, from `start`), each into a
 * buffer of its own (the fetch thread hands each block over, and caches it, by itself).
 */
export async function getPieces(loc: S3Location, start: number, lens: readonly number[], etag: string): Promise<{ bufs: Buffer[]; etag?: string }> {
  const end = start + lens.reduce((a, n) => a + n, 0)
  if (process.env.SNAPCTL_S3_GET_LOG) appendFileSync(process.env.SNAPCTL_S3_GET_LOG, `${start}-${end}\n`)
  const r = await s3Client().send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key, Range: `bytes=${start}-${end - 1}`, IfMatch: etag }))
  const bufs = lens.map((n) => Buffer.allocUnsafeSlow(n))
  let k = 0
  let at = 0
  for await (const chunk of r.Body as unknown as AsyncIterable<Uint8Array>) {
    for (let c = 0; c < chunk.length; ) {
      if (k === bufs.length) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url}: a ranged GET at ${start} returned more than ${end - start} bytes`, { offset: start })
      const n = Math.min(chunk.length - c, bufs[k].length - at)
      bufs[k].set(chunk.subarray(c, c + n), at)
      c += n
      at += n
      if (at === bufs[k].length) {
        k++
        at = 0
      }
    }
  }
  if (k !== bufs.length) throw new SnapError('SNAP_OBJECT_CHANGED', `${loc.url}: a ranged GET at ${start} returned fewer than ${end - start} bytes`, { offset: start })
  return { bufs, etag: r.ETag }
}

/** The object's ETag and size, from a HEAD (a 404 is told apart by a GET: a missing bucket or object). */
export async function headObject(loc: S3Location): Promise<{ etag: string; total: number }> {
  const head = await withRetry(loc, `reading ${loc.url}`, () => s3Client().send(new HeadObjectCommand({ Bucket: loc.bucket, Key: loc.key }))).catch(async (e: unknown) => {
    // A HEAD's 404 has no body to say whether the bucket or the object is missing: a GET does.
    if ((e as SnapError).code === 'SNAP_OBJECT_NOT_FOUND') await withRetry(loc, `reading ${loc.url}`, () => getRange(loc, 0, 1, undefined))
    throw e
  })
  if (!head.ETag || head.ContentLength === undefined) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${loc.url}: the store sent no ETag or size for the object`)
  return { etag: head.ETag, total: head.ContentLength }
}

/** The first `len` bytes, unpinned (they pin the ETag), with the object's ETag and size; an empty object is 0 bytes. */
export async function getFirst(loc: S3Location, len: number): Promise<{ buf: Buffer; etag: string; total: number }> {
  const first = await withRetry(loc, `reading ${loc.url}`, () => getRange(loc, 0, len, undefined)).catch((e) => {
    if ((e as SnapError).context?.status === 416) return { buf: Buffer.alloc(0), etag: '""', total: 0 } // an empty object
    throw e
  })
  if (!first.etag || first.total === undefined) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${loc.url}: the store sent no ETag or size with a ranged GET`)
  return { buf: first.buf, etag: first.etag, total: first.total }
}

/**
 * A GET's body into one buffer of the size asked for, copied once as it arrives (the SDK's
 * transformToByteArray concatenates the chunks, and Buffer.from copied that again: garbage
 * collection was the largest cost of a first restore). A longer body is kept whole, for the
 * caller's length check to refuse.
 */
async function collect(body: AsyncIterable<Uint8Array>, expect: number): Promise<Buffer> {
  let out = Buffer.allocUnsafe(expect)
  let n = 0
  for await (const chunk of body) {
    if (n + chunk.length > out.length) out = Buffer.concat([out.subarray(0, n)], Math.max(2 * out.length, n + chunk.length))
    out.set(chunk, n)
    n += chunk.length
  }
  return out.subarray(0, n)
}
