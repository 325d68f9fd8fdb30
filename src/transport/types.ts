// The seam between snapctl and QEMU: where a migration stream comes from (create) and where
// one goes, with QEMU's answers coming back (load). The parser, the image writer and the page
// scheduler see only these shapes; fds 0/1 and --from/--to files are one implementation
// (src/transport/fd.ts), a unix socket another (src/transport/socket.ts). Several channels at
// once (multifd) are more entries in `channels`, each its own source or sink.

import type { Readable } from 'node:stream'

/** Bytes to QEMU, in order. ThreadedOutput (a writer thread on an fd) is the fast one. */
export interface StreamSink {
  /** for messages: `standard output`, a path, a socket */
  readonly what: string
  /** bytes written so far */
  readonly bytes: number
  /** Queue `chunk` (it may be handed over: do not touch it after); `onWritten` once it is out. */
  write(chunk: Buffer, onWritten?: () => void): Promise<void>
  /** Whether writeVector takes `buf` (left out: the sink has no writeVector). */
  canWriteVector?(buf: Uint8Array): boolean
  /**
   * Queue segments of `bufs` ((index, offset, length) triples, `length` bytes in all) to go out in
   * order without being copied; the bytes must stay as they are until `onWritten`.
   */
  writeVector?(bufs: Uint8Array[], segs: Int32Array, length: number, onWritten?: () => void): Promise<void>
  /** Wait until everything queued is out; throws the sink's error if it had one. */
  flush(): Promise<void>
  /**
   * The stream's last bytes are queued and another channel (a return path) will say whether the
   * destination took them: from now on the destination closing is how the stream ends, not an error.
   */
  lastQueued?(): void
  /** flush(), then release the sink. */
  close(): Promise<void>
  /** Release at once, on error paths (never waits on a peer that stopped reading). */
  abort(): void
}

/** A stream coming in from QEMU: chunks the consumer may keep. */
export type StreamSource = AsyncIterable<Buffer>

/** create's side: the main stream, and (multifd) one source per extra channel. */
export interface IncomingMigration {
  main: StreamSource
  channels: StreamSource[]
  /** the input's size, where known (a file) */
  bytesTotal?: number
}

/**
 * load's side: the stream out, QEMU's return path in (postcopy; null where there is none), and
 * (multifd) one sink per extra channel. `finish` makes what was written final (a file: synced
 * and renamed into place); `discard` removes it after a failure or a signal.
 */
export interface OutgoingMigration {
  main: StreamSink
  channels: StreamSink[]
  returnPath: Readable | null
  finish(): Promise<void>
  discard(): Promise<string | void>
}

/** How a sink is made over an open target (ThreadedOutput for an fd; see src/transport/fd.ts). */
export interface SinkOptions {
  /** whether a chunk's whole ArrayBuffer may be handed over rather than copied */
  transferable?: (chunk: Buffer) => boolean
  /** gets back each handed-over chunk once written (for reuse) */
  returned?: (chunk: Buffer) => void
  /** queued bytes beyond which write() waits */
  queueLimit?: number
}
