// `snapctl restore IMAGE --qmp SOCKET`: an image into a QEMU started with `-incoming defer` and
// the same devices, eagerly or (--lazy) by postcopy, over QMP.
//
//   the image's blocks -> the destination waits for a migration, its RAM blocks match the image
//   (and, --lazy, its memory can take pages on demand) -> settings (postcopy-ram for --lazy,
//   capabilities snapctl cannot feed off) -> autostart on (cont) or off (stop, --paused) ->
//   migrate-incoming unix:SOCKET with multifd on and `snapctl load --connect unix:SOCKET
//   --channels N IMAGE` (N: --channels, default DEFAULT_RESTORE_CHANNELS; --channels 0:
//   migrate-incoming "exec:snapctl load IMAGE"; --lazy: unix:SOCKET, postcopy-preempt on, and
//   `snapctl load --postcopy --connect unix:SOCKET IMAGE`) -> follow query-migrate
//   (postcopy-active: the VM can run) -> completed and the load exited 0 -> settings back
//
// --lazy --recover continues a lazy restore that stopped midway (its snapctl died, a connection
// broke): QEMU keeps such a destination in postcopy-paused, its VM waiting for its missing pages.
//
//   the destination is postcopy-paused, its RAM blocks match the image -> migrate-recover URI
//   (unix:SOCKET with `snapctl load --postcopy --recover --connect unix:SOCKET IMAGE` when
//   postcopy-preempt is on, else exec:snapctl load --postcopy --recover IMAGE) -> follow
//   query-migrate to completed, as above. The capabilities stay as the first restore set them:
//   QEMU refuses changes during a migration, and what they were before is not known here.
//
// Every check comes before migrate-incoming: a refused restore leaves the destination waiting
// as it was. Once the migration runs, a failure leaves it failed (exit-on-error off, so that
// QEMU's reason can be read and reported); the image is never changed.
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { refuseWhileCreating } from './container/lock.js'
import { isS3Url, objectCache } from './s3/url.js'
import { SnapError, fromSystemError, isSnapError } from './errors.js'
import { RateMeter, abortedError, imagePages, pause, type MigrateInfo, type PageCounts, type ProgressListener } from './qemu/migration.js'
import { Peer } from './qemu/peer.js'
import { QmpClient } from './qemu/qmp.js'
import { checkBlocks, checkPostcopyBackends, destinationBlocks, hostPageSizes } from './qemu/ram.js'
import { MigrationSettings } from './qemu/settings.js'
import type { PostcopyStats } from './postcopy/session.js'

export interface RestoreOptions {
  /** the destination QEMU's QMP socket */
  qmp: string
  /** postcopy: the VM runs at once, pages come on demand */
  lazy?: boolean
  /** leave the VM paused once restored */
  paused?: boolean
  /** with lazy: record the guest's page requests and store them in the image as its working set */
  record?: boolean
  /** with record: load --record-window (a duration as load takes it, e.g. 5s) */
  recordWindow?: string
  /** with lazy: load --precopy-max (a size, e.g. 64M) */
  precopyMax?: string
  /** with lazy: continue a lazy restore of this image that stopped midway (the destination is postcopy-paused) */
  recover?: boolean
  /** the load reads the image with O_DIRECT, around the host's page cache (`load --bypass-cache`) */
  bypassCache?: boolean
  signal?: AbortSignal
  onProgress?: ProgressListener
  log?: (msg: string) => void
  /** QMP connect and command timeout (default 10 s) */
  timeoutMs?: number
  /**
   * multifd with this many channels: migrate-incoming unix:SOCKET and `snapctl load --connect
   * --channels N` (issue 13); 0: one `exec:` pipe; absent: DEFAULT_RESTORE_CHANNELS, or with
   * `lazy` the postcopy socket (QEMU 10.0 refuses postcopy with multifd).
   */
  channels?: number
}

