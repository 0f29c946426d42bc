/**
 * Creating qcow2 images, with qemu-img's `-o` options and its checks of them. The
 * new image is laid out as QEMU lays it out (header, refcount table, refcount block,
 * L1 table), with the L1 table taken from the allocator so that any size works, and
 * the header written last: a crash during creation leaves no valid-looking image.
 */
import {
  BlockError,
  parseSize,
  resolveRelative,
  type GatedBackend,
  type CreateOptionInfo,
  type CreateOptions,
  type CreateResult,
  type ImageResolver,
} from '@blockconv/core';
import { TableCache } from './cache.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  EXT_DATA_FILE,
  INCOMPAT_DATA_FILE,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  MAX_BACKING_NAME,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  type Qcow2Header,
} from './header.js';
import { Refcounts } from './refcounts.js';
import { Qcow2Writer } from './writer.js';

export const CREATE_OPTIONS: readonly CreateOptionInfo[] = [
  {
    name: 'compat',
    description: 'compatibility level (0.10 = version 2, 1.1 = version 3)',
    default: '1.1',
    values: ['0.10', '1.1', 'v2', 'v3'],
  },
  { name: 'backing_file', description: 'file name of a base image' },
  { name: 'backing_fmt', description: 'format of the base image' },
  { name: 'cluster_size', description: 'qcow2 cluster size (512 B to 2 MiB, a power of two)', default: '65536' },
  {
    name: 'preallocation',
    description: 'preallocation mode',
    default: 'off',
    values: ['off', 'metadata', 'falloc', 'full'],
  },
  {
    name: 'lazy_refcounts',
    description: 'postpone refcount updates (compat 1.1)',
    default: 'off',
    values: ['on', 'off'],
  },
  {
    name: 'refcount_bits',
    description: 'width of a reference count entry in bits (1 to 64, a power of two)',
    default: '16',
  },
  {
    name: 'compression_type',
    description: 'compression method for compressed clusters',
    default: 'zlib',
    values: ['zlib', 'zstd'],
  },
  {
    name: 'extended_l2',
    description: 'extended L2 tables: 32 subclusters per cluster (compat 1.1, clusters of 16 KiB or more)',
    default: 'off',
    values: ['on', 'off'],
  },
  { name: 'data_file', description: 'file name of an external data file for the guest data (compat 1.1)' },
  {
    name: 'data_file_raw',
    description: 'the external data file stays a valid raw image (implies preallocation=metadata)',
    default: 'off',
    values: ['on', 'off'],
  },
];

export interface Qcow2CreateOptions {
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: number;
  preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw: boolean;
}

function bool(name: string, v: string): boolean {
  if (['on', 'true', 'yes'].includes(v)) return true;
  if (['off', 'false', 'no'].includes(v)) return false;
  throw invalid(name, `invalid value "${v}" for ${name} (use on or off)`);
}

function invalid(field: string, message: string): BlockError {
  return new BlockError('EINVAL', message, { op: 'create', field });
}

