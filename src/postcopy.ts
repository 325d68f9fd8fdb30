// `snapctl load --postcopy`: lazy restore. The destination QEMU gets the block list and the
// device state at once and starts the VM; every page it touches and does not have yet, it asks
// for on the return path, and we answer ahead of the background push of the rest.
//
//   out: QEVM, config, OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE, PING 2, ram START,
//        PACKAGED[LISTEN, device sections, PING 3, RUN],
//        ram PART sections (answers to requests jump the queue), ram END, EOF
//   in:  PONG, REQ_PAGES_ID / REQ_PAGES, SHUT
//
// With `recover` (the destination is postcopy-paused and was told migrate-recover), on a new
// connection: out: RECV_BITMAP per block, POSTCOPY_RESUME, the pages it lacks, ram END, EOF;
// in: RECV_BITMAP + bitmap per block, RESUME_ACK(1), requests, SHUT (src/postcopy/received.ts).
//
// This file wires the parts: the image (src/container/), the transport (src/transport/: fd 1
// and stdin under `exec:`), the session and its scheduler (src/postcopy/session.ts), the
// sections it sends (src/postcopy/sections.ts) and the return path (src/postcopy/return-path-reader.ts).
// With --connect unix:PATH (src/transport/postcopy-socket.ts) the return path is the main
// socket's other direction, and answers to requests go on the postcopy-preempt channel.
// CONTINUE is never used: sections are built independently and may interleave.

import { ImageReader } from './container/reader.js'
import { openImage, topOf } from './container/chain.js'
import { SnapError } from './errors.js'
// The LevelDB index (src/index/, with `level`: ~40 ms of CPU to load) only once every page is
// out: imported then, so that it does not delay the device state.
import type { refreshIndex as RefreshIndex } from './index/refresh.js'
import { ReturnPathReader } from './postcopy/return-path-reader.js'
import { Session, type PostcopyStats } from './postcopy/session.js'
import { storeWorkingSet, workingSetOf, workingSetRanges } from './container/working-set.js'
import { isS3Url } from './s3/url.js'
// Only the transport in use is loaded (the pipe's threads, or the sockets): before the device state.
import type { PostcopyOutgoing } from './transport/postcopy-socket.js'
import type { OutgoingMigration, SinkOptions } from './transport/types.js'
import type { RamBlock } from './types.js'

export type { PostcopyStats }

export interface PostcopyOptions {
  log?: (msg: string) => void
  /** read the image with O_DIRECT (container/direct-io.ts) */
  bypassCache?: boolean
  /** how long to wait for the destination's answers during setup and at the end
   * (default: $SNAPCTL_RETURN_PATH_TIMEOUT_MS, else 30 s) */
  timeoutMs?: number
  /**
   * The destination's page size of each hugepage-backed RAM block, by block name (e.g.
   * { mem: 2 MiB }); others are 4 KiB. Postcopy places whole host pages: ADVISE, the block list
   * and every page sent must agree with the destination (reference §2.3, §2.8).
   */
  hostPageSizes?: Record<string, number>
  /** the transport to QEMU, with its return path (default: standard output and standard input) */
  open?: (sink: SinkOptions) => Promise<OutgoingMigration>
  /**
   * `unix:PATH`: connect to a destination in `migrate-incoming unix:PATH` (postcopy-ram and
   * postcopy-preempt on there) instead: requested pages go on the preempt channel.
   */
  connect?: string
  /** with `connect`: how long to wait for the destination to accept or read (default: channelTimeout()) */
  channelTimeoutMs?: number
  /**
   * Record the order in which the guest asks for pages until the push has finished, and store it
   * in the image as its working set (format-spec/container.md, "working_set"), replacing any
   * earlier one. Without it, an image's working set is pushed first.
   */
  record?: boolean
  /**
   * With record: for this long after the VM can run, only the pages the guest asks for are sent
   * (no background push), so that each page it touches is asked for and recorded
   * (default RECORD_WINDOW_MS; 0: push at once, recording only what the push had not brought).
   */
  recordWindowMs?: number
  /**
   * Bytes of the image's working set sent before the device state, as precopy RAM pages (in RAM
   * before the VM can run); the rest of it first after (default PRECOPY_MAX; 0: all after).
   */
  precopyMax?: number
  /**
   * Once part of the working set was precopied, raise this process's nice value by this much for
   * the rest of the push (the guest has what it works on; the push should take only the CPU it
   * leaves). Default 0: a library call leaves its process's priority alone; load uses defaultPushNice().
   */
  pushNice?: number
  /**
   * Continue a lazy restore that stopped midway: the destination is postcopy-paused and was told
   * `migrate-recover URI` (restore --lazy --recover does both). Sends only what it lacks.
   */
  recover?: boolean
  /**
   * Called once the image is open and everything that does not need the destination is done,
   * before connecting (or opening the default transport): restore --lazy starts the load before
   * migrate-incoming and lets it connect once QEMU listens (load --ready-fd).
   */
  beforeConnect?: () => Promise<void>
}

