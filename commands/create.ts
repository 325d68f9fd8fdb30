import { Args, Command, Flags } from '@oclif/core'
import { writeFile } from 'node:fs/promises'
import { printJson, runCommand } from '../src/cli/run-command.js'
import { parseSize, progressPrinter, recordResourceUsage } from '../src/cli/size.js'
import { createImage } from '../src/create.js'

export default class Create extends Command {
  static override description = 'Save a QEMU migration stream (stdin, or --from FILE) into an image'
  static override examples = [
    `(qemu) migrate "exec:<%= config.bin %> create /var/lib/snaps/vm1.snap"`,
    '<%= config.bin %> create vm1.snap --from saved.stream',
    '<%= config.bin %> create vm1.snap --from /var/lib/libvirt/qemu/save/vm1.save',
  ]
  static override args = { image: Args.string({ required: true, description: 'the image to write' }) }
  static override flags = {
    from: Flags.string({ description: 'read the stream from FILE: a `migrate file:` stream or a libvirt save image' }),
    compress: Flags.string({ options: ['lz4', 'none'], default: 'lz4', description: 'cluster compression' }),
    'cluster-size': Flags.string({ default: '1M', description: 'raw page bytes per cluster, a power of two from 64K to 64M' }),
    force: Flags.boolean({ description: 'replace an existing image' }),
    progress: Flags.boolean({ description: 'show progress on stderr' }),
    stats: Flags.string({ description: 'write counters (pages, zero, XBZRLE, re-sent pages, bytes, seconds) as JSON to FILE' }),
    json: Flags.boolean({ description: 'print the result as JSON on stdout' }),
  }

  async run(): Promise<void> {
    recordResourceUsage()
    await runCommand(this.argv, async () => {
      const { args, flags } = await this.parse(Create)
      const r = await createImage(args.image, {
        from: flags.from,
        compress: flags.compress as 'lz4' | 'none',
        clusterSize: parseSize(flags['cluster-size'], '--cluster-size'),
        force: flags.force,
        onProgress: flags.progress ? progressPrinter('create') : undefined,
      })
      const stats = { ...r.counters, bytesIn: r.bytesIn, bytesOut: r.image.fileBytes, seconds: r.seconds, source: r.source }
      if (flags.stats) await writeFile(flags.stats, `${JSON.stringify(stats, null, 2)}\n`)
      if (flags.json) printJson({ ...r.image, stats, source: r.source })
      else if (flags.from !== undefined || process.stderr.isTTY) {
        const mb = (n: number): string => `${(n / 1e6).toFixed(1)} MB`
        process.stderr.write(`${args.image}: ${r.counters.pages} pages (${r.counters.zeroPages} zero), ${mb(r.bytesIn)} in, ${mb(r.image.fileBytes)} written in ${r.seconds.toFixed(2)} s\n`)
      }
    })
  }
}
