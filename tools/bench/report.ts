// Turns samples into figures: medians, ratios to the baseline, the table and the targets.
import { BASELINE } from './contenders.js'
import type { DiskUse, Sample } from './runner.js'

export type Phase = 'save' | 'restore'

export interface ContenderResult {
  phase: Phase
  id: string
  /** restore only: the save contender whose output it read */
  from?: string
  samples: Sample[]
  /** set when the contender failed; its figures are then partial or absent */
  error?: string
  medianS?: number
  minS?: number
  maxS?: number
  /** median / baseline median */
  ratio?: number
  /** median over repetitions of (sample / baseline sample of the same repetition) */
  pairedRatio?: number
  /** guest RAM bytes per second at the median, in MB/s (10^6) */
  mbps?: number
  /** bytes on disk of the output (save) or of the input read (restore) */
  disk?: DiskUse
  rssKiB?: number
  rssSource?: 'SNAPCTL_RUSAGE_FILE' | '/usr/bin/time'
  /** snapctl's user+sys CPU seconds per GiB of guest RAM: median, min, max over repetitions */
  cpuPerGiB?: { median: number; min: number; max: number }
  /** snapctl's page faults per GiB of guest RAM: median, min, max */
  faultsPerGiB?: { median: number; min: number; max: number }
  /** snapctl's image: the largest share of it resident in the page cache after a sample (fincore) */
  cachedMax?: number
}

