import { Args, Command, Flags } from '@oclif/core'
import { printJson, runCommand } from './_run-command.js'
import { parseSize } from './_size.js'
import { saveVm } from '../src/save.js'
import { mib, progressView } from './_vm.js'

export default class Save extends Command {
  static override summary = "Save a QEMU VM's RAM and device state into an image over QMP, like virsh save"
  static override description = `snapctl asks QEMU (over its QMP socket) to migrate to "exec:snapctl create", follows the migration, and renames the image into place only once QEMU and the create have both finished: exit 0 means the image is complete.

By default the VM is stopped first and left paused afterwards; --live saves while it runs (QEMU stops it for the last pages), --resume lets a VM that was running run on afterwards. On any failure (a full disk, a bad stream, QEMU exiting, Ctrl-C or SIGTERM) the migration is cancelled, no image is left at the path, and a VM that was running runs again; the reason is one line, "snapctl: CODE: message".

Migration settings: capabilities that change the stream or need another transport (postcopy-ram, return-path, multifd, mapped-ram, dirty-bitmaps, x-ignore-shared, postcopy-preempt, switchover-ack, pause-before-switchover, background-snapshot, zero-copy-send, release-ram, x-colo) are turned off for the save and turned back on afterwards; xbzrle, auto-converge, events and the other harmless ones stay as set. The bandwidth limit (max-bandwidth) is lifted for the save and put back afterwards.

QEMU runs the create as its own child, as QEMU's user: that user must be able to run this snapctl and write the image's directory. snapctl saves RAM and device state only: to bring the VM back, start a QEMU with the same machine type, devices and disks (in the state they had at the save) and -incoming defer, then run "snapctl restore". Keeping disks, machine type and QEMU's own run state consistent is the user's job.`

  static override examples = [
    '<%= config.bin %> save /var/lib/snaps/vm1.snap --qmp /run/vm1.qmp',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --live --resume   # a snapshot of a running VM, which runs on',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --json',
    '<%= config.bin %> save vm1-2.snap --qmp /run/vm1.qmp --base vm1.snap   # incremental: only what changed since vm1.snap',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --channels 4   # multifd: 4 parallel channels into one image',
  ]

  static override args = { image: Args.string({ required: true, description: 'the image to write: a file, or s3://BUCKET/KEY' }) }
  static override flags = {
    qmp: Flags.string({ required: true, description: "the VM's QMP socket (QEMU started with -qmp unix:PATH,server=on,wait=off); no other client may hold it" }),
    live: Flags.boolean({ description: 'save while the VM runs (precopy); QEMU stops it when little is left to send' }),
    resume: Flags.boolean({ description: 'let a VM that was running run on after the save (default: leave it paused)' }),
    compress: Flags.string({ options: ['lz4', 'none'], default: 'lz4', description: 'cluster compression' }),
    'cluster-size': Flags.string({ default: '1M', description: 'raw page bytes per cluster, a power of two from 64K to 64M' }),
    dedupe: Flags.boolean({ description: 'store a page whose bytes the image already holds once, pointing at the stored copy (passed on to create: create --dedupe)' }),
    force: Flags.boolean({ description: 'replace an existing image' }),
    sync: Flags.boolean({ description: 'make the image durable (fdatasync) before reporting success' }),
    'bypass-cache': Flags.boolean({ description: 'write the image with direct I/O (O_DIRECT), so that the save neither fills nor evicts the host\'s page cache (as virsh save --bypass-cache; passed on to create)' }),
    base: Flags.string({ description: 'save an incremental image over BASE (an earlier save of this VM, or the top of a chain): only pages that differ from what BASE restores are stored; BASE is only read' }),
    json: Flags.boolean({ description: 'print the result as JSON on stdout: image, fileBytes, seconds, downtimeMs, pages, ... (README, "Output keys")' }),
    quiet: Flags.boolean({ char: 'q', description: 'no progress on stderr' }),
    channels: Flags.integer({ min: 0, max: 255, description: 'migrate with multifd over N channels into "snapctl create --listen unix:SOCKET"; without it (or 0) one exec: pipe, the default because on a 2-core machine channels cost 1.02x to 1.11x the CPU (snapctl and QEMU together) for a wall time not clearly shorter (1 GiB paused VM, 9 alternations: 2 channels 0.78x [0.61-2.58] of exec:, 4 channels 0.97x [0.66-1.62]; README, "Parallel channels")' }),
  }

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Save)
      const view = progressView('save', flags.quiet)
      const r = await saveVm(args.image, {
        qmp: flags.qmp, live: flags.live, resume: flags.resume, force: flags.force, sync: flags.sync, bypassCache: flags['bypass-cache'],
        compress: flags.compress as 'lz4' | 'none', clusterSize: parseSize(flags['cluster-size'], '--cluster-size'),
        signal, onProgress: view.update, log: view.note, channels: flags.channels, base: flags.base, dedupe: flags.dedupe,
      }).finally(view.end)
      if (flags.json) return printJson(r)
      const down = r.downtimeMs === null ? '' : `, the guest stopped for ${r.downtimeMs} ms`
      process.stderr.write(`snapctl: saved ${r.image}: ${mib(r.ramBytes)} of RAM (${r.pages} pages, ${r.zeroPages} zero) into ${mib(r.fileBytes)} in ${r.seconds.toFixed(2)} s${down}; the VM is ${r.vm}\n`)
    })
  }
}
