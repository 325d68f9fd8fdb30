// SocketSink's end of stream: a destination that reads the last byte, finishes and closes before
// the flush and half-close (a lazy restore's main channel: QEMU completes on EOF) is not a
// failure (whether it took the stream whole is the return path's SHUT 0); a write after it is.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import { once } from 'node:events'
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

test.run()