export interface RestoreResult {
  image: string
  /** migration stream bytes the load wrote */
  bytesOut: number
  /** the same, under save's name for the bytes moved */
  bytes: number
  seconds: number
  pages: number
  storedPages: number
  zeroPages: number
  lazy: boolean
  /** --lazy: from the start until the destination was in postcopy (query-migrate postcopy-active) */
  postcopyActiveSeconds: number | null
  /** --lazy: from the start until the VM could run (device state loaded, POSTCOPY_RUN handled) */
  runnableSeconds: number | null
  /** when the last page arrived (the migration completed), from the start; = seconds but for the final cont */
  lastPageSeconds: number | null
  /** --lazy: pages the destination asked for ahead of the background push */
  requests: number | null
  /** --lazy: the load's request service times (README, "Output keys") */
  latencyMs: { p50: number; p99: number; max: number } | null
  /** --lazy: from the load's start until the device state was out */
  deviceStateSeconds: number | null
  /** --lazy: the load's set-up steps (load --postcopy --stats phasesMs) */
  phasesMs: Record<string, number> | null
  /** --lazy: pages sent in answer to requests */
  pagesServedOnRequest: number | null
  /** --lazy: pages of the image's working set pushed first, and how many of those the guest asked for (a lower bound of those it touched) */
  prefetchedPages: number | null
  /** --lazy: of those, the pages sent before the VM could run (load --precopy-max) */
  precopiedPages: number | null
  prefetchedTouched: number | null
  /** --lazy --record: pages of the working set stored in the image */
  recordedPages: number | null
  /** --recover: this continued a paused lazy restore */
  recovered: boolean
  /** --recover: the pages the destination already had (its received bitmaps) */
  pagesReceivedBefore: number | null
  vm: 'running' | 'paused'
  /** the multifd channels the pages went over; 0: one stream (exec:, or --lazy's socket) */
  channels: number
}

/**
 * An eager restore without --channels uses multifd over this many channels (issue 13: "what is
 * fastest on this machine"). Measured on the 2-core machine (shared with three other sessions,
 * load average 5 to 13): `node dist/tools/bench-transport.js restore 1024 9 exec,2,4`, whole
 * restore commands, 1 GiB paused VM, per round against exec: (median [min-max]): 2 channels wall
 * 0.75x [0.51-0.96], CPU of snapctl and QEMU together 0.84x; 4 channels 0.71x [0.46-1.33], 0.86x;
 * 5 more rounds gave 0.91x / 0.84x (2) and 1.12x / 0.94x (4), and at 256 MiB 0.93x / 0.93x (2),
 * 0.87x / 0.94x (4). QEMU's own load threads read each channel's pages straight into guest RAM
 * (2.7 CPU-s of QEMU through exec: against 1.0 with channels); 2 channels never lost and spread
 * least, where 4 only add threads to a 2-core machine.
 */
export const DEFAULT_RESTORE_CHANNELS = 2

/** How long QEMU may take to answer while it waits for its exec: child to exit. */
const QEMU_BLOCKED_MS = 3600_000

export async function restoreVm(image: string, opts: RestoreOptions): Promise<RestoreResult> {
  const path = isS3Url(image) ? image : resolve(image)
  if (!isS3Url(path)) await refuseWhileCreating(path)
  const counts = await imagePages(path)
  const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 10_000, waitForSocketMs: 500 })
  let work: string | undefined
  try {
    const r = new Restore(path, counts, opts, qmp)
    await r.check()
    work = await mkdtemp(join(tmpdir(), 'snapctl-restore-')).catch((e) => {
      throw fromSystemError(e, 'creating a work directory')
    })
    return await r.run(new Peer(work))
  } finally {
    qmp.close()
    if (work) await rm(work, { recursive: true, force: true }).catch(() => {})
  }
}

class Restore {
  private readonly started = performance.now()
  private readonly settings: MigrationSettings
  private readonly log: (msg: string) => void
  private incoming = false
  private postcopyAt: number | null = null
  /** --lazy: the destination's hugepage blocks, for load --host-page-size */
  private hostPages: string | undefined
  /** --recover: the destination has postcopy-preempt on (the first restore went over a socket) */
  private preempt = false
  private runnableAt: number | null = null
  /** when query-migrate first said completed: the last page is in */
  private completedAt: number | null = null
  /** multifd channels (0: one stream): --channels, else the default for an eager restore */
  private readonly channels: number

