/**
 * `check -r all` on a refcount structure that cannot be mended in place (a block
 * missing, unaligned, outside the file or shared with other data, or a cluster in use
 * with refcount 0): a new structure is written from the in-memory refcount table, as
 * QEMU 7.2's rebuild_refcount_structure does. Blocks go to clusters free in that
 * table (a block no lower than the first cluster it describes), the table after them;
 * every allocation is counted in the in-memory table, and the blocks covering the new
 * table are written again until the table stops growing. The old structure is left
 * as leaks, which the check that follows repairs. Writes that would land on metadata
 * the image still uses are refused, as QEMU refuses them, and the check then fails.
 */
import { setRefcountAt } from './refcounts.js';
import { StoredRefcounts } from './check-tables.js';
import { signalCorruption, writeMetadata, type CheckState } from './check-state.js';
import { TWO_32 } from './format.js';

interface NewTable {
  /** Block offsets by refcount table index (0: no block). */
  offsets: number[];
}

export async function rebuildRefcountStructure(st: CheckState): Promise<void> {
  const { cs } = st;
  const table: NewTable = { offsets: [] };
  await writeRefblocks(st, 0, st.refs.size, table);
  // Placing the table changes the refcounts of its clusters: their blocks are written
  // again, which may need more blocks and so a larger table, until nothing grows.
  let tableOffset: number;
  let tableClusters: number;
  let grown: boolean;
  do {
    tableClusters = Math.ceil((table.offsets.length * 8) / cs);
    tableOffset = allocate(st, tableClusters, { value: 0 });
    grown = await writeRefblocks(st, tableOffset / cs, tableOffset / cs + tableClusters, table);
  } while (grown);

  const bytes = new Uint8Array(table.offsets.length * 8);
  const view = new DataView(bytes.buffer);
  table.offsets.forEach((offset, r) => {
    view.setUint32(r * 8, Math.floor(offset / TWO_32));
    view.setUint32(r * 8 + 4, offset % TWO_32);
  });
  await writeMetadata(st, tableOffset, bytes, { what: 'refcount table', failure: 'ERROR writing reftable' });

  // The header's refcount_table_offset and refcount_table_clusters, together.
  const header = new Uint8Array(12);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, Math.floor(tableOffset / TWO_32));
  hv.setUint32(4, tableOffset % TWO_32);
  hv.setUint32(8, tableClusters);
  await st.file.write(48, header);
  await st.file.flush();

  st.reftableOffset = tableOffset;
  st.stored = new StoredRefcounts(st.file, st.read, bytes, cs, 2 ** st.h.refcountOrder, (m) => signalCorruption(st, m));
}

/**
 * Writes the refcount blocks for the in-use clusters in [first, end), allocating the
 * blocks that `table` lacks; says whether the table had to grow.
 */
async function writeRefblocks(st: CheckState, first: number, end: number, table: NewTable): Promise<boolean> {
  const { cs } = st;
  const bits = 2 ** st.h.refcountOrder;
  const perBlock = (cs * 8) / bits;
  const firstFree = { value: 0 };
  let grown = false;
  for (let cluster = first; cluster < end; cluster++) {
    if (!st.refs.get(cluster)) continue;
    const r = Math.floor(cluster / perBlock);
    const blockStart = r * perBlock;
    let offset = table.offsets[r] ?? 0;
    if (offset === 0) {
      // Not below the clusters it describes: blocks already written stay as they are.
      firstFree.value = Math.max(firstFree.value, blockStart);
      offset = allocate(st, 1, firstFree);
      // Its own refcount must be written too, in whichever block holds it.
      end = Math.max(end, offset / cs + 1);
      if (table.offsets.length <= r) {
        const entries = (Math.ceil(((r + 1) * 8) / cs) * cs) / 8;
        while (table.offsets.length < entries) table.offsets.push(0);
        grown = true;
      }
      table.offsets[r] = offset;
    }
    const block = new Uint8Array(cs);
    const view = new DataView(block.buffer);
    for (let i = 0; i < perBlock; i++) {
      const v = st.refs.get(blockStart + i);
      if (v) setRefcountAt(block, view, bits, i, v);
    }
    await writeMetadata(st, offset, block, { what: 'refcount block', failure: 'ERROR writing refblock' });
    cluster = blockStart + perBlock - 1;
  }
  return grown;
}

/**
 * Takes `count` contiguous clusters free in the in-memory table, from `firstFree` on
 * (which is moved to the first free cluster seen), growing the table past the end of
 * the image when no gap is large enough (QEMU's alloc_clusters_imrt).
 */
function allocate(st: CheckState, count: number, firstFree: { value: number }): number {
  let cluster = firstFree.value;
  let free = 0;
  let firstGap = true;
  for (; cluster < st.refs.size && free < count; cluster++) {
    if (st.refs.get(cluster) === 0) {
      free++;
      if (firstGap) {
        firstFree.value = cluster;
        firstGap = false;
      }
    } else {
      free = 0;
    }
  }
  if (free < count) st.refs.grow(cluster + count - free);
  cluster -= free;
  for (let i = 0; i < count; i++) st.refs.set(cluster + i, 1);
  return cluster * st.cs;
}
