// The compatibility matrix (issue 9): every configuration of tools/compat/configs.ts is first
// round-tripped by QEMU itself, then saved with exec:snapctl create, verified, and restored with
// exec:snapctl load and load --postcopy, every memory backend compared byte for byte. The table
// goes to stdout and to dist/compat-results.json (the README's table comes from it).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { CONFIGS } from '../../tools/compat/configs.js'
import { HugePages, runConfig, STEPS, type CompatResult } from './compat.js'
import { Workdir, execUri, waitStatus } from './helpers.js'

const w = new Workdir('compat')
const results: CompatResult[] = []
let huge: HugePages | undefined

test.after(async () => {
  huge?.release()
  await w.cleanup()
  const rows = results.map((r) => {
    const cells = STEPS.map((s) => (r.steps[s] === 'ok' ? 'ok' : r.steps[s] ? 'FAIL' : '-'))
    const dc = r.deviceCheck
    const dev = dc ? (dc.trusted.length ? `${dc.walked}/${dc.sections} walked, on trust: ${dc.trusted.join(' ')}` : `${dc.sections}/${dc.sections} walked`) : '-'
    return `| ${r.name} | ${r.what} | ${cells.join(' | ')} | ${dev} | ${r.seconds.toFixed(0)} s |`
  })
  const out = [`| config | devices | ${STEPS.join(' | ')} | device state | time |`, `|${'---|'.repeat(STEPS.length + 4)}`, ...rows].join('\n')
  console.log(`\ncompatibility matrix:\n${out}\n`)
  writeFileSync(join(process.cwd(), 'dist/compat-results.json'), `${JSON.stringify(results, null, 2)}\n`)
})

// What snapctl cannot save is refused by name as the stream starts, before any RAM, so that
// QEMU's migration fails (the VM stays with its source) instead of completing without an image.
test('compat: a capability create cannot take fails the migration before the RAM, naming it', async () => {
  for (const capability of ['return-path', 'postcopy-ram']) {
    const vm = await w.vm({ name: `refuse-${capability}`, memMiB: 64 })
    const image = w.path(`refuse-${capability}.snap`)
    const status = `${image}.status`
    const stderr = `${image}.stderr`
    await vm.migrate(execUri(`create ${image}`, status, stderr), { capabilities: { [capability]: true } })
    const info = await vm.waitMigration({ timeoutMs: 60_000 })
    assert.is(info.status, 'failed', `${capability}: ${JSON.stringify(info)}`)
    assert.is.not(await waitStatus(status), 0)
    const err = readFileSync(stderr, 'utf8')
    assert.match(err, /SNAP_STREAM_UNSUPPORTED/)
    assert.match(err, new RegExp(capability))
    assert.not.ok(existsSync(image), 'no image')
    assert.ok((info.ram?.transferred ?? 0) < 1 << 20, `RAM sent before the refusal: ${info.ram?.transferred}`)
    await vm.quit()
  }
})

const only = process.env.SNAPCTL_COMPAT_ONLY?.split(',')
for (const cfg of CONFIGS) {
  if (only && !only.includes(cfg.name)) continue
  test(`compat: ${cfg.name} (${cfg.what})`, async () => {
    if (cfg.backends.some((b) => b.huge) && !huge) {
      // Both sides hold the RAM at once (source and one destination): twice the hugepage backends.
      const mib = cfg.backends.filter((b) => b.huge).reduce((s, b) => s + b.mib, 0)
      huge = new HugePages(w.dir, 2 * mib + 16)
    }
    const r = await runConfig(cfg, w, huge)
    results.push(r)
    for (const s of STEPS) assert.is(r.steps[s], 'ok', `${cfg.name}: ${s}: ${r.steps[s] ?? 'not reached'}`)
  })
}

test.run()