  constructor(
    private readonly path: string,
    private readonly counts: PageCounts,
    private readonly opts: RestoreOptions,
    private readonly qmp: QmpClient,
  ) {
    this.settings = new MigrationSettings(qmp)
    this.log = opts.log ?? (() => {})
    this.channels = opts.channels ?? (opts.lazy ? 0 : DEFAULT_RESTORE_CHANNELS)
  }

  /** Everything that can refuse the restore while the destination is still untouched. */
  async check(): Promise<void> {
    if (this.opts.recover) return this.checkPaused()
    const paused = await this.qmp.execute<MigrateInfo>('query-migrate')
    if (paused.status === 'postcopy-paused') {
      throw new SnapError('SNAP_POSTCOPY_PAUSED', `the destination is postcopy-paused: a lazy restore stopped midway and its VM waits for the rest of its pages; continue it with snapctl restore IMAGE --qmp ${this.opts.qmp} --lazy --recover (the same image)`, { status: paused.status })
    }
    const state = await this.qmp.execute<{ status: string }>('query-status')
    if (state.status !== 'inmigrate') {
      throw new SnapError('SNAP_VM_STATE', `the destination is not waiting for an incoming migration (it is ${state.status}): start its QEMU with -incoming defer`, { runState: state.status })
    }
    const mig = await this.qmp.execute<MigrateInfo>('query-migrate')
    if (mig.status && mig.status !== 'none') {
      throw new SnapError('SNAP_MIGRATION_ACTIVE', `the destination's incoming migration is already ${mig.status}: start its QEMU with -incoming defer (not -incoming URI) and run nothing else on it`, { status: mig.status })
    }
    const dest = await destinationBlocks(this.qmp)
    const extra = checkBlocks(this.counts.blocks, dest)
    if (extra.length > 0) this.log(`the destination has RAM blocks the image does not (left as they are): ${extra.join(', ')}`)
    if (this.opts.lazy) {
      this.hostPages = hostPageSizes(this.counts.blocks, dest)
      await checkPostcopyBackends(this.qmp, this.log)
    }
  }

  /** --recover: the destination must be postcopy-paused, with the image's blocks. */
  private async checkPaused(): Promise<void> {
    if (!this.opts.lazy) throw new SnapError('SNAP_USAGE', '--recover goes with --lazy: it continues a lazy restore')
    if (this.opts.record) throw new SnapError('SNAP_USAGE', '--record cannot go with --recover: the order of the requests before the recovery is lost')
    const mig = await this.qmp.execute<MigrateInfo>('query-migrate')
    if (mig.status !== 'postcopy-paused') {
      const hint = mig.status === 'postcopy-active' || mig.status === 'postcopy-recover' || mig.status === 'postcopy-recover-setup'
        ? 'a restore is serving it now (or is recovering it): wait for it, or for postcopy-paused'
        : mig.status === 'completed' ? 'it has all its pages: nothing to do'
        : 'only a lazy restore that stopped midway is recovered; start a restore with snapctl restore --lazy'
      throw new SnapError('SNAP_NOT_PAUSED', `the destination's migration is ${mig.status ?? 'none'}, not postcopy-paused: ${hint}`, { status: mig.status ?? 'none' })
    }
    const dest = await destinationBlocks(this.qmp)
    checkBlocks(this.counts.blocks, dest)
    this.hostPages = hostPageSizes(this.counts.blocks, dest)
    const caps = await this.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities')
    this.preempt = caps.some((c) => c.capability === 'postcopy-preempt' && c.state)
  }

  /** The load QEMU runs uses this command's cache for an s3:// image (--cache-dir, --cache-max). */
  /** `load MODE... IMAGE` with what every load of this restore takes: host page sizes, --bypass-cache, the s3:// cache. */
  private loadArgs(...mode: string[]): string[] {
    const args = ['load', ...mode, this.path]
    if (this.hostPages) args.push('--host-page-size', this.hostPages)
    if (this.opts.bypassCache) args.push('--bypass-cache')
    if (isS3Url(this.path)) {
      const cache = objectCache()
      if (cache.dir !== undefined) args.push('--cache-dir', resolve(cache.dir))
      if (cache.max !== undefined) args.push('--cache-max', String(cache.max))
    }
    return args
  }

