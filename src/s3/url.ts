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

