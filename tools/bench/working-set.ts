// `npm run bench:working-set -- [--repeat 5] [--mem 512] [--ticks 16] [--record-window 5s] [--modes eager,lazy,ws,ws-after,ws-nice0]`:
// a recorded working set replayed, with the Linux test guest (tools/linux-guest.ts) running
// memwork flat out (memwork.ms=1: each tick re-reads and checks `check` MiB of its data, then the
// next at once; its tick lines are the workload's progress).
//
// Saves the guest once; copies the image (the copy never gets a working set); restore --lazy
// --record on the original stores one. Then, alternating in each round, into fresh destinations
// (-incoming defer, restore over QMP):
//   eager     restore (every page in before the VM runs)
//   lazy      restore --lazy of the copy: no working set
//   ws        restore --lazy of the image: its working set before the VM runs (--precopy-max default)
//   ws-after  the same with --precopy-max 0: the whole working set pushed after the VM runs
//   ws-nice0  ws with $SNAPCTL_POSTCOPY_PUSH_NICE=0: the push after it keeps its CPU priority
// and for each: pages asked for, ms to postcopy-active and to the VM able to run, and the
// workload's time: from the VM running (query-status polled every 5 ms) to its `ticks`-th
// heartbeat (each tick checks `check` MiB, so 16 ticks of 8 MiB go twice over 64 MiB of data),
// and from the restore's start to that heartbeat (what the wait for the guest's work costs in all).
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { SerialLog, linuxCmdline, linuxGuest } from '../linux-guest.js'
import { Vm, requireQemu, waitExitStatus } from '../vm.js'
import { RUN_JS } from './contenders.js'
import { argOption } from './options.js'
import { median } from './report.js'
import { runToEnd } from './runner.js'

const SNAPCTL = `${process.execPath} ${RUN_JS}`
const log = (msg: string): void => void process.stderr.write(`bench:working-set: ${msg}\n`)
const DEVICES = ['-smp', '2', '-no-reboot', '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0', '-device', 'virtio-rng-pci']
const MODES = ['eager', 'lazy', 'ws', 'ws-after', 'ws-nice0'] as const
type Mode = (typeof MODES)[number]

interface Sample {
  mode: Mode
  requests: number | null
  prefetchedPages: number | null
  precopiedPages: number | null
  prefetchedTouched: number | null
  postcopyActiveMs: number | null
  runnableMs: number | null
  /** VM running -> the ticks-th heartbeat */
  workloadSeconds: number
  /** restore started -> the ticks-th heartbeat */
  doneSeconds: number
  /** CPU user+sys of the restore command and the load it ran (/usr/bin/time; eager: QEMU runs the load, so not counted, not shown) */
  cpuSeconds: number
  allInSeconds: number
}

interface Options {
  memMiB: number
  ticks: number
  recordWindow: string
  cmdline: string
  /** --precopy-max for the ws restores (default: load's) */
  precopyMax?: string
}


async function guest(work: string, name: string, o: Options, incoming?: string): Promise<{ vm: Vm; qmp: string; log: SerialLog }> {
  const { kernel, initrd } = linuxGuest()
  const qmp = join(work, `${name}-snapctl.qmp`)
  const vm = await Vm.start({ name, dir: work, memMiB: o.memMiB, machine: 'q35', kernel, initrd, append: o.cmdline, paused: false, incoming, extraArgs: [...DEVICES, '-qmp', `unix:${qmp},server=on,wait=off`] })
  return { vm, qmp, log: new SerialLog(vm.logPath) }
}

/** One restore of `image` into a fresh destination, timed as the header says. */
async function replay(work: string, image: string, mode: Mode, tag: string, o: Options, extra: string[] = []): Promise<Sample & { json: any }> {
  const dst = await guest(work, `${mode}-${tag}`, o, 'defer')
  try {
    const args = ['restore', image, '--qmp', dst.qmp, '--json', ...extra]
    if (mode !== 'eager') args.push('--lazy')
    if (mode === 'ws-after') args.push('--precopy-max', '0')
    if (mode.startsWith('ws') && mode !== 'ws-after' && o.precopyMax !== undefined) args.push('--precopy-max', o.precopyMax)
    const t0 = performance.now()
    const r = runToEnd(['/usr/bin/time', '-f', 'cpu %U %S', process.execPath, RUN_JS, ...args], mode === 'ws-nice0' ? { ...process.env, SNAPCTL_POSTCOPY_PUSH_NICE: '0' } : process.env)
    let runningAt = 0
    let exited = false
    void r.finally(() => (exited = true))
    while (!runningAt && !exited) {
      const s = await dst.vm.qmp.execute<{ status: string }>('query-status')
      if (s.status === 'running') runningAt = performance.now()
      else await sleep(5)
    }
    const res = await r
    if (res.code !== 0) throw new Error(`restore (${mode}) exited ${res.code}: ${res.stderr}\n${dst.vm.stderr}`)
    const allInSeconds = (performance.now() - t0) / 1000
    const j = JSON.parse(res.stdout)
    const cpu = /cpu ([\d.]+) ([\d.]+)\s*$/.exec(res.stderr)
    const hbs = await dst.log.waitHeartbeats(o.ticks, 120_000)
    for (const h of hbs) if (!h.ok) throw new Error(`${mode}: the guest says ${h.text}`)
    return {
      mode, requests: j.requests, prefetchedPages: j.prefetchedPages, precopiedPages: j.precopiedPages, prefetchedTouched: j.prefetchedTouched,
      postcopyActiveMs: j.postcopyActiveSeconds === null ? null : j.postcopyActiveSeconds * 1000,
      runnableMs: j.runnableSeconds === null ? null : j.runnableSeconds * 1000,
      workloadSeconds: (hbs[o.ticks - 1].at - runningAt) / 1000, doneSeconds: (hbs[o.ticks - 1].at - t0) / 1000, allInSeconds, cpuSeconds: cpu ? Number(cpu[1]) + Number(cpu[2]) : NaN, json: j,
    }
  } finally {
    dst.log.stop()
    await dst.vm.quit()
  }
}


