// The compatibility matrix (issue 9): the VM configurations people run, each one a row of the
// README's table. A configuration says how to build QEMU's command line for a source and for a
// destination with the same devices; tools/compat/run.ts drives them.

/** linux: boot the Linux test guest and wait for its heartbeat; none: paused from the start, RAM filled by the test */
export type Boot = 'linux' | 'none'

/** A memory backend: a file we can compare byte for byte after a restore. */
export interface Backend {
  id: string
  mib: number
  /** on a hugetlbfs mount (2 MiB pages) instead of /dev/shm */
  huge?: boolean
}

export interface CompatConfig {
  name: string
  /** what the row shows, for the README */
  what: string
  machine: 'pc' | 'q35'
  smp: number
  backends: Backend[]
  /** how the backends become guest RAM */
  layout: 'single' | 'numa' | 'dimm'
  boot: Boot
  uefi?: boolean
  /** qcow2 disks to create, by drive id */
  disks?: string[]
  /** device arguments; `@DISK:id` stands for the path of that disk */
  devices: string[]
  /** more arguments for `load --postcopy` */
  lazyArgs?: string
}

const userNet = (nic: string): string[] => ['-netdev', 'user,id=n0', '-device', `${nic},netdev=n0`]

export const CONFIGS: CompatConfig[] = [
  {
    name: 'pc-minimal', what: 'pc, -smp 1, VGA', machine: 'pc', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', devices: ['-device', 'VGA'],
  },
  {
    name: 'q35-virtio-net', what: 'q35, -smp 4, user net + virtio-net, virtio-rng, virtio-balloon',
    machine: 'q35', smp: 4, layout: 'single', backends: [{ id: 'mem', mib: 256 }], boot: 'linux',
    devices: [...userNet('virtio-net-pci'), '-device', 'virtio-rng-pci', '-device', 'virtio-balloon-pci'],
  },
  {
    name: 'pc-e1000', what: 'pc, -smp 4, user net + e1000', machine: 'pc', smp: 4, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', devices: userNet('e1000'),
  },
  {
    name: 'q35-virtio-blk', what: 'q35, virtio-blk on a qcow2 disk', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', disks: ['d0'],
    devices: ['-drive', 'file=@DISK:d0,format=qcow2,if=none,id=d0,file.locking=off', '-device', 'virtio-blk-pci,drive=d0'],
  },
  {
    name: 'q35-virtio-scsi', what: 'q35, virtio-scsi + scsi-hd on a qcow2 disk', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', disks: ['d1'],
    devices: [
      '-device', 'virtio-scsi-pci,id=scsi0',
      '-drive', 'file=@DISK:d1,format=qcow2,if=none,id=d1,file.locking=off', '-device', 'scsi-hd,drive=d1,bus=scsi0.0',
    ],
  },
  {
    name: 'q35-virtio-serial', what: 'q35, virtio-serial with a console', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux',
    devices: ['-device', 'virtio-serial-pci', '-chardev', 'null,id=vc0', '-device', 'virtconsole,chardev=vc0'],
  },
  {
    name: 'q35-usb', what: 'q35, USB: qemu-xhci, usb-tablet, usb-kbd', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux',
    devices: ['-device', 'qemu-xhci,id=xhci', '-device', 'usb-tablet,bus=xhci.0', '-device', 'usb-kbd,bus=xhci.0'],
  },
  {
    name: 'q35-virtio-gpu', what: 'q35, virtio-gpu', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', devices: ['-device', 'virtio-gpu-pci'],
  },
  {
    name: 'pc-audio', what: 'pc, intel-hda + hda-duplex, -audiodev none', machine: 'pc', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux',
    devices: ['-audiodev', 'none,id=snd0', '-device', 'intel-hda', '-device', 'hda-duplex,audiodev=snd0'],
  },
  {
    name: 'pc-pvpanic-watchdog', what: 'pc, pvpanic + i6300esb watchdog', machine: 'pc', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', devices: ['-device', 'pvpanic', '-device', 'i6300esb'],
  },
  {
    name: 'pc-numa', what: 'pc, -smp 2, two NUMA nodes with a memory backend each', machine: 'pc', smp: 2, layout: 'numa',
    backends: [{ id: 'm0', mib: 128 }, { id: 'm1', mib: 128 }], boot: 'linux', devices: [],
  },
  {
    name: 'pc-dimm', what: 'pc, a hot-plugged pc-dimm (an extra RAM block)', machine: 'pc', smp: 1, layout: 'dimm',
    backends: [{ id: 'mem', mib: 256 }, { id: 'dimm0mem', mib: 128 }], boot: 'linux', devices: [],
  },
  {
    name: 'q35-uefi', what: 'q35, UEFI firmware (OVMF, pflash code + vars) booting Linux', machine: 'q35', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 256 }], boot: 'linux', uefi: true, devices: [],
  },
  {
    name: 'pc-hugepages', what: 'pc, RAM on 2 MiB huge pages (hugetlbfs)', machine: 'pc', smp: 1, layout: 'single',
    backends: [{ id: 'mem', mib: 128, huge: true }], boot: 'linux', devices: [], lazyArgs: '--host-page-size mem=2M',
  },
]