/**
 * $SNAPCTL_POSTCOPY_PUSH_RATE: bytes per second of the background push at most (a throttle for
 * a shared link, and how tests keep a lazy restore in postcopy long enough to break it).
 */
function pushRate(): number | undefined {
  const v = Number(process.env.SNAPCTL_POSTCOPY_PUSH_RATE)
  return Number.isFinite(v) && v > 0 ? v : undefined
}

/** --record-window's default: long enough for the Linux test guest to touch what it works on (README, "working set") */
export const RECORD_WINDOW_MS = 5000
/** --precopy-max's default (README, "working set") */
export const PRECOPY_MAX = 128 << 20

/**
 * What `load --postcopy` passes as pushNice: $SNAPCTL_POSTCOPY_PUSH_NICE, else 10 (README,
 * "working set": the guest's own work took 1.16x instead of 1.55x the fully restored VM's).
 */
export function defaultPushNice(): number {
  const v = Number(process.env.SNAPCTL_POSTCOPY_PUSH_NICE ?? 10)
  return Number.isInteger(v) && v >= 0 ? v : 10
}

function defaultTimeout(): number {
  const env = Number(process.env.SNAPCTL_RETURN_PATH_TIMEOUT_MS)
  return Number.isFinite(env) && env > 0 ? env : 30_000
}

