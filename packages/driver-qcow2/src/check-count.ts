/**
 * The first half of `check`: every reference the image makes to a host cluster,
 * counted into the in-memory refcount table, with the checks QEMU makes on the way
 * (calculate_refcounts, check_refcounts_l1/l2 and check_refblocks in QEMU's
 * block/qcow2-refcount.c). Which entry counts as what decides qemu-img's exit code,
 * so the conditions, and their order, are QEMU's.
 */
import { hex } from './errors.js';
import { MAX_L1_BYTES } from './header.js';
import { compressedRange, entryOffset } from './mapping.js';
import { checkFailed, corruption, countRange, hex64, type CheckState } from './check-state.js';
import { readPadded } from './check-tables.js';
import {
  HI_COMPRESSED,
  HI_COPIED,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  L2_RESERVED_HI,
  L2_RESERVED_LO,
  LO_ZERO,
  TWO_32,
} from './format.js';

export type ClusterType = 'compressed' | 'zero-plain' | 'zero-alloc' | 'normal' | 'unallocated';

/** QEMU's qcow2_get_cluster_type, from an entry's two 32-bit halves. */
export function clusterType(st: CheckState, hi: number, lo: number): ClusterType {
  if (hi & HI_COMPRESSED) return 'compressed';
  const allocated = entryOffset(hi, lo) !== 0;
  if (lo & LO_ZERO && !st.h.extendedL2) return allocated ? 'zero-alloc' : 'zero-plain';
  if (allocated) return 'normal';
  // With an external data file offset 0 is a cluster of it, told apart by the copied flag.
  return st.hasDataFile && hi & HI_COPIED ? 'normal' : 'unallocated';
}

