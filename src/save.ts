// `snapctl save IMAGE --qmp SOCKET`: a running QEMU's RAM and device state into an image, over
// QMP, with success meaning success (QEMU ignores an exec: peer's exit status; we do not).
//
//   check the VM and its migration state -> hold IMAGE's lock -> settings for the save
//   (capabilities off, bandwidth unlimited) -> stop (unless --live) -> migrate "exec:snapctl
//   create DIR/image" -> follow query-migrate -> the create exits 0 -> rename DIR/image (and
//   its index) to IMAGE -> settings back -> cont (with --resume, if it was running)
//
// DIR is a private directory beside IMAGE, so the finished image is renamed, never copied, and
// an image is published only once both QEMU and the create said it is complete. On any failure
// the migration is cancelled, DIR is removed, settings go back, and a VM that was running runs
// again.
import { link, mkdtemp, open, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { basename, dirname, join, resolve } from 'node:path'
import { MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE, isPowerOfTwo } from './container/header.js'
import { lockedError, partialPath, runningCreates } from './container/lock.js'
import { openBaseFor } from './container/chain.js'
import { SnapError, fromSystemError, isSnapError } from './errors.js'
import { ACTIVE, RateMeter, abortedError, imagePages, pause, waitInactive, type MigrateInfo, type ProgressListener } from './qemu/migration.js'
import { Peer } from './qemu/peer.js'
import { QmpClient } from './qemu/qmp.js'
import { MigrationSettings, UNLIMITED_BANDWIDTH } from './qemu/settings.js'
import { isS3Url } from './s3/url.js'

export interface SaveOptions {
  /** QEMU's QMP socket */
  qmp: string
  /** precopy while the VM runs; QEMU stops it for the last pages */
  live?: boolean
  /** let a VM that was running run on after the save (default: left paused) */
  resume?: boolean
  compress?: 'lz4' | 'none'
  clusterSize?: number
  /** an incremental image over this base (create --base) */
  base?: string
  /** create --dedupe: pages whose bytes the image holds already share its slot */
  dedupe?: boolean
  force?: boolean
  sync?: boolean
  /** the create writes the image with O_DIRECT, around the host's page cache (`create --bypass-cache`) */
  bypassCache?: boolean
  signal?: AbortSignal
  onProgress?: ProgressListener
  log?: (msg: string) => void
  /** QMP connect and command timeout (default 10 s) */
  timeoutMs?: number
  /**
   * multifd with this many channels, over a unix socket to `snapctl create --listen` (issue 13);
   * absent or 0: one `exec:` pipe, the default (commands/save.ts --channels says why)
   */
  channels?: number
}

export interface SaveResult {
  image: string
  /** the image file's size */
  fileBytes: number
  /** the same: the issue's and virsh's name for it */
  bytes: number
  /** migration stream bytes the create read */
  bytesIn: number | null
  /** the RAM blocks' whole size */
  ramBytes: number
  seconds: number
  /** how long the guest was stopped by the save (QEMU's figure with --live); null if it was not running */
  downtimeMs: number | null
  /** the same in milliseconds, under the name QEMU's query-migrate gives it */
  downtime: number | null
  pages: number
  zeroPages: number
  storedPages: number
  live: boolean
  /** the VM's run state afterwards */
  vm: 'running' | 'paused'
  /** capabilities turned off for the save and back on afterwards */
  capabilitiesOff: string[]
}

/** How long QEMU may take to answer while it waits for its exec: child to exit. */
const QEMU_BLOCKED_MS = 3600_000

/** Run states a migration cannot start from (QEMU's RunState). */
const UNSAVEABLE: Record<string, string> = {
  inmigrate: 'it is waiting for an incoming migration (started with -incoming)',
  'finish-migrate': 'it is finishing a migration',
  'save-vm': 'it is saving a snapshot',
  'restore-vm': 'it is loading a snapshot',
  colo: 'it is in COLO mode',
}

export async function saveVm(image: string, opts: SaveOptions): Promise<SaveResult> {
  // s3://: the create QEMU runs uploads it (multipart: the object appears only when complete).
  const s3 = isS3Url(image)
  const path = s3 ? image : resolve(image)
  // What the create would refuse, refused before the VM is touched.
  const clusterSize = opts.clusterSize ?? 1 << 20
  if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
    throw new SnapError('SNAP_USAGE', `cluster size ${clusterSize} must be a power of two from 64 KiB to 64 MiB`)
  }
  if (s3 && opts.base !== undefined) throw new SnapError('SNAP_USAGE', '--base: an incremental image refers to its base by a local path: it needs a local image, not s3://')
  if (s3) await (await import('./container/s3-upload.js')).refuseExisting(path, opts.force === true)
  else await checkTarget(path, opts.force === true)
  // A base that would be refused is refused before the VM is touched.
  if (opts.base !== undefined) await (await openBaseFor(opts.base, path)).close()
  const lock = s3 ? null : await takeLock(path)
  let work: string | undefined
  let qmp: QmpClient | undefined
  try {
    const beside = s3 ? join(tmpdir(), 'snapctl-save-') : join(dirname(path), `.${basename(path)}.save-`)
    work = await mkdtemp(beside).catch((e) => {
      throw fromSystemError(e, `creating a work directory ${beside}`)
    })
    qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 10_000, waitForSocketMs: 500 })
    return await new Save(path, opts, qmp, new Peer(work)).run()
  } finally {
    qmp?.close()
    if (work) await rm(work, { recursive: true, force: true }).catch(() => {})
    if (lock) {
      await lock.close().catch(() => {})
      await unlink(partialPath(path)).catch(() => {})
    }
  }
}

