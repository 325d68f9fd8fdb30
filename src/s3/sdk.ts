// The AWS SDK's S3 client, loaded with require(): it is a CommonJS bundle, and importing it as
// an ES module first runs cjs-module-lexer over its ~1 MiB of code to find the export names,
// 50-70 ms more CPU at every start of a command that reads or writes s3:// (measured on Node 20).
import { createRequire } from 'node:module'
import type * as Sdk from '@aws-sdk/client-s3'

export const sdk = createRequire(import.meta.url)('@aws-sdk/client-s3') as typeof Sdk
