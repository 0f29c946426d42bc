/**
 * The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header" and "Header
 * extensions"): parsed from the first cluster and validated before anything uses it.
 * The parsed form keeps every raw field, the unknown extensions and where the
 * extension area ends, so that a writer can rewrite the header without losing data.
 */
import { corrupt, hex, unsupported, type Where } from './errors.js';

// The constants live in format.ts; re-exported for the header's users.
export * from './format.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPRESSION_NAMES,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  MAX_BACKING_NAME,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_BITMAPS,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  SUBCLUSTERS_PER_CLUSTER,
  TWO_32,
  V2_HEADER_LENGTH,
  V3_MIN_HEADER_LENGTH,
} from './format.js';

const CRYPT_NAMES: Readonly<Record<number, string>> = { 1: 'AES', 2: 'LUKS' };
const KNOWN_INCOMPAT_NAMES: Readonly<Record<number, string>> = {
  0: 'dirty bit',
  1: 'corrupt bit',
  2: 'external data file',
  3: 'compression type',
  4: 'extended L2 entries',
};

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  readonly type: number;
  readonly bit: number;
  readonly name: string;
}

export interface BitmapsExtension {
  readonly nbBitmaps: number;
  readonly directorySize: number;
  readonly directoryOffset: number;
}

export interface HeaderExtension {
  readonly type: number;
  /** Offset of the extension's data in the file. */
  readonly offset: number;
  readonly length: number;
}

export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** Virtual size as QEMU sees it: the header's size rounded down to 512-byte sectors. */
  readonly size: number;
  /** The size field exactly as stored. */
  readonly rawSize: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly refcountOrder: number;
  readonly headerLength: number;
  readonly compressionType: number;

  // Derived geometry.
  readonly extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  readonly l2EntrySize: number;
  readonly l2Entries: number;
  readonly subclusterSize: number;
  /** L1 entries the virtual size needs (the active table may be longer). */
  readonly l1Needed: number;

  // Extensions.
  readonly backingFile?: string;
  readonly backingFormat?: string;
  readonly dataFile?: string;
  readonly featureNames: readonly FeatureName[];
  readonly bitmaps?: BitmapsExtension;
  /** Extensions this driver does not interpret, to be preserved by a writer. */
  readonly unknownExtensions: readonly HeaderExtension[];
  /** Where the extension area (including its end marker, if any) stops. */
  readonly extensionsEnd: number;
  /** Things worth telling the user that do not prevent reading. */
  readonly warnings: readonly string[];
}

const utf8 = new TextDecoder('utf-8');

function u32(dv: DataView, off: number): number {
  return dv.getUint32(off);
}

