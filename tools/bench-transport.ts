// Whole commands side by side against real QEMU (TCG, a paused VM filled with the bench's default
// mix), alternating the variants within each round (issue 13: what save and restore use without
// --channels, and create --threads):
//   node dist/tools/bench-transport.js save|restore SIZE_MIB ROUNDS VARIANTS [--json FILE]
//     VARIANTS: exec (--channels 0: one exec: pipe), default (no --channels flag), N (--channels N)
//     times `snapctl save IMAGE --qmp` / `snapctl restore IMAGE --qmp --paused`; a restore's RAM
//     must equal the source's byte for byte, or the run stops
//   node dist/tools/bench-transport.js listen SIZE_MIB ROUNDS THREADS [--channels N] [--json FILE]
//     THREADS: comma list of create --threads values (default: no flag); times
//     `snapctl create IMAGE --listen unix:SOCK` from QEMU's migrate with N multifd channels (default 4)
// Per sample: wall (the command; listen: from migrate to create's exit), snapctl's user+sys CPU and
// peak RSS with its waited-for children (/usr/bin/time), and QEMU's CPU with its reaped children
// (the exec: peer) from /proc/PID/stat; medians, ranges and paired ratios to the first variant.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { SNAPCTL_BIN } from '../test/snapctl.js'
import { Vm, fillRam, filesEqual } from './vm.js'

const argv = process.argv.slice(2)
const opt = (name: string): string | undefined => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv.splice(i, 2)[1] : undefined
}
const jsonOut = opt('--json')
const channels = Number(opt('--channels') ?? 4)
const [mode, sizeArg, roundsArg, variantsArg] = argv
if (!['save', 'restore', 'listen'].includes(mode) || !variantsArg) {
  process.stderr.write('usage: bench-transport.js save|restore SIZE_MIB ROUNDS exec,default,2,4 | listen SIZE_MIB ROUNDS 1,2 [--channels N] [--json FILE]\n')
  process.exit(2)
}
const MiB = Number(sizeArg)
const rounds = Number(roundsArg)
const variants = variantsArg.split(',')
const work = mkdtempSync('/var/tmp/snapctl-bench-transport-')
const srcRam = `/dev/shm/snapctl-bench-transport-${process.pid}.ram`
const loadavg = (): string => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')

interface Sample { v: string; r: number; wall: number; snapCpu: number; qemuCpu: number; rssMiB: number; fileBytes?: number }

/** utime + stime + cutime + cstime of a process, in seconds. */
function cpuOf(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / 100
}

function timeFile(): { path: string; read: () => { cpu: number; rssMiB: number } } {
  const path = join(work, 'time.txt')
  return {
    path,
    read: () => {
      const [u, s, m] = readFileSync(path, 'utf8').trim().split('\n').pop()!.split(' ').map(Number)
      return { cpu: u + s, rssMiB: m / 1024 }
    },
  }
}

/** `snapctl ARGS` under /usr/bin/time, to its end. */
function timed(args: string[]): { wall: number; cpu: number; rssMiB: number } {
  const t = timeFile()
  const t0 = performance.now()
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S %M', '-o', t.path, process.execPath, SNAPCTL_BIN, ...args], { encoding: 'utf8' })
  const wall = (performance.now() - t0) / 1000
  if (r.status !== 0) throw new Error(`snapctl ${args.join(' ')}: exit ${r.status}: ${r.stderr}`)
  return { wall, ...t.read() }
}

const vmWithQmp = (name: string, extra: Partial<Parameters<typeof Vm.start>[0]> = {}): Promise<Vm> =>
  Vm.start({ name, memMiB: MiB, dir: work, extraArgs: ['-qmp', `unix:${join(work, `${name}-snapctl.qmp`)},server=on,wait=off`], ...extra })
const channelArgs = (v: string): string[] => (v === 'default' ? [] : ['--channels', v === 'exec' ? '0' : v])

async function saveSample(v: string, image: string): Promise<Sample> {
  const vm = await vmWithQmp('src', { memPath: srcRam, keepMem: true })
  try {
    rmSync(image, { force: true })
    rmSync(`${image}.index`, { recursive: true, force: true })
    const q0 = cpuOf(vm.pid)
    const t = timed(['save', image, '--qmp', join(work, 'src-snapctl.qmp'), '--force', ...channelArgs(v)])
    return { v, r: 0, wall: t.wall, snapCpu: t.cpu, qemuCpu: cpuOf(vm.pid) - q0, rssMiB: t.rssMiB, fileBytes: statSync(image).size }
  } finally {
    await vm.quit()
  }
}

async function restoreSample(v: string, image: string): Promise<Sample> {
  const vm = await vmWithQmp('dst', { incoming: 'defer' })
  try {
    const q0 = cpuOf(vm.pid)
    const t = timed(['restore', image, '--qmp', join(work, 'dst-snapctl.qmp'), '--paused', ...channelArgs(v)])
    const s = { v, r: 0, wall: t.wall, snapCpu: t.cpu, qemuCpu: cpuOf(vm.pid) - q0, rssMiB: t.rssMiB }
    const eq = await filesEqual(srcRam, vm.memPath)
    if (!eq.equal) throw new Error(`restore ${v}: the RAM differs from the source's at byte ${eq.firstDiff}`)
    return s
  } finally {
    await vm.quit()
  }
}

