// format-spec/errors.md and src/errors.ts are the same list: every code, with the same exit status.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ERROR_CODES } from '../../src/errors.js'

const spec = readFileSync(join(dirname(fileURLToPath(import.meta.url)), '../../../format-spec/errors.md'), 'utf8')

test('every code in src/errors.ts is in format-spec/errors.md with the same exit status, and no other', () => {
  const table = new Map<string, number>()
  for (const m of spec.matchAll(/^\| (SNAP_[A-Z_]+) \| (\d+) \|/gm)) {
    assert.not.ok(table.has(m[1]), `${m[1]} twice in errors.md`)
    table.set(m[1], Number(m[2]))
  }
  assert.equal(Object.fromEntries([...table].sort()), Object.fromEntries(Object.entries(ERROR_CODES).sort()))
})

test.run()
