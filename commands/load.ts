import { Args, Command, Flags } from '@oclif/core'
import { writeFile } from 'node:fs/promises'
import { runCommand } from '../src/cli/run-command.js'
import { progressPrinter, recordResourceUsage } from '../src/cli/size.js'
import { loadImage } from '../src/load.js'
import { loadPostcopy } from '../src/postcopy.js'

// stdout is the migration stream: nothing else may ever be written there (no --json here).
export default class Load extends Command {
  static override description = 'Restore an image as a QEMU migration stream on stdout (or --to FILE); --postcopy restores lazily'
  static override examples = [
    `(qemu) migrate_incoming "exec:<%= config.bin %> load /var/lib/snaps/vm1.snap"`,
    `(qemu) migrate_incoming "exec:<%= config.bin %> load --postcopy /var/lib/snaps/vm1.snap"   # needs postcopy-ram on`,
    '<%= config.bin %> load vm1.snap --to vm1.stream   # for migrate_incoming file:vm1.stream',
  ]
  static override args = { image: Args.string({ required: true, description: 'the image to read' }) }
  static override flags = {
    to: Flags.string({ description: 'write the stream to FILE instead of stdout', exclusive: ['postcopy'] }),
    postcopy: Flags.boolean({ description: 'lazy restore: the VM runs at once, pages are served on demand (reads the return path on stdin)' }),
    force: Flags.boolean({ description: 'with --to: replace an existing FILE' }),
    progress: Flags.boolean({ description: 'show progress on stderr' }),
    stats: Flags.string({ description: 'write timings and counters as JSON to FILE' }),
  }

  async run(): Promise<void> {
    recordResourceUsage()
    await runCommand(
      this.argv,
      async () => {
        const { args, flags } = await this.parse(Load)
        const log = (msg: string): void => void process.stderr.write(`snapctl: ${msg}\n`)
        const stats = flags.postcopy
          ? await loadPostcopy(args.image, { log: flags.progress ? log : undefined })
          : await loadImage(args.image, { to: flags.to, force: flags.force, log, onProgress: flags.progress ? progressPrinter('load') : undefined })
        if (flags.stats) await writeFile(flags.stats, `${JSON.stringify(stats, null, 2)}\n`)
      },
      { jsonErrors: false },
    )
  }
}
