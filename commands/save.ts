import { Args, Command } from '@oclif/core'
import { runSave } from './_actions.js'
import { runCommand } from './_run-command.js'
import { SAVE } from './_spec.js'
import { oclifFlags } from './_flags.js'

// `snapctl save IMAGE ...` is normally parsed by the fast path (commands/_fast.ts); oclif
// serves --help and anything the fast path hands over.
export default class Save extends Command {
  static override summary = SAVE.summary
  static override description = SAVE.description
  static override examples = SAVE.examples
  static override args = { image: Args.string({ required: true, description: SAVE.image }) }
  static override flags = oclifFlags(SAVE)

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Save)
      return runSave(args.image, flags, signal)
    })
  }
}