async function listenSample(v: string, image: string): Promise<Sample> {
  const vm = await Vm.start({ name: 'src', memMiB: MiB, memPath: srcRam, keepMem: true, dir: work })
  try {
    rmSync(image, { force: true })
    rmSync(`${image}.index`, { recursive: true, force: true })
    const sock = join(work, 'mig.sock')
    const t = timeFile()
    const child = spawn('/usr/bin/time', ['-f', '%U %S %M', '-o', t.path, process.execPath, SNAPCTL_BIN, 'create', image, '--listen', `unix:${sock}`, ...(v === 'default' ? [] : ['--threads', v])], { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (d) => (stderr += d))
    const exit = new Promise<number | null>((res) => child.on('close', res))
    for (const end = Date.now() + 20_000; !existsSync(sock); await sleep(5)) if (Date.now() > end) throw new Error(`create --listen did not listen: ${stderr}`)
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: channels > 0 }] })
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40, ...(channels > 0 ? { 'multifd-channels': channels } : {}) })
    const q0 = cpuOf(vm.pid)
    const t0 = performance.now()
    await vm.qmp.execute('migrate', { uri: `unix:${sock}` })
    const code = await exit
    const wall = (performance.now() - t0) / 1000
    const qemuCpu = cpuOf(vm.pid) - q0
    const info = await vm.waitMigration({ timeoutMs: 60_000 })
    if (code !== 0 || info.status !== 'completed') throw new Error(`--threads ${v}: create exit ${code}, migration ${info.status}: ${stderr}`)
    const u = t.read()
    return { v, r: 0, wall, snapCpu: u.cpu, qemuCpu, rssMiB: u.rssMiB, fileBytes: statSync(image).size }
  } finally {
    await vm.quit()
  }
}

const med = (a: number[]): number => {
  const s = [...a].sort((x, y) => x - y)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}
const span = (a: number[], d = 2): string => `${med(a).toFixed(d)} [${Math.min(...a).toFixed(d)}-${Math.max(...a).toFixed(d)}]`

try {
  await fillRam(srcRam, MiB * 1024 * 1024, { seed: 1 })
  console.log(`${mode}, ${MiB} MiB, ${rounds} rounds, variants ${variants.join(' ')}${mode === 'listen' ? `, ${channels} channels` : ''}; load average ${loadavg()}`)
  const image = join(work, 'vm.snap')
  if (mode === 'restore') {
    const vm = await vmWithQmp('src', { memPath: srcRam, keepMem: true })
    timed(['save', image, '--qmp', join(work, 'src-snapctl.qmp'), '--channels', '0'])
    await vm.quit()
  }
  const samples: Sample[] = []
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < variants.length; i++) {
      const v = variants[(i + r) % variants.length] // round r starts r places on: no variant is always first
      const s = mode === 'save' ? await saveSample(v, join(work, 'saved.snap')) : mode === 'restore' ? await restoreSample(v, image) : await listenSample(v, join(work, 'listen.snap'))
      s.r = r
      samples.push(s)
      console.log(`  round ${r} ${v}: ${s.wall.toFixed(2)} s, snapctl ${s.snapCpu.toFixed(2)} CPU-s, QEMU ${s.qemuCpu.toFixed(2)} CPU-s, ${s.rssMiB.toFixed(0)} MiB${s.fileBytes ? `, ${s.fileBytes} bytes` : ''}`)
    }
  }
  console.log(`load average at the end ${loadavg()}; median [min-max]`)
  const lines: string[] = []
  for (const v of variants) {
    const xs = samples.filter((s) => s.v === v)
    const first = samples.filter((s) => s.v === variants[0])
    const paired = xs.map((s) => s.wall / first.find((f) => f.r === s.r)!.wall)
    const cpu = (s: Sample): number => s.snapCpu + s.qemuCpu
    const pairedCpu = xs.map((s) => cpu(s) / cpu(first.find((f) => f.r === s.r)!))
    lines.push(`${mode} ${v}: wall ${span(xs.map((s) => s.wall))} s; CPU snapctl ${span(xs.map((s) => s.snapCpu))} + QEMU ${span(xs.map((s) => s.qemuCpu))} s; peak RSS ${med(xs.map((s) => s.rssMiB)).toFixed(0)} MiB; vs ${variants[0]}, paired: wall ${span(paired)}, CPU ${span(pairedCpu)}`)
  }
  for (const l of lines) console.log(l)
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ mode, MiB, rounds, variants, channels, samples, lines }, null, 1))
} finally {
  rmSync(srcRam, { force: true })
  rmSync(work, { recursive: true, force: true })
}