/** Parses and checks `-o` options as qemu-img does, with its kind of messages. */
export function parseCreateOptions(o: Readonly<Record<string, string>>): Qcow2CreateOptions {
  const known = new Set(CREATE_OPTIONS.map((c) => c.name));
  for (const key of Object.keys(o)) {
    if (!known.has(key)) throw invalid(key, `invalid option "${key}" for qcow2 (see -o help)`);
  }
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw invalid('compat', `invalid compatibility level "${compat}" (use 0.10 or 1.1)`);

  const clusterSize = parseSize(o.cluster_size ?? '65536', 'cluster_size');
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid('cluster_size', `cluster size must be a power of two between 512 and 2048k, not ${clusterSize}`);
  }
  const refcountBits = Number(o.refcount_bits ?? '16');
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw invalid(
      'refcount_bits',
      `refcount width must be a power of two and may be at most 64 bits, not ${o.refcount_bits}`,
    );
  }
  if (version === 2 && refcountBits !== 16) {
    throw invalid(
      'refcount_bits',
      'different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
    );
  }
  const lazyRefcounts = bool('lazy_refcounts', o.lazy_refcounts ?? 'off');
  if (lazyRefcounts && version === 2) {
    throw invalid(
      'lazy_refcounts',
      'lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
    );
  }
  const extendedL2 = bool('extended_l2', o.extended_l2 ?? 'off');
  if (extendedL2) {
    if (version === 2)
      throw invalid(
        'extended_l2',
        'extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
      );
    if (clusterSize < 16384)
      throw invalid(
        'extended_l2',
        `extended L2 entries are only supported with cluster sizes of at least 16384 bytes, not ${clusterSize}`,
      );
  }
  const ctype = o.compression_type ?? 'zlib';
  let compressionType: number;
  if (ctype === 'zlib') compressionType = COMPRESSION_ZLIB;
  else if (ctype === 'zstd') compressionType = COMPRESSION_ZSTD;
  else throw invalid('compression_type', `invalid compression_type "${ctype}" (use zlib or zstd)`);
  if (compressionType !== COMPRESSION_ZLIB && version === 2) {
    throw invalid(
      'compression_type',
      `compression_type ${ctype} requires compatibility level 1.1 or above (use compat=1.1 or greater)`,
    );
  }
  const preallocation = (o.preallocation ?? 'off') as Qcow2CreateOptions['preallocation'];
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) {
    throw invalid('preallocation', `invalid preallocation mode "${preallocation}" (use off, metadata, falloc or full)`);
  }
  const backingFile = o.backing_file;
  const backingFormat = o.backing_fmt;
  if (backingFormat !== undefined && backingFile === undefined)
    throw invalid('backing_fmt', 'backing format cannot be used without backing file');
  if (backingFile !== undefined && preallocation !== 'off') {
    throw invalid('preallocation', 'backing file and preallocation cannot be used at the same time');
  }
  if (backingFile !== undefined && new TextEncoder().encode(backingFile).length > MAX_BACKING_NAME) {
    throw invalid('backing_file', `backing file name is longer than ${MAX_BACKING_NAME} bytes`);
  }
  const dataFile = o.data_file;
  const dataFileRaw = bool('data_file_raw', o.data_file_raw ?? 'off');
  if (dataFile !== undefined && version === 2)
    throw invalid(
      'data_file',
      'external data files are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
    );
  if (dataFileRaw && dataFile === undefined)
    throw invalid('data_file_raw', 'data_file_raw can only be used with data_file');
  if (dataFileRaw && backingFile !== undefined)
    throw invalid('data_file_raw', 'backing file and data_file_raw cannot be used at the same time');
  // The raw data file must hold every guest byte, so every cluster is mapped to it (as QEMU does).
  const prealloc = dataFileRaw && preallocation === 'off' ? 'metadata' : preallocation;
  return {
    version,
    clusterBits,
    refcountOrder,
    lazyRefcounts,
    extendedL2,
    compressionType,
    preallocation: prealloc,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
  };
}

