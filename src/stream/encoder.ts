// The stream writer's building blocks in one import: the exact bytes of the file header, the ram
// section headers and footers, page records (§2.2, §2.4) and commands (§5.1), per the reference
// (/work/shared/reference/qemu-migration-stream.md). Each lives with its decoder, one module per
// wire structure: file-header.ts, section.ts, page-record.ts, command.ts.

export { fileHeader } from './file-header.js'
export { eosFooter, ramStartSection, sectionEndHeader, sectionPartHeader, type SectionIds } from './section.js'
export { DEFAULT_CHUNK_SIZE, PageRecordWriter } from './page-record.js'
export {
  openReturnPath,
  packaged,
  ping,
  postcopyAdvise,
  postcopyListen,
  postcopyRamDiscard,
  postcopyRun,
  switchoverStart,
} from './command.js'