const range = (xs: number[], d: number): string => xs.length === 0 ? '-' : `${median(xs).toFixed(d)} [${Math.min(...xs).toFixed(d)}-${Math.max(...xs).toFixed(d)}]`

function report(samples: Sample[], recorded: any): string {
  const lines = [
    `recorded: ${recorded.recordedPages} pages (restore --lazy --record: ${recorded.requests} requests, all in after ${recorded.seconds.toFixed(2)} s)`,
    '| restore | requests | WS pages before run / after | WS pages asked for | to postcopy-active ms | to runnable ms | workload s | workload / eager | start to workload done s | all in s | snapctl CPU s |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  const eager = median(samples.filter((s) => s.mode === 'eager').map((s) => s.workloadSeconds))
  for (const mode of MODES) {
    const xs = samples.filter((s) => s.mode === mode)
    if (xs.length === 0) continue
    const v = (f: (s: Sample) => number | null, d: number): string => range(xs.map(f).filter((x): x is number => x !== null), d)
    const work = median(xs.map((s) => s.workloadSeconds))
    lines.push(`| ${mode} | ${v((s) => s.requests, 0)} | ${v((s) => s.precopiedPages, 0)} / ${v((s) => (s.prefetchedPages ?? 0) - (s.precopiedPages ?? 0), 0)} | ${v((s) => s.prefetchedTouched, 0)} | ` +
      `${v((s) => s.postcopyActiveMs, 0)} | ${v((s) => s.runnableMs, 0)} | ${v((s) => s.workloadSeconds, 2)} | ${(work / eager).toFixed(2)}x | ${v((s) => s.doneSeconds, 2)} | ${v((s) => s.allInSeconds, 2)} | ${mode === 'eager' ? '-' : v((s) => s.cpuSeconds, 2)} |`)
  }
  return lines.join('\n')
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2)
  const repeat = Math.max(1, Number(argOption(argv, '--repeat', '5')))
  const o: Options = {
    memMiB: Number(argOption(argv, '--mem', '512')), ticks: Number(argOption(argv, '--ticks', '16')), recordWindow: argOption(argv, '--record-window', '5s'),
    cmdline: linuxCmdline({ ms: 1 }), precopyMax: argv.includes('--precopy-max') ? argOption(argv, '--precopy-max', '') : undefined,
  }
  const modes = argOption(argv, '--modes', MODES.join(',')).split(',') as Mode[]
  const json = argOption(argv, '--json', 'bench-out/working-set.json')
  const qemu = requireQemu()
  const work = mkdtempSync(join(argOption(argv, '--dir', '/var/tmp'), 'ws-bench-'))
  try {
    const src = await guest(work, 'src', o)
    await src.log.waitHeartbeats(3, 180_000)
    const image = join(work, 'guest.snap')
    await src.vm.migrate(`exec:${SNAPCTL} create ${image}; echo $? > ${image}.status`)
    const st = await src.vm.waitMigration({ timeoutMs: 300_000 })
    if (st.status !== 'completed' || (await waitExitStatus(`${image}.status`, 60_000, 5)) !== 0) throw new Error(`save: ${st.status}\n${src.vm.stderr}`)
    src.log.stop()
    await src.vm.quit()
    const plain = join(work, 'plain.snap')
    copyFileSync(image, plain)
    log(`saved; recording (--record-window ${o.recordWindow})`)
    const rec = await replay(work, image, 'lazy', 'record', o, ['--record', '--record-window', o.recordWindow])
    if (!rec.json.recordedPages) throw new Error(`no working set was stored: ${JSON.stringify(rec.json)}`)
    log(`recorded ${rec.json.recordedPages} pages; ${rec.requests} requests`)
    const samples: Sample[] = []
    for (let r = 0; r < repeat; r++) {
      const order = r % 2 === 0 ? modes : [...modes].reverse()
      for (const mode of order) {
        const s = await replay(work, mode === 'lazy' ? plain : image, mode, `${r}`, o)
        samples.push(s)
        log(`round ${r + 1} ${mode}: ${s.requests} requests, runnable ${s.runnableMs?.toFixed(0)} ms, workload ${s.workloadSeconds.toFixed(2)} s, all in ${s.allInSeconds.toFixed(2)} s`)
      }
    }
    const table = report(samples, rec.json)
    process.stdout.write(`working set replay, QEMU ${qemu.version} TCG, Linux guest ${o.memMiB} MiB (${o.cmdline}), workload: VM running -> heartbeat ${o.ticks}; medians [min-max] of ${repeat}\n${table}\n`)
    mkdirSync(dirname(json), { recursive: true })
    writeFileSync(json, `${JSON.stringify({ date: new Date().toISOString(), qemu: qemu.version, options: o, recorded: rec.json, samples }, null, 2)}\n`)
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
}

main().catch((err) => {
  process.stderr.write(`bench:working-set failed: ${err instanceof Error ? err.stack : String(err)}\n`)
  process.exitCode = 1
})