/** A big-endian u64 as a number; values past 2^53 lose precision, and every caller bounds them. */
function u64(dv: DataView, off: number): number {
  return dv.getUint32(off) * TWO_32 + dv.getUint32(off + 4);
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function text(buf: Uint8Array, start: number, length: number): string {
  return utf8.decode(buf.subarray(start, start + length));
}

/**
 * Checks what can be checked from the header's first bytes and says how many bytes
 * of the file the full parse needs: the first cluster (header, extensions and the
 * backing file name all live there), or the whole file if it is shorter.
 */
export function headerReadLength(prefix: Uint8Array, fileSize: number, where: Where): number {
  if (fileSize < V2_HEADER_LENGTH || prefix.length < V2_HEADER_LENGTH) {
    throw corrupt(
      where,
      'header',
      `file of ${fileSize} bytes is too small to hold a qcow2 header (${V2_HEADER_LENGTH} bytes)`,
      0,
    );
  }
  const dv = view(prefix);
  if (u32(dv, 0) !== QCOW2_MAGIC) throw corrupt(where, 'magic', 'not a qcow2 image (bad magic)', 0);
  const version = u32(dv, 4);
  if (version !== 2 && version !== 3)
    throw unsupported(where, 'version', `qcow2 version ${version} is not supported (only 2 and 3)`);
  const clusterBits = u32(dv, 20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(
      where,
      'cluster_bits',
      `cluster_bits ${clusterBits} is out of range ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)`,
      20,
    );
  }
  return Math.min(fileSize, 2 ** clusterBits);
}

export interface ParseOptions {
  /**
   * Parse as QEMU opens an image for `qemu-img check`: where the tables lie in the file
   * (the L1 and refcount tables past its end or over the header, no refcount table at
   * all, the snapshot table's place) is left to the check, which counts what is wrong
   * there instead of refusing the image.
   */
  readonly forCheck?: boolean;
}

/** Parses and validates the header from `first`: the first cluster of the file (or all of a shorter file). */
export function parseHeader(
  first: Uint8Array,
  fileSize: number,
  where: Where,
  options: ParseOptions = {},
): Qcow2Header {
  const strictPlacement = options.forCheck !== true;
  headerReadLength(first, fileSize, where);
  const dv = view(first);
  const version = u32(dv, 4) as 2 | 3;
  const clusterBits = u32(dv, 20);
  const clusterSize = 2 ** clusterBits;
  const bad = (field: string, message: string, offset?: number) => corrupt(where, field, message, offset);

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_ZLIB;
  if (version === 3) {
    if (first.length < V3_MIN_HEADER_LENGTH) {
      throw bad(
        'header_length',
        `file of ${fileSize} bytes is too small to hold a version 3 header (${V3_MIN_HEADER_LENGTH} bytes)`,
        0,
      );
    }
    incompatibleFeatures = dv.getBigUint64(72);
    compatibleFeatures = dv.getBigUint64(80);
    autoclearFeatures = dv.getBigUint64(88);
    refcountOrder = u32(dv, 96);
    headerLength = u32(dv, 100);
    if (headerLength < V3_MIN_HEADER_LENGTH) {
      throw bad(
        'header_length',
        `header_length ${headerLength} is too small (a version 3 header has at least ${V3_MIN_HEADER_LENGTH} bytes)`,
        100,
      );
    }
    if (headerLength > clusterSize) {
      throw bad('header_length', `header_length ${headerLength} exceeds the cluster size ${clusterSize}`, 100);
    }
    if (headerLength > first.length) {
      throw bad(
        'header_length',
        `header_length ${headerLength} runs past the end of the file (${fileSize} bytes)`,
        100,
      );
    }
    // Fields past offset 104 exist only when the header is long enough to hold them.
    if (headerLength > 104) compressionType = first[104]!;
  }
  if (refcountOrder > 6) {
    throw bad('refcount_order', `refcount_order ${refcountOrder} is too large (at most 6: 64-bit refcounts)`, 96);
  }

  const rawSize = u64(dv, 24);
  if (rawSize > Number.MAX_SAFE_INTEGER) {
    throw unsupported(where, 'size', `virtual size ${rawSize} is larger than this driver supports (2^53 - 1 bytes)`);
  }
  // QEMU counts the virtual disk in 512-byte sectors and drops any remainder.
  const size = rawSize - (rawSize % 512);

  const cryptMethod = u32(dv, 32);
  if (cryptMethod > 2) throw bad('crypt_method', `unknown crypt_method ${cryptMethod}`, 32);

  const extendedL2 = (incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntrySize;
  const subclusterSize = extendedL2 ? clusterSize / SUBCLUSTERS_PER_CLUSTER : clusterSize;
  if (extendedL2 && subclusterSize < 512) {
    throw bad('cluster_bits', `extended L2 entries need clusters of at least 16 KiB, not ${clusterSize} bytes`, 20);
  }

  // Backing file name: inside the first cluster, at most 1023 bytes.
  const backingFileOffset = u64(dv, 8);
  const backingFileSize = u32(dv, 16);
  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileOffset > clusterSize) {
      throw bad(
        'backing_file_offset',
        `backing_file_offset ${backingFileOffset} lies outside the first cluster (${clusterSize} bytes)`,
        8,
      );
    }
    if (backingFileSize > Math.min(MAX_BACKING_NAME, clusterSize - backingFileOffset)) {
      throw bad(
        'backing_file_size',
        `backing file name of ${backingFileSize} bytes is too long (at most ${Math.min(MAX_BACKING_NAME, clusterSize - backingFileOffset)} here)`,
        16,
      );
    }
    if (backingFileOffset + backingFileSize > first.length) {
      throw bad(
        'backing_file_offset',
        `backing file name at ${backingFileOffset} (+${backingFileSize}) runs past the end of the file (${fileSize} bytes)`,
        8,
      );
    }
    // An empty name means no backing file, as in QEMU.
    if (backingFileSize > 0) backingFile = text(first, backingFileOffset, backingFileSize);
  }

  // Header extensions: from the end of the header to the backing file name or the end of the cluster.
  const extStart = headerLength;
  const extLimit = Math.min(backingFileOffset !== 0 ? backingFileOffset : clusterSize, first.length);
  let backingFormat: string | undefined;
  let dataFile: string | undefined;
  let bitmaps: BitmapsExtension | undefined;
  const featureNames: FeatureName[] = [];
  const unknownExtensions: HeaderExtension[] = [];
  const warnings: string[] = [];
  let off = extStart;
  // As in QEMU, every extension header (the end marker too) must fit in the area; past the end of a short file reads as the end marker.
  while (off < extLimit && off + 8 <= first.length) {
    const type = u32(dv, off);
    const len = u32(dv, off + 4);
    const data = off + 8;
    if (data > extLimit || len > extLimit - data) {
      throw bad(
        'header extension',
        `header extension ${hex(type)} at offset ${off} has length ${len}, running past the end of the header area (${extLimit})`,
        off,
      );
    }
    if (type === EXT_END) {
      off = data;
      break;
    }
    switch (type) {
      case EXT_BACKING_FORMAT:
        // QEMU keeps format names in a 16-byte buffer and refuses longer ones.
        if (len >= 16) throw bad('backing format extension', `backing format name of ${len} bytes is too long`, off);
        backingFormat = text(first, data, len);
        break;
      case EXT_FEATURE_TABLE:
        for (let e = data; e + 48 <= data + len; e += 48) {
          const nameBytes = first.subarray(e + 2, e + 48);
          const nul = nameBytes.indexOf(0);
          featureNames.push({
            type: first[e]!,
            bit: first[e + 1]!,
            name: utf8.decode(nul < 0 ? nameBytes : nameBytes.subarray(0, nul)),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (len !== 24) throw bad('bitmaps extension', `bitmaps extension has length ${len}, expected 24`, off);
        if ((autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) {
          // The bitmaps were modified by a program that does not know them: they are stale, not an error.
          warnings.push(
            'bitmaps extension present but the autoclear bit is clear: the bitmaps are inconsistent and ignored',
          );
          break;
        }
        const nb = u32(dv, data);
        const reserved = u32(dv, data + 4);
        const dirSize = u64(dv, data + 8);
        const dirOffset = u64(dv, data + 16);
        if (reserved !== 0)
          throw bad('bitmaps extension', 'reserved field of the bitmaps extension is not zero', data + 4);
        if (nb === 0 || nb > MAX_BITMAPS)
          throw bad('nb_bitmaps', `nb_bitmaps ${nb} is out of range 1..${MAX_BITMAPS}`, data);
        if (dirSize > MAX_BITMAP_DIRECTORY_BYTES)
          throw bad(
            'bitmap_directory_size',
            `bitmap_directory_size ${dirSize} exceeds ${MAX_BITMAP_DIRECTORY_BYTES}`,
            data + 8,
          );
        if (dirOffset % clusterSize !== 0)
          throw bad(
            'bitmap_directory_offset',
            `bitmap_directory_offset ${dirOffset} is not aligned to a cluster`,
            data + 16,
          );
        if (dirOffset + dirSize > fileSize) {
          throw bad(
            'bitmap_directory_offset',
            `bitmap directory at ${dirOffset} (+${dirSize}) runs past the end of the file (${fileSize} bytes)`,
            data + 16,
          );
        }
        bitmaps = { nbBitmaps: nb, directorySize: dirSize, directoryOffset: dirOffset };
        break;
      }
      case EXT_CRYPTO:
        if (cryptMethod !== 2)
          throw bad(
            'crypto header extension',
            'full disk encryption header extension in an image that does not use LUKS',
            off,
          );
        break;
      case EXT_DATA_FILE:
        dataFile = text(first, data, len);
        break;
      default:
        unknownExtensions.push({ type, offset: data, length: len });
    }
    off = data + Math.ceil(len / 8) * 8;
  }
  const extensionsEnd = Math.min(off, extLimit);

  // Incompatible features: refuse any bit we do not know, naming it as the image does.
  const unknownBits = incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknownBits !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if ((unknownBits & (1n << BigInt(bit))) === 0n) continue;
      const named = featureNames.find((f) => f.type === 0 && f.bit === bit);
      names.push(named ? `bit ${bit} "${named.name}"` : `bit ${bit}`);
    }
    throw unsupported(
      where,
      'incompatible_features',
      `unsupported qcow2 feature${names.length > 1 ? 's' : ''}: ${names.join(', ')} (known: ${Object.entries(
        KNOWN_INCOMPAT_NAMES,
      )
        .map(([b, n]) => `${b} ${n}`)
        .join(', ')})`,
    );
  }
  if (cryptMethod !== 0) {
    throw unsupported(where, 'crypt_method', `encrypted qcow2 images (${CRYPT_NAMES[cryptMethod]}) are not supported`);
  }

  // Compression type, validated as QEMU does: the feature bit and the field must agree.
  if (compressionType !== COMPRESSION_ZLIB && compressionType !== COMPRESSION_ZSTD) {
    throw unsupported(where, 'compression_type', `unknown compression_type ${compressionType}`);
  }
  const compressionBit = (incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (compressionType === COMPRESSION_ZLIB && compressionBit) {
    throw bad('incompatible_features', 'the compression type feature bit is set but compression_type is zlib (0)', 72);
  }
  if (compressionType !== COMPRESSION_ZLIB && !compressionBit) {
    throw bad(
      'incompatible_features',
      `compression_type is ${COMPRESSION_NAMES[compressionType]} but the compression type feature bit is clear`,
      72,
    );
  }
  if ((autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n && (incompatibleFeatures & INCOMPAT_DATA_FILE) === 0n) {
    throw bad('autoclear_features', 'data-file-raw is set but the image has no external data file', 88);
  }

  // Table offsets no file can reach are refused outright, whatever the table sizes (QEMU refuses those past 2^63).
  for (const [field, at] of [
    ['l1_table_offset', 40],
    ['refcount_table_offset', 48],
    ['snapshots_offset', 64],
  ] as const) {
    if (u64(dv, at) > Number.MAX_SAFE_INTEGER)
      throw bad(field, `${field} ${dv.getBigUint64(at)} is beyond any file`, at);
  }

  // L1 table: big enough for the virtual size, no larger than QEMU allows, inside the file.
  const l1Size = u32(dv, 36);
  const l1TableOffset = u64(dv, 40);
  const l1Coverage = clusterSize * l2Entries;
  // From the size as stored, as QEMU checks it (a size that is not a multiple of 512 may need one more entry).
  const l1Needed = Math.ceil(rawSize / l1Coverage);
  if (l1Size * 8 > MAX_L1_BYTES)
    throw bad(
      'l1_size',
      `l1_size ${l1Size} is too large (the L1 table may have at most ${MAX_L1_BYTES / 8} entries)`,
      36,
    );
  if (l1Size < l1Needed)
    throw bad(
      'l1_size',
      `l1_size ${l1Size} is too small for the virtual size ${rawSize} (needs ${l1Needed} entries)`,
      36,
    );
  // Offsets are checked even for empty tables, as QEMU does.
  if (l1TableOffset % clusterSize !== 0)
    throw bad('l1_table_offset', `l1_table_offset ${l1TableOffset} is not aligned to a cluster`, 40);
  if (l1Size > 0 && strictPlacement) {
    if (l1TableOffset < clusterSize)
      throw bad('l1_table_offset', `l1_table_offset ${l1TableOffset} overlaps the header`, 40);
    if (l1TableOffset + l1Size * 8 > fileSize) {
      throw bad(
        'l1_table_offset',
        `L1 table at ${l1TableOffset} (l1_size ${l1Size}, ${l1Size * 8} bytes) runs past the end of the file (${fileSize} bytes)`,
        40,
      );
    }
  }

  // Refcount table: not needed to read, but it must be a plausible structure.
  const refcountTableOffset = u64(dv, 48);
  const refcountTableClusters = u32(dv, 56);
  if (refcountTableClusters === 0 && strictPlacement)
    throw bad('refcount_table_clusters', 'the image has no refcount table (refcount_table_clusters is 0)', 56);
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw bad(
      'refcount_table_clusters',
      `refcount_table_clusters ${refcountTableClusters} is too large (at most ${MAX_REFTABLE_BYTES} bytes)`,
      56,
    );
  }
  if (refcountTableOffset % clusterSize !== 0)
    throw bad('refcount_table_offset', `refcount_table_offset ${refcountTableOffset} is not aligned to a cluster`, 48);
  if (strictPlacement && (refcountTableOffset < clusterSize || refcountTableOffset >= fileSize)) {
    throw bad(
      'refcount_table_offset',
      `refcount_table_offset ${refcountTableOffset} lies outside the file (${fileSize} bytes) or in the header`,
      48,
    );
  }

  const nbSnapshots = u32(dv, 60);
  const snapshotsOffset = u64(dv, 64);
  if (nbSnapshots > MAX_SNAPSHOTS)
    throw bad('nb_snapshots', `nb_snapshots ${nbSnapshots} is too large (at most ${MAX_SNAPSHOTS})`, 60);
  if (snapshotsOffset % clusterSize !== 0)
    throw bad('snapshots_offset', `snapshots_offset ${snapshotsOffset} is not aligned to a cluster`, 64);
  if (nbSnapshots > 0 && strictPlacement) {
    // Each entry takes at least 40 bytes.
    if (snapshotsOffset < clusterSize || snapshotsOffset + nbSnapshots * 40 > fileSize) {
      throw bad(
        'snapshots_offset',
        `snapshot table at ${snapshotsOffset} (${nbSnapshots} snapshots) lies outside the file (${fileSize} bytes)`,
        64,
      );
    }
  }

  if ((incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
    warnings.push(
      'the image is marked corrupt (incompatible feature bit 1): its data may be inconsistent; it can be read but not written',
    );
  }

  return {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    clusterSize,
    size,
    rawSize,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extendedL2,
    l2EntrySize,
    l2Entries,
    subclusterSize,
    l1Needed,
    backingFile,
    backingFormat,
    dataFile,
    featureNames,
    bitmaps,
    unknownExtensions,
    extensionsEnd,
    warnings,
  };
}
