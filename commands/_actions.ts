// What `create`, `load`, `restore` and `save` do once their command line is parsed; shared by the oclif commands
// and the fast path. Returns the exit status. Everything that can be checked before the work
// (a terminal where the stream belongs, the --stats path) is checked first. `signal` stops the
// work (commands/_run-command.ts turns SIGINT and SIGTERM into it).
import { closeSync, fstatSync, writeSync, type Stats } from 'node:fs'
import { writeFile } from 'node:fs/promises'
// isatty(fd), not process.stdin/stdout.isTTY: those getters open Node's own stream on the fd,
// which then competes with the pipe threads for QEMU's pipe (restores took 2.3x as long).
import { isatty } from 'node:tty'
import { unlessAborted } from '../src/abort.js'
import { SnapError } from '../src/errors.js'
import { checkWritableFile } from '../src/paths.js'
import { defaultThreads } from '../src/threads.js'
import { streamReport } from '../src/report.js'
import { formatBytes } from './_format.js'
import { progressReporter } from './_progress.js'
import { mib, progressView } from './_vm.js'
import { printJson } from './_run-command.js'
import { applyCacheFlags, parseDuration, parseSize } from './_size.js'
import type { ParsedFlags } from './_spec.js'

export async function runCreate(image: string, flags: ParsedFlags, signal: AbortSignal): Promise<number> {
  const from = flags.from as string | undefined
  const listen = flags.listen as string | undefined
  if (from === undefined && listen === undefined && isatty(0)) {
    throw new SnapError('SNAP_TERMINAL', 'standard input is a terminal: create reads a QEMU migration stream there; run it from QEMU (migrate "exec:snapctl create IMAGE") or give --from FILE')
  }
  const statsPath = flags.stats as string | undefined
  if (statsPath !== undefined) await checkWritableFile(statsPath, '--stats')
  const clusterSize = parseSize((flags['cluster-size'] as string | undefined) ?? '1M', '--cluster-size')
  const progress = flags.progress ? progressReporter('create') : undefined
  const { createImage } = await import('../src/create.js')
  const threads = parseThreads(flags.threads) ?? defaultThreads()
  const r = await createImage(image, {
    from,
    compress: (flags.compress ?? 'lz4') as 'lz4' | 'none',
    clusterSize,
    threads,
    dedupe: flags.dedupe === true,
    force: flags.force === true,
    sync: flags.sync === true,
    bypassCache: flags['bypass-cache'] === true,
    log: (msg) => void process.stderr.write(`snapctl: note: ${msg}\n`),
    base: flags.base as string | undefined,
    baseRelativeTo: flags['base-relative-to'] as string | undefined,
    listen,
    timeoutMs: parseTimeout(flags.timeout),
    onProgress: progress ? (done, total) => progress.update(done, total) : undefined,
    signal,
  })
  progress?.finish(r.bytesIn, r.bytesTotal)
  const s = r.image
  const stats = {
    pages: s.pages, storedPages: s.storedPages, zeroPages: s.zeroPages, basePages: s.basePages, sharedPages: s.sharedPages, ramPages: s.ramPages,
    bytesIn: r.bytesIn, bytesOut: s.fileBytes, seconds: r.seconds, source: r.source, stream: streamReport(r.counters), threads,
    ...(listen !== undefined ? { channels: r.channels, epochs: r.epochs } : {}),
  }
  if (statsPath !== undefined) await writeStats(statsPath, stats, 'the image was saved')
  if (flags.json) printJson({ ...s, stats, source: r.source })
  else if (from !== undefined || listen !== undefined || flags.progress) {
    process.stderr.write(`${image}: ${s.pages} pages (${s.storedPages} with data, ${s.zeroPages} zero), ${formatBytes(r.bytesIn)} in, ${formatBytes(s.fileBytes)} written in ${r.seconds.toFixed(2)} s\n`)
  }
  return 0
}

