// Images in object storage against local files, side by side (README, "Images in object storage"):
// a throw-away RADOS Gateway (tools/rgw.ts), then RUNS alternating rounds of
//   create LOCAL --from STREAM        vs  create s3://bench/vm.snap --from STREAM
//   load LOCAL --to /dev/null         vs  load s3://... with a fresh --cache-dir (cold: index and
//                                         every block fetched)  vs  the same with a warm cache
// printing the median wall time, its range and the median CPU (user+sys, /usr/bin/time) of each.
//   node dist/tools/bench-s3.js STREAM [--runs 5] [--dir DIR]
// STREAM: a QEMU migration stream (migrate "exec:cat > FILE"). Set SNAPCTL_RGW_MEM_BYTES above
// RUNS x the image's size: the gateway frees replaced objects only hours later.
//   node dist/tools/bench-s3.js --lazy [--runs 5] [--mem MiB] [--no-guest]
// lazy restores instead (tools/bench-s3-lazy.ts): time until the VM can run and the guest
// workload after resume, local against s3:// with a cold and a warm cache.
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SNAPCTL_BIN } from '../test/snapctl.js'
import { startRgw } from './rgw.js'
import { benchLazy } from './bench-s3-lazy.js'

const argv = process.argv.slice(2)
const opt = (name: string): string | undefined => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv.splice(i, 2)[1] : undefined
}
const runs = Number(opt('--runs') ?? 5)
const dir = opt('--dir') ?? mkdtempSync(join(tmpdir(), 'snapctl-bench-s3-'))
const flag = (name: string): boolean => {
  const i = argv.indexOf(name)
  return i >= 0 && argv.splice(i, 1).length === 1
}
const lazy = flag('--lazy')
const noGuest = flag('--no-guest')
const memMiB = Number(opt('--mem') ?? 1024)
const stream = argv[0]
if (!stream && !lazy) throw new Error('usage: bench-s3.js STREAM [--runs N] [--dir DIR] | bench-s3.js --lazy [--runs N] [--mem MiB] [--no-guest]')

interface Run {
  wall: number
  cpu: number
}

function snapctl(args: string[]): Run {
  const t0 = performance.now()
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S', process.execPath, SNAPCTL_BIN, ...args], { encoding: 'utf8' })
  const wall = (performance.now() - t0) / 1000
  if (r.status !== 0) throw new Error(`snapctl ${args.join(' ')}: ${r.stderr}`)
  const [u, s] = r.stderr.trim().split('\n').pop()!.split(' ').map(Number)
  return { wall, cpu: u + s }
}

const median = (a: number[]): number => [...a].sort((x, y) => x - y)[a.length >> 1]
function row(name: string, rs: Run[], base?: Run[]): string {
  const w = rs.map((r) => r.wall)
  const ratio = base ? ` (${(median(w) / median(base.map((r) => r.wall))).toFixed(2)}x)` : ''
  return `${name.padEnd(34)} wall ${median(w).toFixed(2)} s${ratio}, ${Math.min(...w).toFixed(2)}-${Math.max(...w).toFixed(2)}; CPU ${median(rs.map((r) => r.cpu)).toFixed(2)} s`
}

const rgw = await startRgw()
try {
  Object.assign(process.env, rgw.env, { SNAPCTL_CACHE_DIR: join(dir, 'writer-cache') }) // create's index
  const s3 = new S3Client({ forcePathStyle: true, requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' })
  await s3.send(new CreateBucketCommand({ Bucket: 'bench' }))
  if (lazy) {
    await benchLazy({ runs, memMiB, guest: !noGuest, s3, bucket: 'bench' })
    process.exitCode = 0
  } else await eager()
  s3.destroy()
} finally {
  rgw.stop()
  if (!argv.includes('--keep')) rmSync(dir, { recursive: true, force: true })
}

async function eager(): Promise<void> {
  const url = 's3://bench/vm.snap'
  const local = join(dir, 'vm.snap')
  const r: Record<string, Run[]> = { createLocal: [], createS3: [], loadLocal: [], loadCold: [], loadWarm: [] }
  for (let i = 0; i < runs; i++) {
    r.createLocal.push(snapctl(['create', local, '--force', '--from', stream]))
    r.createS3.push(snapctl(['create', url, '--force', '--from', stream]))
  }
  const warm = join(dir, 'cache-warm')
  snapctl(['load', url, '--to', '/dev/null', '--cache-dir', warm]) // fills it: index and blocks
  for (let i = 0; i < runs; i++) {
    r.loadLocal.push(snapctl(['load', local, '--to', '/dev/null']))
    const cold = join(dir, `cache-cold-${i}`)
    r.loadCold.push(snapctl(['load', url, '--to', '/dev/null', '--cache-dir', cold]))
    rmSync(cold, { recursive: true, force: true })
    r.loadWarm.push(snapctl(['load', url, '--to', '/dev/null', '--cache-dir', warm]))
  }
  console.log(`${runs} alternating runs each, medians (range):`)
  console.log(row('create FILE --from STREAM', r.createLocal))
  console.log(row('create s3:// --from STREAM', r.createS3, r.createLocal))
  console.log(row('load FILE --to /dev/null', r.loadLocal))
  console.log(row('load s3:// (fresh --cache-dir)', r.loadCold, r.loadLocal))
  console.log(row('load s3:// (cache warm)', r.loadWarm, r.loadLocal))
}