  /** --recover: migrate-recover, and the load that sends what the destination lacks. */
  private async startRecovery(peer: Peer): Promise<void> {
    const args = this.loadArgs('--postcopy', '--recover')
    if (this.preempt) {
      const load = await this.startLoad(peer, args)
      await this.qmp.execute('migrate-recover', { uri: `unix:${peer.socket}` }).catch((e) => {
        load.cancel()
        throw e
      })
      load.go()
    } else await this.qmp.execute('migrate-recover', { uri: peer.uri(args) })
    this.incoming = true
  }

  async run(peer: Peer): Promise<RestoreResult> {
    try {
      this.checkAbort()
      if (this.opts.recover) await this.startRecovery(peer)
      else await this.startRestore(peer)
      await this.follow(peer)
      const status = await peer.waitExit({ startMs: 5000 })
      if (status !== 0) throw (await peer.error()) ?? (await peerFailed(peer, status))
      for (const note of await peer.notes()) this.log(note)
    } catch (e) {
      throw await this.recover(e, peer)
    }
    return this.finish(peer)
  }

  /** Settings, autostart, migrate-incoming and the load. */
  private async startRestore(peer: Peer): Promise<void> {
    const n = this.channels
    if (n && this.opts.lazy) throw new SnapError('SNAP_USAGE', '--channels cannot go with --lazy: QEMU 10.0 does not do postcopy with multifd')
    if (this.opts.record && !this.opts.lazy) throw new SnapError('SNAP_USAGE', '--record goes with --lazy: it records the pages a lazily restored guest asks for')
    const args = this.opts.lazy ? this.loadArgs('--postcopy') : this.loadArgs()
    if (this.opts.record) {
      args.push('--record')
      if (this.opts.recordWindow !== undefined) args.push('--record-window', this.opts.recordWindow)
    }
    if (this.opts.precopyMax !== undefined) args.push('--precopy-max', this.opts.precopyMax)
    // --lazy: the load starts now, opens the image and gets ready while the settings are made;
    // it connects once the destination listens, so the VM waits for no process start-up.
    const load = this.opts.lazy ? this.startLoad(peer, args) : null
    load?.catch(() => {}) // awaited below; a failure before then must not go unhandled
    try {
      await this.prepare(n)
      if (load) {
        const { go } = await load
        await this.migrateIncoming(`unix:${peer.socket}`)
        this.incoming = true
        go()
        return
      }
    } catch (e) {
      void load?.then((l) => l.cancel(), () => {})
      throw e
    }
    if (n) {
      // The destination listens; its multifd channels check our uuid against its own.
      const { UUID } = await this.qmp.execute<{ UUID: string }>('query-uuid')
      await this.migrateIncoming(`unix:${peer.socket}`)
      peer.start([...args, '--connect', `unix:${peer.socket}`, '--channels', String(n), '--uuid', UUID])
    } else await this.migrateIncoming(peer.uri(args))
    this.incoming = true
  }

  /** A load --postcopy --connect started ahead of the destination (load --ready-fd): resolves once it is ready. */
  private startLoad(peer: Peer, args: string[]): ReturnType<Peer['startReady']> {
    return peer.startReady([...args, '--connect', `unix:${peer.socket}`, '--ready-fd', '3'])
  }

  /** The migration settings and autostart, before migrate-incoming. */
  private async prepare(n: number | undefined): Promise<void> {
    // --lazy: over a unix socket with the preempt channel (requested pages never queue behind the push).
    const changes = await this.settings.apply(this.opts.lazy ? ['postcopy-ram', 'postcopy-preempt'] : n ? ['multifd'] : [], n ? { 'multifd-channels': n } : {})
    if (changes.off.length > 0) this.log(`migration capabilities off for the restore (restored afterwards): ${changes.off.join(', ')}`)
    // During an incoming migration stop and cont only set whether QEMU starts the VM itself:
    // at the end of an eager restore, at POSTCOPY_RUN of a lazy one.
    await this.qmp.execute(this.opts.paused ? 'stop' : 'cont')
    this.checkAbort()
  }