// stdout is the migration stream here: nothing else may ever be written to it.
export async function runLoad(image: string, flags: ParsedFlags, signal: AbortSignal): Promise<number> {
  const to = flags.to as string | undefined
  const connect = flags.connect as string | undefined
  if (to === undefined && connect === undefined && isatty(1)) {
    throw new SnapError('SNAP_TERMINAL', 'standard output is a terminal: load writes a binary QEMU migration stream there; run it from QEMU (migrate_incoming "exec:snapctl load IMAGE") or give --to FILE')
  }
  if (flags.postcopy && connect === undefined && isatty(0)) {
    throw new SnapError('SNAP_NO_DESTINATION', 'standard input is a terminal, not a destination QEMU: load --postcopy reads the return path there; run it from the destination (migrate_incoming "exec:snapctl load --postcopy IMAGE")')
  }
  if (flags['record-window'] !== undefined && !flags.record) throw new SnapError('SNAP_USAGE', '--record-window goes with --record: it holds the push back while the guest\'s requests are recorded')
  if (flags['precopy-max'] !== undefined && !flags.postcopy) throw new SnapError('SNAP_USAGE', '--precopy-max goes with --postcopy: it bounds the working set sent before the VM can run')
  const statsPath = flags.stats as string | undefined
  if (statsPath !== undefined) await checkWritableFile(statsPath, '--stats')
  applyCacheFlags(flags)
  const log = (msg: string): void => void process.stderr.write(`snapctl: ${msg}\n`)
  let stats: object
  if (flags.format === 'mapped-ram') {
    if (flags['bypass-cache']) throw new SnapError('SNAP_USAGE', '--bypass-cache does not go with --format mapped-ram yet: the export reads the image through the page cache')
    if (to === undefined) throw new SnapError('SNAP_USAGE', '--format mapped-ram needs --to FILE: the file is written at offsets')
    const { exportMappedRam } = await import('../src/mapped-ram-export.js')
    stats = await exportMappedRam(image, { to, force: flags.force === true, signal })
  } else if (flags.postcopy) {
    const { defaultPushNice, loadPostcopy } = await import('../src/postcopy.js')
    const { parseHostPageSizes } = await import('./_size.js')
    const hostPageSizes = parseHostPageSizes(flags['host-page-size'] as string | undefined)
    // Nothing to undo: it writes to QEMU only.
    if (flags.channels !== undefined) throw new SnapError('SNAP_USAGE', '--channels cannot go with --postcopy: QEMU 10.0 does not do postcopy with multifd')
    const beforeConnect = flags['ready-fd'] === undefined ? undefined : readyHandshake(String(flags['ready-fd']), connect)
    stats = await unlessAborted(signal, loadPostcopy(image, { beforeConnect, bypassCache: flags['bypass-cache'] === true, log: flags.progress ? log : undefined, hostPageSizes, connect, channelTimeoutMs: parseTimeout(flags.timeout), record: flags.record === true, recover: flags.recover === true,
      recordWindowMs: flags['record-window'] === undefined ? undefined : parseDuration(String(flags['record-window']), '--record-window'),
      precopyMax: flags['precopy-max'] === undefined ? undefined : parseSize(String(flags['precopy-max']), '--precopy-max'), pushNice: defaultPushNice() }))
  } else if (flags.recover) {
    throw new SnapError('SNAP_USAGE', '--recover goes with --postcopy: it continues a lazy restore')
  } else if (flags['ready-fd'] !== undefined) {
    throw new SnapError('SNAP_USAGE', '--ready-fd goes with --postcopy --connect: it holds a lazy restore\'s connection back until the destination listens')
  } else if (connect !== undefined) {
    const { loadOverSocket } = await import('../src/multifd/send.js')
    const progress = flags.progress ? progressReporter('load') : undefined
    const channels = flags.channels === undefined ? 0 : Number(flags.channels)
    if (!/^\d+$/.test(String(flags.channels ?? '0')) || channels > 255) throw new SnapError('SNAP_USAGE', `--channels ${String(flags.channels)}: a number from 1 to 255`)
    const r = await loadOverSocket(image, {
      connect, channels, uuid: flags.uuid as string | undefined, bypassCache: flags['bypass-cache'] === true, timeoutMs: parseTimeout(flags.timeout), log, signal,
      onProgress: progress ? (done, all) => progress.update(done, all) : undefined,
    })
    progress?.finish(r.storedPages * 4096, r.storedPages * 4096)
    stats = r
  } else {
    const { loadImage } = await import('../src/load.js')
    const progress = flags.progress ? progressReporter('load') : undefined
    let total = 0
    const r = await loadImage(image, {
      to,
      force: flags.force === true,
      bypassCache: flags['bypass-cache'] === true,
      log,
      signal,
      onProgress: progress
        ? (done, all) => {
            total = all
            progress.update(done, all)
          }
        : undefined,
    })
    progress?.finish(total, total)
    stats = r
  }
  if (statsPath !== undefined) await writeStats(statsPath, stats, 'the restore succeeded')
  return 0
}

/**
 * load --ready-fd N: a line on fd N once the load is ready, then a line on standard input (the
 * destination listens now) before it connects. Checked at once: a bad fd fails before the image is read.
 */
function readyHandshake(text: string, connect: string | undefined): () => Promise<void> {
  if (connect === undefined) throw new SnapError('SNAP_USAGE', '--ready-fd goes with --connect: under exec: QEMU starts the load itself, once it listens')
  const fd = Number(text)
  if (!/^\d+$/.test(text) || fd < 3 || fd > 1023) throw new SnapError('SNAP_USAGE', `--ready-fd ${text}: a file descriptor number from 3 to 1023 (0 to 2 are the standard ones)`)
  let st: Stats | undefined
  try {
    st = fstatSync(fd)
  } catch {
    // not open
  }
  if (!st?.isFIFO() && !st?.isSocket()) throw new SnapError('SNAP_USAGE', `--ready-fd ${fd}: file descriptor ${fd} is not an open pipe or socket`)
  return async () => {
    try {
      writeSync(fd, 'ready\n')
      closeSync(fd)
    } catch (e) {
      throw new SnapError('SNAP_ABORTED', `--ready-fd ${fd}: the process that waits for the load is gone (${(e as Error).message})`)
    }
    await lineOnStdin()
  }
}

