// What `save` and `restore` share on the command line: progress on stderr from the library's
// progress figures (the `_` prefix keeps oclif from taking this file for a command).
import type { Progress } from '../src/qemu/migration.js'

const MiB = 1 << 20
export const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`
const rate = (bytesPerSecond: number | null): string => (bytesPerSecond === null ? '' : `, ${(bytesPerSecond / MiB).toFixed(0)} MiB/s`)

/**
 * On a terminal a bar redrawn in place four times a second; elsewhere (a log, a pipe) a line
 * every 3 seconds and at each change of phase. `note` prints a line between bar redraws.
 */
export function progressView(what: string, quiet: boolean): { update: (p: Progress) => void; note: (msg: string) => void; end: () => void } {
  const tty = process.stderr.isTTY === true
  let last = 0
  let phase = ''
  let drawn = false
  const clear = (): void => {
    if (drawn) process.stderr.write('\r\x1b[K')
    drawn = false
  }
  return {
    update(p) {
      if (quiet) return
      const now = performance.now()
      if (p.phase === phase && now - last < (tty ? 250 : 3000)) return
      phase = p.phase
      last = now
      const pct = p.percent === null ? null : Math.min(100, Math.max(0, p.percent))
      const amount = p.totalBytes ? ` of ${mib(p.totalBytes)}` : ''
      const text = p.phase === 'finishing'
        ? `${what}: QEMU is done; finishing the image`
        : `${what}: ${pct === null ? 'starting' : `${pct.toFixed(0)}%${amount}`}${rate(p.rate)}${p.phase === 'postcopy' ? ' (postcopy)' : ''}`
      if (!tty) return void process.stderr.write(`${text}\n`)
      const width = 24
      const bar = pct === null ? '' : `[${'#'.repeat(Math.round((pct / 100) * width)).padEnd(width, '.')}] `
      process.stderr.write(`\r\x1b[K${bar}${text}`)
      drawn = true
    },
    note(msg) {
      clear()
      process.stderr.write(`snapctl: ${msg}\n`)
    },
    end: clear,
  }
}