const FEATURES: ReadonlyArray<readonly [number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

interface HeaderFields {
  readonly o: Qcow2CreateOptions;
  readonly size: number;
  readonly l1Size: number;
  readonly l1Offset: number;
  readonly reftableOffset: number;
  readonly reftableClusters: number;
}

/** The first cluster: header, extensions (backing format, feature names) and the backing file name, as QEMU orders them. */
export function encodeHeader(f: HeaderFields): Uint8Array {
  const { o } = f;
  const cs = 2 ** o.clusterBits;
  const buf = new Uint8Array(cs);
  const dv = new DataView(buf.buffer);
  const headerLength = o.version === 3 ? 112 : 72;
  let incompat = 0n;
  if (o.dataFile !== undefined) incompat |= INCOMPAT_DATA_FILE;
  if (o.compressionType !== COMPRESSION_ZLIB) incompat |= INCOMPAT_COMPRESSION;
  if (o.extendedL2) incompat |= INCOMPAT_EXTL2;
  const compat = o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n;
  dv.setUint32(0, QCOW2_MAGIC);
  dv.setUint32(4, o.version);
  dv.setUint32(20, o.clusterBits);
  dv.setBigUint64(24, BigInt(f.size));
  dv.setUint32(32, 0);
  dv.setUint32(36, f.l1Size);
  dv.setBigUint64(40, BigInt(f.l1Offset));
  dv.setBigUint64(48, BigInt(f.reftableOffset));
  dv.setUint32(56, f.reftableClusters);
  if (o.version === 3) {
    dv.setBigUint64(72, incompat);
    dv.setBigUint64(80, compat);
    dv.setBigUint64(88, o.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n);
    dv.setUint32(96, o.refcountOrder);
    dv.setUint32(100, headerLength);
    buf[104] = o.compressionType;
  }
  const utf8 = new TextEncoder();
  const backingName = o.backingFile !== undefined ? utf8.encode(o.backingFile) : undefined;
  let off = headerLength;
  const room = (n: number): boolean => off + n + 8 + (backingName?.length ?? 0) <= cs;
  const ext = (type: number, data: Uint8Array): void => {
    dv.setUint32(off, type);
    dv.setUint32(off + 4, data.length);
    buf.set(data, off + 8);
    off += 8 + Math.ceil(data.length / 8) * 8;
  };
  if (o.backingFormat !== undefined) {
    const fmt = utf8.encode(o.backingFormat);
    if (!room(8 + fmt.length)) throw invalid('backing_fmt', `the header does not fit in one ${cs}-byte cluster`);
    ext(EXT_BACKING_FORMAT, fmt);
  }
  if (o.dataFile !== undefined) {
    const name = utf8.encode(o.dataFile);
    if (!room(8 + name.length)) throw invalid('data_file', `the header does not fit in one ${cs}-byte cluster`);
    ext(EXT_DATA_FILE, name);
  }
  // Names of the feature bits, for tools that do not know them; left out when the cluster is too small (512 B).
  if (o.version === 3 && room(8 + FEATURES.length * 48)) {
    const table = new Uint8Array(FEATURES.length * 48);
    FEATURES.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(utf8.encode(name), i * 48 + 2);
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  if (!room(0)) throw invalid('backing_file', `the header does not fit in one ${cs}-byte cluster`);
  off += 8; // end of extensions (zeroes)
  if (backingName) {
    dv.setBigUint64(8, BigInt(off));
    dv.setUint32(16, backingName.length);
    buf.set(backingName, off);
  }
  return buf;
}

/** Writes a new, empty image of `size` bytes into the empty `file`. */
export async function createQcow2(
  file: GatedBackend,
  size: number,
  options: CreateOptions & { readonly resolver?: ImageResolver },
): Promise<CreateResult> {
  options.signal?.throwIfAborted();
  const where = { location: file.location, op: 'create' };
  let o: Qcow2CreateOptions;
  try {
    o = parseCreateOptions(options.options ?? {});
  } catch (err) {
    if (err instanceof BlockError) throw new BlockError(err.code, err.message, { ...where, field: err.field });
    throw err;
  }
  if (o.backingFile !== undefined) await checkBacking(file, o, options);
  let data: GatedBackend | undefined;
  if (o.dataFile !== undefined) {
    if (!options.resolver?.create)
      throw new BlockError('ENOTSUP', 'an external data file was given but no resolver can create it', {
        ...where,
        field: 'data_file',
      });
    const location = resolveRelative(file.location, o.dataFile);
    try {
      data = await options.resolver.create(location, o.dataFileRaw ? size : 0, {
        format: 'raw',
        cache: options.cache,
        signal: options.signal,
      });
    } catch (err) {
      const e = err as BlockError;
      throw new BlockError(e?.code ?? 'EIO', `cannot create data file "${o.dataFile}": ${e?.message ?? String(err)}`, {
        ...where,
        field: 'data_file',
        cause: err,
      });
    }
  }
  // Unallocated clusters read as zeroes unless a backing file shows through; preallocated
  // ones (and a raw data file's bytes) read what the file holding the data holds, which
  // the registry tells through zeroInitialized (a new sparse file: zeroes; a device: not).
  const holder = data ?? file;
  const zeroInitialized =
    o.backingFile === undefined && ((o.preallocation === 'off' && !o.dataFileRaw) || holder.zeroInitialized);
  try {
    await writeImage(file, size, o, data);
  } finally {
    await data?.close();
  }
  return { zeroInitialized };
}

/** The header, refcount structures and L1 table of a new image (and its preallocation). */
async function writeImage(
  file: GatedBackend,
  size: number,
  o: Qcow2CreateOptions,
  data: GatedBackend | undefined,
): Promise<void> {
  const where = { location: file.location, op: 'create' };
  if (!file.resize)
    throw new BlockError('ENOTSUP', `${file.driverName} storage cannot grow, which a qcow2 image needs`, where);
  const cs = 2 ** o.clusterBits;
  const l2Entries = cs / (o.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(size / (cs * l2Entries));
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new BlockError(
      'EFBIG',
      `virtual size ${size} needs an L1 table of ${l1Size * 8} bytes, more than ${MAX_L1_BYTES}: use a larger cluster_size`,
      { ...where, field: 'size' },
    );
  }

  // Refcount table in cluster 1, its first block in cluster 2; the header comes last.
  await file.resize(2 * cs);
  const refcounts = new Refcounts({
    file,
    clusterSize: cs,
    refcountOrder: o.refcountOrder,
    table: new Uint8Array(cs),
    tableOffset: cs,
    cache: new TableCache(4 * 1024 * 1024, cs, (offset) => file.read(offset, cs, new Uint8Array(cs))),
    end: 2 * cs,
    where,
  });
  await refcounts.markUsed(0, 2);
  const l1Offset = l1Size > 0 ? await refcounts.allocate(Math.ceil((l1Size * 8) / cs)) : 0;
  const rc = refcounts.capture();
  await Promise.all(rc.blocks.map((b) => file.write(b.offset, b.bytes)));
  await file.write(rc.table!.offset, rc.table!.bytes);
  refcounts.committed(rc);
  await file.flush();
  const reftableOffset = rc.moved?.offset ?? cs;
  const reftableClusters = rc.moved?.clusters ?? 1;
  // The L1 table reads as zeroes (the file grew over it): the header can point at it. Only now is the file an image.
  await file.write(0, encodeHeader({ o, size, l1Size, l1Offset, reftableOffset, reftableClusters }));
  if (rc.freeAfter.length) {
    await file.flush();
    await refcounts.applyFrees(rc.freeAfter);
    const again = refcounts.capture();
    await Promise.all(again.blocks.map((b) => file.write(b.offset, b.bytes)));
    refcounts.committed(again);
  }
  if (o.preallocation !== 'off') await preallocate(file, o, size, l1Size, l1Offset, refcounts, where, data);
  if (file.size > refcounts.end) await file.resize(refcounts.end);
  await file.flush();
  await data?.flush();
}

/** The backing image must open; its format is recorded when not given (qemu-img requires it be known). */
async function checkBacking(
  file: GatedBackend,
  o: Qcow2CreateOptions,
  options: CreateOptions & { readonly resolver?: ImageResolver },
): Promise<void> {
  const where = { location: file.location, op: 'create', field: 'backing_file' };
  if (!options.resolver) throw new BlockError('ENOTSUP', 'a backing file was given but no resolver to open it', where);
  const location = resolveRelative(file.location, o.backingFile!);
  let backing: GatedBackend;
  try {
    backing = await options.resolver.open(location, {
      readOnly: true,
      signal: options.signal,
      ...(o.backingFormat !== undefined ? { format: o.backingFormat } : {}),
    });
  } catch (err) {
    const e = err as BlockError;
    throw new BlockError(
      e?.code ?? 'EIO',
      `cannot open backing file "${o.backingFile}": ${e?.message ?? String(err)}`,
      { ...where, cause: err },
    );
  }
  o.backingFormat ??= backing.driverName;
  await backing.close();
}

/** preallocation=metadata/falloc/full: every cluster gets a host cluster (and, but for metadata, real space). */
async function preallocate(
  file: GatedBackend,
  o: Qcow2CreateOptions,
  size: number,
  l1Size: number,
  l1Offset: number,
  refcounts: Refcounts,
  where: { location: string; op: string },
  data: GatedBackend | undefined,
): Promise<void> {
  const cs = 2 ** o.clusterBits;
  const header = preallocHeader(o, size, l1Size, l1Offset);
  const l1 = new Uint8Array(l1Size * 8);
  const cache = new TableCache(32 * 1024 * 1024, cs, (offset) => file.read(offset, cs, new Uint8Array(cs)));
  const writer = new Qcow2Writer({
    file,
    data,
    dataFileRaw: o.dataFileRaw,
    header,
    l1,
    cache,
    refcounts,
    hasBacking: false,
    where,
    readGuest: async (_o, n, into) => into.fill(0, 0, n),
    allocBuffer: (n) => new Uint8Array(n),
  });
  const runs = await writer.preallocate(size);
  await writer.close();
  // The data file holds every guest byte at its offset: it has the virtual size (as QEMU makes it).
  if (data && data.size < size) await data.resize?.(size);
  if (o.preallocation !== 'metadata') {
    const storage = data ?? file;
    for (const [host, length] of runs)
      await storage.writeZeroes(host, Math.min(length, storage.size - host), { mayUnmap: false });
  }
}

function preallocHeader(o: Qcow2CreateOptions, size: number, l1Size: number, l1Offset: number): Qcow2Header {
  const cs = 2 ** o.clusterBits;
  const l2EntrySize = o.extendedL2 ? 16 : 8;
  return {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.clusterBits,
    clusterSize: cs,
    size,
    rawSize: size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: o.refcountOrder,
    headerLength: 0,
    compressionType: o.compressionType,
    extendedL2: o.extendedL2,
    l2EntrySize,
    l2Entries: cs / l2EntrySize,
    subclusterSize: o.extendedL2 ? cs / 32 : cs,
    l1Needed: l1Size,
    featureNames: [],
    unknownExtensions: [],
    extensionsEnd: 0,
    warnings: [],
  };
}
