// The flags of the commands on QEMU's exec: hot path (and of save and restore), as plain data: oclif builds its flags
// from these (commands/_flags.ts), and the fast path (commands/_fast.ts) parses with them when
// QEMU starts us, so that `exec:snapctl load` does not pay oclif's start-up (~150 ms).

export interface FlagSpec {
  type: 'string' | 'boolean' | 'integer'
  description: string
  options?: string[]
  default?: string
  exclusive?: string[]
  /** flags that must be given with this one (oclif's dependsOn) */
  dependsOn?: string[]
  required?: boolean
  /** a one-letter alias, `-q` (boolean flags only) */
  char?: string
  /** integer flags: the bounds, inclusive */
  min?: number
  max?: number
}

export interface CommandSpec {
  summary?: string
  description: string
  examples: string[]
  image: string
  flags: Record<string, FlagSpec>
}

/** Every command that reads an image: the host's cache for s3:// images (src/s3/url.ts, setObjectCache). */
export const CACHE_FLAGS: Record<string, FlagSpec> = {
  'cache-dir': { type: 'string', description: 'for s3:// images: the host\'s cache of fetched 1 MiB blocks and page indexes, safe to share between commands running at once (default $SNAPCTL_CACHE_DIR, else $TMPDIR/snapctl-UID)' },
  'cache-max': { type: 'string', description: 'for s3:// images: bound of the cached blocks in --cache-dir, least recently used deleted first, e.g. 4G; 0 fetches without caching (default $SNAPCTL_CACHE_MAX, else 2G)' },
}

export const CREATE: CommandSpec = {
  description: 'Save a QEMU migration stream (stdin, --from FILE, or --listen unix:PATH with multifd channels) into an image',
  examples: [
    `(qemu) migrate "exec:<%= config.bin %> create /var/lib/snaps/vm1.snap"`,
    '<%= config.bin %> create vm1.snap --from saved.stream',
    '<%= config.bin %> create vm1.snap --from /var/lib/libvirt/qemu/save/vm1.save',
    '<%= config.bin %> create vm1.snap --listen unix:/run/vm1.mig   # then (qemu) migrate unix:/run/vm1.mig, multifd on or off',
    `(qemu) migrate "exec:<%= config.bin %> create /var/lib/snaps/vm1-2.snap --base /var/lib/snaps/vm1.snap"   # incremental`,
  ],
  image: 'the image to write: a file, or s3://BUCKET/KEY (multipart upload; README, "Images in object storage")',
  flags: {
    from: { type: 'string', description: 'read the stream from FILE: a `migrate file:` stream (mapped-ram or not) or a libvirt save image (raw or sparse)', exclusive: ['listen'] },
    listen: { type: 'string', description: 'listen on unix:PATH for QEMU (migrate unix:PATH), with any number of multifd channels' },
    timeout: { type: 'string', description: 'with --listen: give up (SNAP_CHANNEL_TIMEOUT) when QEMU does not connect or a connection stays silent this many ms (0: wait for ever; default $SNAPCTL_CHANNEL_TIMEOUT_MS, else 60000)' },
    compress: { type: 'string', options: ['lz4', 'none'], default: 'lz4', description: 'cluster compression' },
    'cluster-size': { type: 'string', default: '1M', description: 'raw page bytes per cluster, a power of two from 64K to 64M' },
    threads: { type: 'string', description: 'threads creating the image: N > 1 compresses up to N - 1 clusters at once on other threads while one parses the stream; 1 does both on one thread. Same image either way. Default: one less than the CPUs (os.availableParallelism()), at least 1: on 2 CPUs the stream is parsed and compressed on one thread, which measured faster there (README, "Parallel channels")' },
    dedupe: { type: 'boolean', description: 'store a page whose bytes the image already holds once (another block, another offset, a page re-sent unchanged): after a byte-for-byte comparison it points at the stored copy (format-spec/container.md, "Shared slots"). Off by default: it cost 1.2x to 1.3x the CPU of create for 0.1% to 1% smaller images (README, "Identical pages stored once"); snapctl versions from before shared slots refuse such an image (incompatible feature bit 4)' },
    force: { type: 'boolean', description: 'replace an existing image' },
    base: { type: 'string', description: 'write an incremental image over BASE (an image of the same VM, or the top of a chain): only pages whose content differs from what BASE restores are stored; BASE is only read, and its path is stored relative to the image' },
    'base-relative-to': { type: 'string', description: 'with --base: store the base\'s path relative to this directory, where the image will be moved (save uses it); default the image\'s own directory' },
    sync: { type: 'boolean', description: 'make the image durable (fdatasync) before exiting; off, a power loss can lose it, but never yields a wrong restore' },
    'bypass-cache': { type: 'boolean', description: 'write the image with direct I/O (O_DIRECT), so that it neither fills nor evicts the host\'s page cache (as virsh save --bypass-cache); on a filesystem that refuses O_DIRECT (ramfs, tmpfs before Linux 6.6) a note says so and the image goes through the page cache' },
    progress: { type: 'boolean', description: 'show progress on stderr' },
    stats: { type: 'string', description: 'write counters (pages, zero, XBZRLE, re-sent pages, bytes, seconds) as JSON to FILE' },
    json: { type: 'boolean', description: 'print the result as JSON on stdout' },
  },
}

