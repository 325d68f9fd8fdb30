// `snapctl create`: QEMU migration stream in, finished image out.
//
//   input (stdin or file) -> [libvirt header?] -> StreamParser -> sink -> ImageWriter -> IMAGE
//
// The parser calls the sink synchronously with views into the input; the writer copies each
// page once into its open cluster and seals clusters asynchronously. We await only when the
// writer says too much is in flight, so the loop costs one await per input chunk at most.

import { throwIfAborted, unlessAborted } from './abort.js'
import { ImageWriter, type ImageSummary } from './container/writer.js'
import { openBaseFor, writerBase } from './container/chain.js'
import { SnapError } from './errors.js'
import { fdIncoming } from './transport/fd.js'
import type { IncomingMigration } from './transport/types.js'
import { checkInputFile, checkOutputFile } from './paths.js'
import { isS3Url } from './s3/url.js'
import { libvirtHeaderLength, parseLibvirtHeader } from './stream/libvirt.js'
import { importMappedRam } from './mapped-ram-import.js'
import { StreamParser } from './stream/parser.js'
import { defaultThreads } from './threads.js'
import { writerSink } from './ram-sink.js'
import type { StreamCounters } from './types.js'

export interface CreateOptions {
  /** read the stream from this file instead of standard input */
  from?: string
  /** the transport from QEMU (default: standard input, or `from`): see src/transport/ */
  input?: IncomingMigration
  clusterSize?: number
  compress?: 'lz4' | 'none'
  /** threads creating the image (WriterOptions.threads); default defaultThreads() */
  threads?: number
  /** store a page whose bytes the image holds already once (container.md "Shared slots"); default off */
  dedupe?: boolean
  force?: boolean
  /** make the image durable (fdatasync, directory fsync) before create returns */
  sync?: boolean
  /** write the image with O_DIRECT, around the host's page cache (src/container/direct-io.ts) */
  bypassCache?: boolean
  /** notes for the operator (--bypass-cache on a filesystem that refuses O_DIRECT) */
  log?: (msg: string) => void
  /**
   * listen on this unix socket (`unix:PATH`) for QEMU's migration, with any number of multifd
   * channels (src/multifd/receive.ts), instead of reading standard input or `from`
   */
  listen?: string
  /** with `listen`: bound on each wait for QEMU, in ms (0: none; default $SNAPCTL_CHANNEL_TIMEOUT_MS, else 60 s) */
  timeoutMs?: number
  /** with `listen`: called once the socket is listening */
  onListening?: (path: string) => void
  /**
   * an incremental image over this base (one image, or the top of a chain): pages equal to what
   * it restores are not stored (format-spec/container.md, "Incremental images")
   */
  base?: string
  /** with `base`: the directory the image will be moved to, which the base's path is stored relative to */
  baseRelativeTo?: string
  /** called after every chunk read with the bytes read so far (and the input's size, if known) */
  onProgress?: (bytesIn: number, bytesTotal?: number) => void
  /** stops the create: the partial image is removed and createImage rejects with SNAP_ABORTED */
  signal?: AbortSignal
}

export interface CreateResult {
  image: ImageSummary
  counters: StreamCounters
  source: 'qemu' | 'libvirt'
  bytesIn: number
  /** the input's size, where known (--from FILE) */
  bytesTotal?: number
  seconds: number
  /** with `listen`: the multifd channels QEMU opened, and the SYNC epochs */
  channels?: number
  epochs?: number
}

/** The libvirt header is at most this long (92 bytes + XML + cookie + padding). */
const LIBVIRT_PREFIX_MAX = 64 << 20
const LIBVIRT_FIXED_HEADER = 92

export async function createImage(path: string, opts: CreateOptions = {}): Promise<CreateResult> {
  const started = performance.now()
  throwIfAborted(opts.signal)
  // Paths first: a bad one must fail before QEMU's stream is read, not after.
  const bytesTotal = opts.from === undefined ? undefined : (await checkInputFile(opts.from, '--from')).size
  if (!isS3Url(path)) await checkOutputFile(path, 'the image')
  else if (opts.base !== undefined) throw new SnapError('SNAP_USAGE', '--base: an incremental image refers to its base by a local path: it needs a local image, not s3://')
  // The base chain is opened and checked before QEMU's stream is read; it is only ever read.
  const base = opts.base === undefined ? null : await openBaseFor(opts.base, path)
  const opening = ImageWriter.create(path, {
    clusterSize: opts.clusterSize,
    compress: opts.compress,
    threads: opts.threads ?? defaultThreads(),
    dedupe: opts.dedupe,
    force: opts.force,
    sync: opts.sync,
    bypassCache: opts.bypassCache,
    base: base ? writerBase(base, path, opts.baseRelativeTo) : undefined,
  })
  // Undone on abort even while the partial file is being made.
  const undo = async (): Promise<string | undefined> => {
    const w = await opening.catch(() => null)
    await w?.abort()
    return w ? 'the partial image was removed' : undefined
  }
  const work = opening.then((writer) => {
    if (writer.note) opts.log?.(writer.note)
    return opts.listen !== undefined ? fillFromSocket(writer, opts.listen, opts, started) : fill(writer, opts, bytesTotal, started)
  })
  return unlessAborted(opts.signal, work, undo).finally(() => base?.close())
}

