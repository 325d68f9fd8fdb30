import { Args, Command } from '@oclif/core'
import { runRestore } from './_actions.js'
import { runCommand } from './_run-command.js'
import { RESTORE } from './_spec.js'
import { oclifFlags } from './_flags.js'

// `snapctl restore IMAGE ...` is normally parsed by the fast path (commands/_fast.ts); oclif
// serves --help and anything the fast path hands over.
export default class Restore extends Command {
  static override summary = RESTORE.summary
  static override description = RESTORE.description
  static override examples = RESTORE.examples
  static override args = { image: Args.string({ required: true, description: RESTORE.image }) }
  static override flags = oclifFlags(RESTORE)

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Restore)
      return runRestore(args.image, flags, signal)
    })
  }
}