export const LOAD: CommandSpec = {
  description: 'Restore an image as a QEMU migration stream on stdout (or --to FILE); --postcopy restores lazily',
  examples: [
    `(qemu) migrate_incoming "exec:<%= config.bin %> load /var/lib/snaps/vm1.snap"`,
    `(qemu) migrate_incoming "exec:<%= config.bin %> load --postcopy /var/lib/snaps/vm1.snap"   # needs postcopy-ram on`,
    '<%= config.bin %> load vm1.snap --to vm1.stream   # for migrate_incoming file:vm1.stream',
    '<%= config.bin %> load vm1.snap --to vm1.mapped --format mapped-ram   # capability mapped-ram on, then migrate_incoming file:vm1.mapped',
    '<%= config.bin %> load vm1.snap --connect unix:/run/vm1-dst.mig --channels 4   # destination: multifd on, multifd-channels 4, migrate_incoming unix:/run/vm1-dst.mig',
    '<%= config.bin %> load vm1.snap --postcopy --connect unix:/run/vm1-dst.mig   # destination: postcopy-ram and postcopy-preempt on, migrate_incoming unix:/run/vm1-dst.mig',
  ],
  image: 'the image to read',
  flags: {
    to: { type: 'string', description: 'write the stream to FILE instead of stdout', exclusive: ['postcopy', 'connect'] },
    connect: { type: 'string', description: 'connect to a destination QEMU in migrate-incoming unix:PATH instead of writing stdout; with --postcopy the destination needs postcopy-ram and postcopy-preempt on, and requested pages go on the preempt channel' },
    channels: { type: 'string', description: 'with --connect: the destination\'s multifd-channels (multifd on there); any N, whatever N the image was saved with; 0 or absent: one plain stream' },
    uuid: { type: 'string', description: 'with --channels: the destination VM\'s uuid (-uuid; QEMU checks it on every channel); default all zero, as QEMU without -uuid' },
    timeout: { type: 'string', description: 'with --connect: give up (SNAP_CHANNEL_TIMEOUT) when the destination does not connect or read for this many ms (0: wait for ever; default $SNAPCTL_CHANNEL_TIMEOUT_MS, else 60000)' },
    'ready-fd': { type: 'string', description: 'with --postcopy --connect: open the image and get everything ready, then write a line to this file descriptor and connect only once a line comes on standard input (restore --lazy starts its load this way before migrate-incoming, so that the VM runs sooner after it; standard input closed first: SNAP_ABORTED)' },
    postcopy: { type: 'boolean', description: 'lazy restore: the VM runs at once, pages are served on demand (reads the return path on stdin)' },
    record: { type: 'boolean', description: 'with --postcopy: record the order in which the guest asks for pages until the push has finished and store it in the image as its working set (a later lazy restore pushes those pages first)' },
    'record-window': { type: 'string', description: 'with --record: for this long after the VM can run, send only the pages the guest asks for (no background push), so that every page it touches is asked for and recorded; then the rest (e.g. 5s, 1500ms; default 5s; 0: push at once)' },
    'precopy-max': { type: 'string', description: 'with --postcopy and an image with a working set: send at most this much of it before the VM can run (precopy: in RAM when the guest first touches it), the rest first after (default 128M; 0: all of it after); once it is in, the push yields the CPU to the guest (nice +10; $SNAPCTL_POSTCOPY_PUSH_NICE=0 keeps the priority)' },
    recover: { type: 'boolean', description: 'with --postcopy: continue a lazy restore that stopped midway (the destination is postcopy-paused and was told migrate-recover URI; restore --lazy --recover does both): ask for what it has received, resume it, send the rest' },
    'host-page-size': { type: 'string', description: 'with --postcopy: the destination page size of hugepage-backed RAM blocks, e.g. mem=2M or mem0=2M,mem1=1G (postcopy places whole host pages)' },
    format: { type: 'string', options: ['stream', 'mapped-ram'], description: 'with --to: stream (default) for migrate-incoming file:FILE, or mapped-ram for migrate-incoming file:FILE with capability mapped-ram on (multifd on or off)', exclusive: ['postcopy', 'connect'] },
    force: { type: 'boolean', description: 'with --to: replace an existing FILE' },
    'bypass-cache': { type: 'boolean', description: 'read the image with direct I/O (O_DIRECT), so that it neither fills nor evicts the host\'s page cache (as virsh restore --bypass-cache); a --to FILE is still written through the cache (it is what QEMU reads next); on a filesystem that refuses O_DIRECT (ramfs, tmpfs before Linux 6.6) a note says so and the image is read through the page cache' },
    progress: { type: 'boolean', description: 'show progress on stderr' },
    stats: { type: 'string', description: 'write timings and counters as JSON to FILE' },
    ...CACHE_FLAGS,
  },
}