/** Resolves on the first line of standard input; SNAP_ABORTED when it closes first. */
function lineOnStdin(): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = ''
    const stdin = process.stdin
    const done = (err?: SnapError): void => {
      stdin.off('data', onData).off('end', onEnd).off('error', onEnd)
      stdin.destroy()
      if (err) reject(err)
      else resolve()
    }
    const onData = (d: Buffer): void => {
      got += d.toString('latin1')
      if (got.includes('\n')) done()
    }
    const onEnd = (): void => done(new SnapError('SNAP_ABORTED', 'standard input closed before the line that says the destination listens (--ready-fd): the restore that started this load stopped'))
    stdin.on('data', onData).on('end', onEnd).on('error', onEnd)
  })
}

/** create --threads N (1 to 256), or undefined for the default (src/threads.ts). */
export function parseThreads(v: unknown): number | undefined {
  if (v === undefined) return undefined
  const n = Number(v)
  if (typeof v !== 'string' || !/^\d+$/.test(v) || n < 1 || n > 256) throw new SnapError('SNAP_USAGE', `--threads ${String(v)}: a whole number from 1 to 256`)
  return n
}

/** --timeout MS (a whole number of milliseconds, 0 for none), or undefined for the default. */
export function parseTimeout(v: unknown): number | undefined {
  if (v === undefined) return undefined
  const n = Number(v)
  if (typeof v !== 'string' || !/^\d+$/.test(v) || !Number.isSafeInteger(n)) throw new SnapError('SNAP_USAGE', `--timeout ${String(v)}: give a whole number of milliseconds`)
  return n
}

/** Writes --stats; a failure now (the path was checked first) is a warning, not a failed command. */
async function writeStats(path: string, stats: object, done: string): Promise<void> {
  try {
    await writeFile(path, `${JSON.stringify(stats, null, 2)}\n`)
  } catch (e) {
    process.stderr.write(`snapctl: warning: the stats could not be written to ${path} (${(e as Error).message}); ${done}\n`)
  }
}

// `restore` and `save` drive QEMU over QMP; the library loads once the command line is good.
export async function runRestore(image: string, flags: ParsedFlags, signal: AbortSignal): Promise<number> {
  applyCacheFlags(flags)
  const recordWindow = flags['record-window'] as string | undefined
  const precopyMax = flags['precopy-max'] as string | undefined
  // checked here, not first by the load QEMU starts, where a bad value surfaced as QEMU's failure
  if (recordWindow !== undefined) parseDuration(recordWindow, '--record-window')
  if (precopyMax !== undefined) parseSize(precopyMax, '--precopy-max')
  const { restoreVm } = await import('../src/restore.js')
  const view = progressView('restore', flags.quiet === true)
  const r = await restoreVm(image, {
    qmp: flags.qmp as string, lazy: flags.lazy === true, record: flags.record === true, recover: flags.recover === true, recordWindow, precopyMax,
    paused: flags.paused === true, bypassCache: flags['bypass-cache'] === true, channels: flags.channels as number | undefined, signal, onProgress: view.update, log: view.note,
  }).finally(view.end)
  if (flags.json) {
    printJson(r)
    return 0
  }
  const lazy = r.runnableSeconds === null ? '' : `; the VM could run${r.recovered ? ' again' : ''} after ${r.runnableSeconds.toFixed(2)} s, ${r.requests ?? 0} pages asked for${r.recovered ? ` (it had ${r.pagesReceivedBefore ?? 0} already)` : ''}`
  process.stderr.write(`snapctl: restored ${r.image}: ${r.pages} pages (${r.zeroPages} zero), ${mib(r.bytesOut)} sent${r.channels ? ` over ${r.channels} multifd channels` : ''}, all in after ${r.seconds.toFixed(2)} s${lazy}; the VM is ${r.vm}\n`)
  return 0
}

export async function runSave(image: string, flags: ParsedFlags, signal: AbortSignal): Promise<number> {
  const clusterSize = parseSize((flags['cluster-size'] as string | undefined) ?? '1M', '--cluster-size')
  const { saveVm } = await import('../src/save.js')
  const view = progressView('save', flags.quiet === true)
  const r = await saveVm(image, {
    qmp: flags.qmp as string, live: flags.live === true, resume: flags.resume === true, force: flags.force === true, sync: flags.sync === true, bypassCache: flags['bypass-cache'] === true,
    compress: (flags.compress ?? 'lz4') as 'lz4' | 'none', clusterSize,
    signal, onProgress: view.update, log: view.note, channels: flags.channels as number | undefined, base: flags.base as string | undefined, dedupe: flags.dedupe === true,
  }).finally(view.end)
  if (flags.json) {
    printJson(r)
    return 0
  }
  const down = r.downtimeMs === null ? '' : `, the guest stopped for ${r.downtimeMs} ms`
  process.stderr.write(`snapctl: saved ${r.image}: ${mib(r.ramBytes)} of RAM (${r.pages} pages, ${r.zeroPages} zero) into ${mib(r.fileBytes)} in ${r.seconds.toFixed(2)} s${down}; the VM is ${r.vm}\n`)
  return 0
}
