// Runs one row of the compatibility matrix (tools/compat/configs.ts) against real QEMU:
//   1. the source boots the Linux test guest and is stopped, so its RAM holds still;
//   2. QEMU round-trips it by itself (exec:cat > FILE, then exec:cat FILE into a fresh QEMU with
//      the same devices): the configuration is sound, so a later failure is ours;
//   3. that stream goes through our parser whole and in 4093-byte pieces, with the same result;
//   4. exec:snapctl create, snapctl verify, then exec:snapctl load and exec:snapctl load
//      --postcopy into fresh QEMUs; after each restore every memory backend is compared byte
//      for byte with the source's.
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { StreamParser } from '../../src/stream/parser.js'
import type { DeviceCheck } from '../../src/stream/device-tail.js'
import type { CompatConfig } from '../../tools/compat/configs.js'
import { linuxCmdline, linuxGuest, SerialLog } from '../../tools/linux-guest.js'
import { fillRam, filesEqual, type Vm } from '../../tools/vm.js'
import { MiB, Workdir, execCreate, execLoad, parseJson, snapctl } from './helpers.js'

export type Step = 'oracle' | 'parser' | 'create' | 'verify' | 'eager' | 'lazy' | 'restore'
export const STEPS: Step[] = ['oracle', 'parser', 'create', 'verify', 'eager', 'lazy', 'restore']

export interface CompatResult {
  name: string
  what: string
  steps: Partial<Record<Step, 'ok' | string>>
  deviceCheck?: DeviceCheck
  ramBlocks?: string[]
  bootSeconds?: number
  seconds: number
}

const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd'
const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd'

/** Huge pages for the rows that need them: a hugetlbfs mount with enough free 2 MiB pages. */
export class HugePages {
  readonly mount: string
  private readonly before: number
  constructor(dir: string, freeMiB: number) {
    const meminfo = readFileSync('/proc/meminfo', 'utf8')
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(meminfo)?.[1] ?? 0)
    this.before = Number(readFileSync('/proc/sys/vm/nr_hugepages', 'utf8'))
    const want = freeMiB / 2
    try {
      if (free < want) writeFileSync('/proc/sys/vm/nr_hugepages', String(this.before + want - free))
      const got = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)
      if (got < want) throw new Error(`only ${got} free 2 MiB pages after asking for ${want}`)
      this.mount = join(dir, 'hugetlbfs')
      mkdirSync(this.mount, { recursive: true })
      execFileSync('mount', ['-t', 'hugetlbfs', '-o', 'pagesize=2M', 'none', this.mount])
    } catch (err) {
      throw new Error(`this machine cannot give ${freeMiB} MiB of 2 MiB huge pages (needs root, vm.nr_hugepages, hugetlbfs): ${(err as Error).message}`, { cause: err })
    }
  }

  release(): void {
    try {
      execFileSync('umount', [this.mount])
    } catch {}
    try {
      writeFileSync('/proc/sys/vm/nr_hugepages', String(this.before))
    } catch {}
  }
}

/** Backend files made so far: removed at exit even when a run is cut short (a full /dev/shm fails every later VM). */
const madeBackends = new Set<string>()
process.on('exit', () => {
  for (const f of madeBackends) rmSync(f, { force: true })
})

/** Where one side's files live; a side is 'src' or a destination name. */
class Side {
  constructor(readonly cfg: CompatConfig, readonly w: Workdir, readonly name: string, readonly huge?: HugePages) {}

  backendPath(id: string): string {
    const b = this.cfg.backends.find((x) => x.id === id)!
    const dir = b.huge ? this.huge!.mount : '/dev/shm'
    const path = join(dir, `snapctl-compat-${process.pid}-${this.cfg.name}-${this.name}-${id}`)
    madeBackends.add(path)
    return path
  }

  removeBackends(): void {
    for (const b of this.cfg.backends) rmSync(this.backendPath(b.id), { force: true })
  }

