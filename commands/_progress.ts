// Progress on stderr. On a terminal, one line redrawn in place (`\r`) a few times a second;
// anywhere else (a log file, a pipe) a plain line every few seconds, never a `\r`. Either way a
// final line, however short the run. With a known total, the share done in percent.
import { formatBytes, formatRate } from './_format.js'

export interface Progress {
  /** `done` of `total` bytes (total unknown: undefined); throttled, call it as often as you like */
  update(done: number, total?: number): void
  /** the final line */
  finish(done: number, total?: number): void
}

export interface ProgressOptions {
  /** default: whether stderr is a terminal */
  tty?: boolean
  /** between two lines (default 250 ms on a terminal, 5 s elsewhere) */
  intervalMs?: number
  write?: (text: string) => void
}

export function progressReporter(what: string, opts: ProgressOptions = {}): Progress {
  const tty = opts.tty ?? process.stderr.isTTY === true
  const interval = opts.intervalMs ?? (tty ? 250 : 5000)
  const write = opts.write ?? ((text: string) => void process.stderr.write(text))
  const started = performance.now()
  let last = started
  let width = 0
  let finished = false

  const line = (done: number, total: number | undefined, final: boolean): string => {
    const s = (performance.now() - started) / 1000
    const amount = total ? `${Math.min(100, Math.floor((100 * done) / total))}% of ${formatBytes(total)}` : formatBytes(done)
    return `${what}: ${amount}${final ? ` in ${s.toFixed(2)} s` : ''}, ${formatRate(done, s)}`
  }
  const show = (text: string, final: boolean): void => {
    if (!tty) return write(`${text}\n`)
    const pad = ' '.repeat(Math.max(0, width - text.length))
    width = text.length
    write(`\r${text}${pad}${final ? '\n' : ''}`)
  }
  return {
    update(done, total) {
      const now = performance.now()
      if (finished || now - last < interval) return
      last = now
      show(line(done, total, false), false)
    },
    finish(done, total) {
      if (finished) return
      finished = true
      show(line(done, total, true), true)
    },
  }
}
