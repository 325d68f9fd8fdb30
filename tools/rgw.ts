// A real S3 server for tests: Ceph's RADOS Gateway on a throw-away one-monitor, one-OSD cluster
// bound to 127.0.0.1 (tools/rgw/rgw.sh). startRgw() starts it, waits until it answers, and makes
// sure it is stopped: by stop(), at process exit, on SIGINT/SIGTERM, and (the script's watcher)
// when this process dies without running any hook. It throws, never skips, when it cannot start.
import { execFile, execFileSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const SCRIPT = join(ROOT, 'tools/rgw/rgw.sh')

export interface Rgw {
  /** AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION */
  env: Record<string, string>
  endpoint: string
  dir: string
  /** seconds from start to answering */
  startSeconds: number
  stop(): void
}

const running = new Set<string>()
let hooked = false

function stopDir(dir: string): void {
  if (!running.delete(dir)) return
  try {
    execFileSync('bash', [SCRIPT, 'stop', dir], { stdio: 'ignore', timeout: 20_000 })
  } catch {
    // the watcher started by the script stops it when this process is gone
  }
}

function hook(): void {
  if (hooked) return
  hooked = true
  process.on('exit', () => {
    for (const d of [...running]) stopDir(d)
  })
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      for (const d of [...running]) stopDir(d)
      process.kill(process.pid, sig)
    })
  }
}

export async function startRgw(opts: { timeoutMs?: number } = {}): Promise<Rgw> {
  const t0 = performance.now()
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-rgw-'))
  hook()
  running.add(dir)
  const out = await new Promise<string>((res, rej) => {
    execFile('bash', [SCRIPT, 'start', dir, String(process.pid)], { timeout: opts.timeoutMs ?? 90_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) rej(new Error(`RADOS Gateway did not start (tools/rgw/rgw.sh start): ${err.message}\n${stderr}`))
      else res(stdout)
    })
  }).catch((e) => {
    stopDir(dir)
    throw e
  })
  const env: Record<string, string> = {}
  for (const line of out.split('\n')) {
    const m = /^(AWS_[A-Z_]+)=(.*)$/.exec(line)
    if (m) env[m[1]] = m[2]
  }
  const endpoint = env.AWS_ENDPOINT_URL
  if (!endpoint || !/^http:\/\/127\.0\.0\.1:\d+$/.test(endpoint)) {
    stopDir(dir)
    throw new Error(`tools/rgw/rgw.sh start printed no loopback endpoint: ${out}`)
  }
  for (let i = 0; ; i++) {
    const ok = await fetch(endpoint).then((r) => r.status < 500, () => false)
    if (ok) break
    if (i > 100) {
      stopDir(dir)
      throw new Error(`RADOS Gateway at ${endpoint} does not answer`)
    }
    await sleep(100)
  }
  return { env, endpoint, dir, startSeconds: (performance.now() - t0) / 1000, stop: () => stopDir(dir) }
}
