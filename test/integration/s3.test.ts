// Images in object storage (issue 16) against a real S3 server, Ceph's RADOS Gateway on a
// throw-away cluster on 127.0.0.1 (tools/rgw.ts), and real QEMU 10 (TCG): info, verify, eager
// and lazy restores of s3://BUCKET/KEY byte-identical, a flipped bit found by verify, an object
// replaced mid-read refused, wrong credentials and a missing bucket as clear errors.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { CreateBucketCommand, HeadObjectCommand, ListMultipartUploadsCommand, ListPartsCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fillRam, filesEqual, type Vm, type VmOptions } from '../../tools/vm.js'
import { startRgw, type Rgw } from '../../tools/rgw.js'
import { ImageReader } from '../../src/container/reader.js'
import { BLOCK, S3Source } from '../../src/container/s3-source.js'
import { isSnapError } from '../../src/errors.js'
import { MiB, SNAPCTL_BIN, Workdir, execCreate, execUri, fileRange, parseJson, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('s3')
const BUCKET = 'snaps'
const URL = `s3://${BUCKET}/vm1/vm.snap`
let rgw: Rgw
let s3: S3Client
let sourceRam: string
const image = w.path('vm.snap')

async function put(key: string, body: Buffer): Promise<void> {
  await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: key, Body: body }))
}

async function vmWithSocket(opts: VmOptions): Promise<{ vm: Vm; sock: string }> {
  const sock = w.path(`${opts.name}-snapctl.qmp`)
  const vm = await w.vm({ ...opts, extraArgs: [...(opts.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`] })
  return { vm, sock }
}

test.before(async () => {
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'
  rgw = await startRgw() // throws (the suite fails) when it cannot start: never a skip
  // QEMU's exec: children inherit QEMU's environment, which is ours.
  Object.assign(process.env, rgw.env, { SNAPCTL_CACHE_DIR: w.path('cache') })
  s3 = new S3Client({ forcePathStyle: true, requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' })
  await s3.send(new CreateBucketCommand({ Bucket: BUCKET }))
  sourceRam = w.path('source.ram')
  await fillRam(sourceRam, 128 * MiB, { seed: 16 })
  const source = await w.vm({ name: 'src', memMiB: 128, memPath: sourceRam })
  await execCreate(w, source, image)
  await source.quit()
  await put('vm1/vm.snap', readFileSync(image))
})
test.after(async () => {
  s3?.destroy()
  rgw?.stop()
  await w.cleanup()
})

test('info and verify read an image in object storage by ranges', async () => {
  const info = parseJson(await snapctl(['info', URL, '--json']))
  const local = parseJson(await snapctl(['info', image, '--json']))
  assert.is(info.complete, true)
  assert.is(info.path, URL)
  assert.equal([info.pages, info.storedPages, info.zeroPages, info.fileBytes], [local.pages, local.storedPages, local.zeroPages, local.fileBytes])
  const v = await snapctl(['verify', URL, '--json'])
  assert.is(v.code, 0, v.stderr)
  const r = parseJson(v)
  assert.is(r.ok, true)
  assert.ok(r.clusters > 1 && r.clustersOk === r.clusters, JSON.stringify(r))
  assert.not.match(v.stdout.toString() + v.stderr, rgw.env.AWS_SECRET_ACCESS_KEY)
})

async function execRestore(name: string, from: string): Promise<number> {
  const dst = await w.vm({ name, memMiB: 128, incoming: 'defer', keepMem: true })
  const status = w.path(`${name}.status`)
  const err = w.path(`${name}.stderr`)
  const t0 = performance.now()
  await dst.migrateIncoming(execUri(`load ${from}`, status, err))
  const mig = await dst.waitMigration({ timeoutMs: 120_000 })
  const code = await waitStatus(status)
  const seconds = (performance.now() - t0) / 1000
  assert.is(code, 0, existsSync(err) ? readFileSync(err, 'utf8') : '')
  assert.is(mig.status, 'completed')
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, `${name}: restored RAM differs`)
  await dst.quit()
  return seconds
}

test('load s3://... restores a real QEMU byte for byte (exec: migrate-incoming), timed against the local image', async () => {
  const local = await execRestore('dst-local', image)
  const remote = await execRestore('dst-s3', URL)
  // The figures README ("Images in object storage") quotes: one run, same VM, same image.
  console.log(`  eager restore of 128 MiB (exec:snapctl load): local ${local.toFixed(2)} s, s3:// ${remote.toFixed(2)} s (${(remote / local).toFixed(2)}x)`)
  for (const [what, from] of [['local', image], ['s3://', URL]]) {
    const t0 = performance.now()
    const r = await snapctl(['load', from, '--to', '/dev/null'])
    assert.is(r.code, 0, r.stderr)
    console.log(`  load ${what} --to /dev/null: ${((performance.now() - t0) / 1000).toFixed(2)} s`)
  }
})

test('restore --lazy s3://... over QMP: the VM runs at once and its RAM comes back byte for byte', async () => {
  const { vm: dst, sock } = await vmWithSocket({ name: 'dst-lazy', memMiB: 128, incoming: 'defer', keepMem: true })
  const r = await snapctl(['restore', URL, '--qmp', sock, '--lazy', '--paused', '--json'])
  assert.is(r.code, 0, r.stderr)
  const out = parseJson(r)
  assert.is(out.image, URL)
  assert.ok(out.runnableSeconds !== null && out.runnableSeconds < 10, JSON.stringify(out))
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, 'lazily restored RAM differs')
  await dst.quit()
})

test('a flipped bit in a stored object is found by verify s3://...', async () => {
  const bad = Buffer.from(readFileSync(image))
  bad[4096 * 3 + 123] ^= 0x10 // inside cluster 0's payload
  await put('vm1/flipped.snap', bad)
  const v = await snapctl(['verify', `s3://${BUCKET}/vm1/flipped.snap`, '--json'])
  assert.is(v.code, 3, v.stderr)
  const r = parseJson(v)
  assert.is(r.imageOk, false)
  assert.is(r.problems[0].code, 'SNAP_CHECKSUM')
  assert.is(r.problems[0].cluster, 0)
})

test('an object replaced under a reader is refused (ETag pinned by If-Match), never read from two versions', async () => {
  await put('vm1/moving.snap', readFileSync(image))
  const reader = await ImageReader.open(`s3://${BUCKET}/vm1/moving.snap`)
  try {
    // a cluster in the middle: the first and last blocks are in memory since the reader opened
    const middle = reader.clusterOffsets.length >> 1
    await reader.readCluster(0)
    const next = Buffer.from(readFileSync(image))
    next[next.length - 100] ^= 1 // another version (S3's ETag of a simple PUT is the MD5: the bytes must differ)
    await put('vm1/moving.snap', next)
    const err = await reader.readCluster(middle).then(() => null, (e: unknown) => e)
    assert.ok(isSnapError(err, 'SNAP_OBJECT_CHANGED'), String(err))
  } finally {
    await reader.close()
  }
})

async function uploadsOf(key: string): Promise<string[]> {
  const r = await s3.send(new ListMultipartUploadsCommand({ Bucket: BUCKET, Prefix: key }))
  return (r.Uploads ?? []).map((u) => u.UploadId!)
}

async function objectExists(key: string): Promise<boolean> {
  return s3.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key })).then(() => true, (e: { $metadata?: { httpStatusCode?: number } }) => {
    if (e.$metadata?.httpStatusCode === 404) return false
    throw e
  })
}

