// QEMU's own names for the constants of the migration stream (reference:
// /work/shared/reference/qemu-migration-stream.md, QEMU 10.0). Each group names the QEMU source
// file it is defined in, so a reader can check it against QEMU.

// migration/savevm.c: file header and top-level element types (reference §1.1, §1.2)
export const QEMU_VM_FILE_MAGIC = 0x5145564d // "QEVM"
export const QEMU_VM_FILE_VERSION_COMPAT = 0x00000002
export const QEMU_VM_FILE_VERSION = 0x00000003
export const QEMU_VM_EOF = 0x00
export const QEMU_VM_SECTION_START = 0x01
export const QEMU_VM_SECTION_PART = 0x02
export const QEMU_VM_SECTION_END = 0x03
export const QEMU_VM_SECTION_FULL = 0x04
export const QEMU_VM_SUBSECTION = 0x05
export const QEMU_VM_VMDESCRIPTION = 0x06
export const QEMU_VM_CONFIGURATION = 0x07
export const QEMU_VM_COMMAND = 0x08
export const QEMU_VM_SECTION_FOOTER = 0x7e

// migration/savevm.c: enum qemu_vm_cmd, MIG_CMD_* (reference §5.1)
export const MIG_CMD_INVALID = 0
export const MIG_CMD_OPEN_RETURN_PATH = 1
export const MIG_CMD_PING = 2
export const MIG_CMD_POSTCOPY_ADVISE = 3
export const MIG_CMD_POSTCOPY_LISTEN = 4
export const MIG_CMD_POSTCOPY_RUN = 5
export const MIG_CMD_POSTCOPY_RAM_DISCARD = 6
export const MIG_CMD_PACKAGED = 7
export const MIG_CMD_ENABLE_COLO = 8
export const MIG_CMD_POSTCOPY_RESUME = 9
export const MIG_CMD_RECV_BITMAP = 10
export const MIG_CMD_SWITCHOVER_START = 11
export const MIG_CMD_MAX = 12

/** QEMU's names for the commands, for messages (migration/savevm.c mig_cmd_args[]). */
export const MIG_CMD_NAMES: Record<number, string> = {
  [MIG_CMD_INVALID]: 'INVALID',
  [MIG_CMD_OPEN_RETURN_PATH]: 'OPEN_RETURN_PATH',
  [MIG_CMD_PING]: 'PING',
  [MIG_CMD_POSTCOPY_ADVISE]: 'POSTCOPY_ADVISE',
  [MIG_CMD_POSTCOPY_LISTEN]: 'POSTCOPY_LISTEN',
  [MIG_CMD_POSTCOPY_RUN]: 'POSTCOPY_RUN',
  [MIG_CMD_POSTCOPY_RAM_DISCARD]: 'POSTCOPY_RAM_DISCARD',
  [MIG_CMD_PACKAGED]: 'PACKAGED',
  [MIG_CMD_ENABLE_COLO]: 'ENABLE_COLO',
  [MIG_CMD_POSTCOPY_RESUME]: 'POSTCOPY_RESUME',
  [MIG_CMD_RECV_BITMAP]: 'RECV_BITMAP',
  [MIG_CMD_SWITCHOVER_START]: 'SWITCHOVER_START',
}

/** migration/savevm.c MAX_VM_CMD_PACKAGED_SIZE: a package blob is at most this long. */
export const MAX_VM_CMD_PACKAGED_SIZE = 0xffffffff

// migration/ram.c: RAM_SAVE_FLAG_* (reference §2.1)
export const RAM_SAVE_FLAG_FULL = 0x001
export const RAM_SAVE_FLAG_ZERO = 0x002
export const RAM_SAVE_FLAG_MEM_SIZE = 0x004
export const RAM_SAVE_FLAG_PAGE = 0x008
export const RAM_SAVE_FLAG_EOS = 0x010
export const RAM_SAVE_FLAG_CONTINUE = 0x020
export const RAM_SAVE_FLAG_XBZRLE = 0x040
export const RAM_SAVE_FLAG_HOOK = 0x080
export const RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
export const RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

// migration/xbzrle.h / migration/ram.c (reference §2.5)
export const ENCODING_FLAG_XBZRLE = 0x1

// include/exec/target_page.h on x86 (TARGET_PAGE_BITS 12); the only page size snapctl takes.
export const TARGET_PAGE_BITS = 12
export const TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS

