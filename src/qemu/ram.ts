// What a destination QEMU's RAM looks like, and whether an image fits it: checked before
// anything is sent, because QEMU finds a missing or resized block only in the middle of the
// stream, and a RAM backend that cannot do postcopy only when the VM already depends on it.
import { statfs } from 'node:fs/promises'
import { dirname } from 'node:path'
import { SnapError } from '../errors.js'
import type { QmpClient } from './qmp.js'

export interface DestinationBlock {
  name: string
  /** host page size of the block */
  pageSize: number
  /** used length: what the source's MEM_SIZE list must say */
  used: number
  /** max length: a resizeable block (used < total) takes any size up to this */
  total: number
}

const UNITS: Record<string, number> = { B: 1, KiB: 1 << 10, MiB: 1 << 20, GiB: 1 << 30, TiB: 2 ** 40 }

/**
 * Parses HMP `info ramblock` (QEMU 4 to 10):
 *
 *                 Block Name    PSize              Offset               Used              Total                HVA  RO
 *                        mem    4 KiB  0x0000000000000000 0x0000000004000000 0x0000000004000000 0x00007f6627fff000  rw
 *      0000:00:02.0/vga.vram    4 KiB  0x0000000004080000 0x0000000001000000 0x0000000001000000 0x00007f6670400000  rw
 */
export function parseRamblocks(text: string): DestinationBlock[] {
  const blocks: DestinationBlock[] = []
  for (const line of text.split(/\r?\n/)) {
    const m = /^\s*(.+?)\s+(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)/i.exec(line)
    if (!m) continue
    blocks.push({ name: m[1], pageSize: Math.round(Number(m[2]) * UNITS[m[3]]), used: Number.parseInt(m[5], 16), total: Number.parseInt(m[6], 16) })
  }
  return blocks
}

export async function destinationBlocks(qmp: QmpClient): Promise<DestinationBlock[]> {
  const text = await qmp.execute<string>('human-monitor-command', { 'command-line': 'info ramblock' })
  const blocks = parseRamblocks(text)
  if (blocks.length === 0) throw new SnapError('SNAP_QMP', `cannot read the destination's RAM blocks from "info ramblock": ${JSON.stringify(text.slice(0, 200))}`)
  return blocks
}

const mib = (n: number): string => (n % (1 << 20) === 0 ? `${n / (1 << 20)} MiB` : `${n} bytes`)

/**
 * SNAP_RAM_MISMATCH when a block of the image is missing at the destination or has another
 * size there (a resizeable block takes any size up to its maximum, as QEMU resizes it).
 * Returns the destination's blocks the image lacks (QEMU leaves them as they are: worth a
 * note, not a refusal).
 */
export function checkBlocks(image: Array<{ name: string; size: number }>, dest: DestinationBlock[]): string[] {
  const byName = new Map(dest.map((b) => [b.name, b]))
  const problems: string[] = []
  for (const b of image) {
    const d = byName.get(b.name)
    if (!d) problems.push(`block ${b.name} (${mib(b.size)}) is missing`)
    else if (b.size !== d.used && !(d.total > d.used && b.size <= d.total)) problems.push(`block ${b.name} is ${mib(d.used)} there, ${mib(b.size)} in the image`)
  }
  if (problems.length > 0) {
    throw new SnapError('SNAP_RAM_MISMATCH', `the destination's RAM does not match the image: ${problems.join('; ')}; start it with the same machine, memory size and devices as the saved VM`, { problems })
  }
  const names = new Set(image.map((b) => b.name))
  return dest.filter((d) => !names.has(d.name)).map((d) => d.name)
}

/**
 * `load --postcopy --host-page-size` for the destination's hugepage-backed blocks of the image
 * (postcopy places whole host pages), e.g. "mem=2097152"; undefined when every block has 4 KiB pages.
 */
export function hostPageSizes(image: Array<{ name: string; pageSize: number }>, dest: DestinationBlock[]): string | undefined {
  const parts: string[] = []
  for (const b of image) {
    const d = dest.find((x) => x.name === b.name)
    if (d && d.pageSize !== b.pageSize) parts.push(`${b.name}=${d.pageSize}`)
  }
  return parts.length > 0 ? parts.join(',') : undefined
}

const TMPFS_MAGIC = 0x01021994
const HUGETLBFS_MAGIC = 0x958458f6
const FS_NAMES: Record<number, string> = { 0xef53: 'ext2/3/4', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x794c7630: 'overlayfs', 0x6969: 'nfs', 0x858458f6: 'ramfs' }

/**
 * SNAP_POSTCOPY_SETUP when a memory backend of the destination cannot take pages on demand:
 * userfaultfd only works on anonymous memory, tmpfs/shmem (memfd) and hugetlbfs, so a
 * memory-backend-file must have its mem-path on tmpfs (/dev/shm) or hugetlbfs. Backends whose
 * path cannot be examined from here (another mount namespace) are left to QEMU.
 */
export async function checkPostcopyBackends(qmp: QmpClient, log?: (msg: string) => void): Promise<void> {
  const memdevs = await qmp.execute<Array<{ id?: string; size: number; share?: boolean }>>('query-memdev')
  for (const m of memdevs) {
    if (!m.id) continue
    const path = `/objects/${m.id}`
    const type = await qmp.execute<string>('qom-get', { path, property: 'type' }).catch(() => undefined)
    if (type !== 'memory-backend-file') continue
    const memPath = await qmp.execute<string>('qom-get', { path, property: 'mem-path' })
    let fsType: number
    try {
      fsType = Number((await statfs(memPath)).type)
    } catch {
      // A mem-path that is a file QEMU created and unlinked, or one we cannot see: try its directory.
      try {
        fsType = Number((await statfs(dirname(memPath))).type)
      } catch {
        log?.(`cannot examine ${memPath} (memory backend ${m.id}): QEMU will say whether it can do postcopy`)
        continue
      }
    }
    if (fsType !== TMPFS_MAGIC && fsType !== HUGETLBFS_MAGIC) {
      const fs = FS_NAMES[fsType] ?? `filesystem type 0x${fsType.toString(16)}`
      throw new SnapError(
        'SNAP_POSTCOPY_SETUP',
        `memory backend ${m.id} is a file on ${fs} (mem-path=${memPath}): a lazy restore needs the destination's RAM on tmpfs or hugetlbfs; start the destination with mem-path on /dev/shm (or use memory-backend-ram or -memfd), or restore without --lazy`,
        { memdev: m.id, memPath },
      )
    }
  }
}
