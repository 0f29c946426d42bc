/**
 * The qcow2 on-disk format as constants, each once: the qcow2.h of this driver
 * (docs/interop/qcow2.txt in qemu/qemu is the spec). Header fields and features, header
 * extension types, the bits of L1, L2 and refcount table entries, and QEMU's limits.
 *
 * 64-bit fields are handled as two 32-bit halves (hi * TWO_32 + lo): the entry flags
 * below are bits of the half they live in, so the hot paths test them without BigInt.
 */

/** 2^32: a 64-bit field is hi * TWO_32 + lo. */
export const TWO_32 = 0x1_0000_0000;

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
export const MIN_CLUSTER_BITS = 9;
/** QEMU's implementation limit (2 MiB clusters); the spec sets no upper bound. */
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits, kept so that we refuse what QEMU refuses rather than allocate for it. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
export const MAX_BACKING_NAME = 1023;
export const SUBCLUSTERS_PER_CLUSTER = 32;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN =
  INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;
export const COMPRESSION_NAMES: Readonly<Record<number, string>> = {
  [COMPRESSION_ZLIB]: 'zlib',
  [COMPRESSION_ZSTD]: 'zstd',
};

// L1 and L2 entries (qcow2.txt "Cluster mapping"), by 32-bit half.
/** Bit 63: the cluster's refcount is exactly one (QCOW_OFLAG_COPIED). */
export const HI_COPIED = 0x8000_0000;
/** Bit 62 of an L2 entry: a compressed cluster descriptor follows (QCOW_OFLAG_COMPRESSED). */
export const HI_COMPRESSED = 0x4000_0000;
/** Bit 0 of a standard L2 entry: the cluster reads as zeroes (QCOW_OFLAG_ZERO). */
export const LO_ZERO = 1;
/** The offset field (bits 9..55) of an L1 or standard L2 entry, by half. */
export const HI_OFFSET_MASK = 0x00ff_ffff;
export const LO_OFFSET_MASK = 0xffff_fe00;
/** Reserved bits of L1 entries (bits 0..8 and 56..62). */
export const L1_RESERVED_HI = 0x7f00_0000;
export const L1_RESERVED_LO = 0x1ff;
/** Reserved bits of standard L2 entries (bits 1..8 and 56..61). */
export const L2_RESERVED_HI = 0x3f00_0000;
export const L2_RESERVED_LO = 0x1fe;
/** Reserved bits of refcount table entries (bits 0..8). */
export const REFT_RESERVED_LO = 0x1ff;
/** Extended L2: every subcluster's bit set (the allocation or the zero bitmap). */
export const ALL_SUBCLUSTERS = 0xffff_ffff;
