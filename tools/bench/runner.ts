// One timed sample: a save of the source VM, or a restore into a fresh destination VM.
//
// Save:    from the `migrate` command to the moment the output is complete: QEMU's MIGRATION
//          event says `completed` and, for exec:, the command has exited with status 0 (QEMU can
//          report `completed` while the command is still writing its file).
// Restore: from `migrate-incoming` to the destination's `completed`; the destination was started
//          (paused, -incoming defer) before the clock started. Then its RAM file must equal the
//          source's byte for byte, or the whole run fails.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, lstatSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { QmpError } from '../qmp.js'
import { Vm, filesEqual } from '../vm.js'
import { migrationUri, peerCommand, type Capabilities, type Contender, type RssProbe, type SampleFiles } from './contenders.js'

/** Runs `cmd` to its end: exit code, stdout, stderr. */
export function runToEnd(cmd: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd[0], cmd.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

export interface DiskUse {
  /** st_blocks × 512, summed over every file the contender wrote (image and index) */
  alloc: number
  /** st_size, summed the same way */
  logical: number
  files: Array<{ path: string; alloc: number; logical: number }>
}

export interface Sample {
  rep: number
  /** position within its repetition (0 = first) */
  order: number
  seconds: number
  rssKiB?: number
  /** snapctl's user+sys CPU seconds and page faults (minor+major), from its own process.resourceUsage() */
  cpuS?: number
  faults?: number
  /** snapctl only: share of the image resident in the page cache once the sample is done (fincore) */
  cached?: number
  disk?: DiskUse
}

/** bytes/s: far above any disk or pipe, so that no contender is throttled */
export const MAX_BANDWIDTH = 2 ** 40

/** Thrown when a restore yields RAM that differs from the source: the run stops. */
export class MismatchError extends Error {}

export interface BenchContext {
  work: string
  sizeBytes: number
  memMiB: number
  multifdChannels: number
  timeoutMs: number
  /** the source VM; replaced by restartSource() if QEMU refuses a second migration */
  src: Vm
  restartSource: () => Promise<Vm>
  /** whether the source has completed a migration since it started, and whether QEMU then refuses another */
  sourceMigrated: boolean
  refusesRemigrate?: boolean
  log: (msg: string) => void
}

export function sampleFiles(work: string, id: string, phase: 'save' | 'restore'): SampleFiles {
  const base = join(work, `${phase}-${id.replace(/[^\w.-]/g, '_')}`)
  return {
    out: join(work, `out-${id.replace(/[^\w.-]/g, '_')}`),
    done: `${base}.done`,
    err: `${base}.stderr`,
    rusage: `${base}.rusage.json`,
    time: `${base}.time`,
    sock: `${base}.sock`,
  }
}

/** Everything a save of `id` may leave behind: the output, snapctl's index, its `.NAME.partial-PID`. */
export function removeOutputs(work: string, f: SampleFiles): void {
  const name = f.out.slice(work.length + 1)
  for (const e of readdirSync(work)) {
    if (e === name || e.startsWith(`${name}.`) || e.startsWith(`.${name}.`)) rmSync(join(work, e), { recursive: true, force: true })
  }
}

export function removeSideFiles(f: SampleFiles): void {
  for (const p of [f.done, f.err, f.rusage, f.time, f.sock]) rmSync(p, { force: true })
}

export async function runSave(ctx: BenchContext, c: Contender, probe: RssProbe = 'rusage'): Promise<Omit<Sample, 'rep' | 'order'>> {
  const f = sampleFiles(ctx.work, c.id, 'save')
  removeOutputs(ctx.work, f)
  removeSideFiles(f)
  const uri = migrationUri(c, f, probe, ctx.multifdChannels)
  if (c.socket) await startPeer(c, f, probe, ctx.multifdChannels, true)
  if (ctx.sourceMigrated && ctx.refusesRemigrate) {
    await ctx.restartSource()
    ctx.sourceMigrated = false
  }
  await setOptions(ctx.src, c.caps, ctx.multifdChannels)

  let watch = watchMigration(ctx.src, ctx.timeoutMs)
  let t0 = performance.now()
  try {
    await ctx.src.qmp.execute('migrate', { uri })
  } catch (err) {
    watch.stop()
    if (!(err instanceof QmpError)) throw err
    // A source that has completed a migration is in `postmigrate`; if this QEMU will not migrate
    // from there again, start it afresh from the same RAM file.
    if (!ctx.sourceMigrated) throw err
    ctx.log(`QEMU refuses to migrate a source again ("${err.desc}"): the source VM is restarted from its RAM file before each save, off the clock`)
    ctx.refusesRemigrate = true
    await ctx.restartSource()
    ctx.sourceMigrated = false
    await setOptions(ctx.src, c.caps, ctx.multifdChannels)
    watch = watchMigration(ctx.src, ctx.timeoutMs)
    t0 = performance.now()
    await ctx.src.qmp.execute('migrate', { uri })
  }
  const [ended, exited] = await Promise.all([
    watch.done.catch(async (err) => {
      await ctx.src.qmp.execute('migrate_cancel').catch(() => {})
      throw err
    }),
    c.exec || c.socket ? waitDoneFile(f, ctx.timeoutMs) : Promise.resolve(undefined),
  ])
  if (ended.status === 'completed') ctx.sourceMigrated = true
  if (ended.status !== 'completed') {
    throw new Error(`${c.id}: migration ${ended.status}: ${await migrationError(ctx.src)}${childStderr(f)}`)
  }
  if (exited && exited.status !== 0) throw new Error(`${c.id}: the exec: command exited with status ${exited.status}${childStderr(f)}`)
  const t1 = Math.max(ended.at, exited?.at ?? 0)
  return { seconds: (t1 - t0) / 1000, ...readUsage(f, probe), cached: c.snapctl ? cachedShare(f.out) : undefined, disk: diskUse(ctx.work, f) }
}

export async function runRestore(ctx: BenchContext, c: Contender, from: string, rep: number, probe: RssProbe = 'rusage'): Promise<Omit<Sample, 'rep' | 'order'>> {
  const input = sampleFiles(ctx.work, from, 'save')
  if (!existsSync(input.out)) throw new Error(`${c.id}: no input: ${input.out} (did the ${from} save fail?)`)
  const f = { ...sampleFiles(ctx.work, c.id, 'restore'), out: input.out }
  removeSideFiles(f)
  const dst = await Vm.start({
    name: `dst-${c.id.replace(/[^\w-]/g, '_')}-${rep}`,
    memMiB: ctx.memMiB,
    paused: true,
    incoming: 'defer',
    dir: ctx.work,
  })
  try {
    await setOptions(dst, c.caps, ctx.multifdChannels)
    const watch = watchMigration(dst, ctx.timeoutMs)
    const t0 = performance.now()
    await dst.qmp.execute('migrate-incoming', { uri: migrationUri(c, f, probe, ctx.multifdChannels) })
    if (c.socket) await startPeer(c, f, probe, ctx.multifdChannels, false)
    const ended = await watch.done
    if (ended.status !== 'completed') {
      throw new Error(`${c.id}: incoming migration ${ended.status}: ${await migrationError(dst)}${childStderr(f)}\n  QEMU: ${tail(dst.stderr)}`)
    }
    const seconds = (ended.at - t0) / 1000
    const q = await dst.qmp.execute<{ status?: string }>('query-migrate')
    if (q.status !== 'completed') throw new Error(`${c.id}: MIGRATION event said completed, query-migrate says ${q.status}`)
    if (c.exec || c.socket) {
      const exited = await waitDoneFile(f, ctx.timeoutMs)
      if (exited.status !== 0) throw new Error(`${c.id}: the exec: command exited with status ${exited.status}${childStderr(f)}`)
    }
    const same = await filesEqual(ctx.src.memPath, dst.memPath)
    if (!same.equal) {
      throw new MismatchError(`${c.id}: restored RAM differs from the source at byte ${same.firstDiff} (${ctx.src.memPath} vs ${dst.memPath})`)
    }
    return { seconds, ...readUsage(f, probe), cached: c.snapctl ? cachedShare(f.out) : undefined }
  } finally {
    await dst.quit({ timeoutMs: 5000 }).catch(() => dst.kill())
  }
}

/** Share of `file` resident in the page cache (fincore, util-linux), or undefined without fincore. */
export function cachedShare(file: string): number | undefined {
  const r = spawnSync('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES,SIZE', file], { encoding: 'utf8' })
  const [res, size] = (r.stdout ?? '').trim().split(/\s+/).map(Number)
  return r.status === 0 && size! > 0 ? res! / size! : undefined
}

