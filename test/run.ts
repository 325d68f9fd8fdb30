// Runs the uvu suites and ends with the line CI reads: `N passed, N failed, N skipped`.
//   node dist/test/run.js              every suite (unit, then integration against real QEMU)
//   node dist/test/run.js --unit       unit suites only
//   node dist/test/run.js PATTERN ...  suites whose file name contains a PATTERN
import { existsSync, readdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

type Outcome = [errs: string, ran: number, skip: number, max: number]
declare global {
  // uvu's deferred queue: [suiteName, ...testRunners][]
  var UVU_QUEUE: Array<Array<unknown>>
  var UVU_DEFER: number
  var UVU_INDEX: number
}

const here = dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2)
const unitOnly = args.includes('--unit')
const patterns = args.filter((a) => !a.startsWith('--'))

const files: string[] = []
for (const dir of unitOnly ? ['unit'] : ['unit', 'integration']) {
  if (!existsSync(join(here, dir))) continue
  for (const f of readdirSync(join(here, dir)).sort()) {
    if (!f.endsWith('.test.js')) continue
    if (patterns.length && !patterns.some((p) => f.includes(p))) continue
    files.push(join(here, dir, f))
  }
}

globalThis.UVU_DEFER = 1
globalThis.UVU_QUEUE = []
const uvu = await import('uvu')
// uvu counts a suite whose before hook throws as 0 of N passed and prints nothing of the error
// (its runner returns from a finally): say what failed, or a broken set-up is a silent 0/N.
type Hook = (state: unknown) => unknown
const addBefore = uvu.test.before as unknown as ((fn: Hook) => void) & { each: unknown }
uvu.test.before = Object.assign((fn: Hook) => addBefore(async (state: unknown) => {
  try {
    await fn(state)
  } catch (e) {
    console.error(`\n  FAIL  the suite's set-up (test.before) threw: ${(e as Error)?.stack ?? String(e)}`)
    throw e
  }
}), { each: addBefore.each }) as unknown as typeof uvu.test.before
for (const [i, file] of files.entries()) {
  globalThis.UVU_INDEX = i
  globalThis.UVU_QUEUE.push([file.slice(here.length + 1)])
  await import(file)
}

let passed = 0
let failed = 0
let skipped = 0
for (const group of globalThis.UVU_QUEUE) {
  for (let j = 1; j < group.length; j++) {
    const runSuite = group[j] as () => Promise<Outcome>
    group[j] = async () => {
      const out = await runSuite()
      const [, ran, skip, max] = out
      passed += ran
      skipped += skip
      failed += max - ran - skip
      return out
    }
  }
}
await uvu.exec(false)
if (files.length === 0) failed++
process.stdout.write(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`)
process.exitCode = failed > 0 || passed === 0 ? 1 : 0
