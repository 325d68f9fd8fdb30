// What storing identical pages once costs and saves (format-spec/container.md, "Shared slots"):
// one QEMU stream (the bench's RAM mix, or the Linux test guest), then `create --from` with and
// without --dedupe, alternated, each run timed by /usr/bin/time (wall, user+sys CPU, peak RSS).
// Usage: node dist/tools/bench/dedupe.js [--size 1G] [--linux] [--repeat 5] [--dir /var/tmp]
import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { fillRam, Vm } from '../vm.js'
import { LINUX_CMDLINE, SerialLog, linuxGuest } from '../linux-guest.js'
import { SNAPCTL_BIN } from '../../test/snapctl.js'

const { values } = parseArgs({
  options: { size: { type: 'string', default: '1G' }, linux: { type: 'boolean' }, repeat: { type: 'string', default: '5' }, dir: { type: 'string', default: '/var/tmp' } },
})
const MiB = 1 << 20
const sizeMiB = values.linux ? 512 : parseInt(values.size!, 10) * (values.size!.toUpperCase().endsWith('G') ? 1024 : 1)
const repeat = Math.max(5, parseInt(values.repeat!, 10))
const dir = mkdtempSync(join(values.dir!, 'snapctl-dedupe-'))

interface Run { wall: number; cpu: number; rssMiB: number; fileBytes: number; sharedPages: number; storedPages: number }

async function makeStream(): Promise<string> {
  const stream = join(dir, 'vm.stream')
  let vm: Vm
  if (values.linux) {
    const { kernel, initrd } = linuxGuest()
    vm = await Vm.start({
      name: 'dd-linux', memMiB: 512, machine: 'q35', kernel, initrd, append: LINUX_CMDLINE, paused: false, dir,
      extraArgs: ['-smp', '2', '-no-reboot', '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0', '-device', 'virtio-rng-pci', '-device', 'virtio-balloon-pci'],
    })
    const log = new SerialLog(vm.logPath)
    await log.waitFor(/^READY /, 180_000)
    await log.waitHeartbeats(2, 30_000)
    await vm.qmp.execute('stop')
  } else {
    const ram = join(dir, 'vm.ram')
    await fillRam(ram, sizeMiB * MiB, { seed: 1 })
    vm = await Vm.start({ name: 'dd-mix', memMiB: sizeMiB, memPath: ram, keepMem: false, dir })
  }
  await vm.migrate(`file:${stream}`)
  const done = await vm.waitMigration({ timeoutMs: 600_000 })
  if (done.status !== 'completed') throw new Error(`migration ${done.status}`)
  await vm.quit()
  return stream
}

function create(stream: string, dedupe: boolean): Run {
  const out = join(dir, dedupe ? 'a.snap' : 'b.snap')
  const args = ['-f', '%e %U %S %M', process.execPath, SNAPCTL_BIN, 'create', out, '--from', stream, '--force', '--json', ...(dedupe ? ['--dedupe'] : [])]
  const r = spawnSync('/usr/bin/time', args, { encoding: 'utf8', maxBuffer: 64 * MiB })
  if (r.status !== 0) throw new Error(`create failed: ${r.stderr}`)
  const [wall, user, sys, rssKiB] = r.stderr.trim().split('\n').pop()!.split(' ').map(Number)
  const s = JSON.parse(r.stdout)
  rmSync(`${out}.index`, { recursive: true, force: true })
  return { wall, cpu: user + sys, rssMiB: rssKiB / 1024, fileBytes: s.fileBytes, sharedPages: s.sharedPages, storedPages: s.storedPages }
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const fmt = (xs: number[], d = 2): string => `${median(xs).toFixed(d)} (${Math.min(...xs).toFixed(d)}-${Math.max(...xs).toFixed(d)})`

try {
  const stream = await makeStream()
  const runs: Record<'on' | 'off', Run[]> = { on: [], off: [] }
  create(stream, true) // warm the page cache with the stream
  for (let i = 0; i < repeat; i++) {
    for (const v of i % 2 ? (['off', 'on'] as const) : (['on', 'off'] as const)) runs[v].push(create(stream, v === 'on'))
  }
  console.log(`create --from, ${values.linux ? 'Linux guest, 512 MiB (q35, booted, memwork running, stopped)' : `bench mix random=40,text=20,pattern=15,zero=25, ${sizeMiB} MiB`}; ${repeat} alternated runs each; medians (min-max); machine shared with other work`)
  for (const v of ['on', 'off'] as const) {
    const r = runs[v]
    console.log(`dedupe ${v.padEnd(3)}: wall ${fmt(r.map((x) => x.wall))} s, CPU user+sys ${fmt(r.map((x) => x.cpu))} s, peak RSS ${fmt(r.map((x) => x.rssMiB), 0)} MiB, ` +
      `image ${r[0].fileBytes} bytes, stored pages ${r[0].storedPages}, shared ${r[0].sharedPages}`)
  }
  const saved = runs.off[0].fileBytes - runs.on[0].fileBytes
  console.log(`saved ${saved} bytes (${((100 * saved) / runs.off[0].fileBytes).toFixed(2)}% of the image), ${runs.on[0].sharedPages} pages shared; CPU on/off ${(median(runs.on.map((x) => x.cpu)) / median(runs.off.map((x) => x.cpu))).toFixed(3)}x, wall ${(median(runs.on.map((x) => x.wall)) / median(runs.off.map((x) => x.wall))).toFixed(3)}x`)
} finally {
  rmSync(dir, { recursive: true, force: true })
}