export const RESTORE: CommandSpec = {
  summary: 'Restore an image into a QEMU started with -incoming defer, over QMP; --lazy resumes at once (postcopy)',
  description: `The destination QEMU must run with the same machine type and devices as the saved VM, and -incoming defer. Before anything is sent, snapctl checks that the destination waits for a migration and that its RAM blocks ("info ramblock") are those of the image with the same sizes, and refuses otherwise (SNAP_RAM_MISMATCH): the destination then still waits, untouched.

Eager (default): snapctl runs migrate-incoming unix:SOCKET with multifd on and "snapctl load --connect --channels N" (--channels, default 2; --channels 0: migrate-incoming "exec:snapctl load IMAGE") and starts the VM once every page is in. --lazy: postcopy; the VM runs as soon as the device state is in ("postcopy-active") and pages come on demand and in the background until "completed". It goes over a unix socket with the postcopy-preempt channel (requested pages never wait behind the background push) and needs the capabilities postcopy-ram and postcopy-preempt (snapctl turns them on) and RAM that userfaultfd can fill: anonymous memory, memfd, or a memory-backend-file on tmpfs (/dev/shm) or hugetlbfs; snapctl refuses a memory-backend-file elsewhere (SNAP_POSTCOPY_SETUP). Until "completed" the VM depends on this restore: an interrupted lazy restore goes on until the last page. If snapctl dies or a connection breaks before then, QEMU pauses the migration (query-migrate: postcopy-paused) with the VM waiting for its missing pages; --lazy --recover with the same image continues it (migrate-recover): it asks the destination which pages it has, resumes it and sends the rest. A restore into a postcopy-paused destination without --recover is refused (SNAP_POSTCOPY_PAUSED), and --recover into one that is not paused too (SNAP_NOT_PAUSED).

Capabilities the restore cannot feed (multifd, mapped-ram, x-ignore-shared, switchover-ack, ...) are turned off and put back afterwards. --paused leaves the VM paused once restored. If the restore fails once started, the destination QEMU is left in its failed state (migrate-incoming runs with exit-on-error off, so that snapctl can report QEMU's reason): quit it and start a new one.`,
  examples: [
    '<%= config.bin %> restore /var/lib/snaps/vm1.snap --qmp /run/vm1-dst.qmp',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --lazy   # memory-backend-file on /dev/shm, or anonymous RAM',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --lazy --recover   # the lazy restore stopped midway: the destination is postcopy-paused',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --channels 4   # multifd: 4 parallel channels (default 2)',
    '<%= config.bin %> restore vm1.snap --qmp /run/vm1-dst.qmp --channels 0   # one exec: pipe, no multifd',
  ],
  image: 'the image to restore: a file, or s3://BUCKET/KEY',
  flags: {
    qmp: { type: 'string', required: true, description: "the destination's QMP socket (QEMU started with -incoming defer and -qmp unix:PATH,server=on,wait=off)" },
    lazy: { type: 'boolean', description: 'postcopy: the VM runs at once, pages come on demand' },
    record: { type: 'boolean', dependsOn: ['lazy'], description: 'with --lazy: record the order in which the guest asks for pages and store it in the image as its working set; the next lazy restore pushes those pages first' },
    'record-window': { type: 'string', dependsOn: ['record'], description: 'with --record: for this long after the VM can run, send only the pages the guest asks for (no background push), so that every page it touches is asked for and recorded; then the rest (e.g. 5s, 1500ms; default 5s; 0: push at once)' },
    'precopy-max': { type: 'string', dependsOn: ['lazy'], description: 'with --lazy and an image with a working set: send at most this much of it before the VM can run (in RAM when the guest first touches it), the rest first after (default 128M; 0: all of it after); once it is in, the push yields the CPU to the guest (nice +10; $SNAPCTL_POSTCOPY_PUSH_NICE=0 keeps the priority)' },
    recover: { type: 'boolean', dependsOn: ['lazy'], exclusive: ['record'], description: 'with --lazy: continue a lazy restore of this image that stopped midway (the destination is postcopy-paused): migrate-recover, then only the pages the destination does not have' },
    paused: { type: 'boolean', description: 'leave the VM paused once restored' },
    'bypass-cache': { type: 'boolean', description: 'read the image with direct I/O (O_DIRECT), so that the restore neither fills nor evicts the host\'s page cache (as virsh restore --bypass-cache; passed on to load)' },
    json: { type: 'boolean', description: 'print the result as JSON on stdout: image, bytesOut, seconds, pages, runnableSeconds, ... (README, "Output keys")' },
    quiet: { type: 'boolean', char: 'q', description: 'no progress on stderr' },
    ...CACHE_FLAGS,
    channels: { type: 'integer', min: 0, max: 255, exclusive: ['lazy'], description: 'restore with multifd over N channels (migrate-incoming unix:SOCKET, "snapctl load --connect --channels N"), whatever N the image was saved with; 0: one exec: pipe (migrate-incoming "exec:snapctl load IMAGE"). Default 2: on a 2-core machine 2 channels restored a 1 GiB VM in 0.75x the wall time of exec: with 0.84x the CPU (README, "Parallel channels"). Not with --lazy, which uses one socket (QEMU 10.0 has no postcopy with multifd)' },
  },
}

