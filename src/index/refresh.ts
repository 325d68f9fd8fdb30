// Keeping the page index fit for lookups while a restore reads the image's own page map.
import { SnapError, isSnapError, type ErrorCode } from '../errors.js'
import type { ImageReader } from '../container/reader.js'
import { PageIndex } from './page-index.js'

/** Index failures that do not stop a restore: the image's own page map is enough. */
const INDEX_FALLBACK: ErrorCode[] = ['SNAP_LOCKED', 'SNAP_INDEX_CORRUPT', 'SNAP_INDEX_MISMATCH', 'SNAP_IO', 'SNAP_NO_SPACE']

/**
 * The trailer's page map (CRC-checked, authoritative) is what a restore uses: the index is only
 * a cache, and an index that is damaged in a way LevelDB does not notice, or forged, must never
 * decide which page goes where. It is still opened and compared, and rebuilt when missing,
 * stale or wrong, so that it stays fit for lookups; one held by another process, or that cannot
 * be rebuilt (a read-only directory), costs a note on `log`, not the restore.
 */
export async function refreshIndex(reader: ImageReader, log?: (msg: string) => void): Promise<void> {
  let index: PageIndex | undefined
  try {
    index = await PageIndex.open(reader, { log })
    let same: boolean | null = null
    try {
      same = await index.sameRuns(reader.runs)
    } catch (e) {
      if (!isSnapError(e, 'SNAP_INDEX_CORRUPT')) throw e
    }
    if (same) return
    const why = same === false ? "disagreed with the image's page map" : 'could not be read'
    const path = index.path
    await index.close()
    index = undefined
    let built: boolean
    try {
      built = await PageIndex.rebuildUnlessFresh(reader, (i) => i.sameRuns(reader.runs))
    } catch (e) {
      throw new SnapError('SNAP_INDEX_CORRUPT', `the page index ${path} ${why} and could not be rebuilt: ${(e as Error).message}`, { cause: e })
    }
    if (built) log?.(`note: the page index ${path} ${why}; rebuilt it from the image`)
  } catch (e) {
    if (isSnapError(e) && !INDEX_FALLBACK.includes(e.code)) throw e
    // One line, no error code: the restore goes on and succeeds.
    log?.(`note: the page index was not used (${(e as Error).message}); restoring from the page map in the image's trailer`)
  } finally {
    await index?.close().catch(() => {})
  }
}