export interface Target {
  name: string
  limit: string
  figure: string
  /** null: not measured in this run */
  pass: boolean | null
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

/** Fills in the statistics of every result of one phase, relative to that phase's baseline. */
export function summarize(results: ContenderResult[], sizeBytes: number): void {
  for (const r of results) {
    const xs = r.samples.map((s) => s.seconds)
    if (!xs.length) continue
    r.medianS = median(xs)
    r.minS = Math.min(...xs)
    r.maxS = Math.max(...xs)
    r.mbps = sizeBytes / r.medianS / 1e6
    const rss = r.samples.map((s) => s.rssKiB).filter((x): x is number => x !== undefined)
    if (rss.length) {
      r.rssKiB = Math.max(...rss)
      r.rssSource ??= 'SNAPCTL_RUSAGE_FILE'
    }
    r.cpuPerGiB = perGiB(r.samples.map((s) => s.cpuS), sizeBytes)
    r.faultsPerGiB = perGiB(r.samples.map((s) => s.faults), sizeBytes)
    const cached = r.samples.map((s) => s.cached).filter((x): x is number => x !== undefined)
    if (cached.length) r.cachedMax = Math.max(...cached)
  }
  const base = results.find((r) => r.id === BASELINE)
  if (!base?.medianS) return
  for (const r of results) {
    if (r.medianS === undefined) continue
    r.ratio = r.medianS / base.medianS
    const paired = r.samples.flatMap((s) => {
      const b = base.samples.find((x) => x.rep === s.rep)
      return b ? [s.seconds / b.seconds] : []
    })
    if (paired.length) r.pairedRatio = median(paired)
  }
}

function perGiB(xs: Array<number | undefined>, sizeBytes: number): { median: number; min: number; max: number } | undefined {
  const v = xs.filter((x): x is number => x !== undefined).map((x) => x / (sizeBytes / 2 ** 30))
  return v.length ? { median: median(v), min: Math.min(...v), max: Math.max(...v) } : undefined
}

const MiB = 1 << 20
const f3 = (x?: number): string => (x === undefined ? '-' : x.toFixed(3))
const f2 = (x?: number): string => (x === undefined ? '-' : x.toFixed(2))
const mib = (x?: number): string => (x === undefined ? '-' : (x / MiB).toFixed(1))

export function table(results: ContenderResult[]): string {
  const head = ['phase', 'contender', 'median s', 'min s', 'max s', 'ratio', 'paired', 'MB/s', 'alloc MiB', 'logical MiB', 'RSS MiB', 'CPU s/GiB', 'faults/GiB', 'cached %']
  const rows = results.map((r) => [
    r.phase,
    r.id + (r.id === BASELINE ? ' (base)' : ''),
    r.error && r.medianS === undefined ? 'FAILED' : f3(r.medianS),
    f3(r.minS),
    f3(r.maxS),
    f2(r.ratio),
    f2(r.pairedRatio),
    r.mbps === undefined ? '-' : r.mbps.toFixed(0),
    r.phase === 'save' ? mib(r.disk?.alloc) : '',
    r.phase === 'save' ? mib(r.disk?.logical) : '',
    r.rssKiB === undefined ? '' : ((r.rssKiB * 1024) / MiB).toFixed(1),
    r.cpuPerGiB ? `${f2(r.cpuPerGiB.median)} (${f2(r.cpuPerGiB.min)}-${f2(r.cpuPerGiB.max)})` : '',
    r.faultsPerGiB ? `${r.faultsPerGiB.median.toFixed(0)} (${r.faultsPerGiB.min.toFixed(0)}-${r.faultsPerGiB.max.toFixed(0)})` : '',
    r.cachedMax === undefined ? '' : (100 * r.cachedMax).toFixed(1),
  ])
  const all = [head, ...rows]
  const width = head.map((_, i) => Math.max(...all.map((row) => row[i]!.length)))
  const line = (row: string[]): string => row.map((c, i) => (i < 2 ? c.padEnd(width[i]!) : c.padStart(width[i]!))).join('  ').trimEnd()
  return [line(head), line(width.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n')
}

export function checkTargets(results: ContenderResult[], startupMs: number | undefined): Target[] {
  const get = (phase: Phase, id: string) => results.find((r) => r.phase === phase && r.id === id)
  const targets: Target[] = []
  const ratioTarget = (name: string, r: ContenderResult | undefined, limit: number): void => {
    const v = r?.ratio
    targets.push({
      name,
      limit: `<= ${limit.toFixed(2)}x`,
      figure: v === undefined ? (r?.error ? 'failed' : 'not measured') : `${v.toFixed(2)}x (${f3(r!.medianS)} s; paired ${f2(r!.pairedRatio)}x)`,
      pass: v === undefined ? (r?.error ? false : null) : v <= limit,
    })
  }
  ratioTarget('save LZ4 vs exec-cat', get('save', 'snapctl-lz4'), 1.1)
  ratioTarget('save none vs exec-cat', get('save', 'snapctl-none'), 1.05)
  ratioTarget('restore vs exec-cat', get('restore', 'snapctl-load'), 1.1)
  // Issue 13: snapctl over N multifd channels against QEMU's file: + mapped-ram + multifd, same N.
  const versus = (name: string, phase: Phase, id: string, other: string, limit: number): void => {
    const a = get(phase, id)
    const b = get(phase, other)
    const ok = a?.medianS !== undefined && b?.medianS !== undefined && !a.error && !b.error
    const v = ok ? a!.medianS! / b!.medianS! : undefined
    targets.push({
      name, limit: `<= ${limit.toFixed(2)}x`,
      figure: v === undefined ? (a?.error || b?.error ? 'failed' : 'not measured') : `${v.toFixed(2)}x (${f3(a!.medianS)} s / ${f3(b!.medianS)} s)`,
      pass: v === undefined ? (a?.error ? false : null) : v <= limit,
    })
  }
  // Issue 12: --sync and --bypass-cache against the plain LZ4 create and load (cached: the run's own files).
  versus('create --sync vs create', 'save', 'snapctl-lz4-sync', 'snapctl-lz4', 1.1)
  versus('save --bypass-cache vs cached save', 'save', 'snapctl-lz4-direct', 'snapctl-lz4', 1.15)
  versus('restore --bypass-cache vs cached restore', 'restore', 'snapctl-load-direct', 'snapctl-load', 1.15)
  const residency = (name: string, r: ContenderResult | undefined): void => {
    const v = r?.cachedMax
    targets.push({ name, limit: '<= 5%', figure: v === undefined ? (r?.error ? 'failed' : 'not measured') : `${(100 * v).toFixed(1)}% (largest of ${r!.samples.length})`, pass: v === undefined ? (r?.error ? false : null) : v <= 0.05 })
  }
  residency('image in page cache after save --bypass-cache', get('save', 'snapctl-lz4-direct'))
  residency('image in page cache after restore --bypass-cache', get('restore', 'snapctl-load-direct'))
  versus('save --channels N vs mapped-ram+multifd', 'save', 'snapctl-channels', 'mapped-ram+multifd', 1.0)
  versus('restore --channels N vs mapped-ram+multifd', 'restore', 'snapctl-channels', 'mapped-ram+multifd', 1.0)
  const chImage = get('save', 'snapctl-channels')?.disk
  const mmDisk = get('save', 'mapped-ram+multifd')?.disk
  if (chImage && mmDisk) {
    const v = chImage.alloc / mmDisk.alloc
    targets.push({ name: 'allocated bytes (--channels N) vs mapped-ram+multifd', limit: '<= 0.50x', figure: `${v.toFixed(3)}x (${mib(chImage.alloc)} MiB / ${mib(mmDisk.alloc)} MiB)`, pass: v <= 0.5 })
  } else targets.push({ name: 'allocated bytes (--channels N) vs mapped-ram+multifd', limit: '<= 0.50x', figure: 'not measured', pass: null })

  const lz4 = get('save', 'snapctl-lz4')?.disk
  const stream = get('save', 'exec-cat')?.disk
  const mapped = get('save', 'mapped-ram')?.disk
  const image = lz4?.files.find((x) => !x.path.includes('.index/'))
  if (image && stream) {
    const v = image.logical / stream.logical
    const withIndex = lz4!.logical / stream.logical
    targets.push({
      name: 'image size (LZ4) vs QEMU stream',
      limit: '<= 0.70x',
      figure: `${v.toFixed(3)}x (${mib(image.logical)} MiB / ${mib(stream.logical)} MiB; with index ${withIndex.toFixed(3)}x)`,
      pass: v <= 0.7,
    })
  } else targets.push({ name: 'image size (LZ4) vs QEMU stream', limit: '<= 0.70x', figure: 'not measured', pass: null })
  if (lz4 && mapped) {
    targets.push({
      name: 'allocated bytes (LZ4, image+index) vs mapped-ram',
      limit: '< 1.00x',
      figure: `${(lz4.alloc / mapped.alloc).toFixed(3)}x (${mib(lz4.alloc)} MiB / ${mib(mapped.alloc)} MiB)`,
      pass: lz4.alloc < mapped.alloc,
    })
  } else targets.push({ name: 'allocated bytes (LZ4) vs mapped-ram', limit: '< 1.00x', figure: 'not measured', pass: null })

  // Issue 12's CPU and page-fault budgets, per GiB of guest RAM.
  const budget = (name: string, r: ContenderResult | undefined, key: 'cpuPerGiB' | 'faultsPerGiB', limit: number, unit: string): void => {
    const v = r?.[key]
    const fmt = (x: number): string => (key === 'cpuPerGiB' ? x.toFixed(2) : x.toFixed(0))
    targets.push({
      name,
      limit: `<= ${fmt(limit)}`,
      figure: v === undefined ? 'not measured' : `${fmt(v.median)} ${unit} (${fmt(v.min)} to ${fmt(v.max)})`,
      pass: v === undefined ? null : v.median <= limit,
    })
  }
  budget('load CPU per GiB', get('restore', 'snapctl-load'), 'cpuPerGiB', 0.6, 's')
  budget('load page faults per GiB', get('restore', 'snapctl-load'), 'faultsPerGiB', 20_000, 'faults')
  budget('create LZ4 CPU per GiB', get('save', 'snapctl-lz4'), 'cpuPerGiB', 1.2, 's')
  budget('create none CPU per GiB', get('save', 'snapctl-none'), 'cpuPerGiB', 0.5, 's')

  const rss = results.filter((r) => r.rssKiB !== undefined)
  if (rss.length) {
    const worst = rss.reduce((a, b) => (b.rssKiB! > a.rssKiB! ? b : a))
    const each = rss.map((r) => `${r.phase} ${r.id} ${mib(r.rssKiB! * 1024)}`).join(', ')
    targets.push({ name: 'peak RSS of snapctl', limit: '<= 256 MiB', figure: `${mib(worst.rssKiB! * 1024)} MiB (${each})`, pass: worst.rssKiB! <= 256 * 1024 })
  } else targets.push({ name: 'peak RSS of snapctl', limit: '<= 256 MiB', figure: 'not measured', pass: null })

  targets.push({
    name: 'snapctl --version start-up',
    limit: '<= 150 ms',
    figure: startupMs === undefined ? 'not measured' : `${startupMs.toFixed(0)} ms (median of 10)`,
    pass: startupMs === undefined ? null : startupMs <= 150,
  })
  return targets
}

export function targetLines(targets: Target[]): string {
  const w = Math.max(...targets.map((t) => t.name.length))
  return targets
    .map((t) => `${t.pass === null ? 'N/A ' : t.pass ? 'PASS' : 'MISS'}  ${t.name.padEnd(w)}  ${t.limit.padEnd(10)}  ${t.figure}`)
    .join('\n')
}
