// Record and prefetch the working set with a real Linux guest (tools/linux-guest): a lazy
// restore with --record stores the order in which the guest asked for pages in the image; the
// next lazy restore of the same image sends those pages before the VM runs and the guest asks for
// far fewer than without one.
// The same image then shows a lazy restore surviving its source with a running guest: its load
// killed in postcopy, the guest stalls (postcopy-paused), restore --lazy --recover resumes it.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { SerialLog, linuxGuestVm } from '../../tools/linux-guest.js'
import { readFileSync } from 'node:fs'
import { getPriority } from 'node:os'
import { processesWith, type Vm } from '../../tools/vm.js'
import { Workdir, execCreate, parseJson, snapctl } from './helpers.js'

const w = new Workdir('working-set')
const logs: SerialLog[] = []
test.after(async () => {
  for (const l of logs) l.stop()
  await w.cleanup()
})

async function guestVm(name: string, incoming?: string): Promise<{ vm: Vm; qmp: string; log: SerialLog }> {
  const qmp = w.path(`${name}-snapctl.qmp`)
  const vm = await w.vm(linuxGuestVm(name, qmp, incoming))
  const log = new SerialLog(vm.logPath)
  logs.push(log)
  return { vm, qmp, log }
}

let image = ''

test('a running Linux guest is saved', async () => {
  const src = await guestVm('ws-src')
  await src.log.waitHeartbeats(3, 180_000)
  image = w.path('linux.snap')
  await execCreate(w, src.vm, image)
  await src.vm.quit()
})

async function lazyRestore(name: string, extra: string[]): Promise<any> {
  const dst = await guestVm(name, 'defer')
  const r = await snapctl(['restore', image, '--qmp', dst.qmp, '--lazy', '--json', ...extra])
  assert.is(r.code, 0, r.stderr)
  const j = parseJson(r)
  // The guest runs on with its data intact (memwork checks it in every heartbeat).
  const hbs = await dst.log.waitHeartbeats(3, 60_000)
  for (const h of hbs) assert.ok(h.ok, `${name}: ${h.text}`)
  await dst.vm.quit()
  return j
}

test('restore --lazy --record stores a working set; the next lazy restore sends it before the VM runs and the guest asks for 90% fewer pages', async () => {
  // The same image without a working set: what the guest asks for with the push alone.
  const plain = await lazyRestore('ws-plain', [])
  assert.ok(plain.requests > 0 && plain.prefetchedPages === 0 && plain.precopiedPages === 0, JSON.stringify(plain))
  // --record-window (default 5 s): no push meanwhile, so every page the guest touches is asked
  // for and recorded, far more than the push left it to ask for.
  const first = await lazyRestore('ws-rec', ['--record'])
  assert.ok(first.recordedPages > 2 * plain.requests && first.prefetchedPages === 0, JSON.stringify(first))
  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.is(info.workingSet.pages, first.recordedPages)
  assert.is((await snapctl(['verify', image])).code, 0)

  // While it runs, the highest nice value its load's main thread (pid = tid) had.
  let nice = -100
  let polling = true
  const poll = (async () => {
    while (polling) {
      for (const pid of processesWith(['load', '--postcopy', image])) {
        try {
          nice = Math.max(nice, Number(readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ')[16]))
        } catch {} // gone meanwhile
      }
      await new Promise((r) => setTimeout(r, 20))
    }
  })()
  const second = await lazyRestore('ws-use', []).finally(() => (polling = false))
  await poll
  // All of it (tens of MiB, under --precopy-max's 128M) went before the device state: in RAM
  // before the guest ran, so none of it could be asked for.
  assert.is(second.precopiedPages, first.recordedPages, JSON.stringify(second))
  assert.is(second.prefetchedPages, first.recordedPages, JSON.stringify(second))
  assert.is(second.prefetchedTouched, 0, JSON.stringify(second))
  // The push after it yields the CPU to the guest (nice +10, $SNAPCTL_POSTCOPY_PUSH_NICE).
  assert.is(nice, Math.min(19, getPriority() + 10), 'the load raised its nice value by 10 once the working set was in')
  const fewer = 1 - second.requests / plain.requests
  console.log(`working set: ${first.recordedPages} pages recorded (${first.requests} requests in the recording); requests without it ${plain.requests}, with it ${second.requests} ` +
    `(${(fewer * 100).toFixed(0)}% fewer); runnable ${plain.runnableSeconds.toFixed(3)} s without, ${second.runnableSeconds.toFixed(3)} s with ${second.precopiedPages} pages precopied; ` +
    `all in ${plain.seconds.toFixed(2)} / ${second.seconds.toFixed(2)} s`)
  // The lazy-restore issue's target. Measured on QEMU 10 TCG, 512 MiB, the shared machine: see
  // README, "working set". Before the record window and the precopy: 17% fewer, or none.
  assert.ok(fewer >= 0.9, `requests ${plain.requests} -> ${second.requests}: ${(fewer * 100).toFixed(0)}% fewer, not 90%`)
})

test('a running guest whose lazy restore is killed in postcopy runs on after --recover, its data intact', async () => {
  const dst = await guestVm('ws-recover', 'defer')
  // 512 MiB pushed at 32 MiB/s: the kill lands with most pages still missing.
  const first = snapctl(['restore', image, '--qmp', dst.qmp, '--lazy', '--json'], { env: { ...process.env, SNAPCTL_POSTCOPY_PUSH_RATE: String(32 << 20) } })
  const st = await dst.vm.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  assert.is(st.status, 'postcopy-active', JSON.stringify(st))
  while ((await dst.vm.qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') await new Promise((r) => setTimeout(r, 20))
  await new Promise((r) => setTimeout(r, 1000))
  const pids = processesWith(['load', '--postcopy', image])
  assert.is(pids.length, 1, pids.join(', '))
  process.kill(pids[0], 'SIGKILL')
  const paused = await dst.vm.waitMigration({ until: ['postcopy-paused', 'completed', 'failed'], timeoutMs: 30_000 })
  assert.is(paused.status, 'postcopy-paused', JSON.stringify(paused))
  assert.is.not((await first).code, 0)
  const r = await snapctl(['restore', image, '--qmp', dst.qmp, '--lazy', '--recover', '--json'])
  assert.is(r.code, 0, r.stderr)
  const j = parseJson(r)
  assert.ok(j.recovered && j.pagesReceivedBefore > 0 && j.vm === 'running', JSON.stringify(j))
  // memwork checks its data in every heartbeat: the next three, all pages in, must hold.
  const since = dst.log.mark()
  const hbs = await dst.log.waitHeartbeats(3, 60_000, since)
  for (const h of hbs) assert.ok(h.ok, `after --recover: ${h.text}`)
  console.log(`recover with a running guest: it had ${j.pagesReceivedBefore} of ${j.pages} pages, ${j.requests} requests after the resume; completed ${j.lastPageSeconds.toFixed(2)} s after --recover; then ${hbs.length} heartbeats, all ok`)
  await dst.vm.quit()
})

test.run()
