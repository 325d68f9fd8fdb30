// The snapctl process that QEMU runs as the peer of an `exec:` migration (`create` for a save,
// `load` for a restore), seen from the `snapctl save`/`restore` that asked QEMU to run it.
//
// QEMU runs `/bin/sh -c CMD` and ignores the exit status, so CMD reports back through files in
// a private directory:
//
//   /bin/sh -c 'echo $$ > DIR/pid && exec NODE BIN load ... --stats DIR/stats' 2>DIR/stderr; echo $? > DIR/status
//
// `pid` (the peer's process id: liveness, and its byte counters in /proc/PID/io), `status`
// (its exit status, written once it has exited), `stderr` (its one-line error, with the stable
// code) and `stats` (its counters, as `--stats` writes them).
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { ERROR_CODES, SnapError, type ErrorCode } from '../errors.js'

/** bin/run.js of this snapctl (from dist/src/qemu/peer.js). */
const BIN = resolve(dirname(fileURLToPath(import.meta.url)), '../../../bin/run.js')

/** Quotes one word for /bin/sh. */
export function shellQuote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`
}

export class Peer {
  readonly pidFile: string
  readonly statusFile: string
  readonly stderrFile: string
  readonly statsFile: string
  private pid: number | undefined

  /** `dir` is private to this save or restore; QEMU's user must be able to write it. */
  constructor(readonly dir: string) {
    this.pidFile = join(dir, 'pid')
    this.statusFile = join(dir, 'status')
    this.stderrFile = join(dir, 'stderr')
    this.statsFile = join(dir, 'stats.json')
  }

  /** The `exec:` URI that runs `snapctl ARGS --stats FILE` as this peer. */
  uri(args: string[]): string {
    const argv = [process.execPath, BIN, ...args, '--stats', this.statsFile]
    const inner = `echo $$ > ${shellQuote(this.pidFile)} && exec ${argv.map(shellQuote).join(' ')}`
    return `exec:/bin/sh -c ${shellQuote(inner)} 2>${shellQuote(this.stderrFile)}; echo $? > ${shellQuote(this.statusFile)}`
  }

  /** Where a peer over a unix socket (`--channels`) listens or connects: in this private directory. */
  get socket(): string {
    return join(this.dir, 'migration.sock')
  }

  /**
   * Runs the same command as uri(args) as our own child rather than QEMU's: for the unix socket
   * transport (multifd channels), where QEMU connects or listens instead of running it.
   */
  start(args: string[]): void {
    const child = spawn('/bin/sh', ['-c', this.uri(args).slice('exec:'.length)], { stdio: 'ignore' })
    child.on('error', () => {})
    child.unref()
  }

  /**
   * As start(), with `load --ready-fd 3` in `args`: the load opens the image and gets ready
   * before the destination listens. Resolves once it says it is ready (a line on its fd 3);
   * `go()` then lets it connect (a line on its standard input); `cancel()` (or this process
   * exiting) closes that instead, and the load exits with SNAP_ABORTED. Rejects with the load's
   * own error if it exits first.
   */
  async startReady(args: string[]): Promise<{ go: () => void; cancel: () => void }> {
    const child = spawn('/bin/sh', ['-c', this.uri(args).slice('exec:'.length)], { stdio: ['pipe', 'ignore', 'ignore', 'pipe'] })
    child.on('error', () => {})
    child.unref()
    const stdin = child.stdin!
    const ready = child.stdio[3] as NodeJS.ReadableStream & { unref?: () => void; destroy: () => void }
    stdin.on('error', () => {}) // the load is gone: its exit status says why
    const release = (): void => {
      ready.destroy()
      ;(stdin as unknown as { unref?: () => void }).unref?.()
    }
    const said = await new Promise<boolean>((resolve) => {
      let got = ''
      ready.on('data', (d: Buffer) => {
        got += d.toString('latin1')
        if (got.includes('\n')) resolve(true)
      })
      ready.on('end', () => resolve(false))
      ready.on('error', () => resolve(false))
    })
    if (!said) {
      stdin.destroy()
      release()
      const status = await this.waitExit({ timeoutMs: 5000 })
      throw (await this.error()) ?? new SnapError('SNAP_INTERNAL', `the snapctl load exited (status ${status ?? 'unknown'}) before it was ready${(await this.stderr()) ? `: ${(await this.stderr()).split('\n').pop()}` : ''}`)
    }
    release()
    return { go: () => void stdin.end('go\n'), cancel: () => stdin.destroy() }
  }

  /** Waits for the socket to exist (a listening create); false after `timeoutMs` or once the peer exited. */
  async waitSocket(timeoutMs = 20_000): Promise<boolean> {
    for (const end = Date.now() + timeoutMs; Date.now() < end; await sleep(10)) {
      if (existsSync(this.socket)) return true
      if ((await this.exitStatus()) !== undefined) return false
    }
    return false
  }

  /** The peer's process id, once it has started. */
  async processId(): Promise<number | undefined> {
    if (this.pid === undefined) {
      const text = await readFile(this.pidFile, 'utf8').catch(() => '')
      const n = Number.parseInt(text, 10)
      if (text.endsWith('\n') && n > 0) this.pid = n
    }
    return this.pid
  }

  /** Its exit status once it has exited (the shell writes it then), else undefined. */
  async exitStatus(): Promise<number | undefined> {
    const text = await readFile(this.statusFile, 'utf8').catch(() => '')
    return text.endsWith('\n') ? Number.parseInt(text, 10) : undefined
  }

  /** Whether it runs now (false before it started and after it exited). */
  async running(): Promise<boolean> {
    const pid = await this.processId()
    if (pid === undefined || (await this.exitStatus()) !== undefined) return false
    try {
      process.kill(pid, 0)
      return true
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'EPERM'
    }
  }

  /**
   * Waits for the exit status. Gives up (undefined) when the peer never started within
   * `startMs`, or has been gone that long without a status; with `timeoutMs`, also after that.
   */
  async waitExit(opts: { startMs?: number; timeoutMs?: number } = {}): Promise<number | undefined> {
    const startMs = opts.startMs ?? 3000
    const deadline = opts.timeoutMs === undefined ? Infinity : Date.now() + opts.timeoutMs
    let absentSince = Date.now()
    for (;;) {
      const status = await this.exitStatus()
      if (status !== undefined) return status
      if (await this.running()) absentSince = Date.now()
      else if (Date.now() - absentSince > startMs) return undefined
      if (Date.now() > deadline) return undefined
      await sleep(25)
    }
  }

  /** Bytes it has read and written so far (/proc/PID/io), or null where that cannot be read. */
  async io(): Promise<{ read: number; written: number } | null> {
    const pid = await this.processId()
    if (pid === undefined) return null
    const text = await readFile(`/proc/${pid}/io`, 'utf8').catch(() => '')
    const read = /^rchar: (\d+)$/m.exec(text)
    const written = /^wchar: (\d+)$/m.exec(text)
    return read && written ? { read: Number(read[1]), written: Number(written[1]) } : null
  }

  async kill(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (!(await this.running())) return
    try {
      process.kill(this.pid!, signal)
    } catch {
      // it has just exited
    }
  }

  /** The error it reported (`snapctl: CODE: message`, its last one), as a SnapError. */
  async error(): Promise<SnapError | undefined> {
    const text = await readFile(this.stderrFile, 'utf8').catch(() => '')
    const all = [...text.matchAll(/^snapctl: (SNAP_[A-Z_]+): (.*)$/gm)]
    const last = all[all.length - 1]
    if (!last) return undefined
    const code = (last[1] in ERROR_CODES ? last[1] : 'SNAP_INTERNAL') as ErrorCode
    return new SnapError(code, last[2])
  }

  /** Its notes for the operator (`snapctl: note: ...` on stderr), to pass on. */
  async notes(): Promise<string[]> {
    const text = await readFile(this.stderrFile, 'utf8').catch(() => '')
    return [...text.matchAll(/^snapctl: note: (.*)$/gm)].map((m) => m[1])
  }

  /** What it wrote to stderr, for a message when it failed without a code. */
  async stderr(): Promise<string> {
    return (await readFile(this.stderrFile, 'utf8').catch(() => '')).trim()
  }

  async stats<T>(): Promise<T | undefined> {
    try {
      return JSON.parse(await readFile(this.statsFile, 'utf8')) as T
    } catch {
      return undefined
    }
  }
}
