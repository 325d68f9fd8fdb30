// Real QEMU for tests and benchmarks: start a VM whose RAM is a file we can fill and `cmp`, drive it
// over QMP, and make sure no QEMU outlives the test process. See DESIGN.md "Real components in tests".
import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { createCipheriv, createHash } from 'node:crypto'
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { chmod, open, readFile, stat, unlink, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { delimiter, dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { QmpClient } from './qmp.js'

const PAGE = 4096
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')

let qemuFound: { path: string; version: string } | undefined

/**
 * Finds qemu-system-x86_64 ($QEMU or PATH) and checks it is ≥ 9. Throws when it is missing or too
 * old: integration tests must fail, not skip, on a machine that cannot run them.
 */
export function requireQemu(): { path: string; version: string } {
  if (qemuFound) return qemuFound
  const candidates = process.env.QEMU
    ? [process.env.QEMU]
    : (process.env.PATH ?? '').split(delimiter).map((d) => join(d, 'qemu-system-x86_64'))
  const path = candidates.find((p) => p && existsSync(p))
  if (!path) {
    throw new Error('qemu-system-x86_64 not found (set $QEMU or install QEMU >= 9: run tools/setup.sh)')
  }
  let out: string
  try {
    out = execFileSync(path, ['--version'], { encoding: 'utf8', timeout: 10_000 })
  } catch (err) {
    throw new Error(`${path} --version failed: ${(err as Error).message}`, { cause: err })
  }
  const m = /version (\d+)\.(\d+)(?:\.(\d+))?/.exec(out)
  if (!m) throw new Error(`cannot read the QEMU version from: ${out.trim()}`)
  if (Number(m[1]) < 9) {
    throw new Error(`QEMU >= 9 is required, ${path} is ${m[0]} (run tools/setup.sh to install from bookworm-backports)`)
  }
  qemuFound = { path, version: `${m[1]}.${m[2]}.${m[3] ?? 0}` }
  return qemuFound
}

/** Builds the dirtying multiboot guest (tools/guest) if needed and returns the image path. */
export function buildGuest(out = join(ROOT, 'dist/guest/dirty.elf')): string {
  execFileSync('bash', [join(ROOT, 'tools/guest/build.sh'), out], { stdio: ['ignore', 'inherit', 'inherit'], timeout: 60_000 })
  return out
}

/** Guest-physical address of the dirtying guest's status block (tools/guest/dirty.c). */
export const GUEST_STATUS_ADDR = 0x7000
export const GUEST_STATUS_MAGIC = 0x59545244

export interface VmOptions {
  name: string
  memMiB: number
  /** backing file of guest RAM; default a new file in /dev/shm (postcopy destinations need tmpfs) */
  memPath?: string
  /** keep memPath on quit (only a memPath the caller gave; default true for those) */
  keepMem?: boolean
  /** plain `-m` RAM (block `pc.ram`) instead of a backing file; memPath is then unused */
  anonymousRam?: boolean
  /** the whole memory set-up (-machine, -m, -object, -numa ...) instead of one backing file; memPath is then unused */
  memoryArgs?: string[]
  /** share=on, so the file *is* guest RAM; default true */
  share?: boolean
  /** -S; default true (a destination must not run firmware over restored RAM) */
  paused?: boolean
  /** -incoming URI, e.g. 'defer' */
  incoming?: string
  /** -device VGA: a device with RAM blocks of its own (vga.vram, and its option ROM) */
  vga?: boolean
  /** multiboot image for -kernel, e.g. buildGuest() */
  kernel?: string
  /** -initrd, e.g. linuxGuest().initrd (tools/linux-guest.ts) */
  initrd?: string
  /** -append for the kernel (the dirtying guest reads "hot=<MiB> sweep=<pages>") */
  append?: string
  /** default 'pc' */
  machine?: string
  extraArgs?: string[]
  /** work dir for socket, logs and pmemsave files; default a new dir under os.tmpdir() */
  dir?: string
  timeoutMs?: number
}

export interface MigrateOptions {
  capabilities?: Record<string, boolean>
  parameters?: Record<string, unknown>
}

const live = new Set<Vm>()

export class Vm {
  readonly name: string
  readonly qmp: QmpClient
  readonly pid: number
  readonly memPath: string
  readonly logPath: string
  readonly dir: string
  readonly args: readonly string[]
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  private readonly proc: ChildProcess
  private readonly keepMem: boolean
  private readonly ownDir: boolean
  private readonly stderrChunks: string[]

  static async start(opts: VmOptions): Promise<Vm> {
    const qemu = requireQemu()
    const ownDir = !opts.dir
    const dir = opts.dir ?? mkdtempSync(join(tmpdir(), `snapctl-vm-${opts.name}-`))
    const memPath = resolve(opts.memPath ?? join('/dev/shm', `snapctl-${opts.name}-${process.pid}-${Date.now().toString(36)}.ram`))
    // A RAM file the harness made in /dev/shm is always removed (a full tmpfs fails every later
    // VM); keepMem only keeps a file the caller named.
    const keepMem = opts.memPath !== undefined && (opts.keepMem ?? true)
    const sock = join(dir, `${opts.name}.qmp`)
    const logPath = join(dir, `${opts.name}.serial.log`)
    const args = qemuArgs(opts, memPath, sock, logPath)

    // setpriv --pdeathsig: QEMU dies with us even if node is SIGKILLed and no exit hook runs.
    const usePdeath = existsSync('/usr/bin/setpriv')
    const proc = usePdeath
      ? spawn('/usr/bin/setpriv', ['--pdeathsig', 'SIGKILL', qemu.path, ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
      : spawn(qemu.path, args, { stdio: ['ignore', 'ignore', 'pipe'] })
    const stderrChunks: string[] = []
    let stderrLen = 0
    proc.stderr!.setEncoding('utf8')
    proc.stderr!.on('data', (s: string) => {
      if (stderrLen < 256 * 1024) stderrChunks.push(s)
      stderrLen += s.length
    })
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => {
      // 'close', not 'exit': by then stderr has been read to the end, for the error messages.
      proc.once('close', (code, signal) => res({ code, signal }))
      proc.once('error', () => res({ code: null, signal: null }))
    })
    const spawnError = new Promise<never>((_, rej) => proc.once('error', rej))
    spawnError.catch(() => {})

    const timeoutMs = opts.timeoutMs ?? 20_000
    let qmp: QmpClient
    try {
      qmp = await Promise.race([
        QmpClient.connect(sock, { timeoutMs }),
        spawnError,
        exited.then((e) => {
          throw new Error(`QEMU exited during start (code ${e.code}, signal ${e.signal})`)
        }),
      ])
    } catch (err) {
      proc.kill('SIGKILL')
      await exited
      if (!keepMem) rmSync(memPath, { force: true })
      if (ownDir) rmSync(dir, { recursive: true, force: true })
      throw new Error(
        `QEMU ${opts.name} did not start: ${(err as Error).message}\n  stderr: ${stderrChunks.join('').trim()}\n  command: ${qemu.path} ${args.join(' ')}`,
        { cause: err },
      )
    }
    const vm = new Vm(opts.name, qmp, proc, memPath, keepMem, logPath, dir, ownDir, args, exited, stderrChunks)
    live.add(vm)
    exited.then(() => qmp.close())
    return vm
  }

  private constructor(
    name: string, qmp: QmpClient, proc: ChildProcess, memPath: string, keepMem: boolean, logPath: string,
    dir: string, ownDir: boolean, args: string[], exited: Vm['exited'], stderrChunks: string[],
  ) {
    this.name = name
    this.qmp = qmp
    this.proc = proc
    this.pid = proc.pid!
    this.memPath = memPath
    this.keepMem = keepMem
    this.logPath = logPath
    this.dir = dir
    this.ownDir = ownDir
    this.args = args
    this.exited = exited
    this.stderrChunks = stderrChunks
  }

  /** What QEMU wrote to stderr so far (for error messages). */
  get stderr(): string {
    return this.stderrChunks.join('')
  }

  status(): Promise<{ status: string; running: boolean; singlestep?: boolean }> {
    return this.qmp.execute('query-status')
  }

  async migrate(uri: string, opts: MigrateOptions = {}): Promise<void> {
    await this.setMigrationOptions(opts)
    await this.qmp.execute('migrate', { uri })
  }

  async migrateIncoming(uri: string, opts: MigrateOptions = {}): Promise<void> {
    await this.setMigrationOptions(opts)
    await this.qmp.execute('migrate-incoming', { uri })
  }

  /**
   * Polls query-migrate every 20 ms until its status is one of `until` or `done(info)` holds;
   * resolves with that last answer (the caller checks for 'failed'). Rejects on timeout or if
   * QEMU exits. `done` lets a test act mid-migration, e.g. after N dirty syncs.
   */
  async waitMigration(opts: { until?: string[]; done?: (info: any) => boolean; timeoutMs?: number } = {}): Promise<any> {
    const until = opts.until ?? ['completed', 'failed', 'cancelled']
    const timeoutMs = opts.timeoutMs ?? 120_000
    const deadline = Date.now() + timeoutMs
    let last: any
    for (;;) {
      last = await this.qmp.execute('query-migrate')
      if (until.includes(last?.status) || opts.done?.(last)) return last
      if (Date.now() > deadline) {
        throw new Error(`${this.name}: migration still '${last?.status}' after ${timeoutMs} ms: ${JSON.stringify(last)}`)
      }
      await sleep(20)
    }
  }

  /** Reads guest-physical memory (pmemsave wants an absolute path, written by QEMU itself). */
  async readGuest(addr: number, size: number): Promise<Buffer> {
    const file = join(this.dir, `pmem-${process.pid}-${addr.toString(16)}-${size}-${Math.random().toString(36).slice(2)}`)
    try {
      await this.qmp.execute('pmemsave', { val: addr, size, filename: file })
      return await readFile(file)
    } finally {
      await unlink(file).catch(() => {})
    }
  }

  /** Asks QEMU to quit, SIGKILLs it if it has not exited within timeoutMs, then removes its files. */
  async quit(opts: { timeoutMs?: number } = {}): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      // QEMU may close the socket before answering: the reply is not needed.
      await this.qmp.execute('quit', undefined, { timeoutMs: 2000 }).catch(() => {})
      const timer = new Promise<'timeout'>((res) => setTimeout(res, opts.timeoutMs ?? 10_000, 'timeout').unref())
      if ((await Promise.race([this.exited, timer])) === 'timeout') this.proc.kill('SIGKILL')
    }
    const e = await this.exited
    this.cleanup()
    return e
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    this.proc.kill(signal)
  }

  /** Synchronous so it can run from process 'exit'. */
  cleanup(): void {
    live.delete(this)
    this.qmp.close()
    if (!this.keepMem) rmSync(this.memPath, { force: true })
    if (this.ownDir) rmSync(this.dir, { recursive: true, force: true })
    else rmSync(join(this.dir, `${this.name}.qmp`), { force: true })
  }

  private async setMigrationOptions(opts: MigrateOptions): Promise<void> {
    const caps = Object.entries(opts.capabilities ?? {}).map(([capability, state]) => ({ capability, state }))
    if (caps.length) await this.qmp.execute('migrate-set-capabilities', { capabilities: caps })
    if (opts.parameters && Object.keys(opts.parameters).length) await this.qmp.execute('migrate-set-parameters', opts.parameters)
  }
}

function qemuArgs(opts: VmOptions, memPath: string, sock: string, logPath: string): string[] {
  const n = opts.memMiB
  const memory = opts.memoryArgs
    ? opts.memoryArgs
    : opts.anonymousRam
    ? ['-machine', opts.machine ?? 'pc']
    : ['-machine', `${opts.machine ?? 'pc'},memory-backend=mem`,
       '-object', `memory-backend-file,id=mem,size=${n}M,mem-path=${memPath},share=${opts.share === false ? 'off' : 'on'}`]
  const args = [
    '-accel', 'tcg',
    ...memory,
    ...(opts.memoryArgs ? [] : ['-m', `${n}M`]),
    '-nodefaults', '-display', 'none', '-no-user-config',
    '-qmp', `unix:${sock},server=on,wait=off`,
    '-serial', `file:${logPath}`,
  ]
  if (opts.paused ?? true) args.push('-S')
  if (opts.incoming) args.push('-incoming', opts.incoming)
  if (opts.vga) args.push('-device', 'VGA')
  if (opts.kernel) args.push('-kernel', opts.kernel)
  if (opts.initrd) args.push('-initrd', opts.initrd)
  if (opts.append !== undefined) args.push('-append', opts.append)
  return args.concat(opts.extraArgs ?? [])
}

function killAll(): void {
  for (const vm of [...live]) {
    try {
      vm.kill('SIGKILL')
    } catch {}
    try {
      vm.cleanup()
    } catch {}
  }
}
process.on('exit', killAll)
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    killAll()
    process.kill(process.pid, sig)
  })
}

