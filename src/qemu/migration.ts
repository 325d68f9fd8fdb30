// What `save` and `restore` share about following one QEMU migration: its states, progress
// figures, the image's page counts, and waits that a Ctrl-C (an AbortSignal) cuts short.
import { openImage } from '../container/chain.js'
import { SnapError } from '../errors.js'
import type { QmpClient } from './qmp.js'

/** query-migrate's answer, the fields used here (QEMU's qapi/migration.json, MigrationInfo). */
export interface MigrateInfo {
  status?: string
  'error-desc'?: string
  downtime?: number
  'total-time'?: number
  ram?: { total: number; remaining: number; transferred: number; mbps: number }
}

/** Statuses in which a migration is under way (MigrationStatus minus none/completed/failed/cancelled). */
export const ACTIVE = new Set([
  'setup', 'active', 'cancelling', 'postcopy-active', 'postcopy-paused', 'postcopy-recover-setup',
  'postcopy-recover', 'pre-switchover', 'device', 'wait-unplug', 'colo',
])

export interface Progress {
  /** migrating: QEMU sends (save) or snapctl sends (restore); postcopy: the VM can run, pages
   * still arrive; finishing: QEMU is done, snapctl completes the image */
  phase: 'migrating' | 'postcopy' | 'finishing'
  /** 0 to 100, or null before the size is known */
  percent: number | null
  bytes: number
  totalBytes: number | null
  /** bytes per second, or null before it can be told */
  rate: number | null
  seconds: number
}

export type ProgressListener = (p: Progress) => void

/** Resolves after `ms`, or at once when `signal` aborts. */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.resolve()
  return new Promise((res) => {
    const done = (): void => {
      clearTimeout(timer)
      signal?.removeEventListener('abort', done)
      res()
    }
    const timer = setTimeout(done, ms)
    signal?.addEventListener('abort', done, { once: true })
  })
}

export function abortedError(what: string): SnapError {
  return new SnapError('SNAP_ABORTED', `interrupted: ${what}`)
}

/** After migrate_cancel: waits (up to timeoutMs) until QEMU's migration is no longer active. */
export async function waitInactive(qmp: QmpClient, timeoutMs = 10_000): Promise<string | undefined> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const info = await qmp.execute<MigrateInfo>('query-migrate').catch(() => undefined)
    if (!info || !ACTIVE.has(info.status ?? '') || Date.now() > deadline) return info?.status
    await pause(50)
  }
}

/** Bytes per second over the last few seconds, from byte counts taken at times. */
export class RateMeter {
  private samples: Array<[number, number]> = []

  add(bytes: number, at = performance.now()): number | null {
    this.samples.push([at, bytes])
    while (this.samples.length > 2 && at - this.samples[0][0] > 3000) this.samples.shift()
    const [t0, b0] = this.samples[0]
    return at - t0 >= 200 ? ((bytes - b0) * 1000) / (at - t0) : null
  }
}

export interface PageCounts {
  ramBytes: number
  pages: number
  zeroPages: number
  storedPages: number
  fileBytes: number
  blocks: Array<{ name: string; size: number; pageSize: number }>
  deviceStateBytes: number
}

/** The image's blocks and pages, from its header and trailer (the clusters are not read). */
export async function imagePages(path: string): Promise<PageCounts> {
  const reader = await openImage(path)
  try {
    const { zeroPages, storedPages } = reader.locator.totals()
    const d = reader.device
    return {
      ramBytes: reader.blocks.reduce((a, b) => a + b.size, 0),
      pages: zeroPages + storedPages, zeroPages, storedPages,
      fileBytes: reader.fileLength,
      blocks: reader.blocks.map((b) => ({ name: b.name, size: b.size, pageSize: b.pageSize })),
      deviceStateBytes: d.config.length + d.deviceSections.length + d.streamEnd.length,
    }
  } finally {
    await reader.close()
  }
}
