// Running snapctl as a command, for the suites that need no QEMU (test/unit) and those that do
// (test/integration/helpers.ts re-exports these).
import { spawn } from 'node:child_process'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
export const SNAPCTL_BIN = join(ROOT, 'bin/run.js')
/** The command line QEMU's exec: runs (through /bin/sh -c). */
export const SNAPCTL = `${process.execPath} ${SNAPCTL_BIN}`

export interface RunResult {
  code: number | null
  stdout: Buffer
  stderr: string
}

/** Runs snapctl as a command; resolves with its exit code and output (never rejects on status). */
export function snapctl(args: string[], opts: { input?: Buffer; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [SNAPCTL_BIN, ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, ...opts.env },
    })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (d: Buffer) => out.push(d))
    child.stderr.on('data', (d: Buffer) => (err += d.toString()))
    child.on('error', reject)
    child.stdin.on('error', () => {})
    child.stdin.end(opts.input)
    const timer = setTimeout(() => child.kill('SIGKILL'), 300_000)
    child.on('close', (code) => {
      clearTimeout(timer)
      resolvePromise({ code, stdout: Buffer.concat(out), stderr: err })
    })
  })
}