export interface RamMix {
  random: number
  text: number
  pattern: number
  zero: number
}

const DEFAULT_MIX: RamMix = { random: 40, text: 20, pattern: 15, zero: 25 }
const FILL_CHUNK = 1 << 20

/**
 * Writes exactly `bytes` of RAM-like content to `path` (mode 0600): runs of 1 to 64 pages, each run
 * random (AES-CTR keystream), text (ASCII words), a repeated pattern, or zero, picked by the
 * weights in `mix`. The same seed, size and mix always give the same file.
 */
export async function fillRam(path: string, bytes: number, opts: { seed: number; mix?: RamMix }): Promise<void> {
  const mix = opts.mix ?? DEFAULT_MIX
  const total = mix.random + mix.text + mix.pattern + mix.zero
  if (!(total > 0)) throw new Error('fillRam: mix weights must add up to more than 0')
  const rand = mulberry32(opts.seed)
  const seedKey = createHash('sha256').update(`snapctl-fill:${opts.seed}`).digest()
  const cipher = createCipheriv('aes-128-ctr', seedKey.subarray(0, 16), seedKey.subarray(16, 32))
  const zeros = Buffer.alloc(FILL_CHUNK)
  const corpus = textCorpus(rand)
  const patterns = Array.from({ length: 16 }, () => patternBytes(rand))
  // Two buffers: the kernel copies one into the file while we generate the next.
  const bufs = [Buffer.allocUnsafe(FILL_CHUNK), Buffer.allocUnsafe(FILL_CHUNK)]
  const writes: Array<Promise<void>> = [Promise.resolve(), Promise.resolve()]

  let kind = 0
  let runLeft = 0
  const fh = await open(path, 'w', 0o600)
  try {
    for (let pos = 0, i = 0; pos < bytes; pos += FILL_CHUNK, i ^= 1) {
      const len = Math.min(FILL_CHUNK, bytes - pos)
      await writes[i]
      const buf = bufs[i]!
      for (let off = 0; off < len; ) {
        if (runLeft === 0) {
          const r = rand() * total
          kind = r < mix.random ? 0 : r < mix.random + mix.text ? 1 : r < mix.random + mix.text + mix.pattern ? 2 : 3
          runLeft = 1 + Math.floor(rand() * 64)
        }
        // Whole run segments inside this chunk at once: one cipher call or one fill per segment.
        const n = Math.min(runLeft, Math.ceil((FILL_CHUNK - off) / PAGE))
        const end = off + n * PAGE
        if (kind === 0) {
          cipher.update(zeros.subarray(0, n * PAGE)).copy(buf, off)
        } else if (kind === 3) {
          buf.fill(0, off, end)
        } else {
          for (let p = off; p < end; p += PAGE) {
            if (kind === 1) {
              const src = Math.floor(rand() * (corpus.length - PAGE))
              corpus.copy(buf, p, src, src + PAGE)
              buf.write(`page ${(pos + p) / PAGE} `, p, 'latin1') // keeps text pages distinct, as in real RAM
            } else {
              buf.fill(patterns[Math.floor(rand() * patterns.length)]!, p, p + PAGE)
            }
          }
        }
        runLeft -= n
        off = end
      }
      writes[i] = writeAll(fh, buf, len, pos)
    }
    await Promise.all(writes)
    await fh.truncate(bytes)
  } finally {
    await Promise.allSettled(writes)
    await fh.close()
  }
  await chmod(path, 0o600) // open's mode applies only when the file is created
}

