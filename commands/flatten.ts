import { Args, Command, Flags } from '@oclif/core'
import { flattenImage } from '../src/flatten.js'
import { formatBytes } from './_format.js'
import { printJson, runCommand } from './_run-command.js'

export default class Flatten extends Command {
  static override description = 'Write one standalone image from an incremental image and its chain of bases (each only read); it restores exactly as the chain does'
  static override examples = ['<%= config.bin %> flatten vm1-3.snap vm1-full.snap']
  static override args = {
    image: Args.string({ required: true, description: 'the image to flatten (the top of a chain)' }),
    out: Args.string({ required: true, description: 'the standalone image to write' }),
  }
  static override flags = {
    force: Flags.boolean({ description: 'replace an existing OUT' }),
    compress: Flags.string({ options: ['lz4', 'none'], default: 'lz4', description: 'cluster compression' }),
    sync: Flags.boolean({ description: 'make OUT durable (fdatasync) before exiting' }),
    json: Flags.boolean({ description: 'print the result as JSON on stdout' }),
  }

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Flatten)
      const r = await flattenImage(args.image, args.out, { force: flags.force, compress: flags.compress as 'lz4' | 'none', sync: flags.sync, signal })
      if (flags.json) return printJson({ ...r.image, layers: r.layers, seconds: r.seconds })
      process.stderr.write(`${r.image.path}: ${r.image.pages} pages (${r.image.storedPages} with data, ${r.image.zeroPages} zero) from a chain of ${r.layers}, ${formatBytes(r.image.fileBytes)} written in ${r.seconds.toFixed(2)} s\n`)
    })
  }
}
