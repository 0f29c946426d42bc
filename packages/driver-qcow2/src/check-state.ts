/**
 * What every step of `check` shares: the image, the tables in memory, the counts in
 * qemu-img check's terms, and the few things QEMU does around them: counting a
 * reference (qcow2_inc_refcounts_imrt), signalling a corruption (which marks the
 * image corrupt when it is open for a repair), refusing a write that would land on
 * other metadata (qcow2_check_metadata_overlap, in QEMU's default "cached" mode).
 */
import { BlockError, type GatedBackend } from '@blockconv/core';
import { hex, type Where } from './errors.js';
import { INCOMPAT_CORRUPT, type Qcow2Header } from './header.js';
import type { ReadMeta } from './io.js';
import { entryOffset } from './mapping.js';
import type { ReferenceCounts, StoredRefcounts } from './check-tables.js';
import { TWO_32 } from './format.js';

/** The counts qemu-img check reports. */
export interface Counts {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
}

export function noCounts(): Counts {
  return { corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0 };
}

/** A snapshot as the check reads it (qcow2_check_read_snapshot_table). */
export interface CheckSnapshot {
  readonly id: string;
  readonly name: string;
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly extraDataSize: number;
}

export interface CheckState {
  readonly h: Qcow2Header;
  readonly file: GatedBackend;
  readonly read: ReadMeta;
  readonly cs: number;
  readonly where: Where;
  readonly repair?: 'leaks' | 'all';
  readonly hasDataFile: boolean;
  readonly signal?: AbortSignal;
  /** qemu-img check's stderr lines, the first MAX_CHECK_MESSAGES of them (checkMessages). */
  readonly messages: CheckMessages;
  /** The refcount check's counts (QEMU's res in qcow2_check_refcounts). */
  res: Counts;
  refs: ReferenceCounts;
  stored: StoredRefcounts;
  /** Where the refcount table is: the header's, until a rebuild writes a new one. */
  reftableOffset: number;
  /** The active L1 table as read when the image was opened (repairs update it). */
  readonly activeL1: Uint8Array;
  snapshots: CheckSnapshot[];
  snapshotsSize: number;
  /** The refcount structure cannot be repaired in place (QEMU's rebuild flag). */
  rebuild: boolean;
  highestCluster: number;
  readonly frag: { allocated: number; fragmented: number; compressed: number };
  incompatibleFeatures: bigint;
  signaledCorruption: boolean;
}

/** A 64-bit entry from its two 32-bit halves, in hex as QEMU prints entries (no 0x). */
export function hex64(hi: number, lo: number): string {
  return (BigInt(hi) * BigInt(TWO_32) + BigInt(lo)).toString(16);
}

export function corruption(st: CheckState, message: string): void {
  st.res.corruptions++;
  st.messages.push(message);
}

/**
 * The check cannot go on (QEMU returns an error from the check: qemu-img prints
 * "Check failed", no report, and exits 1).
 */
export function checkFailed(st: CheckState, field: string, message: string, code = 'EIO'): BlockError {
  return new BlockError(code, message, { location: st.where.location, op: 'check', field });
}

/**
 * Counts one reference to every cluster [offset, offset+length) touches. A region
 * reaching a cluster or more past the end of the file is a corruption and counts
 * nothing (the last cluster may be partly past it: compressed data is read by sectors).
 */
