// `npm run demo`: the main job on a real QEMU, end to end, in about half a minute.
//   1. boot a paused VM (256 MiB of mixed RAM, a VGA device with its own RAM block)
//   2. save it:            snapctl save IMAGE --qmp SOCKET
//   3. check it:           snapctl verify, snapctl info
//   4. restore eagerly:    snapctl restore IMAGE --qmp SOCKET --channels 2 --paused -> compare RAM
//   5. restore lazily:     snapctl restore IMAGE --qmp SOCKET --lazy --paused       -> resume time, compare RAM
// (--paused: the restored VMs stay paused, so that their firmware does not write over the RAM
// being compared.) save and restore drive QEMU themselves: save through `migrate "exec:snapctl
// create ..."` (the form libvirt and other managers use directly), the eager restore over 2
// multifd channels (`--channels 2`, the default, spelled out here; `--channels 0` is one
// `exec:snapctl load` pipe), the lazy one over a unix socket with the postcopy-preempt channel.
// Exits non-zero if any step fails or any restored byte differs.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Vm, fillRam, filesEqual, requireQemu } from './vm.js'

const MiB = 1 << 20
const SIZE_MIB = Number(process.env.DEMO_MIB ?? 256)
const BIN = join(resolve(dirname(fileURLToPath(import.meta.url)), '../..'), 'bin/run.js')
const say = (msg: string): void => void process.stdout.write(`${msg}\n`)

/** Runs snapctl with its progress on our stderr; returns its JSON result. */
function snapctl(args: string[]): any {
  say(`   $ snapctl ${args.join(' ')}`)
  const out = execFileSync(process.execPath, [BIN, ...args, '--json'], { stdio: ['ignore', 'pipe', 'inherit'] })
  return JSON.parse(out.toString())
}

async function main(): Promise<void> {
  const qemu = requireQemu()
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-demo-'))
  const vms: Vm[] = []
  // Each VM gets a second QMP socket for snapctl (a QMP socket serves one client; the harness holds the first).
  const start = async (opts: Parameters<typeof Vm.start>[0]): Promise<{ vm: Vm; qmp: string }> => {
    const qmp = join(dir, `${opts.name}-snapctl.qmp`)
    const vm = await Vm.start({ dir, ...opts, extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
    vms.push(vm)
    return { vm, qmp }
  }
  try {
    say(`QEMU ${qemu.version} (TCG); work dir ${dir}`)
    const ram = join(dir, 'source.ram')
    await fillRam(ram, SIZE_MIB * MiB, { seed: 2026 })
    const src = await start({ name: 'source', memMiB: SIZE_MIB, memPath: ram, vga: true })
    say(`1. source VM paused: ${SIZE_MIB} MiB RAM (random, text, patterns, zero pages) + VGA`)

    const image = join(dir, 'vm.snap')
    const saved = snapctl(['save', image, '--qmp', src.qmp])
    say(`2. saved in ${saved.seconds.toFixed(2)} s: image ${(saved.fileBytes / MiB).toFixed(1)} MiB for ${(saved.ramBytes / MiB).toFixed(1)} MiB of RAM ` +
      `(${saved.pages} pages, ${saved.zeroPages} zero); the source is ${saved.vm}`)
    await src.vm.quit()

    execFileSync(process.execPath, [BIN, 'verify', image], { stdio: 'inherit' })
    const info = JSON.parse(execFileSync(process.execPath, [BIN, 'info', image, '--json']).toString())
    say(`3. verified; ${info.clusters} clusters, ${info.ramBlocks.length} RAM blocks (${info.ramBlocks.map((b: { name: string }) => b.name).join(', ')})`)

    const eager = await start({ name: 'eager', memMiB: SIZE_MIB, incoming: 'defer', vga: true, keepMem: true })
    const e = snapctl(['restore', image, '--qmp', eager.qmp, '--channels', '2', '--paused'])
    const eq1 = await filesEqual(ram, eager.vm.memPath)
    say(`4. eager restore over ${e.channels} multifd channels: ${e.seconds.toFixed(2)} s; guest RAM ${eq1.equal ? 'byte-identical' : `DIFFERS at byte ${eq1.firstDiff}`}`)
    await eager.vm.quit()

    const lazy = await start({ name: 'lazy', memMiB: SIZE_MIB, incoming: 'defer', vga: true, keepMem: true })
    const l = snapctl(['restore', image, '--qmp', lazy.qmp, '--lazy', '--paused'])
    const eq2 = await filesEqual(ram, lazy.vm.memPath)
    say(`5. lazy restore: postcopy-active after ${(l.postcopyActiveSeconds * 1000).toFixed(0)} ms, the VM could run after ` +
      `${(l.runnableSeconds * 1000).toFixed(0)} ms, all pages in by ${l.seconds.toFixed(2)} s; ` +
      `guest RAM ${eq2.equal ? 'byte-identical' : `DIFFERS at byte ${eq2.firstDiff}`}`)
    await lazy.vm.quit()
    if (!eq1.equal || !eq2.equal) process.exitCode = 1
    else say('All restored RAM is byte-identical to the saved RAM.')
  } finally {
    await Promise.all(vms.map((vm) => vm.quit().catch(() => {})))
    rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err) => {
  process.stderr.write(`demo failed: ${err instanceof Error ? err.message : String(err)}\n`)
  process.exitCode = 1
})
