// Paths from the command line, checked before any work: an empty path, a directory where a
// file belongs, a directory that does not exist or a --stats file that cannot be written fail
// at once with SNAP_BAD_PATH (format-spec/errors.md), not after a whole stream was read.
import { constants, type Stats } from 'node:fs'
import { access, link, lstat, rename, stat, unlink } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { SnapError, fromSystemError } from './errors.js'

const bad = (message: string, cause?: unknown): SnapError => new SnapError('SNAP_BAD_PATH', message, cause === undefined ? {} : { cause })

/** A file to read (an image, `--from`): it must exist and must not be a directory. */
export async function checkInputFile(path: string, what: string): Promise<Stats> {
  if (path.trim() === '') throw bad(`${what}: the path is empty`)
  let st: Stats
  try {
    st = await stat(path)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOTDIR') throw bad(`${what} ${path}: a part of the path is not a directory`, e)
    throw fromSystemError(e, path)
  }
  if (st.isDirectory()) throw bad(`${what} ${path} is a directory, not a file`)
  return st
}

/**
 * A file to create or replace (an image, `--to`, `--stats`): not empty, not a directory, in a
 * directory that exists. Returns what is there now, or null.
 */
export async function checkOutputFile(path: string, what: string): Promise<Stats | null> {
  if (path.trim() === '') throw bad(`${what}: the path is empty`)
  if (path.endsWith('/')) throw bad(`${what} ${path} names a directory, not a file`)
  let st: Stats | null = null
  try {
    st = await stat(path)
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code
    if (code === 'ENOTDIR') throw bad(`${what} ${path}: a part of the path is not a directory`, e)
    if (code !== 'ENOENT') throw fromSystemError(e, path)
  }
  if (st?.isDirectory()) throw bad(`${what} ${path} is a directory, not a file`)
  const dir = dirname(resolve(path))
  const d = await stat(dir).catch(() => null)
  if (!d?.isDirectory()) throw bad(`${what} ${path}: the directory ${dir} does not exist`)
  return st
}

/** `--stats FILE`: checked before the work, so that a finished save is never failed by it. */
export async function checkWritableFile(path: string, what: string): Promise<void> {
  const st = await checkOutputFile(path, what)
  const target = st ? path : dirname(resolve(path))
  try {
    await access(target, constants.W_OK)
  } catch (e) {
    throw bad(`${what} ${path} cannot be written (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, e)
  }
}

/**
 * Gives a finished temporary file its name. Without `force`, an existing file there is
 * refused with no window in which it is replaced (link, then unlink; rename where the file
 * system has no hard links).
 */
export async function renameIntoPlace(from: string, to: string, force: boolean): Promise<void> {
  try {
    if (force) return await rename(from, to)
    try {
      await link(from, to)
      await unlink(from)
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      if (code === 'EEXIST') throw new SnapError('SNAP_EXISTS', `${to} appeared while it was being written (use --force to replace it)`)
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'EXDEV') throw e
      if (await lstat(to).then(() => true, () => false)) throw new SnapError('SNAP_EXISTS', `${to} exists (use --force to replace it)`)
      await rename(from, to)
    }
  } catch (e) {
    throw fromSystemError(e, `renaming ${from} to ${to}`)
  }
}
