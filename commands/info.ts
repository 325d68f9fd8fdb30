import { Args, Command, Flags } from '@oclif/core'
import { cacheFlags } from './_flags.js'
import { formatBytes } from './_format.js'
import { applyCacheFlags } from './_size.js'
import { printJson, reportError, runCommand } from './_run-command.js'
import { unlessAborted } from '../src/abort.js'
import { SnapError } from '../src/errors.js'
import { imageInfo, type ChainInfo } from '../src/info.js'
import type { DeviceCheck } from '../src/stream/device-tail.js'

export default class Info extends Command {
  static override description = 'Show what an image holds: RAM blocks, pages, compression, dead bytes, device state'
  static override examples = ['<%= config.bin %> info /var/lib/snaps/vm1.snap', '<%= config.bin %> info vm1.snap --json']
  static override args = { image: Args.string({ required: true, description: 'the image: a file, or s3://BUCKET/KEY' }) }
  static override flags = { json: Flags.boolean({ description: 'print the information as JSON' }), ...cacheFlags() }

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Info)
      applyCacheFlags(flags)
      const info = await unlessAborted(signal, imageInfo(args.image))
      if (!info.complete) {
        // Described, but not an image: a command that reads it must not take it for one.
        const err = new SnapError('SNAP_INCOMPLETE', `${info.path} is not a finished image (${info.reason})`)
        if (flags.json) printJson({ ...info, error: err.toJSON() })
        else {
          process.stdout.write(`${info.path}: incomplete snapctl image (${info.reason}), ${formatBytes(info.fileBytes)}\n`)
          reportError(err, false)
        }
        return err.exitCode
      }
      if (flags.json) return printJson(info)
      const rows: Array<[string, string]> = [
        ['image', info.path],
        ['uuid', info.uuid],
        ['format', `snapctl v${info.version}, generation ${info.generation}, created ${info.createdAt}`],
        ['machine', `${info.machine} (from ${info.source}${info.creator ? `, written by ${info.creator}` : ''})`],
        ['ram', `${formatBytes(info.ramBytes)} in ${info.ramBlocks.length} block${info.ramBlocks.length === 1 ? '' : 's'}, ${info.ramPages} pages: ${info.pages} held (${info.storedPages} with data, ${info.zeroPages} zero)${info.basePages ? `, ${info.basePages} from the base` : ''}${info.sharedPages ? `; ${info.sharedPages} stored once with another page (shared slots)` : ''}`],
        ['clusters', `${info.clusters} of up to ${formatBytes(info.clusterSize)}, ${info.codecs.lz4} lz4${info.framedClusters ? ` (${info.framedClusters} in frames)` : ''}, ${info.codecs.none} raw`],
        ['file', `${formatBytes(info.fileBytes)}: ${formatBytes(info.storedBytes)} of page data (${formatBytes(info.rawBytes)} before compression, ratio ${info.compressionRatio.toFixed(2)}), ${formatBytes(info.deadBytes)} dead`],
        ['device state', `${info.deviceStateBytes} bytes, ${deviceCheckText(info.deviceCheck)}`],
        ['page index', info.indexPresent ? 'present' : 'missing (rebuilt when needed)'],
        ['working set', info.workingSet === null ? 'none (restore --lazy --record stores one)'
          : info.workingSet.error ? `unusable, ignored by lazy restores: ${info.workingSet.error}` : `${info.workingSet.pages} pages, recorded ${info.workingSet.recordedAt}`],
      ]
      if (info.chain) rows.push(...chainRows(info.chain))
      if (info.createRunning?.length) rows.push(['create running', `pid ${info.createRunning.join(', ')}: this image is being replaced`])
      const w = Math.max(...rows.map((r) => r[0].length))
      let out = rows.map(([k, v]) => `${k.padEnd(w)}  ${v}\n`).join('')
      const nw = Math.max(5, ...info.ramBlocks.map((b) => b.name.length))
      out += `\n${'block'.padEnd(nw)}  ${'size'.padStart(12)}  ${'pages'.padStart(9)}  ${'stored'.padStart(9)}  ${'zero'.padStart(9)}  ${'never sent'.padStart(10)}\n`
      for (const b of info.ramBlocks) {
        const never = b.ramPages - b.pages - b.basePages
        out += `${b.name.padEnd(nw)}  ${formatBytes(b.size).padStart(12)}  ${String(b.ramPages).padStart(9)}  ${String(b.storedPages).padStart(9)}  ${String(b.zeroPages).padStart(9)}  ${String(never).padStart(10)}\n`
      }
      process.stdout.write(out)
    })
  }
}

/** An incremental image: its base, and the chain top first (or why it does not open). */
function chainRows(c: ChainInfo): Array<[string, string]> {
  const rows: Array<[string, string]> = [['base', `${c.base.path} (${c.base.resolved}), uuid ${c.base.uuid}, generation ${c.base.generation}`]]
  if (c.error) rows.push(['chain', `${c.error.code}: ${c.error.message}`])
  c.layers.forEach((l, i) => rows.push([i === 0 ? 'chain' : '', `${i}: ${l.path}, ${formatBytes(l.fileBytes)}, ${l.storedPages} pages with data, ${l.zeroPages} zero, ${l.basePages} from its base`]))
  return rows
}

function deviceCheckText(c: DeviceCheck): string {
  if (c.error !== undefined) return `not checked (${c.error})`
  const how = c.description ? 'against the VM description' : 'no VM description'
  if (c.trusted.length === 0) return `${c.sections} sections, all walked ${how}`
  return `${c.sections} sections (${how}): ${c.walked} walked, ${c.trusted.length} taken on trust by header and footer: ${c.trusted.join(', ')}`
}
