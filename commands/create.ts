import { Args, Command } from '@oclif/core'
import { runCreate } from '../src/cli/actions.js'
import { runCommand } from '../src/cli/run-command.js'
import { recordResourceUsage } from '../src/cli/size.js'
import { CREATE } from '../src/cli/spec.js'
import { oclifFlags } from './_flags.js'

// `snapctl create IMAGE ...` is normally parsed by the fast path (src/cli/fast.ts); oclif
// serves --help and anything the fast path hands over.
export default class Create extends Command {
  static override description = CREATE.description
  static override examples = CREATE.examples
  static override args = { image: Args.string({ required: true, description: CREATE.image }) }
  static override flags = oclifFlags(CREATE)

  async run(): Promise<void> {
    recordResourceUsage()
    await runCommand(this.argv, async () => {
      const { args, flags } = await this.parse(Create)
      return runCreate(args.image, flags)
    })
  }
}
