// The one place where a command's outcome becomes output and an exit status
// (format-spec/errors.md): a SnapError prints `snapctl: CODE: message` on stderr, or
// {"error": {...}} on stdout with --json, and exits with its code's status. Anything else is
// SNAP_INTERNAL. Kept free of oclif so that the library never depends on the CLI framework.
import { installAbortHandlers } from '../src/abort.js'
import { SnapError } from '../src/errors.js'

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
 */
export async function runCommand(argv: string[], body: () => Promise<number | void>, opts: { jsonErrors?: boolean } = {}): Promise<void> {
  const json = (opts.jsonErrors ?? true) && argv.includes('--json')
  // A signal is reported like any error (the work in progress removes what it started).
  installAbortHandlers((e) => void reportError(e, json))
  try {
    process.exitCode = (await body()) ?? 0
  } catch (err) {
    process.exitCode = reportError(err, json)
  }
}
