// `create s3://BUCKET/KEY`: the image goes up by multipart upload while it is written
// (format-spec/container.md, "Writing an image"; README, "Images in object storage").
//
// The writer writes the image to a local spool file exactly as it writes a local partial file
// (ClusterFile: the file is also where XBZRLE reads clusters back, and compaction rewrites it);
// this uploader sends finished parts of the spool as the data clusters behind the header grow
// (ClusterFile.onWritten). Parts 2.. are 8 MiB (16 MiB after 1000 parts, and so on: 10,000 parts
// reach terabytes), at most PARALLEL in flight, read back from the page cache. Part 1 (the header
// block and the first clusters, 8 MiB, over S3's 5 MiB minimum) waits for the header, written
// last; the tail (the last clusters, trailer, footer) is the last part, which may be small. Then
// CompleteMultipartUpload: the object appears only now, whole. Any failure, abort or signal
// aborts the upload (AbortMultipartUpload), so no object and no stored parts are left; only a
// process killed with SIGKILL leaves its parts, invisible as an object (a bucket's lifecycle rule
// AbortIncompleteMultipartUpload removes them).
//
// Why a spool and not memory: the first part must be held until the end, compaction may rewrite
// the image, and XBZRLE pages need earlier clusters: the writer already does all of that on a
// file, and the spool keeps its changes to one seam (ImageSink).
import type { CompletedPart } from '@aws-sdk/client-s3'
import { randomBytes } from 'node:crypto'
import { mkdir, open, rm, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { SnapError, fromSystemError } from '../errors.js'
import { parseS3Url, s3Client, s3Error, withRetry, type S3Location } from '../s3/client.js'
import { sdk } from '../s3/sdk.js'
import { s3IndexPath } from './s3-source.js'
import type { ImageSink } from './writer.js'

const { AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, HeadObjectCommand, UploadPartCommand } = sdk

export const FIRST_PART = 8 << 20
const PARALLEL = 4

/** Part n's size (n from 2): 8 MiB, doubling every 1000 parts. */
function partSize(n: number): number {
  return FIRST_PART * 2 ** Math.floor((n - 2) / 1000)
}

export interface S3UploadOptions {
  force?: boolean
  /** the directory of the spool file (default $TMPDIR) */
  spoolDir?: string
  /** where the page index of the image is built (default: the read cache's, S3Source) */
  cacheDir?: string
}

/** SNAP_EXISTS for an existing object unless forced (save checks this before it touches the VM). */
export async function refuseExisting(url: string, force: boolean): Promise<S3Location> {
  const loc = parseS3Url(url)
  if (force) return loc
  const exists = await withRetry(loc, `checking ${url}`, () => s3Client().send(new HeadObjectCommand({ Bucket: loc.bucket, Key: loc.key })).then(() => true)).catch((e) => {
    // (a missing bucket is a 404 too: CreateMultipartUpload then names it)
    if ((e as SnapError).code === 'SNAP_OBJECT_NOT_FOUND') return false
    throw e
  })
  if (exists) throw new SnapError('SNAP_EXISTS', `${url} exists (use --force to replace it)`)
  return loc
}

export class S3Upload implements ImageSink {
  spool: string
  readonly indexDir: string
  /** how far the spool is final */
  private end = 0
  private uploadId: Promise<string> | null = null
  /** the next part's number and where it starts */
  private next = 2
  private nextStart = FIRST_PART
  private readonly parts: CompletedPart[] = []
  private fh: FileHandle | null = null
  /** part buffers, reused: fresh 8 MiB buffers cost page faults and garbage collection */
  private readonly buffers: Buffer[] = []
  private readonly running = new Set<Promise<void>>()
  private failure: SnapError | null = null
  private aborted = false
  /** stops the requests in flight when the upload is aborted */
  private readonly stop = new AbortController()
  /** bytes sent in parts */
  bytesSent = 0

  private constructor(readonly loc: S3Location, spoolDir: string, cacheDir: string | undefined) {
    this.spool = join(spoolDir, `snapctl-upload-${process.pid}-${randomBytes(6).toString('hex')}.partial`)
    this.indexDir = s3IndexPath(loc, cacheDir)
  }

  /** Refuses an existing object unless forced (SNAP_EXISTS), before any byte of the stream is read. */
  static async start(url: string, opts: S3UploadOptions = {}): Promise<S3Upload> {
    const loc = await refuseExisting(url, opts.force === true)
    const dir = opts.spoolDir ?? tmpdir()
    await mkdir(dir, { recursive: true, mode: 0o700 }).catch((e) => {
      throw fromSystemError(e, `creating the spool directory ${dir}`)
    })
    const up = new S3Upload(loc, dir, opts.cacheDir)
    await mkdir(dirname(up.indexDir), { recursive: true, mode: 0o700 }).catch(() => {}) // no index is no failure: readers build it
    // A missing bucket or refused credentials fail here, before QEMU's stream is read.
    up.uploadId = up.begin()
    await up.uploadId
    return up
  }

  private async begin(): Promise<string> {
    const r = await withRetry(this.loc, `starting the upload of ${this.loc.url}`, () => s3Client().send(new CreateMultipartUploadCommand({ Bucket: this.loc.bucket, Key: this.loc.key, ContentType: 'application/octet-stream' })))
    if (!r.UploadId) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${this.loc.url}: the store started an upload without an UploadId`)
    return r.UploadId
  }

  /** The writer starts the image over (compaction): parts sent so far are replaced. */
  async restart(spool: string): Promise<void> {
    await this.settle()
    await this.fh?.close().catch(() => {})
    this.fh = null
    this.spool = spool
    this.end = 0
    this.next = 2
    this.nextStart = FIRST_PART
    this.parts.length = 0
  }

  /** Bytes of the spool before `end` are final (except the header block): send the whole parts among them. */
  progress(end: number): void {
    this.end = Math.max(this.end, end)
    if (this.failure || this.aborted) return
    while (this.running.size < PARALLEL && this.nextStart + partSize(this.next) <= end) {
      const size = partSize(this.next)
      this.send(this.next++, this.nextStart, size)
      this.nextStart += size
    }
  }

  private send(n: number, start: number, len: number): void {
    const p = this.part(n, start, len).then(
      (etag) => {
        this.parts.push({ PartNumber: n, ETag: etag })
        this.bytesSent += len
        if (n > 1) this.progress(this.end)
      },
      (e) => {
        this.failure ??= s3Error(e, this.loc, `uploading ${this.loc.url}`)
      },
    )
    this.running.add(p)
    void p.then(() => this.running.delete(p))
  }

  private async part(n: number, start: number, len: number): Promise<string> {
    const id = await this.uploadId!
    this.fh ??= await open(this.spool, 'r')
    const buf = this.buffers.pop() ?? Buffer.allocUnsafeSlow(FIRST_PART)
    const body = len <= buf.length ? buf.subarray(0, len) : Buffer.allocUnsafe(len)
    try {
      const { bytesRead } = await this.fh.read(body, 0, len, start)
      if (bytesRead !== len) throw new SnapError('SNAP_INTERNAL', `the upload spool ${this.spool} ends at ${start + bytesRead}, before ${start + len}`)
      const cmd = new UploadPartCommand({ Bucket: this.loc.bucket, Key: this.loc.key, UploadId: id, PartNumber: n, Body: body, ContentLength: len })
      // UNSIGNED-PAYLOAD, as the SDK itself signs stream bodies: otherwise it hashes every byte of
      // the image with SHA-256 on this thread. Each cluster has its own CRC, checked by every reader.
      cmd.middlewareStack.add((next) => (args) => {
        const req = args.request as { headers?: Record<string, string> }
        if (req.headers) req.headers['x-amz-content-sha256'] = 'UNSIGNED-PAYLOAD'
        return next(args)
      }, { step: 'build', name: 'snapctlUnsignedPayload' })
      const r = await withRetry(this.loc, `uploading part ${n} of ${this.loc.url}`, () => s3Client().send(cmd, { abortSignal: this.stop.signal }), this.stop.signal)
      if (!r.ETag) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${this.loc.url}: the store accepted part ${n} without an ETag`)
      return r.ETag
    } finally {
      if (body.buffer === buf.buffer) this.buffers.push(buf)
    }
  }

  private async settle(): Promise<void> {
    while (this.running.size > 0) await Promise.allSettled([...this.running])
  }

  /** The spool holds the whole image (`length` bytes): send what is left, part 1 last, and complete. */
  async publish(length: number): Promise<void> {
    for (;;) {
      this.progress(length)
      if (this.running.size === 0) break
      await Promise.race([...this.running])
    }
    if (this.failure) throw this.failure
    // The tail, in as many parts as its size needs (the last may be small), then part 1.
    const tail: Array<[number, number, number]> = []
    for (let n = this.next, s = this.nextStart; s < length; n++) {
      const len = Math.min(partSize(n), length - s)
      tail.push([n, s, len])
      s += len
    }
    for (const [n, s, len] of tail) {
      this.send(n, s, len)
      if (this.running.size >= PARALLEL) await Promise.race([...this.running])
    }
    this.send(1, 0, Math.min(FIRST_PART, length))
    await this.settle()
    if (this.failure) throw this.failure
    const id = await this.uploadId!
    const parts = [...this.parts].sort((a, b) => a.PartNumber! - b.PartNumber!)
    await withRetry(this.loc, `completing the upload of ${this.loc.url}`, () =>
      s3Client().send(new CompleteMultipartUploadCommand({ Bucket: this.loc.bucket, Key: this.loc.key, UploadId: id, MultipartUpload: { Parts: parts } })),
    )
    this.uploadId = null
    await this.dispose()
  }

  /** Abort the upload (nothing of it stays in the store) and remove the spool. */
  async abort(): Promise<void> {
    if (this.aborted) return
    this.aborted = true
    this.stop.abort()
    const id = this.uploadId ? await this.uploadId.catch(() => null) : null
    await this.settle()
    if (id) {
      await withRetry(this.loc, `aborting the upload of ${this.loc.url}`, () =>
        s3Client().send(new AbortMultipartUploadCommand({ Bucket: this.loc.bucket, Key: this.loc.key, UploadId: id })),
      ).catch(() => {})
    }
    this.uploadId = null
    await this.dispose()
  }

  private async dispose(): Promise<void> {
    await this.fh?.close().catch(() => {})
    this.fh = null
    this.buffers.length = 0
    await rm(this.spool, { force: true }).catch(() => {})
  }
}