test('save s3://... (QEMU runs create s3://, a multipart upload) restores byte for byte; an existing object is refused', async () => {
  const { vm: src, sock } = await vmWithSocket({ name: 'src-save', memMiB: 128, memPath: sourceRam })
  const key = 'vm1/saved.snap'
  const r = await snapctl(['save', `s3://${BUCKET}/${key}`, '--qmp', sock, '--json'])
  assert.is(r.code, 0, r.stderr)
  const out = parseJson(r)
  assert.is(out.image, `s3://${BUCKET}/${key}`)
  assert.equal(await uploadsOf(key), [], 'the completed upload is not left open')
  // The same bytes as the local create of the same RAM, but for the image's uuid and times.
  const info = parseJson(await snapctl(['info', `s3://${BUCKET}/${key}`, '--json']))
  const local = parseJson(await snapctl(['info', image, '--json']))
  assert.equal([info.pages, info.storedPages, info.zeroPages, info.fileBytes], [local.pages, local.storedPages, local.zeroPages, local.fileBytes])
  const again = await snapctl(['save', `s3://${BUCKET}/${key}`, '--qmp', sock])
  assert.is(again.code, 5, again.stderr)
  assert.match(again.stderr, /SNAP_EXISTS: s3:\/\/snaps\/vm1\/saved.snap exists/)
  await src.quit()
  await execRestore('dst-saved', `s3://${BUCKET}/${key}`)
})