export function countRange(st: CheckState, offset: number, length: number): void {
  if (length <= 0) return;
  if (offset + length - st.file.size >= st.cs) {
    corruption(
      st,
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(offset)} size ${hex(length)}`,
    );
    return;
  }
  const last = Math.floor((offset + length - 1) / st.cs);
  for (let c = Math.floor(offset / st.cs); c <= last; c++) {
    if (st.refs.inc(c)) continue;
    corruption(st, `ERROR: overflow cluster offset=${hex(c * st.cs)}`);
    st.messages.push(
      'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
    );
  }
}

/**
 * QEMU's qcow2_signal_corruption: told once; when the image is open for a repair the
 * corruption is fatal and the image is marked corrupt on disk, so that nothing writes
 * to it until a repair has succeeded.
 */
export async function signalCorruption(st: CheckState, message: string): Promise<void> {
  const fatal = st.repair !== undefined;
  if (st.signaledCorruption && (!fatal || (st.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n)) return;
  st.signaledCorruption = true;
  if (!fatal) {
    st.messages.push(`qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`);
    return;
  }
  st.messages.push(`qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`);
  await writeIncompatibleFeatures(st, st.incompatibleFeatures | INCOMPAT_CORRUPT);
}

/** Rewrites the header's incompatible feature bits (version 3 only: version 2 has none). */
export async function writeIncompatibleFeatures(st: CheckState, bits: bigint): Promise<void> {
  st.incompatibleFeatures = bits;
  if (st.h.version !== 3) return;
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, bits);
  await st.file.write(72, b);
  await st.file.flush();
}

/** Writes `bytes` at `offset`, growing the file first when they reach past its end (as a write through QEMU does). */
export async function writeAt(st: CheckState, offset: number, bytes: Uint8Array): Promise<void> {
  const end = offset + bytes.length;
  if (end > st.file.size) {
    if (!st.file.resize)
      throw checkFailed(st, 'file', `cannot write at ${hex(offset)}: the file cannot grow`, 'ENOSPC');
    await st.file.resize(end);
  }
  await st.file.write(offset, bytes);
}

export type Metadata =
  | 'qcow2_header'
  | 'active L1 table'
  | 'active L2 table'
  | 'refcount table'
  | 'refcount block'
  | 'snapshot table'
  | 'inactive L1 table'
  | 'bitmap directory';

/**
 * The metadata a write of [offset, offset+size) would land on, if any, leaving out
 * `ignore` (the kind being written): QEMU's overlap check in its default mode. Refusing
 * such a write is what turns some repairs into a failed check rather than a worse image.
 */
export function overlappingMetadata(
  st: CheckState,
  offset: number,
  size: number,
  ignore?: Metadata,
): Metadata | undefined {
  if (size === 0) return undefined;
  const { cs, h } = st;
  const is = (kind: Metadata) => kind !== ignore;
  if (is('qcow2_header') && offset < cs) return 'qcow2_header';
  // Whole clusters, as QEMU compares them.
  const start = Math.floor(offset / cs) * cs;
  const end = Math.ceil((offset + size) / cs) * cs;
  const hits = (o: number, len: number): boolean => len > 0 && o < end && start < o + len;
  if (is('active L1 table') && h.l1Size && hits(h.l1TableOffset, h.l1Size * 8)) return 'active L1 table';
  if (is('refcount table') && st.stored.entries && hits(st.reftableOffset, st.stored.entries * 8))
    return 'refcount table';
  if (is('snapshot table') && st.snapshotsSize && hits(h.snapshotsOffset, st.snapshotsSize)) return 'snapshot table';
  if (is('inactive L1 table') && st.snapshots.some((s) => s.l1Size && hits(s.l1TableOffset, s.l1Size * 8)))
    return 'inactive L1 table';
  if (is('active L2 table')) {
    const l1 = new DataView(st.activeL1.buffer, st.activeL1.byteOffset, st.activeL1.byteLength);
    for (let i = 0; i < h.l1Size; i++) {
      const l2 = entryOffset(l1.getUint32(i * 8), l1.getUint32(i * 8 + 4));
      if (l2 && hits(l2, cs)) return 'active L2 table';
    }
  }
  if (is('refcount block')) {
    const last = st.stored.lastUsedEntry();
    for (let r = 0; r <= last && r < st.stored.entries; r++) {
      const block = st.stored.blockOffset(r);
      if (block && hits(block, cs)) return 'refcount block';
    }
  }
  if (is('bitmap directory') && h.bitmaps && hits(h.bitmaps.directoryOffset, h.bitmaps.directorySize))
    return 'bitmap directory';
  return undefined;
}

export interface MetadataWrite {
  /** What is written: the field a failure names. */
  readonly what: string;
  /** The kind of metadata being written, which it may overlap (QEMU's "ign"); none for new structures. */
  readonly ignore?: Metadata;
  /** QEMU's message when the write is refused. */
  readonly failure: string;
}

/**
 * A repair's write of metadata, refused (the image marked corrupt, the check failed)
 * when it would land on other metadata.
 */
export async function writeMetadata(
  st: CheckState,
  offset: number,
  bytes: Uint8Array,
  w: MetadataWrite,
): Promise<void> {
  const hit = overlappingMetadata(st, offset, bytes.length, w.ignore);
  if (hit) {
    await signalCorruption(st, `Preventing invalid write on metadata (overlaps with ${hit})`);
    st.messages.push(`${w.failure}: Input/output error`);
    throw checkFailed(st, w.what, `${w.failure}: it would overwrite the ${hit} at ${hex(offset)}`);
  }
  await writeAt(st, offset, bytes);
}

/**
 * How many problem lines a check keeps. The counts stay exact; past this, lines are only
 * counted: an image whose tables are garbage has a problem per entry (millions in a few
 * MiB of L2 tables: found by the fuzz campaign, 300 MiB of strings and a stack overflow).
 */
export const MAX_CHECK_MESSAGES = 10_000;

export type CheckMessages = string[] & { dropped: number };

export function checkMessages(): CheckMessages {
  const lines = Object.assign([] as string[], { dropped: 0 });
  lines.push = (...items: string[]): number => {
    for (const m of items) {
      if (lines.length < MAX_CHECK_MESSAGES) Array.prototype.push.call(lines, m);
      else lines.dropped++;
    }
    return lines.length;
  };
  return lines;
}

/** The kept lines, and one saying how many more there were. */
export function finalMessages(m: CheckMessages): string[] {
  const out = Array.from(m);
  if (m.dropped) out.push(`... and ${m.dropped} more lines like these (the counts above include them)`);
  return out;
}