/** The stream from a unix socket, with multifd channels (src/multifd/receive.ts). */
async function fillFromSocket(writer: ImageWriter, listen: string, opts: CreateOptions, started: number): Promise<CreateResult> {
  try {
    const { receiveOverSocket } = await import('./multifd/receive.js')
    const r = await receiveOverSocket(writer, { listen, timeoutMs: opts.timeoutMs, onListening: opts.onListening, signal: opts.signal, onProgress: (n) => opts.onProgress?.(n) })
    const image = await writer.finish(r.device, { source: 'qemu', counters: r.counters, compatibleFeatures: r.counters.xbzrlePages > 0 ? 1 : 0 })
    const seconds = (performance.now() - started) / 1000
    return { image, counters: r.counters, source: 'qemu', bytesIn: r.bytesIn, seconds, channels: r.channels, epochs: r.epochs }
  } catch (err) {
    await writer.abort()
    throw err
  }
}

/** Reads the stream into the image. */
async function fill(writer: ImageWriter, opts: CreateOptions, bytesTotal: number | undefined, started: number): Promise<CreateResult> {
  try {
    // A mapped-ram file (QEMU's migrate file: with mapped-ram, or libvirt's sparse save) is read by its offsets.
    const mapped = opts.from !== undefined && opts.input === undefined ? await importMappedRam(writer, opts.from, opts, started) : null
    if (mapped !== null) return mapped
    const parser = new StreamParser(writerSink(writer))
    const prefix = new PrefixSplitter()
    let bytesIn = 0

    for await (const chunk of (opts.input ?? fdIncoming(opts.from)).main) {
      throwIfAborted(opts.signal) // stop reading; the abort has removed the image already
      bytesIn += chunk.length
      const rest = prefix.push(chunk)
      if (rest !== null && rest.length > 0) parser.push(rest)
      if (writer.needsDrain()) await writer.drain()
      opts.onProgress?.(bytesIn, bytesTotal)
    }
    const rest = prefix.end()
    if (rest !== null && rest.length > 0) parser.push(rest)
    const device = parser.end()
    const source = prefix.libvirtHeader ? 'libvirt' : 'qemu'
    const image = await writer.finish(device, {
      source,
      counters: parser.counters,
      libvirtHeader: prefix.libvirtHeader ?? undefined,
      compatibleFeatures: parser.counters.xbzrlePages > 0 ? 1 : 0,
    })
    return { image, counters: parser.counters, source, bytesIn, bytesTotal, seconds: (performance.now() - started) / 1000 }
  } catch (err) {
    await writer.abort()
    throw err
  }
}

/**
 * Holds back the first bytes until it knows whether the input is a libvirt save image; if it
 * is, keeps the header (stored in the image) and passes on only the QEMU stream after it.
 * (Exported for tools/fuzz.ts.)
 */
export class PrefixSplitter {
  private held: Buffer[] = []
  private heldBytes = 0
  private decided = false
  libvirtHeader: Buffer | null = null

  /** The bytes to parse now (possibly none). */
  push(chunk: Buffer): Buffer | null {
    if (this.decided) return chunk
    this.held.push(chunk)
    this.heldBytes += chunk.length
    if (this.heldBytes < LIBVIRT_FIXED_HEADER) return null
    const head = Buffer.concat(this.held)
    this.held = [head]
    const total = libvirtHeaderLength(head)
    if (total === null) return this.release()
    if (total > LIBVIRT_PREFIX_MAX) throw new SnapError('SNAP_STREAM_TOO_LARGE', 'libvirt save image header is larger than 64 MiB')
    if (head.length < total) return null
    const info = parseLibvirtHeader(head)!
    this.libvirtHeader = info.header
    this.release()
    return head.subarray(info.streamOffset)
  }

  /** At the end of the input: whatever is still held (a short input: the parser says what is wrong). */
  end(): Buffer | null {
    if (this.decided) return null
    const head = Buffer.concat(this.held)
    if (head.length >= 16) libvirtHeaderLength(head) // throws if this is a cut libvirt header
    return this.release(head)
  }

  private release(head = this.held.length === 1 ? this.held[0] : Buffer.concat(this.held)): Buffer {
    this.decided = true
    this.held = []
    return head
  }
}