class Save {
  private readonly started = performance.now()
  private readonly settings: MigrationSettings
  private readonly log: (msg: string) => void
  private wasRunning = false
  private migrateIssued = false
  private migrating = false
  private stoppedAt: number | null = null

  constructor(
    private readonly path: string,
    private readonly opts: SaveOptions,
    private readonly qmp: QmpClient,
    private readonly peer: Peer,
  ) {
    this.settings = new MigrationSettings(qmp)
    this.log = opts.log ?? (() => {})
  }

  async run(): Promise<SaveResult> {
    const state = await this.qmp.execute<{ status: string; running: boolean }>('query-status')
    if (state.status in UNSAVEABLE) throw new SnapError('SNAP_VM_STATE', `the VM cannot be saved now: ${UNSAVEABLE[state.status]}`, { runState: state.status })
    const mig = await this.qmp.execute<MigrateInfo>('query-migrate')
    if (ACTIVE.has(mig.status ?? '')) throw new SnapError('SNAP_MIGRATION_ACTIVE', `a migration of this VM is already ${mig.status}: wait for it or cancel it (migrate_cancel)`, { status: mig.status })
    this.wasRunning = state.running
    let capabilitiesOff: string[] = []
    let done: MigrateInfo
    try {
      this.checkAbort()
      const n = this.opts.channels
      const changes = await this.settings.apply(n ? ['multifd'] : [], { 'max-bandwidth': UNLIMITED_BANDWIDTH, mode: 'normal', ...(n ? { 'multifd-channels': n } : {}) })
      capabilitiesOff = changes.off
      if (changes.off.length > 0) this.log(`migration capabilities off for the save (restored afterwards): ${changes.off.join(', ')}`)
      this.checkAbort()
      if (this.wasRunning && !this.opts.live) {
        await this.qmp.execute('stop')
        this.stoppedAt = performance.now()
      }
      const s3 = isS3Url(this.path)
      const tmp = s3 ? this.path : join(this.peer.dir, 'image')
      const args = ['create', tmp, ...(s3 && this.opts.force ? ['--force'] : []), '--compress', this.opts.compress ?? 'lz4', '--cluster-size', String(this.opts.clusterSize ?? 1 << 20)]
      if (this.opts.sync) args.push('--sync')
      if (this.opts.bypassCache) args.push('--bypass-cache')
      if (this.opts.dedupe) args.push('--dedupe')
      if (this.opts.base !== undefined) args.push('--base', resolve(this.opts.base), '--base-relative-to', dirname(this.path))
      this.migrateIssued = true
      if (n) {
        // QEMU connects to the create, which must listen first.
        this.peer.start([...args, '--listen', `unix:${this.peer.socket}`])
        if (!(await this.peer.waitSocket())) throw (await this.peer.error()) ?? new SnapError('SNAP_INTERNAL', 'snapctl create --listen did not start listening')
      }
      await this.qmp.execute('migrate', { uri: n ? `unix:${this.peer.socket}` : this.peer.uri(args) })
      this.migrating = true
      done = await this.follow()
      this.migrating = false
      await this.finishImage()
      for (const note of await this.peer.notes()) this.log(note)
      this.checkAbort()
      if (!s3) await publish(tmp, this.path, this.opts.force === true, this.opts.sync === true)
    } catch (e) {
      throw await this.recover(e)
    }
    // The image is in place: nothing after this takes it back.
    for (const p of await this.settings.restore()) this.log(`could not restore a migration setting: ${p}`)
    const resume = this.opts.resume === true && this.wasRunning
    if (resume) {
      await this.qmp.execute('cont').catch((e: Error) => {
        throw new SnapError(isSnapError(e) ? e.code : 'SNAP_QMP', `the image ${this.path} was saved, but the VM could not be resumed: ${e.message}`, { cause: e })
      })
    }
    const downtimeMs = !this.wasRunning ? null : this.opts.live ? (done.downtime ?? null) : Math.round(performance.now() - this.stoppedAt!)
    const counts = await imagePages(this.path)
    const stats = await this.peer.stats<{ bytesIn?: number }>()
    return {
      image: this.path, fileBytes: counts.fileBytes, bytes: counts.fileBytes, bytesIn: stats?.bytesIn ?? null, ramBytes: counts.ramBytes,
      seconds: (performance.now() - this.started) / 1000,
      downtimeMs, downtime: downtimeMs, pages: counts.pages, zeroPages: counts.zeroPages, storedPages: counts.storedPages,
      live: this.opts.live === true, vm: resume ? 'running' : 'paused', capabilitiesOff,
    }
  }

