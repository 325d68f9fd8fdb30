// The command-line pieces without a process: the fast path's parser (oclif's rules), sizes and
// rates for people, and the progress reporter (a terminal gets `\r`, anything else lines).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { parseCommandLine } from '../../commands/_argv.js'
import { formatBytes, formatRate } from '../../commands/_format.js'
import { progressReporter } from '../../commands/_progress.js'
import { parseDuration } from '../../commands/_size.js'
import { CREATE, LOAD } from '../../commands/_spec.js'
import { SnapError } from '../../src/errors.js'

const codeOf = (f: () => unknown): string | undefined => {
  try {
    f()
  } catch (e) {
    return e instanceof SnapError ? e.code : `not a SnapError: ${e}`
  }
  return undefined
}

test('the parser takes what oclif takes', () => {
  assert.equal(parseCommandLine(LOAD, ['a.snap', '--to', 'x', '--force']), { image: 'a.snap', flags: { to: 'x', force: true } })
  assert.equal(parseCommandLine(LOAD, ['--to=x', 'a.snap']).flags.to, 'x')
  assert.equal(parseCommandLine(LOAD, ['a.snap', '--to=-x']).flags.to, '-x')
  assert.equal(parseCommandLine(LOAD, ['a.snap', '--to', '']).flags.to, '')
  assert.equal(parseCommandLine(LOAD, ['--', '-weird-name']).image, '-weird-name')
  assert.equal(parseCommandLine(LOAD, ['a.snap', '--progress', '--progress']).flags.progress, true)
  const c = parseCommandLine(CREATE, ['vm.snap'])
  assert.equal([c.flags.compress, c.flags['cluster-size']], ['lz4', '1M'], 'defaults')
})

test('the parser refuses what oclif refuses, with SNAP_USAGE', () => {
  const bad: Array<[typeof LOAD, string[]]> = [
    [LOAD, ['a.snap', '--to', 'x', '--to', 'y']],
    [LOAD, ['a.snap', '--to']],
    [LOAD, ['a.snap', '--to', '--force']],
    [LOAD, ['a.snap', '--nope']],
    [LOAD, ['a.snap', '-f']],
    [LOAD, ['a.snap', '--no-force']],
    [LOAD, ['a.snap', '--to', 'x', '--postcopy']],
    [LOAD, ['--postcopy', 'a.snap', '--to', 'x']],
    [LOAD, []],
    [LOAD, ['a.snap', 'b.snap']],
    [LOAD, ['a.snap', '--force=true']],
    [CREATE, ['vm.snap', '--compress', 'zstd']],
    [CREATE, ['vm.snap', '--compress']],
    [CREATE, ['vm.snap', '--stats', 's', '--stats', 't']],
  ]
  for (const [spec, args] of bad) assert.is(codeOf(() => parseCommandLine(spec, args)), 'SNAP_USAGE', args.join(' '))
})

test('sizes: bytes and KiB below a MiB, MiB above; rates in MiB/s', () => {
  assert.is(formatBytes(0), '0 bytes')
  assert.is(formatBytes(1), '1 byte')
  assert.is(formatBytes(1023), '1023 bytes')
  assert.is(formatBytes(4096), '4.0 KiB')
  assert.is(formatBytes(100_000), '97.7 KiB')
  assert.is(formatBytes(1 << 20), '1.0 MiB')
  assert.is(formatBytes(4 * 2 ** 30), '4096.0 MiB')
  assert.is(formatRate(300 << 20, 2), '150 MiB/s')
  assert.is(formatRate(1 << 20, 2), '0.5 MiB/s')
  assert.is(formatRate(1, 0), '0.0 MiB/s')
})

test('progress: lines (no \\r) off a terminal, a \\r bar on one; always a final line with a percent', () => {
  let text = ''
  const plain = progressReporter('load', { tty: false, intervalMs: 0, write: (t) => (text += t) })
  plain.update(1 << 20, 4 << 20)
  plain.finish(4 << 20, 4 << 20)
  assert.not.match(text, '\r')
  const lines = text.trim().split('\n')
  assert.is(lines.length, 2)
  assert.match(lines[0], /^load: 25% of 4\.0 MiB, [\d.]+ MiB\/s$/)
  assert.match(lines[1], /^load: 100% of 4\.0 MiB in [\d.]+ s, [\d.]+ MiB\/s$/)

  text = ''
  const quiet = progressReporter('verify', { tty: false, write: (t) => (text += t) })
  for (let i = 0; i < 100; i++) quiet.update(i, 100)
  quiet.finish(100, 100)
  assert.is(text.trim().split('\n').length, 1, 'a short run: only the final line')

  text = ''
  const bar = progressReporter('verify', { tty: true, intervalMs: 0, write: (t) => (text += t) })
  bar.update(50, 100)
  bar.finish(100, 100)
  assert.ok(text.startsWith('\rverify: 50% of 100 bytes'), JSON.stringify(text))
  assert.ok(text.endsWith('\n') && text.split('\n').length === 2, JSON.stringify(text))
})

test('--record-window durations: 5s, 1500ms, 2.5 (seconds), 0; anything else is SNAP_USAGE', () => {
  assert.equal(['5s', '1500ms', '2.5', '0', ' 7S '].map((d) => parseDuration(d, '--record-window')), [5000, 1500, 2500, 0, 7000])
  for (const bad of ['', 's', '-1s', '5m', '1e3', '5 sec']) {
    try {
      parseDuration(bad, '--record-window')
      assert.unreachable(bad)
    } catch (e) {
      assert.is((e as SnapError).code, 'SNAP_USAGE', bad)
    }
  }
})

test.run()
