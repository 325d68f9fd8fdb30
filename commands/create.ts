import { Args, Command } from '@oclif/core'
import { runCreate } from './_actions.js'
import { runCommand } from './_run-command.js'
import { recordResourceUsage } from './_size.js'
import { CREATE } from './_spec.js'
import { oclifFlags } from './_flags.js'

// `snapctl create IMAGE ...` is normally parsed by the fast path (commands/_fast.ts); oclif
// serves --help and anything the fast path hands over.
export default class Create extends Command {
  static override description = CREATE.description
  static override examples = CREATE.examples
  static override args = { image: Args.string({ required: true, description: CREATE.image }) }
  static override flags = oclifFlags(CREATE)

  async run(): Promise<void> {
    recordResourceUsage()
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Create)
      return runCreate(args.image, flags, signal)
    })
  }
}