  /** Restored: what fails now says so. */
  private async finish(peer: Peer): Promise<RestoreResult> {
    const stats = (await peer.stats<Partial<PostcopyStats & { recordedPages: number }>>()) ?? {}
    for (const p of await this.settings.restore()) this.log(`could not restore a migration setting: ${p}`)
    // QEMU gives the VM the run state it had when saved: one saved paused waits for cont.
    let now = await this.qmp.execute<{ status: string; running: boolean }>('query-status')
    if (!this.opts.paused && !now.running) {
      await this.qmp.execute('cont').catch((e: Error) => {
        throw new SnapError(isSnapError(e) ? e.code : 'SNAP_QMP', `the VM was restored, but could not be started: ${e.message}`, { cause: e })
      })
      now = await this.qmp.execute('query-status')
    }
    return {
      image: this.path, bytesOut: stats.bytesOut ?? 0, bytes: stats.bytesOut ?? 0, lastPageSeconds: this.completedAt === null ? null : (this.completedAt - this.started) / 1000, seconds: (performance.now() - this.started) / 1000,
      pages: this.counts.pages, storedPages: this.counts.storedPages, zeroPages: this.counts.zeroPages, lazy: this.opts.lazy === true,
      postcopyActiveSeconds: this.postcopyAt === null ? null : (this.postcopyAt - this.started) / 1000,
      runnableSeconds: this.runnableAt === null ? null : (this.runnableAt - this.started) / 1000,
      requests: this.opts.lazy ? (stats.requests ?? null) : null, vm: now.running ? 'running' : 'paused',
      ...lazyFigures(this.opts.lazy === true, stats), recovered: this.opts.recover === true,
      pagesReceivedBefore: this.opts.recover ? (stats.pagesReceivedBefore ?? null) : null, channels: this.channels,
    }
  }

  private checkAbort(): void {
    if (this.opts.signal?.aborted) throw abortedError('the restore was stopped')
  }

  /** With exit-on-error off where QEMU has it (9.1+), so that a failure can be read, not just seen. */
  private async migrateIncoming(uri: string): Promise<void> {
    try {
      await this.qmp.execute('migrate-incoming', { uri, 'exit-on-error': false })
    } catch (e) {
      if (!isSnapError(e, 'SNAP_QMP') || !/exit-on-error/.test(e.message)) throw e
      await this.qmp.execute('migrate-incoming', { uri })
    }
  }

  private async follow(peer: Peer): Promise<void> {
    // Stream bytes of the image: each page record is an 8-byte header and the page.
    const expected = this.counts.storedPages * 4104 + this.counts.zeroPages * 8 + this.counts.deviceStateBytes
    const meter = new RateMeter()
    let warned = false
    for (;;) {
      if (this.opts.signal?.aborted) {
        if (this.postcopyAt === null) {
          await peer.kill('SIGTERM')
          throw abortedError('the restore was stopped')
        }
        if (!warned) this.log('not stopping: the VM already runs on pages that are still being sent; waiting for the last one')
        warned = true
      }
      const info = await this.qmp.execute<MigrateInfo>('query-migrate', undefined, { timeoutMs: QEMU_BLOCKED_MS })
      if (info.status === 'postcopy-active') await this.whenRunnable()
      if (info.status === 'completed') {
        this.completedAt = performance.now()
        return
      }
      if (info.status === 'failed' || info.status === 'cancelled') {
        await peer.waitExit({ timeoutMs: 5000 })
        const peerError = await peer.error()
        if (peerError) throw peerError
        throw new SnapError('SNAP_MIGRATION_FAILED', `the destination's migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`)
      }
      const status = await peer.exitStatus()
      if (status !== undefined && status !== 0) throw (await peer.error()) ?? (await peerFailed(peer, status))
      const io = await peer.io()
      if (io && this.opts.onProgress) {
        this.opts.onProgress({
          phase: this.postcopyAt === null ? 'migrating' : 'postcopy', percent: Math.min(100, (100 * io.written) / expected),
          bytes: io.written, totalBytes: expected, rate: meter.add(io.written), seconds: (performance.now() - this.started) / 1000,
        })
      }
      await pause(this.opts.lazy ? 50 : 100, this.opts.signal)
    }
  }

