// The paths being compared. Each save contender says how QEMU writes the VM out (URI and
// migration capabilities); each restore contender reads back the output of one save contender.
// QEMU's own paths are the yardsticks from DESIGN.md ("Facts measured on this kind of machine").
import { existsSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

/** The package root, found from this file whether it runs from tools/ or dist/tools/. */
export const ROOT = findRoot(dirname(fileURLToPath(import.meta.url)))
export const RUN_JS = join(ROOT, 'bin/run.js')
export const BASELINE = 'exec-cat'

export interface Capabilities {
  'mapped-ram': boolean
  multifd: boolean
}

/** Files of one sample, all in the work dir. */
export interface SampleFiles {
  /** the image or stream file */
  out: string
  /** `exec:` only: the exit status of the command lands here */
  done: string
  /** `exec:` only: the command's stderr */
  err: string
  /** snapctl only: process.resourceUsage() as JSON, written at exit (SNAPCTL_RUSAGE_FILE) */
  rusage: string
  /** snapctl only, RSS probe runs: `/usr/bin/time -f %M` output */
  time: string
}

export interface Contender {
  id: string
  /** `exec:` contenders run a shell command; the others hand QEMU a file: URI */
  exec: boolean
  /** runs snapctl, so its peak RSS is of interest */
  snapctl: boolean
  caps: Capabilities
  /** the shell command (exec:) or the path (file:) */
  target: (f: SampleFiles, probe: RssProbe) => string
}

export interface RestoreContender extends Contender {
  /** the save contender whose output this one reads */
  from: string
}

/** How the command of a snapctl contender measures its peak RSS. */
export type RssProbe = 'rusage' | 'time'

const NONE: Capabilities = { 'mapped-ram': false, multifd: false }
const MAPPED: Capabilities = { 'mapped-ram': true, multifd: false }
const MAPPED_MULTIFD: Capabilities = { 'mapped-ram': true, multifd: true }

export const SAVE: readonly Contender[] = [
  { id: 'snapctl-lz4', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--force']) },
  { id: 'snapctl-none', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--compress', 'none', '--force']) },
  { id: 'exec-cat', exec: true, snapctl: false, caps: NONE, target: (f) => `cat > ${sh(f.out)}` },
  { id: 'file', exec: false, snapctl: false, caps: NONE, target: (f) => f.out },
  { id: 'mapped-ram', exec: false, snapctl: false, caps: MAPPED, target: (f) => f.out },
  { id: 'mapped-ram+multifd', exec: false, snapctl: false, caps: MAPPED_MULTIFD, target: (f) => f.out },
]

export const RESTORE: readonly RestoreContender[] = [
  { id: 'snapctl-load', from: 'snapctl-lz4', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['load', f.out]) },
  { id: 'exec-cat', from: 'exec-cat', exec: true, snapctl: false, caps: NONE, target: (f) => `cat ${sh(f.out)}` },
  { id: 'file', from: 'file', exec: false, snapctl: false, caps: NONE, target: (f) => f.out },
  { id: 'mapped-ram', from: 'mapped-ram', exec: false, snapctl: false, caps: MAPPED, target: (f) => f.out },
  { id: 'mapped-ram+multifd', from: 'mapped-ram+multifd', exec: false, snapctl: false, caps: MAPPED_MULTIFD, target: (f) => f.out },
]

/** The migration URI of one sample. exec: commands report their exit status in f.done. */
export function migrationUri(c: Contender, f: SampleFiles, probe: RssProbe): string {
  if (!c.exec) return `file:${c.target(f, probe)}`
  return `exec:${c.target(f, probe)} 2>${sh(f.err)}; echo $? >${sh(f.done)}`
}

function snapctl(probe: RssProbe, f: SampleFiles, args: string[]): string {
  const node = [process.execPath, RUN_JS, ...args].map(sh).join(' ')
  const env = `SNAPCTL_RUSAGE_FILE=${sh(f.rusage)} `
  return probe === 'time' ? `${env}/usr/bin/time -f %M -o ${sh(f.time)} ${node}` : `${env}${node}`
}

/** Quotes for /bin/sh, which is what QEMU runs an exec: command with. */
export function sh(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`
}

/** Round-robin order: repetition r starts r places further along, so no contender is always first. */
export function rotate<T>(list: readonly T[], r: number): T[] {
  const k = list.length ? r % list.length : 0
  return [...list.slice(k), ...list.slice(0, k)]
}

function findRoot(start: string): string {
  for (let d = start; ; d = dirname(d)) {
    if (existsSync(join(d, 'package.json')) && existsSync(join(d, 'bin/run.js'))) return d
    if (dirname(d) === d) return resolve(start, '../../..')
  }
}
