// snapctl benchmark: save and restore a paused VM through snapctl and through QEMU's own paths,
// alternating the contenders within each repetition, and check the targets.
//   npm run bench -- --size 1G [--repeat 3] [--only save|restore|all] [--json F] [--chart F.svg]
// See tools/bench/options.ts for every option. Progress goes to stderr, the table to stdout.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statfsSync, writeFileSync } from 'node:fs'
import { availableParallelism, constants, cpus, loadavg, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { Vm, fillRam, requireQemu } from '../vm.js'
import { renderChart } from './chart.js'
import { BASELINE, RESTORE, ROOT, RUN_JS, SAVE, rotate, type Contender } from './contenders.js'
import { parseOptions, type BenchOptions } from './options.js'
import { checkTargets, median, summarize, table, targetLines, type ContenderResult } from './report.js'
import { MAX_BANDWIDTH, MismatchError, runRestore, runSave, type BenchContext } from './runner.js'

const TMPFS_MAGIC = 0x01021994
const started = performance.now()
const log = (msg: string): void => {
  process.stderr.write(`[${((performance.now() - started) / 1000).toFixed(1).padStart(6)}s] ${msg}\n`)
}

async function main(): Promise<number> {
  let opts: BenchOptions
  try {
    opts = parseOptions(process.argv.slice(2))
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`)
    return 2
  }
  const qemu = requireQemu()
  const saveList = pick(SAVE, opts)
  const restoreList = pick(RESTORE, opts).filter((c) => saveList.some((s) => s.id === c.from))

  const parent = resolve(opts.dir ?? '/var/tmp')
  mkdirSync(parent, { recursive: true })
  if (statfsSync(parent).type === TMPFS_MAGIC) throw new Error(`${parent} is tmpfs: images and streams must go to disk (use --dir)`)
  const work = mkdtempSync(join(parent, 'snapctl-bench-'))
  const srcRam = `/dev/shm/snapctl-bench-src-${process.pid}.ram`
  const cleanup = (): void => {
    rmSync(srcRam, { force: true })
    if (!opts.keep) removeDir(work)
  }
  // tools/vm.ts kills the VMs on these signals and re-raises the signal, but while our listener is
  // still there the re-raised one is swallowed: so we remove our files and exit ourselves (the
  // 'exit' hook of tools/vm.ts kills any VM left).
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      log(`${sig}: stopping, removing ${work} and ${srcRam}`)
      cleanup()
      process.exit(128 + constants.signals[sig])
    })
  }

  const memMiB = opts.sizeBytes / (1 << 20)
  const gib = opts.sizeBytes / (1 << 30)
  const startSource = (): Promise<Vm> => Vm.start({ name: 'src', memMiB, memPath: srcRam, keepMem: true, paused: true, dir: work })
  let ctx: BenchContext | undefined
  const results: ContenderResult[] = []
  const info = {
    date: new Date().toISOString(),
    qemu: qemu.version,
    node: process.version,
    snapctl: (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version,
    nproc: availableParallelism(),
    cpu: cpus()[0]?.model ?? 'unknown',
    memGiB: Math.round(totalmem() / (1 << 30)),
    loadavgStart: loadavg(),
  }
  try {
    log(`QEMU ${qemu.version}, ${info.nproc} cores, work dir ${work}, RAM file ${srcRam}`)
    log(`filling ${opts.sizeLabel} of guest RAM (mix ${JSON.stringify(opts.mix)}, seed ${opts.seed})`)
    await fillRam(srcRam, opts.sizeBytes, { seed: opts.seed, mix: opts.mix })
    const src = await startSource()
    ctx = {
      work,
      sizeBytes: opts.sizeBytes,
      memMiB,
      multifdChannels: opts.multifdChannels,
      timeoutMs: Math.round(60_000 * Math.max(1, gib)),
      src,
      restartSource: async () => {
        await ctx!.src.quit()
        ctx!.src = await startSource()
        return ctx!.src
      },
      sourceMigrated: false,
      log,
    }

    const startupMs = measureStartup()
    log(`snapctl --version: median ${startupMs?.toFixed(0) ?? '-'} ms (node -e 0: ${nodeStartupMs?.toFixed(0) ?? '-'} ms)`)

    const saves = saveList.map((c): ContenderResult => ({ phase: 'save', id: c.id, samples: [] }))
    results.push(...saves)
    if (opts.only !== 'restore') await runPhase(ctx, opts, 'save', saveList, saves)
    else await prepareInputs(ctx, saveList, restoreList, saves)
    const restores = restoreList.map((c): ContenderResult => ({ phase: 'restore', id: c.id, from: c.from, samples: [] }))
    if (opts.only !== 'save') {
      results.push(...restores)
      for (const r of restores) r.disk = saves.find((s) => s.id === r.from)?.disk
      await runPhase(ctx, opts, 'restore', restoreList, restores)
    }
    summarize(saves, opts.sizeBytes)
    summarize(restores, opts.sizeBytes)
    await probeRss(ctx, saveList, restoreList, results)

    const targets = checkTargets(results, startupMs)
    const title = `snapctl bench: ${opts.sizeLabel} paused VM, QEMU ${qemu.version}, ${info.nproc} cores, ${opts.repeat} reps`
    process.stdout.write(`\n${title}\n${table(results)}\n\n${targetLines(targets)}\n`)
    const notes = [
      'Outputs are written through the page cache (no fsync, caches not dropped), as QEMU\'s own file: is; restores read files written moments before, likely still cached.',
      'Except the issue-12 contenders: snapctl-lz4-sync (create --sync: fdatasync before exit), snapctl-lz4-direct and snapctl-load-direct (--bypass-cache: O_DIRECT, read from the disk, not the cache); "cached %" is the largest share of the image resident in the page cache after a sample (fincore).',
      `Contenders alternate round-robin within each repetition; "ratio" is median / ${BASELINE} median, "paired" the median of per-repetition ratios.`,
      `max-bandwidth is set to ${MAX_BANDWIDTH} B/s on every VM: QEMU's default of 128 MiB/s would throttle every save path to the same speed.`,
      'Save time runs from the migrate command until QEMU reports completed and, for exec:, the command has exited; restore time from migrate-incoming until the destination reports completed.',
    ]
    for (const n of notes) process.stdout.write(`note: ${n}\n`)

    const json = resolve(opts.json)
    mkdirSync(dirname(json), { recursive: true })
    const doc = {
      tool: 'snapctl-bench', version: 1, ...info, loadavgEnd: loadavg(),
      size: opts.sizeLabel, sizeBytes: opts.sizeBytes, mix: opts.mix, seed: opts.seed, repeat: opts.repeat, only: opts.only,
      multifdChannels: opts.multifdChannels, maxBandwidth: MAX_BANDWIDTH, workDir: work, startup: startupSamples, startupMedianMs: startupMs, nodeStartupMedianMs: nodeStartupMs,
      results, targets, notes,
    }
    writeFileSync(json, `${JSON.stringify(doc, null, 2)}\n`)
    log(`wrote ${json}`)
    if (opts.chart) {
      const chart = resolve(opts.chart)
      mkdirSync(dirname(chart), { recursive: true })
      writeFileSync(chart, renderChart(results, title))
      log(`wrote ${chart}`)
    }
    const failed = results.filter((r) => r.error)
    if (failed.length) log(`FAILED contenders: ${failed.map((r) => `${r.phase} ${r.id}`).join(', ')}`)
    return failed.length ? 1 : 0
  } finally {
    await ctx?.src.quit().catch(() => ctx?.src.kill())
    cleanup()
  }
}

