// The flags of the commands on QEMU's exec: hot path, as plain data: oclif builds its flags
// from these (commands/_flags.ts), and the fast path (commands/_fast.ts) parses with them when
// QEMU starts us, so that `exec:snapctl load` does not pay oclif's start-up (~150 ms).

export interface FlagSpec {
  type: 'string' | 'boolean'
  description: string
  options?: string[]
  default?: string
  exclusive?: string[]
}

export interface CommandSpec {
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

export type ParsedFlags = Record<string, string | boolean | undefined>
