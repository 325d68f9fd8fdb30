// Runs fuzz cases in a worker thread, so that tools/fuzz.ts can stop it when a case hangs (a
// synchronous loop cannot be interrupted from inside). Announces each case before running it;
// the main thread owns the clock. Allocations of Buffers over the limit are recorded (not
// refused: refusing would change what the code under test sees) and reported as failures.
import { parentPort, workerData } from 'node:worker_threads'
import { ERROR_CODES, SnapError } from '../../src/errors.js'
import { caseRng } from './mutate.js'
import { imageTarget, multifdTarget, parserTarget, type Target } from './targets.js'
import { mappedRamTarget } from './mapped-ram-target.js'
import { returnPathTarget } from './return-path-target.js'

export interface WorkerInput {
  target: 'parser' | 'image' | 'multifd' | 'mapped-ram' | 'return-path'
  seed: number
  from: number
  to: number
  maxAllocBytes: number
  /** self-test of the harness: plant a TypeError, a hang and a huge Buffer in cases 3, 6, 8 (mod 10) */
  plant?: boolean
}

export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'case'; n: number; what: string }
  | { type: 'result'; n: number; codes: string[] }
  | { type: 'failure'; n: number; what: string; error: string }
  | { type: 'done' }

const input = workerData as WorkerInput
const post = (m: WorkerMessage): void => parentPort!.postMessage(m)

let hugeAlloc = 0
const B = Buffer as unknown as Record<string, (size: number, ...rest: unknown[]) => Buffer>
for (const k of ['alloc', 'allocUnsafe', 'allocUnsafeSlow']) {
  const orig = B[k]
  B[k] = function (size: number, ...rest: unknown[]) {
    if (size > input.maxAllocBytes) hugeAlloc = Math.max(hugeAlloc, size)
    return orig.call(Buffer, size, ...rest)
  }
}

class Unexpected extends Error {}

function plant(n: number): void {
  if (n % 10 === 3) (null as unknown as { x: number }).x = 1
  if (n % 10 === 6) for (;;);
  if (n % 10 === 8) Buffer.alloc(input.maxAllocBytes + 1)
}

/** The code of an acceptable failure; anything else is rethrown as the case's failure. */
function classify(stage: string, e: unknown): string {
  if (e instanceof SnapError && e.code in ERROR_CODES && e.code !== 'SNAP_INTERNAL') return e.code
  const detail = e instanceof Error ? (e.stack ?? e.message) : String(e)
  throw new Unexpected(`${stage}: ${detail}`)
}

const target: Target =
  input.target === 'parser' ? parserTarget(classify) : input.target === 'multifd' ? multifdTarget(classify)
    : input.target === 'mapped-ram' ? mappedRamTarget(classify) : input.target === 'return-path' ? returnPathTarget(classify) : await imageTarget(classify)
post({ type: 'ready' })
try {
  for (let n = input.from; n < input.to; n++) {
    const rand = caseRng(input.seed, n)
    const p = target.prepare(n, rand)
    post({ type: 'case', n, what: p.what })
    hugeAlloc = 0
    try {
      if (input.plant) plant(n)
      const codes = await target.run(p, rand, n)
      if (hugeAlloc > 0) throw new Unexpected(`a Buffer of ${hugeAlloc} bytes was allocated (limit ${input.maxAllocBytes})`)
      const held = process.memoryUsage().arrayBuffers
      if (held > 1024 * 1024 * 1024) throw new Unexpected(`${held} bytes of buffers still held after the case`)
      post({ type: 'result', n, codes })
    } catch (e) {
      post({ type: 'failure', n, what: p.what, error: e instanceof Error ? (e.stack ?? e.message) : String(e) })
    }
  }
} finally {
  target.cleanup()
}
post({ type: 'done' })
