// The fd transport: QEMU's `exec:` migration (stdin in, stdout out, stdin again as the return
// path) and --from/--to files. The bytes move on threads of their own (input-thread.ts,
// output-thread.ts): large writes to QEMU's pipe, issued back to back, matter more than anything
// else on the restore path (DESIGN.md, "Facts measured").
import { readInput } from './input.js'
import { openOutput } from './output.js'
import { ThreadedOutput } from './output-thread.js'
import type { IncomingMigration, OutgoingMigration, SinkOptions } from './types.js'

/** Standard input, or the file `from`. */
export function fdIncoming(from: string | undefined): IncomingMigration {
  return { main: readInput(from), channels: [] }
}

export interface FdOutgoingOptions {
  /** write to this file (or device, or FIFO) instead of standard output */
  to?: string
  force?: boolean
  /** read QEMU's return path on standard input (postcopy) */
  returnPath?: boolean
  sink?: SinkOptions
}

/** Standard output, or the file `to` (written under a temporary name until finish()). */
export async function fdOutgoing(opts: FdOutgoingOptions = {}): Promise<OutgoingMigration> {
  const out = await openOutput(opts.to, { force: opts.force })
  const s = opts.sink ?? {}
  const main = new ThreadedOutput(out.fd, out.what, s.transferable, s.returned, s.queueLimit)
  return {
    main,
    channels: [],
    returnPath: opts.returnPath ? process.stdin : null,
    finish: async () => {
      await main.close()
      await out.close()
    },
    discard: async () => {
      main.abort()
      return out.discard()
    },
  }
}
