/**
 * `check`: qemu-img check for qcow2. Its exit code (0 clean, 1 check not completed,
 * 2 corruptions, 3 leaks) and counts are the reference, so this follows QEMU 7.2
 * (block/qcow2.c qcow2_co_check_locked, block/qcow2-refcount.c qcow2_check_refcounts,
 * block/qcow2-snapshot.c) step for step:
 *
 * 1. the image is opened as qemu-img check opens it: its backing chain and data file
 *    too, but the tables' placement in the file is left to the check;
 * 2. the snapshot table is read (check-snapshots.ts);
 * 3. every reference is counted into an in-memory refcount table (check-count.ts);
 * 4. the stored refcounts are compared with it: above is a leak, below a corruption,
 *    unreadable a check error (compareRefcounts);
 * 5. repairs: leaks, or everything with -r all, in place; with -r all a structure that
 *    cannot be mended in place is written anew (rebuild.ts), and -r leaks then fails;
 * 6. the "copied" flags of the active L1 and L2 entries must say "refcount 1" exactly
 *    when it is (checkCopiedFlags);
 * 7. after a repair that left nothing wrong, the dirty and corrupt bits are cleared.
 *
 * Where QEMU's check returns an error (a table it cannot read, a repair it must
 * refuse), this throws: qemu-img then prints no report and exits 1.
 *
 * Memory: one 16-bit counter per cluster of the file (wider counts in a side map),
 * bounded by the file's size; tables are read one at a time, and no more of a table
 * than QEMU's limits allow (header.ts, check-snapshots.ts).
 */
import { BlockError, type GatedBackend, type CheckOptions, type CheckResult } from '@blockconv/core';
import type { Where } from './errors.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from './header.js';
import { metaReader, readHeader } from './io.js';
import { entryOffset } from './mapping.js';
import { openReferencesForCheck, referencePolicy } from './references.js';
import { calculateRefcounts, clusterType, readTable } from './check-count.js';
import { readSnapshotsForCheck } from './check-snapshots.js';
import {
  checkFailed,
  checkMessages,
  finalMessages,
  hex64,
  noCounts,
  signalCorruption,
  writeIncompatibleFeatures,
  writeMetadata,
  type CheckState,
  type Counts,
} from './check-state.js';
import { readPadded, ReferenceCounts, RefcountUnreadable, StoredRefcounts } from './check-tables.js';
import { rebuildRefcountStructure } from './rebuild.js';
import { HI_COPIED } from './format.js';

/** QEMU refuses files of more clusters than an int holds. */
const MAX_CHECK_CLUSTERS = 2 ** 31 - 1;

export async function checkQcow2(file: GatedBackend, options: CheckOptions = {}): Promise<CheckResult> {
  const st = await openForCheck(file, options);
  const snapshotTable = await readSnapshotsForCheck(st);
  st.snapshots = snapshotTable.snapshots;
  st.snapshotsSize = snapshotTable.size;
  await checkRefcounts(st);
  const total = sum(st.res, snapshotTable.counts);
  if (st.repair !== undefined && total.checkErrors === 0 && total.corruptions === 0) await markCleanAndConsistent(st);
  return {
    ...total,
    messages: finalMessages(st.messages),
    imageEndOffset: (st.highestCluster + 1) * st.cs,
    totalClusters: Math.ceil(st.h.size / st.cs),
    allocatedClusters: st.frag.allocated,
    fragmentedClusters: st.frag.fragmented,
    compressedClusters: st.frag.compressed,
  };
}

