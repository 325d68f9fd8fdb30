// The fuzzer (tools/fuzz.ts) in CI: a fixed seed and a few thousand cases per target. Every
// case must end in success or a SnapError with a listed code; a failure prints the seed and
// case number that replay it (`node dist/tools/fuzz.js --target T --seed S --case N`).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { formatReport, runFuzz } from '../../tools/fuzz.js'

const SEED = 20240601
const CASES = { parser: 4000, image: 3000, multifd: 3000, 'mapped-ram': 400, 'return-path': 3000 }

for (const target of ['parser', 'image', 'multifd', 'mapped-ram', 'return-path'] as const) {
  test(`fuzz ${target}: ${CASES[target]} cases, seed ${SEED}: only successes and listed SnapError codes`, async () => {
    const r = await runFuzz({ target, seed: SEED, cases: CASES[target] })
    assert.is(r.cases, CASES[target])
    assert.equal(r.failures, [], formatReport(r))
    // The mutations must reach both outcomes, or the run proves little.
    assert.ok((r.outcomes.ok ?? 0) > 0, formatReport(r))
    // (the return path has only three: ok, SNAP_RETURN_PATH, SNAP_RECV_BITMAP)
    assert.ok(Object.keys(r.outcomes).length >= (target === 'return-path' ? 3 : 5), formatReport(r))
  })
}

test('the harness catches a TypeError, a hang and a huge allocation, and goes on after each', async () => {
  const r = await runFuzz({ target: 'parser', seed: 1, cases: 10, plant: true, caseMs: 1000 })
  assert.is(r.cases, 10)
  assert.equal(r.failures.map((f) => f.case), [3, 6, 8])
  assert.match(r.failures[0].error, /TypeError/)
  assert.match(r.failures[1].error, /hang/)
  assert.match(r.failures[2].error, /allocated/)
})

test.run()
