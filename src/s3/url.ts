// s3://BUCKET/KEY: told apart from a local path without loading the AWS SDK.
import { SnapError } from '../errors.js'

export interface S3Location {
  bucket: string
  key: string
  /** `s3://bucket/key`, for messages and as the image's name */
  url: string
}

export function isS3Url(path: string): boolean {
  return path.startsWith('s3://')
}

export function parseS3Url(url: string): S3Location {
  const m = /^s3:\/\/([^/]+)\/(.+)$/.exec(url)
  if (!m || !/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(m[1])) {
    throw new SnapError('SNAP_BAD_PATH', `${url}: an object is named s3://BUCKET/KEY (a bucket of 3-63 lowercase letters, digits, dots or dashes)`)
  }
  return { bucket: m[1], key: m[2], url }
}


/**
 * The host's cache for s3:// images (index, fetched blocks): `--cache-dir` and `--cache-max` of
 * the command, for every image it opens. Unset: $SNAPCTL_CACHE_DIR / $SNAPCTL_CACHE_MAX, then the defaults.
 */
export interface ObjectCacheSettings {
  dir?: string
  /** bytes; 0: no cache of fetched blocks */
  max?: number
}

let cacheSettings: ObjectCacheSettings = {}

export function setObjectCache(s: ObjectCacheSettings): void {
  cacheSettings = { ...s }
}

export function objectCache(): ObjectCacheSettings {
  return cacheSettings
}
