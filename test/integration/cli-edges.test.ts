// The rough edges new users hit (issue 10, item 4), each with real snapctl processes: special
// files and pipes as --to, paths and --stats checked before any work, nothing partial left by
// load --to, signals reported, a verify that writes nothing, read-only directories, unfinished
// images in info, terminals where a stream belongs, progress and units, one vocabulary of
// output keys, and a lazy restore with no destination QEMU.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import { Level } from 'level'
import { SNAPCTL, SNAPCTL_BIN, Workdir, execUri, parseJson, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('edges')
const fixture = join(dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/qemu10-pc-16M.stream')
const image = w.path('vm.snap')
let want: Buffer
const mounts: string[] = []
test.after(async () => {
  for (const m of mounts) spawnSync('umount', [m])
  await w.cleanup()
})

const codeOf = (r: { stderr: string; stdout?: Buffer | string }): string | undefined =>
  /^snapctl: (SNAP_[A-Z_]+): /m.exec(r.stderr)?.[1] ?? /"code":\s*"(SNAP_[A-Z_]+)"/.exec(r.stdout?.toString() ?? '')?.[1]
const leftovers = (dir: string): string[] => readdirSync(dir).filter((f) => f.includes('.partial-'))

/** snapctl with a stdin we hold open (it never ends unless we end it). */
function started(args: string[]) {
  const child = spawn(process.execPath, [SNAPCTL_BIN, ...args], { stdio: ['pipe', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d))
  child.stderr.on('data', (d: Buffer) => (stderr += d))
  child.stdin.on('error', () => {})
  const killer = setTimeout(() => child.kill('SIGKILL'), 60_000)
  const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.on('close', (code) => {
      clearTimeout(killer)
      resolve({ code, stdout, stderr })
    }),
  )
  return { child, exited }
}

async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; !cond(); i++) {
    if (i > 1000) throw new Error(`waited 10 s for ${what}`)
    await sleep(10)
  }
}

/** Runs a shell command line with a terminal on stdin, stdout and stderr (util-linux `script`). */
function onTerminal(cmd: string): { status: number | null; out: string } {
  const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', timeout: 60_000 })
  return { status: r.status, out: r.stdout }
}

test.before(async () => {
  const r = await snapctl(['create', image, '--from', fixture])
  assert.is(r.code, 0, r.stderr)
  const l = await snapctl(['load', image, '--to', w.path('want.stream')])
  assert.is(l.code, 0, l.stderr)
  want = readFileSync(w.path('want.stream'))
})

test('create that refuses a stream exits at once while its input pipe stays open and silent', async () => {
  // As QEMU with a return path does after sending the last bytes: it holds the pipe open and
  // waits. The reading thread was blocked in read() and the process could not exit (the
  // migration then waited forever); now it is woken and snapctl exits with its error.
  const fifo = w.path('silent.fifo')
  execFileSync('mkfifo', [fifo])
  const writer = spawn('/bin/sh', ['-c', `{ printf 'QEVMgarbage'; head -c 300000 /dev/zero; sleep 30; } > ${fifo}`], { stdio: 'ignore' })
  const input = openSync(fifo, 'r')
  try {
    const t0 = Date.now()
    const r = spawnSync(process.execPath, [SNAPCTL_BIN, 'create', w.path('silent.snap')], { stdio: [input, 'pipe', 'pipe'], encoding: 'utf8', timeout: 20_000 })
    const seconds = (Date.now() - t0) / 1000
    assert.is(r.signal, null, `snapctl did not exit by itself within 20 s (${r.stderr})`)
    assert.is(codeOf(r), 'SNAP_STREAM_VERSION', r.stderr)
    assert.ok(seconds < 10, `exited after ${seconds} s`)
  } finally {
    closeSync(input)
    writer.kill('SIGKILL')
  }
})

