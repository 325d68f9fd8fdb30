// The command line as a person meets it, with real processes: help through oclif's help plugin
// (`help CMD`, `-h`, `--help`), an unknown command in the `snapctl: CODE:` form, and one set of
// rules for both parsers: the same bad (and good) argument lists through the fast path and
// through oclif ($SNAPCTL_NO_FAST_PATH=1) end with the same exit status and code.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Workdir, snapctl } from './helpers.js'

const w = new Workdir('front')
test.after(() => w.cleanup())
const fixture = join(dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/qemu10-pc-16M.stream')
const image = w.path('vm.snap')
const codeOf = (r: { stderr: string; stdout: Buffer }): string | undefined =>
  /^snapctl: (SNAP_[A-Z_]+): /m.exec(r.stderr)?.[1] ?? /"code":\s*"(SNAP_[A-Z_]+)"/.exec(r.stdout.toString())?.[1]

test.before(async () => {
  const r = await snapctl(['create', image, '--from', fixture])
  assert.is(r.code, 0, r.stderr)
})

test('help, -h, --help: exit 0 with the usage', async () => {
  for (const args of [['help', 'create'], ['help', 'load'], ['create', '-h'], ['load', '--help'], ['verify', '-h'], ['help'], ['--help']]) {
    const r = await snapctl(args)
    assert.is(r.code, 0, `${args.join(' ')}: ${r.stderr}`)
    assert.match(r.stdout.toString(), 'USAGE', args.join(' '))
  }
  assert.match((await snapctl(['autocomplete', '--help'])).stdout.toString(), 'USAGE')
})

test('an unknown command: SNAP_USAGE in the one-line form, exit 2', async () => {
  for (const args of [['craete', image], ['nope'], ['help', 'nope']]) {
    const r = await snapctl(args)
    assert.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    assert.is(codeOf(r), 'SNAP_USAGE', r.stderr)
  }
})

test('the fast path and oclif agree on every argument list', async () => {
  const out = (n: string) => w.path(`out-${n}`)
  const lists: string[][] = [
    ['load', image, '--to', out('a'), '--to', out('b')],
    ['load', image, '--to'],
    ['load', image, '--to', '--force'],
    ['load', image, '--nope'],
    ['load', image, '-f'],
    ['load', image, '--to', out('c'), '--postcopy'],
    ['load', '--postcopy', '--to', out('c'), image],
    ['load'],
    ['load', image, image],
    ['load', image, '--force=true', '--to', out('d')],
    ['load', image, '--stats', out('s1'), '--stats', out('s2'), '--to', out('e')],
    ['create', w.path('new.snap'), '--compress', 'zstd'],
    ['create', w.path('new.snap'), '--compress'],
    ['create', '--cluster-size', '1M', '--cluster-size', '2M', w.path('new.snap')],
    ['create', w.path('new.snap'), '--from', fixture, '--json', '--nope'],
    ['restore', image],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--record'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--lazy', '--channels', '2'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--channels', '-1'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--channels', 'two'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--lazy', '--precopy-max', 'lots'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--precopy-max', '64M'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--lazy', '--recover', '--record', '--json'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '-x'],
    ['save', w.path('new.snap')],
    ['save', w.path('new.snap'), '--qmp', w.path('nope.qmp'), '--channels', '256'],
    ['save', w.path('new.snap'), '--qmp', w.path('nope.qmp'), '--compress', 'zstd', '--json'],
    // accepted by both: they get as far as the same later outcome
    ['restore', image, '--qmp', w.path('nope.qmp'), '-q', '--channels', '0'],
    ['restore', image, '--qmp', w.path('nope.qmp'), '--lazy', '--json'],
    ['save', w.path('new.snap'), '--qmp', w.path('nope.qmp'), '-q', '--channels=2'],
    ['load', w.path('missing.snap'), '--to=-x'],
    ['load', '--', w.path('missing.snap')],
    ['load', image, '--to', ''],
    ['create', image, '--from', fixture],
  ]
  for (const args of lists) {
    const fast = await snapctl(args)
    const oclif = await snapctl(args, { env: { SNAPCTL_NO_FAST_PATH: '1' } })
    const label = `${args.join(' ')}: fast ${fast.code} ${fast.stderr} / oclif ${oclif.code} ${oclif.stderr}`
    assert.is(fast.code, oclif.code, label)
    assert.ok(fast.code !== 0, label)
    assert.is(codeOf(fast), codeOf(oclif), label)
    assert.ok(codeOf(fast) !== undefined, label)
  }
})

test.run()
