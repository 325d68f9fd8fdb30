// `npm run bench:lazy -- --sizes 256M,1G,4G [--cluster-size 1M] [--repeat 3] [--reads 200] [--connect | --restore] [--against BIN] [--recover]`:
// lazy restore (load --postcopy) against the eager restore (load) of the same image, alternated
// in one run, each confirmed byte-identical.
//
// For each size: fill a paused source VM, save it once with exec:snapctl create; then per
// repetition, into fresh paused destinations (-S, -incoming defer, RAM on /dev/shm):
//   eager: migrate-incoming exec:snapctl load        -> seconds to `completed`
//   lazy:  migrate-incoming exec:snapctl load --postcopy
//          -> ms to `postcopy-active`, and to the VM able to run (query-status leaves inmigrate:
//             POSTCOPY_RUN handled), then reads of random guest pages over QMP (up to 200)
//             while pages are still arriving (each read of a missing page is a page request on
//             the return path), and seconds to `completed`; snapctl's --stats gives the request
//             service latency (request read -> page written) and when each step of the load's
//             set-up was done (phasesMs), shown from migrate-incoming.
//   --connect: the lazy restore goes over a unix socket with the preempt channel
//          (migrate-incoming unix:PATH, postcopy-ram + postcopy-preempt, load --postcopy
//          --connect started after migrate-incoming, as a person would by hand).
//   --restore: the lazy restore is `snapctl restore --lazy --qmp` (what it does before and
//          after migrate-incoming is its own): times from the command's start and from its
//          migrate-incoming (restore --json's incomingSeconds), CPU user+sys of the command and
//          its load (/usr/bin/time).
//   --against BIN: every lazy restore is also run with another snapctl's bin/run.js (A/B in
//          one run, alternating which goes first); eager restores use this one.
//   --recover adds, per repetition, a lazy restore that survives its source:
//          restore --lazy (background push throttled to 1/8 of the RAM per second) into a
//          destination with its own QMP socket, its load SIGKILLed 1 s after the VM could run
//          (postcopy-paused), then `restore --lazy --recover` -> seconds from its start to
//          `completed` (its lastPageSeconds), to the VM running again, its CPU (user+sys,
//          /usr/bin/time, the load included), the pages the destination already had.
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Vm, fillRam, filesEqual, processesWith, requireQemu, waitExitStatus } from '../vm.js'
import { RUN_JS } from './contenders.js'
import { argOption, parseSize } from './options.js'
import { median } from './report.js'
import { runToEnd } from './runner.js'

const MiB = 1 << 20
const SNAPCTL = `${process.execPath} ${RUN_JS}`
const log = (msg: string): void => void process.stderr.write(`bench:lazy: ${msg}\n`)

interface LazySample {
  /** which snapctl: 'this' or 'against' */
  bin: string
  toActiveMs: number
  /** to the VM able to run (query-status no longer inmigrate) */
  toRunnableMs: number
  /** --restore: from the command's start to the VM able to run */
  fromStartMs: number | null
  totalSeconds: number
  requests: number
  latencyMs: { p50: number; p99: number; max: number }
  /** the load's phasesMs, from migrate-incoming (negative: before it) */
  phasesMs: Record<string, number> | null
  /** --restore: CPU user+sys of the command and its load */
  cpuSeconds: number | null
}

interface LazyOptions {
  reads: number
  connect: boolean
  /** lazy restores with snapctl restore --lazy */
  restore: boolean
  /** also time restore --lazy --recover after a killed lazy restore */
  recover: boolean
  /** bin/run.js of each snapctl the lazy restores run with: this one, and --against's */
  bins: Array<{ label: string; runJs: string }>
}

interface RecoverSample {
  /** --recover's start to completed, to the VM running again (RESUME_ACK), the command's wall time */
  completedSeconds: number
  resumedSeconds: number
  commandSeconds: number
  cpuSeconds: number
  pagesReceivedBefore: number
  pages: number
}

interface SizeResult {
  size: string
  imageBytes: number
  eagerSeconds: number[]
  lazy: LazySample[]
  recover: RecoverSample[]
}


