// The stream writer's building blocks in one import: the exact bytes of the file header, the ram
// section headers and footers, page records (§2.2, §2.4) and commands (§5.1), per the reference
// (/work/shared/reference/qemu-migration-stream.md). Each lives with its decoder, one module per
// wire structure: file-header.ts, section.ts, page-record.ts, command.ts.

import type { DeviceState } from '../types.js'
import { switchoverStart } from './command.js'
import { eosFooter, sectionEndHeader } from './section.js'

export { fileHeader } from './file-header.js'
export { eosFooter, ramStartSection, sectionEndHeader, sectionPartHeader, type SectionIds } from './section.js'
export { DEFAULT_CHUNK_SIZE, PAGE_HEADER_MAX, PageRecordWriter } from './page-record.js'
export {
  openReturnPath,
  packaged,
  ping,
  postcopyAdvise,
  postcopyListen,
  postcopyRamDiscard,
  postcopyResume,
  postcopyRun,
  recvBitmap,
  switchoverStart,
} from './command.js'

/**
 * What follows the last page record's section of a restored stream, as the source sent it:
 * SWITCHOVER_START, the ram END section (EOS only), the device sections and the stream's end.
 */
export function streamEnding(d: DeviceState): Buffer[] {
  const id = d.ramSectionId
  const parts: Buffer[] = []
  if (d.switchoverStart) parts.push(switchoverStart())
  if (d.ramEnd) parts.push(sectionEndHeader(id), eosFooter(id))
  parts.push(d.deviceSections, d.streamEnd)
  return parts
}