test('load --to a character device or a FIFO: written in place, no --force, no temporary file', async () => {
  for (const extra of [[], ['--force']]) {
    const r = await snapctl(['load', image, '--to', '/dev/null', ...extra])
    assert.is(r.code, 0, r.stderr)
  }
  const fifo = w.path('stream.fifo')
  execFileSync('mkfifo', [fifo])
  const reader = spawn('cat', [fifo], { stdio: ['ignore', 'pipe', 'ignore'] })
  const got: Buffer[] = []
  reader.stdout.on('data', (d: Buffer) => got.push(d))
  const done = new Promise((r) => reader.on('close', r))
  const r = await snapctl(['load', image, '--to', fifo])
  await done
  assert.is(r.code, 0, r.stderr)
  assert.ok(Buffer.concat(got).equals(want), 'the FIFO carried another stream')
  assert.equal(leftovers(w.dir), [])
})

test('--stats that cannot be written fails up front (SNAP_BAD_PATH), before the stream is read', async () => {
  for (const stats of [w.path('no/such/dir/stats.json'), w.dir, '']) {
    const c = started(['create', w.path('never.snap'), '--stats', stats])
    const r = await c.exited // stdin is still open: it never read to the end of a stream
    assert.is(r.code, 2, r.stderr)
    assert.is(codeOf(r), 'SNAP_BAD_PATH', r.stderr)
    c.child.stdin.destroy()
  }
  const l = await snapctl(['load', image, '--to', w.path('never.stream'), '--stats', w.path('no/stats.json')])
  assert.is(codeOf(l), 'SNAP_BAD_PATH', l.stderr)
  assert.not.ok(existsSync(w.path('never.snap')) || existsSync(w.path('never.stream')))
  assert.equal(leftovers(w.dir), [])
})

test('load: --record-window without --record, --precopy-max without --postcopy, and a bad duration or size are SNAP_USAGE before anything is read', async () => {
  for (const args of [
    ['--to', w.path('never.stream'), '--record-window', '5s'],
    ['--to', w.path('never.stream'), '--precopy-max', '64M'],
    ['--postcopy', '--record', '--record-window', '5min'],
    ['--postcopy', '--precopy-max', '12X'],
  ]) {
    const r = await snapctl(['load', image, ...args])
    assert.is(codeOf(r), 'SNAP_USAGE', `${args.join(' ')}: ${r.stderr}`)
  }
  assert.not.ok(existsSync(w.path('never.stream')))
})