async function recovery(work: string, memMiB: number, image: string, ram: string, tag: string): Promise<RecoverSample> {
  const qmp = join(work, `recover-${tag}-snapctl.qmp`) // not ${name}.qmp: the Vm's own
  const dst = await Vm.start({ name: `recover-${tag}`, memMiB, incoming: 'defer', dir: work, extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
  try {
    const slow = { ...process.env, SNAPCTL_POSTCOPY_PUSH_RATE: String((memMiB * MiB) / 8) }
    const first = runToEnd([process.execPath, RUN_JS, 'restore', image, '--qmp', qmp, '--lazy', '--paused', '-q'], slow)
    const early = first.then((r) => `the lazy restore exited (${r.code}) before postcopy: ${r.stderr}`)
    const st = await Promise.race([pollUntil(dst, ['postcopy-active', 'completed', 'failed']), early])
    if (st !== 'postcopy-active') throw new Error(`${st}\n${dst.stderr}`)
    while ((await dst.qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') await sleep(10)
    await sleep(1000)
    const pids = processesWith(['load', '--postcopy', image])
    if (pids.length !== 1) throw new Error(`expected one load --postcopy, found ${pids.join(', ')}`)
    process.kill(pids[0], 'SIGKILL')
    if ((await pollUntil(dst, ['postcopy-paused', 'completed', 'failed'], 30_000)) !== 'postcopy-paused') throw new Error('the destination did not pause')
    await first
    const t0 = performance.now()
    const r = await runToEnd(['/usr/bin/time', '-f', 'cpu %U %S', process.execPath, RUN_JS, 'restore', image, '--qmp', qmp, '--lazy', '--recover', '--paused', '--json'])
    const commandSeconds = (performance.now() - t0) / 1000
    if (r.code !== 0) throw new Error(`restore --recover: ${r.stderr}`)
    if (!(await filesEqual(ram, dst.memPath)).equal) throw new Error('recovered restore: RAM differs')
    const j = JSON.parse(r.stdout)
    const cpu = /cpu ([\d.]+) ([\d.]+)/.exec(r.stderr)
    return {
      completedSeconds: j.lastPageSeconds, resumedSeconds: j.runnableSeconds, commandSeconds,
      cpuSeconds: cpu ? Number(cpu[1]) + Number(cpu[2]) : NaN, pagesReceivedBefore: j.pagesReceivedBefore, pages: j.pages,
    }
  } finally {
    await dst.quit()
  }
}


/** Polls query-migrate every 5 ms until one of `until`. */
async function pollUntil(vm: Vm, until: string[], timeoutMs = 600_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const { status } = await vm.qmp.execute<{ status?: string }>('query-migrate')
    if (status && until.includes(status)) return status
    if (Date.now() > deadline) throw new Error(`${vm.name}: still ${status} after ${timeoutMs} ms`)
    await sleep(5)
  }
}

async function eager(work: string, memMiB: number, image: string, ram: string, tag: string): Promise<number> {
  const dst = await Vm.start({ name: `eager-${tag}`, memMiB, incoming: 'defer', dir: work })
  try {
    const status = join(work, `eager-${tag}.status`)
    const t0 = performance.now()
    await dst.migrateIncoming(`exec:${SNAPCTL} load ${image}; echo $? > ${status}`)
    const s = await pollUntil(dst, ['completed', 'failed'])
    const seconds = (performance.now() - t0) / 1000
    if (s !== 'completed' || (await waitExitStatus(status, 600_000, 5)) !== 0) throw new Error(`eager restore ${s}\n${dst.stderr}`)
    if (!(await filesEqual(ram, dst.memPath)).equal) throw new Error('eager restore: RAM differs')
    return seconds
  } finally {
    await dst.quit()
  }
}

/** The load's set-up steps from the bench's `t0` (performance.now() here), by the epoch its stats give. */
function phasesFrom(stats: { phasesMs?: Record<string, number> }, t0: number): Record<string, number> | null {
  const p = stats.phasesMs
  if (!p || p.processStart === undefined) return null
  const zero = performance.timeOrigin + t0 - p.processStart
  const out: Record<string, number> = { processStart: -zero }
  for (const [k, v] of Object.entries(p)) if (k !== 'processStart') out[k] = v - zero
  return out
}

/** Polls until the destination has left inmigrate (postcopy-active seen on the way): [active, runnable] ms from t0. */
async function untilRunnable(dst: Vm, t0: number): Promise<[number, number]> {
  let active = NaN
  for (const deadline = Date.now() + 600_000; Date.now() < deadline; await sleep(2)) {
    const { status } = await dst.qmp.execute<{ status?: string }>('query-migrate')
    if (status === 'failed') throw new Error(`lazy restore failed\n${dst.stderr}`)
    if (Number.isNaN(active) && (status === 'postcopy-active' || status === 'completed')) active = performance.now() - t0
    if (!Number.isNaN(active) && (await dst.status()).status !== 'inmigrate') return [active, performance.now() - t0]
  }
  throw new Error('the lazy restore did not make the VM runnable within 600 s')
}

async function lazy(work: string, memMiB: number, image: string, ram: string, tag: string, o: LazyOptions, bin: { label: string; runJs: string }): Promise<LazySample> {
  const snapctl = `${process.execPath} ${bin.runJs}`
  const qmp = join(work, `lazy-${tag}-snapctl.qmp`)
  const dst = await Vm.start({ name: `lazy-${tag}`, memMiB, incoming: 'defer', dir: work, extraArgs: o.restore ? ['-qmp', `unix:${qmp},server=on,wait=off`] : [] })
  try {
    const status = join(work, `lazy-${tag}.status`)
    const stats = join(work, `lazy-${tag}.json`)
    let t0 = performance.now()
    const start = t0
    let restore: Promise<{ code: number | null; stdout: string; stderr: string }> | null = null
    if (o.restore) {
      restore = runToEnd(['/usr/bin/time', '-f', 'cpu %U %S', process.execPath, bin.runJs, 'restore', image, '--qmp', qmp, '--lazy', '--paused', '--json'])
      // Its migrate-incoming, seen from outside: the destination's migration leaves `none`.
      t0 = await untilIncoming(dst, restore)
    } else {
      const capabilities = [{ capability: 'postcopy-ram', state: true }, ...(o.connect ? [{ capability: 'postcopy-preempt', state: true }] : [])]
      await dst.qmp.execute('migrate-set-capabilities', { capabilities })
      t0 = performance.now()
      if (o.connect) {
        const sock = join(work, `lazy-${tag}.sock`)
        await dst.qmp.execute('migrate-incoming', { uri: `unix:${sock}` })
        const child = spawn('/bin/sh', ['-c', `${snapctl} load --postcopy --connect unix:${sock} ${image} --stats ${stats} 2> ${status}.err; echo $? > ${status}`], { stdio: 'ignore' })
        child.unref()
      } else {
        await dst.qmp.execute('migrate-incoming', { uri: `exec:${snapctl} load --postcopy ${image} --stats ${stats}; echo $? > ${status}` })
      }
    }
    const [toActiveMs, runnableMs] = await untilRunnable(dst, t0)
    // Reads of random pages while pages are still arriving, until the restore completes.
    let finished = false
    const done = pollUntil(dst, ['completed', 'failed']).then(
      (st) => ({ st, at: performance.now() }),
      (e: Error) => ({ st: `not completed (${e.message})`, at: performance.now() }),
    ).finally(() => (finished = true))
    for (let i = 0; i < o.reads && !finished; i++) {
      const page = Math.floor(Math.random() * (memMiB * 256))
      if (page >= 0xa0 && page < 0x100) continue // the VGA/BIOS hole below 1 MiB
      await dst.readGuest(page * 4096, 64)
    }
    const { st: s, at } = await done
    if (s !== 'completed') throw new Error(`lazy restore ${s}\n${dst.stderr}`)
    let st: { requests: number; latencyMs: LazySample['latencyMs']; phasesMs?: Record<string, number> }
    let sample: Pick<LazySample, 'toActiveMs' | 'toRunnableMs' | 'fromStartMs' | 'totalSeconds' | 'cpuSeconds'>
    if (restore) {
      const r = await restore
      if (r.code !== 0) throw new Error(`restore --lazy: ${r.stderr}`)
      const j = JSON.parse(r.stdout)
      const cpu = /cpu ([\d.]+) ([\d.]+)/.exec(r.stderr)
      sample = { toActiveMs, toRunnableMs: runnableMs, fromStartMs: runnableMs + t0 - start, totalSeconds: (at - t0) / 1000, cpuSeconds: cpu ? Number(cpu[1]) + Number(cpu[2]) : null }
      st = { requests: j.requests, latencyMs: j.latencyMs, phasesMs: j.phasesMs }
    } else {
      if ((await waitExitStatus(status, 600_000, 5)) !== 0) throw new Error(`lazy restore: the load failed`)
      st = JSON.parse(readFileSync(stats, 'utf8'))
      sample = { toActiveMs, toRunnableMs: runnableMs, fromStartMs: null, totalSeconds: (at - t0) / 1000, cpuSeconds: null }
    }
    if (!(await filesEqual(ram, dst.memPath)).equal) throw new Error('lazy restore: RAM differs')
    return { bin: bin.label, ...sample, requests: st.requests, latencyMs: st.latencyMs, phasesMs: phasesFrom(st, t0) }
  } catch (e) {
    const err = join(work, `lazy-${tag}.status.err`)
    throw new Error(`${(e as Error).message}\nsnapctl said: ${existsSync(err) ? readFileSync(err, 'utf8') : '(nothing)'}`)
  } finally {
    await dst.quit()
  }
}

/** Polls (1 ms) until the destination's migration is no longer `none`: when restore issued migrate-incoming. */
async function untilIncoming(dst: Vm, restore: Promise<{ code: number | null; stderr: string }>): Promise<number> {
  let exited = false
  void restore.then(() => (exited = true))
  while (!exited) {
    const { status } = await dst.qmp.execute<{ status?: string }>('query-migrate')
    if (status !== undefined && status !== 'none') return performance.now()
    await sleep(1)
  }
  throw new Error(`restore --lazy exited before migrate-incoming: ${(await restore).stderr}`)
}

async function benchSize(parent: string, sizeText: string, repeat: number, clusterSize: string, o: LazyOptions): Promise<SizeResult> {
  const { bytes, label } = parseSize(sizeText)
  const memMiB = bytes / MiB
  const work = mkdtempSync(join(parent, `lazy-${label}-`))
  const ram = `/dev/shm/snapctl-bench-lazy-${process.pid}.ram`
  try {
    log(`${label}: filling RAM`)
    await fillRam(ram, bytes, { seed: 1 })
    const src = await Vm.start({ name: 'src', memMiB, memPath: ram, dir: work })
    const image = join(work, 'vm.snap')
    await src.migrate(`exec:${SNAPCTL} create ${image} --cluster-size ${clusterSize}; echo $? > ${image}.status`)
    if ((await pollUntil(src, ['completed', 'failed'])) !== 'completed' || (await waitExitStatus(`${image}.status`, 600_000, 5)) !== 0) {
      throw new Error(`save failed\n${src.stderr}`)
    }
    await src.quit()
    const result: SizeResult = { size: label, imageBytes: statSync(image).size, eagerSeconds: [], lazy: [], recover: [] }
    for (let r = 0; r < repeat; r++) {
      // alternate which goes first
      const order = r % 2 === 0 ? ['eager', 'lazy', 'recover'] : ['recover', 'lazy', 'eager']
      for (const which of order) {
        if (which === 'eager') result.eagerSeconds.push(await eager(work, memMiB, image, ram, `${r}`))
        else if (which === 'lazy') {
          // A/B: which snapctl goes first alternates too
          const bins = r % 2 === 0 ? o.bins : [...o.bins].reverse()
          for (const bin of bins) result.lazy.push(await lazy(work, memMiB, image, ram, `${r}-${bin.label}`, o, bin))
        }
        else if (o.recover) result.recover.push(await recovery(work, memMiB, image, ram, `${r}`))
        else continue
        log(`${label} rep ${r + 1}: ${which} done`)
      }
    }
    return result
  } finally {
    rmSync(ram, { force: true })
    rmSync(work, { recursive: true, force: true })
  }
}

const range = (xs: number[], d = 2): string => `${median(xs).toFixed(d)} [${Math.min(...xs).toFixed(d)}-${Math.max(...xs).toFixed(d)}]`

function report(results: SizeResult[], o: LazyOptions): string {
  const lines = [
    `| size | snapctl | eager restore s | lazy: migrate-incoming to postcopy-active ms | to VM runnable ms |${o.restore ? ' command start to VM runnable ms |' : ''} all pages in s | lazy / eager | requests | latency p50 / p99 / max ms |${o.restore ? ' CPU user+sys s |' : ''}`,
    `|---|---|---|---|---|${o.restore ? '---|' : ''}---|---|---|---|${o.restore ? '---|' : ''}`,
  ]
  for (const r of results) {
    const eagerS = median(r.eagerSeconds)
    for (const { label } of o.bins) {
      const ls = r.lazy.filter((l) => l.bin === label)
      const total = median(ls.map((l) => l.totalSeconds))
      const lat = (k: 'p50' | 'p99' | 'max'): string => median(ls.map((l) => l.latencyMs[k])).toFixed(3)
      lines.push(`| ${r.size} | ${label} | ${range(r.eagerSeconds)} | ${range(ls.map((l) => l.toActiveMs), 0)} | ${range(ls.map((l) => l.toRunnableMs), 0)} |` +
        `${o.restore ? ` ${range(ls.map((l) => l.fromStartMs ?? NaN), 0)} |` : ''} ${range(ls.map((l) => l.totalSeconds))} | ${(total / eagerS).toFixed(2)}x | ${median(ls.map((l) => l.requests))} |` +
        ` ${lat('p50')} / ${lat('p99')} / ${lat('max')} |${o.restore ? ` ${range(ls.map((l) => l.cpuSeconds ?? NaN))} |` : ''}`)
    }
  }
  // The load's set-up, from migrate-incoming: medians.
  const names = [...new Set(results.flatMap((r) => r.lazy.flatMap((l) => Object.keys(l.phasesMs ?? {}))))]
  if (names.length > 0) {
    lines.push('', `the load's set-up, ms from migrate-incoming (medians; negative: before it): | size | snapctl | ${names.join(' | ')} |`)
    for (const r of results) {
      for (const { label } of o.bins) {
        const ls = r.lazy.filter((l) => l.bin === label && l.phasesMs)
        lines.push(`| ${r.size} | ${label} | ${names.map((n) => median(ls.map((l) => l.phasesMs![n] ?? NaN)).toFixed(0)).join(' | ')} |`)
      }
    }
  }
  if (results.some((r) => r.recover.length > 0)) {
    lines.push('', '| size | eager restore s | --recover to completed s | --recover to VM running s | --recover command s | CPU user+sys s | pages the destination had |', '|---|---|---|---|---|---|---|')
    for (const r of results) {
      const x = r.recover
      lines.push(`| ${r.size} | ${range(r.eagerSeconds)} | ${range(x.map((s) => s.completedSeconds))} | ${range(x.map((s) => s.resumedSeconds), 3)} | ${range(x.map((s) => s.commandSeconds))} | ${range(x.map((s) => s.cpuSeconds))} | ${median(x.map((s) => s.pagesReceivedBefore))} of ${x[0].pages} |`)
    }
  }
  return lines.join('\n')
}

const USAGE = `usage: npm run bench:lazy -- [options]
  --sizes LIST        guest RAM sizes (default 256M,1G,4G)
  --repeat N          restores of each kind per size, at least 3 (default 3)
  --reads N           random guest page reads over QMP during each lazy restore (default 200)
  --cluster-size S    the image's clusters (default 1M)
  --connect           lazy: load --postcopy --connect over a unix socket with the preempt channel
  --restore           lazy: snapctl restore --lazy --qmp (times from its start and its migrate-incoming)
  --against BIN       also run every lazy restore with another snapctl's bin/run.js (A/B, alternated)
  --recover           also: a lazy restore killed midway, then restore --lazy --recover
  --json FILE         results (default bench-out/lazy.json)
  --dir DIR           where the work dirs are made (default /var/tmp)`

async function main(): Promise<void> {
  const argv = process.argv.slice(2)
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`${USAGE}\n`)
    return
  }
  const sizes = argOption(argv, '--sizes', '256M,1G,4G').split(',')
  const repeat = Math.max(3, Number(argOption(argv, '--repeat', '3')))
  const json = argOption(argv, '--json', 'bench-out/lazy.json')
  const parent = argOption(argv, '--dir', '/var/tmp')
  const clusterSize = argOption(argv, '--cluster-size', '1M')
  const against = argOption(argv, '--against', '')
  const o: LazyOptions = {
    reads: Number(argOption(argv, '--reads', '200')), connect: argv.includes('--connect'), restore: argv.includes('--restore'), recover: argv.includes('--recover'),
    bins: [{ label: 'this', runJs: RUN_JS }, ...(against ? [{ label: 'against', runJs: resolve(against) }] : [])],
  }
  if (o.connect && o.restore) throw new Error('--connect and --restore: choose one (restore --lazy goes over a socket itself)')
  if (against && !existsSync(resolve(against))) throw new Error(`--against ${against}: no such file (give another snapctl's bin/run.js)`)
  const qemu = requireQemu()
  const results: SizeResult[] = []
  for (const size of sizes) results.push(await benchSize(parent, size, repeat, clusterSize, o))
  const table = report(results, o)
  const how = o.restore ? 'by snapctl restore --lazy' : o.connect ? 'over a unix socket with the preempt channel' : 'over exec:'
  process.stdout.write(`lazy vs eager restore, QEMU ${qemu.version} TCG, clusters of ${clusterSize}, lazy ${how}, up to ${o.reads} guest reads, medians of ${repeat}\n${table}\n`)
  mkdirSync(dirname(json), { recursive: true })
  writeFileSync(json, `${JSON.stringify({ date: new Date().toISOString(), qemu: qemu.version, repeat, clusterSize, bins: o.bins, results }, null, 2)}\n`)
}

main().catch((err) => {
  process.stderr.write(`bench:lazy failed: ${err instanceof Error ? err.stack : String(err)}\n`)
  process.exitCode = 1
})
