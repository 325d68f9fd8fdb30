// `snapctl info`: what an image holds, from its header, trailer and cluster headers
// (format-spec/container.md). An unfinished image is reported (complete: false), not refused.
import { open, stat } from 'node:fs/promises'
import { isSnapError } from './errors.js'
import { isS3Url } from './s3/url.js'
import { lockedError, runningCreates } from './container/lock.js'
import { ImageReader, type ImageSummaryInfo } from './container/reader.js'
import { basePath, openImage } from './container/chain.js'
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

/** An incremental image's chain, top first (container.md, "Incremental images"). */
export interface ChainInfo {
  /** the base as the image names it (relative to its directory), and where that is */
  base: { path: string; resolved: string; uuid: string; generation: number }
  /** every image of the chain, top first, when it opens and checks out; else `error` */
  layers: Array<{ path: string; uuid: string; generation: number; fileBytes: number; storedPages: number; zeroPages: number; basePages: number }>
  error?: { code: string; message: string }
}

/** createRunning: the PIDs of creates writing a new image to this path right now. chain: null for a standalone image. */
export type ImageInfo =
  | ({ format: 'snapctl'; complete: true; path: string; indexPresent: boolean; deviceCheck: DeviceCheck; createRunning?: number[]; workingSet: WorkingSetInfo | null; chain: ChainInfo | null } & ImageSummaryInfo)
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
    const chain = reader.base ? await chainInfo(reader) : null
    return { format: 'snapctl', complete: true, path, indexPresent, deviceCheck, ...summary, workingSet, chain, ...pids }
  } finally {
    await reader.close()
  }
}

/** The chain under an incremental image; a base that is missing or changed is described, not thrown. */
async function chainInfo(reader: ImageReader): Promise<ChainInfo> {
  const ref = reader.base!
  const info: ChainInfo = { base: { path: ref.path, resolved: basePath(reader.path, ref), uuid: ref.uuid.toString('hex'), generation: ref.generation }, layers: [] }
  try {
    const chain = await openImage(reader.path)
    try {
      for (const l of 'layers' in chain ? chain.layers : [chain]) {
        const { storedPages, zeroPages, basePages } = l.locator.totals()
        info.layers.push({ path: l.path, uuid: l.header.uuid.toString('hex'), generation: l.header.generation, fileBytes: l.fileLength, storedPages, zeroPages, basePages })
      }
    } finally {
      await chain.close()
    }
  } catch (e) {
    if (!isSnapError(e)) throw e
    info.error = { code: e.code, message: e.message }
  }
  return info
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
