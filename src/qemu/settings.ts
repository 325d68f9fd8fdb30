// QEMU's migration settings for the length of one save or restore: capabilities snapctl cannot
// take are turned off (and the ones it needs turned on), the bandwidth limit is lifted, and
// every value changed is put back afterwards, whatever the outcome.
import { SnapError, isSnapError } from '../errors.js'
import type { QmpClient } from './qmp.js'

/**
 * Capabilities that leave the stream as snapctl reads it, or only matter elsewhere (RDMA, the
 * destination, statistics): these stay as the user set them. Every other capability that is on
 * is turned off for the migration: postcopy-ram, return-path, multifd, mapped-ram,
 * dirty-bitmaps, x-ignore-shared, postcopy-preempt, switchover-ack, pause-before-switchover,
 * background-snapshot, zero-copy-send, release-ram, x-colo, and any QEMU adds later.
 */
const KEPT = new Set([
  'xbzrle', 'auto-converge', 'events', 'zero-blocks', 'rdma-pin-all', 'late-block-activate',
  'validate-uuid', 'dirty-limit', 'postcopy-blocktime',
])

/** Lifted for a save (bytes/s): the stream goes to a local process, not over a network. */
export const UNLIMITED_BANDWIDTH = 2 ** 40

export interface Changes {
  /** capabilities turned off (they were on) */
  off: string[]
  /** capabilities turned on (they were off) */
  on: string[]
  /** parameters changed, with the value each had */
  parameters: Record<string, unknown>
}

export class MigrationSettings {
  private changes: Changes | null = null

  constructor(private readonly qmp: QmpClient) {}

  /**
   * Turns off every capability not in KEPT, turns on `need`, sets `parameters` where they
   * differ; SNAP_MIGRATION_SETTINGS (or SNAP_POSTCOPY_SETUP for postcopy-ram) when QEMU refuses.
   */
  async apply(need: string[], parameters: Record<string, unknown>): Promise<Changes> {
    const caps = await this.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities')
    const params = await this.qmp.execute<Record<string, unknown>>('query-migrate-parameters')
    const off = caps.filter((c) => c.state && !KEPT.has(c.capability) && !need.includes(c.capability)).map((c) => c.capability)
    const known = new Set(caps.map((c) => c.capability))
    const on = need.filter((n) => known.has(n) && !caps.find((c) => c.capability === n)!.state)
    for (const n of need) {
      if (!known.has(n)) throw new SnapError('SNAP_MIGRATION_SETTINGS', `this QEMU has no migration capability ${n}`)
    }
    const changedParams = Object.fromEntries(Object.keys(parameters).filter((k) => k in params && params[k] !== parameters[k]).map((k) => [k, params[k]]))
    this.changes = { off, on: [], parameters: {} }

    if (off.length + on.length > 0) {
      const list = [...off.map((capability) => ({ capability, state: false })), ...on.map((capability) => ({ capability, state: true }))]
      try {
        await this.qmp.execute('migrate-set-capabilities', { capabilities: list })
      } catch (e) {
        if (!isSnapError(e, 'SNAP_QMP')) throw e
        const code = on.includes('postcopy-ram') ? 'SNAP_POSTCOPY_SETUP' : 'SNAP_MIGRATION_SETTINGS'
        const what = [...off.map((c) => `${c} off`), ...on.map((c) => `${c} on`)].join(', ')
        throw new SnapError(code, `QEMU refused to set the migration capabilities snapctl needs (${what}): ${(e as Error).message}`, { cause: e })
      }
      this.changes = { off, on, parameters: {} }
    }
    if (Object.keys(changedParams).length > 0) {
      const next = Object.fromEntries(Object.keys(changedParams).map((k) => [k, parameters[k]]))
      try {
        await this.qmp.execute('migrate-set-parameters', next)
      } catch (e) {
        if (!isSnapError(e, 'SNAP_QMP')) throw e
        throw new SnapError('SNAP_MIGRATION_SETTINGS', `QEMU refused the migration parameters ${JSON.stringify(next)}: ${(e as Error).message}`, { cause: e })
      }
      this.changes.parameters = changedParams
    }
    return this.changes
  }

  /** Puts back what apply() changed; returns a note for each value it could not restore. */
  async restore(): Promise<string[]> {
    const c = this.changes
    this.changes = null
    if (!c) return []
    const problems: string[] = []
    if (Object.keys(c.parameters).length > 0) {
      await this.qmp.execute('migrate-set-parameters', c.parameters).catch((e: Error) => problems.push(`parameters ${Object.keys(c.parameters).join(', ')}: ${e.message}`))
    }
    const list = [...c.off.map((capability) => ({ capability, state: true })), ...c.on.map((capability) => ({ capability, state: false }))]
    if (list.length > 0) {
      await this.qmp.execute('migrate-set-capabilities', { capabilities: list }).catch((e: Error) => problems.push(`capabilities ${[...c.off, ...c.on].join(', ')}: ${e.message}`))
    }
    return problems
  }
}
