// Postcopy over a unix socket (`load --postcopy --connect unix:PATH`): the main connection
// carries the stream one way and QEMU's return path the other; a second connection, the
// postcopy-preempt channel, carries only the pages the destination asked for, so that they
// never wait behind the background push (qemu-multifd-peer.md §9).
//
//   main:    connected first. With postcopy on, the destination does not peek: the first
//            connection it accepts is the main channel (§9.2).
//   preempt: connected by openPreempt(), after the destination has answered a PING on the
//            return path (so the main one was accepted first) and before PACKAGED (QEMU
//            waits for it there). No header, no EOS: page records, then close (§9.3), once
//            the destination has said SHUT(0).
import { SocketSink, channelTimeout, connectWith, unixPath } from './socket.js'
import type { OutgoingMigration, StreamSink } from './types.js'

export interface PostcopyOutgoing extends OutgoingMigration {
  /** Connects the preempt channel (once; later calls return the same one). */
  openPreempt(): Promise<StreamSink>
  /**
   * After EOF: half-close the main channel. The destination sees the end of the stream and
   * answers SHUT(0) on the return path, which stays open. The preempt channel stays open until
   * finish(): the destination takes its end before its own cleanup for a broken channel and
   * pauses the migration (postcopy-paused).
   */
  endStream(): Promise<void>
}

export async function socketPostcopyOutgoing(uri: string, opts: { timeoutMs?: number } = {}): Promise<PostcopyOutgoing> {
  const path = unixPath(uri)
  const timeoutMs = channelTimeout(opts.timeoutMs)
  const mainSocket = await connectWith(path, Buffer.alloc(0), 'the main channel', timeoutMs)
  const main = new SocketSink(mainSocket, 'the main channel', timeoutMs)
  let preempt: SocketSink | null = null
  let ended: Promise<void> | null = null
  const endStream = (): Promise<void> => (ended ??= main.close())
  return {
    main,
    channels: [],
    returnPath: mainSocket,
    async openPreempt() {
      preempt ??= new SocketSink(await connectWith(path, Buffer.alloc(0), 'the postcopy-preempt channel', timeoutMs), 'the postcopy-preempt channel', timeoutMs)
      return preempt
    },
    endStream,
    // By now every answer on the preempt channel was flushed (before END) and the destination
    // has finished, and may have closed it already: just let it go.
    finish: async () => {
      await endStream()
      preempt?.abort()
    },
    discard: async () => {
      preempt?.abort()
      main.abort()
    },
  }
}
