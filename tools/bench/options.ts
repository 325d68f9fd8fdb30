// Command line of the benchmark (tools/bench/main.ts). Everything is checked here, so that a typo
// fails before a VM is started or a gigabyte of RAM is filled.
import type { RamMix } from '../vm.js'

export type Only = 'save' | 'restore' | 'all'

export interface BenchOptions {
  sizeBytes: number
  /** as the user would write it: 64M, 1G */
  sizeLabel: string
  mix: RamMix
  repeat: number
  only: Only
  json: string
  chart?: string
  /** parent of the work dir; undefined means /var/tmp */
  dir?: string
  /** contender ids to run (default all); the baseline exec-cat always runs */
  contenders?: string[]
  seed: number
  multifdChannels: number
  keep: boolean
}

export const USAGE = `usage: npm run bench -- [options]
  --size SIZE         guest RAM: 64M, 256M, 1G, 4G (default 1G; whole MiB)
  --mix SPEC          RAM content in percent (default random=40,text=20,pattern=15,zero=25)
  --repeat N          samples per contender, at least 3 (default 3)
  --only WHAT         save | restore | all (default all)
  --json FILE         results (default bench-out/bench-<size>.json)
  --chart FILE.svg    also draw the ratios as an SVG bar chart
  --dir DIR           where the work dir is made (default /var/tmp); must not be tmpfs
  --contenders LIST   comma list of contender ids to run (exec-cat, the baseline, always runs)
  --seed N            seed of the RAM content (default 1)
  --multifd-channels N  (default 4)
  --keep              keep the work dir (images, streams, logs)`

const DEFAULT_MIX: RamMix = { random: 40, text: 20, pattern: 15, zero: 25 }

export function parseOptions(argv: string[]): BenchOptions {
  const o: BenchOptions = {
    sizeBytes: 1 << 30,
    sizeLabel: '1G',
    mix: { ...DEFAULT_MIX },
    repeat: 3,
    only: 'all',
    json: '',
    seed: 1,
    multifdChannels: 4,
    keep: false,
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    const eq = arg.indexOf('=')
    const name = arg.startsWith('--') && eq > 0 ? arg.slice(0, eq) : arg
    const inline = arg.startsWith('--') && eq > 0 ? arg.slice(eq + 1) : undefined
    const value = (): string => {
      if (inline !== undefined) return inline
      const v = argv[++i]
      if (v === undefined) throw new Error(`${name} needs a value\n${USAGE}`)
      return v
    }
    switch (name) {
      case '--size': {
        const { bytes, label } = parseSize(value())
        o.sizeBytes = bytes
        o.sizeLabel = label
        break
      }
      case '--mix':
        o.mix = parseMix(value())
        break
      case '--repeat':
        o.repeat = parseInteger(name, value(), 3)
        break
      case '--only': {
        const v = value()
        if (v !== 'save' && v !== 'restore' && v !== 'all') throw new Error(`--only must be save, restore or all, not ${v}`)
        o.only = v
        break
      }
      case '--json':
        o.json = value()
        break
      case '--chart':
        o.chart = value()
        break
      case '--dir':
        o.dir = value()
        break
      case '--contenders':
        o.contenders = value().split(',').map((s) => s.trim()).filter(Boolean)
        break
      case '--seed':
        o.seed = parseInteger(name, value(), 0)
        break
      case '--multifd-channels':
        o.multifdChannels = parseInteger(name, value(), 1)
        break
      case '--keep':
        o.keep = true
        break
      case '--help':
      case '-h':
        throw new Error(USAGE)
      default:
        throw new Error(`unknown option ${arg}\n${USAGE}`)
    }
  }
  if (!o.json) o.json = `bench-out/bench-${o.sizeLabel}.json`
  return o
}

/** 64M, 1G, 1.5G, 512MiB, 1GB (binary units throughout: QEMU's M and G). Whole MiB only. */
export function parseSize(s: string): { bytes: number; label: string } {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(s.trim())
  if (!m) throw new Error(`--size: cannot read ${JSON.stringify(s)} (try 256M or 1G)`)
  const unit = m[2]!.toUpperCase()
  const mult = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[unit]!
  const bytes = Number(m[1]) * mult
  const MiB = 1 << 20
  if (!Number.isFinite(bytes) || bytes < 16 * MiB || bytes % MiB !== 0) {
    throw new Error(`--size: ${s} must be a whole number of MiB, at least 16M`)
  }
  const label = bytes % (1 << 30) === 0 ? `${bytes / (1 << 30)}G` : `${bytes / MiB}M`
  return { bytes, label }
}

export function parseMix(s: string): RamMix {
  const mix: RamMix = { random: 0, text: 0, pattern: 0, zero: 0 }
  for (const part of s.split(',').map((p) => p.trim()).filter(Boolean)) {
    const m = /^(random|text|pattern|zero)=(\d+(?:\.\d+)?)$/.exec(part)
    if (!m) throw new Error(`--mix: cannot read ${JSON.stringify(part)} (want e.g. random=40,text=20,pattern=15,zero=25)`)
    mix[m[1] as keyof RamMix] = Number(m[2])
  }
  const total = mix.random + mix.text + mix.pattern + mix.zero
  if (!(total > 0)) throw new Error('--mix: the percentages must add up to more than 0')
  if (Math.abs(total - 100) > 1e-9) throw new Error(`--mix: the percentages add up to ${total}, not 100`)
  return mix
}

function parseInteger(name: string, v: string, min: number): number {
  const n = Number(v)
  if (!Number.isInteger(n) || n < min) throw new Error(`${name} must be an integer >= ${min}, not ${v}`)
  return n
}

/** The value after `name` in a script's own arguments (bench:lazy, bench:working-set), else `fallback`. */
export function argOption(argv: string[], name: string, fallback: string): string {
  const i = argv.indexOf(name)
  return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1] : fallback
}
