// `npm run demo`: the main job on a real QEMU, end to end, in about half a minute.
//   1. boot a paused VM (256 MiB of mixed RAM, a VGA device with its own RAM block)
//   2. save it:            migrate "exec:snapctl create IMAGE"
//   3. check it:           snapctl verify, snapctl info
//   4. restore eagerly:    migrate-incoming "exec:snapctl load IMAGE"            -> compare RAM
//   5. restore lazily:     migrate-incoming "exec:snapctl load --postcopy IMAGE" -> resume time, compare RAM
// Exits non-zero if any step fails or any restored byte differs.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Vm, fillRam, filesEqual, requireQemu, waitExitStatus } from './vm.js'

const MiB = 1 << 20
const SIZE_MIB = Number(process.env.DEMO_MIB ?? 256)
const BIN = join(resolve(dirname(fileURLToPath(import.meta.url)), '../..'), 'bin/run.js')
const SNAPCTL = `${process.execPath} ${BIN}`
const say = (msg: string): void => void process.stdout.write(`${msg}\n`)

async function main(): Promise<void> {
  const qemu = requireQemu()
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-demo-'))
  const vms: Vm[] = []
  const start = async (opts: Parameters<typeof Vm.start>[0]): Promise<Vm> => {
    const vm = await Vm.start({ dir, ...opts })
    vms.push(vm)
    return vm
  }
  try {
    say(`QEMU ${qemu.version} (TCG); work dir ${dir}`)
    const ram = join(dir, 'source.ram')
    await fillRam(ram, SIZE_MIB * MiB, { seed: 2026 })
    const src = await start({ name: 'source', memMiB: SIZE_MIB, memPath: ram, vga: true })
    say(`1. source VM paused: ${SIZE_MIB} MiB RAM (random, text, patterns, zero pages) + VGA`)

    const image = join(dir, 'vm.snap')
    let t = performance.now()
    await src.migrate(`exec:${SNAPCTL} create ${image}; echo $? > ${image}.status`)
    const saved = await src.waitMigration()
    const createStatus = await waitExitStatus(`${image}.status`)
    if (saved.status !== 'completed' || createStatus !== 0) throw new Error(`save failed: ${saved.status}, exit ${createStatus}`)
    const saveSeconds = (performance.now() - t) / 1000
    say(`2. saved with migrate "exec:snapctl create": ${saveSeconds.toFixed(2)} s, image ${(statSync(image).size / MiB).toFixed(1)} MiB for ${SIZE_MIB} MiB of RAM`)
    await src.quit()

    execFileSync(process.execPath, [BIN, 'verify', image], { stdio: 'inherit' })
    const info = JSON.parse(execFileSync(process.execPath, [BIN, 'info', image, '--json']).toString())
    say(`3. verified; ${info.clusters} clusters, ${info.ramBlocks.length} RAM blocks (${info.ramBlocks.map((b: { name: string }) => b.name).join(', ')})`)

    const eager = await start({ name: 'eager', memMiB: SIZE_MIB, incoming: 'defer', vga: true, keepMem: true })
    t = performance.now()
    await eager.migrateIncoming(`exec:${SNAPCTL} load ${image}`)
    const e = await eager.waitMigration()
    if (e.status !== 'completed') throw new Error(`eager restore: ${e.status}\n${eager.stderr}`)
    const eagerSeconds = (performance.now() - t) / 1000
    const eq1 = await filesEqual(ram, eager.memPath)
    say(`4. eager restore (exec:snapctl load): ${eagerSeconds.toFixed(2)} s; guest RAM ${eq1.equal ? 'byte-identical' : `DIFFERS at byte ${eq1.firstDiff}`}`)
    await eager.quit()

    const lazy = await start({ name: 'lazy', memMiB: SIZE_MIB, incoming: 'defer', vga: true, keepMem: true })
    t = performance.now()
    await lazy.migrateIncoming(`exec:${SNAPCTL} load --postcopy ${image} --stats ${image}.lazy.json; echo $? > ${image}.lazy.status`, {
      capabilities: { 'postcopy-ram': true },
    })
    const active = await lazy.waitMigration({ until: ['postcopy-active', 'completed', 'failed'] })
    const resumeMs = performance.now() - t
    const l = await lazy.waitMigration()
    const lazySeconds = (performance.now() - t) / 1000
    const lazyStatus = await waitExitStatus(`${image}.lazy.status`)
    if (active.status !== 'postcopy-active' || l.status !== 'completed' || lazyStatus !== 0) {
      throw new Error(`lazy restore: ${active.status} -> ${l.status}, exit ${lazyStatus}\n${lazy.stderr}`)
    }
    const stats = JSON.parse(readFileSync(`${image}.lazy.json`, 'utf8'))
    const eq2 = await filesEqual(ram, lazy.memPath)
    say(`5. lazy restore (exec:snapctl load --postcopy): the VM could resume after ${resumeMs.toFixed(0)} ms (postcopy-active), ` +
      `all pages in by ${lazySeconds.toFixed(2)} s; ${stats.requests} page requests, p50 ${stats.latencyMs.p50} ms, p99 ${stats.latencyMs.p99} ms; ` +
      `guest RAM ${eq2.equal ? 'byte-identical' : `DIFFERS at byte ${eq2.firstDiff}`}`)
    await lazy.quit()
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
