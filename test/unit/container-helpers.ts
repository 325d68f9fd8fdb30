// Shared by the container, index, verify and restore suites: temp dirs, page content, an image
// written from a random page sequence with a model of what each page should read back as, and
// a sink that keeps what a load writes (capture, migration).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as assert from 'uvu/assert'
import type { PassThrough } from 'node:stream'
import type { RestoreImage } from '../../src/container/chain.js'
import type { OutgoingMigration, StreamSink } from '../../src/transport/types.js'
import { ImageWriter, type ImageSummary, type WriterOptions } from '../../src/container/writer.js'
import { PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO, type DeviceState, type RamBlockDecl, type StreamCounters } from '../../src/types.js'

export const PS = 4096

export function tempDir(tag: string): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), `snapctl-${tag}-`))
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) }
}

/** A small deterministic PRNG so that failures reproduce. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1
  return () => {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    return (s >>> 0) / 0x100000000
  }
}

/** Random, text-like or patterned page content. */
export function pageContent(rand: () => number): Buffer {
  const b = Buffer.allocUnsafe(PS)
  const kind = Math.floor(rand() * 3)
  if (kind === 0) for (let i = 0; i < PS; i++) b[i] = Math.floor(rand() * 256)
  else if (kind === 1) for (let i = 0; i < PS; i++) b[i] = 97 + ((i * 7 + Math.floor(rand() * 3)) % 26)
  else b.fill(Math.floor(rand() * 255) + 1).writeUInt32BE(Math.floor(rand() * 0xffffffff), Math.floor(rand() * (PS - 4)))
  return b
}

export function device(): DeviceState {
  const machine = 'pc-i440fx-10.0'
  const config = Buffer.concat([Buffer.from([0x07, 0, 0, 0, machine.length]), Buffer.from(machine)])
  return {
    machine, config, ramSectionId: 2, ramInstanceId: 0, ramVersion: 4, switchoverStart: false, ramEnd: true,
    deviceSections: Buffer.from('device sections, byte for byte'), streamEnd: Buffer.from([0x00, 0x06, 0, 0, 0, 2, 0x7b, 0x7d]),
  }
}

export function counters(): StreamCounters {
  return { pages: 0, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 }
}

export const BLOCKS: RamBlockDecl[] = [
  { name: 'pc.ram', size: 2 * 1024 * 1024 },
  { name: '0000:00:02.0/vga.vram', size: 256 * 1024 },
  { name: 'pc.rom', size: 64 * 1024 },
]

export type Model = Map<string, Buffer | 'zero'>
export const mkey = (b: number, p: number) => `${b}:${p}`

export interface MadeImage {
  path: string
  model: Model
  summary: ImageSummary
  blocks: RamBlockDecl[]
}

/**
 * Write `ops` random page operations (new pages, zero pages, re-sends of earlier pages) and
 * check readPage against the model as it goes.
 */
export async function makeImage(path: string, opts: WriterOptions & { ops?: number; seed?: number; resend?: number; blocks?: RamBlockDecl[] } = {}): Promise<MadeImage> {
  const rand = rng(opts.seed ?? 1)
  const blocks = opts.blocks ?? BLOCKS
  const w = await ImageWriter.create(path, { clusterSize: 65536, ...opts })
  w.setBlocks(blocks)
  const model: Model = new Map()
  const sent: Array<[number, number]> = []
  const scratch = Buffer.alloc(PS)
  const ops = opts.ops ?? 1500
  for (let i = 0; i < ops; i++) {
    let b: number
    let p: number
    if (sent.length > 0 && rand() < (opts.resend ?? 0.3)) [b, p] = sent[Math.floor(rand() * sent.length)]
    else {
      b = Math.floor(rand() * blocks.length)
      p = Math.floor(rand() * (blocks[b].size / PS) * 0.8)
      sent.push([b, p])
    }
    if (rand() < 0.15) {
      w.putZero(b, p)
      model.set(mkey(b, p), 'zero')
    } else {
      const data = pageContent(rand)
      w.putPage(b, p, data)
      model.set(mkey(b, p), data)
    }
    if (rand() < 0.1) {
      const [cb, cp] = sent[Math.floor(rand() * sent.length)]
      w.readPage(cb, cp, scratch)
      const want = model.get(mkey(cb, cp))
      if (!(want === 'zero' ? scratch.every((x) => x === 0) : want!.equals(scratch))) throw new Error(`readPage ${cb}:${cp} differs at op ${i}`)
    }
    if (w.needsDrain()) await w.drain()
  }
  const summary = await w.finish(device(), { source: 'qemu', counters: counters() })
  return { path, model, summary, blocks }
}

/**
 * Every page of every block of BLOCKS as `image` restores it (through its locator and clusters),
 * against the model. `neverAsZero`: a page never sent may read as zero (a mapped-ram file has
 * no "never sent").
 */
export function checkPages(image: RestoreImage, model: Model, what: string, neverAsZero = false): void {
  let data = 0
  BLOCKS.forEach((blk, b) => {
    for (let p = 0; p < blk.size / PS; p++) {
      const want = model.get(mkey(b, p))
      const l = image.locator.locate(b, p)
      if (want === undefined) assert.ok(l.state === PAGE_NEVER_SENT || (neverAsZero && l.state === PAGE_ZERO), `${what} ${b}:${p} never sent`)
      else if (want === 'zero') assert.is(l.state, PAGE_ZERO, `${what} ${b}:${p} zero`)
      else {
        assert.is(l.state, PAGE_DATA, `${what} ${b}:${p} data`)
        const c = image.readClusterSync(l.cluster!)
        assert.ok(c.raw.subarray(l.slot! * PS, (l.slot! + 1) * PS).equals(want), `${what} ${b}:${p} bytes`)
        data++
      }
    }
  })
  assert.ok(data > 0)
}

/** A sink that keeps a copy of everything written, and calls `onWrite` after each write. */
export function capture(onWrite: (all: () => Buffer) => void = () => {}): { sink: StreamSink; all: () => Buffer } {
  const chunks: Buffer[] = []
  let bytes = 0
  const all = () => Buffer.concat(chunks)
  const sink: StreamSink = {
    what: 'a test sink',
    get bytes() {
      return bytes
    },
    write: async (chunk, onWritten) => {
      chunks.push(Buffer.from(chunk))
      bytes += chunk.length
      onWritten?.()
      onWrite(all)
    },
    flush: async () => {},
    close: async () => {},
    abort: () => {},
  }
  return { sink, all }
}

export const migration = (main: StreamSink, returnPath: PassThrough | null = null): OutgoingMigration => ({
  main, channels: [], returnPath, finish: async () => {}, discard: async () => {},
})
