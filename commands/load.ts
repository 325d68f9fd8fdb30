import { Args, Command } from '@oclif/core'
import { runLoad } from './_actions.js'
import { runCommand } from './_run-command.js'
import { recordResourceUsage } from './_size.js'
import { LOAD } from './_spec.js'
import { oclifFlags } from './_flags.js'

// stdout is the migration stream: errors go to stderr even with --json elsewhere.
export default class Load extends Command {
  static override description = LOAD.description
  static override examples = LOAD.examples
  static override args = { image: Args.string({ required: true, description: LOAD.image }) }
  static override flags = oclifFlags(LOAD)

  async run(): Promise<void> {
    recordResourceUsage()
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Load)
      return runLoad(args.image, flags, signal)
    }, { jsonErrors: false })
  }
}
