import { Args, Command, Flags } from '@oclif/core'
import { unlessAborted } from '../src/abort.js'
import { ERROR_CODES } from '../src/errors.js'
import { cacheFlags } from './_flags.js'
import { formatBytes, formatRate } from './_format.js'
import { applyCacheFlags } from './_size.js'
import { progressReporter } from './_progress.js'
import { printJson, runCommand } from './_run-command.js'
import { verifyImage } from '../src/verify.js'

const INDEX_TEXT = {
  ok: 'index ok',
  missing: 'no index (any load rebuilds it; --rebuild-index builds it now)',
  built: 'index built',
  rebuilt: 'index rebuilt',
  bad: 'index bad',
  unchecked: 'index not checked (it cannot be opened here)',
}

export default class Verify extends Command {
  static override description = 'Check every byte of an image and its page index; exit 0 only if all is well. Writes nothing unless --rebuild-index'
  static override examples = ['<%= config.bin %> verify /var/lib/snaps/vm1.snap --progress', '<%= config.bin %> verify vm1.snap --rebuild-index']
  static override args = { image: Args.string({ required: true, description: 'the image: a file, or s3://BUCKET/KEY' }) }
  static override flags = {
    json: Flags.boolean({ description: 'print the report as JSON' }),
    progress: Flags.boolean({ description: 'show progress on stderr' }),
    'rebuild-index': Flags.boolean({ description: 'build a missing page index, rebuild a stale or damaged one (once the image checks out)' }),
    ...cacheFlags(),
  }

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Verify)
      applyCacheFlags(flags)
      const progress = flags.progress ? progressReporter('verify') : undefined
      const r = await unlessAborted(signal, verifyImage(args.image, { onProgress: progress?.update, rebuildIndex: flags['rebuild-index'] }))
      progress?.finish(r.bytesRead, r.fileBytes)
      if (flags.json) printJson(r)
      else if (r.ok) {
        process.stdout.write(`${r.path}: ok: ${r.clusters} clusters, ${r.pages} pages, ${formatBytes(r.fileBytes)} checked at ${formatRate(r.fileBytes, r.seconds)}; ${INDEX_TEXT[r.index]}${r.chain ? `; its chain of ${r.chain.length} images checks out` : ''}\n`)
      }
      for (const p of flags.json ? [] : r.problems) {
        const where = p.cluster !== undefined ? ` [cluster ${p.cluster}, offset ${p.offset}]` : p.offset !== undefined ? ` [offset ${p.offset}]` : ''
        process.stderr.write(`snapctl: ${p.code}: ${p.message}${where}\n`)
      }
      return r.problems.length ? ERROR_CODES[r.problems[0].code] : 0
    })
  }
}