  memoryArgs(): string[] {
    const { cfg } = this
    const obj = (id: string): string[] => {
      const b = cfg.backends.find((x) => x.id === id)!
      return ['-object', `memory-backend-file,id=${id},size=${b.mib}M,mem-path=${this.backendPath(id)},share=on${b.huge ? ',prealloc=off' : ''}`]
    }
    const smp = ['-smp', String(cfg.smp)]
    if (cfg.layout === 'numa') {
      const total = cfg.backends.reduce((s, b) => s + b.mib, 0)
      return ['-machine', cfg.machine, '-m', `${total}M`, ...smp, ...cfg.backends.flatMap((b) => [...obj(b.id), '-numa', `node,memdev=${b.id}`])]
    }
    const [main, ...extra] = cfg.backends
    const m = cfg.layout === 'dimm' ? `${main.mib}M,slots=2,maxmem=${main.mib + 512}M` : `${main.mib}M`
    return ['-machine', `${cfg.machine},memory-backend=${main.id}`, '-m', m, ...smp, ...obj(main.id), ...extra.flatMap((b) => obj(b.id))]
  }

  deviceArgs(incoming: boolean): string[] {
    const { cfg, w } = this
    const args = cfg.devices.map((a) => a.replace(/@DISK:(\w+)/g, (_, id: string) => w.path(`${cfg.name}-${id}.qcow2`)))
    if (cfg.uefi) {
      const vars = w.path(`${cfg.name}-${this.name}-vars.fd`)
      copyFileSync(OVMF_VARS, vars)
      args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE}`, '-drive', `if=pflash,format=raw,unit=1,file=${vars}`)
    }
    // A hot-plugged DIMM is on the destination's command line, as QEMU's migration wants.
    if (cfg.layout === 'dimm' && incoming) args.push('-device', 'pc-dimm,id=dimm0,memdev=dimm0mem')
    return args
  }

  /** a second QMP socket, for `snapctl restore --qmp` (the harness holds the first) */
  get qmpSocket(): string {
    return this.w.path(`${this.cfg.name}-${this.name}-snapctl.qmp`)
  }

  async start(opts: { incoming: boolean; paused: boolean }): Promise<Vm> {
    const { cfg } = this
    const boot = cfg.boot === 'linux' && !opts.incoming ? linuxGuest() : undefined
    return this.w.vm({
      name: `${cfg.name}-${this.name}`,
      memMiB: 0,
      memoryArgs: this.memoryArgs(),
      paused: opts.paused,
      incoming: opts.incoming ? 'defer' : undefined,
      kernel: boot?.kernel,
      initrd: boot?.initrd,
      append: boot ? linuxCmdline({ data: 16, hot: 4, check: 4 }) : undefined,
      extraArgs: [...this.deviceArgs(opts.incoming), '-qmp', `unix:${this.qmpSocket},server=on,wait=off`],
      timeoutMs: 30_000,
    })
  }
}

export async function runConfig(cfg: CompatConfig, w: Workdir, huge?: HugePages): Promise<CompatResult> {
  const t0 = performance.now()
  const result: CompatResult = { name: cfg.name, what: cfg.what, steps: {}, seconds: 0 }
  const src = new Side(cfg, w, 'src', huge)
  for (const d of cfg.disks ?? []) execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', w.path(`${cfg.name}-${d}.qcow2`), '64M'])
  const stream = w.path(`${cfg.name}.stream`)
  const image = w.path(`${cfg.name}.snap`)
  let vm: Vm | undefined
  try {
    if (cfg.boot === 'none') for (const b of cfg.backends) await fillRam(src.backendPath(b.id), b.mib * MiB, { seed: b.mib })
    vm = await src.start({ incoming: false, paused: cfg.boot === 'none' })
    if (cfg.layout === 'dimm') await vm.qmp.execute('device_add', { driver: 'pc-dimm', id: 'dimm0', memdev: 'dimm0mem' })
    result.bootSeconds = await boot(cfg, vm)
    await vm.qmp.execute('stop')

    await step(result, 'oracle', async () => {
      await vm!.migrate(`exec:cat > ${stream}`)
      const info = await vm!.waitMigration({ timeoutMs: 120_000 })
      if (info.status !== 'completed') throw new Error(`QEMU's own save: ${info.status} ${info['error-desc'] ?? ''}`)
      await restoreInto(new Side(cfg, w, 'dst0', huge), src, async (dst) => {
        await dst.migrateIncoming(`exec:cat ${stream}`)
        const done = await dst.waitMigration({ timeoutMs: 120_000 })
        if (done.status !== 'completed') throw new Error(`QEMU's own restore: ${done.status} ${done['error-desc'] ?? ''}\n${dst.stderr}`)
      })
    })
    await step(result, 'parser', async () => parseWholeAndInPieces(readFileSync(stream)))
    await step(result, 'create', async () => {
      // QEMU saves a VM paused by a finished migration only after it ran again: let it run a
      // moment (the restores below are compared with the RAM as this second save finds it).
      await vm!.qmp.execute('cont')
      await sleep(300)
      await vm!.qmp.execute('stop')
      await execCreate(w, vm!, image)
    })
    await step(result, 'verify', async () => {
      const r = await snapctl(['verify', image])
      if (r.code !== 0) throw new Error(`verify exit ${r.code}: ${r.stderr}`)
      const info = parseJson(await snapctl(['info', image, '--json']))
      result.deviceCheck = info.deviceCheck
      result.ramBlocks = info.ramBlocks.map((b: { name: string; size: number }) => `${b.name} ${b.size / MiB} MiB`)
    })
    await step(result, 'eager', async () => restoreInto(new Side(cfg, w, 'dst1', huge), src, (dst) => execLoad(dst, image)))
    await step(result, 'lazy', async () =>
      restoreInto(new Side(cfg, w, 'dst2', huge), src, (dst) => execLoad(dst, image, `--postcopy ${cfg.lazyArgs ?? ''}`, { capabilities: { 'postcopy-ram': true } })),
    )
    // The operator's command: checks the destination's RAM blocks against the image, sets
    // postcopy-ram (and the host page sizes of hugepage blocks) by itself.
    const dst3 = new Side(cfg, w, 'dst3', huge)
    await step(result, 'restore', async () =>
      restoreInto(dst3, src, async () => {
        const r = await snapctl(['restore', image, '--qmp', dst3.qmpSocket, '--lazy', '--paused'])
        if (r.code !== 0) throw new Error(`restore --lazy exit ${r.code}: ${r.stderr}`)
      }),
    )
  } finally {
    await vm?.quit()
    src.removeBackends()
    rmSync(stream, { force: true })
    rmSync(image, { force: true })
    rmSync(`${image}.index`, { recursive: true, force: true })
  }
  result.seconds = (performance.now() - t0) / 1000
  return result
}

