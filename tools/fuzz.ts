// Fuzzer for the stream parser, the image reader (GitHub issue 6) and the multifd channel parser (issue 13). Every case must end in
// success or a SnapError with a code from src/errors.ts; a TypeError, a RangeError, a case
// that runs longer than --case-ms, a Buffer over the allocation limit or a crashed worker is
// a failure, reported with the seed and case number that replay it.
//
//   node dist/tools/fuzz.js --target parser|image|multifd|mapped-ram|return-path|all [--cases 100000] [--seed S] [--case N]
//
// The cases run in a worker thread (tools/fuzz/worker.ts) that this process watches; a hung
// case is terminated and the run goes on from the next case.
import { Worker } from 'node:worker_threads'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import type { WorkerInput, WorkerMessage } from './fuzz/worker.js'

export interface FuzzOptions {
  target: 'parser' | 'image' | 'multifd' | 'mapped-ram' | 'return-path'
  seed: number
  cases: number
  /** first case number (to replay one case: first = N, cases = 1) */
  first?: number
  caseMs?: number
  maxAllocBytes?: number
  /** plant failures to prove the harness catches them (see tools/fuzz/worker.ts) */
  plant?: boolean
  onProgress?: (done: number) => void
}

export interface FuzzFailure {
  case: number
  what: string
  error: string
}

export interface FuzzReport {
  target: string
  seed: number
  cases: number
  /** outcomes by stage result: 'ok' or a SnapError code */
  outcomes: Record<string, number>
  failures: FuzzFailure[]
  seconds: number
}

const SETUP_MS = 120_000

export async function runFuzz(o: FuzzOptions): Promise<FuzzReport> {
  const started = performance.now()
  const first = o.first ?? 0
  const end = first + o.cases
  const caseMs = o.caseMs ?? 3000
  const report: FuzzReport = { target: o.target, seed: o.seed, cases: 0, outcomes: {}, failures: [], seconds: 0 }
  let next = first
  while (next < end) {
    next = await runWorker(o, next, end, caseMs, report)
  }
  report.seconds = (performance.now() - started) / 1000
  return report
}

/** Runs cases [from, end) in one worker; returns where to go on from (after a hang or crash). */
function runWorker(o: FuzzOptions, from: number, end: number, caseMs: number, report: FuzzReport): Promise<number> {
  const data: WorkerInput = { target: o.target, seed: o.seed, from, to: end, maxAllocBytes: o.maxAllocBytes ?? 64 * 1024 * 1024, plant: o.plant }
  const worker = new Worker(fileURLToPath(new URL('./fuzz/worker.js', import.meta.url)), {
    workerData: data,
    resourceLimits: { maxOldGenerationSizeMb: 1024 },
    stdout: true,
  })
  let current = -1
  let what = 'setup'
  let deadline = Date.now() + SETUP_MS
  return new Promise((resolve, reject) => {
    let settled = false
    const finish = (nextCase: number | Error): void => {
      if (settled) return
      settled = true
      clearInterval(timer)
      void worker.terminate()
      if (nextCase instanceof Error) reject(nextCase)
      else resolve(nextCase)
    }
    const fail = (error: string): void => {
      if (settled) return
      if (current < 0) return finish(new Error(`fuzz ${o.target}: setup failed: ${error}`))
      report.failures.push({ case: current, what, error })
      report.cases++
      finish(current + 1)
    }
    const timer = setInterval(() => {
      if (Date.now() > deadline) fail(`no result within ${current < 0 ? SETUP_MS : caseMs} ms (hang)`)
    }, 50)
    worker.on('message', (m: WorkerMessage) => {
      if (m.type === 'ready') deadline = Date.now() + caseMs
      else if (m.type === 'case') {
        current = m.n
        what = m.what
        deadline = Date.now() + caseMs
      } else if (m.type === 'result') {
        report.cases++
        for (const c of m.codes) report.outcomes[c] = (report.outcomes[c] ?? 0) + 1
        o.onProgress?.(report.cases)
      } else if (m.type === 'failure') {
        report.cases++
        report.failures.push({ case: m.n, what: m.what, error: m.error })
      } else if (m.type === 'done') finish(end)
    })
    worker.on('error', (e) => fail(`the worker died: ${e.stack ?? e.message}`))
    worker.on('exit', (code) => fail(`the worker exited with status ${code}`))
  })
}

export function formatReport(r: FuzzReport): string {
  const outcomes = Object.entries(r.outcomes).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(', ')
  let s = `fuzz ${r.target}: ${r.cases} cases, seed ${r.seed}, ${r.failures.length} failures, ${r.seconds.toFixed(1)} s\n  outcomes: ${outcomes}\n`
  for (const f of r.failures.slice(0, 20)) {
    s += `  FAIL case ${f.case} (replay: --target ${r.target} --seed ${r.seed} --case ${f.case}): ${f.what}\n    ${f.error.split('\n').slice(0, 6).join('\n    ')}\n`
  }
  return s
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: 'all' },
      cases: { type: 'string', default: '10000' },
      seed: { type: 'string' },
      case: { type: 'string' },
      'case-ms': { type: 'string', default: '3000' },
    },
  })
  const seed = values.seed !== undefined ? Number(values.seed) : Math.floor(Math.random() * 2 ** 31)
  const targets = values.target === 'all' ? (['parser', 'image', 'multifd', 'mapped-ram', 'return-path'] as const) : [values.target as 'parser' | 'image' | 'multifd' | 'mapped-ram' | 'return-path']
  if (!targets.every((t) => t === 'parser' || t === 'image' || t === 'multifd' || t === 'mapped-ram' || t === 'return-path') || !Number.isSafeInteger(seed)) {
    process.stderr.write('usage: fuzz.js --target parser|image|multifd|mapped-ram|return-path|all [--cases N] [--seed S] [--case N] [--case-ms MS]\n')
    process.exit(2)
  }
  let failed = 0
  for (const target of targets) {
    const one = values.case !== undefined
    const r = await runFuzz({
      target, seed, cases: one ? 1 : Number(values.cases), first: one ? Number(values.case) : 0, caseMs: Number(values['case-ms']),
      onProgress: (n) => n % 1000 === 0 && process.stderr.write(`\r${target}: ${n} cases`),
    })
    process.stderr.write('\r')
    process.stdout.write(formatReport(r))
    failed += r.failures.length
  }
  process.exitCode = failed > 0 ? 1 : 0
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main()
