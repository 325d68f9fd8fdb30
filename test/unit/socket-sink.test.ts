// SocketSink's end of stream: a destination that reads the last byte, finishes and closes before
// the flush and half-close (a lazy restore's main channel: QEMU completes on EOF) is not a
// failure (whether it took the stream whole is the return path's SHUT 0); a write after it is.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import { EventEmitter, once } from 'node:events'
import { SocketSink, connectWith } from '../../src/transport/socket.js'
import { tempDir } from './container-helpers.js'

const t = tempDir('socket-sink')
test.after(() => t.cleanup())
let n = 0

/** A sink to a server that reads `bytes` bytes and then closes its side; resolves once the sink saw the close. */
async function finishedPeer(bytes: number): Promise<{ sink: SocketSink; server: Server }> {
  const path = join(t.dir, `s${n++}.sock`)
  const accepted = new Promise<Socket>((resolve) => {
    const server = createServer((s) => resolve(s))
    server.listen(path)
    servers.push(server)
  })
  await once(servers[servers.length - 1], 'listening')
  const sock = await connectWith(path, Buffer.alloc(0), 'the main channel', 5000)
  const sink = new SocketSink(sock, 'the main channel', 5000)
  const peer = await accepted
  let got = 0
  const done = new Promise<void>((resolve) => peer.on('data', (d: Buffer) => { got += d.length; if (got >= bytes) resolve() }))
  await sink.write(Buffer.alloc(bytes, 7))
  await sink.flush()
  await done
  peer.destroy()
  await once(sock, 'close')
  return { sink, server: servers[servers.length - 1] }
}
const servers: Server[] = []
test.after(() => servers.forEach((s) => s.close()))

test('flush and close after a destination that took every byte and closed: no error', async () => {
  const { sink } = await finishedPeer(256 << 10)
  await sink.flush()
  await sink.close()
  assert.is(sink.bytes, 256 << 10)
})

test('a write after the peer closed fails either way', async () => {
  const { sink } = await finishedPeer(4096)
  try {
    await sink.write(Buffer.alloc(10))
    assert.unreachable('write should have failed')
  } catch (e) {
    assert.is((e as { code?: string }).code, 'SNAP_IO')
  }
})

/**
 * The window libuv leaves: the last bytes are in the kernel, the destination read them and closed,
 * and Node processed the close before the last write's callback, so writableLength still counts
 * them (a socket that stands for that moment: ended by the peer, destroyed, bytes "waiting", any
 * further write EPIPE). Seen once under load in postcopy-socket (SNAP_IO on a completed restore).
 */
function closedWithBytesWaiting(): Socket {
  const s = new EventEmitter() as unknown as Socket & EventEmitter
  Object.assign(s, { writableLength: 4096, destroyed: true, writableEnded: true })
  s.write = ((_c: unknown, cb?: (e?: Error) => void) => {
    const e = Object.assign(new Error('This socket has been ended by the other party'), { code: 'EPIPE' })
    process.nextTick(() => { cb?.(e); s.emit('error', e) })
    return false
  }) as Socket['write']
  s.end = ((cb?: () => void) => { process.nextTick(() => cb?.()); return s }) as Socket['end']
  s.destroy = (() => s) as Socket['destroy']
  return s
}

test('after lastQueued(), a destination that closed before the last write callback ran ends the stream without error', async () => {
  const sock = closedWithBytesWaiting()
  const sink = new SocketSink(sock, 'the main channel', 5000)
  sock.emit('close')
  sink.lastQueued()
  await sink.flush()
  await sink.close()
})

test('without lastQueued(), the same close with bytes waiting is SNAP_IO', async () => {
  const sock = closedWithBytesWaiting()
  const sink = new SocketSink(sock, 'the main channel', 5000)
  sock.emit('close')
  try {
    await sink.flush()
    assert.unreachable('flush should have failed')
  } catch (e) {
    assert.is((e as { code?: string }).code, 'SNAP_IO')
  }
})

test.run()