/** Runs a socket contender's command; a listening one (a save's create) until its socket is there. */
async function startPeer(c: Contender, f: SampleFiles, probe: RssProbe, channels: number, listens: boolean): Promise<void> {
  const child = spawn('/bin/sh', ['-c', peerCommand(c, f, probe, channels)], { stdio: 'ignore' })
  child.on('error', () => {})
  child.unref()
  if (!listens) return
  for (const end = performance.now() + 20_000; !existsSync(f.sock); await sleep(5)) {
    if (performance.now() > end || existsSync(f.done)) throw new Error(`${c.id}: the listening command did not start${childStderr(f)}`)
  }
}

/** Sets every capability the contenders touch, each time: capabilities persist on a VM. */
async function setOptions(vm: Vm, caps: Capabilities, channels: number): Promise<void> {
  const all: Record<string, boolean> = { events: true, ...caps }
  await vm.qmp.execute('migrate-set-capabilities', {
    capabilities: Object.entries(all).map(([capability, state]) => ({ capability, state })),
  })
  // QEMU's default max-bandwidth (128 MiB/s) would make every path equally slow: lift it.
  await vm.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels, 'max-bandwidth': MAX_BANDWIDTH })
}

/**
 * Resolves at the first MIGRATION event with a final status (needs the `events` capability).
 * Listening to the event, not polling query-migrate, puts the end of the clock within a
 * millisecond of QEMU's own state change. Call before the command that starts the migration.
 */
