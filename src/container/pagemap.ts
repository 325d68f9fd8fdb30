// The writer's page map is the page locator (src/container/locator.ts); this name stays for
// code that imports it from here.
export { PageMap, LOC_ZERO as ZERO_LOC, ZERO_CLUSTER, type PageRun } from './locator.js'