async function writeAll(fh: FileHandle, buf: Buffer, len: number, pos: number): Promise<void> {
  let done = 0
  while (done < len) done += (await fh.write(buf, done, len - done, pos + done)).bytesWritten
}

/** A fast seeded PRNG in [0, 1); quality is ample for picking page kinds. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function textCorpus(rand: () => number): Buffer {
  const letters = 'etaoinshrdlucmfwypvbgkqjxz'
  const words = Array.from({ length: 300 }, () => {
    let w = ''
    const n = 2 + Math.floor(rand() * 8)
    // Square the draw so common letters dominate, like English: that is what makes it compress.
    for (let i = 0; i < n; i++) w += letters[Math.floor(rand() * rand() * letters.length)]
    return w
  })
  let s = ''
  while (s.length < 64 * 1024) {
    s += words[Math.floor(rand() * rand() * words.length)]
    const r = rand()
    s += r < 0.05 ? '.\n' : r < 0.12 ? ', ' : ' '
  }
  return Buffer.from(s, 'latin1')
}

function patternBytes(rand: () => number): Buffer {
  const len = [1, 4, 8, 16, 64, 512][Math.floor(rand() * 6)]!
  const b = Buffer.alloc(len)
  for (let i = 0; i < len; i++) b[i] = Math.floor(rand() * 256)
  return b
}

/** Compares two files in 4 MiB chunks; firstDiff is the first differing byte offset (or the shorter length). */
/** Waits for the file an `exec:` command line writes its exit status to (`CMD; echo $? > FILE`). */
/**
 * The pids of processes whose argv holds every word of `words` (a shell's `-c` line excluded):
 * how a test finds the snapctl a restore started, to kill exactly that one.
 */
