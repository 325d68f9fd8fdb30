// Object storage (issue 16): `s3://BUCKET/KEY` images, read by ranged GETs and written by
// multipart upload, with the standard client (@aws-sdk/client-s3) configured the usual way:
// endpoint, region and credentials from AWS_* environment variables and ~/.aws files. Path-style
// addressing where an endpoint is given (S3-compatible stores) or SNAPCTL_S3_PATH_STYLE=1.
// Credentials never appear in messages: errors are built here from the status and S3's error
// name, never from the SDK's text.
import type { S3Client, S3ClientConfig } from '@aws-sdk/client-s3'
import { setTimeout as sleep } from 'node:timers/promises'
import { SnapError, type ErrorCode } from '../errors.js'

import { sdk } from './sdk.js'
import type { S3Location } from './url.js'

export { isS3Url, parseS3Url, type S3Location } from './url.js'

let shared: S3Client | undefined

/** One client per process: endpoint, region and credentials the SDK's usual way. */
export function s3Client(): S3Client {
  if (shared) return shared
  // The SDK's note about future Node versions is not for snapctl's users (and must not reach load's stderr as noise).
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'
  const env = process.env
  const endpointGiven = Boolean(env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL)
  const config: S3ClientConfig = {
    forcePathStyle: env.SNAPCTL_S3_PATH_STYLE ? env.SNAPCTL_S3_PATH_STYLE === '1' : endpointGiven,
    // S3-compatible stores (RADOS Gateway 16.2) refuse the SDK's default streaming checksums.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: 1, // retries are ours (withRetry): bounded in total time, never for 403/404/412
    // A store that stops reading or answering (seen: RADOS Gateway with a full OSD) is a timeout,
    // retried like a dropped connection, not a hang: no byte moving for this long.
    requestHandler: { connectionTimeout: 10_000, requestTimeout: idleTimeoutMs() },
  }
  if (!env.AWS_REGION && !env.AWS_DEFAULT_REGION && !env.AWS_PROFILE && endpointGiven) config.region = 'us-east-1'
  shared = new sdk.S3Client(config)
  return shared
}

interface SdkError {
  name?: string
  code?: string
  $metadata?: { httpStatusCode?: number }
  $retryable?: unknown
  message?: string
}

const RETRY_NAMES = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout', 'RequestTimeTooSkewed', 'InternalError', 'ServiceUnavailable', 'TimeoutError', 'RequestTimeoutException'])
const NET_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ENOTFOUND', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_SOCKET'])

/** Throttling, 5xx and dropped connections are worth another try; anything else is final. */
export function retryable(err: unknown): boolean {
  const e = err as SdkError
  const status = e?.$metadata?.httpStatusCode
  if (status === 429 || (status !== undefined && status >= 500)) return true
  if (status !== undefined) return false
  return RETRY_NAMES.has(e?.name ?? '') || NET_CODES.has(e?.code ?? '') || NET_CODES.has(e?.name ?? '') || e?.$retryable !== undefined
}

/** A final S3 failure as a SnapError with a stable code (format-spec/errors.md). */
export function s3Error(err: unknown, loc: S3Location, what: string): SnapError {
  if (err instanceof SnapError) return err
  const e = err as SdkError
  const status = e?.$metadata?.httpStatusCode
  const name = e?.name ?? 'Error'
  let code: ErrorCode = 'SNAP_OBJECT_UNAVAILABLE'
  let msg: string
  if (name === 'NoSuchBucket') {
    code = 'SNAP_OBJECT_NOT_FOUND'
    msg = `the bucket ${loc.bucket} does not exist`
  } else if (name === 'NoSuchKey' || name === 'NotFound' || status === 404) {
    code = 'SNAP_OBJECT_NOT_FOUND'
    msg = `no object ${loc.url}`
  } else if (status === 403 || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || name === 'AccessDenied') {
    code = 'SNAP_OBJECT_DENIED'
    msg = `access to ${loc.url} was refused (${name}): check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws) and the bucket's permissions`
  } else if (status === 412 || name === 'PreconditionFailed') {
    code = 'SNAP_OBJECT_CHANGED'
    msg = `${loc.url} was replaced while it was being read: its ETag changed (nothing from the new object was used)`
  } else if (/region/i.test(String(e?.message)) && status === undefined) {
    code = 'SNAP_OBJECT_CONFIG'
    msg = 'no region is configured for object storage: set AWS_REGION (or a region in ~/.aws/config)'
  } else if (/credential/i.test(String(e?.message)) && status === undefined) {
    code = 'SNAP_OBJECT_CONFIG'
    msg = 'no credentials for object storage: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials'
  } else {
    msg = `object storage failed (${status !== undefined ? `HTTP ${status} ` : ''}${name}${e?.code && e.code !== name ? ` ${e.code}` : ''})`
  }
  return new SnapError(code, `${what}: ${msg}`, { cause: err, status, s3: name })
}

/** A request with no byte moving for this long fails (and is retried): SNAPCTL_S3_IDLE_MS, default 30 s. */
function idleTimeoutMs(): number {
  const v = Number(process.env.SNAPCTL_S3_IDLE_MS)
  return Number.isFinite(v) && v > 0 ? v : 30_000
}

/** Total time a request may spend on retries: SNAPCTL_S3_RETRY_MS, default 60 s. */
export function retryBudgetMs(): number {
  const v = Number(process.env.SNAPCTL_S3_RETRY_MS)
  return Number.isFinite(v) && v >= 0 ? v : 60_000
}

/**
 * Runs `fn` until it succeeds, retrying what `retryable` allows with full-jitter exponential
 * backoff (100 ms doubling to 5 s), for at most `retryBudgetMs()` in all; then SNAP_OBJECT_UNAVAILABLE.
 */
export async function withRetry<T>(loc: S3Location, what: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  const deadline = Date.now() + retryBudgetMs()
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn()
    } catch (e) {
      if (!retryable(e) || signal?.aborted) throw s3Error(e, loc, what)
      const wait = Math.random() * Math.min(5000, 100 * 2 ** attempt)
      if (Date.now() + wait > deadline) {
        const last = s3Error(e, loc, what)
        throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${last.message}; gave up after ${attempt + 1} attempts in ${Math.round(retryBudgetMs() / 1000)} s`, { cause: e, attempts: attempt + 1 })
      }
      await sleep(wait)
    }
  }
}