export async function loadPostcopy(path: string, opts: PostcopyOptions = {}): Promise<PostcopyStats & { recordedPages?: number; recordError?: string }> {
  const started = performance.now()
  if (opts.record && isS3Url(path)) throw new SnapError('SNAP_USAGE', '--record stores the working set in the image: it needs a local image, not s3://')
  if (opts.record && opts.recover) throw new SnapError('SNAP_USAGE', '--record cannot go with --recover: the order of the requests before the recovery is lost')
  const reader = await openImage(path, { whileCreating: 'refuse', bypassCache: opts.bypassCache })
  const marks: Record<string, number> = { started, imageOpen: performance.now() }
  if (topOf(reader).source.note) opts.log?.(`note: ${topOf(reader).source.note}`)
  let out: OutgoingMigration | undefined
  let rp: ReturnPathReader | undefined
  try {
    // Pages are served from the trailer's CRC-checked page map, held in memory. The LevelDB
    // index is only checked (and rebuilt if need be) once every page is out, so that the time
    // to resume does not grow with the size of the map.
    const hostPages = hostPagesPerBlock(reader.blocks, opts.hostPageSizes ?? {})
    // A small queue on the writer thread: the pipe never runs dry while the main thread builds
    // sections, and an urgent page waits behind at most this much background data.
    const sink: SinkOptions = { queueLimit: 128 << 10 }
    // A working set that fails its checks is only a lost optimisation: say so, restore without it.
    const ws = workingSetOf(topOf(reader), (e) => opts.log?.(`the image's working set is not used: ${(e as Error).message}`))
    // Object storage: its clusters are fetched first, in its order, ahead of the push (s3-source.ts).
    if (ws && topOf(reader).source.prefetch) topOf(reader).source.prefetch!(workingSetRanges(topOf(reader), ws.pages))
    const socket = opts.connect !== undefined ? await import('./transport/postcopy-socket.js') : null
    // Everything above is done before the destination is there (restore --lazy starts us before migrate-incoming).
    if (opts.beforeConnect) {
      await opts.beforeConnect()
      marks.ready = performance.now()
    }
    let preempt: PostcopyOutgoing | null = null
    if (socket) out = preempt = await socket.socketPostcopyOutgoing(opts.connect!, { timeoutMs: opts.channelTimeoutMs })
    else if (opts.open) out = await opts.open(sink)
    else {
      const { fdOutgoing } = await import('./transport/fd.js')
      out = await fdOutgoing({ returnPath: true, sink })
    }
    marks.connected = performance.now()
    if (!out.returnPath) throw new SnapError('SNAP_USAGE', `a lazy restore needs a return path from QEMU, and ${out.main.what} has none`)
    rp = new ReturnPathReader(out.returnPath)
    const session = new Session(reader, reader.locator, out.main, rp, {
      log: opts.log, timeoutMs: opts.timeoutMs ?? defaultTimeout(), hostPages,
      openPreempt: preempt?.openPreempt, endStream: preempt?.endStream,
      workingSet: ws?.pages ?? null, record: opts.record, recover: opts.recover, pushRate: pushRate(), pushNice: opts.pushNice,
      recordWindowMs: opts.recordWindowMs ?? RECORD_WINDOW_MS, precopyPages: Math.floor((opts.precopyMax ?? PRECOPY_MAX) / reader.header.pageSize),
    })
    Object.assign(session.phases, marks)
    const stats = await session.run(started, async () => (await loadRefresh())(topOf(reader), opts.log))
    await out.finish()
    if (opts.record) {
      // The VM has all its pages: a failure to store is reported, the restore stands.
      const pages = session.recorded()
      try {
        await storeWorkingSet(path, { pages, recordedTime: Date.now() })
        // The generation changed, so the index is stale; its runs are the same: stamp it anew.
        const stored = await ImageReader.open(path, { whileCreating: 'refuse' })
        await (await loadRefresh())(stored, opts.log).finally(() => stored.close())
        opts.log?.(`stored a working set of ${pages.length / 2} pages in ${path}`)
        return { ...stats, recordedPages: pages.length / 2 }
      } catch (e) {
        return { ...stats, recordedPages: 0, recordError: (e as Error).message }
      }
    }
    return stats
  } finally {
    out?.main.abort()
    rp?.stop()
    await reader.close()
  }
}

async function loadRefresh(): Promise<typeof RefreshIndex> {
  return (await import('./index/refresh.js')).refreshIndex
}

/** Target pages per host page for each block; SNAP_USAGE for a size that cannot be or a block the image lacks. */
function hostPagesPerBlock(blocks: RamBlock[], sizes: Record<string, number>): number[] {
  for (const name of Object.keys(sizes)) {
    if (!blocks.some((b) => b.name === name)) throw new SnapError('SNAP_USAGE', `--host-page-size names RAM block "${name}", which the image does not have (it has ${blocks.map((b) => b.name).join(', ')})`)
  }
  return blocks.map((b) => {
    const size = sizes[b.name] ?? b.pageSize
    if (size < b.pageSize || (size & (size - 1)) !== 0 || size > 1 << 30 || b.size % size !== 0) {
      throw new SnapError('SNAP_USAGE', `--host-page-size ${b.name}=${size}: must be a power of two from ${b.pageSize} bytes to 1 GiB that divides the block's ${b.size} bytes`)
    }
    return size / b.pageSize
  })
}
