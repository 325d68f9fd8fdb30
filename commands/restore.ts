import { Args, Command, Flags } from '@oclif/core'
import { cacheFlags } from './_flags.js'
import { printJson, runCommand } from './_run-command.js'
import { applyCacheFlags } from './_size.js'
import { restoreVm } from '../src/restore.js'
import { mib, progressView } from './_vm.js'

export default class Restore extends Command {
  static override summary = 'Restore an image into a QEMU started with -incoming defer, over QMP; --lazy resumes at once (postcopy)'
  static override description = `The destination QEMU must run with the same machine type and devices as the saved VM, and -incoming defer. Before anything is sent, snapctl checks that the destination waits for a migration and that its RAM blocks ("info ramblock") are those of the image with the same sizes, and refuses otherwise (SNAP_RAM_MISMATCH): the destination then still waits, untouched.

Eager (default): snapctl runs migrate-incoming "exec:snapctl load IMAGE" and starts the VM once every page is in. --lazy: postcopy; the VM runs as soon as the device state is in ("postcopy-active") and pages come on demand and in the background until "completed". It goes over a unix socket with the postcopy-preempt channel (requested pages never wait behind the background push) and needs the capabilities postcopy-ram and postcopy-preempt (snapctl turns them on) and RAM that userfaultfd can fill: anonymous memory, memfd, or a memory-backend-file on tmpfs (/dev/shm) or hugetlbfs; snapctl refuses a memory-backend-file elsewhere (SNAP_POSTCOPY_SETUP). Until "completed" the VM depends on this restore: an interrupted lazy restore goes on until the last page. If snapctl dies or a connection breaks before then, QEMU pauses the migration (query-migrate: postcopy-paused) with the VM waiting for its missing pages; --lazy --recover with the same image continues it (migrate-recover): it asks the destination which pages it has, resumes it and sends the rest. A restore into a postcopy-paused destination without --recover is refused (SNAP_POSTCOPY_PAUSED), and --recover into one that is not paused too (SNAP_NOT_PAUSED).

Capabilities the restore cannot feed (multifd, mapped-ram, x-ignore-shared, switchover-ack, ...) are turned off and put back afterwards. --paused leaves the VM paused once restored. If the restore fails once started, the destination QEMU is left in its failed state (migrate-incoming runs with exit-on-error off, so that snapctl can report QEMU's reason): quit it and start a new one.`

  static override examples = [
    '<%= config.bin %> restore /var/lib/snaps/vm1.snap --qmp /run/vm1-dst.qmp',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --lazy   # memory-backend-file on /dev/shm, or anonymous RAM',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --lazy --recover   # the lazy restore stopped midway: the destination is postcopy-paused',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --channels 4   # multifd: 4 parallel channels (default 2)',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --channels 0   # one exec: pipe, no multifd',
  ]

  static override args = { image: Args.string({ required: true, description: 'the image to restore: a file, or s3://BUCKET/KEY' }) }
  static override flags = {
    qmp: Flags.string({ required: true, description: "the destination's QMP socket (QEMU started with -incoming defer and -qmp unix:PATH,server=on,wait=off)" }),
    lazy: Flags.boolean({ description: 'postcopy: the VM runs at once, pages come on demand' }),
    record: Flags.boolean({ dependsOn: ['lazy'], description: 'with --lazy: record the order in which the guest asks for pages and store it in the image as its working set; the next lazy restore pushes those pages first' }),
    'record-window': Flags.string({ dependsOn: ['record'], description: 'with --record: for this long after the VM can run, send only the pages the guest asks for (no background push), so that every page it touches is asked for and recorded; then the rest (e.g. 5s, 1500ms; default 5s; 0: push at once)' }),
    'precopy-max': Flags.string({ dependsOn: ['lazy'], description: 'with --lazy and an image with a working set: send at most this much of it before the VM can run (in RAM when the guest first touches it), the rest first after (default 128M; 0: all of it after); once it is in, the push yields the CPU to the guest (nice +10; $SNAPCTL_POSTCOPY_PUSH_NICE=0 keeps the priority)' }),
    recover: Flags.boolean({ dependsOn: ['lazy'], exclusive: ['record'], description: 'with --lazy: continue a lazy restore of this image that stopped midway (the destination is postcopy-paused): migrate-recover, then only the pages the destination does not have' }),
    paused: Flags.boolean({ description: 'leave the VM paused once restored' }),
    'bypass-cache': Flags.boolean({ description: 'read the image with direct I/O (O_DIRECT), so that the restore neither fills nor evicts the host\'s page cache (as virsh restore --bypass-cache; passed on to load)' }),
    json: Flags.boolean({ description: 'print the result as JSON on stdout: image, bytesOut, seconds, pages, runnableSeconds, ... (README, "Output keys")' }),
    quiet: Flags.boolean({ char: 'q', description: 'no progress on stderr' }),
    ...cacheFlags(),
    channels: Flags.integer({ min: 0, max: 255, exclusive: ['lazy'], description: 'restore with multifd over N channels (migrate-incoming unix:SOCKET, "snapctl load --connect --channels N"), whatever N the image was saved with; 0: one exec: pipe (migrate-incoming "exec:snapctl load IMAGE"). Default 2: on a 2-core machine 2 channels restored a 1 GiB VM in 0.75x the wall time of exec: with 0.84x the CPU (README, "Parallel channels"). Not with --lazy, which uses one socket (QEMU 10.0 has no postcopy with multifd)' }),
  }

  async run(): Promise<void> {
    await runCommand(this.argv, async (signal) => {
      const { args, flags } = await this.parse(Restore)
      applyCacheFlags(flags)
      const view = progressView('restore', flags.quiet)
      const r = await restoreVm(args.image, { qmp: flags.qmp, lazy: flags.lazy, record: flags.record, recover: flags.recover, recordWindow: flags['record-window'], precopyMax: flags['precopy-max'], paused: flags.paused, bypassCache: flags['bypass-cache'], channels: flags.channels, signal, onProgress: view.update, log: view.note }).finally(view.end)
      if (flags.json) return printJson(r)
      const lazy = r.runnableSeconds === null ? '' : `; the VM could run${r.recovered ? ' again' : ''} after ${r.runnableSeconds.toFixed(2)} s, ${r.requests ?? 0} pages asked for${r.recovered ? ` (it had ${r.pagesReceivedBefore ?? 0} already)` : ''}`
      process.stderr.write(`snapctl: restored ${r.image}: ${r.pages} pages (${r.zeroPages} zero), ${mib(r.bytesOut)} sent${r.channels ? ` over ${r.channels} multifd channels` : ''}, all in after ${r.seconds.toFixed(2)} s${lazy}; the VM is ${r.vm}\n`)
    })
  }
}