// migration/savevm.c: the `ram` section's name and version (reference §1.10)
export const RAM_SECTION_IDSTR = 'ram'
export const RAM_SECTION_VERSION = 4

// migration/savevm.c vmstate_configuration (reference §1.3)
export const CONFIG_SUB_TARGET_PAGE_BITS = 'configuration/target-page-bits'
export const CONFIG_SUB_CAPABILITIES = 'configuration/capabilities'
export const CONFIG_SUB_UUID = 'configuration/uuid'

// migration/migration.h: enum mig_rp_message_type, MIG_RP_MSG_* (reference §5.3)
export const MIG_RP_MSG_INVALID = 0
export const MIG_RP_MSG_SHUT = 1
export const MIG_RP_MSG_PONG = 2
export const MIG_RP_MSG_REQ_PAGES_ID = 3
export const MIG_RP_MSG_REQ_PAGES = 4
export const MIG_RP_MSG_RECV_BITMAP = 5
export const MIG_RP_MSG_RESUME_ACK = 6
export const MIG_RP_MSG_SWITCHOVER_ACK = 7
export const MIG_RP_MSG_MAX = 8
/** migration/migration.c source_return_path_thread: `uint8_t buf[512]` */
export const MIG_RP_MAX_PAYLOAD = 512
/** migration/migration.c: end marker after a RECV_BITMAP bitmap */
export const RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789abcdefn

// libvirt src/qemu/qemu_saveimage.h (reference §7)
export const QEMU_SAVE_MAGIC = 'LibvirtQemudSave'
export const QEMU_SAVE_PARTIAL = 'LibvirtQemudPart'
export const QEMU_SAVE_VERSION = 2
export const QEMU_SAVE_HEADER_SIZE = 92
// libvirt src/qemu/qemu_saveimage_format.h: QEMU_SAVE_FORMAT_*
export const QEMU_SAVE_FORMAT_NAMES = ['raw', 'gzip', 'bzip2', 'xz', 'lzop', 'zstd', 'sparse'] as const

// migration/multifd.h, multifd.c: the multifd channels' packets (reference §4; qemu-multifd-peer.md §2-§4)
export const MULTIFD_MAGIC = 0x11223344
export const MULTIFD_VERSION = 1
/** MultiFDInit_t: the first bytes of every multifd channel */
export const MULTIFD_INIT_SIZE = 64
export const MULTIFD_FLAG_SYNC = 0x01
/** MULTIFD_FLAG_COMPRESSION_MASK: zlib 0x02, zstd 0x04, qpl 0x08, uadk 0x10, qatzip 0x20 */
export const MULTIFD_FLAG_COMPRESSION_MASK = 0x3e
export const MULTIFD_FLAG_DEVICE_STATE = 0x40
/** MULTIFD_PACKET_SIZE: a RAM packet holds at most this many bytes of pages */
export const MULTIFD_PACKET_SIZE = 512 * 1024
/** pages a packet's offset[] has room for: MULTIFD_PACKET_SIZE / page size */
export const MULTIFD_PAGE_COUNT = MULTIFD_PACKET_SIZE / TARGET_PAGE_SIZE
/** MultiFDPacket_t without offset[] */
export const MULTIFD_PACKET_FIXED = 320
/** a RAM packet's header: 320 + 8 × 128 = 1344 bytes */
export const MULTIFD_PACKET_HEADER_SIZE = MULTIFD_PACKET_FIXED + 8 * MULTIFD_PAGE_COUNT
/** include/exec/ramblock.h: RAMBlock idstr[256] */
export const MULTIFD_RAMBLOCK_NAME = 256

// migration/ram.c: mapped-ram (reference §3)
/** MAPPED_RAM_HDR_VERSION: the loader accepts versions up to this one */
export const MAPPED_RAM_HDR_VERSION = 1
/** sizeof(MappedRamHeader), packed: version u32, page_size u64, bitmap_offset u64, pages_offset u64 */
export const MAPPED_RAM_HEADER_SIZE = 28
/** MAPPED_RAM_FILE_OFFSET_ALIGNMENT: each block's page array starts on a 1 MiB file offset */
export const MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
/** migration/options.c: the capability's name, as the configuration's capabilities subsection lists it */
export const MAPPED_RAM_CAPABILITY = 'mapped-ram'
/** libvirt QEMU_SAVE_FORMAT_SPARSE: a mapped-ram stream after the header (libvirt 11.x) */
export const QEMU_SAVE_FORMAT_SPARSE = 6