test('load --ready-fd: only with --postcopy --connect and an open fd; ready on it, connects only after a line on stdin; stdin closed first is SNAP_ABORTED', async () => {
  const sock = w.path('ready.sock')
  for (const args of [
    ['--postcopy', '--ready-fd', '3'], // no --connect
    ['--connect', `unix:${sock}`, '--ready-fd', '3'], // no --postcopy
    ['--postcopy', '--connect', `unix:${sock}`, '--ready-fd', '1'],
    ['--postcopy', '--connect', `unix:${sock}`, '--ready-fd', '200'], // not open
  ]) {
    const r = spawnSync(process.execPath, [SNAPCTL_BIN, 'load', image, ...args], { stdio: ['pipe', 'ignore', 'pipe', 'pipe'], encoding: 'utf8', timeout: 30_000 })
    assert.is(codeOf(r), 'SNAP_USAGE', `${args.join(' ')}: ${r.stderr}`)
  }
  const readyLoad = (): { child: ReturnType<typeof spawn>; ready: Promise<string>; exited: Promise<{ code: number | null; stderr: string }> } => {
    const child = spawn(process.execPath, [SNAPCTL_BIN, 'load', '--postcopy', '--connect', `unix:${sock}`, '--ready-fd', '3', image], { stdio: ['pipe', 'ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr!.on('data', (d: Buffer) => (stderr += d))
    let said = ''
    const ready = new Promise<string>((resolve) => {
      child.stdio[3]!.on('data', (d: Buffer) => (said += d))
      child.stdio[3]!.on('end', () => resolve(said))
    })
    return { child, ready, exited: new Promise((resolve) => child.on('close', (code) => resolve({ code, stderr }))) }
  }
  // Ready with nothing listening; stdin closed: SNAP_ABORTED (9), no connection attempted.
  const a = readyLoad()
  assert.is(await a.ready, 'ready\n')
  a.child.stdin!.end()
  const ra = await a.exited
  assert.is(ra.code, 9, ra.stderr)
  assert.match(ra.stderr, /^snapctl: SNAP_ABORTED: standard input closed/m)
  // Ready before the socket exists; after the line on stdin it connects to it.
  const b = readyLoad()
  assert.is(await b.ready, 'ready\n')
  const { createServer } = await import('node:net')
  const connected = new Promise<void>((resolve) => {
    const server = createServer((s) => {
      s.destroy()
      server.close()
      resolve()
    })
    server.listen(sock, () => b.child.stdin!.end('go\n'))
  })
  await connected
  const rb = await b.exited
  assert.is.not(rb.code, 0, 'the fake destination closed at once')
  assert.not.match(rb.stderr, /SNAP_ABORTED|SNAP_USAGE/)
})

test('a directory or an empty string as IMAGE (or --from, --to): SNAP_BAD_PATH at once', async () => {
  const lists = [
    ['create', w.dir], ['create', w.dir, '--force'], ['create', ''], ['create', `${w.path('x.snap')}/`],
    ['create', w.path('x.snap'), '--from', w.dir], ['create', w.path('x.snap'), '--from', ''],
    ['load', w.dir], ['load', ''], ['load', image, '--to', w.dir], ['load', image, '--to', ''],
    ['verify', w.dir], ['verify', ''], ['info', w.dir], ['info', ''],
  ]
  for (const args of lists) {
    const c = started(args)
    const r = await c.exited
    c.child.stdin.destroy()
    assert.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    assert.is(codeOf(r), 'SNAP_BAD_PATH', `${args.join(' ')}: ${r.stderr}`)
  }
  assert.equal(leftovers(w.dir), [])
})

test('load --to never leaves a partial file: a corrupt image, and SIGINT', async () => {
  const bad = w.path('bad.snap')
  const bytes = readFileSync(image)
  bytes[8192 + 100] ^= 0xff // inside the first cluster's payload
  writeFileSync(bad, bytes)
  const out = w.path('bad.stream')
  const r = await snapctl(['load', bad, '--to', out])
  assert.is(r.code, 3, r.stderr)
  assert.is(codeOf(r), 'SNAP_CHECKSUM')
  assert.not.ok(existsSync(out))
  assert.equal(leftovers(w.dir), [])

  // Held index: the load waits for it (up to 2 s) with its temporary file already open.
  const db = new Level(`${image}.index`)
  await db.open()
  try {
    const out2 = w.path('interrupted.stream')
    const c = started(['load', image, '--to', out2])
    await waitFor(() => leftovers(w.dir).length > 0, 'the temporary output file')
    c.child.kill('SIGINT')
    const s = await c.exited
    assert.is(s.code, 9, s.stderr)
    assert.is(codeOf(s), 'SNAP_ABORTED', s.stderr)
    assert.not.ok(existsSync(out2))
    assert.equal(leftovers(w.dir), [])
  } finally {
    await db.close()
  }
})

test('SIGINT and SIGTERM during create: exit 9 with the SNAP_ABORTED line (JSON with --json), nothing left', async () => {
  const stream = readFileSync(fixture)
  for (const [signal, extra] of [['SIGINT', []], ['SIGTERM', ['--json']]] as const) {
    const target = w.path(`killed-${signal}.snap`)
    const c = started(['create', target, ...extra])
    c.child.stdin.write(stream.subarray(0, 100_000))
    await waitFor(() => leftovers(w.dir).length > 0, 'the partial image')
    c.child.kill(signal)
    const r = await c.exited
    assert.is(r.code, 9, r.stderr)
    if (extra.length) assert.is(JSON.parse(r.stdout).error.code, 'SNAP_ABORTED')
    else assert.match(r.stderr, /^snapctl: SNAP_ABORTED: interrupted by SIGINT/m)
    assert.not.ok(existsSync(target))
    assert.equal(leftovers(w.dir), [])
  }
})

test('verify writes nothing unless --rebuild-index; read-only: verify exit 0, load exit 0 with a one-line note', async () => {
  const dir = w.path('ro-src')
  mkdirSync(dir)
  const copy = join(dir, 'copy.snap')
  copyFileSync(image, copy)
  let v = await snapctl(['verify', copy, '--json'])
  assert.is(v.code, 0, v.stderr)
  assert.is(parseJson(v).index, 'missing')
  assert.equal(readdirSync(dir), ['copy.snap'], 'verify wrote something')

  const ro = w.path('ro')
  mkdirSync(ro)
  execFileSync('mount', ['--bind', dir, ro])
  mounts.push(ro)
  execFileSync('mount', ['-o', 'remount,bind,ro', ro])
  v = await snapctl(['verify', join(ro, 'copy.snap')])
  assert.is(v.code, 0, v.stderr)
  const out = w.path('ro.stream')
  const l = await snapctl(['load', join(ro, 'copy.snap'), '--to', out])
  assert.is(l.code, 0, l.stderr)
  assert.not.match(l.stderr, /SNAP_[A-Z]/)
  assert.is(l.stderr.trim().split('\n').length, 1, l.stderr)
  assert.match(l.stderr, /^snapctl: note: /)
  assert.ok(readFileSync(out).equals(want))
  v = await snapctl(['verify', join(ro, 'copy.snap'), '--rebuild-index'])
  assert.is(codeOf(v), 'SNAP_INDEX_CORRUPT', 'asked to write where it cannot')
  execFileSync('umount', [ro])
  mounts.pop()

  v = await snapctl(['verify', copy, '--rebuild-index', '--json'])
  assert.is(v.code, 0, v.stderr)
  assert.is(parseJson(v).index, 'built')
  assert.is(parseJson(await snapctl(['verify', copy, '--json'])).index, 'ok')
})

test('info of an unfinished image: described, and exit 3 with SNAP_INCOMPLETE (text and JSON)', async () => {
  // What a create leaves while it runs (or when it died): the header is still zero (it is
  // written last), clusters follow, no trailer or footer yet.
  const partial = w.path('partial.snap')
  const bytes = readFileSync(image).subarray(0, 12288)
  bytes.fill(0, 0, 4096)
  writeFileSync(partial, bytes)
  const t = await snapctl(['info', partial])
  assert.is(t.code, 3, t.stderr)
  assert.match(t.stdout.toString(), 'incomplete snapctl image')
  assert.is(codeOf(t), 'SNAP_INCOMPLETE')
  const j = await snapctl(['info', partial, '--json'])
  assert.is(j.code, 3)
  const info = parseJson(j)
  assert.is(info.complete, false)
  assert.is(info.fileBytes, 12288)
  assert.is(info.error.code, 'SNAP_INCOMPLETE')
})

test('info: total RAM and compression ratio; small sizes in KiB, not 0.0 MiB', async () => {
  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.is(info.ramBytes, 16 * 1048576 + (128 + 256 + 128 + 4 + 4) * 1024)
  assert.is(info.ramPages, info.ramBytes / 4096)
  assert.ok(info.compressionRatio > 1, String(info.compressionRatio))
  assert.is(info.compressionRatio, Math.round((100 * info.rawBytes) / info.storedBytes) / 100)
  const text = (await snapctl(['info', image])).stdout.toString()
  assert.match(text, /^ram\s+16\.5 MiB in 6 blocks/m)
  assert.match(text, `ratio ${info.compressionRatio.toFixed(2)}`)
  assert.match(text, /4\.0 KiB/)
  assert.not.match(text, /\b0\.0 MiB/)
})

test('progress: a final line with a percent and MiB/s on every run; no \\r off a terminal, \\r on one', async () => {
  const l = await snapctl(['load', image, '--to', w.path('p.stream'), '--progress'])
  assert.is(l.code, 0, l.stderr)
  assert.match(l.stderr, /^load: 100% of [\d.]+ KiB in [\d.]+ s, [\d.]+ MiB\/s$/m)
  const v = await snapctl(['verify', image, '--progress'])
  assert.match(v.stderr, /^verify: 100% of [\d.]+ KiB in [\d.]+ s, [\d.]+ MiB\/s$/m)
  const c = await snapctl(['create', w.path('p.snap'), '--from', fixture, '--progress'])
  assert.match(c.stderr, /^create: 100% of [\d.]+ KiB in [\d.]+ s, [\d.]+ MiB\/s$/m)
  for (const r of [l, v, c]) {
    assert.not.match(r.stderr, '\r')
    assert.not.match(r.stderr, /\bMB\b|MB\/s/)
  }
  const tty = onTerminal(`${SNAPCTL} verify ${image} --progress`)
  assert.is(tty.status, 0, tty.out)
  assert.match(tty.out, /\rverify: 100% of/)
})

test('one vocabulary: pages, storedPages, zeroPages mean the same in create, info, verify and load', async () => {
  const img = w.path('keys.snap')
  const c = await snapctl(['create', img, '--from', fixture, '--json', '--stats', `${img}.cstats`])
  assert.is(c.code, 0, c.stderr)
  const l = await snapctl(['load', img, '--to', w.path('keys.stream'), '--stats', `${img}.lstats`])
  assert.is(l.code, 0, l.stderr)
  const sets = {
    'create --json': parseJson(c),
    'create --stats': JSON.parse(readFileSync(`${img}.cstats`, 'utf8')),
    'info --json': parseJson(await snapctl(['info', img, '--json'])),
    'verify --json': parseJson(await snapctl(['verify', img, '--json'])),
    'load --stats': JSON.parse(readFileSync(`${img}.lstats`, 'utf8')),
  }
  const pick = (o: Record<string, number>) => ({ pages: o.pages, storedPages: o.storedPages, zeroPages: o.zeroPages })
  const ref = pick(sets['info --json'])
  assert.is(ref.pages, ref.storedPages + ref.zeroPages)
  assert.is(ref.pages, 4226)
  for (const [what, o] of Object.entries(sets)) assert.equal(pick(o), ref, what)
  assert.equal(sets['create --stats'].stream, sets['info --json'].stream)
  assert.is(sets['create --stats'].stream.pageRecords + sets['create --stats'].stream.zeroRecords, 4226)
  assert.is(sets['load --stats'].pagesSent, 4226)
  assert.is(sets['create --stats'].ramPages, sets['info --json'].ramPages)
})

test('a terminal where the stream belongs: load stdout, create stdin (SNAP_TERMINAL), load --postcopy stdin (SNAP_NO_DESTINATION)', async () => {
  let t = onTerminal(`${SNAPCTL} load ${image}`)
  assert.is(t.status, 2, t.out)
  assert.match(t.out, /snapctl: SNAP_TERMINAL: /)
  assert.is(t.out.replace(/snapctl: SNAP_TERMINAL: [^\n]*\n?/, '').trim(), '', 'only the error on the terminal')
  t = onTerminal(`${SNAPCTL} create ${w.path('tty.snap')}`)
  assert.is(t.status, 2, t.out)
  assert.match(t.out, /snapctl: SNAP_TERMINAL: /)
  t = onTerminal(`${SNAPCTL} load --postcopy ${image} > /dev/null`)
  assert.is(t.status, 8, t.out)
  assert.match(t.out, /snapctl: SNAP_NO_DESTINATION: /)
  assert.not.ok(existsSync(w.path('tty.snap')))
})

test('load --postcopy by hand: stdin at EOF is SNAP_NO_DESTINATION; a real QEMU without postcopy-ram is SNAP_POSTCOPY_SETUP', async () => {
  const r = spawnSync(process.execPath, [SNAPCTL_BIN, 'load', '--postcopy', image], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8', timeout: 30_000 })
  assert.is(r.status, 8, r.stderr)
  assert.match(r.stderr, /^snapctl: SNAP_NO_DESTINATION: /m)

  const dst = await w.vm({ name: 'edges-nocap', memMiB: 16, anonymousRam: true, incoming: 'defer' })
  const status = w.path('nocap.status')
  const errFile = w.path('nocap.stderr')
  await dst.migrateIncoming(execUri(`load --postcopy ${image}`, status, errFile))
  assert.is(await waitStatus(status), 8)
  assert.match(readFileSync(errFile, 'utf8'), /^snapctl: SNAP_POSTCOPY_SETUP: /m)
})

test.run()
