// The incremental-image figures of README, "Incremental images": a paused VM (default 256 MiB,
// the benchmark's default mix) saved by QEMU to `migrate file:` streams, 5% of its RAM changed
// between them (new data, zeroed data, patterns, in runs of 16 pages); then, alternating A and B
// runs (--repeat N each): create --from the second stream whole vs with --base the first image
// (size, wall time, CPU), and load of a chain of 3 vs the same state as one image, to a pipe into
// /dev/null. Run: npm run --silent build && node dist/tools/bench/incremental.js [--mib 256] [--repeat 5]
import { execFileSync, spawnSync } from 'node:child_process'
import { closeSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { join, resolve, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { Vm, fillRam } from '../vm.js'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..')
const BIN = join(ROOT, 'bin/run.js')
const { values } = parseArgs({ options: { mib: { type: 'string', default: '256' }, repeat: { type: 'string', default: '5' }, share: { type: 'string', default: '0.05' } } })
const MIB = Number(values.mib)
const REPEAT = Number(values.repeat)
const SHARE = Number(values.share)
const dir = mkdtempSync(join('/dev/shm', 'snapctl-bench-incr-'))
const p = (n: string) => join(dir, n)

function change(path: string, seed: number): void {
  const fd = openSync(path, 'r+')
  const pages = (MIB << 20) / 4096
  let s = seed
  for (let i = 0; i < Math.round((pages * SHARE) / 16); i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0
    const first = (s % (pages / 16)) * 16
    const buf = i % 3 === 0 ? randomBytes(65536) : i % 3 === 1 ? Buffer.alloc(65536) : Buffer.alloc(65536, 0x5a + (i % 7))
    writeSync(fd, buf, 0, buf.length, first * 4096)
  }
  closeSync(fd)
}

async function stream(ram: string, out: string): Promise<void> {
  const vm = await Vm.start({ dir, name: `b${Date.now()}`, memMiB: MIB, memPath: ram })
  await vm.migrate(`file:${out}`)
  const info = await vm.waitMigration({ timeoutMs: 600_000 })
  await vm.quit()
  if (info.status !== 'completed') throw new Error(`migrate file: ${info.status}`)
}

/** One snapctl run under /usr/bin/time: wall seconds and user+sys CPU seconds. */
function run(args: string[], stdoutNull = false): { wall: number; cpu: number } {
  const t0 = performance.now()
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S', process.execPath, BIN, ...args], { stdio: ['ignore', stdoutNull ? 'ignore' : 'pipe', 'pipe'], encoding: 'utf8' })
  const wall = (performance.now() - t0) / 1000
  if (r.status !== 0) throw new Error(`snapctl ${args.join(' ')}: ${r.stderr}`)
  const [u, s] = r.stderr.trim().split('\n').pop()!.split(' ').map(Number)
  return { wall, cpu: u + s }
}

const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const fmt = (xs: number[]) => `median ${med(xs).toFixed(2)} (${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)})`

try {
  const ram = p('ram')
  await fillRam(ram, MIB << 20, { seed: 21 })
  await stream(ram, p('s0'))
  change(ram, 1)
  await stream(ram, p('s1'))
  change(ram, 2)
  await stream(ram, p('s2'))
  run(['create', p('a.snap'), '--from', p('s0')])
  const full: Array<{ wall: number; cpu: number }> = []
  const incr: Array<{ wall: number; cpu: number }> = []
  for (let i = 0; i < REPEAT; i++) {
    full.push(run(['create', p('full1.snap'), '--from', p('s1'), '--force']))
    incr.push(run(['create', p('b.snap'), '--from', p('s1'), '--base', p('a.snap'), '--force']))
  }
  run(['create', p('c.snap'), '--from', p('s2'), '--base', p('b.snap')])
  run(['create', p('full2.snap'), '--from', p('s2')])
  const single: Array<{ wall: number; cpu: number }> = []
  const chain: Array<{ wall: number; cpu: number }> = []
  for (let i = 0; i < REPEAT; i++) {
    single.push(run(['load', p('full2.snap')], true))
    chain.push(run(['load', p('c.snap')], true))
  }
  const size = (n: string) => statSync(p(n)).size
  const out = {
    ramMiB: MIB, changed: SHARE, repeat: REPEAT,
    fullBytes: size('full1.snap'), incrementalBytes: size('b.snap'), ratio: size('b.snap') / size('full1.snap'),
    thirdBytes: size('c.snap'), fullThirdBytes: size('full2.snap'),
    createFull: { wall: fmt(full.map((x) => x.wall)), cpu: fmt(full.map((x) => x.cpu)) },
    createBase: { wall: fmt(incr.map((x) => x.wall)), cpu: fmt(incr.map((x) => x.cpu)) },
    saveRatio: med(incr.map((x) => x.wall)) / med(full.map((x) => x.wall)),
    loadSingle: { wall: fmt(single.map((x) => x.wall)), cpu: fmt(single.map((x) => x.cpu)) },
    loadChain3: { wall: fmt(chain.map((x) => x.wall)), cpu: fmt(chain.map((x) => x.cpu)) },
    restoreRatio: med(chain.map((x) => x.wall)) / med(single.map((x) => x.wall)),
  }
  process.stdout.write(`${JSON.stringify(out, null, 2)}\n`)
  execFileSync('true')
} finally {
  rmSync(dir, { recursive: true, force: true })
}
