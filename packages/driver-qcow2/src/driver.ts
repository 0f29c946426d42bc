/**
 * The qcow2 FormatDriver: probes the magic, parses and checks the header, reads the
 * L1 table (the active one or a snapshot's), and opens what the image refers to
 * (references.ts): the external data file and the backing chain, whose depth is capped.
 */
import {
  BLOCK_API_VERSION,
  BlockError,
  gateBackend,
  parseSize,
  resolveRelative,
  type BlockBackend,
  type GatedBackend,
  type FormatDriver,
  type ImageResolver,
  type OpenOptions,
} from '@blockconv/core';
import { Qcow2Backend } from './backend.js';
import { TableCache } from './cache.js';
import { corrupt } from './errors.js';
import { checkQcow2 } from './check.js';
import { CREATE_OPTIONS, createQcow2 } from './create.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  QCOW2_MAGIC,
  type Qcow2Header,
} from './header.js';
import { metaReader, readHeader, type ReadMeta } from './io.js';
import { ClusterMapper } from './mapping.js';
import { Refcounts } from './refcounts.js';
import {
  DEFAULT_REFERENCE_POLICY,
  canonical,
  chain,
  openBacking,
  openDataFile,
  referencePolicy,
  type ReferencePolicy,
} from './references.js';
import { checkSnapshotL1, findSnapshot, readSnapshotTable, type Snapshot } from './snapshots.js';

/** Default bound of the L2 table cache (QEMU's default maximum on Linux). */
export const DEFAULT_L2_CACHE_SIZE = 32 * 1024 * 1024;
/** Longest backing chain opened; deeper chains are refused rather than risk runaway recursion. */
export const MAX_CHAIN_DEPTH = 64;

/**
 * Open options (OpenOptions.options), named as QEMU names them:
 * - `l2-cache-size`: bound of the L2 table cache in bytes (suffixes k, M, G), default 32 MiB;
 * - `snapshot`: read the internal snapshot with this ID or, failing that, name (qemu-img -l X);
 * - `snapshot.id`, `snapshot.name`: the same by ID and/or name (qemu-img -l snapshot.id=..,snapshot.name=..);
 * - `data-file`: location of the external data file, instead of the name stored in the image.
 * The registry refuses keys that neither qcow2 nor the protocol below declares (openOptions).
 */
export const OPEN_OPTIONS = [
  'l2-cache-size',
  'snapshot',
  'snapshot.id',
  'snapshot.name',
  'data-file',
  'references',
] as const;

interface ParsedOptions {
  l2CacheSize: number;
  snapshot?: { idOrName?: string; id?: string; name?: string };
  dataFile?: string;
  references: ReferencePolicy;
}

function parseOptions(o: Readonly<Record<string, string>> | undefined, location: string): ParsedOptions {
  const out: ParsedOptions = {
    l2CacheSize: DEFAULT_L2_CACHE_SIZE,
    references: referencePolicy(o?.references, { location, op: 'open' }),
  };
  if (!o) return out;
  if (o['l2-cache-size'] !== undefined) out.l2CacheSize = parseSize(o['l2-cache-size'], 'l2-cache-size');
  const idOrName = o.snapshot;
  const id = o['snapshot.id'];
  const name = o['snapshot.name'];
  if (idOrName !== undefined && (id !== undefined || name !== undefined)) {
    throw new BlockError('EINVAL', 'give either "snapshot" or "snapshot.id"/"snapshot.name", not both', {
      op: 'open',
      location,
    });
  }
  if (idOrName !== undefined || id !== undefined || name !== undefined) out.snapshot = { idOrName, id, name };
  if (o['data-file'] !== undefined) out.dataFile = o['data-file'];
  return out;
}

const warned = new Set<string>();

/**
 * Process warnings, once per image and message: the CLI shows them on stderr, and
 * embedders can listen to process 'warning' events or read Qcow2Backend.warnings.
 */