test('create s3://... --from a stream: verify passes and load gives back the same stream', async () => {
  const stream = w.path('vm.stream')
  assert.is((await snapctl(['load', image, '--to', stream])).code, 0)
  const key = 'vm1/created.snap'
  const r = await snapctl(['create', `s3://${BUCKET}/${key}`, '--from', stream, '--json'])
  assert.is(r.code, 0, r.stderr)
  assert.is(parseJson(r).path, `s3://${BUCKET}/${key}`)
  const back = w.path('back.stream')
  const l = await snapctl(['load', `s3://${BUCKET}/${key}`, '--to', back])
  assert.is(l.code, 0, l.stderr)
  assert.ok(readFileSync(back).equals(readFileSync(stream)), 'load of the uploaded image gives another stream')
  const v = await snapctl(['verify', `s3://${BUCKET}/${key}`, '--json'])
  assert.is(v.code, 0, v.stderr)
  // framed like a local image's clusters (a lazy restore's page request decodes one frame, not the cluster)
  const i = await snapctl(['info', `s3://${BUCKET}/${key}`, '--json'])
  assert.is(i.code, 0, i.stderr)
  assert.ok(parseJson(i).framedClusters > 0, `no framed clusters: ${i.stdout}`)
  rmSync(back)
})

test('SIGTERM mid-create s3://...: the upload is aborted, no object and no stored parts are left', async () => {
  const stream = w.path('vm.stream')
  const bytes = readFileSync(stream)
  const key = 'vm1/interrupted.snap'
  const child = spawn(process.execPath, [SNAPCTL_BIN, 'create', `s3://${BUCKET}/${key}`], { stdio: ['pipe', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => (stderr += d))
  const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)))
  child.stdin.on('error', () => {})
  // Most of the stream, then hold the pipe open: the create waits for more.
  child.stdin.write(bytes.subarray(0, Math.floor(bytes.length * 0.9)))
  let parts = 0
  for (let i = 0; i < 300 && parts === 0; i++) {
    await sleep(100)
    const ids = await uploadsOf(key)
    if (ids.length === 1) parts = ((await s3.send(new ListPartsCommand({ Bucket: BUCKET, Key: key, UploadId: ids[0] }))).Parts ?? []).length
  }
  assert.ok(parts > 0, `no part was uploaded while the create ran: ${stderr}`)
  child.kill('SIGTERM')
  // Once it has said what it undid, QEMU's side of the pipe closes (as QEMU does when its exec:
  // peer fails): a process whose input thread is blocked in read() on a silent pipe cannot exit.
  for (let i = 0; i < 600 && !/SNAP_ABORTED/.test(stderr); i++) await sleep(50)
  child.stdin.destroy()
  assert.is(await exited, 9, stderr)
  assert.match(stderr, /SNAP_ABORTED: interrupted by SIGTERM/)
  assert.is(await objectExists(key), false)
  assert.equal(await uploadsOf(key), [], 'the multipart upload is left open')
})

/** GETs logged (SNAPCTL_S3_GET_LOG) while `fn` ran: one "start-end" a request. */
async function gets(fn: (env: NodeJS.ProcessEnv) => Promise<void>): Promise<string[]> {
  const log = w.path(`gets-${Math.random().toString(16).slice(2)}.log`)
  const saved = process.env.SNAPCTL_S3_GET_LOG
  process.env.SNAPCTL_S3_GET_LOG = log // QEMU's exec: children and ours inherit it
  try {
    await fn({ SNAPCTL_S3_GET_LOG: log })
  } finally {
    if (saved === undefined) delete process.env.SNAPCTL_S3_GET_LOG
    else process.env.SNAPCTL_S3_GET_LOG = saved
  }
  return existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter(Boolean) : []
}

/** GETs (logged "start-end") that overlap another: some byte fetched twice (GETs of several blocks included). */
function refetched(ranges: string[]): string[] {
  const rs = ranges.map((r) => r.split('-').map(Number)).sort((a, b) => a[0] - b[0])
  const out: string[] = []
  let reach = 0
  for (const [a, b] of rs) {
    if (a < reach) out.push(`${a}-${b}`)
    reach = Math.max(reach, b)
  }
  return out
}

/** The 1 MiB blocks (s3-source.ts BLOCK) that start inside a logged GET (with a block cache, every GET is of whole blocks). */
function blocksIn(ranges: string[]): Set<number> {
  const out = new Set<number>()
  for (const [a, b] of ranges.map((r) => r.split('-').map(Number))) for (let i = Math.ceil(a / BLOCK); i * BLOCK < b; i++) out.add(i)
  return out
}

