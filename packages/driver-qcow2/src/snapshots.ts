/**
 * Internal snapshots (qcow2.txt "Snapshots"): the snapshot table, listed by `info`
 * and searched by `-l` (ID first, then name, as qemu-img does). A snapshot is read
 * by using its L1 table instead of the active one; the virtual size stays the
 * image's current one (clusters past a shorter snapshot L1 table read as unallocated).
 */
import { corrupt, type Where } from './errors.js';
import { MAX_L1_BYTES, MAX_SNAPSHOTS, type Qcow2Header } from './header.js';
import { TWO_32 } from './format.js';

/** QEMU's bounds: on average 1 KiB per entry, at most 1 KiB of extra data in one. */
const MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS;
const MAX_EXTRA_DATA = 1024;
const FIXED_BYTES = 40;
/** First read of the table; grown as entries need. */
const FIRST_READ = 64 * 1024;

export interface Snapshot {
  readonly id: string;
  readonly name: string;
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly dateSec: number;
  readonly dateNsec: number;
  readonly vmClockNsec: number;
  readonly vmStateSize: number;
  /** Virtual size when the snapshot was taken, when recorded. */
  readonly diskSize?: number;
  /** Instruction count when the snapshot was taken, when recorded. */
  readonly icount?: number;
  /** Offset of the entry in the file, for messages. */
  readonly entryOffset: number;
  /** Bytes the entry takes in the table, padding included. */
  readonly entryLength: number;
}

export type ReadMeta = (offset: number, length: number) => Promise<Uint8Array>;

const utf8 = new TextDecoder('utf-8');

function u64(dv: DataView, off: number): number {
  return dv.getUint32(off) * TWO_32 + dv.getUint32(off + 4);
}

/** Reads and checks the snapshot table; reads at most what the entries need and the file holds. */
export async function readSnapshotTable(
  h: Qcow2Header,
  fileSize: number,
  read: ReadMeta,
  where: Where,
): Promise<Snapshot[]> {
  const out: Snapshot[] = [];
  if (h.nbSnapshots === 0) return out;
  const limit = Math.min(fileSize - h.snapshotsOffset, MAX_TABLE_BYTES);
  let buf = await read(h.snapshotsOffset, Math.min(limit, FIRST_READ));
  const ensure = async (end: number, index: number, at: number): Promise<void> => {
    if (end <= buf.length) return;
    if (end > limit) {
      throw corrupt(
        where,
        'snapshot table',
        `snapshot ${index}: entry at ${h.snapshotsOffset + at} runs past the end of the ${end > MAX_TABLE_BYTES ? `table size limit (${MAX_TABLE_BYTES} bytes)` : `file (${fileSize} bytes)`}`,
        h.snapshotsOffset + at,
      );
    }
    buf = await read(h.snapshotsOffset, Math.min(limit, Math.max(end, buf.length * 2)));
  };
  let at = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    await ensure(at + FIXED_BYTES, i, at);
    let dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const entryOffset = h.snapshotsOffset + at;
    const idSize = dv.getUint16(at + 12);
    const nameSize = dv.getUint16(at + 14);
    const extraSize = dv.getUint32(at + 36);
    if (extraSize > MAX_EXTRA_DATA) {
      throw corrupt(
        where,
        'snapshot table',
        `snapshot ${i}: ${extraSize} bytes of extra data (at most ${MAX_EXTRA_DATA})`,
        entryOffset + 36,
      );
    }
    const end = at + FIXED_BYTES + extraSize + idSize + nameSize;
    await ensure(end, i, at);
    dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const extra = at + FIXED_BYTES;
    const idAt = extra + extraSize;
    const snap: Snapshot = {
      l1TableOffset: u64(dv, at),
      l1Size: dv.getUint32(at + 8),
      dateSec: dv.getUint32(at + 16),
      dateNsec: dv.getUint32(at + 20),
      vmClockNsec: u64(dv, at + 24),
      vmStateSize: extraSize >= 8 ? u64(dv, extra) : dv.getUint32(at + 32),
      ...(extraSize >= 16 ? { diskSize: u64(dv, extra + 8) } : {}),
      // All ones means "not recorded" (QEMU's -1).
      ...(extraSize >= 24 && !(dv.getUint32(extra + 16) === 0xffff_ffff && dv.getUint32(extra + 20) === 0xffff_ffff)
        ? { icount: u64(dv, extra + 16) }
        : {}),
      id: utf8.decode(buf.subarray(idAt, idAt + idSize)),
      name: utf8.decode(buf.subarray(idAt + idSize, idAt + idSize + nameSize)),
      entryOffset,
      entryLength: Math.ceil(end / 8) * 8 - at,
    };
    out.push(snap);
    at = Math.ceil(end / 8) * 8;
  }
  return out;
}

/**
 * The snapshot to read: `idOrName` matches an ID first, then a name (qemu-img -l X);
 * `id` and `name` must both match when both are given (-l snapshot.id=..,snapshot.name=..).
 */
export function findSnapshot(
  list: readonly Snapshot[],
  sel: { idOrName?: string; id?: string; name?: string },
): Snapshot | undefined {
  if (sel.idOrName !== undefined) {
    return list.find((s) => s.id === sel.idOrName) ?? list.find((s) => s.name === sel.idOrName);
  }
  return list.find((s) => (sel.id === undefined || s.id === sel.id) && (sel.name === undefined || s.name === sel.name));
}

/** Checks a snapshot's L1 table before it is read: aligned, bounded, inside the file. */
export function checkSnapshotL1(s: Snapshot, h: Qcow2Header, fileSize: number, where: Where): void {
  const field = `snapshot ${s.id} L1 table`;
  if (s.l1Size * 8 > MAX_L1_BYTES)
    throw corrupt(where, field, `snapshot "${s.name}": l1_size ${s.l1Size} is too large`, s.entryOffset + 8);
  if (s.l1Size === 0) return;
  if (s.l1TableOffset % h.clusterSize !== 0 || s.l1TableOffset < h.clusterSize) {
    throw corrupt(
      where,
      field,
      `snapshot "${s.name}": L1 table offset ${s.l1TableOffset} is not a cluster-aligned offset past the header`,
      s.entryOffset,
    );
  }
  if (s.l1TableOffset + s.l1Size * 8 > fileSize) {
    throw corrupt(
      where,
      field,
      `snapshot "${s.name}": L1 table at ${s.l1TableOffset} (${s.l1Size} entries) runs past the end of the file (${fileSize} bytes)`,
      s.entryOffset,
    );
  }
}