/** Reads what QEMU reads when it opens the image for a check, and opens what the image refers to. */
async function openForCheck(file: GatedBackend, options: CheckOptions): Promise<CheckState> {
  const where: Where = { location: file.location, op: 'check' };
  const read = metaReader(file);
  const h = await readHeader(file, read, where, { forCheck: true });
  // Without a resolver (a driver called directly) there is nothing to open them with.
  if (options.resolver) {
    const policy = referencePolicy(
      (options as { options?: Readonly<Record<string, string>> }).options?.references,
      where,
    );
    await openReferencesForCheck(file, h, { resolver: options.resolver, signal: options.signal }, policy);
  }
  const cs = h.clusterSize;
  const clusters = Math.ceil(file.size / cs);
  if (clusters > MAX_CHECK_CLUSTERS) {
    throw new BlockError(
      'EFBIG',
      `the file has ${clusters} clusters, more than check handles (${MAX_CHECK_CLUSTERS})`,
      where,
    );
  }
  // Both tables as QEMU reads them at open: past the end of the file as zeroes.
  const activeL1 = await readPadded(file, read, h.l1TableOffset, h.l1Size * 8);
  const reftable = await readPadded(file, read, h.refcountTableOffset, h.refcountTableClusters * cs);
  const bits = 2 ** h.refcountOrder;
  // An unaligned refcount block is a corruption QEMU signals when it meets it.
  const stored = new StoredRefcounts(file, read, reftable, cs, bits, (m) => signalCorruption(st, m));
  const st: CheckState = {
    h,
    file,
    read,
    cs,
    where,
    repair: options.repair,
    signal: options.signal,
    hasDataFile: (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n,
    messages: checkMessages(),
    res: noCounts(),
    refs: new ReferenceCounts(clusters, bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1),
    stored,
    reftableOffset: h.refcountTableOffset,
    activeL1,
    snapshots: [],
    snapshotsSize: 0,
    rebuild: false,
    highestCluster: 0,
    frag: { allocated: 0, fragmented: 0, compressed: 0 },
    incompatibleFeatures: h.incompatibleFeatures,
    signaledCorruption: false,
  };
  return st;
}

function sum(a: Counts, b: Counts): Counts {
  return {
    corruptions: a.corruptions + b.corruptions,
    leaks: a.leaks + b.leaks,
    checkErrors: a.checkErrors + b.checkErrors,
    corruptionsFixed: a.corruptionsFixed + b.corruptionsFixed,
    leaksFixed: a.leaksFixed + b.leaksFixed,
  };
}

/** Steps 3 to 6 (QEMU's qcow2_check_refcounts). */
async function checkRefcounts(st: CheckState): Promise<void> {
  await calculateRefcounts(st);
  // What a repair pass starts from, should one follow.
  const beforeCompare = { ...st.res };
  await compareRefcounts(st, undefined);

  if (st.rebuild && st.repair === 'all') {
    await rebuildAndRecount(st);
  } else if (st.repair !== undefined) {
    if (st.rebuild) {
      st.messages.push('ERROR need to rebuild refcount structures');
      st.res.checkErrors++;
      throw checkFailed(
        st,
        'refcount table',
        'the refcount structure cannot be repaired in place (a refcount block is missing, misplaced or shared, or a cluster in use has refcount 0): repair with -r all',
      );
    }
    if (st.res.leaks || st.res.corruptions) {
      st.res = beforeCompare;
      await compareRefcounts(st, st.repair);
    }
  }
  await st.stored.flush();
  await checkCopiedFlags(st);
}

/** Writes a new refcount structure, then counts again and repairs the leaks the old one leaves. */
async function rebuildAndRecount(st: CheckState): Promise<void> {
  const before = { ...st.res };
  st.messages.push('Rebuilding refcount structure');
  await rebuildRefcountStructure(st);
  st.res.corruptions = 0;
  st.res.leaks = 0;
  st.rebuild = false;
  st.refs.clear();
  await calculateRefcounts(st);
  // QEMU keeps the recount's figures and takes from the leak repair only what it could not fix.
  const recount = { ...st.res };
  st.res = noCounts();
  await compareRefcounts(st, 'leaks');
  await st.stored.flush();
  if (st.rebuild) st.messages.push('ERROR rebuilt refcount structure is still broken');
  const freshLeaks = st.res.leaks;
  st.res = recount;
  if (st.res.corruptions < before.corruptions) st.res.corruptionsFixed += before.corruptions - st.res.corruptions;
  if (st.res.leaks < before.leaks) st.res.leaksFixed += before.leaks - st.res.leaks;
  st.res.leaks += freshLeaks;
}

/**
 * Stored refcounts against counted ones, cluster by cluster (QEMU's compare_refcounts);
 * `fix` repairs in place what it allows. A cluster in use whose stored refcount is 0
 * is never mended in place: it calls for a rebuild.
 */
async function compareRefcounts(st: CheckState, fix: 'leaks' | 'all' | undefined): Promise<void> {
  st.highestCluster = 0;
  for (let c = 0; c < st.refs.size; c++) {
    if ((c & 0xffff) === 0) st.signal?.throwIfAborted();
    const stored = await st.stored.get(c);
    if (stored instanceof RefcountUnreadable) {
      st.messages.push(`Can't get refcount for cluster ${c}: ${stored.reason}`);
      st.res.checkErrors++;
      continue;
    }
    const counted = st.refs.get(c);
    if (stored > 0 || counted > 0) st.highestCluster = c;
    if (stored === counted) continue;
    let fixed: 'leaksFixed' | 'corruptionsFixed' | undefined;
    if (stored === 0) st.rebuild = true;
    else if (stored > counted && fix !== undefined) fixed = 'leaksFixed';
    else if (stored < counted && fix === 'all') fixed = 'corruptionsFixed';
    st.messages.push(
      `${fixed ? 'Repairing' : stored < counted ? 'ERROR' : 'Leaked'} cluster ${c} refcount=${stored} reference=${counted}`,
    );
    if (fixed && (await st.stored.set(c, counted))) {
      st.res[fixed]++;
      if (counted === 0) await discardFreed(st, c);
      continue;
    }
    if (stored < counted) st.res.corruptions++;
    else st.res.leaks++;
  }
}

/**
 * A cluster a repair has freed is discarded, as QEMU discards it, so that the space
 * comes back (and what it held reads as zeroes where the storage punches holes).
 */
async function discardFreed(st: CheckState, cluster: number): Promise<void> {
  const { file, cs } = st;
  const offset = cluster * cs;
  const length = Math.min(cs, file.size - offset);
  const align = file.limits.requestAlignment;
  if (!file.canDiscard || length <= 0 || offset % align !== 0 || length % align !== 0) return;
  // Only space is at stake: a discard the storage refuses changes nothing in the image.
  await file.discard(offset, length).catch(() => {});
}

/**
 * The active L1 and L2 entries' "copied" flag must be set exactly when the refcount
 * is 1 (QEMU's check_oflag_copied). With -r all it is repaired; with -r leaks only
 * when nothing else is wrong, since the refcounts are then known to be right.
 */
async function checkCopiedFlags(st: CheckState): Promise<void> {
  const { h, cs } = st;
  const repair =
    st.repair === 'all' || (st.repair === 'leaks' && !st.res.checkErrors && !st.res.corruptions && !st.res.leaks);
  const l1 = new DataView(st.activeL1.buffer, st.activeL1.byteOffset, st.activeL1.byteLength);
  for (let i = 0; i < h.l1Size; i++) {
    const hi1 = l1.getUint32(i * 8);
    const lo1 = l1.getUint32(i * 8 + 4);
    const l2Offset = entryOffset(hi1, lo1);
    if (l2Offset === 0) continue;
    const rc = await st.stored.get(Math.floor(l2Offset / cs));
    // Already reported by the compare.
    if (rc instanceof RefcountUnreadable) continue;
    if ((rc === 1) !== ((hi1 & HI_COPIED) !== 0)) {
      st.res.corruptions++;
      st.messages.push(
        `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi1, lo1)} refcount=${rc}`,
      );
      if (repair) {
        l1.setUint32(i * 8, rc === 1 ? (hi1 | HI_COPIED) >>> 0 : hi1 & ~HI_COPIED);
        await writeMetadata(st, h.l1TableOffset + i * 8, st.activeL1.subarray(i * 8, i * 8 + 8), {
          what: 'L1 entry',
          ignore: 'active L1 table',
          failure: 'ERROR updating an L1 entry',
        });
        st.res.corruptions--;
        st.res.corruptionsFixed++;
      }
    }
    // Past the end of the file it reads as zeroes: no entry to check.
    if (l2Offset >= st.file.size) continue;
    const l2 = await readTable(
      st,
      l2Offset,
      h.l2Entries * h.l2EntrySize,
      'L2 table',
      (err) => `ERROR: Could not read L2 table: ${err.message}`,
    );
    const v = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
    let dirty = 0;
    for (let j = 0; j < h.l2Entries; j++) {
      const at = j * h.l2EntrySize;
      const hi = v.getUint32(at);
      const lo = v.getUint32(at + 4);
      const type = clusterType(st, hi, lo);
      if (type !== 'normal' && type !== 'zero-alloc') continue;
      // Clusters of an external data file always have refcount 1.
      const r = st.hasDataFile ? 1 : await st.stored.get(Math.floor(entryOffset(hi, lo) / cs));
      if (r instanceof RefcountUnreadable) continue;
      if ((r === 1) === ((hi & HI_COPIED) !== 0)) continue;
      st.res.corruptions++;
      st.messages.push(
        `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(hi, lo)} refcount=${r}`,
      );
      if (repair) {
        v.setUint32(at, r === 1 ? (hi | HI_COPIED) >>> 0 : hi & ~HI_COPIED);
        dirty++;
      }
    }
    if (dirty > 0) {
      await writeMetadata(st, l2Offset, l2.subarray(0, cs), {
        what: 'L2 table',
        ignore: 'active L2 table',
        failure: 'ERROR: Could not write L2 table; metadata overlap check failed',
      });
      st.res.corruptions -= dirty;
      st.res.corruptionsFixed += dirty;
    }
  }
}

/** A repair that left nothing wrong: the image is clean again (dirty bit) and consistent (corrupt bit). */
async function markCleanAndConsistent(st: CheckState): Promise<void> {
  const bits = st.incompatibleFeatures & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if (bits !== st.incompatibleFeatures) await writeIncompatibleFeatures(st, bits);
}
