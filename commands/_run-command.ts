// The one place where a command's outcome becomes output and an exit status
// (format-spec/errors.md): a SnapError prints `snapctl: CODE: message` on stderr, or
// {"error": {...}} on stdout with --json, and exits with its code's status. Anything else is
// SNAP_INTERNAL. Kept free of oclif: the fast path (commands/_fast.ts) runs without loading it.
import { SnapError, isSnapError } from '../src/errors.js'

export function toSnapError(err: unknown): SnapError {
  if (err instanceof SnapError) return err
  const e = err as { message?: string; oclif?: { exit?: number }; stack?: string }
  // oclif's parse errors (unknown flag, missing argument) carry an `oclif` field.
  if (e && typeof e === 'object' && e.oclif && typeof e.oclif === 'object') {
    return new SnapError('SNAP_USAGE', (e.message ?? 'bad command line').trim().replace(/\s*\n\s*/g, ' '), { cause: err })
  }
  return new SnapError('SNAP_INTERNAL', `unexpected error (please report it): ${e?.stack ?? e?.message ?? String(err)}`, { cause: err })
}

/** Print an error the way every command does; returns the exit status. */
export function reportError(err: unknown, json: boolean): number {
  const e = toSnapError(err)
  if (json) process.stdout.write(`${JSON.stringify({ error: e.toJSON() })}\n`)
  else process.stderr.write(`snapctl: ${e.code}: ${e.message}\n`)
  return e.exitCode
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`)
}

/**
 * Run a command body; it returns the exit status (default 0). `--json` anywhere in argv
 * selects JSON error output, so that even a parse error is reported in JSON.
 *
 * SIGINT and SIGTERM abort the body's signal: the library undoes what it started and rejects
 * with what it undid (`context.after`); that is reported like any error
 * (`snapctl: SNAP_ABORTED: interrupted by SIGINT; the partial image was removed`) and the
 * process exits at once with SNAP_ABORTED's status (9): the work it stopped may hold a pipe open.
 */
export async function runCommand(argv: string[], body: (signal: AbortSignal) => Promise<number | void>, opts: { jsonErrors?: boolean } = {}): Promise<void> {
  const json = (opts.jsonErrors ?? true) && argv.includes('--json')
  const ac = new AbortController()
  let outcome: Promise<number | void> = Promise.resolve()
  const interrupted = async (signal: NodeJS.Signals): Promise<void> => {
    if (ac.signal.aborted) return
    ac.abort(new SnapError('SNAP_ABORTED', `interrupted by ${signal}`))
    const after = await outcome.then(() => 'the work had already finished', undone)
    process.exit(reportError(new SnapError('SNAP_ABORTED', `interrupted by ${signal}${after ? `; ${after}` : ''}`), json))
  }
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => void interrupted(sig))
  try {
    outcome = body(ac.signal)
    process.exitCode = (await outcome) ?? 0
  } catch (err) {
    if (ac.signal.aborted) return new Promise<never>(() => {}) // reported by `interrupted`, which exits
    process.exitCode = reportError(err, json)
  }
}

/** What interrupted work says it left: what the library undid, or why it failed meanwhile. */
function undone(err: unknown): string | undefined {
  if (!isSnapError(err)) return undefined
  if (typeof err.context.after === 'string') return err.context.after
  return err.code === 'SNAP_ABORTED' ? undefined : err.message
}