  private checkAbort(): void {
    if (this.opts.signal?.aborted) throw abortedError('the save was stopped')
  }

  /** Polls query-migrate until QEMU has sent everything; throws on failure. */
  private async follow(): Promise<MigrateInfo> {
    const meter = new RateMeter()
    for (;;) {
      this.checkAbort()
      const info = await this.queryMigrate()
      if (info.status === 'completed') return info
      if (info.status === 'failed' || info.status === 'cancelled') {
        // The create usually failed first (no space, a bad stream) and QEMU only saw a broken pipe.
        await this.peer.waitExit({ timeoutMs: 5000 })
        const peerError = await this.peer.error()
        if (peerError) throw peerError
        throw new SnapError('SNAP_MIGRATION_FAILED', `QEMU's migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`)
      }
      const status = await this.peer.exitStatus()
      if (status !== undefined && status !== 0) throw (await this.peer.error()) ?? (await this.peerFailed(status))
      const ram = info.ram
      if (ram && this.opts.onProgress) {
        // QEMU's mbps is megabits (10^6) per second.
        const rate = ram.mbps > 0 ? (ram.mbps * 1e6) / 8 : meter.add(ram.transferred)
        this.opts.onProgress({
          phase: 'migrating', percent: ram.total > 0 ? (100 * (ram.total - ram.remaining)) / ram.total : null,
          bytes: ram.transferred, totalBytes: ram.total, rate, seconds: (performance.now() - this.started) / 1000,
        })
      }
      await pause(200, this.opts.signal)
    }
  }

  /**
   * query-migrate, which QEMU answers only after its exec: child has exited once the stream is
   * sent (it waits for the child in its main loop): while the create completes the image, the
   * answer can take as long as that, and this says "finishing".
   */
  private async queryMigrate(): Promise<MigrateInfo> {
    let settled = false
    const q = this.qmp.execute<MigrateInfo>('query-migrate', undefined, { timeoutMs: QEMU_BLOCKED_MS })
    q.then(() => (settled = true), () => (settled = true))
    for (let waited = 0; !settled; waited++) {
      await Promise.race([q.catch(() => {}), pause(500)])
      if (!settled && waited > 0) this.finishing()
    }
    return q
  }

  private finishing(): void {
    this.opts.onProgress?.({ phase: 'finishing', percent: 100, bytes: 0, totalBytes: null, rate: null, seconds: (performance.now() - this.started) / 1000 })
  }

  /** QEMU has sent everything; the create completes the image (compaction, index) and exits. */
  private async finishImage(): Promise<void> {
    this.finishing()
    const ac = new AbortController()
    const onAbort = (): void => ac.abort()
    this.opts.signal?.addEventListener('abort', onAbort, { once: true })
    let status: number | undefined
    try {
      const exited = this.peer.waitExit({ startMs: 5000 })
      status = await Promise.race([exited, new Promise<undefined>((res) => ac.signal.addEventListener('abort', () => res(undefined), { once: true }))])
    } finally {
      this.opts.signal?.removeEventListener('abort', onAbort)
    }
    this.checkAbort()
    if (status === 0) return
    throw (await this.peer.error()) ?? (await this.peerFailed(status))
  }

  private async peerFailed(status: number | undefined): Promise<SnapError> {
    const said = (await this.peer.stderr()).split('\n').pop() ?? ''
    return new SnapError('SNAP_INTERNAL', status === undefined
      ? `the snapctl create that QEMU ran is gone without an exit status${said ? `: ${said}` : ''}`
      : `the snapctl create that QEMU ran exited with status ${status}${said ? `: ${said}` : ''}`)
  }