  /**
   * In postcopy-active: once QEMU has handled POSTCOPY_RUN (its run state leaves inmigrate; the
   * status changes earlier, at LISTEN, before the device state is loaded) the VM can run; QEMU
   * starts it itself if it was running when saved, otherwise this does (cont), unless --paused.
   */
  private async whenRunnable(): Promise<void> {
    this.postcopyAt ??= performance.now()
    if (this.runnableAt !== null) return
    const state = await this.qmp.execute<{ status: string; running: boolean }>('query-status')
    if (state.status === 'inmigrate') return
    this.runnableAt = performance.now()
    if (!this.opts.paused && !state.running) await this.qmp.execute('cont')
    const s = (t: number): string => ((t - this.started) / 1000).toFixed(2)
    this.log(`postcopy-active after ${s(this.postcopyAt)} s; the VM ${this.opts.paused ? 'can run' : 'runs'} from ${s(this.runnableAt)} s while the rest of its pages arrive`)
  }

  /** Whether QEMU took the failure as a broken postcopy channel and paused (it notices within moments). */
  private async pausedAfterFailure(): Promise<boolean> {
    for (const end = Date.now() + 3000; Date.now() < end; await pause(100)) {
      const info = await this.qmp.execute<MigrateInfo>('query-migrate').catch(() => null)
      if (info === null || info.status === 'failed' || info.status === 'completed') return false
      if (info.status === 'postcopy-paused') return true
    }
    return false
  }

  /** After a failure: the load gone, settings back; the error says what state the destination is in. */
  private async recover(err: unknown, peer: Peer): Promise<SnapError> {
    let e = err instanceof SnapError ? err : fromSystemError(err, 'restoring')
    const qemuAlive = !this.qmp.closed
    if (!qemuAlive && e.code !== 'SNAP_QEMU_GONE') e = new SnapError('SNAP_QEMU_GONE', e.message, { cause: e })
    if (this.incoming && this.postcopyAt === null && (await peer.waitExit({ timeoutMs: 2000 })) === undefined) {
      await peer.kill('SIGTERM')
      await peer.waitExit({ timeoutMs: 5000 })
    }
    let after: string
    if (!qemuAlive) after = 'the image is unchanged'
    else if (!this.incoming) {
      if (!this.opts.recover) for (const p of await this.settings.restore()) this.log(`could not restore a migration setting: ${p}`)
      after = this.opts.recover ? 'the destination is still postcopy-paused' : 'the destination still waits for a migration'
    } else if ((this.postcopyAt !== null || this.opts.recover) && (await this.pausedAfterFailure())) {
      after = `the destination is postcopy-paused, its VM waiting for the rest of its pages: continue with snapctl restore ${this.path} --qmp ${this.opts.qmp} --lazy --recover`
    } else after = 'the destination QEMU cannot be used any more: quit it and start a new one'
    const message = e.code === 'SNAP_QEMU_GONE' ? `QEMU exited (or closed its QMP socket) during the restore` : e.message
    return new SnapError(e.code, `${message} (${after})`, { ...e.context, after, cause: e })
  }
}

function lazyFigures(lazy: boolean, s: Partial<PostcopyStats & { recordedPages: number }>): Pick<RestoreResult, 'latencyMs' | 'deviceStateSeconds' | 'phasesMs' | 'pagesServedOnRequest' | 'prefetchedPages' | 'precopiedPages' | 'prefetchedTouched' | 'recordedPages'> {
  const v = <T>(x: T | undefined): T | null => (lazy && x !== undefined ? x : null)
  return {
    latencyMs: v(s.latencyMs), deviceStateSeconds: v(s.deviceStateSeconds), phasesMs: v(s.phasesMs), pagesServedOnRequest: v(s.pagesServedOnRequest),
    prefetchedPages: v(s.prefetchedPages), precopiedPages: v(s.precopiedPages), prefetchedTouched: v(s.prefetchedTouched), recordedPages: v(s.recordedPages),
  }
}

async function peerFailed(peer: Peer, status: number | undefined): Promise<SnapError> {
  const said = (await peer.stderr()).split('\n').pop() ?? ''
  return new SnapError('SNAP_INTERNAL', status === undefined
    ? `the snapctl load that QEMU ran is gone without an exit status${said ? `: ${said}` : ''}`
    : `the snapctl load that QEMU ran exited with status ${status}${said ? `: ${said}` : ''}`)
}
