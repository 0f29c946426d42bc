/**
 * The fuzzer's own reading of a qcow2 file (docs/interop/qcow2.txt): where each header
 * field, extension, table entry and descriptor lies, so that mutations land on
 * structure rather than on data. Written apart from the driver's parser on purpose: a
 * fuzzer that shares the parser's reading shares its blind spots. Lenient by design:
 * whatever cannot be followed is left out.
 */

export interface Field {
  /** What the bytes are, for the case's description ("header.l1_size", "l2[3].entry[17]"). */
  readonly name: string;
  readonly at: number;
  readonly width: 1 | 2 | 4 | 8;
  /** The kind of value, so that mutations pick values that mean something for it. */
  readonly kind: 'offset' | 'count' | 'size' | 'flags' | 'bits' | 'l1' | 'l2' | 'refcount' | 'type' | 'other';
}

export interface Layout {
  readonly fileSize: number;
  readonly clusterSize: number;
  readonly version: number;
  readonly extendedL2: boolean;
  readonly fields: readonly Field[];
  /** Metadata structures as [start, end) ranges: byte flips and truncation points. */
  readonly regions: ReadonlyArray<readonly [string, number, number]>;
  /** Host offsets of metadata clusters: values that make a pointer alias metadata. */
  readonly metadataOffsets: readonly number[];
}

const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

function u32(b: Buffer, at: number): number {
  return at + 4 <= b.length ? b.readUInt32BE(at) : 0;
}
function u64(b: Buffer, at: number): bigint {
  return at + 8 <= b.length ? b.readBigUInt64BE(at) : 0n;
}

