// snapctl's addon (native/lz4: liblz4 into caller-owned buffers, CRC-32, writev of segments),
// built by `npm run build`: loaded once, on first use; null where it is not built (callers then
// take their JavaScript way).
import { createRequire } from 'node:module'

let addon: unknown
let tried = false

export function nativeAddon<T>(): T | null {
  if (!tried) {
    tried = true
    try {
      addon = createRequire(import.meta.url)('snapctl-lz4')
    } catch {
      addon = null
    }
  }
  return addon as T | null
}
