// The Linux test guest (tools/linux-guest/build.sh, run by tools/setup.sh): Debian's cloud kernel
// with a busybox initramfs whose memwork program fills a tmpfs, keeps rewriting memory and prints
// `HB <counter> ok <sum>` on ttyS0 every few hundred milliseconds. Boot it with tools/vm.ts
// (kernel, initrd, append) and follow what it says with SerialLog.
import { closeSync, existsSync, fstatSync, openSync, readSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
export const LINUX_GUEST_DIR = join(ROOT, 'dist/linux-guest')

/**
 * Paths of the built kernel and initramfs. Throws when they are missing: tests that need a real
 * Linux guest must fail, not skip, on a machine where it was not built.
 */
export function linuxGuest(dir = LINUX_GUEST_DIR): { kernel: string; initrd: string } {
  const kernel = join(dir, 'vmlinuz')
  const initrd = join(dir, 'initramfs.cpio.gz')
  for (const f of [kernel, initrd]) {
    if (!existsSync(f)) {
      throw new Error(`Linux test guest not built: ${f} is missing (run: bash tools/linux-guest/build.sh ${dir}, or tools/setup.sh)`)
    }
  }
  return { kernel, initrd }
}

/** The devices the tests give the Linux guest: two vCPUs, user-mode networking on virtio-net, virtio-rng. */
export const LINUX_GUEST_DEVICES = ['-smp', '2', '-no-reboot', '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0', '-device', 'virtio-rng-pci']

/**
 * tools/vm.ts options for the running Linux guest (512 MiB, q35, memwork), with a second QMP
 * socket at `qmp` for snapctl (save, restore); `incoming: 'defer'` for a restore's destination.
 */
export function linuxGuestVm(name: string, qmp: string, incoming?: string): { name: string; memMiB: number; machine: string; kernel: string; initrd: string; append: string; paused: false; incoming?: string; extraArgs: string[] } {
  const { kernel, initrd } = linuxGuest()
  return { name, memMiB: 512, machine: 'q35', kernel, initrd, append: LINUX_CMDLINE, paused: false, incoming, extraArgs: [...LINUX_GUEST_DEVICES, '-qmp', `unix:${qmp},server=on,wait=off`] }
}

/** What memwork does (tools/linux-guest/memwork.c): MiB of tmpfs data, MiB kept rewritten, tick length. */
export interface MemworkOptions {
  data?: number
  hot?: number
  ms?: number
  /** ms for one pass of rewrites over the hot region, in steps every 2 ms (0: one pass per tick) */
  pass?: number
  /** MiB of data re-read and checked per tick */
  check?: number
  seed?: number
}

export const MEMWORK_DEFAULTS: Required<MemworkOptions> = { data: 64, hot: 8, ms: 200, pass: 100, check: 8, seed: 1 }

/**
 * Kernel command line: console on ttyS0 (the harness's `-serial file:`), reboot at once on a
 * panic (with -no-reboot QEMU then exits instead of hanging), no kernel chatter between the
 * heartbeat lines, no speculation mitigations (they only cost time under TCG), and the memwork.*
 * keys /init passes on.
 */
export function linuxCmdline(mw: MemworkOptions = {}, extra = ''): string {
  const o = { ...MEMWORK_DEFAULTS, ...mw }
  const keys = Object.entries(o).map(([k, v]) => `memwork.${k}=${v}`)
  return ['console=ttyS0', 'panic=-1', 'quiet', 'mitigations=off', ...keys, extra].filter(Boolean).join(' ')
}

export const LINUX_CMDLINE = linuxCmdline()

export interface SerialLine {
  text: string
  /** performance.now() when the line was first seen complete in the file */
  at: number
}

export interface Heartbeat extends SerialLine {
  counter: number
  ok: boolean
  /** the data sum after `ok`, or what went wrong after `BAD` */
  detail: string
}

const HB = /^HB (\d+) (ok|BAD) (.*)$/

/**
 * Follows a serial log file that QEMU writes (`-serial file:PATH`): reads new bytes every
 * `pollMs` in the background, so each complete line is stamped with when it appeared to within
 * a poll. Call stop() when done (tests: before the VM is gone is not needed, the file stays).
 */
export class SerialLog {
  readonly path: string
  readonly lines: SerialLine[] = []
  private offset = 0
  private partial = ''
  private readonly timer: NodeJS.Timeout

  constructor(path: string, opts: { pollMs?: number } = {}) {
    this.path = path
    this.timer = setInterval(() => this.poll(), opts.pollMs ?? 10)
    this.timer.unref()
  }

  stop(): void {
    clearInterval(this.timer)
    this.poll()
  }

  /** Reads what QEMU has written since the last poll; returns the number of new complete lines. */
  poll(): number {
    if (!existsSync(this.path)) return 0
    const fd = openSync(this.path, 'r')
    const before = this.lines.length
    try {
      const size = fstatSync(fd).size
      if (size < this.offset) this.offset = 0 // QEMU truncated it (a new VM on the same path)
      const buf = Buffer.alloc(Math.min(size - this.offset, 4 << 20))
      const n = buf.length ? readSync(fd, buf, 0, buf.length, this.offset) : 0
      this.offset += n
      const at = performance.now()
      const parts = (this.partial + buf.subarray(0, n).toString('latin1')).split('\n')
      this.partial = parts.pop()!
      for (const p of parts) this.lines.push({ text: p.replace(/\r$/, ''), at })
    } finally {
      closeSync(fd)
    }
    return this.lines.length - before
  }

  /** performance.now() after reading everything written so far: lines seen later have `at` > mark. */
  mark(): number {
    this.poll()
    return performance.now()
  }

  /** Waits for a complete line matching `re` (seen after `since`, default any); rejects with the log's tail. */
  async waitFor(re: RegExp, timeoutMs: number, opts: { since?: number } = {}): Promise<RegExpExecArray & { line: SerialLine }> {
    const deadline = performance.now() + timeoutMs
    let from = 0
    for (;;) {
      this.poll()
      for (; from < this.lines.length; from++) {
        const line = this.lines[from]!
        if (opts.since !== undefined && line.at <= opts.since) continue
        const m = re.exec(line.text)
        if (m) return Object.assign(m, { line })
      }
      if (performance.now() > deadline) {
        throw new Error(`no line matching ${re} in ${this.path} after ${timeoutMs} ms; last lines:\n${this.tail()}`)
      }
      await sleep(10)
    }
  }

  /** Heartbeat lines seen after `since` (a mark() or performance.now(); default all). */
  heartbeats(since = -Infinity): Heartbeat[] {
    const out: Heartbeat[] = []
    for (const line of this.lines) {
      if (line.at <= since) continue
      const m = HB.exec(line.text)
      if (m) out.push({ ...line, counter: Number(m[1]), ok: m[2] === 'ok', detail: m[3]! })
    }
    return out
  }

  lastHeartbeat(): Heartbeat | undefined {
    this.poll()
    return this.heartbeats().at(-1)
  }

  /** Waits until `n` heartbeats were seen after `since`; resolves with them. */
  async waitHeartbeats(n: number, timeoutMs: number, since = -Infinity): Promise<Heartbeat[]> {
    const deadline = performance.now() + timeoutMs
    for (;;) {
      this.poll()
      const hbs = this.heartbeats(since)
      if (hbs.length >= n) return hbs
      if (performance.now() > deadline) {
        throw new Error(`${hbs.length} of ${n} heartbeats in ${this.path} after ${timeoutMs} ms; last lines:\n${this.tail()}`)
      }
      await sleep(10)
    }
  }

  tail(n = 15): string {
    return [...this.lines.slice(-n).map((l) => l.text), this.partial].join('\n')
  }
}
