/**
 * `info` details in the shape of `qemu-img info --output=json` (same names and
 * nesting), plus the bitmap directory it lists (qcow2.txt "Bitmap directory").
 */
import { redactLocation } from '@blockconv/core';
import { corrupt, type Where } from './errors.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_NAMES,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  type Qcow2Header,
} from './header.js';
import type { ReadMeta, Snapshot } from './snapshots.js';

export interface BitmapInfo {
  readonly flags: string[];
  readonly name: string;
  readonly granularity: number;
}

const BITMAP_FLAG_IN_USE = 1;
const BITMAP_FLAG_AUTO = 2;
const utf8 = new TextDecoder('utf-8');

/** Lists the bitmaps of the directory the bitmaps extension points to (already bounded by the header check). */
export async function readBitmapList(h: Qcow2Header, read: ReadMeta, where: Where): Promise<BitmapInfo[]> {
  const ext = h.bitmaps;
  if (!ext) return [];
  const dir = await read(ext.directoryOffset, ext.directorySize);
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: BitmapInfo[] = [];
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    const bad = (message: string) =>
      corrupt({ ...where, op: 'info' }, 'bitmap directory', `bitmap ${i}: ${message}`, ext.directoryOffset + at);
    if (at + 24 > dir.length) throw bad('entry runs past the end of the bitmap directory');
    const flags = dv.getUint32(at + 12);
    const granularityBits = dir[at + 17]!;
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    const end = at + 24 + extraSize + nameSize;
    if (end > dir.length) throw bad('entry runs past the end of the bitmap directory');
    if (granularityBits > 63) throw bad(`granularity_bits ${granularityBits} out of range`);
    const names: string[] = [];
    if (flags & BITMAP_FLAG_IN_USE) names.push('in-use');
    if (flags & BITMAP_FLAG_AUTO) names.push('auto');
    out.push({
      flags: names,
      name: utf8.decode(dir.subarray(at + 24 + extraSize, end)),
      granularity: 2 ** granularityBits,
    });
    at = Math.ceil(end / 8) * 8;
  }
  return out;
}

export interface InfoInputs {
  readonly header: Qcow2Header;
  readonly snapshots: readonly Snapshot[];
  readonly bitmaps: readonly BitmapInfo[];
  /** The backing file as resolved against the image's location. */
  readonly fullBackingFilename?: string;
}

export function buildInfo(i: InfoInputs): Record<string, unknown> {
  const h = i.header;
  const data: Record<string, unknown> = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': COMPRESSION_NAMES[h.compressionType],
  };
  if (h.version === 3) data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  if (i.bitmaps.length > 0) data.bitmaps = i.bitmaps;
  data['refcount-bits'] = 2 ** h.refcountOrder;
  // Like QEMU: only for images whose feature bit says the data file is in use.
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) {
    data['data-file'] = redactLocation(h.dataFile ?? '');
    data['data-file-raw'] = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  }
  if (h.version === 3) {
    data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
    data['extended-l2'] = h.extendedL2;
  }
  const info: Record<string, unknown> = {};
  if (i.snapshots.length > 0) {
    info.snapshots = i.snapshots.map((s) => ({
      ...(s.icount !== undefined ? { icount: s.icount } : {}),
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  info['cluster-size'] = h.clusterSize;
  info['format-specific'] = { type: 'qcow2', data };
  // The names as stored may be URLs with credentials (qemu-img shows them as they are).
  if (h.backingFile !== undefined) {
    info['full-backing-filename'] = redactLocation(i.fullBackingFilename ?? h.backingFile);
    info['backing-filename'] = redactLocation(h.backingFile);
    if (h.backingFormat !== undefined) info['backing-filename-format'] = h.backingFormat;
  }
  info['dirty-flag'] = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  return info;
}