/**
 * rm -rf that outlasts a writer: an exec: command orphaned by a killed QEMU (on SIGINT) may go on
 * writing its rusage and done files for a moment. Synchronous, as it runs from signal handlers.
 */
function removeDir(dir: string): void {
  const deadline = Date.now() + 5000
  for (;;) {
    try {
      rmSync(dir, { recursive: true, force: true })
      return
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOTEMPTY' || Date.now() > deadline) {
        log(`could not remove ${dir}: ${(err as Error).message}`)
        return
      }
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50)
    }
  }
}

function pick<T extends Contender>(list: readonly T[], opts: BenchOptions): T[] {
  if (!opts.contenders) return [...list]
  const known = new Set([...SAVE, ...RESTORE].map((c) => c.id))
  const unknown = opts.contenders.filter((id) => !known.has(id))
  if (unknown.length) throw new Error(`unknown contender(s): ${unknown.join(', ')} (known: ${[...known].join(', ')})`)
  const wanted = (id: string): boolean => id === BASELINE || opts.contenders!.includes(id)
  return list.filter((c) => wanted(c.id) || ('from' in c && wanted(String(c.from))))
}

async function runPhase(
  ctx: BenchContext, opts: BenchOptions, phase: 'save' | 'restore', list: Contender[], results: ContenderResult[],
): Promise<void> {
  for (let rep = 0; rep < opts.repeat; rep++) {
    const order = rotate(list, rep).filter((c) => !results.find((r) => r.id === c.id)!.error)
    for (const [i, c] of order.entries()) {
      const r = results.find((x) => x.id === c.id)!
      try {
        const s = phase === 'save' ? await runSave(ctx, c) : await runRestore(ctx, c, r.from!, rep)
        r.samples.push({ rep, order: i, ...s })
        if (s.disk) r.disk = s.disk
        log(`${phase} ${rep + 1}/${opts.repeat} ${c.id.padEnd(18)} ${s.seconds.toFixed(3)} s${s.rssKiB ? `  RSS ${(s.rssKiB / 1024).toFixed(0)} MiB` : ''}`)
      } catch (err) {
        if (err instanceof MismatchError) throw err
        r.error = (err as Error).message
        log(`${phase} ${rep + 1}/${opts.repeat} ${c.id}: FAILED, dropped from this run:\n  ${r.error}`)
      }
    }
  }
}

