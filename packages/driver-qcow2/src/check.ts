/**
 * `check`: the refcounts of an image recomputed from every reference (header, L1 and
 * L2 tables, data and compressed clusters, snapshots and their tables, the refcount
 * structures themselves, the bitmap directory) and compared with the stored ones,
 * as qemu-img check does (qemu's block/qcow2-refcount.c): a stored refcount above
 * the references is a leak, one below is a corruption, and so is an L2 or L1 entry
 * whose "copied" flag disagrees with its cluster's refcount. Repair sets stored
 * refcounts to the references (leaks, or every mismatch with repair=all) and, with
 * repair=all, clears a lazy-refcount dirty bit.
 *
 * Memory: one 16-bit counter per cluster of the file (wider counts in a side map),
 * bounded by the file's size; tables are read one at a time.
 */
import { BlockError, type BlockBackend, type CheckOptions, type CheckResult } from '@blockconv/core';
import { hex, type Where } from './errors.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, type Qcow2Header } from './header.js';
import { metaReader, readHeader, type ReadMeta } from './io.js';
import { compressedRange, entryOffset } from './mapping.js';
import { refcountAt, setRefcountAt } from './refcounts.js';
import { readSnapshotTable } from './snapshots.js';

const TWO_32 = 0x1_0000_0000;
/** Files with more clusters than this are refused rather than given a huge counter array. */
const MAX_CHECK_CLUSTERS = 2 ** 31;

