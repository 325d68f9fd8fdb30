// Stopping the library's work from outside, through an AbortSignal (the command line turns
// SIGINT and SIGTERM into one: commands/_run-command.ts). An operation that leaves something
// behind (a partial image, a temporary output file) undoes it as soon as the signal aborts, even
// while its work waits on a pipe that may never deliver again, and then rejects with
// SNAP_ABORTED, whose `context.after` says what was undone. The library never installs signal
// handlers, writes to the terminal or exits the process.
import { SnapError } from './errors.js'

/** Undoes what an operation started; may say what it did ("the partial image was removed"). */
export type Undo = () => Promise<string | void>

/**
 * `work`'s outcome, unless `signal` aborts first: then `undo` runs and the result is SNAP_ABORTED.
 * The work is not waited for (it may never end); whatever it does after the abort is ignored.
 */
export function unlessAborted<T>(signal: AbortSignal | undefined, work: Promise<T>, undo: Undo = async () => {}): Promise<T> {
  if (!signal) return work
  return new Promise<T>((resolve, reject) => {
    let settled = false
    const onAbort = (): void => {
      if (settled) return
      settled = true
      work.catch(() => {})
      undo().then(
        (after) => reject(abortedError(signal, after || undefined)),
        (e: unknown) => reject(abortedError(signal, `undoing it failed: ${(e as Error)?.message ?? String(e)}`)),
      )
    }
    if (signal.aborted) return onAbort()
    signal.addEventListener('abort', onAbort, { once: true })
    work.then(
      (value) => {
        signal.removeEventListener('abort', onAbort)
        if (!settled) resolve(value)
        settled = true
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort)
        if (!settled) reject(err)
        settled = true
      },
    )
  })
}

/** Throws SNAP_ABORTED if `signal` has aborted (before starting anything that needs undoing). */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortedError(signal)
}

/** SNAP_ABORTED with the signal's reason ("interrupted by SIGINT") and what was undone. */
function abortedError(signal: AbortSignal, after?: string): SnapError {
  const why = signal.reason instanceof Error ? signal.reason.message : 'interrupted'
  return new SnapError('SNAP_ABORTED', after === undefined ? why : `${why}; ${after}`, after === undefined ? {} : { after })
}
