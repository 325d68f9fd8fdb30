// How many threads `create` uses without --threads (WriterOptions.threads): all the machine's
// but one, which stays for QEMU's sending threads and the kernel's socket and page-cache work;
// at least 1. On 2 cores that is 1, the main thread compressing as well as parsing: there,
// compressing on a pool thread beside it was slower (README, "Parallel channels": create --listen
// from 4 channels, 1 GiB, on a shared 2-core machine). No imports: bin/run.js reads it to size
// the libuv pool before anything starts.
import { availableParallelism } from 'node:os'

export function defaultThreads(): number {
  return Math.max(1, availableParallelism() - 1)
}
