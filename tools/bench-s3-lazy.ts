// Lazy restores from object storage against lazy restores of the local file, side by side
// (`node dist/tools/bench-s3.js --lazy`, README "Images in object storage"), alternating
// local / s3:// with a fresh --cache-dir (cold) / s3:// with a warm one, RUNS rounds:
// 1. a paused synthetic VM (MEM MiB filled by fillRam(seed 16)) restored with
//    migrate-incoming "exec:snapctl load --postcopy IMAGE": ms to postcopy-active (the VM could
//    run), s to completed, the load's CPU (user+sys, /usr/bin/time); RAM compared byte for byte;
// 2. the Linux guest (tools/linux-guest.ts, 512 MiB, memwork) with a recorded working set,
//    `restore IMAGE --lazy`: s until the VM runs (query-status), then the guest workload after
//    resume: s from running to its HEARTBEATS-th heartbeat (memwork checks its data in each: all
//    must be ok), and the page requests it made.
import { PutObjectCommand, type S3Client } from '@aws-sdk/client-s3'
import { existsSync, readFileSync, rmSync } from 'node:fs'
import { SerialLog, linuxGuestVm } from './linux-guest.js'
import { fillRam, filesEqual, type Vm } from './vm.js'
import { Workdir, execCreate, execUri, parseJson, snapctl, waitStatus } from '../test/integration/helpers.js'

const MiB = 1 << 20
const HEARTBEATS = 5
type Kind = 'local' | 'cold' | 'warm'
const KINDS: Kind[] = ['local', 'cold', 'warm']

export interface LazyBenchOptions {
  runs: number
  memMiB: number
  guest: boolean
  s3: S3Client
  bucket: string
}

const median = (a: number[]): number => [...a].sort((x, y) => x - y)[a.length >> 1]
function cell(xs: number[], digits: number, base?: number[]): string {
  if (xs.length === 0) return 'n/a'
  const ratio = base && base.length ? ` (${(median(xs) / median(base)).toFixed(2)}x)` : ''
  return `${median(xs).toFixed(digits)}${ratio}, ${Math.min(...xs).toFixed(digits)}-${Math.max(...xs).toFixed(digits)}`
}

async function upload(o: LazyBenchOptions, key: string, file: string): Promise<string> {
  await o.s3.send(new PutObjectCommand({ Bucket: o.bucket, Key: key, Body: readFileSync(file) }))
  return `s3://${o.bucket}/${key}`
}

/** Where each kind reads from, and the --cache-dir it gets (a fresh one per cold run). */
function source(w: Workdir, kind: Kind, local: string, url: string, run: string): { image: string; cache: string[] } {
  if (kind === 'local') return { image: local, cache: [] }
  const dir = kind === 'warm' ? w.path('cache-warm') : w.path(`cache-cold-${run}`)
  return { image: url, cache: ['--cache-dir', dir] }
}

interface SynthRun {
  activeMs: number
  completedS: number
  cpuS: number
}

async function synthOnce(w: Workdir, o: LazyBenchOptions, ram: string, image: string, cache: string[], tag: string): Promise<SynthRun> {
  const dst = await w.vm({ name: `lz-${tag}`, memMiB: o.memMiB, incoming: 'defer', keepMem: true })
  const [status, err, cpu] = [w.path(`${tag}.status`), w.path(`${tag}.stderr`), w.path(`${tag}.cpu`)]
  try {
    const uri = execUri(`load --postcopy ${image} ${cache.join(' ')}`, status, err).replace(/^exec:/, `exec:/usr/bin/time -f '%U %S' -o ${cpu} `)
    const t0 = performance.now()
    await dst.migrateIncoming(uri, { capabilities: { 'postcopy-ram': true } })
    const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 120_000 })
    const activeMs = performance.now() - t0
    if (active.status !== 'postcopy-active') throw new Error(`${tag}: ${JSON.stringify(active)}`)
    const done = await dst.waitMigration({ timeoutMs: 300_000 })
    const completedS = (performance.now() - t0) / 1000
    const code = await waitStatus(status)
    if (done.status !== 'completed' || code !== 0) throw new Error(`${tag}: ${done.status}, exit ${code}: ${readFileSync(err, 'utf8')}`)
    const same = await filesEqual(ram, dst.memPath)
    if (!same.equal) throw new Error(`${tag}: the restored RAM differs`)
    const [u, s] = readFileSync(cpu, 'utf8').trim().split('\n').pop()!.split(' ').map(Number)
    return { activeMs, completedS, cpuS: u + s }
  } finally {
    await dst.quit()
  }
}

