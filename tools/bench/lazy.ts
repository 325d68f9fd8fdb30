// `npm run bench:lazy -- --sizes 256M,1G,4G [--cluster-size 1M] [--repeat 3] [--reads 200] [--connect] [--recover]`: lazy restore (load --postcopy) against the eager
// restore (load) of the same image, alternated in one run, each confirmed byte-identical.
//
// For each size: fill a paused source VM, save it once with exec:snapctl create; then per
// repetition, into fresh paused destinations (-S, -incoming defer, RAM on /dev/shm):
//   eager: migrate-incoming exec:snapctl load        -> seconds to `completed`
//   lazy:  migrate-incoming exec:snapctl load --postcopy
//          -> ms to `postcopy-active` (the VM could run from then on), then reads of random
//             guest pages over QMP (up to 200) while pages are still arriving (each read of a
//             missing page is a page request on the return path), and seconds to `completed`;
//             snapctl's --stats gives the request service latency (request read -> page written).
//   --connect: the lazy restore goes over a unix socket with the preempt channel
//          (migrate-incoming unix:PATH, postcopy-ram + postcopy-preempt, load --postcopy --connect).
//   --recover adds, per repetition, a lazy restore that survives its source:
//          restore --lazy (background push throttled to 1/8 of the RAM per second) into a
//          destination with its own QMP socket, its load SIGKILLed 1 s after the VM could run
//          (postcopy-paused), then `restore --lazy --recover` -> seconds from its start to
//          `completed` (its lastPageSeconds), to the VM running again, its CPU (user+sys,
//          /usr/bin/time, the load included), the pages the destination already had.
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
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
  toActiveMs: number
  totalSeconds: number
  requests: number
  latencyMs: { p50: number; p99: number; max: number }
}

interface LazyOptions {
  reads: number
  connect: boolean
  /** also time restore --lazy --recover after a killed lazy restore */
  recover: boolean
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

async function lazy(work: string, memMiB: number, image: string, ram: string, tag: string, o: LazyOptions): Promise<LazySample> {
  const dst = await Vm.start({ name: `lazy-${tag}`, memMiB, incoming: 'defer', dir: work })
  try {
    const status = join(work, `lazy-${tag}.status`)
    const stats = join(work, `lazy-${tag}.json`)
    const capabilities = [{ capability: 'postcopy-ram', state: true }, ...(o.connect ? [{ capability: 'postcopy-preempt', state: true }] : [])]
    await dst.qmp.execute('migrate-set-capabilities', { capabilities })
    const t0 = performance.now()
    if (o.connect) {
      const sock = join(work, `lazy-${tag}.sock`)
      await dst.qmp.execute('migrate-incoming', { uri: `unix:${sock}` })
      const child = spawn('/bin/sh', ['-c', `${SNAPCTL} load --postcopy --connect unix:${sock} ${image} --stats ${stats} 2> ${status}.err; echo $? > ${status}`], { stdio: 'ignore' })
      child.unref()
    } else {
      await dst.qmp.execute('migrate-incoming', { uri: `exec:${SNAPCTL} load --postcopy ${image} --stats ${stats}; echo $? > ${status}` })
    }
    const active = await pollUntil(dst, ['postcopy-active', 'completed', 'failed'])
    const toActiveMs = performance.now() - t0
    if (active !== 'postcopy-active') throw new Error(`lazy restore went to ${active}\n${dst.stderr}`)
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
    const totalSeconds = (at - t0) / 1000
    if (s !== 'completed' || (await waitExitStatus(status, 600_000, 5)) !== 0) throw new Error(`lazy restore ${s}\n${dst.stderr}`)
    if (!(await filesEqual(ram, dst.memPath)).equal) throw new Error('lazy restore: RAM differs')
    const st = JSON.parse(readFileSync(stats, 'utf8'))
    return { toActiveMs, totalSeconds, requests: st.requests, latencyMs: st.latencyMs }
  } catch (e) {
    const err = join(work, `lazy-${tag}.status.err`)
    throw new Error(`${(e as Error).message}\nsnapctl said: ${existsSync(err) ? readFileSync(err, 'utf8') : '(nothing)'}`)
  } finally {
    await dst.quit()
  }
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
        else if (which === 'lazy') result.lazy.push(await lazy(work, memMiB, image, ram, `${r}`, o))
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

function report(results: SizeResult[]): string {
  const lines = [
    '| size | eager restore s | lazy: to postcopy-active ms | lazy: all pages in s | lazy / eager | requests | latency p50 / p99 / max ms |',
    '|---|---|---|---|---|---|---|',
  ]
  for (const r of results) {
    const eagerS = median(r.eagerSeconds)
    const total = median(r.lazy.map((l) => l.totalSeconds))
    const lat = (k: 'p50' | 'p99' | 'max'): string => median(r.lazy.map((l) => l.latencyMs[k])).toFixed(3)
    lines.push(`| ${r.size} | ${eagerS.toFixed(2)} | ${median(r.lazy.map((l) => l.toActiveMs)).toFixed(0)} | ${total.toFixed(2)} | ${(total / eagerS).toFixed(2)}x | ${median(r.lazy.map((l) => l.requests))} | ${lat('p50')} / ${lat('p99')} / ${lat('max')} |`)
  }
  if (results.some((r) => r.recover.length > 0)) {
    const range = (xs: number[], d = 2): string => `${median(xs).toFixed(d)} [${Math.min(...xs).toFixed(d)}-${Math.max(...xs).toFixed(d)}]`
    lines.push('', '| size | eager restore s | --recover to completed s | --recover to VM running s | --recover command s | CPU user+sys s | pages the destination had |', '|---|---|---|---|---|---|---|')
    for (const r of results) {
      const x = r.recover
      lines.push(`| ${r.size} | ${range(r.eagerSeconds)} | ${range(x.map((s) => s.completedSeconds))} | ${range(x.map((s) => s.resumedSeconds), 3)} | ${range(x.map((s) => s.commandSeconds))} | ${range(x.map((s) => s.cpuSeconds))} | ${median(x.map((s) => s.pagesReceivedBefore))} of ${x[0].pages} |`)
    }
  }
  return lines.join('\n')
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2)
  const sizes = argOption(argv, '--sizes', '256M,1G,4G').split(',')
  const repeat = Math.max(3, Number(argOption(argv, '--repeat', '3')))
  const json = argOption(argv, '--json', 'bench-out/lazy.json')
  const parent = argOption(argv, '--dir', '/var/tmp')
  const clusterSize = argOption(argv, '--cluster-size', '1M')
  const o: LazyOptions = { reads: Number(argOption(argv, '--reads', '200')), connect: argv.includes('--connect'), recover: argv.includes('--recover') }
  const qemu = requireQemu()
  const results: SizeResult[] = []
  for (const size of sizes) results.push(await benchSize(parent, size, repeat, clusterSize, o))
  const table = report(results)
  const how = o.connect ? 'over a unix socket with the preempt channel' : 'over exec:'
  process.stdout.write(`lazy vs eager restore, QEMU ${qemu.version} TCG, clusters of ${clusterSize}, lazy ${how}, up to ${o.reads} guest reads, medians of ${repeat}\n${table}\n`)
  mkdirSync(dirname(json), { recursive: true })
  writeFileSync(json, `${JSON.stringify({ date: new Date().toISOString(), qemu: qemu.version, repeat, clusterSize, results }, null, 2)}\n`)
}

main().catch((err) => {
  process.stderr.write(`bench:lazy failed: ${err instanceof Error ? err.stack : String(err)}\n`)
  process.exitCode = 1
})
