// What SIGINT and SIGTERM do to a running command: the work in progress has registered how to
// undo what it started (remove a partial image or output file); those cleanups run, the
// interruption is reported like every error (`snapctl: SNAP_ABORTED: ...`, or JSON where the
// command reports errors in JSON), and the process exits with SNAP_ABORTED's status (9).
// Handlers are installed by the first registration (or by the CLI for every command).
import { ERROR_CODES, SnapError } from './errors.js'

/** Undoes something; may say what it did ("the partial image was removed"). */
export type Cleanup = () => Promise<string | void> | string | void

const cleanups = new Set<Cleanup>()
let reporter: (err: SnapError) => void = (e) => void process.stderr.write(`snapctl: ${e.code}: ${e.message}\n`)
let installed = false
let aborting = false

/** Runs `fn` if a signal ends the process before the returned function is called. */
export function onAbort(fn: Cleanup): () => void {
  installAbortHandlers()
  cleanups.add(fn)
  return () => void cleanups.delete(fn)
}

/** Installs the handlers now; `report` replaces how SNAP_ABORTED is printed. */
export function installAbortHandlers(report?: (err: SnapError) => void): void {
  if (report) reporter = report
  if (installed) return
  installed = true
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => void abort(sig))
}

async function abort(signal: NodeJS.Signals): Promise<void> {
  if (aborting) return
  aborting = true
  const said: string[] = []
  for (const r of await Promise.allSettled([...cleanups].map(async (f) => f()))) {
    if (r.status === 'fulfilled' && typeof r.value === 'string') said.push(r.value)
  }
  reporter(new SnapError('SNAP_ABORTED', `interrupted by ${signal}${said.length ? `; ${said.join('; ')}` : ''}`))
  process.exit(ERROR_CODES.SNAP_ABORTED)
}
