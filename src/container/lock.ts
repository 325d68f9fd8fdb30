// Who is writing an image: a create writes `.NAME.partial-PID` beside NAME (format-spec/
// container.md, "Writing an image") and keeps it open until it is renamed into place, so the
// partial file is the lock. A partial counts as held only if process PID is alive *and* has
// that file open: a PID reused by an unrelated process after a crash or reboot must not lock
// the image forever. Without access to /proc/PID/fd (another user's process, no procfs) a live
// PID is taken as the holder.
import { readdir, readlink } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import { SnapError, fromSystemError } from '../errors.js'

export interface Partial {
  file: string
  pid: number
}

export function partialPrefix(image: string): string {
  return `.${basename(resolve(image))}.partial-`
}

export function partialPath(image: string, pid = process.pid): string {
  const abs = resolve(image)
  return join(dirname(abs), `${partialPrefix(abs)}${pid}`)
}

/** Every partial file of `image` (including `.compact` ones), with the PID in its name. */
export async function listPartials(image: string): Promise<Partial[]> {
  const abs = resolve(image)
  const dir = dirname(abs)
  const prefix = partialPrefix(abs)
  let names: string[]
  try {
    names = await readdir(dir)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return []
    throw fromSystemError(e, `listing ${dir}`)
  }
  const out: Partial[] = []
  for (const f of names) {
    if (!f.startsWith(prefix)) continue
    const pid = Number.parseInt(f.slice(prefix.length), 10)
    if (pid > 0) out.push({ file: join(dir, f), pid })
  }
  return out
}

/** Whether process `pid` exists (EPERM: it does, as another user's). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** Whether process `pid` is alive and holds `file` open. */
export async function holds(pid: number, file: string): Promise<boolean> {
  if (!pidAlive(pid)) return false
  let fds: string[]
  try {
    fds = await readdir(`/proc/${pid}/fd`)
  } catch {
    return pidAlive(pid)
  }
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')
    if (target === file) return true
  }
  return false
}

/** The creates of `image` that are running now (other than this process's). */
export async function runningCreates(image: string): Promise<Partial[]> {
  const live: Partial[] = []
  for (const p of await listPartials(image)) {
    if (p.pid !== process.pid && (await holds(p.pid, p.file))) live.push(p)
  }
  return live
}

export function lockedError(image: string, running: Partial[]): SnapError {
  const pids = [...new Set(running.map((p) => p.pid))].join(', ')
  return new SnapError('SNAP_LOCKED', `a create of ${image} is running (pid ${pids}); wait for it to finish`, { pids: running.map((p) => p.pid) })
}

/** Throws SNAP_LOCKED while a create of `image` runs (load, verify: the image is about to change). */
export async function refuseWhileCreating(image: string): Promise<void> {
  const running = await runningCreates(image)
  if (running.length > 0) throw lockedError(image, running)
}
