// layered(): an image over its base answers each page from the first layer that has it, zero
// and data alike; NEVER_SENT only when no layer has it (what incremental images will build on).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { layered, type PageLocation, type PageLookup } from '../../src/container/locator.js'
import { PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO } from '../../src/types.js'

const layer = (pages: Record<number, PageLocation>): PageLookup => ({
  locate: (_block, page) => pages[page] ?? { state: PAGE_NEVER_SENT },
})

test('layered: the top layer first, zero is an answer, never sent falls through', () => {
  const top = layer({ 0: { state: PAGE_DATA, cluster: 5, slot: 1 }, 1: { state: PAGE_ZERO } })
  const base = layer({ 0: { state: PAGE_DATA, cluster: 0, slot: 0 }, 1: { state: PAGE_DATA, cluster: 0, slot: 1 }, 2: { state: PAGE_DATA, cluster: 0, slot: 2 } })
  const chain = layered([top, base])
  assert.equal(chain.locate(0, 0), { state: PAGE_DATA, cluster: 5, slot: 1, layer: 0 })
  assert.equal(chain.locate(0, 1), { state: PAGE_ZERO, layer: 0 }, 'zero in the top layer hides the base data')
  assert.equal(chain.locate(0, 2), { state: PAGE_DATA, cluster: 0, slot: 2, layer: 1 })
  assert.equal(chain.locate(0, 3), { state: PAGE_NEVER_SENT })
  assert.equal(layered([]).locate(0, 0), { state: PAGE_NEVER_SENT })
})

test.run()