export function processesWith(words: string[]): number[] {
  const found: number[] = []
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue
    let argv: string[]
    try {
      argv = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0')
    } catch {
      continue
    }
    if (!argv.includes('-c') && words.every((w) => argv.includes(w))) found.push(Number(d))
  }
  return found
}

export async function waitExitStatus(path: string, timeoutMs = 120_000, pollMs = 10): Promise<number> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (existsSync(path)) {
      const text = readFileSync(path, 'utf8')
      if (text.endsWith('\n')) return Number(text.trim())
    }
    if (Date.now() > deadline) throw new Error(`no exit status in ${path} after ${timeoutMs} ms`)
    await sleep(pollMs)
  }
}

export async function filesEqual(a: string, b: string): Promise<{ equal: boolean; firstDiff?: number }> {
  const [sa, sb] = await Promise.all([stat(a), stat(b)])
  const common = Math.min(sa.size, sb.size)
  const CHUNK = 4 << 20
  const [fa, fb] = await Promise.all([open(a, 'r'), open(b, 'r')])
  try {
    const ba = Buffer.allocUnsafe(CHUNK)
    const bb = Buffer.allocUnsafe(CHUNK)
    for (let pos = 0; pos < common; pos += CHUNK) {
      const len = Math.min(CHUNK, common - pos)
      await Promise.all([readFully(fa, ba, len, pos), readFully(fb, bb, len, pos)])
      const x = ba.subarray(0, len)
      const y = bb.subarray(0, len)
      if (!x.equals(y)) {
        // Narrow down by pages first so the byte loop stays short.
        let i = 0
        while (i + PAGE <= len && x.subarray(i, i + PAGE).equals(y.subarray(i, i + PAGE))) i += PAGE
        while (x[i] === y[i]) i++
        return { equal: false, firstDiff: pos + i }
      }
    }
  } finally {
    await Promise.all([fa.close(), fb.close()])
  }
  return sa.size === sb.size ? { equal: true } : { equal: false, firstDiff: common }
}

async function readFully(fh: FileHandle, buf: Buffer, len: number, pos: number): Promise<void> {
  let done = 0
  while (done < len) {
    const { bytesRead } = await fh.read(buf, done, len - done, pos + done)
    if (bytesRead === 0) throw new Error(`unexpected end of file at ${pos + done}`)
    done += bytesRead
  }
}