/** Counts every reference into st.refs, with the checks QEMU makes on the way. */
export async function calculateRefcounts(st: CheckState): Promise<void> {
  const { h, cs } = st;
  countRange(st, 0, cs); // the header
  await countL1(st, h.l1TableOffset, h.l1Size, true);
  if (st.hasDataFile && st.snapshots.length)
    corruption(st, `ERROR ${st.snapshots.length} snapshots in image with data file`);
  for (const s of st.snapshots) {
    if (s.l1TableOffset % cs !== 0) {
      corruption(
        st,
        `ERROR snapshot ${s.id} (${s.name}) l1_offset=${hex(s.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      continue;
    }
    if (s.l1Size > MAX_L1_BYTES / 8) {
      corruption(
        st,
        `ERROR snapshot ${s.id} (${s.name}) l1_size=${hex(s.l1Size)}: L1 table is too large; snapshot table entry corrupted`,
      );
      continue;
    }
    await countL1(st, s.l1TableOffset, s.l1Size, false);
  }
  countRange(st, h.snapshotsOffset, st.snapshotsSize);
  countRange(st, st.reftableOffset, st.stored.entries * 8);
  await countBitmaps(st);
  checkRefblocks(st);
}

/** An L1 table, its L2 tables and what they map; `active` also gathers the allocation figures. */
async function countL1(st: CheckState, offset: number, entries: number, active: boolean): Promise<void> {
  if (entries === 0) return;
  countRange(st, offset, entries * 8);
  const l1 = await readTable(st, offset, entries * 8, 'L1 table', ioError('check_refcounts_l1'));
  const v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < entries; i++) {
    const hi = v.getUint32(i * 8);
    const lo = v.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    if (hi & L1_RESERVED_HI || lo & L1_RESERVED_LO)
      corruption(st, `ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
    // An entry with only flags set names offset 0, and QEMU reads the header as an L2 table then.
    const l2Offset = entryOffset(hi, lo);
    countRange(st, l2Offset, st.cs);
    if (l2Offset % st.cs !== 0)
      corruption(st, `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
    await countL2(st, l2Offset, active);
  }
}

/** One L2 table's entries. */
async function countL2(st: CheckState, l2Offset: number, active: boolean): Promise<void> {
  const { h, cs } = st;
  // Past the end of the file it reads as zeroes: nothing allocated, nothing to count.
  // (A damaged L1 table can name hundreds of thousands of such tables.)
  if (l2Offset >= st.file.size) return;
  const l2 = await readTable(st, l2Offset, h.l2Entries * h.l2EntrySize, 'L2 table', ioError('check_refcounts_l2'));
  const v = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
  // Contiguity is judged within one L2 table, as QEMU does.
  let nextContiguous = 0;
  for (let j = 0; j < h.l2Entries; j++) {
    const at = j * h.l2EntrySize;
    const hi = v.getUint32(at);
    const lo = v.getUint32(at + 4);
    // Extended L2: bits 32..63 of the bitmap say "reads as zero", bits 0..31 "allocated".
    const zeroBits = h.extendedL2 ? v.getUint32(at + 8) : 0;
    const allocBits = h.extendedL2 ? v.getUint32(at + 12) : 0;
    const type = clusterType(st, hi, lo);
    if (type !== 'compressed' && (hi & L2_RESERVED_HI || lo & L2_RESERVED_LO)) {
      corruption(st, `ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
    }
    switch (type) {
      case 'compressed': {
        if (hi & HI_COPIED)
          corruption(
            st,
            `ERROR: coffset=${hex(compressedRange(hi, lo, h.clusterBits)[0])}: copied flag must never be set for compressed clusters`,
          );
        if (st.hasDataFile) {
          corruption(st, `ERROR compressed cluster ${j} with data file, entry=0x${hex64(hi, lo)}`);
          break;
        }
        if (zeroBits || allocBits) {
          corruption(
            st,
            `ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`,
          );
          break;
        }
        const [host, length] = compressedRange(hi, lo, h.clusterBits);
        countRange(st, host, length);
        // Compressed clusters count as fragmented, as in QEMU: they are read by whole sectors, shared with neighbours.
        if (active) {
          st.frag.allocated++;
          st.frag.compressed++;
          st.frag.fragmented++;
        }
        break;
      }
      case 'zero-alloc':
      case 'normal': {
        const host = entryOffset(hi, lo);
        if (zeroBits & allocBits)
          corruption(
            st,
            `ERROR offset=${host.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`,
          );
        if (host % cs !== 0) {
          // QEMU's -r all turns a preallocated (data-less) one into a zero cluster; this check only reports it.
          const preallocated = h.extendedL2 ? allocBits === 0 : (lo & LO_ZERO) !== 0;
          corruption(
            st,
            `ERROR offset=${host.toString(16)}: ${preallocated ? 'Preallocated cluster' : 'Data cluster'} is not properly aligned; L2 entry corrupted.`,
          );
        }
        if (active) {
          st.frag.allocated++;
          if (nextContiguous !== 0 && host !== nextContiguous) st.frag.fragmented++;
          nextContiguous = host + cs;
        }
        // Unaligned, it still counts: the clusters it overlaps.
        if (!st.hasDataFile) countRange(st, host, cs);
        break;
      }
      case 'zero-plain':
        break;
      case 'unallocated':
        if (allocBits) corruption(st, 'ERROR: Unallocated cluster has non-zero subcluster allocation map');
        break;
    }
  }
}

/** Reads a table for the check; what QEMU cannot read makes the check fail. */
/** qemu-img's report line for an I/O error in its function `fn`. */
const ioError = (fn: string) => (): string => `ERROR: I/O error in ${fn}`;

/**
 * Reads a table for the check; an I/O error is a check error (qemu-img's message for it,
 * `report`, goes with the report) and ends the check naming the table.
 */
export async function readTable(
  st: CheckState,
  offset: number,
  length: number,
  what: string,
  report: (err: Error) => string,
): Promise<Uint8Array> {
  try {
    return await readPadded(st.file, st.read, offset, length);
  } catch (err) {
    st.messages.push(report(err as Error));
    st.res.checkErrors++;
    throw checkFailed(st, what, `cannot read the ${what} at ${hex(offset)}: ${(err as Error).message}`);
  }
}

/** The bitmap directory and each bitmap's table and data clusters. */
async function countBitmaps(st: CheckState): Promise<void> {
  const ext = st.h.bitmaps;
  if (!ext) return;
  countRange(st, ext.directoryOffset, ext.directorySize);
  const dir = await readTable(
    st,
    ext.directoryOffset,
    ext.directorySize,
    'bitmap directory',
    ioError('qcow2_check_bitmaps_refcounts'),
  );
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps && at + 24 <= dir.length; i++) {
    const tableOffset = dv.getUint32(at) * TWO_32 + dv.getUint32(at + 4);
    const tableSize = dv.getUint32(at + 8);
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    if (tableOffset !== 0 && tableOffset % st.cs === 0 && tableOffset + tableSize * 8 <= st.file.size) {
      countRange(st, tableOffset, tableSize * 8);
      const t = await readTable(
        st,
        tableOffset,
        tableSize * 8,
        'bitmap table',
        ioError('qcow2_check_bitmaps_refcounts'),
      );
      const tv = new DataView(t.buffer, t.byteOffset, t.byteLength);
      for (let e = 0; e < tableSize; e++) {
        const off = entryOffset(tv.getUint32(e * 8), tv.getUint32(e * 8 + 4));
        if (off > 1) countRange(st, off, st.cs);
      }
    }
    at = Math.ceil((at + 24 + extraSize + nameSize) / 8) * 8;
  }
}

/**
 * The refcount table's entries: each block is counted where it lies; an entry with
 * reserved bits, an unaligned one, or a block that something else uses too (its
 * count is then above 1) can only be mended by building the structure anew.
 */
function checkRefblocks(st: CheckState): void {
  for (let r = 0; r < st.stored.entries; r++) {
    const { offset, reservedBits, aligned } = st.stored.entry(r);
    if (reservedBits) {
      corruption(st, `ERROR refcount table entry ${r} has reserved bits set`);
      st.rebuild = true;
      continue;
    }
    if (!aligned) {
      corruption(st, `ERROR refcount block ${r} is not cluster aligned; refcount table entry corrupted`);
      st.rebuild = true;
      continue;
    }
    const cluster = Math.floor(offset / st.cs);
    if (cluster >= st.refs.size) {
      // QEMU's -r all grows the file to hold the block; this check does not make files of
      // any size an entry asks for: a rebuild gives the clusters a block inside the file.
      corruption(st, `ERROR refcount block ${r} is outside image`);
      if (st.repair === 'all') st.rebuild = true;
      continue;
    }
    if (offset === 0) continue;
    countRange(st, offset, st.cs);
    const count = st.refs.get(cluster);
    if (count !== 1) {
      corruption(st, `ERROR refcount block ${r} refcount=${count}`);
      st.rebuild = true;
    }
  }
}