function cachedBytes(dir: string): number {
  const blocks = join(dir, 'blocks')
  return readdirSync(blocks).filter((n) => !n.includes('.lock') && !n.includes('.tmp-')).reduce((a, n) => a + statSync(join(blocks, n)).size, 0)
}

test('--cache-dir: a second load on the host fetches nothing; --cache-max bounds the cache', async () => {
  const cache = w.path('cache-second')
  const first = await gets(async () => {
    const r = await snapctl(['load', URL, '--to', '/dev/null', '--cache-dir', cache])
    assert.is(r.code, 0, r.stderr)
  })
  assert.ok(first.length > 0)
  assert.equal(refetched(first), [], 'a range was fetched twice by one load')
  assert.ok(first.length < readFileSync(image).length / BLOCK / 2, `${first.length} GETs: the blocks ahead of the load are not fetched in groups`)
  const second = await gets(async () => {
    const r = await snapctl(['load', URL, '--to', '/dev/null', '--cache-dir', cache])
    assert.is(r.code, 0, r.stderr)
  })
  assert.equal(second, [], 'the second load fetched again')
  const small = w.path('cache-small')
  const v = await snapctl(['verify', URL, '--cache-dir', small, '--cache-max', '8M', '--json'])
  assert.is(v.code, 0, v.stderr)
  const held = cachedBytes(small)
  assert.ok(held > 0 && held <= 8 * MiB, `the cache holds ${held} bytes, bound 8 MiB`)
})

test('four lazy restores of one object at once, sharing --cache-dir: all byte for byte, each range fetched once', async () => {
  await put('vm1/shared.snap', readFileSync(image))
  const url = `s3://${BUCKET}/vm1/shared.snap`
  const cache = w.path('cache-shared')
  const dsts = await Promise.all([0, 1, 2, 3].map((i) => vmWithSocket({ name: `dst-shared${i}`, memMiB: 128, incoming: 'defer', keepMem: true })))
  const fetched = await gets(async () => {
    const runs = await Promise.all(dsts.map(({ sock }) => snapctl(['restore', url, '--qmp', sock, '--lazy', '--paused', '--cache-dir', cache, '--json'])))
    for (const r of runs) assert.is(r.code, 0, r.stderr)
  })
  for (const { vm } of dsts) {
    assert.equal(await filesEqual(sourceRam, vm.memPath), { equal: true }, `${vm.name}: lazily restored RAM differs`)
    await vm.quit()
  }
  assert.equal(refetched(fetched), [], 'ranges fetched more than once')
  const objectBytes = readFileSync(image).length
  const total = fetched.reduce((a, r) => a + Number(r.split('-')[1]) - Number(r.split('-')[0]), 0)
  assert.ok(total <= objectBytes, `fetched ${total} bytes of a ${objectBytes}-byte object`)
})

/** The first page at or below `page` of block 0 with data, and the 1 MiB block (s3-source.ts BLOCK) of the object holding it. */
function dataPageAt(reader: ImageReader, page: number): { page: number; block: number } {
  for (let p = page; p >= 0; p--) {
    const l = reader.locate(0, p)
    if (l.cluster !== undefined) return { page: p, block: Math.floor(reader.clusterOffsets[l.cluster] / BLOCK) }
  }
  throw new Error(`no page with data at or below ${page}`)
}

const blockRange = (i: number, size: number): string => `${i * BLOCK}-${Math.min(size, (i + 1) * BLOCK)}`