function warnOnce(location: string, warnings: readonly string[]): void {
  for (const w of warnings) {
    const key = `${location}\0${w}`;
    if (warned.has(key)) continue;
    warned.add(key);
    process.emitWarning(`${location}: ${w}`, { code: 'BLOCKCONV_QCOW2' });
  }
}

export async function openQcow2(
  unchecked: BlockBackend,
  options: OpenOptions & { readonly resolver?: ImageResolver } = {},
): Promise<Qcow2Backend> {
  options.signal?.throwIfAborted();
  // Metadata reads and writes rely on the core's request gate below (the registry's
  // backends have one; gateBackend returns those as they are).
  const file = gateBackend(unchecked);
  const where = { location: file.location, op: 'open' };
  const self = await canonical(file.location);
  const ancestors = chain.getStore()?.images ?? [];
  if (ancestors.includes(self)) {
    throw corrupt(where, 'backing_file', `backing file loop: ${[...ancestors, self].join(' -> ')}`);
  }
  if (ancestors.length >= MAX_CHAIN_DEPTH) {
    throw new BlockError('ENOTSUP', `backing chain deeper than ${MAX_CHAIN_DEPTH} images`, {
      ...where,
      field: 'backing_file',
    });
  }
  const opts = parseOptions(options.options, file.location);
  const writable = options.readOnly !== true && !file.readOnly;
  const readMeta = metaReader(file);
  const header = await readHeader(file, readMeta, where);
  const warnings = [...header.warnings];

  const snapshots = await readSnapshotTable(header, file.size, readMeta, where);
  let snapshot: Snapshot | undefined;
  if (opts.snapshot) {
    snapshot = findSnapshot(snapshots, opts.snapshot);
    if (!snapshot) {
      const asked =
        opts.snapshot.idOrName ??
        [opts.snapshot.id && `id ${opts.snapshot.id}`, opts.snapshot.name && `name ${opts.snapshot.name}`]
          .filter(Boolean)
          .join(' and ');
      const known = snapshots.map((s) => `${s.id} "${s.name}"`).join(', ') || 'none';
      throw new BlockError('ENOENT', `no snapshot ${asked} in the image (snapshots: ${known})`, {
        ...where,
        field: 'snapshot',
      });
    }
    checkSnapshotL1(snapshot, header, file.size, where);
  }
  // Only the entries the virtual size needs are read: a longer table (left by a shrink) costs nothing.
  const l1Offset = snapshot ? snapshot.l1TableOffset : header.l1TableOffset;
  const l1Entries = Math.min(snapshot ? snapshot.l1Size : header.l1Size, header.l1Needed);
  const l1 = l1Entries > 0 ? await readMeta(l1Offset, l1Entries * 8) : new Uint8Array(0);

  const opened: GatedBackend[] = [];
  try {
    if (snapshots.length > 0 && (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) {
      throw corrupt(where, 'nb_snapshots', 'internal snapshots in an image with an external data file');
    }
    const dataFile = await openDataFile(file, header, opts.dataFile, options, where, writable, opts.references);
    if (dataFile) opened.push(dataFile);
    const fullBackingFilename =
      header.backingFile === undefined ? undefined : resolveRelative(file.location, header.backingFile);
    const backing = await openBacking(file, header, options, where, [...ancestors, self], opts.references);
    if (backing) opened.push(backing);

    const cache = new TableCache(opts.l2CacheSize, header.clusterSize, (offset) =>
      readMeta(offset, header.clusterSize),
    );
    const mapper = new ClusterMapper({
      header,
      l1,
      l1Offset,
      cache,
      file,
      dataFile: dataFile ?? file,
      hasDataFile: dataFile !== undefined,
      where: { location: file.location, op: 'read' },
    });
    if (writable) refuseWriting(header, snapshots.length, snapshot !== undefined, where);
    const write = writable
      ? {
          file,
          header,
          l1,
          cache,
          hasBacking: backing !== undefined,
          where: { location: file.location, op: 'write' },
          data: dataFile,
          dataFileRaw: (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n,
          refcounts: await openRefcounts(file, header, readMeta, opts.l2CacheSize, {
            location: file.location,
            op: 'open',
          }),
        }
      : undefined;
    warnOnce(file.location, warnings);
    return new Qcow2Backend({
      file,
      header,
      mapper,
      cache,
      dataFile,
      backing,
      fullBackingFilename,
      snapshots,
      snapshot,
      warnings,
      write,
    });
  } catch (err) {
    await Promise.allSettled(opened.map((b) => b.close()));
    throw err;
  }
}

/** What this driver cannot write (yet), refused when the image is opened for writing. */
function refuseWriting(
  h: Qcow2Header,
  snapshots: number,
  readingSnapshot: boolean,
  where: { location: string; op: string },
): void {
  const refuse = (code: string, field: string, message: string): never => {
    throw new BlockError(code, message, { ...where, field });
  };
  if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n)
    refuse(
      'EROFS',
      'incompatible_features',
      'the image is marked corrupt; writing is refused (repair it with qemu-img check -r all)',
    );
  if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n && (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n) {
    refuse(
      'EROFS',
      'incompatible_features',
      'the image was not closed cleanly (dirty bit with lazy refcounts): repair it with "blockconv check -r all" before writing',
    );
  }
  if (snapshots > 0)
    refuse('ENOTSUP', 'nb_snapshots', `writing images with internal snapshots (${snapshots}) is not supported`);
  if (readingSnapshot) refuse('EINVAL', 'snapshot', 'a snapshot can only be opened read-only');
}

/** The refcount table, read whole (at most 8 MiB), and the allocator over it. */
async function openRefcounts(
  file: GatedBackend,
  h: Qcow2Header,
  readMeta: ReadMeta,
  l2CacheSize: number,
  where: { location: string; op: string },
): Promise<Refcounts> {
  const bytes = h.refcountTableClusters * h.clusterSize;
  if (h.refcountTableOffset + bytes > file.size) {
    throw corrupt(
      where,
      'refcount_table_offset',
      `refcount table at ${h.refcountTableOffset} (${bytes} bytes) runs past the end of the file (${file.size} bytes)`,
      48,
    );
  }
  const table = (await readMeta(h.refcountTableOffset, bytes)).slice();
  const cache = new TableCache(Math.max(1024 * 1024, l2CacheSize / 4), h.clusterSize, (offset) =>
    readMeta(offset, h.clusterSize),
  );
  return new Refcounts({
    file,
    clusterSize: h.clusterSize,
    refcountOrder: h.refcountOrder,
    table,
    tableOffset: h.refcountTableOffset,
    cache,
    end: file.size,
    where,
  });
}

export const qcow2Driver: FormatDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'format',
  name: 'qcow2',
  description: 'QEMU copy-on-write image, versions 2 and 3',
  createOptions: CREATE_OPTIONS,
  openOptions: [
    {
      name: 'l2-cache-size',
      description: 'bytes of L2 tables kept in memory (suffixes k, M, G)',
      default: String(DEFAULT_L2_CACHE_SIZE),
    },
    { name: 'snapshot', description: 'read this internal snapshot (ID or name) instead of the active image' },
    { name: 'snapshot.id', description: 'read the internal snapshot with this ID' },
    { name: 'snapshot.name', description: 'read the internal snapshot with this name' },
    { name: 'data-file', description: 'the external data file, in place of the name the image records' },
    {
      name: 'references',
      description: `which backing and data files the image may name: same-server (on the image's own storage), confined (inside the image's directory: for untrusted images), none, or any (as qemu-img)`,
      default: DEFAULT_REFERENCE_POLICY,
    },
  ],
  probe: (head: Uint8Array) =>
    head.length >= 4 && ((head[0]! << 24) | (head[1]! << 16) | (head[2]! << 8) | head[3]!) >>> 0 === QCOW2_MAGIC
      ? 100
      : 0,
  open: openQcow2,
  create: createQcow2,
  // The image grows as clusters are allocated; the protocol object starts empty.
  protocolSizeFor: () => 0,
  check: checkQcow2,
};