  /**
   * After a failure: cancel the migration, wait for the create to go (it sees its input end and
   * removes its partial file), settings back, the VM running again if it was; returns the error
   * to report, with what became of the VM.
   */
  private async recover(err: unknown): Promise<SnapError> {
    let e = err instanceof SnapError ? err : fromSystemError(err, 'saving')
    const qemuAlive = !this.qmp.closed
    if (!qemuAlive && e.code !== 'SNAP_QEMU_GONE') e = new SnapError('SNAP_QEMU_GONE', e.message, { cause: e })
    if (qemuAlive && this.migrating) {
      await this.qmp.execute('migrate_cancel', undefined, { timeoutMs: QEMU_BLOCKED_MS }).catch(() => {})
      await waitInactive(this.qmp)
    }
    // Interrupted while the create completes the image: it need not finish what is thrown away.
    if (this.opts.signal?.aborted) await this.peer.kill('SIGTERM')
    if (this.migrateIssued && (await this.peer.waitExit({ timeoutMs: 30_000 })) === undefined) {
      await this.peer.kill('SIGTERM')
      await this.peer.waitExit({ timeoutMs: 5000 })
    }
    let after = 'no image was written'
    if (qemuAlive) {
      for (const p of await this.settings.restore()) this.log(`could not restore a migration setting: ${p}`)
      if (this.wasRunning) {
        const now = await this.qmp.execute<{ running: boolean }>('query-status').catch(() => undefined)
        if (now && !now.running) {
          await this.qmp.execute('cont').then(
            () => (after += '; the VM runs again'),
            (c: Error) => (after += `; the VM could not be resumed: ${c.message}`),
          )
        } else if (now) after += '; the VM runs on'
      }
    }
    // The create wrote into the work directory: name the image, not the temporary files.
    const message = e.code === 'SNAP_QEMU_GONE' ? `QEMU exited (or closed its QMP socket) during the save` : e.message.split(/(\s+)/).map((w) => (w.startsWith(this.peer.dir) ? w.replace(/^[^:]*/, this.path) : w)).join('')
    return new SnapError(e.code, `${message} (${after})`, { ...e.context, after, cause: e })
  }
}

/** SNAP_EXISTS unless forced; the directory must exist. */
async function checkTarget(path: string, force: boolean): Promise<void> {
  const dir = await stat(dirname(path)).catch((e) => {
    throw fromSystemError(e, `the directory of ${path}`)
  })
  if (!dir.isDirectory()) throw new SnapError('SNAP_USAGE', `${dirname(path)} is not a directory`)
  const st = await stat(path).catch(() => null)
  if (st?.isDirectory()) throw new SnapError('SNAP_USAGE', `${path} is a directory, not an image`)
  if (st && !force) throw new SnapError('SNAP_EXISTS', `${path} exists (use --force to replace it)`)
}

/**
 * Holds IMAGE's partial file open for the whole save, as a create does (container/lock.ts):
 * other creates of the path, and load and verify of it, see SNAP_LOCKED meanwhile.
 */
async function takeLock(path: string): Promise<FileHandle> {
  const before = await runningCreates(path)
  if (before.length > 0) throw lockedError(path, before)
  const own = partialPath(path)
  const fh = await open(own, 'w', 0o600).catch((e) => {
    throw fromSystemError(e, `creating ${own}`)
  })
  // Of two that start together, both see the other now: both give up rather than both go on.
  const after = await runningCreates(path)
  if (after.length > 0) {
    await fh.close()
    await unlink(own).catch(() => {})
    throw lockedError(path, after)
  }
  return fh
}

/** Renames the finished image and its index from the work directory to their names. */
async function publish(tmp: string, path: string, force: boolean, sync: boolean): Promise<void> {
  try {
    if (force) {
      await rename(tmp, path)
    } else {
      try {
        await link(tmp, path) // EEXIST, not a replaced image, if one appeared meanwhile
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new SnapError('SNAP_EXISTS', `${path} appeared during the save (use --force to replace it)`)
        throw e
      }
      await unlink(tmp)
    }
    const index = `${path}.index`
    if (await stat(`${tmp}.index`).then(() => true, () => false)) {
      const old = `${index}.old-${process.pid}`
      const hadOld = await rename(index, old).then(() => true, () => false)
      await rename(`${tmp}.index`, index)
      if (hadOld) await rm(old, { recursive: true, force: true })
    }
    if (sync) {
      const dir = await open(dirname(path), 'r')
      await dir.sync().finally(() => dir.close())
    }
  } catch (e) {
    throw fromSystemError(e, `renaming the saved image to ${path}`)
  }
}