export const SAVE: CommandSpec = {
  summary: "Save a QEMU VM's RAM and device state into an image over QMP, like virsh save",
  description: `snapctl asks QEMU (over its QMP socket) to migrate to "exec:snapctl create", follows the migration, and renames the image into place only once QEMU and the create have both finished: exit 0 means the image is complete.

By default the VM is stopped first and left paused afterwards; --live saves while it runs (QEMU stops it for the last pages), --resume lets a VM that was running run on afterwards. On any failure (a full disk, a bad stream, QEMU exiting, Ctrl-C or SIGTERM) the migration is cancelled, no image is left at the path, and a VM that was running runs again; the reason is one line, "snapctl: CODE: message".

Migration settings: capabilities that change the stream or need another transport (postcopy-ram, return-path, multifd, mapped-ram, dirty-bitmaps, x-ignore-shared, postcopy-preempt, switchover-ack, pause-before-switchover, background-snapshot, zero-copy-send, release-ram, x-colo) are turned off for the save and turned back on afterwards; xbzrle, auto-converge, events and the other harmless ones stay as set. The bandwidth limit (max-bandwidth) is lifted for the save and put back afterwards.

QEMU runs the create as its own child, as QEMU's user: that user must be able to run this snapctl and write the image's directory. snapctl saves RAM and device state only: to bring the VM back, start a QEMU with the same machine type, devices and disks (in the state they had at the save) and -incoming defer, then run "snapctl restore". Keeping disks, machine type and QEMU's own run state consistent is the user's job.`,
  examples: [
    '<%= config.bin %> save /var/lib/snaps/vm1.snap --qmp /run/vm1.qmp',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --live --resume   # a snapshot of a running VM, which runs on',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --json',
    '<%= config.bin %> save vm1-2.snap --qmp /run/vm1.qmp --base vm1.snap   # incremental: only what changed since vm1.snap',
    '<%= config.bin %> save vm1.snap --qmp /run/vm1.qmp --channels 4   # multifd: 4 parallel channels into one image',
  ],
  image: 'the image to write: a file, or s3://BUCKET/KEY',
  flags: {
    qmp: { type: 'string', required: true, description: "the VM's QMP socket (QEMU started with -qmp unix:PATH,server=on,wait=off); no other client may hold it" },
    live: { type: 'boolean', description: 'save while the VM runs (precopy); QEMU stops it when little is left to send' },
    resume: { type: 'boolean', description: 'let a VM that was running run on after the save (default: leave it paused)' },
    compress: { type: 'string', options: ['lz4', 'none'], default: 'lz4', description: 'cluster compression' },
    'cluster-size': { type: 'string', default: '1M', description: 'raw page bytes per cluster, a power of two from 64K to 64M' },
    dedupe: { type: 'boolean', description: 'store a page whose bytes the image already holds once, pointing at the stored copy (passed on to create: create --dedupe)' },
    force: { type: 'boolean', description: 'replace an existing image' },
    sync: { type: 'boolean', description: 'make the image durable (fdatasync) before reporting success' },
    'bypass-cache': { type: 'boolean', description: 'write the image with direct I/O (O_DIRECT), so that the save neither fills nor evicts the host\'s page cache (as virsh save --bypass-cache; passed on to create)' },
    base: { type: 'string', description: 'save an incremental image over BASE (an earlier save of this VM, or the top of a chain): only pages that differ from what BASE restores are stored; BASE is only read' },
    json: { type: 'boolean', description: 'print the result as JSON on stdout: image, fileBytes, seconds, downtimeMs, pages, ... (README, "Output keys")' },
    quiet: { type: 'boolean', char: 'q', description: 'no progress on stderr' },
    channels: { type: 'integer', min: 0, max: 255, description: 'migrate with multifd over N channels into "snapctl create --listen unix:SOCKET"; without it (or 0) one exec: pipe, the default because on a 2-core machine channels cost 1.02x to 1.11x the CPU (snapctl and QEMU together) for a wall time not clearly shorter (1 GiB paused VM, 9 alternations: 2 channels 0.78x [0.61-2.58] of exec:, 4 channels 0.97x [0.66-1.62]; README, "Parallel channels")' },
  },
}

export type ParsedFlags = Record<string, string | boolean | number | undefined>