test('lazy restore from s3:// with read-ahead: the blocks after a request are fetched at once, none twice, RAM byte for byte', async () => {
  const key = 'vm1/ahead.snap'
  await put(key, readFileSync(image))
  const size = statSync(image).size
  const local = await ImageReader.open(image)
  const dst = await w.vm({ name: 'dst-ahead', memMiB: 128, incoming: 'defer', keepMem: true })
  const [status, err, getLog] = [w.path('ahead.status'), w.path('ahead.stderr'), w.path('ahead.gets')]
  const logged = (): string[] => (existsSync(getLog) ? readFileSync(getLog, 'utf8').split('\n').filter(Boolean) : [])
  try {
    // QEMU runs the exec: command with its own environment: the settings go in the command. The
    // push is held to 8 MiB/s, so that it stays far behind the pages asked for.
    const uri = execUri(`load --postcopy s3://${BUCKET}/${key} --cache-dir ${w.path('cache-ahead')}`, status, err)
      .replace(/^exec:/, `exec:SNAPCTL_S3_GET_LOG=${getLog} SNAPCTL_POSTCOPY_PUSH_RATE=${8 * MiB} `)
    await dst.migrateIncoming(uri, { capabilities: { 'postcopy-ram': true } })
    const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
    assert.is(active.status, 'postcopy-active', JSON.stringify(active))
    // One page near the end of RAM, asked for at once: the push (and its read-ahead in file order)
    // is still far from its block then.
    const { page, block: b } = dataPageAt(local, (116 * MiB) / 4096)
    assert.equal(await dst.readGuest(page * 4096 + 512, 256), fileRange(sourceRam, page * 4096 + 512, 256), `guest read of page ${page}`)
    // Queued when the request was served, ahead of the push's read-ahead: started within moments.
    const want = [1, 2, 3, 4].map((k) => b + k).filter((i) => i * BLOCK < size).map((i) => blockRange(i, size))
    for (let t = 0; t < 50 && !want.every((r) => logged().includes(r)); t++) await sleep(20)
    const now = logged()
    for (const r of want) assert.ok(now.includes(r), `block ${r} after the request's block ${b} was not fetched ahead (${now.length} GETs so far)`)
    // ... and not by the push's read-ahead in file order: that had not reached the blocks before it.
    const pushed = blocksIn(now)
    assert.ok([1, 2, 3, 4, 5, 6].some((k) => !pushed.has(b - k)), `inconclusive: the push had fetched blocks ${b - 6}-${b - 1} already`)
    const done = await dst.waitMigration({ timeoutMs: 120_000 })
    assert.is(done.status, 'completed', JSON.stringify(done))
    assert.is(await waitStatus(status), 0, readFileSync(err, 'utf8'))
    const fetched = logged()
    assert.equal(refetched(fetched), [], 'ranges fetched more than once')
    assert.ok(fetched.every((r) => Number(r.split('-')[1]) <= size), 'a GET past the end of the object')
    assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, 'lazily restored RAM differs')
  } finally {
    await local.close()
    await dst.quit()
  }
})

test('read-ahead stops at the end of the object; the blocks of a working set are fetched in its order, each once, consecutive ones together', async () => {
  const key = 'vm1/edge.snap'
  await put(key, readFileSync(image))
  const bytes = readFileSync(image)
  const last = Math.ceil(bytes.length / BLOCK) - 1
  const ws: Array<[number, number]> = [[5 * BLOCK + 10, 100], [2 * BLOCK, BLOCK + 1], [5 * BLOCK, 1]] // blocks 5, 2, 3 (5 once)
  const fetched = await gets(async (env) => {
    // Without the block cache, each GET starts in the order it was queued (no cache lookups first).
    const src = await S3Source.open(`s3://${BUCKET}/${key}`, { cacheDir: w.path('cache-edge'), cacheMax: 0 })
    try {
      assert.ok(src.readSync(bytes.length - 100, 100).equals(bytes.subarray(bytes.length - 100)))
      src.prefetch(ws)
      for (let t = 0; t < 250 && readFileSync(env.SNAPCTL_S3_GET_LOG!, 'utf8').split('\n').filter(Boolean).length < 5; t++) await sleep(20)
      await sleep(200) // anything more it would fetch
    } finally {
      await src.close()
    }
  })
  // block 0 pins the ETag; blocks 2 and 3, consecutive in the working set's order, in one GET
  assert.equal(fetched, [...[0, last, 5].map((i) => blockRange(i, bytes.length)), `${2 * BLOCK}-${4 * BLOCK}`])
})

test('wrong credentials, a missing bucket and a missing object: clear errors with stable codes, no secret in them', async () => {
  const denied = await snapctl(['info', URL, '--json'], { env: { AWS_SECRET_ACCESS_KEY: 'not-the-secret-at-all' } })
  assert.is(denied.code, 11)
  assert.is(parseJson(denied).error.code, 'SNAP_OBJECT_DENIED')
  assert.not.match(denied.stdout.toString() + denied.stderr, 'not-the-secret-at-all')
  const noBucket = await snapctl(['verify', 's3://no-such-bucket/vm.snap'])
  assert.is(noBucket.code, 11)
  assert.match(noBucket.stderr, /SNAP_OBJECT_NOT_FOUND: .*the bucket no-such-bucket does not exist/)
  const noKey = await snapctl(['load', `s3://${BUCKET}/nothing/here.snap`, '--to', w.path('x.stream')])
  assert.is(noKey.code, 11)
  assert.match(noKey.stderr, /SNAP_OBJECT_NOT_FOUND/)
  rmSync(w.path('x.stream'), { force: true })
})

test.run()