function watchMigration(vm: Vm, timeoutMs: number): { done: Promise<{ status: string; at: number }>; stop: () => void } {
  let stop = (): void => {}
  const done = new Promise<{ status: string; at: number }>((resolve, reject) => {
    const onEvent = (e: { data?: { status?: unknown } }): void => {
      const status = String(e.data?.status)
      if (status === 'completed' || status === 'failed' || status === 'cancelled') {
        const at = performance.now()
        stop()
        resolve({ status, at })
      }
    }
    const onClosed = (err: Error): void => {
      stop()
      reject(new Error(`${vm.name}: QMP closed during the migration: ${err.message}\n  QEMU: ${tail(vm.stderr)}`))
    }
    const timer = setTimeout(() => {
      stop()
      reject(new Error(`${vm.name}: migration not finished within ${timeoutMs} ms`))
    }, timeoutMs)
    stop = () => {
      clearTimeout(timer)
      vm.qmp.off('MIGRATION', onEvent)
      vm.qmp.off('closed', onClosed)
    }
    vm.qmp.on('MIGRATION', onEvent)
    vm.qmp.on('closed', onClosed)
  })
  done.catch(() => {})
  return { done, stop }
}

/** Polls for `echo $? > done` (5 ms: the file appears once, right after the command exits). */
async function waitDoneFile(f: SampleFiles, timeoutMs: number): Promise<{ status: number; at: number }> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    let text = ''
    try {
      text = readFileSync(f.done, 'utf8')
    } catch {}
    if (text.endsWith('\n')) return { status: Number(text.trim()), at: performance.now() }
    if (performance.now() > deadline) throw new Error(`the exec: command did not finish within ${timeoutMs} ms${childStderr(f)}`)
    await sleep(5)
  }
}

async function migrationError(vm: Vm): Promise<string> {
  const info = await vm.qmp.execute<{ 'error-desc'?: string }>('query-migrate').catch(() => undefined)
  return info?.['error-desc'] ?? 'no error-desc'
}

function childStderr(f: SampleFiles): string {
  try {
    const s = readFileSync(f.err, 'utf8').trim()
    return s ? `\n  command stderr: ${tail(s)}` : ''
  } catch {
    return ''
  }
}

function tail(s: string, n = 1500): string {
  return s.length > n ? `...${s.slice(-n)}` : s
}

/**
 * Peak RSS in KiB, CPU seconds and page faults from snapctl's own report (process.resourceUsage()
 * at exit), or the peak RSS alone from /usr/bin/time on probe runs.
 */
function readUsage(f: SampleFiles, probe: RssProbe): Pick<Sample, 'rssKiB' | 'cpuS' | 'faults'> {
  try {
    if (probe === 'time') {
      const n = Number(readFileSync(f.time, 'utf8').trim().split('\n').pop())
      return { rssKiB: Number.isFinite(n) && n > 0 ? n : undefined }
    }
    const ru = JSON.parse(readFileSync(f.rusage, 'utf8')) as Record<string, unknown>
    const num = (k: string): number | undefined => (typeof ru[k] === 'number' ? (ru[k] as number) : undefined)
    const user = num('userCPUTime')
    const sys = num('systemCPUTime')
    const minor = num('minorPageFault')
    const major = num('majorPageFault')
    return {
      rssKiB: (num('maxRSS') ?? 0) > 0 ? num('maxRSS') : undefined,
      cpuS: user !== undefined && sys !== undefined ? (user + sys) / 1e6 : undefined,
      faults: minor !== undefined && major !== undefined ? minor + major : undefined,
    }
  } catch {
    return {}
  }
}

export function diskUse(work: string, f: SampleFiles): DiskUse {
  const name = f.out.slice(work.length + 1)
  const files: DiskUse['files'] = []
  const walk = (p: string): void => {
    const st = lstatSync(p)
    if (st.isDirectory()) for (const e of readdirSync(p)) walk(join(p, e))
    else files.push({ path: p, alloc: st.blocks * 512, logical: st.size })
  }
  for (const e of readdirSync(work)) if (e === name || e.startsWith(`${name}.`)) walk(join(work, e))
  return {
    alloc: files.reduce((s, x) => s + x.alloc, 0),
    logical: files.reduce((s, x) => s + x.logical, 0),
    files,
  }
}