async function synthetic(w: Workdir, o: LazyBenchOptions): Promise<string[]> {
  const ram = w.path('synth.ram')
  await fillRam(ram, o.memMiB * MiB, { seed: 16 })
  const src = await w.vm({ name: 'lz-src', memMiB: o.memMiB, memPath: ram })
  const local = w.path('synth.snap')
  await execCreate(w, src, local)
  await src.quit()
  const url = await upload(o, 'lazy/synth.snap', local)
  await synthOnce(w, o, ram, url, ['--cache-dir', w.path('cache-warm')], 'lz-fill') // fills the warm cache
  const r: Record<Kind, SynthRun[]> = { local: [], cold: [], warm: [] }
  for (let i = 0; i < o.runs; i++) {
    for (const k of KINDS) {
      const { image, cache } = source(w, k, local, url, `s${i}`)
      r[k].push(await synthOnce(w, o, ram, image, cache, `lz-${k}-${i}`))
      if (k === 'cold') rmSync(cache[1], { recursive: true, force: true })
    }
  }
  rmSync(ram, { force: true })
  const base = r.local
  return [
    `Paused ${o.memMiB} MiB synthetic VM, load --postcopy, ${o.runs} alternating runs, median (x local), range:`,
    '| | local file | s3://, fresh --cache-dir | s3://, warm --cache-dir |',
    '|---|---|---|---|',
    `| ms to postcopy-active (VM can run) | ${KINDS.map((k) => cell(r[k].map((x) => x.activeMs), 0, k === 'local' ? undefined : base.map((x) => x.activeMs))).join(' | ')} |`,
    `| s to completed | ${KINDS.map((k) => cell(r[k].map((x) => x.completedS), 2, k === 'local' ? undefined : base.map((x) => x.completedS))).join(' | ')} |`,
    `| load CPU user+sys, s | ${KINDS.map((k) => cell(r[k].map((x) => x.cpuS), 2)).join(' | ')} |`,
  ]
}

const logs: SerialLog[] = []

async function guestVm(w: Workdir, name: string, incoming?: string): Promise<{ vm: Vm; qmp: string; log: SerialLog }> {
  const qmp = w.path(`${name}-snapctl.qmp`)
  const vm = await w.vm(linuxGuestVm(name, qmp, incoming))
  const log = new SerialLog(vm.logPath)
  logs.push(log)
  return { vm, qmp, log }
}

interface GuestRun {
  runnableS: number
  workloadS: number
  requests: number
}

async function guestOnce(w: Workdir, image: string, cache: string[], tag: string, extra: string[] = []): Promise<GuestRun & { json: any }> {
  const dst = await guestVm(w, tag, 'defer')
  try {
    const t0 = performance.now()
    const restore = snapctl(['restore', image, '--qmp', dst.qmp, '--lazy', '--json', ...cache, ...extra])
    let running = 0
    for (; running === 0; ) {
      const st = await dst.vm.qmp.execute<{ status: string }>('query-status')
      if (st.status === 'running') running = performance.now()
      else await new Promise((r) => setTimeout(r, 5))
    }
    const hbs = await dst.log.waitHeartbeats(HEARTBEATS, 120_000, running)
    const bad = hbs.find((h) => !h.ok)
    if (bad) throw new Error(`${tag}: ${bad.text}`)
    const r = await restore
    if (r.code !== 0) throw new Error(`${tag}: ${r.stderr}`)
    const json = parseJson(r)
    return { runnableS: (running - t0) / 1000, workloadS: (hbs[HEARTBEATS - 1].at - running) / 1000, requests: json.requests, json }
  } finally {
    await dst.vm.quit()
  }
}

async function guest(w: Workdir, o: LazyBenchOptions): Promise<string[]> {
  const src = await guestVm(w, 'g-src')
  await src.log.waitHeartbeats(3, 300_000)
  const local = w.path('linux.snap')
  await execCreate(w, src.vm, local)
  await src.vm.quit()
  const rec = await guestOnce(w, local, [], 'g-rec', ['--record'])
  const url = await upload(o, 'lazy/linux.snap', local)
  await guestOnce(w, url, ['--cache-dir', w.path('cache-warm')], 'g-fill')
  const r: Record<Kind, GuestRun[]> = { local: [], cold: [], warm: [] }
  for (let i = 0; i < o.runs; i++) {
    for (const k of KINDS) {
      const { image, cache } = source(w, k, local, url, `g${i}`)
      r[k].push(await guestOnce(w, image, cache, `g-${k}-${i}`))
      if (k === 'cold') rmSync(cache[1], { recursive: true, force: true })
    }
  }
  const base = r.local
  return [
    `Linux guest (512 MiB, memwork), restore --lazy with a working set of ${rec.json.recordedPages} pages, ${o.runs} alternating runs, median (x local), range:`,
    '| | local file | s3://, fresh --cache-dir | s3://, warm --cache-dir |',
    '|---|---|---|---|',
    `| s until the VM runs | ${KINDS.map((k) => cell(r[k].map((x) => x.runnableS), 2, k === 'local' ? undefined : base.map((x) => x.runnableS))).join(' | ')} |`,
    `| s from running to heartbeat ${HEARTBEATS} | ${KINDS.map((k) => cell(r[k].map((x) => x.workloadS), 2, k === 'local' ? undefined : base.map((x) => x.workloadS))).join(' | ')} |`,
    `| page requests | ${KINDS.map((k) => cell(r[k].map((x) => x.requests), 0)).join(' | ')} |`,
  ]
}

export async function benchLazy(o: LazyBenchOptions): Promise<void> {
  const w = new Workdir('bench-s3-lazy')
  try {
    const out = await synthetic(w, o)
    if (o.guest) out.push('', ...(await guest(w, o)))
    console.log(out.join('\n'))
  } finally {
    for (const l of logs) l.stop()
    await w.cleanup()
    if (existsSync(w.dir)) rmSync(w.dir, { recursive: true, force: true })
  }
}