/** --only restore: write each needed input once, untimed. */
async function prepareInputs(ctx: BenchContext, saveList: Contender[], restoreList: Array<{ from: string }>, saves: ContenderResult[]): Promise<void> {
  for (const c of saveList.filter((s) => restoreList.some((r) => r.from === s.id))) {
    const r = saves.find((x) => x.id === c.id)!
    try {
      log(`writing the input of restore from ${c.id} (untimed)`)
      r.disk = (await runSave(ctx, c)).disk
    } catch (err) {
      r.error = (err as Error).message
      log(`save ${c.id} (untimed): FAILED:\n  ${r.error}`)
    }
  }
}

/**
 * snapctl reports its own peak RSS when SNAPCTL_RUSAGE_FILE is set. Where it did not, run the
 * contender once more, untimed, under /usr/bin/time (if installed): the wrapper stays off the clock.
 */
async function probeRss(ctx: BenchContext, saveList: Contender[], restoreList: Array<Contender & { from: string }>, results: ContenderResult[]): Promise<void> {
  if (!existsSync('/usr/bin/time')) return
  for (const r of results) {
    if (r.rssKiB !== undefined || r.error || !r.samples.length) continue
    const c = (r.phase === 'save' ? saveList : restoreList).find((x) => x.id === r.id)
    if (!c?.snapctl) continue
    try {
      log(`${r.phase} ${r.id}: no SNAPCTL_RUSAGE_FILE report; measuring peak RSS with /usr/bin/time (untimed run)`)
      const s = r.phase === 'save' ? await runSave(ctx, c, 'time') : await runRestore(ctx, c, r.from!, -1, 'time')
      if (s.rssKiB !== undefined) {
        r.rssKiB = s.rssKiB
        r.rssSource = '/usr/bin/time'
      }
    } catch (err) {
      log(`RSS probe of ${r.phase} ${r.id} failed: ${(err as Error).message}`)
    }
  }
}

let startupSamples: number[] = []
/** `node -e 0` on the same machine, for scale: the floor under any Node CLI's start-up. */
let nodeStartupMs: number | undefined

/** `node bin/run.js --version`, one warm-up run then 10 timed ones; the median in ms. */
function measureStartup(): number | undefined {
  const run = (args: string[]): number => {
    const t0 = performance.now()
    const p = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 30_000 })
    const ms = performance.now() - t0
    if (p.status !== 0) throw new Error(`node ${args.join(' ')} exited with ${p.status}: ${p.stderr}`)
    return ms
  }
  try {
    run(['-e', '0'])
    nodeStartupMs = median(Array.from({ length: 10 }, () => run(['-e', '0'])))
    run([RUN_JS, '--version'])
    startupSamples = Array.from({ length: 10 }, () => run([RUN_JS, '--version']))
    return median(startupSamples)
  } catch (err) {
    log(`start-up time not measured: ${(err as Error).message}`)
    return undefined
  }
}

main().then(
  (code) => {
    process.exitCode = code
  },
  (err: Error) => {
    process.stderr.write(`bench: ${err instanceof MismatchError ? 'RESTORED RAM MISMATCH: ' : ''}${err.stack ?? err.message}\n`)
    process.exitCode = 1
  },
)
