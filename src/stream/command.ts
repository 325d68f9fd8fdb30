// Commands (reference §1.7, §5.1): 0x08, u16 command, u16 payload length, payload. The encoders
// a restore writes, and the decision create makes on a command it reads: only SWITCHOVER_START
// belongs in a stream it can store.

import { SnapError } from '../errors.js'
import { Writer } from '../bytes.js'
import type { ChunkReader } from './chunk-reader.js'
import * as C from './constants.js'

function command(cmd: number, payload: number): Writer {
  return Writer.alloc(5 + payload).u8(C.QEMU_VM_COMMAND).u16(cmd).u16(payload)
}

export const openReturnPath = (): Buffer => command(C.MIG_CMD_OPEN_RETURN_PATH, 0).done()
export const ping = (value: number): Buffer => command(C.MIG_CMD_PING, 4).u32(value).done()
export const postcopyAdvise = (hostPageSizeSummary: number, targetPageSize = C.TARGET_PAGE_SIZE): Buffer =>
  command(C.MIG_CMD_POSTCOPY_ADVISE, 16).u64(hostPageSizeSummary).u64(targetPageSize).done()
export const postcopyListen = (): Buffer => command(C.MIG_CMD_POSTCOPY_LISTEN, 0).done()
export const postcopyRun = (): Buffer => command(C.MIG_CMD_POSTCOPY_RUN, 0).done()
/** §5.2: the PACKAGED command; the `blobLength` bytes of the package must follow it. */
export const packaged = (blobLength: number): Buffer => command(C.MIG_CMD_PACKAGED, 4).u32(blobLength).done()
/** §5.1 POSTCOPY_RAM_DISCARD: version 0, block name, 0 terminator, 1 to 12 (start, length) byte ranges. */
export function postcopyRamDiscard(block: string, ranges: Array<[start: number, length: number]>): Buffer {
  if (ranges.length < 1 || ranges.length > 12) throw new SnapError('SNAP_INTERNAL', `${ranges.length} discard ranges`)
  const name = Buffer.from(block, 'latin1')
  const w = command(C.MIG_CMD_POSTCOPY_RAM_DISCARD, 3 + name.length + 16 * ranges.length).u8(0).str8(block).u8(0)
  for (const [start, length] of ranges) w.u64(start).u64(length)
  return w.done()
}
export const switchoverStart = (): Buffer => command(C.MIG_CMD_SWITCHOVER_START, 0).done()
/** Postcopy recovery: ask for a RAM block's received bitmap (str8 name; the length counts the length byte). */
export function recvBitmap(block: string): Buffer {
  const n = Buffer.byteLength(block, 'latin1')
  if (n < 1 || n > 255) throw new SnapError('SNAP_INTERNAL', `RAM block name of ${n} bytes`)
  return command(C.MIG_CMD_RECV_BITMAP, 1 + n).str8(block).done()
}
/** Postcopy recovery: the source is ready; the destination answers RESUME_ACK(1). */
export const postcopyResume = (): Buffer => command(C.MIG_CMD_POSTCOPY_RESUME, 0).done()

const RETURN_PATH_HINT =
  'return path / postcopy capability on the source is not supported by create; turn off capabilities return-path and postcopy-ram'

/** A command's 4 bytes at rb[rp] (after 0x08): returns for SWITCHOVER_START, throws for anything else. */
export function decodeCommand(r: ChunkReader): void {
  const cmd = r.rb.readUInt16BE(r.rp)
  const len = r.rb.readUInt16BE(r.rp + 2)
  if (cmd === C.MIG_CMD_SWITCHOVER_START) {
    if (len !== 0) throw r.fail('SNAP_STREAM_CORRUPT', `SWITCHOVER_START command with ${len} payload bytes`)
    return
  }
  const name = C.MIG_CMD_NAMES[cmd]
  if (name === undefined || cmd === C.MIG_CMD_INVALID) throw r.fail('SNAP_STREAM_CORRUPT', `unknown command ${cmd}`)
  if (cmd === C.MIG_CMD_ENABLE_COLO) throw r.fail('SNAP_STREAM_UNSUPPORTED', 'COLO (command ENABLE_COLO) is not supported')
  if (cmd === C.MIG_CMD_POSTCOPY_ADVISE && len === 0) {
    throw r.fail('SNAP_STREAM_UNSUPPORTED', 'dirty-bitmap migration (capability dirty-bitmaps) is not supported by create; turn it off')
  }
  throw r.fail('SNAP_STREAM_UNSUPPORTED', `command ${name}: ${RETURN_PATH_HINT}`)
}