export function layoutOf(b: Buffer): Layout {
  const fields: Field[] = [];
  const regions: Array<[string, number, number]> = [];
  const meta = new Set<number>([0]);
  const f = (name: string, at: number, width: Field['width'], kind: Field['kind']): void => {
    if (at + width <= b.length) fields.push({ name, at, width, kind });
  };
  const version = u32(b, 4);
  const clusterBits = u32(b, 20);
  const clusterSize = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 65536;
  const headerFields: Array<[string, number, Field['width'], Field['kind']]> = [
    ['magic', 0, 4, 'other'],
    ['version', 4, 4, 'other'],
    ['backing_file_offset', 8, 8, 'offset'],
    ['backing_file_size', 16, 4, 'size'],
    ['cluster_bits', 20, 4, 'bits'],
    ['size', 24, 8, 'size'],
    ['crypt_method', 32, 4, 'type'],
    ['l1_size', 36, 4, 'count'],
    ['l1_table_offset', 40, 8, 'offset'],
    ['refcount_table_offset', 48, 8, 'offset'],
    ['refcount_table_clusters', 56, 4, 'count'],
    ['nb_snapshots', 60, 4, 'count'],
    ['snapshots_offset', 64, 8, 'offset'],
  ];
  if (version >= 3) {
    headerFields.push(
      ['incompatible_features', 72, 8, 'flags'],
      ['compatible_features', 80, 8, 'flags'],
      ['autoclear_features', 88, 8, 'flags'],
      ['refcount_order', 96, 4, 'bits'],
      ['header_length', 100, 4, 'size'],
      ['compression_type', 104, 1, 'type'],
    );
  }
  for (const [name, at, width, kind] of headerFields) f(`header.${name}`, at, width, kind);
  const headerLength = version >= 3 ? Math.min(u32(b, 100), clusterSize) : 72;
  const incompat = version >= 3 ? u64(b, 72) : 0n;
  const extendedL2 = (incompat & 16n) !== 0n;
  regions.push(['header', 0, Math.min(headerLength, b.length)]);

  // Header extensions: type, length, data padded to 8 bytes, up to the end marker.
  let ext = headerLength;
  let bitmaps: { dirOffset: number; dirSize: number; count: number } | undefined;
  for (let i = 0; i < 32 && ext + 8 <= Math.min(b.length, clusterSize); i++) {
    const type = u32(b, ext);
    const len = u32(b, ext + 4);
    f(`ext[${i}].type`, ext, 4, 'type');
    f(`ext[${i}].length`, ext + 4, 4, 'size');
    regions.push([`ext[${i}]`, ext, Math.min(ext + 8 + len, b.length)]);
    if (type === 0) break;
    if (type === 0x23852875 && len >= 24) {
      f('bitmaps.nb_bitmaps', ext + 8, 4, 'count');
      f('bitmaps.directory_size', ext + 16, 8, 'size');
      f('bitmaps.directory_offset', ext + 24, 8, 'offset');
      bitmaps = { count: u32(b, ext + 8), dirSize: Number(u64(b, ext + 16)), dirOffset: Number(u64(b, ext + 24)) };
    }
    ext += 8 + Math.ceil(len / 8) * 8;
  }
  const backingAt = Number(u64(b, 8));
  if (backingAt > 0 && backingAt < b.length)
    regions.push(['backing name', backingAt, Math.min(backingAt + u32(b, 16), b.length)]);

  // L1 and the L2 tables it points at.
  const l1Size = u32(b, 36);
  const l1At = Number(u64(b, 40));
  const entrySize = extendedL2 ? 16 : 8;
  const l2Tables = new Set<number>();
  const compressed: number[] = [];
  const readL1 = (label: string, at: number, size: number): void => {
    if (at <= 0 || at >= b.length) return;
    meta.add(at);
    regions.push([label, at, Math.min(at + size * 8, b.length)]);
    for (let i = 0; i < Math.min(size, 4096); i++) {
      const e = u64(b, at + i * 8);
      if (i < 64) f(`${label}[${i}]`, at + i * 8, 8, 'l1');
      const l2 = Number(e & OFFSET_MASK);
      if (l2 > 0 && l2 + clusterSize <= b.length) l2Tables.add(l2);
    }
  };
  readL1('l1', l1At, l1Size);

  // Snapshots: each has its own L1 table, and fields of its own.
  const nbSnapshots = Math.min(u32(b, 60), 64);
  let snap = Number(u64(b, 64));
  if (snap > 0 && snap < b.length) meta.add(snap);
  for (let i = 0; i < nbSnapshots && snap > 0 && snap + 40 <= b.length; i++) {
    const start = snap;
    f(`snapshot[${i}].l1_table_offset`, snap, 8, 'offset');
    f(`snapshot[${i}].l1_size`, snap + 8, 4, 'count');
    f(`snapshot[${i}].id_str_size`, snap + 12, 2, 'size');
    f(`snapshot[${i}].name_size`, snap + 14, 2, 'size');
    f(`snapshot[${i}].vm_state_size`, snap + 32, 4, 'size');
    f(`snapshot[${i}].extra_data_size`, snap + 36, 4, 'size');
    const extra = u32(b, snap + 36);
    if (extra >= 8) f(`snapshot[${i}].vm_state_size_large`, snap + 40, 8, 'size');
    if (extra >= 16) f(`snapshot[${i}].disk_size`, snap + 48, 8, 'size');
    readL1(`snapshot[${i}].l1`, Number(u64(b, snap)), u32(b, snap + 8));
    const idSize = b.length >= snap + 14 ? b.readUInt16BE(snap + 12) : 0;
    const nameSize = b.length >= snap + 16 ? b.readUInt16BE(snap + 14) : 0;
    snap += Math.ceil((40 + extra + idSize + nameSize) / 8) * 8;
    regions.push([`snapshot[${i}]`, start, Math.min(snap, b.length)]);
  }

  let t = 0;
  for (const l2 of l2Tables) {
    meta.add(l2);
    regions.push([`l2[${t}]`, l2, l2 + clusterSize]);
    const entries = clusterSize / entrySize;
    // Entries that map something are the interesting ones; a few empty ones as well.
    let picked = 0;
    for (let i = 0; i < entries && picked < 96; i++) {
      const e = u64(b, l2 + i * entrySize);
      if (e === 0n && i % 61 !== 0) continue;
      picked++;
      f(`l2[${t}].entry[${i}]`, l2 + i * entrySize, 8, 'l2');
      if (extendedL2) f(`l2[${t}].bitmap[${i}]`, l2 + i * entrySize + 8, 8, 'flags');
      if ((e & (1n << 62n)) !== 0n) compressed.push(l2 + i * entrySize);
    }
    t++;
  }
  // Compressed clusters: the descriptor packs an offset and a sector count, and the data is a stream.
  const offsetBits = 62 - (clusterBits - 8);
  for (const [i, at] of compressed.slice(0, 16).entries()) {
    const e = u64(b, at);
    const host = Number(e & ((1n << BigInt(offsetBits)) - 1n));
    if (host > 0 && host < b.length) regions.push([`compressed[${i}] data`, host, Math.min(host + 512, b.length)]);
  }

  // Refcount table and the refcount blocks it points at.
  const rtAt = Number(u64(b, 48));
  const rtClusters = u32(b, 56);
  if (rtAt > 0 && rtAt < b.length) {
    meta.add(rtAt);
    const rtEnd = Math.min(rtAt + rtClusters * clusterSize, b.length);
    regions.push(['refcount table', rtAt, rtEnd]);
    let r = 0;
    for (let at = rtAt; at + 8 <= rtEnd && r < 64; at += 8) {
      const block = Number(u64(b, at));
      if (block === 0) continue;
      f(`refcount_table[${(at - rtAt) / 8}]`, at, 8, 'offset');
      if (block > 0 && block + clusterSize <= b.length) {
        meta.add(block);
        regions.push([`refcount block ${r}`, block, block + Math.min(clusterSize, 4096)]);
        const order = version >= 3 ? u32(b, 96) : 4;
        const width = order >= 3 && order <= 6 ? ((2 ** order / 8) as Field['width']) : undefined;
        // Sub-byte refcounts are mutated through byte flips of the block.
        if (width) for (let i = 0; i < 32; i++) f(`refcount_block[${r}][${i}]`, block + i * width, width, 'refcount');
      }
      r++;
    }
  }

  // Bitmap directory and the bitmap tables it names.
  if (bitmaps && bitmaps.dirOffset > 0 && bitmaps.dirOffset < b.length) {
    meta.add(bitmaps.dirOffset);
    let d = bitmaps.dirOffset;
    const end = Math.min(d + bitmaps.dirSize, b.length);
    regions.push(['bitmap directory', d, end]);
    for (let i = 0; i < Math.min(bitmaps.count, 16) && d + 24 <= end; i++) {
      f(`bitmap[${i}].table_offset`, d, 8, 'offset');
      f(`bitmap[${i}].table_size`, d + 8, 4, 'count');
      f(`bitmap[${i}].flags`, d + 12, 4, 'flags');
      f(`bitmap[${i}].type`, d + 16, 1, 'type');
      f(`bitmap[${i}].granularity_bits`, d + 17, 1, 'bits');
      f(`bitmap[${i}].name_size`, d + 18, 2, 'size');
      f(`bitmap[${i}].extra_data_size`, d + 20, 4, 'size');
      const table = Number(u64(b, d));
      if (table > 0 && table < b.length) {
        meta.add(table);
        regions.push([`bitmap[${i}] table`, table, Math.min(table + u32(b, d + 8) * 8, b.length)]);
        for (let j = 0; j < Math.min(u32(b, d + 8), 8); j++) f(`bitmap[${i}].table[${j}]`, table + j * 8, 8, 'offset');
      }
      const nameSize = b.length >= d + 20 ? b.readUInt16BE(d + 18) : 0;
      d += Math.ceil((24 + u32(b, d + 20) + nameSize) / 8) * 8;
    }
  }
  return {
    fileSize: b.length,
    clusterSize,
    version,
    extendedL2,
    fields,
    regions: regions.filter(([, s, e]) => e > s),
    metadataOffsets: [...meta],
  };
}