async function step(result: CompatResult, name: Step, fn: () => Promise<unknown>): Promise<void> {
  if (Object.values(result.steps).some((v) => v !== 'ok')) return // after a failure the rest says nothing
  try {
    await fn()
    result.steps[name] = 'ok'
  } catch (err) {
    result.steps[name] = (err as Error).message.split('\n').slice(0, 6).join('\n')
  }
}

/** Runs the guest until it is up: the Linux guest's first `ok` heartbeat. */
async function boot(cfg: CompatConfig, vm: Vm): Promise<number | undefined> {
  if (cfg.boot === 'none') return undefined
  const t0 = performance.now()
  const log = new SerialLog(vm.logPath)
  try {
    await log.waitFor(/^HB \d+ ok /, 90_000)
  } finally {
    log.stop()
  }
  return (performance.now() - t0) / 1000
}

/** A fresh destination with the same devices; `restore` fills it; then every backend must equal the source's. */
async function restoreInto(side: Side, src: Side, restore: (dst: Vm) => Promise<unknown>): Promise<void> {
  const dst = await side.start({ incoming: true, paused: true })
  try {
    await restore(dst)
    for (const b of side.cfg.backends) {
      const eq = await filesEqual(src.backendPath(b.id), side.backendPath(b.id))
      if (!eq.equal) throw new Error(`memory backend ${b.id} differs from the source at byte ${eq.firstDiff}`)
    }
  } finally {
    await dst.quit()
    side.removeBackends()
  }
}

/** The parser on a real stream: whole and in odd pieces, the same counters and the same device state. */
function parseWholeAndInPieces(stream: Buffer): void {
  const run = (piece: number) => {
    const sink = { blocks() {}, zero() {}, page() {}, xbzrle() {} }
    const p = new StreamParser(sink)
    for (let i = 0; i < stream.length; i += piece) p.push(stream.subarray(i, Math.min(stream.length, i + piece)))
    const state = p.end()
    return { counters: p.counters, state }
  }
  const whole = run(stream.length)
  for (const piece of [4093, 65536 + 7]) {
    const o = run(piece)
    if (JSON.stringify(o.counters) !== JSON.stringify(whole.counters)) throw new Error(`pieces of ${piece}: counters differ`)
    if (!o.state.deviceSections.equals(whole.state.deviceSections) || !o.state.streamEnd.equals(whole.state.streamEnd)) {
      throw new Error(`pieces of ${piece}: device state differs`)
    }
  }
  if (whole.state.deviceSections.length + whole.state.streamEnd.length + whole.state.config.length === 0) throw new Error('no device state')
}
