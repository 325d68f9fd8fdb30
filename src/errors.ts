// Every error snapctl raises is a SnapError with a stable `code`. Codes never change meaning;
// messages may be reworded. format-spec/errors.md lists every code and its exit status, and
// test/unit/errors.test.ts checks that the two lists agree.

export const ERROR_CODES = {
  // usage and files (exit 2, 5, 6)
  SNAP_USAGE: 2,
  SNAP_NOT_FOUND: 2,
  SNAP_BAD_PATH: 2,
  SNAP_TERMINAL: 2,
  SNAP_EXISTS: 5,
  SNAP_LOCKED: 5,
  SNAP_IO: 6,
  SNAP_NO_SPACE: 6,
  // the image (exit 3)
  SNAP_BAD_MAGIC: 3,
  SNAP_UNSUPPORTED_VERSION: 3,
  SNAP_UNSUPPORTED_FEATURE: 3,
  SNAP_UNSUPPORTED_CODEC: 3,
  SNAP_TRUNCATED: 3,
  SNAP_INCOMPLETE: 3,
  SNAP_CHECKSUM: 3,
  SNAP_CORRUPT: 3,
  SNAP_TOO_LARGE: 3,
  SNAP_NO_PAGE: 3,
  SNAP_BASE_MISSING: 3,
  SNAP_BASE_CHANGED: 3,
  SNAP_BASE_LOOP: 3,
  SNAP_BASE_MISMATCH: 3,
  // the page index (exit 7)
  SNAP_INDEX_CORRUPT: 7,
  SNAP_INDEX_MISMATCH: 7,
  // the QEMU migration stream (exit 4)
  SNAP_STREAM_BAD_MAGIC: 4,
  SNAP_STREAM_VERSION: 4,
  SNAP_STREAM_TRUNCATED: 4,
  SNAP_STREAM_CORRUPT: 4,
  SNAP_STREAM_UNSUPPORTED: 4,
  SNAP_STREAM_TOO_LARGE: 4,
  SNAP_LIBVIRT_INCOMPLETE: 4,
  SNAP_MAPPED_RAM_BOUNDS: 4,
  // multifd channels (exit 4)
  SNAP_MULTIFD_BAD_MAGIC: 4,
  SNAP_MULTIFD_CORRUPT: 4,
  SNAP_MULTIFD_TOO_LARGE: 4,
  SNAP_MULTIFD_BAD_PAGE: 4,
  SNAP_MULTIFD_UUID: 4,
  SNAP_MULTIFD_TRUNCATED: 4,
  SNAP_CHANNEL_TIMEOUT: 4,
  // lazy restore and the return path (exit 8)
  SNAP_POSTCOPY_SETUP: 8,
  SNAP_RETURN_PATH: 8,
  SNAP_BAD_REQUEST: 8,
  SNAP_NO_DESTINATION: 8,
  SNAP_RECV_BITMAP: 8,
  // QEMU and the VM: save and restore over QMP (exit 10)
  SNAP_QMP: 10,
  SNAP_QEMU_GONE: 10,
  SNAP_VM_STATE: 10,
  SNAP_MIGRATION_ACTIVE: 10,
  SNAP_MIGRATION_SETTINGS: 10,
  SNAP_MIGRATION_FAILED: 10,
  SNAP_RAM_MISMATCH: 10,
  SNAP_POSTCOPY_PAUSED: 10,
  SNAP_NOT_PAUSED: 10,
  // object storage: s3://BUCKET/KEY images (exit 11)
  SNAP_OBJECT_CONFIG: 11,
  SNAP_OBJECT_DENIED: 11,
  SNAP_OBJECT_NOT_FOUND: 11,
  SNAP_OBJECT_CHANGED: 11,
  SNAP_OBJECT_UNAVAILABLE: 11,
  // the process (exit 9, 1)
  SNAP_ABORTED: 9,
  SNAP_INTERNAL: 1,
} as const

export type ErrorCode = keyof typeof ERROR_CODES

export interface SnapErrorDetails {
  cause?: unknown
  /** file offset the problem was found at, where there is one */
  offset?: number
  /** data cluster number (file order), where there is one */
  cluster?: number
  [key: string]: unknown
}

export class SnapError extends Error {
  readonly code: ErrorCode
  /** where and what (named `context`, not `details`: uvu prints `details` of a failed assertion as a diff) */
  readonly context: SnapErrorDetails

  constructor(code: ErrorCode, message: string, details: SnapErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause })
    this.name = 'SnapError'
    this.code = code
    this.context = details
  }

  get exitCode(): number {
    return ERROR_CODES[this.code]
  }

  toJSON(): Record<string, unknown> {
    const { cause, ...rest } = this.context
    return { code: this.code, message: this.message, ...rest }
  }
}

export function isSnapError(err: unknown, code?: ErrorCode): err is SnapError {
  return err instanceof SnapError && (code === undefined || err.code === code)
}

/** Map a Node system error (fs, child process) to a SnapError; keep SnapErrors as they are. */
export function fromSystemError(err: unknown, what: string): SnapError {
  if (err instanceof SnapError) return err
  const e = err as NodeJS.ErrnoException
  switch (e?.code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return new SnapError('SNAP_NO_SPACE', `${what}: no space left on the device`, { cause: err })
    case 'ENOENT':
      return new SnapError('SNAP_NOT_FOUND', `${what}: no such file`, { cause: err })
    case 'EEXIST':
      return new SnapError('SNAP_EXISTS', `${what}: already exists (use --force to replace it)`, { cause: err })
    default:
      return new SnapError('SNAP_IO', `${what}: ${e?.message ?? String(err)}`, { cause: err })
  }
}
