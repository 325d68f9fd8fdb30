// `snapctl info`: what an image holds, from its header, trailer and cluster headers
// (format-spec/container.md). An unfinished image is reported (complete: false), not refused.
import { open, stat } from 'node:fs/promises'
import { isSnapError } from './errors.js'
import { isS3Url } from './s3/url.js'
import { lockedError, runningCreates } from './container/lock.js'
import { ImageReader, type ImageSummaryInfo } from './container/reader.js'
import { HEADER_SIZE, decodeHeader } from './container/header.js'
import { PageIndex } from './index/page-index.js'
import { workingSetOf } from './container/working-set.js'
import { describeDeviceCheck, type DeviceCheck } from './stream/device-tail.js'

/** The image's recorded working set (container.md, "working_set"): pages, when; `error` if it fails its checks (lazy restores then ignore it). */
export interface WorkingSetInfo {
  pages: number
  recordedAt: string | null
  error?: string
}

/** createRunning: the PIDs of creates writing a new image to this path right now. */
export type ImageInfo =
  | ({ format: 'snapctl'; complete: true; path: string; indexPresent: boolean; deviceCheck: DeviceCheck; createRunning?: number[]; workingSet: WorkingSetInfo | null } & ImageSummaryInfo)
  | { format: 'snapctl'; complete: false; reason: string; path: string; fileBytes: number; uuid?: string; clusterSize?: number; machine?: string; createRunning?: number[] }

/**
 * While a create of this path runs, the image there (if any) is the old one, about to be
 * replaced: it is still described, with `createRunning`; with none there yet, SNAP_LOCKED.
 */
export async function imageInfo(path: string): Promise<ImageInfo> {
  const running = isS3Url(path) ? [] : await runningCreates(path)
  const pids = running.length > 0 ? { createRunning: [...new Set(running.map((p) => p.pid))] } : {}
  let reader: ImageReader
  try {
    reader = await ImageReader.open(path)
  } catch (e) {
    if (running.length > 0 && isSnapError(e, 'SNAP_NOT_FOUND')) throw lockedError(path, running)
    if (isSnapError(e, 'SNAP_INCOMPLETE') && !isS3Url(path)) return { ...(await incomplete(path, e.message)), ...pids }
    throw e
  }
  try {
    const summary = await reader.summary()
    const indexPresent = await stat(reader.source.indexPath ?? PageIndex.indexPath(path)).then(() => true, () => false)
    // How the device state was proven whole: re-checked from its stored bytes (cheap: kilobytes).
    const deviceCheck = describeDeviceCheck(reader.device.deviceSections, reader.device.streamEnd)
    let wsError: string | undefined
    const ws = workingSetOf(reader, (e) => (wsError = (e as Error).message))
    const workingSet: WorkingSetInfo | null = ws ? { pages: ws.pages.length / 2, recordedAt: new Date(ws.recordedTime).toISOString() }
      : wsError ? { pages: 0, recordedAt: null, error: wsError } : null
    return { format: 'snapctl', complete: true, path, indexPresent, deviceCheck, ...summary, workingSet, ...pids }
  } finally {
    await reader.close()
  }
}

async function incomplete(path: string, reason: string): Promise<ImageInfo> {
  const fh = await open(path, 'r')
  try {
    const { size } = await fh.stat()
    const info: ImageInfo = { format: 'snapctl', complete: false, reason, path, fileBytes: size }
    const buf = Buffer.alloc(HEADER_SIZE)
    await fh.read(buf, 0, HEADER_SIZE, 0)
    try {
      const h = decodeHeader(buf, size)
      Object.assign(info, { uuid: h.uuid.toString('hex'), clusterSize: h.clusterSize, machine: h.machine })
    } catch {
      // A create that is running or died has a zero header: nothing more to say.
    }
    return info
  } finally {
    await fh.close()
  }
}
