// QEMU 10 loads a stream written by src/stream/encoder.ts: the RAM of the fixture stream plus
// changes made with re-sent PAGE, XBZRLE and ZERO records across sections, and the fixture's
// device state verbatim. Then the guest RAM QEMU holds is compared with what was sent.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createConnection, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import {
  PageRecordWriter,
  eosFooter,
  fileHeader,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from '../../src/stream/encoder.js'
import { xbzrleEncode } from '../../src/stream/xbzrle.js'
import { pageOf, parseWith } from '../unit/stream-helpers.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const fixture = readFileSync(join(root, 'test', 'fixtures', 'qemu10-pc-16M.stream'))

class Qmp {
  private buf = ''
  private waiting: Array<(m: Record<string, unknown>) => void> = []
  constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8')
    sock.on('data', (d: string) => {
      this.buf += d
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const msg = JSON.parse(this.buf.slice(0, nl)) as Record<string, unknown>
        this.buf = this.buf.slice(nl + 1)
        if ('return' in msg || 'error' in msg) this.waiting.shift()?.(msg)
      }
    })
  }
  static async connect(path: string): Promise<Qmp> {
    for (let i = 0; ; i++) {
      try {
        const sock = await new Promise<Socket>((res, rej) => {
          const s = createConnection(path, () => res(s))
          s.once('error', rej)
        })
        const q = new Qmp(sock)
        await q.cmd('qmp_capabilities')
        return q
      } catch (err) {
        if (i > 100) throw err
        await sleep(50)
      }
    }
  }
  async cmd(execute: string, args?: unknown): Promise<any> {
    const reply = await new Promise<Record<string, unknown>>((res) => {
      this.waiting.push(res)
      this.sock.write(JSON.stringify({ execute, arguments: args }) + '\n')
    })
    if (reply.error) throw new Error(`${execute}: ${JSON.stringify(reply.error)}`)
    return reply.return
  }
  close(): void {
    this.sock.destroy()
  }
}

test('QEMU 10 accepts a stream written by the encoder', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-stream-'))
  let qemu: ChildProcess | undefined
  try {
    const o = parseWith(fixture, 0)
    assert.not.ok(o.error, o.error?.message)
    const s = o.state!
    const blocks = o.sink.blockList
    const ids = { sectionId: s.ramSectionId, instanceId: s.ramInstanceId, version: s.ramVersion }
    const w = new PageRecordWriter(blocks, { chunkSize: 1 << 20 })
    w.raw(fileHeader(s.config))
    w.raw(ramStartSection(ids, blocks))
    w.raw(sectionPartHeader(ids.sectionId))
    for (const call of o.calls.slice(1)) {
      const [kind, b, p] = call.split(' ')
      const block = Number(b)
      const page = Number(p)
      if (kind === 'zero') w.zero(block, page)
      else w.page(block, page, o.sink.ram[block].subarray(page * 4096, (page + 1) * 4096))
    }
    w.raw(eosFooter(ids.sectionId))
    // a second round: pc.ram pages 0x300.. re-sent, one as an XBZRLE delta, one zeroed again
    const a = pageOf(0x300)
    const b2 = Buffer.from(a)
    b2.fill(0x42, 10, 50)
    w.raw(sectionPartHeader(ids.sectionId))
    w.page(0, 0x300, a)
    w.page(0, 0x301, pageOf(0x301))
    w.xbzrle(0, 0x300, xbzrleEncode(a, b2)!)
    w.zero(0, 0x301)
    w.page(0, 0x302, pageOf(0x302))
    w.raw(eosFooter(ids.sectionId))
    w.raw(switchoverStart())
    w.raw(sectionEndHeader(ids.sectionId))
    w.page(0, 0x303, pageOf(0x303))
    w.raw(eosFooter(ids.sectionId))
    w.raw(s.deviceSections)
    w.raw(s.streamEnd)
    const streamPath = join(dir, 'in.stream')
    writeFileSync(streamPath, Buffer.concat(w.flush()))

    const sockPath = join(dir, 'qmp.sock')
    qemu = spawn('qemu-system-x86_64', ['-machine', s.machine, '-accel', 'tcg', '-m', '16M', '-nodefaults', '-display', 'none', '-S',
      '-incoming', 'defer', '-qmp', `unix:${sockPath},server=on,wait=off`], { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    qemu.stderr!.on('data', (d) => (stderr += d))
    const qmp = await Qmp.connect(sockPath)
    await qmp.cmd('migrate-incoming', { uri: `file:${streamPath}` })
    let status = ''
    for (let i = 0; i < 200 && status !== 'completed' && status !== 'failed'; i++) {
      await sleep(50)
      status = (await qmp.cmd('query-migrate')).status ?? ''
    }
    assert.is(status, 'completed', `incoming migration: ${status}; QEMU said: ${stderr}`)
    const dump = join(dir, 'ram.bin')
    await qmp.cmd('pmemsave', { val: 0x300000, size: 0x4000, filename: dump })
    const ram = readFileSync(dump)
    assert.ok(ram.subarray(0, 4096).equals(b2), 'XBZRLE page')
    assert.ok(ram.subarray(4096, 8192).every((x) => x === 0), 'page zeroed again')
    assert.ok(ram.subarray(8192, 12288).equals(pageOf(0x302)))
    assert.ok(ram.subarray(12288).equals(pageOf(0x303)), 'page sent in the END section')
    await qmp.cmd('quit').catch(() => undefined)
    qmp.close()
  } finally {
    if (qemu && qemu.exitCode === null) qemu.kill()
    rmSync(dir, { recursive: true, force: true })
  }
})

test.run()
