import { Args, Command, Flags } from '@oclif/core'
import { ERROR_CODES } from '../src/errors.js'
import { mib, printJson, runCommand } from '../src/cli/run-command.js'
import { verifyImage } from '../src/verify.js'

export default class Verify extends Command {
  static override description = 'Check every byte of an image and its page index; exit 0 only if all is well'
  static override examples = ['<%= config.bin %> verify /var/lib/snaps/vm1.snap --progress']
  static override args = { image: Args.string({ required: true, description: 'the image file' }) }
  static override flags = {
    json: Flags.boolean({ description: 'print the report as JSON' }),
    progress: Flags.boolean({ description: 'show progress on stderr' }),
  }

  async run(): Promise<void> {
    await runCommand(this.argv, async () => {
      const { args, flags } = await this.parse(Verify)
      let last = 0
      let shown = -1
      const onProgress = flags.progress
        ? (done: number, total: number) => {
            if ((performance.now() - last < 250 && done < total) || done === shown) return
            last = performance.now()
            shown = done
            process.stderr.write(`\rverify: ${total ? Math.floor((100 * done) / total) : 100}% of ${mib(total)}`)
          }
        : undefined
      const r = await verifyImage(args.image, { onProgress })
      if (flags.progress) process.stderr.write('\n')
      if (flags.json) printJson(r)
      else if (r.ok) {
        const speed = r.seconds > 0 ? ` at ${(r.fileBytes / 1e6 / r.seconds).toFixed(0)} MB/s` : ''
        process.stdout.write(`${r.path}: ok: ${r.clusters} clusters, ${r.pages} pages, ${mib(r.fileBytes)} checked${speed}; index ${r.index}\n`)
      }
      for (const p of flags.json ? [] : r.problems) {
        const where = p.cluster !== undefined ? ` [cluster ${p.cluster}, offset ${p.offset}]` : p.offset !== undefined ? ` [offset ${p.offset}]` : ''
        process.stderr.write(`snapctl: ${p.code}: ${p.message}${where}\n`)
      }
      return r.problems.length ? ERROR_CODES[r.problems[0].code] : 0
    })
  }
}
