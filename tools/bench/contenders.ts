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
  /** unix-socket contenders: the migration socket */
  sock: string
}

export interface Contender {
  id: string
  /** `exec:` contenders run a shell command; the others hand QEMU a file: URI */
  exec: boolean
  /** runs snapctl, so its peak RSS is of interest */
  snapctl: boolean
  /**
   * a unix: contender with multifd (issue 13): `target` is a command the bench runs itself,
   * beside QEMU (a save's listening create starts before `migrate`, off the clock; a restore's
   * load starts after `migrate-incoming`, on it), its exit status in f.done as for exec:
   */
  socket?: boolean
  caps: Capabilities
  /** the shell command (exec:, socket) or the path (file:); `channels`: the multifd channels of the run */
  target: (f: SampleFiles, probe: RssProbe, channels: number) => string
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
const MULTIFD: Capabilities = { 'mapped-ram': false, multifd: true }

export const SAVE: readonly Contender[] = [
  { id: 'snapctl-lz4', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--force']) },
  // Issue 12: --sync (durable) and --bypass-cache (O_DIRECT), against the plain LZ4 create.
  { id: 'snapctl-lz4-sync', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--sync', '--force']) },
  { id: 'snapctl-lz4-direct', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--bypass-cache', '--force']) },
  { id: 'snapctl-none', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['create', f.out, '--compress', 'none', '--force']) },
  { id: 'exec-cat', exec: true, snapctl: false, caps: NONE, target: (f) => `cat > ${sh(f.out)}` },
  { id: 'file', exec: false, snapctl: false, caps: NONE, target: (f) => f.out },
  { id: 'mapped-ram', exec: false, snapctl: false, caps: MAPPED, target: (f) => f.out },
  { id: 'mapped-ram+multifd', exec: false, snapctl: false, caps: MAPPED_MULTIFD, target: (f) => f.out },
  // `snapctl save --channels N`: QEMU's multifd over unix: into create --listen (N = --multifd-channels)
  { id: 'snapctl-channels', exec: false, socket: true, snapctl: true, caps: MULTIFD, target: (f, p) => snapctl(p, f, ['create', f.out, '--listen', `unix:${f.sock}`, '--force']) },
]

export const RESTORE: readonly RestoreContender[] = [
  { id: 'snapctl-load', from: 'snapctl-lz4', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['load', f.out]) },
  { id: 'snapctl-load-direct', from: 'snapctl-lz4-direct', exec: true, snapctl: true, caps: NONE, target: (f, p) => snapctl(p, f, ['load', f.out, '--bypass-cache']) },
  { id: 'exec-cat', from: 'exec-cat', exec: true, snapctl: false, caps: NONE, target: (f) => `cat ${sh(f.out)}` },
  { id: 'file', from: 'file', exec: false, snapctl: false, caps: NONE, target: (f) => f.out },
  { id: 'mapped-ram', from: 'mapped-ram', exec: false, snapctl: false, caps: MAPPED, target: (f) => f.out },
  { id: 'mapped-ram+multifd', from: 'mapped-ram+multifd', exec: false, snapctl: false, caps: MAPPED_MULTIFD, target: (f) => f.out },
  // `snapctl restore --channels N`: load --connect over N multifd channels
  {
    id: 'snapctl-channels', from: 'snapctl-channels', exec: false, socket: true, snapctl: true, caps: MULTIFD,
    target: (f, p, n) => snapctl(p, f, ['load', f.out, '--connect', `unix:${f.sock}`, '--channels', String(n)]),
  },
]

/** The migration URI of one sample. exec: commands report their exit status in f.done. */
export function migrationUri(c: Contender, f: SampleFiles, probe: RssProbe, channels = 1): string {
  if (c.socket) return `unix:${f.sock}`
  if (!c.exec) return `file:${c.target(f, probe, channels)}`
  return `exec:${peerCommand(c, f, probe, channels)}`
}

/** The shell command of an exec: or socket contender, reporting its exit status in f.done. */
export function peerCommand(c: Contender, f: SampleFiles, probe: RssProbe, channels: number): string {
  return `${c.target(f, probe, channels)} 2>${sh(f.err)}; echo $? >${sh(f.done)}`
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
