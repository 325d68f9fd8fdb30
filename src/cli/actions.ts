// What `create` and `load` do once their command line is parsed; shared by the oclif commands
// and the fast path. Returns the exit status.
import { writeFile } from 'node:fs/promises'
import { printJson } from './run-command.js'
import { parseSize, progressPrinter } from './size.js'
import type { ParsedFlags } from './spec.js'

export async function runCreate(image: string, flags: ParsedFlags): Promise<number> {
  const { createImage } = await import('../create.js')
  const r = await createImage(image, {
    from: flags.from as string | undefined,
    compress: (flags.compress ?? 'lz4') as 'lz4' | 'none',
    clusterSize: parseSize((flags['cluster-size'] as string | undefined) ?? '1M', '--cluster-size'),
    force: flags.force === true,
    sync: flags.sync === true,
    onProgress: flags.progress ? progressPrinter('create') : undefined,
  })
  const stats = { ...r.counters, bytesIn: r.bytesIn, bytesOut: r.image.fileBytes, seconds: r.seconds, source: r.source }
  if (flags.stats) await writeFile(flags.stats as string, `${JSON.stringify(stats, null, 2)}\n`)
  if (flags.json) printJson({ ...r.image, stats, source: r.source })
  else if (flags.from !== undefined || flags.progress) {
    const mb = (n: number): string => `${(n / 1e6).toFixed(1)} MB`
    process.stderr.write(`${image}: ${r.counters.pages} pages + ${r.counters.zeroPages} zero pages, ${mb(r.bytesIn)} in, ${mb(r.image.fileBytes)} written in ${r.seconds.toFixed(2)} s\n`)
  }
  return 0
}

// stdout is the migration stream here: nothing else may ever be written to it.
export async function runLoad(image: string, flags: ParsedFlags): Promise<number> {
  const log = (msg: string): void => void process.stderr.write(`snapctl: ${msg}\n`)
  let stats: object
  if (flags.postcopy) {
    const { loadPostcopy } = await import('../postcopy.js')
    const { parseHostPageSizes } = await import('./size.js')
    const hostPageSizes = parseHostPageSizes(flags['host-page-size'] as string | undefined)
    stats = await loadPostcopy(image, { log: flags.progress ? log : undefined, hostPageSizes })
  } else {
    const { loadImage } = await import('../load.js')
    stats = await loadImage(image, {
      to: flags.to as string | undefined,
      force: flags.force === true,
      log,
      onProgress: flags.progress ? progressPrinter('load') : undefined,
    })
  }
  if (flags.stats) await writeFile(flags.stats as string, `${JSON.stringify(stats, null, 2)}\n`)
  return 0
}
