#!/usr/bin/env node
// Start-up matters: QEMU starts us for every save and restore (exec:), and the lazy-restore
// target counts our start-up. `--version` and the create/load hot path skip oclif (~150 ms).
import { readFileSync } from 'node:fs'

const argv = process.argv.slice(2)
// lz4-napi allocates with mimalloc, which by default keeps freed pages of its threads for a
// while. Where lz4-napi still runs on the libuv pool (lazy restore, multifd), a 1 MiB output per
// cluster on each pool thread's heap held ~250 MiB of RSS: there, freed pages go back at once.
// create compresses on the main thread (src/container/writer.ts) and load decodes into reused
// buffers (src/container/lz4-block.ts): there, returning pages at once only made every cluster
// fault its memory back in (1 GiB save: 307,000 faults, 1.1 s of system time). Read when the
// addon loads.
// load --connect (multifd) now decodes into reused buffers too (src/multifd/send.ts); --postcopy
// still decodes with lz4-napi on the pool: a bench run with the delay kept for it peaked at
// 589 MiB (then load --connect --channels 2, 1 GiB).
const ownBuffers = argv[0] === 'create' || (argv[0] === 'load' && !argv.includes('--postcopy'))
if (!ownBuffers) {
  process.env.MIMALLOC_PURGE_DELAY ??= '0'
  process.env.MIMALLOC_RESET_DELAY ??= '0'
}
// Two pool threads: each keeps its own mimalloc heap, and on a 2-core machine more threads
// only add memory (1 GiB save: 4 threads 295 MiB peak, 2 threads 250 MiB, no slower).
// create --threads N (default src/threads.ts) compresses on N - 1 of them and writes on
// another: N, at least 2.
let poolThreads = 2
if (argv[0] === 'create') {
  const at = argv.findIndex((a) => a === '--threads' || a.startsWith('--threads='))
  const n = at < 0 ? (await import('../dist/src/threads.js')).defaultThreads() : Number(argv[at].startsWith('--threads=') ? argv[at].slice(10) : argv[at + 1])
  if (Number.isInteger(n) && n > 2 && n <= 256) poolThreads = n
}
process.env.UV_THREADPOOL_SIZE ??= String(poolThreads)

if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-v' || argv[0] === 'version')) {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'))
  process.stdout.write(`snapctl/${pkg.version} ${process.platform}-${process.arch} node-${process.version}\n`)
} else {
  // load of an s3:// image: the thread that fetches it (and loads the AWS SDK) starts now, beside the rest.
  if (argv[0] === 'load' && argv.some((a) => a.startsWith('s3://'))) import('../dist/src/container/s3-source.js').then((m) => m.startFetchThread(), () => {})
  const { fastRun } = await import('../dist/commands/_fast.js')
  if (!(await fastRun(argv))) {
    const { flush, run } = await import('@oclif/core')
    try {
      await run(argv, import.meta.url)
      await flush()
    } catch (err) {
      // What fails outside a command (an unknown command, help for one) is reported in the same
      // one-line form as every error. Commands report their own errors (commands/_run-command.ts).
      const { reportError } = await import('../dist/commands/_run-command.js')
      const { SnapError } = await import('../dist/src/errors.js')
      const exit = err?.oclif?.exit
      if (exit === 0) process.exitCode = 0
      else if (exit === 127) {
        // @oclif/plugin-not-found has said what it had to say; give the code and the way out.
        const e = new SnapError('SNAP_USAGE', `"${argv[0]}" is not a snapctl command; "snapctl help" lists them`)
        process.exitCode = reportError(e, argv.includes('--json'))
      } else process.exitCode = reportError(err, argv.includes('--json'))
    }
  }
}