/** Counts references per host cluster. */
class ReferenceCounts {
  readonly #counts: Uint16Array;
  readonly #wide = new Map<number, number>();
  constructor(readonly clusters: number) { this.#counts = new Uint16Array(clusters); }
  get(c: number): number { return this.#wide.get(c) ?? this.#counts[c]!; }
  inc(c: number): void {
    const v = this.get(c) + 1;
    if (v > 0xffff) this.#wide.set(c, v);
    else this.#counts[c] = v;
  }
}

interface State {
  readonly h: Qcow2Header;
  readonly file: BlockBackend;
  readonly read: ReadMeta;
  readonly refs: ReferenceCounts;
  readonly cs: number;
  readonly messages: string[];
  corruptions: number;
  checkErrors: number;
  allocated: number;
  fragmented: number;
  compressed: number;
  nextContiguous: number;
}

export async function checkQcow2(file: BlockBackend, options: CheckOptions = {}): Promise<CheckResult> {
  const where: Where = { location: file.location, op: 'check' };
  const read = metaReader(file);
  const h = await readHeader(file, read, where);
  const cs = h.clusterSize;
  const clusters = Math.ceil(file.size / cs);
  if (clusters > MAX_CHECK_CLUSTERS) {
    throw new BlockError('EFBIG', `the file has ${clusters} clusters, more than check handles (${MAX_CHECK_CLUSTERS})`, where);
  }
  const st: State = {
    h, file, read, refs: new ReferenceCounts(clusters), cs, messages: [],
    corruptions: 0, checkErrors: 0, allocated: 0, fragmented: 0, compressed: 0, nextContiguous: 0,
  };

  // References.
  inc(st, 0, cs);
  await walkL1(st, h.l1TableOffset, h.l1Size, true);
  const snapshots = await readSnapshotTable(h, file.size, read, where).catch((err: unknown) => {
    st.messages.push(`ERROR reading the snapshot table: ${(err as Error).message}`);
    st.checkErrors++;
    return [];
  });
  if (snapshots.length) inc(st, h.snapshotsOffset, snapshots.reduce((n, s) => n + s.entryLength, 0));
  for (const s of snapshots) await walkL1(st, s.l1TableOffset, s.l1Size, false);
  await countBitmaps(st);
  inc(st, h.refcountTableOffset, h.refcountTableClusters * cs);
  const table = await read(h.refcountTableOffset, Math.min(h.refcountTableClusters * cs, file.size - h.refcountTableOffset));
  const tv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const blocks: number[] = [];
  for (let r = 0; r < table.length / 8; r++) {
    const offset = tv.getUint32(r * 8) * TWO_32 + ((tv.getUint32(r * 8 + 4) & ~(cs - 1)) >>> 0);
    blocks.push(offset);
    if (offset === 0) continue;
    if (offset % cs !== 0) { corruptionAt(st, `ERROR refcount block ${r} is not cluster aligned; refcount table entry corrupted`); blocks[r] = 0; continue; }
    if (offset >= file.size) { corruptionAt(st, `ERROR refcount block ${r} is outside image`); blocks[r] = 0; continue; }
    inc(st, offset, cs);
  }

  // Stored against counted.
  const bits = 2 ** h.refcountOrder;
  const perBlock = (cs * 8) / bits;
  let leaks = 0;
  let leaksFixed = 0;
  let corruptionsFixed = 0;
  let highest = -1;
  const fixLeaks = options.repair !== undefined;
  const fixAll = options.repair === 'all';
  const stored = async (c: number): Promise<{ block: Uint8Array; view: DataView; index: number; offset: number } | undefined> => {
    const r = Math.floor(c / perBlock);
    const offset = blocks[r] ?? 0;
    if (offset === 0) return undefined;
    if (cachedBlock?.offset !== offset) {
      if (cachedBlock?.dirty) await file.write(cachedBlock.offset, cachedBlock.block);
      const block = await read(offset, cs);
      cachedBlock = { offset, block, view: new DataView(block.buffer, block.byteOffset, block.byteLength), dirty: false };
    }
    return { block: cachedBlock.block, view: cachedBlock.view, index: c % perBlock, offset };
  };
  let cachedBlock: { offset: number; block: Uint8Array; view: DataView; dirty: boolean } | undefined;
  const refcountOf = new Map<number, number>(); // for the copied-flag check: clusters whose final refcount is not the reference count
  for (let c = 0; c < clusters; c++) {
    options.signal?.throwIfAborted();
    const counted = st.refs.get(c);
    if (counted > 0) highest = c;
    const s = await stored(c);
    const have = s ? refcountAt(s.block, s.view, bits, s.index) : 0;
    if (have === counted) continue;
    if (have > counted) {
      if (fixLeaks && s) {
        setRefcountAt(s.block, s.view, bits, s.index, counted);
        cachedBlock!.dirty = true;
        leaksFixed++;
        st.messages.push(`Repairing cluster ${c} refcount=${have} reference=${counted}`);
      } else {
        leaks++;
        st.messages.push(`Leaked cluster ${c} refcount=${have} reference=${counted}`);
        refcountOf.set(c, have);
      }
    } else if (fixAll && s) {
      setRefcountAt(s.block, s.view, bits, s.index, counted);
      cachedBlock!.dirty = true;
      corruptionsFixed++;
      st.messages.push(`Repairing cluster ${c} refcount=${have} reference=${counted}`);
    } else {
      st.corruptions++;
      st.messages.push(`ERROR cluster ${c} refcount=${have} reference=${counted}`);
      refcountOf.set(c, have);
    }
  }
  if (cachedBlock?.dirty) await file.write(cachedBlock.offset, cachedBlock.block);

  await checkCopiedFlags(st, (c) => refcountOf.get(c) ?? st.refs.get(c));

  if (options.repair !== undefined && (leaksFixed || corruptionsFixed)) await file.flush();
  if (fixAll && h.version === 3 && (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n && st.corruptions === 0) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, h.incompatibleFeatures & ~INCOMPAT_DIRTY);
    await file.write(72, b);
    await file.flush();
  }
  return {
    corruptions: st.corruptions, leaks, checkErrors: st.checkErrors, corruptionsFixed, leaksFixed, messages: st.messages,
    imageEndOffset: (highest + 1) * cs,
    totalClusters: Math.ceil(h.size / cs),
    allocatedClusters: st.allocated,
    fragmentedClusters: st.fragmented,
    compressedClusters: st.compressed,
  };
}

function corruptionAt(st: State, message: string): void {
  st.corruptions++;
  st.messages.push(message);
}

/** Counts one reference to every cluster [offset, offset+length) touches. */
function inc(st: State, offset: number, length: number): void {
  if (length <= 0) return;
  const first = Math.floor(offset / st.cs);
  const last = Math.floor((offset + length - 1) / st.cs);
  for (let c = first; c <= last; c++) {
    if (c >= st.refs.clusters) {
      corruptionAt(st, `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(c * st.cs)} size ${hex(st.cs)}`);
      return;
    }
    st.refs.inc(c);
  }
}

/** Counts the L1 table, its L2 tables and the clusters they map; `active` also gathers the allocation figures. */
async function walkL1(st: State, l1Offset: number, l1Size: number, active: boolean): Promise<void> {
  const { cs, h } = st;
  if (l1Size === 0) return;
  inc(st, l1Offset, l1Size * 8);
  let l1: Uint8Array;
  try {
    l1 = await st.read(l1Offset, Math.min(l1Size * 8, Math.max(0, st.file.size - l1Offset)));
  } catch (err) {
    st.messages.push(`ERROR: I/O error in reading the L1 table at ${hex(l1Offset)}: ${(err as Error).message}`);
    st.checkErrors++;
    return;
  }
  const lv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = entryOffset(lv.getUint32(i * 8), lv.getUint32(i * 8 + 4));
    if (l2Offset === 0) continue;
    if (l2Offset % cs !== 0) {
      corruptionAt(st, `ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      continue;
    }
    inc(st, l2Offset, cs);
    if (l2Offset + cs > st.file.size) continue;
    const l2 = await st.read(l2Offset, cs);
    const v = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
    // Contiguity is judged within one L2 table, as QEMU does.
    st.nextContiguous = 0;
    for (let j = 0; j < h.l2Entries; j++) {
      const at = j * h.l2EntrySize;
      const hi = v.getUint32(at);
      const lo = v.getUint32(at + 4);
      // Extended L2: the bitmaps must agree with the entry (qcow2.txt "Extended L2 Entries").
      const zeroBits = h.extendedL2 ? v.getUint32(at + 8) : 0;
      const allocBits = h.extendedL2 ? v.getUint32(at + 12) : 0;
      if (hi & 0x4000_0000) {
        if (hi & 0x8000_0000) corruptionAt(st, `ERROR: coffset=${hex(hi * TWO_32 + lo)}: copied flag must never be set for compressed clusters`);
        if (zeroBits || allocBits) corruptionAt(st, `ERROR: compressed cluster ${j} of the L2 table at ${hex(l2Offset)} has a non-zero subcluster bitmap`);
        const [host, length] = compressedRange(hi, lo, h.clusterBits);
        inc(st, host, length);
        // Compressed clusters count as fragmented, as in QEMU: they are read by whole sectors, shared with neighbours.
        if (active) { st.allocated++; st.compressed++; st.fragmented++; }
        continue;
      }
      const host = entryOffset(hi, lo);
      const allocated = host !== 0 || (hasDataFile && (hi & 0x8000_0000) !== 0);
      if (h.extendedL2) {
        if (!allocated && allocBits) corruptionAt(st, `ERROR: Unallocated cluster has non-zero subcluster allocation map (L2 entry ${j} of the table at ${hex(l2Offset)})`);
        if (allocated && (allocBits & zeroBits)) corruptionAt(st, `ERROR: subclusters marked both allocated and zero (L2 entry ${j} of the table at ${hex(l2Offset)})`);
      }
      if (!allocated) continue;
      if (host % cs !== 0) {
        corruptionAt(st, `ERROR offset=${hex(host)}: Cluster is not properly aligned; L2 entry corrupted.`);
        continue;
      }
      if (active) {
        st.allocated++;
        if (st.nextContiguous !== 0 && host !== st.nextContiguous) st.fragmented++;
        st.nextContiguous = host + cs;
      }
      if (!hasDataFile) inc(st, host, cs);
    }
  }
}

/** The bitmap directory and each bitmap's table and data clusters. */
async function countBitmaps(st: State): Promise<void> {
  const ext = st.h.bitmaps;
  if (!ext) return;
  inc(st, ext.directoryOffset, ext.directorySize);
  const dir = await st.read(ext.directoryOffset, ext.directorySize);
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps && at + 24 <= dir.length; i++) {
    const tableOffset = dv.getUint32(at) * TWO_32 + dv.getUint32(at + 4);
    const tableSize = dv.getUint32(at + 8);
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    if (tableOffset !== 0 && tableOffset % st.cs === 0 && tableOffset + tableSize * 8 <= st.file.size) {
      inc(st, tableOffset, tableSize * 8);
      const t = await st.read(tableOffset, tableSize * 8);
      const tv = new DataView(t.buffer, t.byteOffset, t.byteLength);
      for (let e = 0; e < tableSize; e++) {
        const off = entryOffset(tv.getUint32(e * 8), tv.getUint32(e * 8 + 4));
        if (off > 1) inc(st, off, st.cs);
      }
    }
    at = Math.ceil((at + 24 + extraSize + nameSize) / 8) * 8;
  }
}

/** Active L1/L2 entries: the copied flag must be set exactly when the refcount is 1. */
async function checkCopiedFlags(st: State, refcount: (cluster: number) => number): Promise<void> {
  const { cs, h } = st;
  if (h.l1Size === 0 || (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) return;
  const l1 = await st.read(h.l1TableOffset, Math.min(h.l1Size * 8, Math.max(0, st.file.size - h.l1TableOffset)));
  const lv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  for (let i = 0; i < l1.length / 8; i++) {
    const hi1 = lv.getUint32(i * 8);
    const l2Offset = entryOffset(hi1, lv.getUint32(i * 8 + 4));
    if (l2Offset === 0 || l2Offset % cs !== 0 || l2Offset + cs > st.file.size) continue;
    const rc = refcount(l2Offset / cs);
    if ((rc === 1) !== ((hi1 & 0x8000_0000) !== 0)) {
      corruptionAt(st, `ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(hi1 * TWO_32 + lv.getUint32(i * 8 + 4))} refcount=${rc}`);
    }
    if (hasDataFile) continue;
    const l2 = await st.read(l2Offset, cs);
    const v = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
    for (let j = 0; j < h.l2Entries; j++) {
      const hi = v.getUint32(j * h.l2EntrySize);
      const lo = v.getUint32(j * h.l2EntrySize + 4);
      if (hi & 0x4000_0000) continue;
      const host = entryOffset(hi, lo);
      if (host === 0 || host % cs !== 0 || host >= st.file.size) continue;
      const r = refcount(host / cs);
      if ((r === 1) !== ((hi & 0x8000_0000) !== 0)) {
        corruptionAt(st, `ERROR OFLAG_COPIED data cluster: l2_entry=${hex(hi * TWO_32 + lo)} refcount=${r}`);
      }
    }
  }
}
