// The RamSink that puts a parsed stream's pages into an image being written: what create does
// with QEMU's stream and with a mapped-ram file's records alike.
import type { ImageWriter } from './container/writer.js'
import { xbzrleDecode } from './stream/xbzrle.js'
import type { RamSink } from './types.js'

/** XBZRLE deltas are applied to the page's current copy, read back from the writer. */
export function writerSink(writer: ImageWriter): RamSink {
  const scratch = Buffer.alloc(4096)
  return {
    blocks: (list) => writer.setBlocks(list),
    zero: (block, page) => writer.putZero(block, page),
    page: (block, page, data) => writer.putPage(block, page, data),
    xbzrle: (block, page, encoded) => {
      writer.readPage(block, page, scratch)
      xbzrleDecode(encoded, scratch)
      writer.putPage(block, page, scratch)
    },
  }
}
