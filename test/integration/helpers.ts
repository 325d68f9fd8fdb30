// Shared by the real-QEMU suites: how to run snapctl as QEMU's exec: peer and as a command,
// and how to wait for an exec: child to really finish (QEMU may say `completed` before that).
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Vm, fillRam, requireQemu, waitExitStatus, type VmOptions } from '../../tools/vm.js'
import { SNAPCTL, type RunResult } from '../snapctl.js'

export { SNAPCTL, SNAPCTL_BIN, snapctl, type RunResult } from '../snapctl.js'
export const MiB = 1 << 20

/** Fails loudly (never skips) when QEMU is missing or too old. */
requireQemu()

export class Workdir {
  readonly dir: string
  readonly vms: Vm[] = []
  constructor(prefix: string) {
    this.dir = mkdtempSync(join(tmpdir(), `snapctl-${prefix}-`))
  }

  path(name: string): string {
    return join(this.dir, name)
  }

  async vm(opts: VmOptions): Promise<Vm> {
    const vm = await Vm.start({ dir: this.dir, ...opts })
    this.vms.push(vm)
    return vm
  }

  async cleanup(): Promise<void> {
    await Promise.all(this.vms.map((vm) => vm.quit().catch(() => {})))
    rmSync(this.dir, { recursive: true, force: true })
  }
}

/** `exec:` URI that runs snapctl with `args` and records its exit status in `statusFile`. */
export function execUri(args: string, statusFile: string, stderrFile?: string): string {
  const redirect = stderrFile ? ` 2>${stderrFile}` : ''
  return `exec:${SNAPCTL} ${args}${redirect}; echo $? > ${statusFile}`
}

/** Waits for an exec: child to have exited; returns its exit status. */
export const waitStatus = (statusFile: string, timeoutMs = 120_000): Promise<number> => waitExitStatus(statusFile, timeoutMs, 20)

/**
 * A paused source VM of `memMiB` whose RAM file is filled with the default mix (`seed`), saved
 * with execCreate and quit: the RAM file (what every restore must give back) and the image.
 */
export async function savedVm(w: Workdir, name: string, memMiB: number, seed: number): Promise<{ ram: string; image: string }> {
  const ram = w.path(`${name}.ram`)
  await fillRam(ram, memMiB * MiB, { seed })
  const src = await w.vm({ name, memMiB, memPath: ram })
  const image = w.path(`${name}.snap`)
  await execCreate(w, src, image)
  await src.quit()
  return { ram, image }
}

/** Saves a VM with `migrate exec:snapctl create`; resolves when snapctl has exited 0. */
export async function execCreate(w: Workdir, vm: Vm, image: string, extra = '', opts: Parameters<Vm['migrate']>[1] = {}): Promise<void> {
  const status = `${image}.create-status`
  rmSync(status, { force: true })
  const errFile = `${image}.create-stderr`
  await vm.migrate(execUri(`create ${image} ${extra}`, status, errFile), opts)
  const info = await vm.waitMigration({ timeoutMs: 300_000 })
  const code = await waitStatus(status)
  const stderr = existsSync(errFile) ? readFileSync(errFile, 'utf8') : ''
  if (info.status !== 'completed' || code !== 0) {
    throw new Error(`save failed: migration ${info.status}, snapctl create exit ${code}: ${stderr}`)
  }
}

/** Restores into `dst` (started with incoming: 'defer') with `exec:snapctl load`; waits for both. */
export async function execLoad(dst: Vm, image: string, extra = '', opts: Parameters<Vm['migrateIncoming']>[1] = {}): Promise<number> {
  const status = `${image}.load-status-${dst.name}`
  rmSync(status, { force: true })
  const errFile = `${image}.load-stderr-${dst.name}`
  await dst.migrateIncoming(execUri(`load ${image} ${extra}`, status, errFile), opts)
  const info = await dst.waitMigration({ timeoutMs: 300_000 })
  const code = await waitStatus(status)
  const stderr = existsSync(errFile) ? readFileSync(errFile, 'utf8') : ''
  if (info.status !== 'completed' || code !== 0) {
    throw new Error(`restore failed: migration ${info.status}, snapctl load exit ${code}: ${stderr}\n${dst.stderr}`)
  }
  return code
}

export function parseJson<T = any>(r: RunResult): T {
  try {
    return JSON.parse(r.stdout.toString()) as T
  } catch {
    throw new Error(`not JSON (exit ${r.code}): ${r.stdout.toString().slice(0, 500)}\n${r.stderr}`)
  }
}

/** `size` bytes of a file at `offset` (a RAM file compared with what the guest reads). */
export function fileRange(path: string, offset: number, size: number): Buffer {
  const fd = openSync(path, 'r')
  try {
    const b = Buffer.alloc(size)
    readSync(fd, b, 0, size, offset)
    return b
  } finally {
    closeSync(fd)
  }
}
