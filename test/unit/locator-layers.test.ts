// layered(): an image over its base answers each page from the first layer whose answer is not
// BASE ("as the base has it"): data, zero and never sent are answers of their own, never confused
// (container.md, "Incremental images").
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { layered, type PageLocation, type PageLookup } from '../../src/container/locator.js'
import { PAGE_BASE, PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO } from '../../src/types.js'

const layer = (pages: Record<number, PageLocation>): PageLookup => ({
  locate: (_block, page) => pages[page] ?? { state: PAGE_NEVER_SENT },
})

test('layered: the top layer first; zero and never sent are answers, base falls through', () => {
  const top = layer({ 0: { state: PAGE_DATA, cluster: 5, slot: 1 }, 1: { state: PAGE_ZERO }, 2: { state: PAGE_BASE }, 4: { state: PAGE_BASE } })
  const base = layer({ 0: { state: PAGE_DATA, cluster: 0, slot: 0 }, 1: { state: PAGE_DATA, cluster: 0, slot: 1 }, 2: { state: PAGE_DATA, cluster: 0, slot: 2 }, 3: { state: PAGE_DATA, cluster: 0, slot: 3 } })
  const chain = layered([top, base])
  assert.equal(chain.locate(0, 0), { state: PAGE_DATA, cluster: 5, slot: 1, layer: 0 })
  assert.equal(chain.locate(0, 1), { state: PAGE_ZERO, layer: 0 }, 'zero in the top layer hides the base data')
  assert.equal(chain.locate(0, 2), { state: PAGE_DATA, cluster: 0, slot: 2, layer: 1 }, 'base: asked of the base')
  assert.equal(chain.locate(0, 3), { state: PAGE_NEVER_SENT, layer: 0 }, 'never sent in the top layer: the base is not asked')
  assert.equal(chain.locate(0, 4), { state: PAGE_NEVER_SENT, layer: 1 }, 'base, and the base never sent it')
  assert.equal(layered([layer({ 0: { state: PAGE_BASE } })]).locate(0, 0), { state: PAGE_NEVER_SENT }, 'base with no base below')
  assert.equal(layered([]).locate(0, 0), { state: PAGE_NEVER_SENT })
})

test.run()
