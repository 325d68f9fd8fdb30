#!/usr/bin/env node
// Start-up matters: QEMU starts us for every save and restore (exec:), and the lazy-restore
// target counts our start-up. `--version` and the create/load hot path skip oclif (~150 ms).
import { readFileSync } from 'node:fs'

// lz4-napi allocates with mimalloc, which by default keeps freed pages of its worker threads
// for a while: with a 1 MiB output per cluster that held ~250 MiB of RSS during a 1 GiB save.
// Returning them at once keeps create under its memory target. Read when the addon loads.
process.env.MIMALLOC_PURGE_DELAY ??= '0'
process.env.MIMALLOC_RESET_DELAY ??= '0'
// Two pool threads: each keeps its own mimalloc heap, and on a 2-core machine more threads
// only add memory (1 GiB save: 4 threads 295 MiB peak, 2 threads 250 MiB, no slower).
process.env.UV_THREADPOOL_SIZE ??= '2'

const argv = process.argv.slice(2)
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-v' || argv[0] === 'version')) {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'))
  process.stdout.write(`snapctl/${pkg.version} ${process.platform}-${process.arch} node-${process.version}\n`)
} else {
  const { fastRun } = await import('../dist/src/cli/fast.js')
  if (!(await fastRun(argv))) {
    const { execute } = await import('@oclif/core')
    await execute({ dir: import.meta.url })
  }
}
