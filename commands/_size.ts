// Command-line helpers shared by create and load: size arguments, resource usage.
import { writeFileSync } from 'node:fs'
import { SnapError } from '../src/errors.js'
import { setObjectCache } from '../src/s3/url.js'

/** 1M, 256K, 4MiB, 1048576 -> bytes. */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim())
  if (!m) throw new SnapError('SNAP_USAGE', `${what}: "${text}" is not a size (e.g. 1M, 256K, 4194304)`)
  const unit = { '': 1, k: 1 << 10, m: 1 << 20, g: 1 << 30, t: 2 ** 40 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't']
  return Number(m[1]) * unit
}

/** 5s, 1500ms, 2.5 (seconds) -> milliseconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s)?$/i.exec(text.trim())
  if (!m) throw new SnapError('SNAP_USAGE', `${what}: "${text}" is not a duration (e.g. 5s, 1500ms)`)
  return Math.round(Number(m[1]) * (m[2]?.toLowerCase() === 'ms' ? 1 : 1000))
}

/** `mem=2M,mem1=1G` -> { mem: 2097152, mem1: 1073741824 } (load --host-page-size). */
export function parseHostPageSizes(text: string | undefined): Record<string, number> {
  const out: Record<string, number> = {}
  if (text === undefined) return out
  for (const part of text.split(',')) {
    const eq = part.lastIndexOf('=')
    if (eq <= 0) throw new SnapError('SNAP_USAGE', `--host-page-size: "${part}" is not BLOCK=SIZE (e.g. mem=2M)`)
    out[part.slice(0, eq)] = parseSize(part.slice(eq + 1), '--host-page-size')
  }
  return out
}

/** Writes process.resourceUsage() to $SNAPCTL_RUSAGE_FILE at exit (tools/bench reads peak RSS). */
export function recordResourceUsage(): void {
  const file = process.env.SNAPCTL_RUSAGE_FILE
  if (!file) return
  process.once('exit', () => {
    try {
      writeFileSync(file, JSON.stringify(process.resourceUsage()))
    } catch {
      // measuring must never change the outcome
    }
  })
}

/** --cache-dir and --cache-max: the cache every s3:// image this command opens uses. */
export function applyCacheFlags(flags: Record<string, unknown>): void {
  const dir = flags['cache-dir'] as string | undefined
  const max = flags['cache-max'] as string | undefined
  if (dir !== undefined && dir.trim() === '') throw new SnapError('SNAP_USAGE', '--cache-dir: the path is empty')
  setObjectCache({ dir, max: max === undefined ? undefined : parseSize(max, '--cache-max') })
}
